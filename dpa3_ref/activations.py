"""Activation functions by deepmd-kit name (spec §5.1).

SiLUT ("silut:T", legacy "custom_silu:T"; bare "silut" means T = 3) is SiLU below a threshold T and a
shifted tanh above it, glued so that value and first derivative are continuous at T:

    phi(x) = x σ(x)                 for x < T
    phi(x) = tanh(k (x - T)) + c    for x >= T,   c = silu(T),  k = silu'(T) = σ(T) + T σ(T)(1 - σ(T))

so phi is bounded above by c + 1, which keeps deep message passing from blowing up.

SiLU and SiLUT carry their first and second derivatives explicitly (`with_derivatives`): left to
autodiff, the backward pass would keep σ(x), tanh(·) and the branch mask of every angle feature in memory,
and training on forces, which differentiates φ' once more, would differentiate that whole expression. With
the rules, φ' and φ'' are each one fused loop over x. Below T, with σ = σ(x):

    φ'  = σ (1 + x (1 − σ)),          φ'' = σ (1 − σ) (2 + x (1 − 2σ))
and above T, with t = tanh(k (x − T)):
    φ'  = k (1 − t²),                 φ'' = −2 k² t (1 − t²)

φ'' is left to autodiff, so third and higher derivatives work too.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from dpa3_ref.errors import Dpa3Error

Activation = Callable[[jax.Array], jax.Array]


def silut_constants(threshold: float) -> tuple[float, float]:
    """(slope k, offset c) of the tanh branch of SiLUT, computed in float64 on the host."""
    sigma = 1.0 / (1.0 + math.exp(-threshold))
    slope = sigma + threshold * sigma * (1.0 - sigma)
    offset = threshold * sigma
    return slope, offset


def with_derivatives(value: Activation, first: Activation, second: Activation) -> Activation:
    """φ = value, with φ' = first and φ'' = second as its derivative rules (all elementwise)."""

    @jax.custom_jvp
    def derivative(x):
        return first(x)

    derivative.defjvp(lambda primals, tangents: (first(primals[0]), tangents[0] * second(primals[0])))

    @jax.custom_jvp
    def phi(x):
        return value(x)

    phi.defjvp(lambda primals, tangents: (value(primals[0]), tangents[0] * derivative(primals[0])))
    return phi


def _silu_first(x, sigma):
    return sigma * (1.0 + x * (1.0 - sigma))


def _silu_second(x, sigma):
    return sigma * (1.0 - sigma) * (2.0 + x * (1.0 - 2.0 * sigma))


silu = with_derivatives(
    lambda x: x * jax.nn.sigmoid(x),
    lambda x: _silu_first(x, jax.nn.sigmoid(x)),
    lambda x: _silu_second(x, jax.nn.sigmoid(x)),
)


def silut(threshold: float) -> Activation:
    slope, offset = silut_constants(threshold)

    def parts(x):
        # One exponential serves both branches: r = σ(x) below T, and above T, with E = exp(−2k(x − T)),
        # tanh(k(x − T)) = (1 − E)/(1 + E) = 2r − 1 where r = 1/(1 + E). (Half the cost of σ and tanh.)
        below = x < threshold
        r = 1.0 / (1.0 + jnp.exp(jnp.where(below, -x, -2.0 * slope * (x - threshold))))
        return below, r, 2.0 * r - 1.0  # the mask, σ(x) below T, tanh(k(x − T)) above

    def value(x):
        below, sigma, tail = parts(x)
        return jnp.where(below, x * sigma, tail + offset)

    def first(x):
        below, sigma, tail = parts(x)
        return jnp.where(below, _silu_first(x, sigma), slope * (1.0 - tail * tail))

    def second(x):
        below, sigma, tail = parts(x)
        return jnp.where(below, _silu_second(x, sigma), -2.0 * slope * slope * tail * (1.0 - tail * tail))

    return with_derivatives(value, first, second)


def gelu_tanh(x: jax.Array) -> jax.Array:
    return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


_SIMPLE: dict[str, Activation] = {
    "tanh": jnp.tanh,
    "relu": jax.nn.relu,
    "gelu": gelu_tanh,
    "gelu_tf": gelu_tanh,
    "relu6": lambda x: jnp.clip(x, 0.0, 6.0),
    "softplus": jax.nn.softplus,
    "sigmoid": jax.nn.sigmoid,
    "silu": silu,
    "linear": lambda x: x,
    "none": lambda x: x,
}


def get_activation(name: str) -> Activation:
    """The activation called `name` in deepmd-kit configs (case-insensitive)."""
    key = name.lower()
    if key in _SIMPLE:
        return _SIMPLE[key]
    if key.startswith(("silut", "custom_silu")):
        threshold = 3.0
        if ":" in key:
            try:
                threshold = float(key.split(":", 1)[1])
            except ValueError:
                raise Dpa3Error(f"activation {name!r}: the SiLUT threshold after ':' is not a number") from None
        return silut(threshold)
    known = ", ".join(sorted(_SIMPLE)) + ", silut:T, custom_silu:T"
    raise Dpa3Error(f"unknown activation function {name!r}; known: {known}")

"""Activation functions by deepmd-kit name (spec §5.1).

SiLUT ("silut:T", legacy "custom_silu:T"; bare "silut" means T = 3) is SiLU below a threshold T and a
shifted tanh above it, glued so that value and first derivative are continuous at T:

    phi(x) = x σ(x)                 for x < T
    phi(x) = tanh(k (x - T)) + c    for x >= T,   c = silu(T),  k = silu'(T) = σ(T) + T σ(T)(1 - σ(T))

so phi is bounded above by c + 1, which keeps deep message passing from blowing up.

SiLU and SiLUT carry their derivative explicitly (`jax.custom_jvp`): left to autodiff, the backward pass
would keep σ(x), tanh(·) and the branch mask of every angle feature in memory; with the rule it keeps x
only and recomputes φ'(x) in one fused loop. The rule is itself differentiable, so second derivatives
(training on forces) work.
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


@jax.custom_jvp
def silu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(x)


@silu.defjvp
def _silu_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    sigma = jax.nn.sigmoid(x)
    return x * sigma, dx * sigma * (1.0 + x * (1.0 - sigma))


def silut(threshold: float) -> Activation:
    slope, offset = silut_constants(threshold)

    def parts(x):
        # One exponential serves both branches: r = σ(x) below T, and above T, with E = exp(−2k(x − T)),
        # tanh(k(x − T)) = (1 − E)/(1 + E) = 2r − 1 where r = 1/(1 + E). (Half the cost of σ and tanh.)
        below = x < threshold
        r = 1.0 / (1.0 + jnp.exp(jnp.where(below, -x, -2.0 * slope * (x - threshold))))
        return below, r

    @jax.custom_jvp
    def phi(x: jax.Array) -> jax.Array:
        below, r = parts(x)
        return jnp.where(below, x * r, 2.0 * r - 1.0 + offset)

    @phi.defjvp
    def _phi_jvp(primals, tangents):
        (x,), (dx,) = primals, tangents
        below, r = parts(x)
        tail = 2.0 * r - 1.0
        value = jnp.where(below, x * r, tail + offset)
        derivative = jnp.where(below, r * (1.0 + x * (1.0 - r)), slope * (1.0 - tail * tail))
        return value, dx * derivative

    return phi


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

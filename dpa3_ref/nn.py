"""The one neural-network building block: deepmd-kit's affine layer.

    y = phi(x W + b) [⊙ idt] [+ x  or  + [x; x]]

W has shape [n_in, n_out] (input-major, x is a row vector) exactly as deepmd-kit stores it, so official
weights load without transposes. The optional timestep vector `idt` and the residual skip (added only
when n_out == n_in, or n_out == 2 n_in with the input duplicated) are the fitting net's "resnet_dt"
(spec §6.2). In the descriptor every layer is plain `x W + b`, the activation is applied by the RepFlow
block.

We write this by hand instead of using `eqx.nn.Linear` because the latter does not survive
`jax.grad` inside a jax2onnx export (../shared/docs/onnx_export_notes.md).
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp

from dpa3_ref.activations import get_activation


class Layer(eqx.Module):
    weight: jax.Array  # [n_in, n_out]
    bias: jax.Array | None  # [n_out]
    timestep: jax.Array | None  # [n_out], deepmd's "idt"
    activation: str = eqx.field(static=True, default="none")
    residual: bool = eqx.field(static=True, default=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x @ self.weight
        if self.bias is not None:
            y = y + self.bias
        y = get_activation(self.activation)(y)
        if self.timestep is not None:
            y = y * self.timestep
        if self.residual:
            n_in, n_out = self.weight.shape
            y = y + (x if n_out == n_in else jnp.concatenate([x, x], axis=-1))
        return y

    @property
    def n_in(self) -> int:
        return self.weight.shape[0]

    @property
    def n_out(self) -> int:
        return self.weight.shape[1]


def has_skip(n_in: int, n_out: int) -> bool:
    """deepmd-kit's shape rule for a residual connection (spec §6.2)."""
    return n_out == n_in or n_out == 2 * n_in


def init_layer(
    n_in: int,
    n_out: int,
    *,
    key: jax.Array,
    dtype: jnp.dtype,
    bias: bool = True,
    activation: str = "none",
    resnet_dt: bool = False,
    residual: bool = False,
) -> Layer:
    """deepmd-kit's initialisation (spec §9.4): W ~ N(0, 1/(n_in + n_out)), b ~ N(0, 1), idt ~ N(0.1, 1e-3²)."""
    w_key, b_key, t_key = jax.random.split(key, 3)
    weight = jax.random.normal(w_key, (n_in, n_out), dtype) / math.sqrt(n_in + n_out)
    return Layer(
        weight=weight,
        bias=jax.random.normal(b_key, (n_out,), dtype) if bias else None,
        timestep=(0.1 + 1e-3 * jax.random.normal(t_key, (n_out,), dtype)) if resnet_dt else None,
        activation=activation,
        residual=residual,
    )


def split_rows(layer: Layer, sizes: list[int]) -> list[jax.Array]:
    """Split W [sum(sizes), n_out] into row blocks, one per concatenated input piece (spec §5.6).

    x_cat W = Σ_b x_b W_b, so a linear layer on [n_i; n_j; e_ij] can be applied to each piece at its
    own size (per atom, per edge) and summed after gathering, instead of materialising the concatenation.
    """
    blocks, start = [], 0
    for size in sizes:
        blocks.append(layer.weight[start : start + size])
        start += size
    assert start == layer.n_in, (sizes, layer.weight.shape)
    return blocks

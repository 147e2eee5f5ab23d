"""The neighbour gather n_j and its transpose, with an optional race-free backward pass for ONNX.

Message passing reads per-atom values at the neighbours of every atom, and forces push per-edge
gradients back onto those neighbours:

    gather      out[i, m]  = table[neighbors[i, m]]                               [n, M, d]
    transpose   sums[j]    = Σ_{(i, m): neighbors[i, m] = j} values[i, m]          [n, d]

Autodiff writes the transpose as a scatter-add. Exported to ONNX it becomes ScatterND(reduction="add"),
whose onnxruntime CPU kernel adds with a plain `+=` inside a parallel loop: on more than one thread the
forces come out wrong (../shared/docs/onnx_export_notes.md). Given the *reverse neighbour table*

    reverse[j, r] = i·M + m   for every real cell (i, m) with neighbors[i, m] = j,  −1 on padding   [n, R]

(built on the host: dpa3_onnx.inputs.reverse_neighbor_table) the same sum is a gather and a sum over an axis: each output row is written by one thread, in a fixed
order, so the result is correct and identical from run to run on every thread count and provider.
`gather_neighbors` uses it for its backward pass (jax.custom_vjp) when it is given; without it (JAX
evaluation and training) both functions are the plain gather and segment sum, with JAX's own derivatives.
Padding cells (masked) are left out of `reverse`: every value the model sends back through them is an
exact zero (their switch is 0), so leaving them out changes nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def gather_neighbors(table: jax.Array, neighbors: jax.Array, reverse: jax.Array | None = None) -> jax.Array:
    """table[neighbors]: [n, d] → [n_rows, M, d]; with `reverse`, its derivative is race-free."""
    if reverse is None:
        return table[neighbors]
    return _gather_with_reverse(table, neighbors, reverse)


def sum_into_neighbors(values: jax.Array, neighbors: jax.Array, reverse: jax.Array | None = None) -> jax.Array:
    """Σ of values [n, M, d] over the cells that point at each atom → [n, d] (the gather's transpose)."""
    if reverse is None:
        return jax.ops.segment_sum(values.reshape(-1, values.shape[-1]), neighbors.reshape(-1), values.shape[0])
    flat = values.reshape(-1, values.shape[-1])  # [n M, d], row i·M + m
    picked = flat[jnp.maximum(reverse, 0)] * (reverse >= 0)[..., None].astype(values.dtype)  # [n, R, d]
    return jnp.sum(picked, axis=1)


@jax.custom_vjp
def _gather_with_reverse(table, neighbors, reverse):
    return table[neighbors]


def _forward(table, neighbors, reverse):
    return table[neighbors], (neighbors, reverse)


def _backward(saved, d_out):
    neighbors, reverse = saved
    return sum_into_neighbors(d_out, neighbors, reverse), None, None


_gather_with_reverse.defvjp(_forward, _backward)

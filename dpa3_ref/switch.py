"""Switch functions and the edge/angle inputs computed from edge vectors (spec §2, docs/architecture.md §2).

For an edge i→j with vector r_ij = x_j − x_i and length r:

    polynomial switch   s(r) = 1 − 10u³ + 15u⁴ − 6u⁵,  u = clip((r − r_s)/(r_c − r_s), 0, 1)
    exponential switch  s(r) = exp(−exp(20 (r̄ − r_s)/r_s)),  r̄ = clip(r, 0, r_c)   (not 0 at r_c!)
    environment row     R_ij = s(r) · [1/(r+p), r_ij/(r+p)²],   R̂_ij = (R_ij − davg[t_i, slot]) / dstd[t_i, slot]
    h_ij = R̂_ij[1:4]  (rotation-equivariant, fixed through all layers)
    edge scalar input   x^e_ij = r  (edge_init_use_dist)  or  R̂_ij[0]
    angle input         x^a_ijk = (u_ij · u_ik)(1 − 10⁻⁶)/√π,  u_ij = r_ij/(r + 10⁻⁶)

Padded edges have a zero vector; every norm goes through `safe_length`, which substitutes 1 before the
square root, so that their gradient is exactly 0 and not NaN (the "double where" trick).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def safe_length(vectors: jax.Array, mask: jax.Array) -> jax.Array:
    """|v| where mask, 1 elsewhere, with finite gradients everywhere."""  # [n] from [n, 3]
    squared = jnp.sum(vectors * vectors, axis=-1)
    return jnp.where(mask, jnp.sqrt(jnp.where(mask, squared, 1.0)), 1.0)


def polynomial_switch(r: jax.Array, r_smooth: float, r_cut: float) -> jax.Array:
    u = jnp.clip((r - r_smooth) / (r_cut - r_smooth), 0.0, 1.0)
    return u * u * u * (-6.0 * u * u + 15.0 * u - 10.0) + 1.0


def exponential_switch(r: jax.Array, r_smooth: float, r_cut: float) -> jax.Array:
    r = jnp.clip(r, 0.0, r_cut)
    return jnp.exp(-jnp.exp(20.0 / r_smooth * (r - r_smooth)))


def switch(r: jax.Array, r_smooth: float, r_cut: float, use_exp_switch: bool) -> jax.Array:
    return (exponential_switch if use_exp_switch else polynomial_switch)(r, r_smooth, r_cut)


def cosine_input(unit_block: jax.Array) -> jax.Array:
    """x^a_ijk for every angle of every atom from the unit vectors u_ij [n_atoms, K, 3]."""  # [n_atoms, K, K, 1]
    cosine = jnp.matmul(unit_block, jnp.swapaxes(unit_block, 1, 2)) * (1.0 - 1e-6)
    return cosine[..., None] / math.sqrt(math.pi)

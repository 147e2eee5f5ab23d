"""One RepFlow layer: (node, edge, angle) → (node', edge', angle') (spec §5, docs/architecture.md §4).

With φ the descriptor activation, s_ij the edge switch, s^a the angle switch, and S_e, S_a the
normalisation constants (capacities e_sel, a_sel; divided by sel_reduce_factor in dynamic mode):

  node terms
    (N1) self            u1_i = φ(Lin_ns(n_i))
    (N2) symmetrisation  M_i(g) = S_e^{-1/2} Σ_j s_ij h_ij^T g_ij            [3, d]
                         G_i(g) = M_i(g)[:, :A]^T M_i(g) / 3                   [A, d], flattened
                         u2_i = φ(Lin_sym([G_i(e); G_i(n_j)]))
    (N3) message         u3_i = S_e^{-1} Σ_j s_ij φ(Lin_ne([n_i; n_j; e_ij]))  (H heads of width n)
  edge terms
    (E1) self            w1_ij = φ(Lin_es([n_i; n_j; e_ij]))
    (E2) angle → edge    z_ijk = [a_ijk; ñ_i; ẽ_ik; ẽ_ij]
                         ρ_ij = S_a^{-1/2} Σ_k s^a_ij s^a_ik φ(Lin_ea1(z_ijk))
                         w2_ij = φ(Lin_ea2(ρ_ij))   (ρ_ij := e_ij off the angle list if not smooth_edge_update)
  angle term
    (A1) self            y_ijk = φ(Lin_as(z_ijk))
  residual update        x' = x + Σ_k r_k ⊙ x_k   (res_residual; res_avg and res_incr use fixed weights)

Every linear layer on a concatenation is applied block by block (x_cat W = Σ_b x_b W_b, spec §5.6): the
node blocks act once per atom and are gathered to edges, the edge blocks once per edge and broadcast to
angles, so only the a_dim-wide block is multiplied per angle. Edges live in the neighbour table
([atoms, M, ·], neighbors.py) and angles in per-atom K × K blocks ([atoms, K, K, ·], j = axis 1, k = axis 2),
so every sum over j or k is a sum over an axis. A layer only reaches other atoms through one gather from
`NeighborTables` (n_j and its projections): given those, it updates any block of atoms on its own.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp

from dpa3_ref.activations import get_activation
from dpa3_ref.config import DPA3Config
from dpa3_ref.gather import gather_neighbors
from dpa3_ref.nn import Layer, init_layer, split_rows


class LineGraph(NamedTuple):
    """What every layer needs to know about the graph; fixed through all layers. One row per centre atom."""

    neighbors: jax.Array  # [atoms, M] index j of each neighbour
    edge_switch: jax.Array  # [atoms, M] s_ij (0 on padding)
    edge_h: jax.Array  # [atoms, M, 3] h_ij
    edge_in_angle: jax.Array  # [atoms, M] bool, j is an angle neighbour (only the first K columns can be)
    angle_switch: jax.Array  # [atoms, K] s^a_ij (0 off the angle list)
    reverse_neighbors: jax.Array | None = None  # [n_atoms, R] race-free gather transpose (ONNX, gather.py)


def _column_selection(n_first_like: jax.Array, n_all_like: jax.Array, dtype) -> jax.Array:
    """The 0/1 matrix [K, M] that picks the first K of M columns (K, M: the lengths of the two vectors)."""
    k = jnp.cumsum(jnp.ones_like(n_first_like, jnp.int32))  # 1..K (no arange: it fails on symbolic sizes)
    m = jnp.cumsum(jnp.ones_like(n_all_like, jnp.int32))  # 1..M
    return (k[:, None] == m[None, :]).astype(dtype)


def first_columns(table: jax.Array, angle_like: jax.Array) -> jax.Array:
    """table[:, :K] of a table [atoms, M, d], K = angle_like.shape[1]: the angle neighbours' rows. With
    symbolic sizes (ONNX export) JAX cannot prove K ≤ M; there it is the exact product with a 0/1 matrix."""
    n_angle = angle_like.shape[1]
    if isinstance(n_angle, int) and isinstance(table.shape[1], int):
        return table[:, :n_angle]
    return jnp.matmul(_column_selection(angle_like[0], table[0, :, 0], table.dtype), table)


def widen_columns(block: jax.Array, edge_like: jax.Array) -> jax.Array:
    """[atoms, K, d] → [atoms, M, d], M = edge_like.shape[1], zero beyond K: the inverse of first_columns."""
    n_columns = edge_like.shape[1]
    if isinstance(n_columns, int) and isinstance(block.shape[1], int):
        return jnp.pad(block, [(0, 0), (0, n_columns - block.shape[1]), (0, 0)])
    return jnp.matmul(jnp.swapaxes(_column_selection(block[0, :, 0], edge_like[0], block.dtype), 0, 1), block)


def slice_last_axis(x: jax.Array, start: int, stop: int) -> jax.Array:
    """x[..., start:stop]. With symbolic sizes (ONNX export) it is the exact product with a 0/1 matrix:
    there the indexing becomes a gather whose transpose is a scatter-add (see gather.py), and a slice's
    transpose (a pad) does not export."""
    if all(isinstance(size, int) for size in x.shape):
        return x[..., start:stop]
    return x @ jnp.eye(x.shape[-1], dtype=x.dtype)[:, start:stop]


class NeighborTables(NamedTuple):
    """Per-atom values that edges gather from their neighbour j: n_j and its two linear projections."""

    node: jax.Array  # [n_atoms, n]
    edge_self: jax.Array  # [n_atoms, e]    n_j W_es^(j)
    node_edge_message: jax.Array  # [n_atoms, H n]  n_j W_ne^(j)


def symmetrise(features: jax.Array, graph: LineGraph, edge_norm: float, axis_neuron: int) -> jax.Array:
    """(N2) G_i(g) for per-edge invariant features g [atoms, M, d] → [atoms, A·d]."""
    weighted = features * graph.edge_switch[..., None]  # [atoms, M, d]
    m = jnp.matmul(jnp.swapaxes(graph.edge_h, 1, 2), weighted) / math.sqrt(edge_norm)  # [atoms, 3, d]
    g = jnp.matmul(jnp.swapaxes(slice_last_axis(m, 0, axis_neuron), 1, 2), m) / 3.0  # [atoms, A, d]
    return g.reshape(g.shape[0], -1)


class RepFlowLayer(eqx.Module):
    node_self: Layer  # Lin_ns   n -> n
    node_sym: Layer  # Lin_sym  A(e + n) -> n, rows [edge part; node part]
    node_edge_message: Layer  # Lin_ne  2n + e -> H n, rows [n_i; n_j; e_ij]
    edge_self: Layer  # Lin_es   2n + e -> e, rows [n_i; n_j; e_ij]
    edge_angle_1: Layer | None  # Lin_ea1  D_a -> e, rows [a; ñ_i; ẽ_ik; ẽ_ij]
    edge_angle_2: Layer | None  # Lin_ea2  e -> e
    angle_self: Layer | None  # Lin_as   D_a -> a, rows [a; ñ_i; ẽ_ik; ẽ_ij]
    angle_compress_node: Layer | None  # n -> |ñ| (compression by linear map, no bias)
    angle_compress_edge: Layer | None  # e -> |ẽ|
    node_residual: list[jax.Array]  # 2 + H vectors [n]: self, sym, message heads
    edge_residual: list[jax.Array]  # [e]: self, angle
    angle_residual: list[jax.Array]  # [a]: angle self
    config: DPA3Config = eqx.field(static=True)

    def neighbor_tables(self, node: jax.Array) -> NeighborTables:
        """n_j and n_j W^(j) for the two pair linears, once per atom (edges gather them)."""
        sizes = [self.config.n_dim, self.config.n_dim, self.config.e_dim]
        _, w_edge_self, _ = split_rows(self.edge_self, sizes)
        _, w_message, _ = split_rows(self.node_edge_message, sizes)
        return NeighborTables(node, node @ w_edge_self, node @ w_message)

    def update(self, tables: NeighborTables, node, edge, angle, graph: LineGraph, *, node_only: bool = False):
        """(node', edge', angle') of a block of atoms: node [atoms, n], edge [atoms, M, e], angle
        [atoms, K, K, a] and graph are that block's rows; `tables` hold every atom. With node_only (the
        last layer) only node' is computed."""
        neighbor = jax.tree.map(lambda table: gather_neighbors(table, graph.neighbors, graph.reverse_neighbors),
                                tables)  # [atoms, M, ·]
        if self.config.sequential_update:
            return self._sequential(neighbor, node, edge, angle, graph, node_only)
        node_new = self.combine(node, self.node_updates(neighbor, node, edge, graph), self.node_residual)
        if node_only:
            return node_new
        edge_updates = [self.edge_self_update(neighbor, node, edge)]  # (E1)
        angle_new = angle
        if self.config.update_angle:
            reduced, angle_new = self.angle_terms(angle, node, edge, graph)  # (E2) ρ_ij, (A1)
            edge_updates.append(self.angle_to_edge(reduced, edge, graph))  # (E2)
        return node_new, self.combine(edge, edge_updates, self.edge_residual), angle_new

    def _sequential(self, neighbor, node, edge, angle, graph, node_only):
        """spec §5.8: edge self → angle self → angle → edge → node, each using the newest inputs."""
        edge = edge + self.edge_residual[0] * self.edge_self_update(neighbor, node, edge)
        reduced, angle = self.angle_terms(angle, node, edge, graph)
        edge = edge + self.edge_residual[1] * self.angle_to_edge(reduced, edge, graph)
        node = self.combine(node, self.node_updates(neighbor, node, edge, graph), self.node_residual)
        return node if node_only else (node, edge, angle)

    # ------------------------------------------------------------------ node terms
    def node_updates(self, neighbor: NeighborTables, node, edge, graph: LineGraph) -> list[jax.Array]:
        cfg, act = self.config, get_activation(self.config.activation_function)
        updates = [act(self.node_self(node))]  # (N1) [atoms, n]
        sym = jnp.concatenate(
            [symmetrise(edge, graph, cfg.edge_norm, cfg.axis_neuron),  # [atoms, A e]
             symmetrise(neighbor.node, graph, cfg.edge_norm, cfg.axis_neuron)],  # [atoms, A n]
            axis=-1,
        )
        updates.append(act(self.node_sym(sym)))  # (N2) [atoms, n]
        message = act(self.pair_linear(self.node_edge_message, neighbor.node_edge_message, node, edge))
        message = jnp.sum(message * graph.edge_switch[..., None], axis=1) / cfg.edge_norm  # (N3) [atoms, H n]
        updates.extend(jnp.split(message, cfg.n_multi_edge_message, axis=-1))
        return updates

    def pair_linear(self, layer: Layer, neighbor_part: jax.Array, node: jax.Array, edge: jax.Array) -> jax.Array:
        """Lin([n_i; n_j; e_ij]) without building the concatenation; n_j W^(j) comes gathered."""  # [atoms, M, out]
        w_center, _, w_edge = split_rows(layer, [self.config.n_dim, self.config.n_dim, self.config.e_dim])
        center_part = node @ w_center + layer.bias  # [atoms, out]
        return center_part[:, None, :] + neighbor_part + edge @ w_edge

    # ------------------------------------------------------------------ edge and angle terms
    def edge_self_update(self, neighbor: NeighborTables, node, edge) -> jax.Array:
        act = get_activation(self.config.activation_function)
        return act(self.pair_linear(self.edge_self, neighbor.edge_self, node, edge))  # (E1) [atoms, M, e]

    def angle_inputs(self, node: jax.Array, edge: jax.Array, graph: LineGraph) -> tuple[jax.Array, jax.Array]:
        """ñ_i [atoms, |ñ|] and ẽ_ij of the angle neighbours [atoms, K, |ẽ|]: compressed for the angle graph."""
        cfg = self.config
        edge = first_columns(edge, graph.angle_switch)  # the angle neighbours are the nearest K
        if cfg.a_compress_rate == 0:
            return node, edge
        if cfg.a_compress_use_split:
            # split, not [..., :d]: with symbolic sizes (ONNX export) that slice is a gather whose transpose is a
            # scatter-add, and the transpose of a lax slice, a pad, does not export
            return jnp.split(node, [cfg.angle_node_dim], axis=-1)[0], jnp.split(edge, [cfg.angle_edge_dim], axis=-1)[0]
        return self.angle_compress_node(node), self.angle_compress_edge(edge)

    def angle_linear(self, layer: Layer, angle, node_for_angle, edge_block) -> jax.Array:
        """Lin(z_ijk) with z_ijk = [a_ijk; ñ_i; ẽ_ik; ẽ_ij], block by block."""  # [atoms, K, K, n_out]
        cfg = self.config
        w_angle, w_node, w_edge_k, w_edge_j = split_rows(
            layer, [cfg.a_dim, cfg.angle_node_dim, cfg.angle_edge_dim, cfg.angle_edge_dim]
        )
        per_j = (node_for_angle @ w_node)[:, None, :] + edge_block @ w_edge_j + layer.bias  # [atoms, K, n_out]
        per_k = edge_block @ w_edge_k  # [atoms, K, n_out]
        return angle @ w_angle + per_j[:, :, None, :] + per_k[:, None, :, :]

    def angle_terms(self, angle, node, edge, graph: LineGraph) -> tuple[jax.Array, jax.Array]:
        """(E2) ρ_ij per angle neighbour [atoms, K, e] and (A1) the updated angles [atoms, K, K, a]."""
        cfg, act = self.config, get_activation(self.config.activation_function)
        node_for_angle, edge_block = self.angle_inputs(node, edge, graph)
        update = act(self.angle_linear(self.angle_self, angle, node_for_angle, edge_block))  # (A1)
        if cfg.sequential_update:  # the message sees the updated angle (spec §5.8)
            angle_new = angle + self.angle_residual[0] * update
            message = act(self.angle_linear(self.edge_angle_1, angle_new, node_for_angle, edge_block))
        else:
            angle_new = self.combine(angle, [update], self.angle_residual)
            message = act(self.angle_linear(self.edge_angle_1, angle, node_for_angle, edge_block))
        weight = graph.angle_switch[:, :, None] * graph.angle_switch[:, None, :]  # [atoms, K, K]
        # Σ_k as one matrix-vector product per angle neighbour j ([K] · [K, e]), not a product and a sum: the
        # derivative with respect to the switches is then a product of its own in each layer. Written as a
        # sum, XLA merged that derivative of all layers into one reduction, which kept every layer's message
        # and a broadcast copy of its cotangent, [atoms, K, K, e] each, alive until the end (force training).
        # (squeeze rather than [:, :, 0]: with symbolic sizes the slice's transpose exports as a scatter)
        reduced = jnp.squeeze(jnp.matmul(weight[:, :, None, :], message), 2) / math.sqrt(cfg.angle_norm)  # [atoms, K, e]
        return reduced, angle_new

    def angle_to_edge(self, reduced, edge, graph: LineGraph) -> jax.Array:
        """(E2) w2_ij from ρ_ij."""  # [atoms, M, e]
        cfg, act = self.config, get_activation(self.config.activation_function)
        reduced = widen_columns(reduced, graph.edge_switch)  # [atoms, M, e], 0 beyond the angle neighbours
        if not cfg.smooth_edge_update:  # legacy "self padding": edges off the angle list see themselves
            reduced = jnp.where(graph.edge_in_angle[..., None], reduced, edge)
        return act(self.edge_angle_2(reduced))

    # ------------------------------------------------------------------ residual update
    def combine(self, x: jax.Array, updates: list[jax.Array], residuals: list[jax.Array]) -> jax.Array:
        style = self.config.update_style
        if style == "res_residual":
            return x + sum((r * u for r, u in zip(residuals, updates, strict=True)), jnp.zeros_like(x))
        if style == "res_avg":
            return (x + sum(updates, jnp.zeros_like(x))) / math.sqrt(len(updates) + 1)
        return x + sum(updates, jnp.zeros_like(x)) / math.sqrt(len(updates))


def init_repflow_layer(config: DPA3Config, *, key: jax.Array, dtype) -> RepFlowLayer:
    n, e, a, heads = config.n_dim, config.e_dim, config.a_dim, config.n_multi_edge_message
    keys = iter(jax.random.split(key, 16))

    def linear(n_in, n_out, bias=True):
        return init_layer(n_in, n_out, key=next(keys), dtype=dtype, bias=bias)

    def residual_vectors(count, width):
        if config.update_style != "res_residual":
            return []
        if config.update_residual_init == "const":
            return [jnp.full((width,), config.update_residual, dtype) for _ in range(count)]
        return [config.update_residual * jax.random.normal(next(keys), (width,), dtype) for _ in range(count)]

    compress_by_linear = config.update_angle and config.a_compress_rate > 0 and not config.a_compress_use_split
    d_angle = config.angle_input_dim
    return RepFlowLayer(
        node_self=linear(n, n),
        node_sym=linear(config.axis_neuron * (e + n), n),
        node_edge_message=linear(2 * n + e, heads * n),
        edge_self=linear(2 * n + e, e),
        edge_angle_1=linear(d_angle, e) if config.update_angle else None,
        edge_angle_2=linear(e, e) if config.update_angle else None,
        angle_self=linear(d_angle, a) if config.update_angle else None,
        angle_compress_node=linear(n, config.angle_node_dim, bias=False) if compress_by_linear else None,
        angle_compress_edge=linear(e, config.angle_edge_dim, bias=False) if compress_by_linear else None,
        node_residual=residual_vectors(2 + heads, n),
        edge_residual=residual_vectors(2 if config.update_angle else 1, e),
        angle_residual=residual_vectors(1 if config.update_angle else 0, a),
        config=config,
    )

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
angles, so only the a_dim-wide block is multiplied per angle. Angles live in per-atom K × K blocks
([n_atoms, K, K, ·], j = axis 1, k = axis 2; see neighbors.py), so the sum over k is a sum over an axis.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp

from dpa3_ref.activations import get_activation
from dpa3_ref.config import DPA3Config
from dpa3_ref.nn import Layer, init_layer, split_rows


class LineGraph(NamedTuple):
    """What every layer needs to know about the graph; fixed through all layers."""

    n_atoms: int
    edge_center: jax.Array  # [n_edge] i
    edge_neighbor: jax.Array  # [n_edge] j
    edge_in_angle: jax.Array  # [n_edge] bool
    edge_switch: jax.Array  # [n_edge] s_ij (0 on padding)
    edge_h: jax.Array  # [n_edge, 3] h_ij
    angle_edge: jax.Array  # [n_atoms, K] edge index of i's k-th angle neighbour
    angle_switch: jax.Array  # [n_atoms, K] s^a_ij of that edge (0 on padding)


def segment_sum(values: jax.Array, segment_ids: jax.Array, num_segments: int) -> jax.Array:
    return jax.ops.segment_sum(values, segment_ids, num_segments=num_segments)


ATOMS_PER_CHUNK = 64
LARGE_SYSTEM = 512  # atoms; from here on, memory is saved at the price of more compute (descriptor.py)


def is_large(n_atoms) -> bool:
    """Whether to take the memory-saving path. A symbolic size (ONNX export: any size) takes the plain one."""
    return isinstance(n_atoms, int) and n_atoms >= LARGE_SYSTEM


def over_atoms(fn, *per_atom: jax.Array):
    """fn(*per_atom), for large systems computed for chunks of ATOMS_PER_CHUNK atoms in turn, each chunk
    rematerialised in the backward pass: only one chunk's [atoms, K, K, ·] temporaries exist at a time.
    Numerically the same as fn(*per_atom), which small systems (and sizes that are not a multiple of the
    chunk) use directly, because there speed matters more than memory."""
    n_atoms = per_atom[0].shape[0]
    if not is_large(n_atoms) or n_atoms % ATOMS_PER_CHUNK:
        return fn(*per_atom)
    chunks = [x.reshape(n_atoms // ATOMS_PER_CHUNK, ATOMS_PER_CHUNK, *x.shape[1:]) for x in per_atom]
    out = jax.lax.map(jax.checkpoint(lambda xs: fn(*xs)), chunks)
    return jax.tree.map(lambda y: y.reshape(n_atoms, *y.shape[2:]), out)


def symmetrise(features: jax.Array, graph: LineGraph, edge_norm: float, axis_neuron: int) -> jax.Array:
    """(N2) G_i(g) for per-edge invariant features g [n_edge, d] → [n_atoms, A·d]."""
    weighted = features * graph.edge_switch[:, None]  # [n_edge, d]
    # One Cartesian component at a time: never materialises the [n_edge, 3, d] outer product.
    m = jnp.stack(
        [segment_sum(graph.edge_h[:, c, None] * weighted, graph.edge_center, graph.n_atoms) for c in range(3)], axis=1
    ) / math.sqrt(edge_norm)  # [n_atoms, 3, d]
    g = jnp.matmul(jnp.swapaxes(m[:, :, :axis_neuron], 1, 2), m) / 3.0  # [n_atoms, A, d]
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

    def __call__(
        self, node: jax.Array, edge: jax.Array, angle: jax.Array, graph: LineGraph
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        if self.config.sequential_update:
            return self._sequential(node, edge, angle, graph)
        edge_updates = [self.edge_self_update(node, edge, graph)]  # (E1)
        angle_new = angle
        if self.config.update_angle:
            reduced, angle_new = self.angle_terms(angle, node, edge, graph)  # (E2) ρ_ij, (A1)
            edge_updates.append(self.angle_to_edge(reduced, edge, graph))  # (E2)
        node_new = self.combine(node, self.node_updates(node, edge, graph), self.node_residual)
        edge_new = self.combine(edge, edge_updates, self.edge_residual)
        return node_new, edge_new, angle_new

    def _sequential(self, node, edge, angle, graph):
        """spec §5.8: edge self → angle self → angle → edge → node, each using the newest inputs."""
        edge = edge + self.edge_residual[0] * self.edge_self_update(node, edge, graph)
        reduced, angle = self.angle_terms(angle, node, edge, graph)
        edge = edge + self.edge_residual[1] * self.angle_to_edge(reduced, edge, graph)
        node = self.combine(node, self.node_updates(node, edge, graph), self.node_residual)
        return node, edge, angle

    # ------------------------------------------------------------------ node terms
    def node_updates(self, node: jax.Array, edge: jax.Array, graph: LineGraph) -> list[jax.Array]:
        cfg, act = self.config, get_activation(self.config.activation_function)
        neighbor_node = node[graph.edge_neighbor]  # [n_edge, n]
        updates = [act(self.node_self(node))]  # (N1) [n_atoms, n]
        sym = jnp.concatenate(
            [symmetrise(edge, graph, cfg.edge_norm, cfg.axis_neuron),  # [n_atoms, A e]
             symmetrise(neighbor_node, graph, cfg.edge_norm, cfg.axis_neuron)],  # [n_atoms, A n]
            axis=-1,
        )
        updates.append(act(self.node_sym(sym)))  # (N2) [n_atoms, n]
        message = act(self.pair_linear(self.node_edge_message, node, edge, graph))  # [n_edge, H n]
        message = message * graph.edge_switch[:, None]
        message = segment_sum(message, graph.edge_center, graph.n_atoms) / cfg.edge_norm  # (N3) [n_atoms, H n]
        updates.extend(jnp.split(message, cfg.n_multi_edge_message, axis=-1))
        return updates

    def pair_linear(self, layer: Layer, node: jax.Array, edge: jax.Array, graph: LineGraph) -> jax.Array:
        """Lin([n_i; n_j; e_ij]) without building the concatenation."""  # [n_edge, n_out]
        w_center, w_neighbor, w_edge = split_rows(layer, [self.config.n_dim, self.config.n_dim, self.config.e_dim])
        return (
            (node @ w_center)[graph.edge_center]
            + (node @ w_neighbor)[graph.edge_neighbor]
            + edge @ w_edge
            + layer.bias
        )

    # ------------------------------------------------------------------ edge and angle terms
    def edge_self_update(self, node: jax.Array, edge: jax.Array, graph: LineGraph) -> jax.Array:
        act = get_activation(self.config.activation_function)
        return act(self.pair_linear(self.edge_self, node, edge, graph))  # (E1) [n_edge, e]

    def angle_inputs(self, node: jax.Array, edge: jax.Array, graph: LineGraph) -> tuple[jax.Array, jax.Array]:
        """ñ_i [n_atoms, |ñ|] and ẽ_ij per angle neighbour [n_atoms, K, |ẽ|]: compressed for the angle graph."""
        cfg = self.config
        if cfg.a_compress_rate == 0:
            node_for_angle, edge_for_angle = node, edge
        elif cfg.a_compress_use_split:
            node_for_angle, edge_for_angle = node[:, : cfg.angle_node_dim], edge[:, : cfg.angle_edge_dim]
        else:
            node_for_angle, edge_for_angle = self.angle_compress_node(node), self.angle_compress_edge(edge)
        return node_for_angle, edge_for_angle[graph.angle_edge]

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
        """(E2) ρ_ij per angle neighbour [n_atoms, K, e] and (A1) the updated angles [n_atoms, K, K, a]."""
        cfg, act = self.config, get_activation(self.config.activation_function)
        node_for_angle, edge_block = self.angle_inputs(node, edge, graph)

        def reduce_over_k(message, switch):  # [atoms, K, K, e] -> [atoms, K, e]
            weight = switch[:, :, None] * switch[:, None, :]  # [atoms, K, K]
            return jnp.sum(message * weight[..., None], axis=2) / math.sqrt(cfg.angle_norm)

        def per_atoms(angle, node_for_angle, edge_block, switch):  # everything here is per atom: chunkable
            update = act(self.angle_linear(self.angle_self, angle, node_for_angle, edge_block))  # (A1)
            if cfg.sequential_update:  # the message sees the updated angle (spec §5.8)
                angle_new = angle + self.angle_residual[0] * update
                message = act(self.angle_linear(self.edge_angle_1, angle_new, node_for_angle, edge_block))
            else:
                angle_new = self.combine(angle, [update], self.angle_residual)
                message = act(self.angle_linear(self.edge_angle_1, angle, node_for_angle, edge_block))
            return reduce_over_k(message, switch), angle_new

        return over_atoms(per_atoms, angle, node_for_angle, edge_block, graph.angle_switch)

    def angle_to_edge(self, reduced, edge, graph: LineGraph) -> jax.Array:
        """(E2) w2_ij from ρ_ij."""  # [n_edge, e]
        cfg, act = self.config, get_activation(self.config.activation_function)
        reduced = segment_sum(  # back from the angle table to the edge list: [n_edge, e]
            reduced.reshape(-1, reduced.shape[-1]), graph.angle_edge.reshape(-1), edge.shape[0]
        )
        if not cfg.smooth_edge_update:  # legacy "self padding": edges off the angle list see themselves
            reduced = jnp.where(graph.edge_in_angle[:, None], reduced, edge)
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

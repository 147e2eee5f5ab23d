"""The DPA3 descriptor: type embedding, initial node/edge/angle features, L RepFlow layers (spec §3–§6.1).

    n_i⁰ = φ(T_{t_i})                     T = one-hot(t) W_tebd  (a table row; no bias by default)
    e_ij⁰ = W_ee x^e_ij + b_ee            (then φ, unless edge_init_use_dist)
    a_ijk⁰ = W_ae x^a_ijk                 (no bias, no activation)
    (n, e, a)^{l+1} = RepFlowLayer_l((n, e, a)^l)
    D_i = n_i^L                           ([n_i^L; T_{t_i}] with concat_output_tebd)

The descriptor sees the graph only through edge vectors r_ij [n_edge, 3] (an argument, so that forces and
virial are one gradient away, see model.py) and the index arrays of `Graph`.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

from dpa3_ref.activations import get_activation
from dpa3_ref.config import DPA3Config
from dpa3_ref.neighbors import Graph
from dpa3_ref.nn import Layer, has_skip, init_layer
from dpa3_ref.repflow import LineGraph, RepFlowLayer, init_repflow_layer, is_large
from dpa3_ref.switch import cosine_input, safe_length, switch


class DPA3Descriptor(eqx.Module):
    type_embedding: Layer  # one-hot [ntypes] -> n
    edge_embedding: Layer  # x^e [1] -> e
    angle_embedding: Layer  # x^a [1] -> a, no bias
    layers: list[RepFlowLayer]
    davg: jax.Array  # [ntypes, e_sel, 4] environment-matrix shift (0 for every trained DPA3)
    dstd: jax.Array  # [ntypes, e_sel, 4] environment-matrix scale (fix_stat_std)
    config: DPA3Config = eqx.field(static=True)

    @property
    def dtype(self):
        return jnp.float64 if self.config.precision == "float64" else jnp.float32

    def type_table(self) -> jax.Array:
        """T_t for every type, plus a zero row for padding atoms (type -1)."""  # [ntypes + 1, n]
        table = self.type_embedding(jnp.eye(self.config.ntypes, dtype=self.dtype))
        return jnp.concatenate([table, jnp.zeros((1, table.shape[1]), table.dtype)])

    def __call__(self, edge_vectors: jax.Array, graph: Graph) -> jax.Array:
        """Descriptor D_i of every atom."""  # [n_atoms, n] or [n_atoms, 2n]
        cfg, act = self.config, get_activation(self.config.activation_function)
        edge_vectors = edge_vectors.astype(self.dtype)
        line_graph, edge_input, angle_input = self.geometry(edge_vectors, graph)

        type_index = jnp.where(graph.types < 0, cfg.ntypes, graph.types)
        tebd = self.type_table()[type_index]  # [n_atoms, n]
        node = act(tebd)  # [n_atoms, n]
        edge = self.edge_embedding(edge_input)  # [n_edge, e]
        if not cfg.edge_init_use_dist:
            edge = act(edge)
        angle = self.angle_embedding(angle_input)  # [n_atoms, K, K, a]
        layers = self.layers
        if is_large(graph.n_atoms) and len(layers) > 1:
            node, edge, angle = rematerialised_layers(layers[:-1], node, edge, angle, line_graph)
            layers = layers[-1:]  # outside the loop XLA drops its unused edge/angle updates
        for layer in layers:
            node, edge, angle = layer(node, edge, angle, line_graph)
        return jnp.concatenate([node, tebd], axis=-1) if cfg.concat_output_tebd else node

    def geometry(self, edge_vectors: jax.Array, graph: Graph) -> tuple[LineGraph, jax.Array, jax.Array]:
        """Switches, h_ij and the scalar edge/angle inputs from the edge vectors (spec §2)."""
        cfg = self.config
        mask = graph.edge_mask
        length = safe_length(edge_vectors, mask)  # [n_edge], 1 on padding
        vectors = edge_vectors * mask[:, None]  # [n_edge, 3], 0 on padding
        edge_switch = switch(length, cfg.e_rcut_smth, cfg.e_rcut, cfg.use_exp_switch) * mask  # [n_edge]
        inverse = 1.0 / (length + cfg.env_protection)
        environment = jnp.concatenate([inverse[:, None], vectors * (inverse**2)[:, None]], axis=-1)
        environment = environment * edge_switch[:, None]  # R_ij [n_edge, 4]
        center_type = jnp.maximum(graph.types[graph.edge_center], 0)
        environment = (environment - self.davg[center_type, graph.edge_slot]) / self.dstd[center_type, graph.edge_slot]

        in_angle = graph.edge_in_angle & mask
        angle_mask = graph.angle_mask  # [n_atoms, K]
        angle_switch = switch(length, cfg.a_rcut_smth, cfg.a_rcut, cfg.use_exp_switch)[graph.angle_edge] * angle_mask
        unit = vectors / (length + 1e-6)[:, None]  # [n_edge, 3]
        unit_block = unit[graph.angle_edge] * angle_mask[..., None]  # [n_atoms, K, 3]
        angle_input = cosine_input(unit_block)  # [n_atoms, K, K, 1]

        edge_input = (length * mask)[:, None] if cfg.edge_init_use_dist else environment[:, :1]  # [n_edge, 1]
        line_graph = LineGraph(
            n_atoms=graph.n_atoms,
            edge_center=graph.edge_center,
            edge_neighbor=graph.edge_neighbor,
            edge_in_angle=in_angle,
            edge_switch=edge_switch,
            edge_h=environment[:, 1:],
            angle_edge=graph.angle_edge,
            angle_switch=angle_switch,
        )
        return line_graph, edge_input, angle_input


def rematerialised_layers(layers: list[RepFlowLayer], node, edge, angle, line_graph: LineGraph):
    """The layers one after the other, as a loop (`lax.scan`) over their stacked weights whose body is
    rematerialised in the backward pass: only each layer's inputs (node, edge, angle) are kept, so memory
    grows with the atoms, not atoms × layers. (The loop matters: unrolled, XLA's common-subexpression
    elimination on CPU merges the recomputation with the forward pass and keeps everything.)"""
    weights = jax.tree.map(lambda *w: jnp.stack(w), *[eqx.filter(layer, eqx.is_array) for layer in layers])
    structure = eqx.filter(layers[0], eqx.is_array, inverse=True)

    @jax.checkpoint
    def step(features, layer_weights):
        return eqx.combine(layer_weights, structure)(*features, line_graph), None

    (node, edge, angle), _ = jax.lax.scan(step, (node, edge, angle), weights)
    return node, edge, angle


def init_descriptor(config: DPA3Config, *, key: jax.Array) -> DPA3Descriptor:
    dtype = jnp.float64 if config.precision == "float64" else jnp.float32
    tebd_key, edge_key, angle_key, *layer_keys = jax.random.split(key, 3 + config.nlayers)
    std = config.fix_stat_std if config.fix_stat_std > 0 else 1.0
    return DPA3Descriptor(
        type_embedding=init_layer(
            config.ntypes, config.n_dim, key=tebd_key, dtype=dtype, bias=config.use_tebd_bias,
            residual=has_skip(config.ntypes, config.n_dim),
        ),
        edge_embedding=init_layer(1, config.e_dim, key=edge_key, dtype=dtype),
        angle_embedding=init_layer(1, config.a_dim, key=angle_key, dtype=dtype, bias=False),
        layers=[init_repflow_layer(config, key=k, dtype=dtype) for k in layer_keys],
        davg=jnp.zeros((config.ntypes, config.e_sel, 4), dtype),
        dstd=jnp.full((config.ntypes, config.e_sel, 4), std, dtype),
        config=config,
    )

"""The DPA3 descriptor: type embedding, initial node/edge/angle features, L RepFlow layers (spec §3–§6.1).

    n_i⁰ = φ(T_{t_i})                     T = one-hot(t) W_tebd  (a table row; no bias by default)
    e_ij⁰ = W_ee x^e_ij + b_ee            (then φ, unless edge_init_use_dist)
    a_ijk⁰ = W_ae x^a_ijk                 (no bias, no activation)
    (n, e, a)^{l+1} = RepFlowLayer_l((n, e, a)^l)
    D_i = n_i^L                           ([n_i^L; T_{t_i}] with concat_output_tebd)

The descriptor sees the graph only through edge vectors r_ij [n_atoms, M, 3] (an argument, so that forces
and virial are one gradient away, see model.py) and the index and mask arrays of `Graph`.

Large systems run each layer a block of atoms at a time (`blockwise`), and the backward pass recomputes a
block's forward instead of keeping it: memory then grows with the atoms and the layer inputs only, and a
block's temporaries stay in cache.
"""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.numpy as jnp

from dpa3_ref.activations import get_activation
from dpa3_ref.config import DPA3Config
from dpa3_ref.neighbors import Graph
from dpa3_ref.nn import Layer, has_skip, init_layer
from dpa3_ref.repflow import LineGraph, RepFlowLayer, first_columns, init_repflow_layer, slice_last_axis, widen_columns
from dpa3_ref.switch import cosine_input, safe_length, switch


ATOMS_PER_BLOCK = 64
LARGE_SYSTEM = 512  # atoms; from here on, memory is saved at the price of more compute


def is_large(n_atoms) -> bool:
    """Whether to take the blockwise path. A symbolic size (ONNX export: any size) takes the plain one."""
    return isinstance(n_atoms, int) and n_atoms >= LARGE_SYSTEM and n_atoms % ATOMS_PER_BLOCK == 0


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
        edge = self.edge_embedding(edge_input)  # [n_atoms, M, e]
        if not cfg.edge_init_use_dist:
            edge = act(edge)
        # [n_atoms, K, K, 1]: the first layer embeds it (1 number per angle to keep, not a); no angle
        # features at all without angle updates, since then no layer reads them
        angle = angle_input if cfg.update_angle else None
        run = blockwise if is_large(graph.n_atoms) else (lambda step, *rows: step(*rows))
        for index, layer in enumerate(self.layers):
            tables = layer.neighbor_tables(node)
            node, edge, angle = run(functools.partial(self.layer_step, index, tables), node, edge, angle, line_graph)
        return jnp.concatenate([node, tebd], axis=-1) if cfg.concat_output_tebd else node

    def layer_step(self, index: int, tables, node, edge, angle, line_graph: LineGraph):
        """Layer `index` on a block of atoms, computing only what the layers after it use."""
        if index == 0 and angle is not None:
            angle = self.angle_embedding(angle)  # a⁰ = W_ae x^a  [atoms, K, K, a]
        layer, n_after = self.layers[index], len(self.layers) - 1 - index
        if n_after == 0:  # the last layer: only the descriptor n^L
            return layer.update(tables, node, edge, angle, line_graph, node_only=True), None, None
        node, edge, angle = layer.update(tables, node, edge, angle, line_graph)
        if n_after == 1 and not self.config.sequential_update:  # the last layer's node update needs no angles
            angle = None
        return node, edge, angle

    def geometry(self, edge_vectors: jax.Array, graph: Graph) -> tuple[LineGraph, jax.Array, jax.Array]:
        """Switches, h_ij and the scalar edge/angle inputs from the edge vectors (spec §2)."""
        cfg = self.config
        mask = graph.neighbor_mask  # [n_atoms, M]
        length = safe_length(edge_vectors, mask)  # [n_atoms, M], 1 on padding
        vectors = edge_vectors * mask[..., None]  # [n_atoms, M, 3], 0 on padding
        edge_switch = switch(length, cfg.e_rcut_smth, cfg.e_rcut, cfg.use_exp_switch) * mask  # [n_atoms, M]
        inverse = 1.0 / (length + cfg.env_protection)
        environment = jnp.concatenate([inverse[..., None], vectors * (inverse**2)[..., None]], axis=-1)
        environment = environment * edge_switch[..., None]  # R_ij [n_atoms, M, 4]
        center_type = jnp.maximum(graph.types, 0)[:, None]  # [n_atoms, 1]; davg/dstd are per type and slot:
        slot = jnp.cumsum(jnp.ones_like(mask, jnp.int32), axis=1) - 1  # [n_atoms, M] column index (any M, even symbolic)
        environment = (environment - self.davg[center_type, slot]) / self.dstd[center_type, slot]

        angle_mask = graph.angle_mask  # [n_atoms, K]; the angle neighbours are the first K columns
        angle_length = jnp.squeeze(first_columns(length[..., None], angle_mask), axis=2)  # [n_atoms, K]
        angle_switch = switch(angle_length, cfg.a_rcut_smth, cfg.a_rcut, cfg.use_exp_switch) * angle_mask
        unit = first_columns(vectors, angle_mask) / (angle_length + 1e-6)[..., None]  # [n_atoms, K, 3]
        angle_input = cosine_input(unit * angle_mask[..., None])  # [n_atoms, K, K, 1]

        edge_input = (length * mask)[..., None] if cfg.edge_init_use_dist else slice_last_axis(environment, 0, 1)
        line_graph = LineGraph(
            neighbors=graph.neighbors,
            edge_switch=edge_switch,
            edge_h=slice_last_axis(environment, 1, 4),
            edge_in_angle=widen_columns(angle_mask[..., None].astype(length.dtype), mask)[..., 0] > 0.5,
            angle_switch=angle_switch,
            reverse_neighbors=graph.reverse_neighbors,
        )
        return line_graph, edge_input, angle_input


def blockwise(step, *rows):
    """step(*rows) computed for blocks of ATOMS_PER_BLOCK atoms in turn (a loop; rows are arrays, or pytrees
    of arrays, with one row per atom). Numerically the same as step(*rows); the point is the backward pass.

    It keeps only what a block reads (its rows, and the per-atom tables and weights `step` closes over) and,
    block by block, recomputes the block's forward pass and pulls the output cotangent back through it. The
    cotangent of an input overwrites, block by block, that of the output of the same shape (n, e, a in and
    out), so the backward pass of a layer holds one full-size cotangent per kind, not two."""
    n_atoms = jax.tree.leaves(rows)[0].shape[0]

    def block(x, b):  # rows b·B … b·B + B − 1 of x
        return jax.lax.dynamic_slice_in_dim(x, b * ATOMS_PER_BLOCK, ATOMS_PER_BLOCK)

    def put_block(x, value, b):
        return jax.lax.dynamic_update_slice_in_dim(x, value, b * ATOMS_PER_BLOCK, axis=0)

    # The traced values `step` closes over (neighbour tables, and under jit the weights) become explicit inputs.
    example = jax.tree.map(lambda x: block(x, 0), rows)
    closed_step, consts = jax.closure_convert(lambda *block_rows: step(*block_rows), *example)

    @jax.custom_vjp
    def run(consts, rows):
        out = jax.lax.map(lambda b: closed_step(*jax.tree.map(lambda x: block(x, b), rows), *consts),
                          jnp.arange(n_atoms // ATOMS_PER_BLOCK))
        return jax.tree.map(lambda y: y.reshape(n_atoms, *y.shape[2:]), out)

    def forward(consts, rows):
        return run(consts, rows), (consts, rows)

    def backward(saved, d_out):
        consts, rows = saved
        floats, others = eqx.partition(rows, eqx.is_inexact_array)  # only float rows have cotangents
        # An input (n, e, a) with the shape of the output of the same kind takes over its cotangent's buffer:
        # block b of it is read, then overwritten with the input's cotangent.
        reuse = [d is not None and d.shape == f.shape for f, d in zip(floats, d_out)]
        d_rows = [d_out[k] if k < len(reuse) and reuse[k] else jax.tree.map(jnp.zeros_like, f)
                  for k, f in enumerate(floats)]

        def one_block(b, carry):
            d_consts, d_rows = carry
            d_out_b = [jax.tree.map(lambda x: block(x, b), d_rows[k] if reuse[k] else d) for k, d in enumerate(d_out)]
            other_b = jax.tree.map(lambda x: block(x, b), others)
            _, pull_back = jax.vjp(lambda c, f: closed_step(*eqx.combine(f, other_b), *c),
                                   consts, jax.tree.map(lambda x: block(x, b), floats))
            d_consts_b, d_floats_b = pull_back(tuple(d_out_b))
            d_rows = [jax.tree.map(lambda x, d: put_block(x, d, b), dx, db) for dx, db in zip(d_rows, d_floats_b)]
            return jax.tree.map(jnp.add, d_consts, d_consts_b), d_rows

        zero = jax.tree.map(jnp.zeros_like, consts)
        d_consts, d_rows = jax.lax.fori_loop(0, n_atoms // ATOMS_PER_BLOCK, one_block, (zero, d_rows))
        return d_consts, tuple(d_rows)

    run.defvjp(forward, backward)
    return run(consts, rows)


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

"""The DPA3 energy model, and forces and virial by one gradient (spec §6.2, §7, docs/architecture.md §6).

    E = Σ_i E_i,   E_i = fitting(descriptor(r))_i + out_bias[t_i]      (reduction in float64)

The model is a function of the edge vectors r_im = x_j − x_i + shift_im only (j = neighbors[i, m]).
With g_im = ∂E/∂r_im:

    F_i = −∂E/∂x_i = Σ_m g_im − Σ_{(a, m): neighbors[a, m] = i} g_am
    W   = −Σ_{i, m} g_im ⊗ r_im   (W_kl = −Σ g_k r_l; deepmd-kit's virial, eV, not divided by volume)

which equals deepmd's Σ_a F_a ⊗ x_a over extended atoms and −(∂E/∂ε)ᵀ for a strain x → x(I + ε).
Differentiating with respect to edge vectors (rather than positions and a strain) is what also works
inside an exported ONNX graph (../shared/docs/onnx_export_notes.md).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

from dpa3_ref.config import DPA3Config
from dpa3_ref.descriptor import DPA3Descriptor, init_descriptor
from dpa3_ref.fitting import EnergyFitting, init_fitting
from dpa3_ref.gather import sum_into_neighbors
from dpa3_ref.neighbors import Graph


class DPA3Model(eqx.Module):
    descriptor: DPA3Descriptor
    fitting: EnergyFitting
    out_bias: jax.Array  # [ntypes] float64, per-type energy offset fitted to the data (spec §6.3)
    config: DPA3Config = eqx.field(static=True)

    def atom_energies(self, edge_vectors: jax.Array, graph: Graph, case_embd: jax.Array | None = None) -> jax.Array:
        """E_i of every atom, 0 for padding atoms."""  # [n_atoms] float64
        descriptor = self.descriptor(edge_vectors, graph)  # [n_atoms, d]
        energies = self.fitting(descriptor, graph.types, case_embd) + self.out_bias[jnp.maximum(graph.types, 0)]
        counted = graph.types >= 0 if graph.local is None else (graph.types >= 0) & graph.local  # not padding, not ghost
        return jnp.where(counted, energies, 0.0)


def edge_vectors(graph: Graph) -> jax.Array:
    """r_ij = x_j − x_i + shift for every cell of the neighbour table."""  # [n_atoms, M, 3]
    return graph.positions[graph.neighbors] - graph.positions[:, None, :] + graph.neighbor_shift


def frame_sums(values: jax.Array, graph: Graph) -> jax.Array:
    """Σ over each frame's atoms [n_frames, ...]; one frame: a plain sum (no scatter-add, see gather.py)."""
    if graph.n_frames == 1:
        return jnp.sum(values, axis=0)[None]
    return jax.ops.segment_sum(values, graph.atom_frame, num_segments=graph.n_frames)


def frame_energies(atom_energy: jax.Array, graph: Graph) -> jax.Array:
    return frame_sums(atom_energy, graph)  # [n_frames]


def energy_forces_virial(model: DPA3Model, graph: Graph, case_embd: jax.Array | None = None) -> dict[str, jax.Array]:
    """Energy per frame, per-atom energy, forces and virial of a graph (jit-able, exportable)."""
    vectors = edge_vectors(graph)

    def total_energy(r):
        atom_energy = model.atom_energies(r, graph, case_embd)
        return jnp.sum(atom_energy), atom_energy

    (_, atom_energy), g = jax.value_and_grad(total_energy, has_aux=True)(vectors)  # g: [n_atoms, M, 3]
    pulled_by_neighbors = sum_into_neighbors(g, graph.neighbors, graph.reverse_neighbors)  # [n_atoms, 3]
    forces = jnp.sum(g, axis=1) - pulled_by_neighbors  # [n_atoms, 3]
    atom_virial = -jnp.sum(g[..., :, None] * vectors[..., None, :], axis=1)  # [n_atoms, 3, 3]
    virial = frame_sums(atom_virial, graph)  # [n_frames, 3, 3]
    return {
        "energy": frame_energies(atom_energy, graph),
        "atom_energy": atom_energy,
        "forces": forces.astype(jnp.float64),
        "virial": virial.astype(jnp.float64),
    }


def init_model(config: DPA3Config, *, key: jax.Array) -> DPA3Model:
    """A randomly initialised model (deepmd-kit's initialisation, spec §9.4)."""
    descriptor_key, fitting_key = jax.random.split(key)
    return DPA3Model(
        descriptor=init_descriptor(config, key=descriptor_key),
        fitting=init_fitting(config, key=fitting_key),
        out_bias=jnp.zeros(config.ntypes, jnp.float64),
        config=config,
    )


def with_config(model: DPA3Model, config: DPA3Config) -> DPA3Model:
    """The same weights under a compatible config, e.g. another precision (leaves cast to its dtypes).

    The new config's shapes and dtypes come from tracing init_model, not running it; the leaves are cast on
    the host (numpy rounds float64 → float32 to nearest, as XLA does), because casting them on the device
    compiles one small program per leaf shape."""
    skeleton = eqx.filter_eval_shape(init_model, config, key=jax.random.key(0))  # ShapeDtypeStruct leaves
    old, new = jax.tree.leaves(model), jax.tree.leaves(skeleton)
    if [x.shape for x in old] != [x.shape for x in new]:
        raise ValueError("with_config: the new config implies a different architecture")
    cast = [jnp.asarray(jax.device_get(a).astype(b.dtype)) for a, b in zip(old, new, strict=True)]
    return jax.tree.unflatten(jax.tree.structure(skeleton), cast)


def cast_model(model: DPA3Model, precision: str) -> DPA3Model:
    """The same model computing in `precision` ("float32" or "float64")."""
    return with_config(model, model.config.replace(precision=precision, fitting_precision=precision))

"""Neighbour lists and the line-graph series (LiGS) that DPA3 computes on (spec §1, docs/architecture.md §1).

    atoms  --(pairs within e_rcut)-->  edges  --(pairs of edges sharing a centre, within a_rcut)-->  angles

For every atom i the neighbours j (all periodic images, from vesin's O(N) cell list) are sorted by
distance, nearest first. DPA3's selection rule then keeps

  * edges:  the first `e_sel` of that list (farther ones are silently dropped, as in deepmd-kit);
  * angles: every ordered pair (j, k) of the first `a_sel` edges of i with r_ij < a_rcut, the diagonal
    j = k included (deepmd-kit includes it, so must we).

The result is a `Graph` in deepmd-kit's layout: a neighbour table with one row per atom, nearest first
(`neighbors[i, m]` is i's m-th nearest neighbour, so the column m is also the slot that indexes davg/dstd).
Edges are the table's cells, so a sum over an atom's edges is a sum over an axis. Because the angle
neighbours are the nearest ones, they are the first K columns, and the angles of atom i are the K × K
block of pairs of those columns: no index table at all. Rows are independent of each other except through
the neighbour index, which is what lets a large system be computed a block of atoms at a time.
Everything downstream is cell-free: an edge carries its periodic image shift, so periodic crystals,
open clusters and host codes with ghost atoms look alike. Arrays are padded to a few bucket sizes so
that `jit` compiles once per bucket, not once per frame; padded atoms have type -1 and padded cells a
False mask.
"""

from __future__ import annotations

import math
import warnings

import equinox as eqx
import jax
import numpy as np
import vesin

from dpa3_ref.config import DPA3Config
from dpa3_ref.errors import Dpa3Error

MIN_DISTANCE = 1e-4  # Å; closer pairs are "two atoms at the same position"


class Graph(eqx.Module):
    """Atoms and their neighbour table, for one or more frames. Row i, column m is i's m-th nearest
    neighbour: r_im = positions[neighbors[i, m]] - positions[i] + neighbor_shift[i, m]."""

    positions: jax.Array  # [n_atoms, 3] Cartesian, Å
    types: jax.Array  # [n_atoms] int, model type index; -1 = padding atom
    atom_frame: jax.Array  # [n_atoms] int, frame of each atom
    neighbors: jax.Array  # [n_atoms, M] int, atom index j of the neighbour (a valid index, masked, on padding)
    neighbor_shift: jax.Array  # [n_atoms, M, 3] Cartesian image shift (shift_integers @ cell)
    neighbor_mask: jax.Array  # [n_atoms, M] bool, real edge
    angle_mask: jax.Array  # [n_atoms, K] bool, neighbour m < K is one of i's angle neighbours
    n_frames: int = eqx.field(static=True, default=1)
    # Only where a host code hands over its atoms (the ONNX export, export/README.md); None otherwise:
    local: jax.Array | None = None  # [n_atoms] bool, atoms whose energy counts (ghost atoms: False)
    reverse_neighbors: jax.Array | None = None  # [n_atoms, R] int, flat cells pointing at each atom (gather.py)

    @property
    def n_atoms(self) -> int:
        return self.positions.shape[0]

    @property
    def max_neighbors(self) -> int:
        return self.neighbors.shape[1]

    @property
    def max_angle_neighbors(self) -> int:
        return self.angle_mask.shape[1]


def check_structure(positions: np.ndarray, types: np.ndarray, cell: np.ndarray | None, ntypes: int) -> None:
    """Raise a Dpa3Error naming the problem if a structure cannot be evaluated."""
    if positions.ndim != 2 or positions.shape[1] != 3:
        raise Dpa3Error(f"coordinates must have shape [n_atoms, 3], got {positions.shape}")
    if positions.shape[0] == 0:
        raise Dpa3Error("the structure has no atoms")
    if types.shape != (positions.shape[0],):
        raise Dpa3Error(f"{types.shape[0] if types.ndim else 0} types given for {positions.shape[0]} atoms")
    bad = np.flatnonzero(~np.isfinite(positions).all(axis=1))
    if bad.size:
        raise Dpa3Error(f"coordinates of atom {bad[0]} are not finite: {positions[bad[0]]}")
    bad = np.flatnonzero((types < 0) | (types >= ntypes))
    if bad.size:
        raise Dpa3Error(f"atom {bad[0]} has type index {types[bad[0]]}, the model has types 0..{ntypes - 1}")
    if cell is not None:
        if cell.shape != (3, 3):
            raise Dpa3Error(f"cell must have shape [3, 3] (rows are lattice vectors), got {cell.shape}")
        if not np.isfinite(cell).all():
            raise Dpa3Error(f"cell is not finite: {cell.tolist()}")
        volume = abs(np.linalg.det(cell))
        if volume < 1e-6 * max(1.0, np.abs(cell).max()) ** 3:
            raise Dpa3Error(f"cell is singular (volume {volume:.3g} Å^3): {cell.tolist()}")


def neighbor_pairs(positions: np.ndarray, cell: np.ndarray | None, cutoff: float):
    """All (i, j, integer image shift, distance) with |x_j + S cell - x_i| <= cutoff, i != j or S != 0."""
    if cell is None:
        # vesin wants a box even for open boundaries; it is ignored when periodic=False.
        box, periodic = np.zeros((3, 3)), False
    else:
        box, periodic = np.asarray(cell, dtype=np.float64), True
    # vesin keeps d < cutoff; deepmd keeps d <= r_c (which matters with the exponential switch, not 0 at
    # r_c), so search a hair wider and let the caller cut at exactly r_c.
    calculator = vesin.NeighborList(cutoff=cutoff * (1 + 1e-12), full_list=True)
    i, j, shifts, distances = calculator.compute(positions, box, periodic, quantities="ijSd")
    return i.astype(np.int64), j.astype(np.int64), shifts.astype(np.float64), distances


def build_graph(
    positions: np.ndarray,
    types: np.ndarray,
    cell: np.ndarray | None,
    config: DPA3Config,
    *,
    pad: bool = True,
) -> Graph:
    """The DPA3 graph of one frame (numpy, on the host). `types` are model type indices."""
    positions = np.asarray(positions, dtype=np.float64)
    types = np.asarray(types)
    cell = None if cell is None else np.asarray(cell, dtype=np.float64)
    check_structure(positions, types, cell, config.ntypes)
    n_atoms = positions.shape[0]

    center, neighbor, image, distance = neighbor_pairs(positions, cell, config.e_rcut)
    keep = distance <= config.e_rcut
    center, neighbor, image, distance = center[keep], neighbor[keep], image[keep], distance[keep]
    if distance.size and distance.min() < MIN_DISTANCE:
        k = int(np.argmin(distance))
        raise Dpa3Error(
            f"atoms {center[k]} and {neighbor[k]} are at the same position (distance {distance[k]:.2e} Å)"
        )

    # Nearest first within each centre (stable, so ties keep vesin's order), then DPA3's selection.
    order = np.lexsort((distance, center))
    center, neighbor, image, distance = center[order], neighbor[order], image[order], distance[order]
    first_edge_of = np.searchsorted(center, np.arange(n_atoms))
    slot = np.arange(center.size) - first_edge_of[center]  # rank of the edge in its centre's list
    selected = slot < config.e_sel
    if not selected.all():
        warnings.warn(
            f"an atom has {slot.max() + 1} neighbours within e_rcut={config.e_rcut} Å but e_sel={config.e_sel}: "
            "the farthest are dropped (as deepmd-kit does) and the model is not smooth there",
            stacklevel=2,
        )
    center, neighbor, image, distance, slot = (a[selected] for a in (center, neighbor, image, distance, slot))
    if config.exclude_types:
        # deepmd-kit removes excluded pairs after the selection: they still take up slots.
        excluded = {tuple(p) for p in config.exclude_types} | {tuple(p[::-1]) for p in config.exclude_types}
        pair_types = zip(types[center].tolist(), types[neighbor].tolist(), strict=True)
        kept = ~np.fromiter((p in excluded for p in pair_types), bool, count=center.size)
        center, neighbor, image, distance, slot = (a[kept] for a in (center, neighbor, image, distance, slot))
    in_angle = (slot < config.a_sel) & (distance < config.a_rcut)

    width = max(1, int(slot.max(initial=-1)) + 1)  # M: the longest row
    angle_width = max(1, int(slot[in_angle].max(initial=-1)) + 1)  # K: angle neighbours are a prefix
    neighbors = np.zeros((n_atoms, width), np.int32)
    neighbor_shift = np.zeros((n_atoms, width, 3))
    neighbor_mask = np.zeros((n_atoms, width), bool)
    angle_mask = np.zeros((n_atoms, angle_width), bool)
    neighbors[center, slot] = neighbor
    # einsum, not `image @ cell`: numpy hands [pairs, 3] @ [3, 3] to a threaded BLAS, slow on a busy machine
    neighbor_shift[center, slot] = np.einsum("pk,kl->pl", image, cell) if cell is not None else 0.0
    neighbor_mask[center, slot] = True
    angle_mask[center[in_angle], slot[in_angle]] = True
    graph = Graph(
        positions=positions,
        types=types.astype(np.int32),
        atom_frame=np.zeros(n_atoms, np.int32),
        neighbors=neighbors,
        neighbor_shift=neighbor_shift,
        neighbor_mask=neighbor_mask,
        angle_mask=angle_mask,
    )
    return pad_to_buckets(graph, config) if pad else graph


def batch_graphs(graphs: list[Graph]) -> Graph:
    """Several unpadded frames as one graph (a disjoint union): neighbour indices offset, `atom_frame` = frame."""
    atom_offsets = np.cumsum([0] + [g.n_atoms for g in graphs[:-1]])
    width = max(g.max_neighbors for g in graphs)
    angle_width = max(g.max_angle_neighbors for g in graphs)
    widened = [pad_graph(g, g.n_atoms, width, angle_width) for g in graphs]

    def cat(name):
        return np.concatenate([np.asarray(getattr(g, name)) for g in widened])

    return Graph(
        positions=cat("positions"),
        types=cat("types"),
        atom_frame=np.concatenate([np.full(g.n_atoms, k, np.int32) for k, g in enumerate(graphs)]),
        neighbors=np.concatenate([np.asarray(g.neighbors) + offset for g, offset in zip(widened, atom_offsets, strict=True)]),
        neighbor_shift=cat("neighbor_shift"),
        neighbor_mask=cat("neighbor_mask"),
        angle_mask=cat("angle_mask"),
        n_frames=len(graphs),
    )


def pad_to_buckets(graph: Graph, config: DPA3Config) -> Graph:
    """Pad atoms to a bucket size, and the table widths M and K to multiples of 8 (at most e_sel, a_sel)."""
    return pad_graph(graph, bucket_size(graph.n_atoms, minimum=16),
                     min(-(-graph.max_neighbors // 8) * 8, config.e_sel),
                     min(-(-graph.max_angle_neighbors // 8) * 8, config.a_sel))


def bucket_size(n: int, minimum: int = 8) -> int:
    """Round n up to one of a few sizes (at most 12.5 % padding) so jit sees few distinct shapes."""
    n = max(n, minimum)
    step = 2 ** max(0, int(math.floor(math.log2(n))) - 3)
    return -(-n // step) * step


def pad_graph(graph: Graph, n_atoms: int, max_neighbors: int, max_angle_neighbors: int) -> Graph:
    """Pad to the given sizes: padding atoms have type -1, padding cells point at atom 0, masked (in a batch,
    `batch_graphs` offsets them to the frame's first atom: any valid index will do)."""

    def pad(array, sizes, value=0):
        array = np.asarray(array)
        widths = [(0, size - length) for size, length in zip(sizes, array.shape, strict=False)]
        if any(extra < 0 for _, extra in widths):
            raise ValueError(f"cannot pad an array of shape {array.shape} to {sizes}")
        return np.pad(array, widths + [(0, 0)] * (array.ndim - len(sizes)), constant_values=value)

    table = (n_atoms, max_neighbors)
    return Graph(
        positions=pad(graph.positions, (n_atoms,)),
        types=pad(graph.types, (n_atoms,), -1),
        atom_frame=pad(graph.atom_frame, (n_atoms,)),
        neighbors=pad(graph.neighbors, table),
        neighbor_shift=pad(graph.neighbor_shift, table),
        neighbor_mask=pad(graph.neighbor_mask, table, False),
        angle_mask=pad(graph.angle_mask, (n_atoms, max_angle_neighbors), False),
        n_frames=graph.n_frames,
    )

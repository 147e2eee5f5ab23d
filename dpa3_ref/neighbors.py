"""Neighbour lists and the line-graph series (LiGS) that DPA3 computes on (spec §1, docs/architecture.md §1).

    atoms  --(pairs within e_rcut)-->  edges  --(pairs of edges sharing a centre, within a_rcut)-->  angles

For every atom i the neighbours j (all periodic images, from vesin's O(N) cell list) are sorted by
distance, nearest first. DPA3's selection rule then keeps

  * edges:  the first `e_sel` of that list (farther ones are silently dropped, as in deepmd-kit);
  * angles: every ordered pair (j, k) of the first `a_sel` edges of i with r_ij < a_rcut, the diagonal
    j = k included (deepmd-kit includes it, so must we).

The result is a `Graph`: edges as flat index arrays, and the angle neighbours of each atom as a small
table `angle_edge[i, :]` of edge indices, so that the angles of atom i are the K × K block
(angle_edge[i, j], angle_edge[i, k]). The block layout turns the per-angle gathers and scatters (slow,
and most of the work: angles outnumber edges ~8:1) into broadcasts and sums over an axis.
Everything downstream is cell-free: an edge carries its periodic image shift, so periodic crystals,
open clusters and host codes with ghost atoms look alike. Arrays are padded to a few bucket sizes so
that `jit` compiles once per bucket, not once per frame; padded atoms have type -1 and padded edges
and angle slots a False mask.
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
    """Atoms, edges and angles of one or more frames. r_ij = positions[j] - positions[i] + edge_shift."""

    positions: jax.Array  # [n_atoms, 3] Cartesian, Å
    types: jax.Array  # [n_atoms] int, model type index; -1 = padding atom
    atom_frame: jax.Array  # [n_atoms] int, frame of each atom
    edge_center: jax.Array  # [n_edges] int, i
    edge_neighbor: jax.Array  # [n_edges] int, j (the atom whose image is the neighbour)
    edge_shift: jax.Array  # [n_edges, 3] Cartesian image shift (shift_integers @ cell)
    edge_slot: jax.Array  # [n_edges] int, rank of j in i's distance-sorted list (indexes davg/dstd)
    edge_mask: jax.Array  # [n_edges] bool, real edge
    edge_in_angle: jax.Array  # [n_edges] bool, j is one of i's angle neighbours
    angle_edge: jax.Array  # [n_atoms, K] int, edge index of i's k-th angle neighbour (0 on padding)
    angle_mask: jax.Array  # [n_atoms, K] bool, real angle neighbour
    n_frames: int = eqx.field(static=True, default=1)

    @property
    def n_atoms(self) -> int:
        return self.positions.shape[0]

    @property
    def n_edges(self) -> int:
        return self.edge_center.shape[0]

    @property
    def max_angle_neighbors(self) -> int:
        return self.angle_edge.shape[1]


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
    angle_edge, angle_mask = _angle_table(center, in_angle, n_atoms)

    shift = image @ cell if cell is not None else np.zeros((center.size, 3))
    graph = Graph(
        positions=positions,
        types=types.astype(np.int32),
        atom_frame=np.zeros(n_atoms, np.int32),
        edge_center=center.astype(np.int32),
        edge_neighbor=neighbor.astype(np.int32),
        edge_shift=shift,
        edge_slot=slot.astype(np.int32),
        edge_mask=np.ones(center.size, bool),
        edge_in_angle=in_angle,
        angle_edge=angle_edge,
        angle_mask=angle_mask,
    )
    return pad_to_buckets(graph, config) if pad else graph


def _angle_table(center: np.ndarray, in_angle: np.ndarray, n_atoms: int) -> tuple[np.ndarray, np.ndarray]:
    """Edge indices of each atom's angle neighbours, nearest first: [n_atoms, K] and its mask."""
    angle_edges = np.flatnonzero(in_angle)  # sorted by centre, nearest first
    owner = center[angle_edges]
    count = np.bincount(owner, minlength=n_atoms)
    width = max(1, int(count.max(initial=0)))
    rank = np.arange(angle_edges.size) - np.searchsorted(owner, owner)  # position within the owner's list
    table = np.zeros((n_atoms, width), np.int32)
    mask = np.zeros((n_atoms, width), bool)
    table[owner, rank] = angle_edges
    mask[owner, rank] = True
    return table, mask


def batch_graphs(graphs: list[Graph]) -> Graph:
    """Several unpadded frames as one graph (a disjoint union): indices offset, `atom_frame` = frame number."""
    atom_offsets = np.cumsum([0] + [g.n_atoms for g in graphs[:-1]])
    edge_offsets = np.cumsum([0] + [g.n_edges for g in graphs[:-1]])
    width = max(g.max_angle_neighbors for g in graphs)

    def cat(name, offsets=None):
        parts = [np.asarray(getattr(g, name)) for g in graphs]
        if offsets is not None:
            parts = [part + offset for part, offset in zip(parts, offsets, strict=True)]
        return np.concatenate(parts)

    def widen(array, value):
        return np.pad(np.asarray(array), [(0, 0), (0, width - array.shape[1])], constant_values=value)

    return Graph(
        positions=cat("positions"),
        types=cat("types"),
        atom_frame=np.concatenate([np.full(g.n_atoms, k, np.int32) for k, g in enumerate(graphs)]),
        edge_center=cat("edge_center", atom_offsets).astype(np.int32),
        edge_neighbor=cat("edge_neighbor", atom_offsets).astype(np.int32),
        edge_shift=cat("edge_shift"),
        edge_slot=cat("edge_slot"),
        edge_mask=cat("edge_mask"),
        edge_in_angle=cat("edge_in_angle"),
        angle_edge=np.concatenate([widen(g.angle_edge, 0) + off for g, off in zip(graphs, edge_offsets, strict=True)]),
        angle_mask=np.concatenate([widen(g.angle_mask, False) for g in graphs]),
        n_frames=len(graphs),
    )


def pad_to_buckets(graph: Graph, config: DPA3Config) -> Graph:
    """Pad atoms and edges to bucket sizes and the angle table width to a multiple of 8 (at most a_sel)."""
    return pad_graph(graph, bucket_size(graph.n_atoms, minimum=16), bucket_size(graph.n_edges, minimum=256),
                     min(-(-graph.max_angle_neighbors // 8) * 8, config.a_sel))


def bucket_size(n: int, minimum: int = 8) -> int:
    """Round n up to one of a few sizes (at most 12.5 % padding) so jit sees few distinct shapes."""
    n = max(n, minimum)
    step = 2 ** max(0, int(math.floor(math.log2(n))) - 3)
    return -(-n // step) * step


def pad_graph(graph: Graph, n_atoms: int, n_edges: int, max_angle_neighbors: int) -> Graph:
    """Pad to the given sizes: padding atoms have type -1, padding edges/angles point at index 0, masked."""

    def pad(array, size, value=0, axis=0):
        array = np.asarray(array)
        extra = size - array.shape[axis]
        if extra < 0:
            raise ValueError(f"cannot pad {array.shape[axis]} entries to {size}")
        widths = [(0, 0)] * array.ndim
        widths[axis] = (0, extra)
        return np.pad(array, widths, constant_values=value)

    angle_edge = pad(pad(graph.angle_edge, max_angle_neighbors, axis=1), n_atoms)
    angle_mask = pad(pad(graph.angle_mask, max_angle_neighbors, False, axis=1), n_atoms, False)

    return Graph(
        positions=pad(graph.positions, n_atoms),
        types=pad(graph.types, n_atoms, -1),
        atom_frame=pad(graph.atom_frame, n_atoms),
        edge_center=pad(graph.edge_center, n_edges),
        edge_neighbor=pad(graph.edge_neighbor, n_edges),
        edge_shift=pad(graph.edge_shift, n_edges),
        edge_slot=pad(graph.edge_slot, n_edges),
        edge_mask=pad(graph.edge_mask, n_edges, False),
        edge_in_angle=pad(graph.edge_in_angle, n_edges, False),
        angle_edge=angle_edge,
        angle_mask=angle_mask,
        n_frames=graph.n_frames,
    )

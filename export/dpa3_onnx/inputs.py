"""The model's inputs from atoms: the DPA3 selection rule and the reverse neighbour table (contract v1, §3–§5).

For every atom i, all atoms j (every periodic image; j = i only as a true image) with r_ij ≤ e_rcut, sorted
by distance, nearest first; the first e_sel are kept. The rank m of a neighbour is its column in the table:

    neighbors[i, m] = j,  neighbor_shift[i, m] = S @ cell  (so r_im = x_j − x_i + shift),  neighbor_mask[i, m] = 1

Pairs of types in exclude_types are then removed, leaving a masked hole in their column. Neighbour m of i
is an angle neighbour when m < a_sel and r_im < a_rcut: angle_mask[i, m] = 1 (the first K columns). The
reverse table lists, for each atom j, the flat cells i·M + m (row-major) of real edges pointing at j.

With host-given ghost atoms (`n_local`), the atoms are explicit images: open boundaries, no cell.
"""

from __future__ import annotations

import warnings

import numpy as np
import vesin

from dpa3_onnx.contract import Dpa3OnnxError, ModelInfo

MIN_DISTANCE = 1e-4  # Å; closer pairs are "two atoms at the same position"


def model_inputs(positions, types, cell, info: ModelInfo, n_local: int | None = None) -> dict[str, np.ndarray]:
    """The feeds of one structure. positions [N, 3] Å; types [N] element names or type indices; cell [3, 3]
    (rows = lattice vectors) or None; n_local: the first n_local atoms are local, the rest ghosts (no cell)."""
    positions = _checked_positions(positions)
    types = info.type_indices(types)
    n_atoms = positions.shape[0]
    if types.shape[0] != n_atoms:
        raise Dpa3OnnxError(f"{types.shape[0]} types given for {n_atoms} atoms")
    if n_local is None:
        n_local = n_atoms
    elif cell is not None:
        raise Dpa3OnnxError("give either a cell (periodic) or n_local with explicit ghost atoms, not both")
    elif not 0 <= int(n_local) <= n_atoms:
        raise Dpa3OnnxError(f"n_local = {n_local} is not between 0 and the number of atoms, {n_atoms}")
    cell = None if cell is None else _checked_cell(cell)
    table = neighbor_table(positions, types, cell, info)
    return {
        "positions": positions,
        "types": types,
        "n_local": np.array(int(n_local), np.int64),
        **table,
        "reverse_neighbors": reverse_neighbor_table(table["neighbors"], table["neighbor_mask"]),
    }


def neighbor_table(positions: np.ndarray, types: np.ndarray, cell: np.ndarray | None, info: ModelInfo) -> dict:
    """neighbors [N, M], neighbor_shift [N, M, 3], neighbor_mask [N, M], angle_mask [N, K] by the selection rule."""
    n_atoms = positions.shape[0]
    center, neighbor, shift, distance = _pairs_within(positions, cell, info.e_rcut)
    if distance.size and distance.min() < MIN_DISTANCE:
        k = int(np.argmin(distance))
        raise Dpa3OnnxError(f"atoms {center[k]} and {neighbor[k]} are at the same position (distance {distance[k]:.2e} Å)")
    order = np.lexsort((distance, center))  # by centre, nearest first (stable: ties keep the search's order)
    center, neighbor, shift, distance = center[order], neighbor[order], shift[order], distance[order]
    rank = np.arange(center.size) - np.searchsorted(center, np.arange(n_atoms))[center]
    if rank.size and rank.max() >= info.e_sel:
        warnings.warn(f"an atom has {rank.max() + 1} neighbours within e_rcut = {info.e_rcut} Å, more than "
                      f"e_sel = {info.e_sel}: the farthest are dropped, as the model was trained", stacklevel=3)
    keep = rank < info.e_sel
    if info.exclude_types:
        excluded = {tuple(p) for p in info.exclude_types} | {tuple(p[::-1]) for p in info.exclude_types}
        keep &= np.array([p not in excluded for p in zip(types[center].tolist(), types[neighbor].tolist())], bool)
    center, neighbor, shift, distance, rank = (a[keep] for a in (center, neighbor, shift, distance, rank))
    in_angle = (rank < info.a_sel) & (distance < info.a_rcut)

    width = max(1, int(rank.max(initial=-1)) + 1)  # M
    angle_width = max(1, int(rank[in_angle].max(initial=-1)) + 1)  # K
    table = {
        "neighbors": np.zeros((n_atoms, width), np.int64),
        "neighbor_shift": np.zeros((n_atoms, width, 3)),
        "neighbor_mask": np.zeros((n_atoms, width), bool),
        "angle_mask": np.zeros((n_atoms, angle_width), bool),
    }
    table["neighbors"][center, rank] = neighbor
    table["neighbor_shift"][center, rank] = shift
    table["neighbor_mask"][center, rank] = True
    table["angle_mask"][center[in_angle], rank[in_angle]] = True
    return table


def reverse_neighbor_table(neighbors: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """[N, R]: row j lists the flat cells i·M + m with neighbors[i, m] = j and mask[i, m], ascending; −1 pads."""
    n_atoms = neighbors.shape[0]
    cells = np.flatnonzero(mask.reshape(-1))
    targets = neighbors.reshape(-1)[cells]
    order = np.argsort(targets, kind="stable")
    cells, targets = cells[order], targets[order]
    counts = np.bincount(targets, minlength=n_atoms)
    rank = np.arange(cells.size) - np.repeat(np.cumsum(counts) - counts, counts)
    reverse = np.full((n_atoms, max(1, int(counts.max(initial=0)))), -1, np.int64)
    reverse[targets, rank] = cells
    return reverse


def _pairs_within(positions, cell, cutoff):
    """(i, j, Cartesian image shift, distance) of every pair with distance ≤ cutoff (vesin's cell list)."""
    periodic = cell is not None
    box = cell if periodic else np.zeros((3, 3))  # vesin's convention for no cell; every shift is then 0
    # vesin keeps d < cutoff, the contract d ≤ e_rcut: search a hair wider, then cut exactly.
    search = vesin.NeighborList(cutoff=cutoff * (1 + 1e-12), full_list=True)
    i, j, shifts, distance = search.compute(positions, box, periodic, quantities="ijSd")
    keep = distance <= cutoff
    # S @ cell by einsum: matmul hands [pairs, 3] @ [3, 3] to a threaded BLAS, which on a busy 2-core machine
    # took 60 ms at 1536 atoms (5 ms this way) and made building the inputs grow faster than the atom count
    shift = np.einsum("pk,kl->pl", shifts[keep].astype(np.float64), box)  # [pairs, 3]
    return i[keep].astype(np.int64), j[keep].astype(np.int64), shift, distance[keep]


def _checked_positions(positions) -> np.ndarray:
    try:
        positions = np.asarray(positions, dtype=np.float64)
    except (TypeError, ValueError):
        raise Dpa3OnnxError("positions must be an [n_atoms, 3] array of numbers") from None
    if positions.ndim != 2 or positions.shape[1] != 3:
        raise Dpa3OnnxError(f"positions must have shape [n_atoms, 3], got {positions.shape}")
    if positions.shape[0] == 0:
        raise Dpa3OnnxError("the structure has no atoms")
    bad = np.flatnonzero(~np.isfinite(positions).all(axis=1))
    if bad.size:
        raise Dpa3OnnxError(f"the position of atom {bad[0]} is not finite: {positions[bad[0]].tolist()}")
    return positions


def _checked_cell(cell) -> np.ndarray:
    try:
        cell = np.asarray(cell, dtype=np.float64)
    except (TypeError, ValueError):
        raise Dpa3OnnxError("cell must be a [3, 3] array of numbers (rows are lattice vectors)") from None
    if cell.shape != (3, 3):
        raise Dpa3OnnxError(f"cell must have shape [3, 3] (rows are lattice vectors), got {cell.shape}")
    if not np.isfinite(cell).all():
        raise Dpa3OnnxError(f"cell is not finite: {cell.tolist()}")
    if abs(np.linalg.det(cell)) < 1e-6 * max(1.0, np.abs(cell).max()) ** 3:
        raise Dpa3OnnxError(f"cell is singular (volume {abs(np.linalg.det(cell)):.3g} Å^3): {cell.tolist()}")
    return cell

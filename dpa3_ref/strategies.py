"""Hypothesis strategies for atomistic systems and the symmetry operations that act on them.

Positions are built without rejection, so Hypothesis never has to filter: atoms sit on the sites of a *site
lattice* with basis rows B = a·T, where a is the site spacing and T is unit lower-triangular,

    T = [[1, 0, 0], [τ1, 1, 0], [τ2, τ3, 1]]      (τ = tilts; τ = 0 gives an orthorhombic cell).

Every non-zero integer combination n·T has a component of magnitude |n_k| >= 1 (look at the last non-zero
n_k), so distinct sites are at least `a` apart, however strong the tilt. Each atom is then displaced by at most
δ = (a - min_distance) / 2, so no two atoms, periodic images included, come closer than `min_distance`.
A periodic cell is a g1×g2×g3 block of sites (rows g_k·B_k); atoms occupy a subset of its sites.

Shrinking goes to few atoms on undisplaced sites of an orthorhombic grid, all of the first element, and
`System.__repr__` prints something that can be pasted back into Python.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class System:
    """Atoms and, for periodic boundaries, the cell. Lists are accepted and stored as float64 arrays."""

    positions: np.ndarray  # [n_atoms, 3] Å
    symbols: tuple[str, ...]
    cell: np.ndarray | None = None  # [3, 3] rows are lattice vectors; None = open boundaries

    def __post_init__(self):
        positions = np.asarray(self.positions, dtype=np.float64).reshape(-1, 3)
        if len(positions) != len(self.symbols):
            raise ValueError(f"{len(positions)} positions for {len(self.symbols)} symbols")
        object.__setattr__(self, "positions", positions)
        object.__setattr__(self, "symbols", tuple(self.symbols))
        if self.cell is not None:
            object.__setattr__(self, "cell", np.asarray(self.cell, dtype=np.float64).reshape(3, 3))

    @property
    def n_atoms(self) -> int:
        return len(self.symbols)

    @property
    def periodic(self) -> bool:
        return self.cell is not None

    def __repr__(self) -> str:
        cell = None if self.cell is None else self.cell.tolist()
        return f"System(symbols={list(self.symbols)}, positions={self.positions.tolist()}, cell={cell})"

    def with_positions(self, positions: np.ndarray, cell: np.ndarray | None = None) -> System:
        """The same atoms at new positions (and, for periodic systems, in a new cell if one is given)."""
        return System(positions, self.symbols, self.cell if cell is None else cell)

    def supercell(self, repeats: Sequence[int]) -> System:
        """The n1×n2×n3 supercell: image shifts in the outer loop, atoms in the inner one (so arrays tile)."""
        shifts = np.array([(i, j, k) for i in range(repeats[0]) for j in range(repeats[1])
                           for k in range(repeats[2])], dtype=np.float64)  # [n_images, 3]
        positions = (shifts @ self.cell)[:, None, :] + self.positions[None, :, :]  # [n_images, n_atoms, 3]
        return System(positions.reshape(-1, 3), self.symbols * len(shifts), np.diag(repeats) @ self.cell)

    def joined(self, other: System) -> System:
        """The atoms of both open-boundary systems in one system (self first)."""
        return System(np.concatenate([self.positions, other.positions]), self.symbols + other.symbols)


# --- symmetry operations -------------------------------------------------------------------------------

def unit_vectors() -> st.SearchStrategy[np.ndarray]:
    """Directions in 3D; the zero draw (where shrinking goes) maps to the z axis."""
    def normalised(v):
        v = np.array(v, dtype=np.float64)
        length = np.linalg.norm(v)
        return v / length if length > 1e-6 else np.array([0.0, 0.0, 1.0])
    unit = st.floats(-1.0, 1.0)
    return st.tuples(unit, unit, unit).map(normalised)


def rotation_matrix(axis: np.ndarray, angle: float) -> np.ndarray:
    """Rodrigues' formula: the proper rotation [3, 3] by `angle` (rad) about the unit vector `axis`."""
    cross = np.array([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]])
    return np.eye(3) + math.sin(angle) * cross + (1.0 - math.cos(angle)) * cross @ cross


def rotations() -> st.SearchStrategy[np.ndarray]:
    """Proper rotations Q (QᵀQ = I, det Q = +1); shrinks to small angles about z."""
    return st.builds(rotation_matrix, unit_vectors(), st.floats(-math.pi, math.pi))


def improper_rotations() -> st.SearchStrategy[np.ndarray]:
    """Improper rotations (det = -1): every one is -Q for a proper Q (inversion times a rotation)."""
    return rotations().map(lambda rotation: -rotation)


def translations(max_length: float = 10.0) -> st.SearchStrategy[np.ndarray]:
    """Rigid shifts [3] in Å."""
    return hnp.arrays(np.float64, 3, elements=st.floats(-max_length, max_length))


def permutations(n_atoms: int) -> st.SearchStrategy[np.ndarray]:
    """Reorderings of the atoms: new atom i is old atom order[i]."""
    return st.permutations(range(n_atoms)).map(np.array)


def lattice_shifts(n_atoms: int, max_shift: int = 2) -> st.SearchStrategy[np.ndarray]:
    """Integer lattice-vector multiples [n_atoms, 3] to wrap each atom by."""
    return hnp.arrays(np.int64, (n_atoms, 3), elements=st.integers(-max_shift, max_shift))


def supercell_repeats(max_repeat: int = 2) -> st.SearchStrategy[tuple[int, int, int]]:
    """(n1, n2, n3), not all 1."""
    repeat = st.integers(1, max_repeat)
    return st.tuples(repeat, repeat, repeat).filter(lambda repeats: max(repeats) > 1)


def displacements(n_atoms: int, max_length: float) -> st.SearchStrategy[np.ndarray]:
    """Per-atom displacements [n_atoms, 3], each no longer than `max_length` Å (a cube draw clipped to the ball)."""
    def clipped_to_ball(cube):
        lengths = np.maximum(np.linalg.norm(cube, axis=1, keepdims=True), 1.0)  # [n_atoms, 1]
        return max_length * cube / lengths
    return hnp.arrays(np.float64, (n_atoms, 3), elements=st.floats(-1.0, 1.0)).map(clipped_to_ball)


# --- systems ------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Geometry:
    """How systems are drawn: the defaults give metal-like densities that any potential accepting atoms 2 Å
    apart can evaluate."""

    max_atoms: int = 6  # atoms per drawn system (supercells and probes add more)
    min_distance: float = 2.0  # Å, closest approach of any two atoms, periodic images included
    spacing: tuple[float, float] = (2.3, 3.0)  # Å, range of the site spacing a (> min_distance)
    max_tilt: float = 1.5  # |τ| of triclinic cells: 1.5 gives cell angles down to ~34°
    max_grid: int = 3  # sites per cell direction: cells from one site (a few Å) to 3a

    def __post_init__(self):
        if not 0 < self.min_distance < self.spacing[0] <= self.spacing[1]:
            raise ValueError(f"need 0 < min_distance < spacing[0] <= spacing[1], got {self.min_distance}, "
                             f"{self.spacing}")
        if self.max_atoms < 1 or self.max_grid < 1:
            raise ValueError(f"max_atoms and max_grid must be at least 1, got {self.max_atoms}, {self.max_grid}")


def site_basis(spacing: float, tilts: Sequence[float]) -> np.ndarray:
    """B = a·T [3, 3], T unit lower-triangular with the three tilts (see the module docstring)."""
    tilt_xy, tilt_xz, tilt_yz = tilts
    return spacing * np.array([[1.0, 0.0, 0.0], [tilt_xy, 1.0, 0.0], [tilt_xz, tilt_yz, 1.0]])


@st.composite
def systems(draw, elements: Sequence[str], geometry: Geometry = Geometry(), *, periodic: bool | None = None,
            min_atoms: int = 1) -> System:
    """Open clusters or periodic cells (orthorhombic or strongly skewed) of 1..max_atoms atoms."""
    is_periodic = draw(st.booleans()) if periodic is None else periodic
    spacing = draw(st.floats(*geometry.spacing))
    triclinic = draw(st.booleans())
    tilt = st.floats(-geometry.max_tilt, geometry.max_tilt) if triclinic else st.just(0.0)
    basis = site_basis(spacing, draw(st.tuples(tilt, tilt, tilt)))  # [3, 3]
    grid = list(draw(st.tuples(*[st.integers(1, geometry.max_grid)] * 3)))
    grid[2] = max(grid[2], math.ceil(min_atoms / (grid[0] * grid[1])))
    n_sites = grid[0] * grid[1] * grid[2]
    n_atoms = draw(st.integers(min_atoms, max(min_atoms, min(geometry.max_atoms, n_sites))))
    sites = draw(st.lists(st.integers(0, n_sites - 1), min_size=n_atoms, max_size=n_atoms, unique=True))
    site_indices = np.array(np.unravel_index(sites, grid), dtype=np.float64).T  # [n_atoms, 3]
    jitter = draw(displacements(n_atoms, (spacing - geometry.min_distance) / 2))  # [n_atoms, 3]
    symbols = draw(st.lists(st.sampled_from(list(elements)), min_size=n_atoms, max_size=n_atoms))
    cell = np.diag(grid).astype(np.float64) @ basis if is_periodic else None
    return System(site_indices @ basis + jitter, symbols, cell)


# --- geometries built for one check -------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class CutoffProbe:
    """`mover` sits at distance `radius` from the point `center`: an atom, or a periodic image of one."""

    system: System
    mover: int
    center: np.ndarray  # [3] Å
    radius: float


@st.composite
def cutoff_probes(draw, elements: Sequence[str], radius: float, geometry: Geometry = Geometry()) -> CutoffProbe:
    """A cluster plus one atom (the mover) at exactly `radius` from the cluster atom that sticks out farthest
    along a random direction u, so every cluster atom is at least `radius` from the mover along u. Half the draws
    put it all in an orthorhombic periodic box with room `min_distance` around the cluster, shifted and wrapped,
    so that the crossing pair usually meets through a periodic image (other images may then come closer to
    the mover, but never closer than `min_distance`)."""
    cluster = draw(systems(elements, geometry, periodic=False))
    direction = draw(unit_vectors())  # [3]
    anchor = int(np.argmax(cluster.positions @ direction))
    mover_position = cluster.positions[anchor] + radius * direction  # [3]
    positions = np.vstack([cluster.positions, mover_position])  # [n_atoms + 1, 3]
    symbols = cluster.symbols + (draw(st.sampled_from(list(elements))),)
    if not draw(st.booleans()):
        return CutoffProbe(System(positions, symbols), len(symbols) - 1, cluster.positions[anchor], radius)
    lower, upper = positions.min(axis=0), positions.max(axis=0)
    cell = np.diag(upper - lower + geometry.min_distance)  # [3, 3]
    shift = draw(hnp.arrays(np.float64, 3, elements=st.floats(0.0, 1.0))) * np.diag(cell)  # [3]
    fractional = np.mod((positions - lower + shift) / np.diag(cell), 1.0)  # [n_atoms + 1, 3]
    wrapped = fractional * np.diag(cell)
    return CutoffProbe(System(wrapped, symbols, cell), len(symbols) - 1, wrapped[-1] - radius * direction, radius)


@dataclasses.dataclass(frozen=True, eq=False)
class LocalityProbe:
    """`mover` of the open-boundary `system` moves to `new_position`; atoms farther than `radius` from both of
    its positions must keep their energies."""

    system: System
    mover: int
    new_position: np.ndarray  # [3] Å
    radius: float


@st.composite
def locality_probes(draw, elements: Sequence[str], radius: float, geometry: Geometry = Geometry()) -> LocalityProbe:
    """A fully occupied rod of g1×g2×m sites along z, long enough that its far end lies beyond `radius` from its
    first layer: a chain through which a message-passing model can carry information up to its receptive field.
    A first-layer atom moves to another point within the jitter ball of its site."""
    spacing = draw(st.floats(*geometry.spacing))
    max_jitter = (spacing - geometry.min_distance) / 2
    grid = (draw(st.integers(1, 2)), draw(st.integers(1, 2)), math.ceil((radius + 2 * max_jitter) / spacing) + 2)
    sites = np.array(np.unravel_index(np.arange(np.prod(grid)), grid), dtype=np.float64).T * spacing  # [n, 3]
    n_atoms = len(sites)
    jitter = draw(displacements(n_atoms + 1, max_jitter))  # [n_atoms + 1, 3]: the last row is the mover's move
    symbols = draw(st.lists(st.sampled_from(list(elements)), min_size=n_atoms, max_size=n_atoms))
    mover = draw(st.integers(0, grid[0] * grid[1] - 1)) * grid[2]  # a site with z index 0
    system = System(sites + jitter[:-1], symbols)
    return LocalityProbe(system, mover, sites[mover] + jitter[-1], radius)


@st.composite
def separated_fragments(draw, elements: Sequence[str], separation: float,
                        geometry: Geometry = Geometry()) -> tuple[System, System]:
    """Two open clusters whose closest atoms are more than `separation` apart (B is moved along a random
    direction u until its lowest projection on u exceeds A's highest by `separation` plus a drawn gap)."""
    fragment_a = draw(systems(elements, geometry, periodic=False))
    fragment_b = draw(systems(elements, geometry, periodic=False))
    direction = draw(unit_vectors())  # [3]
    gap = separation + draw(st.floats(0.01, 3.0))
    offset = (fragment_a.positions @ direction).max() - (fragment_b.positions @ direction).min() + gap
    return fragment_a, fragment_b.with_positions(fragment_b.positions + offset * direction)

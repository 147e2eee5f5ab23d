"""The strategies draw what they promise: atoms never closer than min_distance (periodic images included, checked
with vesin's neighbour list), proper and improper rotations, probes whose geometry the checks rely on."""

import numpy as np
import vesin
from hypothesis import given
from hypothesis import strategies as st

from dpa3_ref import strategies as sst
from dpa3_ref.strategies import Geometry, System

ELEMENTS = ["Cu", "Ni"]
GEOMETRY = Geometry()


def closest_approach(system: System, search_radius: float = 10.0) -> float:
    """The shortest distance between two atoms, or an atom and a periodic image (itself included)."""
    cell = np.zeros((3, 3)) if system.cell is None else system.cell
    neighbours = vesin.NeighborList(cutoff=search_radius, full_list=False)
    (distances,) = neighbours.compute(points=system.positions, box=cell, periodic=system.periodic, quantities="d")
    return float(distances.min()) if len(distances) else np.inf


@given(sst.systems(ELEMENTS, GEOMETRY))
def test_no_two_atoms_closer_than_min_distance(system):
    assert closest_approach(system) >= GEOMETRY.min_distance - 1e-12


@given(sst.rotations(), sst.improper_rotations())
def test_rotations_are_orthogonal_with_the_right_determinant(proper, improper):
    for rotation, determinant in ((proper, 1.0), (improper, -1.0)):
        np.testing.assert_allclose(rotation @ rotation.T, np.eye(3), atol=1e-14)
        assert abs(np.linalg.det(rotation) - determinant) < 1e-12


@given(st.sampled_from([4.0, 6.0]).flatmap(lambda radius: sst.cutoff_probes(ELEMENTS, radius, GEOMETRY)))
def test_cutoff_probe_puts_the_mover_at_the_radius(probe):
    distance = np.linalg.norm(probe.system.positions[probe.mover] - probe.center)
    assert abs(distance - probe.radius) < 1e-9
    assert closest_approach(probe.system) >= GEOMETRY.min_distance - 1e-9


@given(sst.locality_probes(ELEMENTS, radius=12.0, geometry=GEOMETRY))
def test_locality_probe_has_atoms_beyond_the_radius(probe):
    positions = probe.system.positions
    beyond = ((np.linalg.norm(positions - positions[probe.mover], axis=1) > probe.radius)
              & (np.linalg.norm(positions - probe.new_position, axis=1) > probe.radius))
    assert beyond.any()
    moved = positions.copy()
    moved[probe.mover] = probe.new_position
    assert closest_approach(probe.system.with_positions(moved)) >= GEOMETRY.min_distance - 1e-12


@given(sst.separated_fragments(ELEMENTS, separation=6.0, geometry=GEOMETRY))
def test_fragments_are_farther_apart_than_the_separation(fragments):
    fragment_a, fragment_b = fragments
    gaps = np.linalg.norm(fragment_a.positions[:, None] - fragment_b.positions[None, :], axis=-1)
    assert gaps.min() > 6.0


@given(sst.systems(ELEMENTS, GEOMETRY))
def test_repr_rebuilds_the_system(system):
    rebuilt = eval(repr(system), {"System": System})
    np.testing.assert_array_equal(rebuilt.positions, system.positions)
    assert rebuilt.symbols == system.symbols
    assert (rebuilt.cell is None) == (system.cell is None)
    if system.cell is not None:
        np.testing.assert_array_equal(rebuilt.cell, system.cell)

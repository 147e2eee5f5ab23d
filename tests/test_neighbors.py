"""Neighbour lists: vesin's cell list agrees with brute force, and DPA3's selection rule is applied exactly."""

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dpa3_ref.config import DPA3Config
from dpa3_ref.errors import Dpa3Error
from dpa3_ref.neighbors import build_graph, bucket_size, neighbor_pairs


def brute_force_pairs(positions, cell, cutoff):
    """Every (i, j, shift) within the cutoff, from all images in a box of shifts large enough (spec §1.2)."""
    if cell is None:
        shifts = np.zeros((1, 3))
    else:
        volume = abs(np.linalg.det(cell))
        heights = [volume / np.linalg.norm(np.cross(cell[(k + 1) % 3], cell[(k + 2) % 3])) for k in range(3)]
        ranges = [range(-int(np.ceil(cutoff / h)) - 1, int(np.ceil(cutoff / h)) + 2) for h in heights]
        shifts = np.array(list(itertools.product(*ranges)), dtype=float)
    pairs = set()
    for s in shifts:
        offset = s @ cell if cell is not None else np.zeros(3)
        d = np.linalg.norm(positions[None, :, :] + offset - positions[:, None, :], axis=-1)
        for i, j in zip(*np.nonzero(d <= cutoff), strict=True):
            if i != j or s.any():
                pairs.add((int(i), int(j), *map(int, s)))
    return pairs


def triclinic_cells():
    """Cells from cubic to strongly skewed, including ones shorter than the cutoff in some direction."""
    lengths = st.floats(2.5, 9.0)
    skew = st.floats(-0.45, 0.45)
    return st.builds(
        lambda a, b, c, xy, xz, yz: np.array([[a, 0, 0], [xy * b, b, 0], [xz * c, yz * c, c]]),
        lengths, lengths, lengths, skew, skew, skew,
    )


@given(cell=triclinic_cells(), n=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_periodic_pairs_match_brute_force(cell, n, seed):
    rng = np.random.default_rng(seed)
    positions = rng.random((n, 3)) @ cell + rng.normal(0, 3, 3)  # not wrapped into the cell
    i, j, shifts, distances = neighbor_pairs(positions, cell, 4.0)
    ours = {(a, b, *map(int, s)) for a, b, s in zip(i, j, shifts, strict=True)}
    assert ours == brute_force_pairs(positions, cell, 4.0)
    vectors = positions[j] - positions[i] + shifts @ cell
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), distances, atol=1e-10)


def test_open_boundary_pairs_match_brute_force():
    positions = np.random.default_rng(1).random((30, 3)) * 8
    i, j, shifts, _ = neighbor_pairs(positions, None, 3.0)
    assert not shifts.any()
    assert {(a, b, 0, 0, 0) for a, b in zip(i, j, strict=True)} == brute_force_pairs(positions, None, 3.0)


CONFIG = DPA3Config(type_map=("A", "B"), e_rcut=4.0, e_rcut_smth=3.0, e_sel=12, a_rcut=3.0, a_rcut_smth=2.5, a_sel=5)


def test_selection_keeps_nearest_e_sel_and_angle_rule():
    rng = np.random.default_rng(2)
    cell = np.diag([7.0, 7.5, 8.0])
    positions = rng.random((40, 3)) @ cell
    types = rng.integers(0, 2, 40)
    graph = build_graph(positions, types, cell, CONFIG, pad=False)
    vectors = positions[graph.neighbors] - positions[:, None, :] + graph.neighbor_shift  # [40, M, 3]
    distance = np.linalg.norm(vectors, axis=-1)
    all_i, _, _, all_distances = neighbor_pairs(positions, cell, CONFIG.e_rcut)
    for atom in range(40):
        mine = distance[atom][graph.neighbor_mask[atom]]
        expected = np.sort(all_distances[all_i == atom])[: CONFIG.e_sel]
        np.testing.assert_allclose(mine, expected)  # nearest first, truncated at e_sel
        np.testing.assert_array_equal(np.flatnonzero(graph.neighbor_mask[atom]), np.arange(len(mine)))  # slot = rank
        in_angle = (np.arange(len(mine)) < CONFIG.a_sel) & (mine < CONFIG.a_rcut)
        k = graph.max_angle_neighbors
        np.testing.assert_array_equal(graph.angle_mask[atom], np.pad(in_angle, (0, max(0, k - len(mine))))[:k])
        assert not in_angle[k:].any()  # every angle neighbour is within the first K columns


def test_excluded_pairs_keep_their_slot_masked():
    """deepmd-kit removes excluded type pairs after the selection: they still take up their rank."""
    config = CONFIG.replace(exclude_types=((0, 1),))
    rng = np.random.default_rng(5)
    positions, types = rng.random((30, 3)) * 6, rng.integers(0, 2, 30)
    graph = build_graph(positions, types, None, config, pad=False)
    full = build_graph(positions, types, None, CONFIG, pad=False)
    neighbors, mask = np.asarray(full.neighbors), np.asarray(full.neighbor_mask)
    expected = mask & (types[:, None] == types[neighbors])  # the (0, 1) and (1, 0) pairs are gone
    width = graph.max_neighbors
    assert not expected[:, width:].any()
    np.testing.assert_array_equal(graph.neighbor_mask, expected[:, :width])
    np.testing.assert_array_equal(np.asarray(graph.neighbors)[expected[:, :width]], neighbors[expected])
    assert expected.sum() < mask.sum()  # the test excluded something


def test_small_cell_sees_several_images_of_one_neighbour():
    cell = np.eye(3) * 2.0  # far below 2 r_c: many images of the same atom
    graph = build_graph(np.array([[0.0, 0, 0], [1.0, 1.0, 1.0]]), np.array([0, 1]), cell,
                        CONFIG.replace(e_sel=200), pad=False)
    from_atom_0 = np.asarray(graph.neighbors)[0][graph.neighbor_mask[0]]
    assert (from_atom_0 == 1).sum() > 8 and (from_atom_0 == 0).sum() > 8


def test_padding_is_masked_and_sizes_are_buckets():
    positions = np.random.default_rng(3).random((13, 3)) * 5
    graph = build_graph(positions, np.zeros(13, int), None, CONFIG)
    unpadded = build_graph(positions, np.zeros(13, int), None, CONFIG, pad=False)
    assert graph.n_atoms == bucket_size(13, minimum=16)
    assert graph.max_neighbors % 8 == 0 or graph.max_neighbors == CONFIG.e_sel
    assert graph.max_angle_neighbors % 8 == 0 or graph.max_angle_neighbors == CONFIG.a_sel
    assert (np.asarray(graph.types)[13:] == -1).all()
    assert np.asarray(graph.neighbor_mask).sum() == np.asarray(unpadded.neighbor_mask).sum()
    assert np.asarray(graph.angle_mask).sum() == np.asarray(unpadded.angle_mask).sum()


@given(st.integers(1, 10**6))
def test_bucket_size_wastes_at_most_an_eighth(n):
    size = bucket_size(n)
    assert size >= n and (size <= 8 or size <= n * 1.125 + 1)


@pytest.mark.parametrize(
    "positions, types, cell, message",
    [
        (np.zeros((2, 2)), [0, 0], None, "shape"),
        (np.array([[0.0, 0, 0], [np.nan, 0, 0]]), [0, 0], None, "atom 1"),
        (np.array([[0.0, 0, 0], [1e-6, 0, 0]]), [0, 0], None, "same position"),
        (np.array([[0.0, 0, 0], [1.0, 0, 0]]), [0, 5], None, "type index"),
        (np.array([[0.0, 0, 0], [1.0, 0, 0]]), [0], None, "types given for 2 atoms"),
        (np.array([[0.0, 0, 0], [1.0, 0, 0]]), [0, 0], np.array([[1.0, 0, 0], [2.0, 0, 0], [0, 0, 1.0]]), "singular"),
        (np.array([[0.0, 0, 0], [1.0, 0, 0]]), [0, 0], np.eye(2), "cell must have shape"),
    ],
)
def test_bad_structures_raise_clear_errors(positions, types, cell, message):
    with pytest.raises(Dpa3Error, match=message):
        build_graph(positions, np.asarray(types), cell, CONFIG)

"""Training statistics (dpa3_ref/stats.py): energy offsets, environment-matrix scales, their cache.

Oracles: numpy.linalg.lstsq for the least squares, and deepmd-kit's own numpy backend (3.2.0, installed with the
test extras) for the full rules: `deepmd.dpmodel.utils.stat.compute_output_stats` (per-atom labels first, the
least-squares fallback, absent types, change-by-statistic through `model_forward`), the dpmodel DPA3
descriptor's `compute_input_stats` (dstd with fix_stat_std = 0) and `merge_env_stat` (multitask merge).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import equinox as eqx
import h5py
import jax
import numpy as np
import pytest
from deepmd.dpmodel.model.model import get_model
from deepmd.dpmodel.utils.env_mat_stat import merge_env_stat
from deepmd.dpmodel.utils.stat import compute_output_stats

from dpa3_ref import stats
from dpa3_ref.config import DPA3Config
from dpa3_ref.data import System
from dpa3_ref.errors import Dpa3Error
from dpa3_ref.model import init_model
from dpa3_ref.switch import polynomial_switch

TINY = DPA3Config(
    type_map=("O", "H", "C"), n_dim=8, e_dim=4, a_dim=4, nlayers=1, e_sel=20, a_sel=8, e_rcut=4.0,
    e_rcut_smth=3.5, a_rcut=3.0, a_rcut_smth=2.5, axis_neuron=2, fitting_neuron=(8, 8),
)


def random_system(rng, names, n_frames, *, box=7.0, periodic=True, **extra):
    """Atoms spread on a jittered grid (no two closer than ~1 Å) in a cubic box, with random energies."""
    n = len(names) if names is not None else extra["frame_types"].shape[1]
    grid = np.stack(np.meshgrid(*[np.arange(3)] * 3, indexing="ij"), -1).reshape(-1, 3)[:n] * (box / 3)
    coord = grid + rng.uniform(-0.4, 0.4, (n_frames, n, 3))
    cell = np.tile(np.eye(3) * box, (n_frames, 1, 1)) if periodic else None
    return System(coord=coord, atom_names=None if names is None else list(names), cell=cell, source=Path("random"),
                        energy=rng.normal(-50, 5, n_frames), **extra)


# ------------------------------------------------------------------------------------------------ energy offsets


def test_energy_bias_is_the_least_squares_solution():
    rng = np.random.default_rng(1)
    counts = rng.integers(0, 20, (15, 3)).astype(float)
    truth = np.array([-93.5, -187.2, -12.25])
    energies = counts @ truth + rng.normal(0, 0.3, 15)
    bias = stats.energy_bias(counts, energies)
    np.testing.assert_allclose(bias, np.linalg.lstsq(counts, energies, rcond=None)[0], rtol=0, atol=1e-12)
    # noise-free labels are reproduced exactly (to the conditioning of a 15x3 integer matrix)
    np.testing.assert_allclose(stats.energy_bias(counts, counts @ truth), truth, rtol=1e-12)


def test_type_absent_from_the_data_gets_zero_and_leaves_the_others_alone():
    rng = np.random.default_rng(2)
    counts = rng.integers(1, 10, (8, 3)).astype(float)
    counts[:, 1] = 0
    energies = rng.normal(0, 10, 8)
    bias = stats.energy_bias(counts, energies)
    assert abs(bias[1]) < 1e-12  # minimum-norm solution: round-off at most
    present = np.linalg.lstsq(counts[:, [0, 2]], energies, rcond=None)[0]
    np.testing.assert_allclose(bias[[0, 2]], present, rtol=1e-10)


def test_per_atom_labels_take_priority_and_the_frames_fill_in():
    rng = np.random.default_rng(3)
    counts = rng.integers(1, 10, (6, 3)).astype(float)
    energies = counts @ np.array([1.0, 2.0, 3.0])
    atom_types = np.array([0, 0, 0, 1, 1])  # type 2 has no per-atom label
    atom_energies = np.array([10.0, 11.0, 12.0, -4.0, -6.0])
    bias = stats.energy_bias(counts, energies, atom_energies, atom_types)
    np.testing.assert_allclose(bias, [11.0, -5.0, 3.0], rtol=1e-12)  # means; type 2 from least squares
    only_atoms = stats.energy_bias(None, None, atom_energies, atom_types, ntypes=3)
    np.testing.assert_array_equal(only_atoms, [11.0, -5.0, 0.0])  # nothing to fall back on: 0


def test_counts_ignore_padding_atoms_and_follow_per_frame_types():
    types = np.array([[0, 1, 1, -1], [2, 2, 0, 1]])
    np.testing.assert_array_equal(stats.count_types(types, 3), [[1, 2, 0], [1, 1, 2]])


def _deepmd_sample(system, type_map, frames, atom_labels=True):
    """One system in the form deepmd-kit's statistics take (make_stat_input's dict of arrays)."""
    types = system.all_type_indices(type_map)[frames]
    counts = stats.count_types(types, len(type_map))
    sample = {
        "coord": system.coord[frames].reshape(len(frames), -1),
        "atype": types,
        "box": None if system.cell is None else system.cell[frames].reshape(len(frames), 9),
        "natoms": np.concatenate([np.full((len(frames), 2), system.n_atoms), counts], axis=1),
        "energy": system.energy[frames][:, None],
        "find_energy": 1.0,
    }
    if atom_labels and system.atom_energy is not None:
        sample["atom_energy"] = system.atom_energy[frames][..., None]
        sample["find_atom_energy"] = 1.0
    else:
        sample["atom_energy"] = np.zeros((len(frames), system.n_atoms, 1))
        sample["find_atom_energy"] = 0.0
    return sample


def labelled_systems(rng):
    """Three systems: one with per-atom labels (O, H only), two with total energies only; C only in the last."""
    water = random_system(rng, ["O", "H", "H"] * 3, 4, atom_energy=rng.normal(-5, 1, (4, 9)))
    hydroxyl = random_system(rng, ["O", "H"] * 4, 5)
    methanol = random_system(rng, ["C", "O", "H", "H", "H", "H"], 3, periodic=False)
    return [water, hydroxyl, methanol]


def test_energy_bias_matches_deepmd_kit_with_per_atom_labels_in_one_system():
    rng = np.random.default_rng(4)
    systems = labelled_systems(rng)
    frames = [np.array([0, 2, 3]), np.arange(5), np.array([1, 2])]
    labels = stats.energy_labels(systems, TINY.type_map, frames)
    ours = labels.bias()
    sampled = [_deepmd_sample(s, TINY.type_map, f) for s, f in zip(systems, frames, strict=True)]
    official, _ = compute_output_stats(sampled, ntypes=3, keys=["energy"])
    np.testing.assert_allclose(ours, official["energy"].ravel(), rtol=1e-13, atol=1e-13)


def test_energy_bias_matches_deepmd_kit_without_per_atom_labels():
    rng = np.random.default_rng(5)
    systems = labelled_systems(rng)[1:]
    labels = stats.energy_labels(systems, TINY.type_map)
    sampled = [_deepmd_sample(s, TINY.type_map, np.arange(s.n_frames)) for s in systems]
    official, _ = compute_output_stats(sampled, ntypes=3, keys=["energy"])
    np.testing.assert_allclose(labels.bias(), official["energy"].ravel(), rtol=1e-13, atol=1e-13)


def test_per_atom_labels_can_be_ignored_like_deepmd_kits_ener_training():
    rng = np.random.default_rng(14)
    systems = labelled_systems(rng)
    total_only = stats.energy_labels(systems, TINY.type_map, use_atom_energy=False)
    assert total_only.atom_energy.size == 0
    sampled = [_deepmd_sample(s, TINY.type_map, np.arange(s.n_frames), atom_labels=False) for s in systems]
    official, _ = compute_output_stats(sampled, ntypes=3, keys=["energy"])
    np.testing.assert_allclose(total_only.bias(), official["energy"].ravel(), rtol=1e-13, atol=1e-13)


def test_mixed_type_system_counts_each_frame_by_its_own_composition():
    rng = np.random.default_rng(6)
    # the system's own element order (C, H, O) differs from the model's (O, H, C); -1 is a virtual atom
    frame_types = np.array([[2, 1, 1, -1], [2, 2, 1, 0], [0, 0, 0, 1], [2, 1, 0, 0], [1, 1, 2, -1]])
    model_types = np.array([2, 1, 0, -1])[frame_types]
    truth = np.array([-3.0, -1.0, -7.0])
    system = random_system(rng, None, 5, frame_types=frame_types, elements=("C", "H", "O"))
    system = dataclasses.replace(system, energy=stats.count_types(model_types, 3) @ truth)
    np.testing.assert_allclose(stats.energy_labels([system], TINY.type_map).bias(), truth, rtol=1e-12)
    # virtual atoms take no part in the environment statistics either: same as the frames without them
    config = TINY.replace(fix_stat_std=0.0)
    real = [System(coord=system.coord[f:f + 1, kept], atom_names=[system.elements[t] for t in frame_types[f, kept]],
                   cell=system.cell[f:f + 1], source=Path("frame"))
            for f, kept in enumerate(frame_types >= 0)]
    np.testing.assert_allclose(stats.descriptor_statistics([system], config)[1],
                               stats.descriptor_statistics(real, config)[1], rtol=1e-13)


# ------------------------------------------------------------------------------------------------ fine-tuning


def test_change_by_statistic_recovers_a_known_offset_of_a_real_model():
    """Labels = a DPA3 model's energies with out_bias shifted by δ; the refit adds exactly δ back.

    The model is deepmd-kit's numpy DPA3 with random weights (no compilation, so the test is fast)."""
    rng = np.random.default_rng(7)
    model = get_model(TINY.to_deepmd())
    systems = labelled_systems(rng)
    delta = np.array([0.75, -0.25, 1.5])
    predicted, labels = [], []
    for system in systems:
        types = system.all_type_indices(TINY.type_map)
        box = None if system.cell is None else system.cell.reshape(-1, 9)
        energy = model.call(system.coord.reshape(system.n_frames, -1), types, box)["energy"].ravel()
        predicted.append(energy)
        labels.append(energy + stats.count_types(types, 3) @ delta)
    counts = stats.energy_labels(systems, TINY.type_map).counts
    change = stats.change_by_statistic(counts, np.concatenate(labels), np.concatenate(predicted))
    np.testing.assert_allclose(change, delta, rtol=0, atol=1e-10)


def test_change_by_statistic_matches_deepmd_kit_model_forward():
    """deepmd-kit subtracts the model's prediction (through `model_forward`) before the same fit."""
    rng = np.random.default_rng(8)
    systems = labelled_systems(rng)
    inherited = np.array([-2.0, -0.5, -4.0])  # per-type atom energy of a synthetic "model"

    def atom_prediction(atype):  # [nf, n] -> [nf, n, 1]: a bias plus a smooth per-atom part
        return (inherited[atype] + 0.01 * np.arange(atype.shape[1]))[..., None]

    def model_forward(coord, atype, box, **_):
        return {"energy": atom_prediction(atype)}

    sampled = [_deepmd_sample(s, TINY.type_map, np.arange(s.n_frames)) for s in systems]
    official, _ = compute_output_stats(sampled, ntypes=3, keys=["energy"], model_forward=model_forward)
    labels = stats.energy_labels(systems, TINY.type_map)
    atom_predicted = np.concatenate([atom_prediction(d["atype"])[..., 0][d["atype"] >= 0] for d in sampled[:1]])
    predicted = np.concatenate([atom_prediction(d["atype"])[..., 0].sum(1) for d in sampled])
    ours = stats.change_by_statistic(labels.counts, labels.energy, predicted, atom_types=labels.atom_types,
                                     atom_labels=labels.atom_energy, atom_predicted=atom_predicted)
    np.testing.assert_allclose(ours, official["energy"].ravel(), rtol=1e-13, atol=1e-13)


def test_set_by_statistic_is_the_fit_to_the_labels():
    rng = np.random.default_rng(9)
    counts = rng.integers(1, 10, (6, 2)).astype(float)
    energies = rng.normal(size=6)
    np.testing.assert_array_equal(stats.set_by_statistic(counts, energies), stats.energy_bias(counts, energies))


# ------------------------------------------------------------------------------------------------ which frames


def test_sample_frames_takes_nbatch_batches_per_system_or_all_frames():
    frames = stats.sample_frames([100, 7, 30], [2, 3, 1], data_stat_nbatch=10, seed=0)
    assert [len(f) for f in frames] == [20, 7, 10]  # min(nbatch * batch_size, n_frames)
    for chosen, n_frames in zip(frames, [100, 7, 30], strict=True):
        assert np.all(np.diff(chosen) > 0) and chosen.min() >= 0 and chosen.max() < n_frames
    np.testing.assert_array_equal(frames[1], np.arange(7))
    again = stats.sample_frames([100, 7, 30], [2, 3, 1], data_stat_nbatch=10, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(frames, again, strict=True))  # the seed decides
    other = stats.sample_frames([100, 7, 30], 2, data_stat_nbatch=10, seed=1)
    assert not np.array_equal(frames[0], other[0])


# ------------------------------------------------------------------------------------------------ descriptor


def _official_descriptor_stats(config, systems):
    """davg, dstd and the StatItem sums from deepmd-kit's dpmodel DPA3 descriptor (compute_input_stats)."""
    descriptor = get_model(config.to_deepmd()).atomic_model.descriptor
    descriptor.compute_input_stats([_deepmd_sample(s, config.type_map, np.arange(s.n_frames)) for s in systems])
    mean, std = descriptor.get_stat_mean_and_stddev()
    return np.asarray(mean[0]), np.asarray(std[0]), descriptor


@pytest.mark.parametrize("changes", [
    {},  # polynomial switch, periodic and open systems, type C only in the open one
    {"use_exp_switch": True, "env_protection": 0.1},  # the statistic still uses the polynomial switch
    {"exclude_types": ((0, 1),)},  # excluded pairs count as empty slots
])
def test_descriptor_statistics_match_deepmd_kit(changes):
    config = TINY.replace(fix_stat_std=0.0, **changes)
    systems = labelled_systems(np.random.default_rng(10))
    davg, dstd = stats.descriptor_statistics(systems, config)
    official_davg, official_dstd, _ = _official_descriptor_stats(config, systems)
    np.testing.assert_array_equal(davg, official_davg)
    np.testing.assert_allclose(dstd, official_dstd, rtol=1e-12, atol=0)


def test_host_switch_is_the_models_polynomial_switch():
    r = np.linspace(0.0, 5.0, 1001)
    np.testing.assert_allclose(stats.host_polynomial_switch(r, 3.5, 4.0), polynomial_switch(r, 3.5, 4.0),
                               rtol=0, atol=1e-15)


def test_descriptor_statistics_of_a_type_without_atoms_is_deepmd_kits_default():
    config = TINY.replace(fix_stat_std=0.0)
    systems = labelled_systems(np.random.default_rng(11))[:2]  # no carbon
    _, dstd = stats.descriptor_statistics(systems, config)
    np.testing.assert_array_equal(dstd[2], 0.1)
    assert np.all(dstd[:2] > 0.01)


def test_fixed_stat_std_computes_nothing():
    davg, dstd = stats.descriptor_statistics([], TINY)  # no data needed
    assert davg.shape == dstd.shape == (3, TINY.e_sel, 4)
    np.testing.assert_array_equal(davg, 0.0)
    np.testing.assert_array_equal(dstd, TINY.fix_stat_std)


def test_merged_statistics_pool_the_tasks_like_deepmd_kit():
    config = TINY.replace(fix_stat_std=0.0)
    systems = labelled_systems(np.random.default_rng(12))
    task_a, task_b = systems[:1], systems[1:]
    sums = [stats.environment_sums(task, config) for task in (task_a, task_b)]
    # unweighted (deepmd-kit's PyTorch trainer): the statistics of the union of the tasks' data
    _, pooled = stats.merge_descriptor_statistics(sums, config)
    np.testing.assert_allclose(pooled, stats.descriptor_statistics(systems, config)[1], rtol=1e-12)
    # weighted by model_prob: deepmd-kit's merge_env_stat(base, link, p_link / p_base)
    base = _official_descriptor_stats(config, task_a)[2]
    link = _official_descriptor_stats(config, task_b)[2]
    merge_env_stat(base.repflows, link.repflows, 0.3 / 0.7)
    _, weighted = stats.merge_descriptor_statistics(sums, config, weights=[0.7, 0.3])
    np.testing.assert_allclose(weighted, np.asarray(base.get_stat_mean_and_stddev()[1][0]), rtol=1e-12)


def test_statistics_go_into_the_model_in_its_own_dtypes():
    # only shapes and dtypes matter here: a model skeleton, no weights (which would cost a compilation)
    model = eqx.filter_eval_shape(init_model, TINY.replace(precision="float32", fix_stat_std=0.0),
                                  key=jax.random.key(0))
    systems = labelled_systems(np.random.default_rng(15))
    task = stats.task_statistics(systems, model.config)
    davg, dstd = task.davg_dstd(model.config)
    updated = stats.with_statistics(model, out_bias=task.out_bias, davg=davg, dstd=dstd)
    assert updated.out_bias.dtype == np.float64 and updated.descriptor.dstd.dtype == np.float32
    np.testing.assert_array_equal(updated.out_bias, task.out_bias)
    np.testing.assert_allclose(updated.descriptor.dstd, dstd, rtol=1e-7)
    with pytest.raises(Dpa3Error, match="dstd has shape"):
        stats.with_statistics(model, dstd=dstd[:, :3])


# ------------------------------------------------------------------------------------------------ the stat file


def test_stat_file_round_trip_and_invalidation(tmp_path):
    stat_file = stats.StatFile(tmp_path / "stat.h5")
    arrays = {"out_bias": np.array([-93.5, -187.25])}
    calls = []

    def compute():
        calls.append(1)
        return arrays

    first = stat_file.load_or_compute("water", ("O", "H"), "energy_bias", "abc", compute)
    second = stat_file.load_or_compute("water", ("O", "H"), "energy_bias", "abc", compute)
    assert len(calls) == 1  # the second run read the file
    np.testing.assert_array_equal(second["out_bias"], first["out_bias"])
    assert stat_file.load("water", ("O", "H"), "energy_bias", "other data") is None  # stale: recompute
    assert stat_file.load("water", ("H", "O"), "energy_bias", "abc") is None  # another type map
    assert stat_file.load("molecules", ("O", "H"), "energy_bias", "abc") is None  # another head
    stat_file.load_or_compute("water", ("O", "H"), "energy_bias", "new", lambda: {"out_bias": np.zeros(2)})
    np.testing.assert_array_equal(stat_file.load("water", ("O", "H"), "energy_bias", "new")["out_bias"], 0.0)


def test_stat_file_write_is_atomic(tmp_path, monkeypatch):
    stat_file = stats.StatFile(tmp_path / "stat.h5")
    stat_file.save("a", ("O",), "energy_bias", "x", {"out_bias": np.ones(1)})
    before = (tmp_path / "stat.h5").read_bytes()

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(h5py.Group, "create_dataset", fail)
    with pytest.raises(KeyboardInterrupt):
        stat_file.save("b", ("O",), "energy_bias", "y", {"out_bias": np.zeros(1)})
    assert (tmp_path / "stat.h5").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["stat.h5"]  # no temporary file left behind


def test_stat_file_directory_path_and_deepmd_content_kept(tmp_path):
    with h5py.File(tmp_path / "deepmd.hdf5", "w") as file:  # what deepmd-kit writes there
        file.create_dataset("O H/bias_atom_energy", data=np.ones((2, 1)))
    stats.StatFile(tmp_path / "deepmd.hdf5").save("Default", ("O", "H"), "energy_bias", "x", {"out_bias": np.ones(2)})
    with h5py.File(tmp_path / "deepmd.hdf5", "r") as file:
        assert "O H/bias_atom_energy" in file
    assert stats.StatFile(tmp_path / "stat_dir").path == tmp_path / "stat_dir" / "dpa3_ref_stat.h5"


def test_task_statistics_are_read_back_on_a_second_run(tmp_path, monkeypatch):
    config = TINY.replace(fix_stat_std=0.0)
    systems = labelled_systems(np.random.default_rng(13))
    stat_file = stats.StatFile(tmp_path / "stat.h5")
    first = stats.task_statistics(systems, config, stat_file=stat_file, head="water")

    def must_not_run(*args, **kwargs):
        raise AssertionError("statistics recomputed although cached")

    with monkeypatch.context() as patch:
        patch.setattr(stats, "environment_sums", must_not_run)
        patch.setattr(stats, "energy_labels", must_not_run)
        second = stats.task_statistics(systems, config, stat_file=stat_file, head="water")
    np.testing.assert_array_equal(second.out_bias, first.out_bias)
    np.testing.assert_array_equal(second.davg_dstd(config)[1], first.davg_dstd(config)[1])
    # changed labels: the cached offsets are stale and are recomputed
    changed = [dataclasses.replace(systems[0], energy=systems[0].energy + 1.0), *systems[1:]]
    third = stats.task_statistics(changed, config, stat_file=stat_file, head="water")
    assert not np.allclose(third.out_bias, first.out_bias)
    np.testing.assert_allclose(third.out_bias, stats.energy_labels(changed, config.type_map).bias(), rtol=1e-13)

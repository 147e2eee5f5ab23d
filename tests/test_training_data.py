"""Training data: every deepmd/npy layout and extxyz, the checks before training, deepmd-kit's batch-size and
system-probability rules (deepmd-kit's own functions as the oracle), the data order and its restart, batches."""

import json
import warnings
from pathlib import Path

import equinox as eqx
import jax
import numpy as np
import pytest
from scipy import stats

from dpa3_ref.batches import (
    Sampler,
    batches_per_epoch,
    make_batch,
    resolve_batch_size,
    resolve_batch_sizes,
    system_probabilities,
    validation_batches,
)
from dpa3_ref.config import DPA3Config
from dpa3_ref.data import dataset_paths, read_system, read_systems
from dpa3_ref.errors import Dpa3Error
from dpa3_ref.model import energy_forces_virial, init_model
from dpa3_ref.neighbors import build_graph
from tests.shared_paths import DATA, needs_shared

_energy_forces_virial = eqx.filter_jit(energy_forces_virial)  # one compilation per shape, far faster than eager
TINY = DPA3Config(type_map=("O", "H"), n_dim=8, e_dim=4, a_dim=4, nlayers=1, e_sel=20, a_sel=8, e_rcut=4.0,
                  e_rcut_smth=3.5, a_rcut=3.0, a_rcut_smth=2.5, axis_neuron=2, fitting_neuron=(8, 8))


# --------------------------------------------------------------------------- writing tiny systems
def write_system(directory: Path, *, frames_per_set=(3,), n_atoms=4, type_map=("O", "H"), types=None,
                 periodic=True, labels=("energy", "force"), real_atom_types=None, seed=0) -> dict:
    """A deepmd/npy system with random coordinates and labels; returns the arrays written, all sets stacked.
    `real_atom_types` [nf, n] (indices into type_map, -1 virtual) writes the mixed-type layout."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    if type_map is not None:
        (directory / "type_map.raw").write_text("\n".join(type_map) + "\n")
    types = [atom % 2 for atom in range(n_atoms)] if types is None else types
    (directory / "type.raw").write_text("".join(f"{t}\n" for t in types))
    if not periodic:
        (directory / "nopbc").touch()
    n_frames = sum(frames_per_set)
    written = {
        "coord": rng.uniform(0, 6, (n_frames, n_atoms, 3)),
        "box": np.tile(6.0 * np.eye(3), (n_frames, 1, 1)) + rng.uniform(-0.1, 0.1, (n_frames, 3, 3)),
        "energy": rng.normal(size=n_frames),
        "force": rng.normal(size=(n_frames, n_atoms, 3)),
        "virial": rng.normal(size=(n_frames, 3, 3)),
        "atom_ener": rng.normal(size=(n_frames, n_atoms)),
    }
    if real_atom_types is not None:
        written["real_atom_types"] = np.asarray(real_atom_types)
    start = 0
    for index, count in enumerate(frames_per_set):
        set_dir = directory / f"set.{index:03d}"
        set_dir.mkdir()
        keys = ["coord"] + (["box"] if periodic else []) + list(labels)
        keys += ["real_atom_types"] if real_atom_types is not None else []
        for key in keys:
            array = written[key][start:start + count]
            np.save(set_dir / f"{key}.npy", array.reshape(count, -1) if key != "energy" else array)
        start += count
    return written


# --------------------------------------------------------------------------- layouts
def test_fixed_layout_with_every_label_concatenates_the_sets(tmp_path):
    written = write_system(tmp_path, frames_per_set=(2, 3), labels=("energy", "force", "virial", "atom_ener"))
    system = read_system(tmp_path)
    assert not system.is_mixed_type and system.atom_names == ["O", "H", "O", "H"]
    np.testing.assert_array_equal(system.coord, written["coord"])
    np.testing.assert_array_equal(system.cell, written["box"])
    np.testing.assert_array_equal(system.energy, written["energy"])
    np.testing.assert_array_equal(system.forces, written["force"])
    np.testing.assert_array_equal(system.virial, written["virial"])
    np.testing.assert_array_equal(system.atom_energy, written["atom_ener"])
    # model type map in another order: mapped by name
    np.testing.assert_array_equal(system.frame_type_indices(4, ["H", "O"]), [1, 0, 1, 0])
    np.testing.assert_array_equal(system.type_counts(["H", "O"]), np.tile([2, 2], (5, 1)))


def test_open_boundaries_without_virial_or_atom_energy(tmp_path):
    write_system(tmp_path, periodic=False)
    system = read_system(tmp_path)
    assert system.cell is None and system.virial is None and system.atom_energy is None
    assert system.energy.shape == (3,) and system.forces.shape == (3, 4, 3)


def test_one_frame_set_stored_without_the_frame_axis(tmp_path):
    written = write_system(tmp_path, frames_per_set=(1,), n_atoms=2)
    np.save(tmp_path / "set.000" / "coord.npy", written["coord"].ravel())  # (6,), as deepmd-kit accepts
    np.save(tmp_path / "set.000" / "energy.npy", written["energy"][0])  # 0-d
    system = read_system(tmp_path)
    np.testing.assert_array_equal(system.coord, written["coord"])
    np.testing.assert_array_equal(system.energy, written["energy"])


def test_mixed_type_layout_maps_per_frame_types_by_name_like_deepmd_kit(tmp_path):
    """Frames of different compositions in one system; -1 marks virtual atoms. deepmd-kit's own reader
    (DeepmdData of its numpy package) maps the same file onto the model's type map: the oracle."""
    from deepmd.utils.data import DeepmdData

    real_types = np.array([[0, 1, 2, -1], [2, 2, 0, 1], [1, -1, -1, 0], [0, 0, 0, 0], [2, 1, -1, 0]])
    write_system(tmp_path, frames_per_set=(3, 2), type_map=("H", "O", "C"), types=[0, 0, 0, 0],
                 real_atom_types=real_types, labels=("energy", "force", "atom_ener"))
    model_type_map = ["O", "H", "C"]
    system = read_system(tmp_path)
    assert system.is_mixed_type and system.atom_names is None and system.elements == ("H", "O", "C")
    ours = system.all_type_indices(model_type_map)  # [5, 4]
    official = DeepmdData(str(tmp_path), type_map=model_type_map)
    theirs = np.concatenate([official._load_set(d)["type"] for d in official.dirs])
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(system.frame_type_indices(2, model_type_map), [0, -1, -1, 1])  # O, -, -, H
    np.testing.assert_array_equal(system.n_real_atoms, [3, 4, 2, 4, 3])
    np.testing.assert_array_equal(system.type_counts(model_type_map)[0], [1, 1, 1])  # O, H, C of frame 0
    with pytest.raises(Dpa3Error, match="composition changes from frame to frame"):
        system.type_indices(model_type_map)


def test_without_type_map_raw_the_types_index_the_models_type_map(tmp_path):
    write_system(tmp_path, type_map=None, types=[1, 1, 0, 1])
    assert read_system(tmp_path, type_map=["C", "H"]).atom_names == ["H", "H", "C", "H"]
    with pytest.raises(Dpa3Error, match="type_map.raw is missing"):
        read_system(tmp_path)


def test_extxyz_virial_in_the_info_line_and_per_atom_energies(tmp_path):
    import ase.io
    from ase.build import bulk
    from ase.calculators.singlepoint import SinglePointCalculator

    frames = []
    for index in range(2):
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
        atoms.calc = SinglePointCalculator(atoms, energy=-1.0 - index, forces=np.full((4, 3), 0.1 * index),
                                           energies=np.arange(4.0) + index)
        atoms.info["virial"] = np.arange(9.0).reshape(3, 3) + index  # deepmd convention, eV
        frames.append(atoms)
    ase.io.write(tmp_path / "cu.extxyz", frames)
    system = read_system(tmp_path / "cu.extxyz")
    np.testing.assert_allclose(system.virial, [np.arange(9.0).reshape(3, 3) + i for i in range(2)])
    np.testing.assert_allclose(system.atom_energy, [np.arange(4.0), np.arange(4.0) + 1])
    np.testing.assert_allclose(system.energy, [-1.0, -2.0])


def test_extxyz_frames_of_different_compositions_become_a_mixed_system(tmp_path):
    import ase.io
    from ase.build import molecule

    ase.io.write(tmp_path / "mols.xyz", [molecule("H2O"), molecule("CH4")[:3]], format="extxyz")
    system = read_system(tmp_path / "mols.xyz")
    assert system.is_mixed_type
    np.testing.assert_array_equal(system.all_type_indices(["C", "H", "O"]), [[2, 1, 1], [0, 1, 1]])


# --------------------------------------------------------------------------- checks before training
@pytest.mark.parametrize(("label", "message"), [
    ("energy", r"non-finite energy label in frame 1"),
    ("force", r"non-finite forces label in frame 1, atom 2"),
    ("virial", r"non-finite virial label in frame 1, row 2"),
    ("atom_ener", r"non-finite atom_energy label in frame 1, atom 2"),
])
def test_nan_or_inf_label_is_named_with_frame_and_atom(tmp_path, label, message):
    written = write_system(tmp_path, labels=("energy", "force", "virial", "atom_ener"))
    array = written[label].copy()  # [3, ...]
    if label == "energy":
        array[1] = np.nan
    else:
        array[1, 2] = np.inf  # atom 2 (forces, atom energies) or row 2 (virial)
    np.save(tmp_path / "set.000" / f"{label}.npy", array.reshape(3, -1) if label != "energy" else array)
    with pytest.raises(Dpa3Error, match=f"{tmp_path}: {message}"):
        read_system(tmp_path)


def test_atom_energy_of_the_wrong_shape_names_the_file(tmp_path):
    write_system(tmp_path)
    np.save(tmp_path / "set.000" / "atom_ener.npy", np.zeros((3, 5)))
    with pytest.raises(Dpa3Error, match=r"atom_ener.npy: shape \(3, 5\) .*expected \(3, 4\)"):
        read_system(tmp_path)


def test_label_in_some_sets_only_names_the_sets_without_it(tmp_path):
    write_system(tmp_path, frames_per_set=(2, 2), labels=("energy", "virial"))
    (tmp_path / "set.001" / "virial.npy").unlink()
    with pytest.raises(Dpa3Error, match=r"virial.npy \(virial\) is given in some sets but missing in .*set.001"):
        read_system(tmp_path)


def test_system_without_frames_is_refused(tmp_path):
    write_system(tmp_path, frames_per_set=(2,))
    np.save(tmp_path / "set.000" / "coord.npy", np.zeros((0, 12)))
    with pytest.raises(Dpa3Error, match="coord.npy: the set has no frames"):
        read_system(tmp_path)


def test_system_without_atoms_is_refused(tmp_path):
    write_system(tmp_path)
    (tmp_path / "type.raw").write_text("")
    with pytest.raises(Dpa3Error, match="type.raw: the system has no atoms"):
        read_system(tmp_path)


def test_mixed_type_file_in_some_sets_only(tmp_path):
    write_system(tmp_path, frames_per_set=(1, 1), real_atom_types=np.zeros((2, 4), int))
    (tmp_path / "set.001" / "real_atom_types.npy").unlink()
    with pytest.raises(Dpa3Error, match="real_atom_types.npy is given in some sets but missing in .*set.001"):
        read_system(tmp_path)


def test_mixed_type_index_outside_the_type_map_names_frame_and_atom(tmp_path):
    write_system(tmp_path, frames_per_set=(2,), real_atom_types=[[0, 1, 0, 1], [0, 1, 2, 1]])
    with pytest.raises(Dpa3Error, match=r"frame 1, atom 2 has type 2, but the type map names 2 elements"):
        read_system(tmp_path)


def test_frame_of_only_virtual_atoms_is_refused(tmp_path):
    write_system(tmp_path, frames_per_set=(2,), real_atom_types=[[0, 1, 0, 1], [-1, -1, -1, -1]])
    with pytest.raises(Dpa3Error, match="frame 1 has only virtual atoms"):
        read_system(tmp_path)


def test_unknown_element_is_reported_before_training_with_the_file(tmp_path):
    write_system(tmp_path / "fixed", type_map=("O", "Cu"))
    with pytest.raises(Dpa3Error, match=r"fixed: element 'Cu' \(atom 1\) is not in the model's type map"):
        read_systems([tmp_path / "fixed"], ["O", "H"])
    # mixed layout: only elements that occur count; this one first occurs in frame 1, atom 3
    write_system(tmp_path / "mixed", frames_per_set=(2,), type_map=("O", "H", "Cu"),
                 real_atom_types=[[0, 1, 0, 1], [0, 1, 0, 2]])
    with pytest.raises(Dpa3Error, match=r"mixed: element 'Cu' \(frame 1, atom 3\) is not in the model's type map"):
        read_systems([tmp_path / "mixed"], ["O", "H"])
    write_system(tmp_path / "unused", frames_per_set=(1,), type_map=("O", "H", "Cu"), real_atom_types=[[0, 1, 0, 1]])
    assert len(read_systems([tmp_path / "unused"], ["O", "H"])) == 1


def test_dataset_paths_expand_directories_and_globs_in_the_order_given(tmp_path):
    for name in ("b/sys1", "b/sys0", "a/sys0", "c"):
        write_system(tmp_path / name, frames_per_set=(1,))
    found = dataset_paths([str(tmp_path / "c"), tmp_path / "b", str(tmp_path / "a*")])
    assert found == [tmp_path / "c", tmp_path / "b" / "sys0", tmp_path / "b" / "sys1", tmp_path / "a" / "sys0"]
    assert [s.source for s in read_systems(str(tmp_path / "b"), ["O", "H"])] == found[1:3]


@pytest.mark.parametrize(("paths", "message"), [
    (["missing"], "missing: no such file or directory"),
    (["nothing*"], r"nothing\*: the pattern matches no file or directory"),
    (["empty"], "empty: no deepmd/npy system"),
    ([], "the list of systems is empty"),
])
def test_dataset_path_errors_name_the_path(tmp_path, paths, message):
    (tmp_path / "empty").mkdir()
    with pytest.raises(Dpa3Error, match=message):
        read_systems([str(tmp_path / p) for p in paths], ["O", "H"])


@needs_shared
def test_the_shared_datasets_read_and_check_as_one_dataset():
    water = read_systems(DATA / "water", ["O", "H"])
    assert [s.source.name for s in water] == ["data_0", "data_1", "data_2", "data_3"]
    assert resolve_batch_sizes("auto", [s.n_atoms for s in water]) == [1, 1, 1, 1]  # 192 atoms ≥ 32
    molecules = read_systems([DATA / "nopbc_molecules"], ["H", "C", "O"])
    assert [s.cell for s in molecules] == [None, None, None]
    np.testing.assert_array_equal(molecules[0].type_counts(["H", "C", "O"])[0], [4, 1, 2])  # C1H4O2


# --------------------------------------------------------------------------- batch sizes: deepmd-kit's own rules
@pytest.mark.parametrize("rule", ["auto", "auto:7", "auto:100", "max:10", "max:2", 3, [2, 1, 4, 1, 5]])
def test_batch_sizes_equal_deepmd_kits(tmp_path, rule):
    from deepmd.utils.data_system import DeepmdDataSystem

    atom_counts = [1, 3, 5, 32, 33]
    paths = []
    for n_atoms in atom_counts:
        write_system(tmp_path / f"n{n_atoms}", frames_per_set=(1,), n_atoms=n_atoms)
        paths.append(str(tmp_path / f"n{n_atoms}"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deepmd-kit warns that the batch is larger than the one-frame set
        official = DeepmdDataSystem(paths, batch_size=rule, test_size=1)
    assert resolve_batch_sizes(rule, atom_counts) == [int(b) for b in official.batch_size]


def test_auto_batch_size_is_the_smallest_covering_32_atoms():
    assert resolve_batch_size("auto", 192) == 1 and resolve_batch_size("auto", 31) == 2
    assert resolve_batch_size("auto", 32) == 1 and resolve_batch_size("auto", 3) == 11  # 11·3 = 33 ≥ 32 > 30


@pytest.mark.parametrize("rule", ["filter:10", "auto:", "auto:x", "max", "mixed:4", 0, 2.5, True])
def test_unsupported_batch_size_rules_are_refused(rule):
    with pytest.raises(Dpa3Error, match="batch_size"):
        resolve_batch_size(rule, 4)


def test_the_last_batch_of_an_epoch_is_kept_smaller():
    assert batches_per_epoch(7, 3) == 3 and batches_per_epoch(6, 3) == 2 and batches_per_epoch(1, 4) == 1


# --------------------------------------------------------------------------- system probabilities
N_BATCHES = [3, 1, 4, 1, 5]


@pytest.mark.parametrize("style", ["prob_sys_size", "prob_sys_size;0:2:0.3;2:5:0.7", "prob_sys_size;1:4:2.0"])
def test_probabilities_by_size_equal_deepmd_kits(style):
    from deepmd.utils.data_system import prob_sys_size_ext

    full = style if ";" in style else f"prob_sys_size;0:{len(N_BATCHES)}:1.0"  # as deepmd-kit rewrites it
    expected = prob_sys_size_ext(full, len(N_BATCHES), np.array(N_BATCHES))
    np.testing.assert_allclose(system_probabilities(N_BATCHES, style), expected, rtol=1e-15)


@pytest.mark.parametrize("sys_probs", [[0.1, 0.2, 0.3, 0.15, 0.25], [0.5, -1, -1, 0.2, -1], [-1, -1, -1, -1, -1]])
def test_assigned_probabilities_equal_deepmd_kits(sys_probs):
    from deepmd.utils.data_system import process_sys_probs

    expected = process_sys_probs(sys_probs, np.array(N_BATCHES))
    np.testing.assert_allclose(system_probabilities(N_BATCHES, "prob_uniform", sys_probs), expected, rtol=1e-15)


def test_uniform_probabilities():
    np.testing.assert_array_equal(system_probabilities(N_BATCHES, "prob_uniform"), np.full(5, 0.2))


@pytest.mark.parametrize(("auto_prob", "sys_probs", "message"), [
    ("prob_size", None, "auto_prob 'prob_size' is not one of"),
    ("prob_sys_size;0:9:1", None, "block 0:9:1.0 needs"),
    ("prob_sys_size;0:2", None, "is not start:end:weight"),
    ("prob_sys_size", [0.5, 0.5, 0.5, -1, -1], "assign 1.5 > 1"),
    ("prob_sys_size", [0.1, 0.1, 0.1, 0.1, 0.1], "sum to 0.5, not 1"),
    ("prob_sys_size", [0.5, 0.5], "2 entries for 5 systems"),
])
def test_bad_probability_settings_are_refused(auto_prob, sys_probs, message):
    with pytest.raises(Dpa3Error, match=message):
        system_probabilities(N_BATCHES, auto_prob, sys_probs)


# --------------------------------------------------------------------------- the data order
def test_systems_are_drawn_with_their_probabilities():
    """Pearson's chi-square test of 10,000 draws against p; threshold at a false-alarm rate of 1e-4 (the
    probability that a correct sampler with a fresh seed fails this test)."""
    probabilities = np.array([0.1, 0.2, 0.3, 0.4])
    sampler = Sampler([10, 10, 10, 10], [2, 2, 2, 2], probabilities, seed=7)
    n_draws = 10_000
    counts = np.bincount([sampler.next_batch()[0] for _ in range(n_draws)], minlength=4)
    chi_square = np.sum((counts - n_draws * probabilities) ** 2 / (n_draws * probabilities))
    assert chi_square < stats.chi2.ppf(1 - 1e-4, df=3)


def test_each_epoch_visits_every_frame_once_and_is_reshuffled():
    sampler = Sampler([7], [3], [1.0], seed=3)
    epochs = []
    for _ in range(4):
        batches = [sampler.next_batch()[1] for _ in range(3)]
        assert [len(b) for b in batches] == [3, 3, 1]  # the last, incomplete batch is kept
        epochs.append(np.concatenate(batches))
        assert sorted(epochs[-1]) == list(range(7))
    assert len({tuple(e) for e in epochs}) > 1  # 4 epochs in one order: probability (1/7!)^3


def test_restart_from_the_saved_state_continues_the_same_order():
    n_frames, sizes = [5, 8, 3], [2, 3, 1]
    probabilities = system_probabilities([batches_per_epoch(n, b) for n, b in zip(n_frames, sizes)])
    uninterrupted = Sampler(n_frames, sizes, probabilities, seed=11)
    straight = [uninterrupted.next_batch() for _ in range(50)]

    first = Sampler(n_frames, sizes, probabilities, seed=11)
    before = [first.next_batch() for _ in range(23)]
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
    resumed = Sampler(n_frames, sizes, probabilities, seed=11)
    resumed.load_state(state)
    after = [resumed.next_batch() for _ in range(27)]
    for (s1, f1), (s2, f2) in zip(straight, before + after, strict=True):
        assert s1 == s2 and np.array_equal(f1, f2)
    rebuilt = Sampler.from_state(state)  # the state alone is enough
    assert [(s, f.tolist()) for s, f in (rebuilt.next_batch() for _ in range(27))] == \
        [(s, f.tolist()) for s, f in after]


def test_restoring_onto_other_data_is_refused():
    state = Sampler([5, 8], [2, 3], [0.5, 0.5], seed=1).state_dict()
    with pytest.raises(Dpa3Error, match="n_frames .* changed since the checkpoint"):
        Sampler([5, 9], [2, 3], [0.5, 0.5], seed=1).load_state(state)


def test_validation_batches_are_the_first_batches_of_every_system_in_order():
    batches = [(s, f.tolist()) for s, f in validation_batches([5, 2], [2, 3], numb_btch=2)]
    assert batches == [(0, [0, 1]), (0, [2, 3]), (1, [0, 1])]


# --------------------------------------------------------------------------- batches
@pytest.fixture(scope="module")
def tiny_model():
    return init_model(TINY, key=jax.random.key(0))


def _mixed_water(directory: Path) -> None:
    real_types = [[0, 1, 1, 0, 1, 1], [0, 1, 1, -1, -1, -1], [1, 1, 0, 0, -1, 1]]  # type_map.raw: O, H
    write_system(directory, frames_per_set=(3,), n_atoms=6, types=[0] * 6, real_atom_types=real_types,
                 labels=("energy", "force", "atom_ener"), seed=5)


def test_padded_batch_energies_equal_frame_by_frame_evaluation(tmp_path, tiny_model):
    _mixed_water(tmp_path)
    system = read_system(tmp_path)
    frames = np.array([2, 0, 1])
    graph, _ = make_batch(system, frames, TINY)
    assert graph.n_frames == 3 and graph.n_atoms >= 5 + 6 + 3  # virtual atoms left out, then padded
    batched = _energy_forces_virial(tiny_model, graph)
    start = 0
    for k, frame in enumerate(frames):
        types = system.frame_type_indices(frame, TINY.type_map)
        real = types >= 0
        single = _energy_forces_virial(tiny_model, build_graph(system.coord[frame][real], types[real],
                                                              system.cell[frame], TINY, pad=False))
        n_real = int(real.sum())
        # the same sums in another order: round-off only (energies ~1 eV, float64)
        np.testing.assert_allclose(batched["energy"][k], single["energy"][0], rtol=0, atol=1e-12)
        np.testing.assert_allclose(batched["forces"][start:start + n_real], single["forces"], rtol=0, atol=1e-12)
        np.testing.assert_allclose(batched["virial"][k], single["virial"][0], rtol=0, atol=1e-12)
        start += n_real
    np.testing.assert_array_equal(batched["forces"][start:], 0.0)  # padding atoms feel no force


def test_sticky_widths_pad_further_without_changing_the_energies(tmp_path, tiny_model):
    _mixed_water(tmp_path)
    system = read_system(tmp_path)
    graph, _ = make_batch(system, np.array([0, 1]), TINY)
    wide, labels = make_batch(system, np.array([0, 1]), TINY, widths=(graph.n_atoms + 8, 20, 8))
    assert (wide.n_atoms, wide.max_neighbors, wide.max_angle_neighbors) == (graph.n_atoms + 8, 20, 8)
    assert labels.forces.shape == (wide.n_atoms, 3)
    np.testing.assert_allclose(_energy_forces_virial(tiny_model, wide)["energy"],
                               _energy_forces_virial(tiny_model, graph)["energy"], rtol=0, atol=1e-12)


def test_labels_follow_the_graphs_atoms_and_mask_the_padding(tmp_path):
    _mixed_water(tmp_path)
    system = read_system(tmp_path)
    frames = np.array([1, 2])
    graph, labels = make_batch(system, frames, TINY)
    real = system.real_atom_mask[frames]  # [2, 6]: 3 and 5 real atoms
    n_real = 8
    np.testing.assert_array_equal(labels.n_atoms, [3.0, 5.0])
    np.testing.assert_array_equal(labels.atom_mask, np.arange(graph.n_atoms) < n_real)
    np.testing.assert_array_equal(labels.atom_mask, np.asarray(graph.types) >= 0)
    np.testing.assert_array_equal(labels.forces[:n_real], system.forces[frames][real])
    np.testing.assert_array_equal(labels.atom_energy[:n_real], system.atom_energy[frames][real])
    np.testing.assert_array_equal(labels.forces[n_real:], 0.0)
    np.testing.assert_array_equal(labels.energy, system.energy[frames])
    # positions and types in the graph are those of the same atoms, in the same order
    np.testing.assert_array_equal(np.asarray(graph.positions)[:n_real], system.coord[frames][real])
    np.testing.assert_array_equal(np.asarray(graph.atom_frame)[:n_real], [0] * 3 + [1] * 5)
    assert (labels.find_energy, labels.find_forces, labels.find_atom_energy, labels.find_virial) == (1, 1, 1, 0)
    np.testing.assert_array_equal(labels.virial, np.zeros((2, 3, 3)))
    assert labels.energy.dtype == labels.forces.dtype == labels.n_atoms.dtype == np.float64

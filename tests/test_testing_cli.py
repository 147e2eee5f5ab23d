"""`dpa3 test`: dp test's errors, checked on labels made from the model's own predictions plus known noise.

Each labelled system is written as label = prediction − noise (the prediction from one
`Potential.evaluate_batch` of all its frames), so every error `dpa3 test` reports must equal a numpy
statistic of the noise: MAE = mean |noise|, RMSE = sqrt(mean noise²), per atom with noise / N, and over
several systems the statistic of all their noise pooled (deepmd-kit 3.2.0, deepmd/utils/weight_avg.py: the
pooled value is what dp test's weighted average reproduces). Tolerance 1e-9 relative: the labels are stored
in float64, so the only difference is summation round-off. Most systems have 4 frames of 3 or 6 atoms: few
shapes, few compilations. One test compares with the numbers deepmd-kit's own `dp test` printed on water frames.
"""

import shutil
from pathlib import Path

import numpy as np
import pytest

from dpa3_ref import DPA3Config, Potential, load
from dpa3_ref import cli
from dpa3_ref.data import read_system
from dpa3_ref.testing import score_systems
from tests.shared_paths import SHARED, needs_shared

TOLERANCE = dict(rtol=1e-9, atol=1e-12)
TINY = DPA3Config(type_map=("O", "H"), n_dim=8, e_dim=4, a_dim=4, nlayers=1, e_sel=20, a_sel=8, e_rcut=4.0,
                  e_rcut_smth=3.5, a_rcut=3.0, a_rcut_smth=2.5, axis_neuron=2, fitting_neuron=(8, 8))


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny.npz"
    Potential.init(TINY, seed=3).save(path)
    return path


@pytest.fixture(scope="module")
def potential(model_file) -> Potential:
    return load(model_file)


@pytest.fixture(autouse=True)
def _test_subcommand_registered(monkeypatch):
    """Register `dpa3 test` for these tests if cli.py does not list it yet."""
    if "test" not in cli.SUBCOMMANDS:
        monkeypatch.setitem(cli.SUBCOMMANDS, "test", ("dpa3_ref.testing", "errors of a model on labelled systems"))


# --------------------------------------------------------------------------- labelled systems with known errors
def structures(n_frames: int, names: list[str], periodic: bool, seed: int):
    """Jittered grid positions (no two atoms closer than ~1 Å) in a 4.5 Å cubic box, or without one."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(3)] * 3, indexing="ij"), axis=-1).reshape(-1, 3) * 1.5  # [27, 3]
    coord = np.stack([grid[rng.permutation(27)[: len(names)]] + rng.uniform(-0.2, 0.2, (len(names), 3))
                      for _ in range(n_frames)])  # [nf, n, 3]
    cell = np.tile(4.5 * np.eye(3), (n_frames, 1, 1)) if periodic else None
    return coord, cell


def make_labelled_system(directory: Path, potential: Potential, names: list[str], *, n_frames: int,
                         periodic: bool = True, labels=("energy", "forces", "virial"), seed: int = 0) -> dict:
    """A deepmd/npy system whose labels are the model's predictions minus random noise; returns the noise."""
    coord, cell = structures(n_frames, names, periodic, seed)
    predicted = potential.evaluate_batch([(coord[f], names, None if cell is None else cell[f])
                                          for f in range(n_frames)])
    rng = np.random.default_rng(seed + 100)
    noise = {"energy": rng.normal(0, 0.3, n_frames), "virial": rng.normal(0, 0.2, (n_frames, 3, 3)),
             "forces": rng.normal(0, 0.1, (n_frames, len(names), 3))}  # a seed gives the same e, v for any size
    files = {"energy": "energy.npy", "forces": "force.npy", "virial": "virial.npy"}
    set_dir = directory / "set.000"
    set_dir.mkdir(parents=True)
    type_map = sorted(set(names))
    (directory / "type_map.raw").write_text("\n".join(type_map) + "\n")
    (directory / "type.raw").write_text("\n".join(str(type_map.index(name)) for name in names) + "\n")
    if not periodic:
        (directory / "nopbc").touch()
    np.save(set_dir / "coord.npy", coord.reshape(n_frames, -1))
    if periodic:
        np.save(set_dir / "box.npy", cell.reshape(n_frames, 9))
    for key in labels:
        label = np.stack([p[key] for p in predicted]) - noise[key]
        np.save(set_dir / files[key], label.reshape(n_frames, -1))
    return {key: noise[key] for key in labels}


def mae(values) -> float:
    return float(np.mean(np.abs(values)))


def rmse(values) -> float:
    return float(np.sqrt(np.mean(np.square(values))))


def expected_errors(noise: dict, n_atoms: int, cell: np.ndarray | None = None) -> dict[str, float]:
    """dp test's numbers computed from the noise alone (predicted − label = noise)."""
    expected = {}
    if "energy" in noise:
        expected |= {"mae_e": mae(noise["energy"]), "rmse_e": rmse(noise["energy"]),
                     "mae_ea": mae(noise["energy"] / n_atoms), "rmse_ea": rmse(noise["energy"] / n_atoms)}
    if "forces" in noise:
        expected |= {"mae_f": mae(noise["forces"]), "rmse_f": rmse(noise["forces"])}
    if "virial" in noise:
        stress = -noise["virial"] / np.linalg.det(cell)[:, None, None]
        expected |= {"mae_v": mae(noise["virial"]), "rmse_v": rmse(noise["virial"]),
                     "mae_va": mae(noise["virial"] / n_atoms), "rmse_va": rmse(noise["virial"] / n_atoms),
                     "mae_s": mae(stress), "rmse_s": rmse(stress)}
    return expected


def assert_errors_equal(reported: dict, expected: dict[str, float]) -> None:
    for key, value in expected.items():
        np.testing.assert_allclose(reported[key], value, **TOLERANCE, err_msg=key)


WATER_6 = ["O", "H", "H", "O", "H", "H"]


# --------------------------------------------------------------------------- the numbers
def test_errors_equal_the_statistics_of_the_noise(tmp_path, potential):
    noise = make_labelled_system(tmp_path / "water", potential, WATER_6, n_frames=4)
    _, cell = structures(4, WATER_6, True, 0)
    scores = score_systems(potential, [read_system(tmp_path / "water")], progress=False)
    (system,) = scores["systems"]
    assert (system["n_frames"], system["n_atoms"]) == (4, 6)
    assert_errors_equal(system, expected_errors(noise, 6, cell))
    # one system: its average is itself
    assert_errors_equal(scores["average"], expected_errors(noise, 6, cell))
    assert scores["average"]["n_systems"] == 1 and scores["average"]["n_frames"] == 4


def test_per_atom_errors_divide_by_the_atoms_of_each_frame(tmp_path, potential):
    # the same energy noise on a 3-atom and a 6-atom system: per-atom errors differ by exactly 2
    make_labelled_system(tmp_path / "small", potential, ["O", "H", "H"], n_frames=4, seed=5)
    make_labelled_system(tmp_path / "large", potential, WATER_6, n_frames=4, seed=5)
    small, large = score_systems(potential, [read_system(tmp_path / "small"), read_system(tmp_path / "large")],
                                 progress=False)["systems"]
    np.testing.assert_allclose(small["rmse_e"], large["rmse_e"], **TOLERANCE)
    np.testing.assert_allclose(small["rmse_ea"], 2 * large["rmse_ea"], **TOLERANCE)
    np.testing.assert_allclose(small["mae_va"], 2 * large["mae_va"], **TOLERANCE)


def test_average_over_systems_pools_their_values(tmp_path, potential):
    # 3-atom system with 4 frames, 6-atom system with 2 frames: unequal weights for every quantity
    noise_a = make_labelled_system(tmp_path / "a", potential, ["O", "H", "H"], n_frames=4, seed=1)
    noise_b = make_labelled_system(tmp_path / "b", potential, WATER_6, n_frames=2, seed=2)
    average = score_systems(potential, [read_system(tmp_path / "a"), read_system(tmp_path / "b")],
                            progress=False)["average"]
    energy = np.concatenate([noise_a["energy"], noise_b["energy"]])  # weighted by frames
    energy_per_atom = np.concatenate([noise_a["energy"] / 3, noise_b["energy"] / 6])  # by frames, not atoms
    forces = np.concatenate([noise_a["forces"].ravel(), noise_b["forces"].ravel()])  # by components
    virial_per_atom = np.concatenate([noise_a["virial"].ravel() / 3, noise_b["virial"].ravel() / 6])
    assert_errors_equal(average, {
        "mae_e": mae(energy), "rmse_e": rmse(energy), "mae_ea": mae(energy_per_atom),
        "rmse_ea": rmse(energy_per_atom), "mae_f": mae(forces), "rmse_f": rmse(forces),
        "mae_va": mae(virial_per_atom), "rmse_va": rmse(virial_per_atom),
    })
    assert (average["n_systems"], average["n_frames"]) == (2, 6)


def test_missing_labels_are_nan_and_leave_the_average_to_the_systems_that_have_them(tmp_path, potential):
    noise_a = make_labelled_system(tmp_path / "energy_only", potential, ["O", "H", "H"], n_frames=4,
                                   labels=("energy",), seed=1)
    noise_b = make_labelled_system(tmp_path / "forces_only", potential, ["O", "H", "H"], n_frames=4,
                                   labels=("forces",), seed=2)
    scores = score_systems(potential, [read_system(tmp_path / "energy_only"), read_system(tmp_path / "forces_only")],
                           progress=False)
    a, b = scores["systems"]
    assert np.isnan(a["rmse_f"]) and np.isnan(a["mae_v"]) and np.isnan(b["rmse_e"]) and np.isnan(b["rmse_ea"])
    assert_errors_equal(scores["average"], {"rmse_e": rmse(noise_a["energy"]), "rmse_f": rmse(noise_b["forces"])})
    assert np.isnan(scores["average"]["rmse_v"]) and np.isnan(scores["average"]["rmse_s"])


def test_virial_of_an_open_system_is_not_scored(tmp_path, potential):
    # dp test reports virial and stress for periodic systems only, even when virial.npy is present
    noise = make_labelled_system(tmp_path / "molecule", potential, ["O", "H", "H"], n_frames=4, periodic=False)
    (system,) = score_systems(potential, [read_system(tmp_path / "molecule")], progress=False)["systems"]
    assert_errors_equal(system, expected_errors({"energy": noise["energy"], "forces": noise["forces"]}, 3))
    assert all(np.isnan(system[key]) for key in ("mae_v", "rmse_v", "rmse_va", "rmse_s"))


# --------------------------------------------------------------------------- the command
def test_command_prints_a_table_and_writes_dp_test_detail_files(tmp_path, model_file, potential, capsys):
    noise_a = make_labelled_system(tmp_path / "a", potential, WATER_6, n_frames=4, seed=1)
    make_labelled_system(tmp_path / "b", potential, ["O", "H", "H"], n_frames=4, labels=("energy", "forces"), seed=2)
    prefix = tmp_path / "detail"
    status = cli.main(["test", "--model", str(model_file), "--system", str(tmp_path / "a"),
                       "--system", str(tmp_path / "b"), "--detail-file", str(prefix)])
    assert status == 0
    table = capsys.readouterr().out.splitlines()
    assert any("virial (eV)" in line for line in table) and any("force (eV/Å)" in line for line in table)
    rows = {words[0]: words for words in map(str.split, table) if words and words[0] in ("[1]", "[2]", "average")}
    assert rows["[1]"][1] == "4" and rows["[2]"][1] == "4" and rows["average"][1] == "8"
    # row [1]: frames, then (MAE, RMSE) of e, ea, f, v, va, s, printed to 4 digits
    expected = expected_errors(noise_a, 6, structures(4, WATER_6, True, 1)[1])
    order = [f"{kind}_{q}" for q in ("e", "ea", "f", "v", "va", "s") for kind in ("mae", "rmse")]
    np.testing.assert_allclose([float(x) for x in rows["[1]"][2:]], [expected[key] for key in order], rtol=1e-3)
    assert rows["[2]"][8:] == ["-"] * 6  # system b has no virial

    # detail files: reference then prediction, frames of a then of b, a header naming the first system only
    energy = np.loadtxt(prefix.with_suffix(".e.out"))
    assert energy.shape == (8, 2)
    np.testing.assert_allclose(energy[:4, 1] - energy[:4, 0], noise_a["energy"], **TOLERANCE)
    np.testing.assert_allclose(np.loadtxt(prefix.with_suffix(".e_peratom.out"))[:4], energy[:4] / 6, **TOLERANCE)
    forces = np.loadtxt(prefix.with_suffix(".f.out"))
    assert forces.shape == (4 * 6 + 4 * 3, 6)
    np.testing.assert_allclose(forces[:24, 3:] - forces[:24, :3], noise_a["forces"].reshape(-1, 3), **TOLERANCE)
    virial = np.loadtxt(prefix.with_suffix(".v.out"))
    assert virial.shape == (8, 18) and np.isnan(virial[4:, :9]).all()  # b has no virial label: nan, not 0
    np.testing.assert_allclose(virial[:4, 9:] - virial[:4, :9], noise_a["virial"].reshape(-1, 9), **TOLERANCE)
    assert np.loadtxt(prefix.with_suffix(".s.out")).shape == (4, 18)  # stress only where a virial is labelled
    header = prefix.with_suffix(".e.out").read_text().splitlines()[0]
    assert header == f"# {tmp_path / 'a'}: data_e pred_e"


def test_numb_test_keeps_the_first_frames_and_a_directory_of_systems_is_searched(tmp_path, model_file, potential,
                                                                                capsys):
    noise = make_labelled_system(tmp_path / "root" / "one", potential, WATER_6, n_frames=4, seed=7)
    make_labelled_system(tmp_path / "root" / "two", potential, WATER_6, n_frames=4, seed=8)
    prefix = tmp_path / "detail"
    status = cli.main(["test", "--model", str(model_file), "--system", str(tmp_path / "root"), "--numb-test", "2",
                       "--detail-file", str(prefix)])
    assert status == 0
    assert "(2 frames of 6 atoms)" in capsys.readouterr().out
    energy = np.loadtxt(prefix.with_suffix(".e.out"))
    assert energy.shape == (4, 2)  # two systems found below root, two frames each
    np.testing.assert_allclose(energy[:2, 1] - energy[:2, 0], noise["energy"][:2], **TOLERANCE)


def test_extxyz_system(tmp_path, model_file, potential):
    import ase.io
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator

    coord, cell = structures(4, ["O", "H", "H"], True, 4)
    noise = np.random.default_rng(4).normal(0, 0.3, 4)
    frames = []
    for f, predicted in enumerate(potential.evaluate_batch([(coord[f], ["O", "H", "H"], cell[f]) for f in range(4)])):
        atoms = Atoms("OH2", positions=coord[f], cell=cell[f], pbc=True)
        atoms.calc = SinglePointCalculator(atoms, energy=float(predicted["energy"]) - noise[f],
                                           forces=predicted["forces"])
        frames.append(atoms)
    ase.io.write(tmp_path / "frames.extxyz", frames, format="extxyz")
    (system,) = score_systems(potential, [read_system(tmp_path / "frames.extxyz")], progress=False)["systems"]
    np.testing.assert_allclose(system["rmse_e"], rmse(noise), **TOLERANCE)
    assert system["rmse_f"] <= 5e-9  # ASE writes forces with 8 decimals: each off by at most 5e-9 eV/Å
    assert np.isnan(system["rmse_v"])


# --------------------------------------------------------------------------- the official numbers
# `dp --pt test -m model.pth -s ROOT -d detail` (deepmd-kit 3.2.0, water_small_f64/model.dp converted with
# `dp convert-backend`), run once on the ROOT built below: (MAE, RMSE) per system and weighted over both,
# printed by dp test with 7 digits. System a has no virial labels; b has random ones.
OFFICIAL_DP_TEST = {
    "a": {"e": (4.636176e+02, 4.636177e+02), "ea": (2.414675e+00, 2.414676e+00), "f": (6.003724e-01, 8.025476e-01)},
    "b": {"e": (4.628085e+02, 4.628092e+02), "ea": (2.410461e+00, 2.410465e+00), "f": (6.122131e-01, 8.200309e-01),
          "v": (3.305524e+00, 4.829346e+00), "va": (1.721627e-02, 2.515284e-02), "s": (1.715106e-03, 2.505758e-03)},
    "average": {"e": (4.633479e+02, 4.633484e+02), "ea": (2.413270e+00, 2.413273e+00),
                "f": (6.043193e-01, 8.084174e-01), "v": (3.305524e+00, 4.829346e+00),
                "va": (1.721627e-02, 2.515284e-02), "s": (1.715106e-03, 2.505758e-03)},
}


@needs_shared
def test_matches_dp_test_on_water(tmp_path):
    water = SHARED / "data" / "water"
    for name, source, n_frames in (("a", "data_0", 4), ("b", "data_1", 2)):
        (tmp_path / name / "set.000").mkdir(parents=True)
        for raw in ("type.raw", "type_map.raw"):
            shutil.copy(water / source / raw, tmp_path / name / raw)
        for array in ("coord", "box", "energy", "force"):
            np.save(tmp_path / name / "set.000" / f"{array}.npy",
                    np.load(water / source / "set.000" / f"{array}.npy")[:n_frames])
    np.save(tmp_path / "b" / "set.000" / "virial.npy", np.random.default_rng(0).normal(0, 1.0, (2, 9)))

    potential = load(SHARED / "reference" / "water_small_f64" / "model.dp")
    scores = score_systems(potential, [read_system(tmp_path / "a"), read_system(tmp_path / "b")], progress=False)
    reported = {"a": scores["systems"][0], "b": scores["systems"][1], "average": scores["average"]}
    for name, quantities in OFFICIAL_DP_TEST.items():
        for key, (official_mae, official_rmse) in quantities.items():
            # 7 printed digits: the last one is rounded
            np.testing.assert_allclose(reported[name][f"mae_{key}"], official_mae, rtol=1e-6, err_msg=f"{name} {key}")
            np.testing.assert_allclose(reported[name][f"rmse_{key}"], official_rmse, rtol=1e-6, err_msg=f"{name} {key}")
    assert np.isnan(reported["a"]["rmse_v"])


# --------------------------------------------------------------------------- mistakes
def test_missing_model_is_one_line_with_status_2(tmp_path, potential, capsys):
    make_labelled_system(tmp_path / "water", potential, WATER_6, n_frames=4)
    status = cli.main(["test", "--model", str(tmp_path / "absent.npz"), "--system", str(tmp_path / "water")])
    error = capsys.readouterr().err.strip()
    assert status == 2 and len(error.splitlines()) == 1
    assert "absent.npz" in error and "does not exist" in error


def test_unknown_element_is_one_line_with_status_2(tmp_path, model_file, potential, capsys):
    directory = tmp_path / "methanol"
    make_labelled_system(directory, potential, WATER_6, n_frames=4)
    (directory / "type_map.raw").write_text("C\nO\n")  # atoms of type 0 are now carbon
    prefix = tmp_path / "detail"
    status = cli.main(["test", "--model", str(model_file), "--system", str(directory), "--detail-file", str(prefix)])
    error = capsys.readouterr().err.strip()
    assert status == 2 and len(error.splitlines()) == 1
    assert "element 'C'" in error and str(directory) in error
    assert not prefix.with_suffix(".e.out").exists()


def test_missing_system_is_one_line_with_status_2(tmp_path, model_file, capsys):
    status = cli.main(["test", "--model", str(model_file), "--system", str(tmp_path / "nowhere")])
    error = capsys.readouterr().err.strip()
    assert status == 2 and len(error.splitlines()) == 1 and "nowhere" in error


def test_head_is_passed_to_the_model_loader(tmp_path, model_file, potential, capsys):
    pytest.importorskip("dpa3_ref.multitask", reason="heads arrive with multitask models")
    make_labelled_system(tmp_path / "water", potential, WATER_6, n_frames=4)
    status = cli.main(["test", "--model", str(model_file), "--system", str(tmp_path / "water"), "--head", "water"])
    error = capsys.readouterr().err.strip()
    assert status == 2 and len(error.splitlines()) == 1 and "'water'" in error  # a single model has no heads

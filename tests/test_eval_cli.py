"""`dpa3 eval`: the output file contract, the `dp test`-style errors, and the official numbers end to end."""

import shutil
from pathlib import Path

import numpy as np
import pytest

from dpa3_ref.data import System, read_system
from dpa3_ref.evaluate import rmse_report, write_npz_atomically
from tests.shared_paths import SHARED, needs_shared

REFERENCE = SHARED / "reference" / "water_small_f64"
WATER_0 = SHARED / "data" / "water" / "data_0"


# --------------------------------------------------------------------------- end to end, official numbers
@needs_shared
def test_eval_matches_official_water_reference(tmp_path, capsys):
    from dpa3_ref.cli import main

    system_dir = _copy_frames(WATER_0, tmp_path / "water_3_frames", n_frames=3)
    out = tmp_path / "predictions.npz"
    status = main(["eval", "--model", str(REFERENCE / "model.dp"), "--system", str(system_dir), "--out", str(out)])
    assert status == 0

    predictions = np.load(out)
    assert predictions["energy"].shape == (3,)
    assert predictions["atom_energy"].shape == (3, 192)
    assert predictions["forces"].shape == (3, 192, 3)
    assert predictions["virial"].shape == (3, 3, 3)
    reference = np.load(REFERENCE / "reference.npz")  # frames 0-2 of data_0 (reference README)
    # float64 model, same weights: deepmd-kit's own numpy and PyTorch backends agree to ~4e-12 eV
    np.testing.assert_allclose(predictions["energy"], reference["energy"], rtol=0, atol=1e-8)
    np.testing.assert_allclose(predictions["atom_energy"], reference["atom_energy"], rtol=0, atol=1e-8)
    # forces are small (RMS 0.01 eV/Å, random weights): absolute tolerance, as the reference README advises
    np.testing.assert_allclose(predictions["forces"], reference["force"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(predictions["virial"], reference["virial"], rtol=0, atol=1e-8)
    # the data has DFT energies and forces, so the dp test-style errors are printed
    printed = capsys.readouterr().out
    assert "Energy RMSE/Natoms" in printed and "Force  RMSE" in printed and "Virial" not in printed


@needs_shared
def test_eval_names_an_element_the_model_does_not_know(tmp_path, capsys):
    from dpa3_ref.cli import main

    status = main(["eval", "--model", str(REFERENCE / "model.dp"),
                   "--system", str(SHARED / "data" / "nopbc_molecules" / "C4H3O1"),
                   "--out", str(tmp_path / "out.npz")])
    assert status == 2
    assert "element 'C'" in capsys.readouterr().err
    assert not (tmp_path / "out.npz").exists()


# --------------------------------------------------------------------------- pieces that need no model
def test_rmse_report_follows_dp_test_definitions():
    n_frames, n_atoms = 4, 5
    rng = np.random.default_rng(0)
    labels = System(
        coord=np.zeros((n_frames, n_atoms, 3)), atom_names=["H"] * n_atoms, cell=np.tile(np.eye(3), (n_frames, 1, 1)),
        source=Path("toy"), energy=rng.normal(size=n_frames), forces=rng.normal(size=(n_frames, n_atoms, 3)),
        virial=rng.normal(size=(n_frames, 3, 3)),
    )
    energy_error = np.array([1.0, -2.0, 0.5, 0.0])
    pred = {"energy": labels.energy + energy_error, "forces": labels.forces + 0.1,
            "virial": labels.virial - 0.3}
    report = rmse_report(pred, labels)
    assert report["energy_rmse"] == pytest.approx(np.sqrt(np.mean(energy_error**2)))
    assert report["energy_rmse_per_atom"] == pytest.approx(np.sqrt(np.mean(energy_error**2)) / n_atoms)
    assert report["force_rmse"] == pytest.approx(0.1)
    assert report["virial_rmse"] == pytest.approx(0.3)
    assert report["virial_rmse_per_atom"] == pytest.approx(0.3 / n_atoms)


def test_rmse_report_only_covers_the_labels_present():
    unlabelled = System(coord=np.zeros((2, 3, 3)), atom_names=["O", "H", "H"], cell=None, source=Path("toy"),
                        forces=np.zeros((2, 3, 3)))
    report = rmse_report({"energy": np.zeros(2), "forces": np.ones((2, 3, 3)), "virial": np.zeros((2, 3, 3))},
                         unlabelled)
    assert report == {"force_rmse": 1.0}


def test_npz_is_written_whole_and_without_leftovers(tmp_path):
    out = tmp_path / "out.npz"
    write_npz_atomically(out, {"energy": np.arange(3.0)})
    np.testing.assert_array_equal(np.load(out)["energy"], np.arange(3.0))
    assert [path.name for path in tmp_path.iterdir()] == ["out.npz"]


@needs_shared
def test_copied_frames_are_the_first_frames_of_the_source(tmp_path):
    system_dir = _copy_frames(WATER_0, tmp_path / "few", n_frames=2)
    np.testing.assert_array_equal(read_system(system_dir).coord, read_system(WATER_0).coord[:2])


def _copy_frames(source: Path, destination: Path, n_frames: int) -> Path:
    """A deepmd/npy system holding the first `n_frames` frames of `source` (one set), for fast tests."""
    destination.mkdir()
    for raw in ("type.raw", "type_map.raw"):
        shutil.copy(source / raw, destination / raw)
    (destination / "set.000").mkdir()
    for array_file in sorted((source / "set.000").glob("*.npy")):
        np.save(destination / "set.000" / array_file.name, np.load(array_file)[:n_frames])
    return destination


# --------------------------------------------------------------------------- mixed-type systems
def test_eval_mixed_type_system_frame_by_frame(tmp_path, capsys):
    """A mixed-type deepmd/npy system (the atoms change from frame to frame, empty slots are virtual atoms,
    type -1): every frame equals the model on that frame's real atoms alone, and empty slots hold 0."""
    from dpa3_ref import DPA3Config, Potential
    from dpa3_ref.cli import main

    config = DPA3Config(type_map=("O", "H"), n_dim=8, e_dim=4, a_dim=4, nlayers=1, e_sel=20, a_sel=8, e_rcut=4.0,
                        e_rcut_smth=3.5, a_rcut=3.0, a_rcut_smth=2.5, axis_neuron=2, fitting_neuron=(8, 8))
    potential = Potential.init(config, seed=1)
    potential.save(tmp_path / "model.npz")
    rng = np.random.default_rng(0)
    # 3 frames of 5 slots; the file's type map is the model's in reverse order (matched by name);
    # virtual atoms all sit at the origin, which would be an error ("two atoms at one position") if they were used
    frame_types = np.array([[0, 1, 1, -1, -1], [1, 1, 0, 0, 1], [-1, 0, -1, 1, 1]])  # into ("H", "O")
    coord = np.stack([np.arange(5)[:, None] * 1.3 + rng.uniform(-0.2, 0.2, (5, 3)) for _ in range(3)])
    coord[frame_types == -1] = 0.0
    cell = np.tile(np.eye(3) * 6.5, (3, 1, 1))
    system_dir = tmp_path / "mixed"
    (system_dir / "set.000").mkdir(parents=True)
    (system_dir / "type_map.raw").write_text("H\nO\n")
    (system_dir / "type.raw").write_text("0\n" * 5)
    np.save(system_dir / "set.000" / "real_atom_types.npy", frame_types)
    np.save(system_dir / "set.000" / "coord.npy", coord.reshape(3, -1))
    np.save(system_dir / "set.000" / "box.npy", cell.reshape(3, 9))
    out = tmp_path / "out.npz"
    assert main(["eval", "--model", str(tmp_path / "model.npz"), "--system", str(system_dir), "--out", str(out)]) == 0
    predictions = np.load(out)
    assert predictions["atom_energy"].shape == (3, 5) and predictions["forces"].shape == (3, 5, 3)
    for frame in range(3):
        real = frame_types[frame] >= 0
        symbols = [("H", "O")[t] for t in frame_types[frame][real]]
        alone = potential.evaluate(coord[frame][real], symbols, cell[frame])
        np.testing.assert_allclose(predictions["energy"][frame], alone["energy"], rtol=1e-12)
        np.testing.assert_allclose(predictions["atom_energy"][frame][real], alone["atom_energy"], rtol=1e-12)
        np.testing.assert_allclose(predictions["forces"][frame][real], alone["forces"], rtol=0, atol=1e-12)
        np.testing.assert_allclose(predictions["virial"][frame], alone["virial"], rtol=0, atol=1e-12)
        assert np.all(predictions["atom_energy"][frame][~real] == 0) and np.all(predictions["forces"][frame][~real] == 0)


def test_rmse_report_counts_real_atoms_only():
    # frame 0 has 2 real atoms of 3 slots, frame 1 all 3: per-atom energies divide by 2 and 3, and the
    # virtual slot's force error (labels there are ignored) does not enter the force RMSE
    labels = System(coord=np.zeros((2, 3, 3)), atom_names=None, cell=None, source=Path("toy"),
                    frame_types=np.array([[0, 0, -1], [0, 0, 0]]), elements=("H",),
                    energy=np.zeros(2), forces=np.zeros((2, 3, 3)))
    forces = np.ones((2, 3, 3))
    forces[0, 2] = 100.0  # a virtual slot
    report = rmse_report({"energy": np.array([2.0, 3.0]), "forces": forces}, labels)
    assert report["energy_rmse_per_atom"] == pytest.approx(1.0)
    assert report["force_rmse"] == pytest.approx(1.0)

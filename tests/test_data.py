"""The data readers: real deepmd/npy datasets, extxyz written by ASE, and every error a user can cause."""

import shutil
from pathlib import Path

import numpy as np
import pytest

from dpa3_ref.data import System, find_systems, read_system
from dpa3_ref.errors import Dpa3Error
from tests.shared_paths import SHARED, needs_shared

WATER = SHARED / "data" / "water"
MOLECULES = SHARED / "data" / "nopbc_molecules"


# --------------------------------------------------------------------------- real datasets
@needs_shared
def test_reads_periodic_water_with_labels():
    system = read_system(WATER / "data_0")
    assert system.coord.shape == (80, 192, 3) and system.coord.dtype == np.float64
    assert system.cell.shape == (80, 3, 3)
    assert system.energy.shape == (80,) and system.forces.shape == (80, 192, 3)
    assert system.virial is None  # the water data has no virial.npy
    assert system.atom_names.count("O") == 64 and system.atom_names.count("H") == 128
    # the box is cubic, 12.44 Å (shared/README.md)
    np.testing.assert_allclose(system.cell[0], np.diag(np.diag(system.cell[0])))
    assert 12.0 < system.cell[0, 0, 0] < 13.0


@needs_shared
def test_matches_the_frames_of_the_official_reference():
    # reference.npz holds frames 0-2 of data_0 as deepmd-kit read them: same coordinates, cells and types
    reference = np.load(SHARED / "reference" / "water_small_f64" / "reference.npz")
    system = read_system(WATER / "data_0")
    np.testing.assert_array_equal(system.coord[:3], reference["coord"])
    np.testing.assert_array_equal(system.cell[:3], reference["box"])
    np.testing.assert_array_equal(system.type_indices(["O", "H"]), reference["atype"][0])


@needs_shared
def test_concatenates_sets_in_sorted_order():
    system = read_system(WATER / "data_1")  # set.000 and set.001
    first_set = np.load(WATER / "data_1" / "set.000" / "coord.npy")
    assert system.n_frames == 160
    np.testing.assert_array_equal(system.coord[: len(first_set)].reshape(len(first_set), -1), first_set)


@needs_shared
def test_reads_open_boundary_molecules_without_a_cell():
    system = read_system(MOLECULES / "C3H3O4")
    assert system.cell is None
    assert system.coord.shape == (485, 10, 3) and system.forces.shape == (485, 10, 3)
    assert sorted(system.atom_names) == sorted(["C"] * 3 + ["H"] * 3 + ["O"] * 4)


@needs_shared
def test_finds_every_system_below_a_root():
    found = find_systems(SHARED / "data")
    names = [path.name for path in found]
    assert names == ["C1H4O2", "C3H3O4", "C4H3O1", "data_0", "data_1", "data_2", "data_3"]


def test_type_indices_map_by_name_onto_the_models_type_map():
    system = _toy_system(["H", "O", "H"])
    np.testing.assert_array_equal(system.type_indices(["O", "H"]), [1, 0, 1])
    np.testing.assert_array_equal(system.type_indices(["C", "H", "O"]), [1, 2, 1])


# --------------------------------------------------------------------------- extxyz
def _strained_copper(strain: np.ndarray):
    from ase.build import bulk
    from ase.calculators.emt import EMT

    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 1))
    atoms.rattle(stdev=0.05, seed=1)
    atoms.set_cell(atoms.cell.array @ (np.eye(3) + strain), scale_atoms=True)
    atoms.calc = EMT()
    return atoms


def _labelled_copper_frames(n_frames: int):
    from ase.calculators.singlepoint import SinglePointCalculator

    frames = []
    for frame in range(n_frames):
        atoms = _strained_copper(0.01 * frame * np.array([[1, 0.5, 0], [0.5, -1, 0.2], [0, 0.2, 0.3]]))
        results = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces(), "stress": atoms.get_stress()}
        atoms.calc = SinglePointCalculator(atoms, **results)
        frames.append(atoms)
    return frames


def test_reads_extxyz_frames_with_labels(tmp_path):
    import ase.io

    frames = _labelled_copper_frames(3)
    ase.io.write(tmp_path / "cu.extxyz", frames)
    system = read_system(tmp_path / "cu.extxyz")
    assert system.atom_names == ["Cu"] * 16
    # extxyz stores positions and forces with 8 decimals: agreement to 1e-8 absolute is all there is
    np.testing.assert_allclose(system.coord, [atoms.positions for atoms in frames], atol=1e-8)
    np.testing.assert_allclose(system.cell, [atoms.cell.array for atoms in frames], atol=1e-8)
    np.testing.assert_allclose(system.energy, [atoms.get_potential_energy() for atoms in frames], atol=1e-8)
    np.testing.assert_allclose(system.forces, [atoms.get_forces() for atoms in frames], atol=1e-8)


def test_virial_from_extxyz_stress_is_minus_strain_derivative_of_energy(tmp_path):
    """deepmd's virial is W = -(∂E/∂ε)ᵀ (spec §7); check the stress → virial conversion against a finite
    difference of the EMT energy under homogeneous strain, an independent route to the same tensor."""
    import ase.io

    ase.io.write(tmp_path / "cu.extxyz", _labelled_copper_frames(2))
    virial = read_system(tmp_path / "cu.extxyz").virial[1]  # [3, 3] eV
    base_strain = 0.01 * np.array([[1, 0.5, 0], [0.5, -1, 0.2], [0, 0.2, 0.3]])  # frame 1's strain
    step = 1e-5
    strain_derivative = np.zeros((3, 3))  # ∂E/∂ε_kl at frame 1's geometry
    for k in range(3):
        for l in range(3):
            delta = np.zeros((3, 3))
            delta[k, l] = step
            # x' = x (I + ε) composes with frame 1's strain as (I + ε1)(I + δ) to first order in δ
            plus = _strained_copper_after(base_strain, delta).get_potential_energy()
            minus = _strained_copper_after(base_strain, -delta).get_potential_energy()
            strain_derivative[k, l] = (plus - minus) / (2 * step)
    # EMT energies are smooth; central differences with step 1e-5 are accurate to ~1e-8 eV here
    np.testing.assert_allclose(virial, -strain_derivative.T, atol=1e-6)


def _strained_copper_after(base_strain: np.ndarray, extra_strain: np.ndarray):
    atoms = _strained_copper(base_strain)
    atoms.set_cell(atoms.cell.array @ (np.eye(3) + extra_strain), scale_atoms=True)
    return atoms


def test_extxyz_without_labels_or_cell_is_an_open_system(tmp_path):
    import ase.io
    from ase.build import molecule

    ase.io.write(tmp_path / "water.xyz", [molecule("H2O"), molecule("H2O")], format="extxyz")
    system = read_system(tmp_path / "water.xyz")
    assert system.cell is None and system.energy is None and system.forces is None and system.virial is None
    assert system.atom_names == ["O", "H", "H"]


# --------------------------------------------------------------------------- errors
def test_nonexistent_path_is_named(tmp_path):
    with pytest.raises(Dpa3Error, match="no-such-system: no such file or directory"):
        read_system(tmp_path / "no-such-system")


def test_directory_without_type_raw_says_what_is_missing(tmp_path):
    with pytest.raises(Dpa3Error, match="not a deepmd/npy system, type.raw is missing"):
        read_system(tmp_path)


def test_system_without_sets_says_so(tmp_path):
    _write_deepmd_system(tmp_path, n_frames=1, n_atoms=2)
    shutil.rmtree(tmp_path / "set.000")
    with pytest.raises(Dpa3Error, match="no set.. directory"):
        read_system(tmp_path)


def test_missing_box_without_nopbc_marker_is_explained(tmp_path):
    _write_deepmd_system(tmp_path, n_frames=2, n_atoms=3)
    (tmp_path / "set.000" / "box.npy").unlink()
    with pytest.raises(Dpa3Error, match="box.npy is missing.*nopbc"):
        read_system(tmp_path)


def test_shape_mismatch_names_the_file_and_the_shapes(tmp_path):
    _write_deepmd_system(tmp_path, n_frames=2, n_atoms=3)
    np.save(tmp_path / "set.000" / "force.npy", np.zeros((2, 8)))  # 8 = one component short of 3 atoms × 3
    with pytest.raises(Dpa3Error, match=r"force.npy: shape \(2, 8\) .*expected \(2, 9\)"):
        read_system(tmp_path)


def test_type_index_outside_the_type_map_names_the_atom(tmp_path):
    _write_deepmd_system(tmp_path, n_frames=1, n_atoms=3)
    (tmp_path / "type.raw").write_text("0\n1\n2\n")
    with pytest.raises(Dpa3Error, match="type.raw: atom 2 has type 2"):
        read_system(tmp_path)


def test_nan_coordinate_names_frame_and_atom(tmp_path):
    coord = np.zeros((3, 4, 3))
    coord[2, 1, 0] = np.nan
    _write_deepmd_system(tmp_path, n_frames=3, n_atoms=4, coord=coord)
    with pytest.raises(Dpa3Error, match="non-finite coordinate in frame 2, atom 1"):
        read_system(tmp_path)


def test_infinite_coordinate_in_extxyz_names_frame_and_atom(tmp_path):
    import ase.io
    from ase.build import molecule

    broken = molecule("H2O")
    broken.positions[2, 1] = np.inf
    ase.io.write(tmp_path / "water.xyz", [molecule("H2O"), broken], format="extxyz")
    with pytest.raises(Dpa3Error, match="non-finite coordinate in frame 1, atom 2"):
        read_system(tmp_path / "water.xyz")


def test_extxyz_frames_with_different_atoms_are_refused(tmp_path):
    import ase.io
    from ase.build import molecule

    ase.io.write(tmp_path / "mixed.xyz", [molecule("H2O"), molecule("NH3")], format="extxyz")
    with pytest.raises(Dpa3Error, match="frame 1 has different atoms than frame 0"):
        read_system(tmp_path / "mixed.xyz")


def test_unknown_element_is_named_with_its_atom():
    system = _toy_system(["O", "H", "C"])
    with pytest.raises(Dpa3Error, match=r"element 'C' \(atom 2\) is not in the model's type map \['O', 'H'\]"):
        system.type_indices(["O", "H"])


def test_find_systems_refuses_a_missing_root(tmp_path):
    with pytest.raises(Dpa3Error, match="not a directory"):
        find_systems(tmp_path / "missing")


# --------------------------------------------------------------------------- helpers
def _toy_system(atom_names: list[str]) -> System:
    return System(coord=np.zeros((1, len(atom_names), 3)), atom_names=atom_names, cell=None, source=Path("toy"))


def _write_deepmd_system(directory: Path, n_frames: int, n_atoms: int, coord: np.ndarray | None = None) -> None:
    """A minimal periodic deepmd/npy system of O and H atoms, with energies and forces."""
    (directory / "type_map.raw").write_text("O\nH\n")
    (directory / "type.raw").write_text("\n".join(str(atom % 2) for atom in range(n_atoms)) + "\n")
    set_dir = directory / "set.000"
    set_dir.mkdir()
    coord = np.random.default_rng(0).uniform(0, 5, (n_frames, n_atoms, 3)) if coord is None else coord
    np.save(set_dir / "coord.npy", coord.reshape(n_frames, -1))
    np.save(set_dir / "box.npy", np.tile(5.0 * np.eye(3).ravel(), (n_frames, 1)))
    np.save(set_dir / "energy.npy", np.zeros(n_frames))
    np.save(set_dir / "force.npy", np.zeros((n_frames, n_atoms * 3)))

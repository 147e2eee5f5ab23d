"""`dpa3 demo`: its deepmd/npy writer, its datasets, and the whole main job in its --quick form (as CI runs it)."""

import json
import re

import numpy as np
import pytest

import dpa3_ref
from dpa3_ref import demo
from dpa3_ref.cli import main
from dpa3_ref.data import read_system


def test_writer_round_trips_through_the_reader(tmp_path):
    rng = np.random.default_rng(0)
    symbols = ["Ni", "Cu", "Cu", "Ni", "Cu"]
    coord = rng.normal(size=(3, 5, 3))
    cell = np.eye(3) * 7.0 + rng.normal(scale=0.1, size=(3, 3, 3))
    energy, forces = rng.normal(size=3), rng.normal(size=(3, 5, 3))
    system = read_system(demo.write_deepmd_npy(tmp_path / "sys", symbols, coord, cell, energy, forces, ("Cu", "Ni")))
    assert system.atom_names == symbols
    np.testing.assert_array_equal(system.coord, coord)
    np.testing.assert_array_equal(system.cell, cell)
    np.testing.assert_array_equal(system.energy, energy)
    np.testing.assert_array_equal(system.forces, forces)
    assert system.virial is None and system.atom_energy is None


def test_writer_marks_open_boundaries(tmp_path):
    coord = np.zeros((1, 2, 3)) + np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 2.5]])
    path = demo.write_deepmd_npy(tmp_path / "dimer", ["Cu", "Cu"], coord, None, np.zeros(1), np.zeros((1, 2, 3)),
                                 ("Cu", "Ni"))
    assert read_system(path).cell is None


def test_datasets_label_the_same_structure_differently(tmp_path):
    # the second dataset's labels are 1.1 x EMT plus per-element offsets: check on one relabelled frame
    ideal = demo.structures("emt")["Cu_fcc"]
    frames = demo.sample_frames(ideal, (0.05,), 2, np.random.default_rng(1))
    energy_a, forces_a = demo.label(frames, demo.REFERENCES["emt"])
    energy_b, forces_b = demo.label(frames, demo.REFERENCES["emt_b"])
    reference = demo.REFERENCES["emt_b"]
    np.testing.assert_allclose(energy_b, reference.scale * energy_a + len(ideal) * reference.shift["Cu"], rtol=1e-12)
    np.testing.assert_allclose(forces_b, reference.scale * forces_a, rtol=1e-12)
    # forces of rattled frames are real EMT forces: they sum to zero (momentum conservation)
    np.testing.assert_allclose(forces_a.sum(axis=1), 0.0, atol=1e-10)


def test_every_frame_has_one_table_width():
    # one padded neighbour-table width for every structure is what lets each head compile once
    from dpa3_ref.neighbors import build_graph

    config = dpa3_ref.DPA3Config.from_deepmd({"type_map": list(demo.TYPE_MAP), "descriptor": demo.descriptor_section(),
                                             "fitting_net": demo.fitting_section(0)})
    rng = np.random.default_rng(0)
    widths = set()
    for ideal in demo.structures("emt_b").values():
        for atoms in demo.sample_frames(ideal, demo.FULL.rattle, 3, rng):
            graph = build_graph(atoms.positions, config.type_indices(atoms.get_chemical_symbols()),
                                np.asarray(atoms.cell), config)
            widths.add((graph.n_atoms, graph.max_neighbors, graph.max_angle_neighbors))
    assert widths == {(32, config.e_sel, config.a_sel)}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo")
    from contextlib import redirect_stdout
    from io import StringIO

    printed = StringIO()
    with redirect_stdout(printed):
        status = main(["demo", "--quick", "--workdir", str(workdir), "--no-progress"])
    return status, workdir, printed.getvalue()


def test_quick_demo_runs_and_writes_everything(quick_run):
    status, workdir, printed = quick_run
    assert status == 0, printed
    for name in ("input.json", "model.npz", "lcurve.out", "lcurve.png", "parity.png"):
        assert (workdir / name).is_file(), name
    data = json.loads((workdir / "input.json").read_text())
    shared = data["model"]["shared_dict"]
    assert shared["shared_fitting"]["dim_case_embd"] == len(demo.DATASETS)
    assert set(data["model"]["model_dict"]) == set(demo.DATASETS)


def test_quick_demo_model_loads_with_each_head(quick_run):
    _, workdir, _ = quick_run
    with pytest.raises(dpa3_ref.Dpa3Error, match="multitask model"):
        dpa3_ref.load(workdir / "model.npz")
    atoms = demo.structures("emt")["Cu_fcc"]
    energies = {}
    for head in demo.DATASETS:
        potential = dpa3_ref.load(workdir / "model.npz", head=head)
        energies[head] = float(potential.evaluate(atoms.positions, atoms.get_chemical_symbols(),
                                                  np.asarray(atoms.cell))["energy"])
    # the heads differ by their one-hot and energy offsets: one structure, two energies
    assert np.isfinite(list(energies.values())).all()
    assert energies["emt"] != energies["emt_b"]


def test_quick_demo_prints_finite_errors_and_drift(quick_run):
    _, _, printed = quick_run
    rows = {name: re.search(rf"^{name}\s+\d+\s+(\S+)\s+(\S+)", printed, re.MULTILINE) for name in demo.DATASETS}
    for name, row in rows.items():
        assert row is not None, f"no validation row for {name} in:\n{printed}"
        assert np.isfinite([float(row[1]), float(row[2])]).all()
    drift = re.search(r"drift ([-+\d.e]+) meV/atom", printed)
    assert drift is not None and np.isfinite(float(drift[1]))
    assert re.search(r"^\[5/5\] ", printed, re.MULTILINE)  # every step ran ...
    assert len(re.findall(r"^\s+\(\d+\.\d s\)$", printed, re.MULTILINE)) == 5  # ... and said how long it took
    # --quick leaves out the ONNX step (its export alone takes longer than the rest of --quick) and says so;
    # test_onnx_step_of_the_quick_model (slow) checks the step itself
    assert "--quick skips the ONNX export" in printed


def test_ghost_images_are_every_image_within_the_halo():
    rng = np.random.default_rng(2)
    cell = np.array([[4.0, 0.0, 0.0], [0.8, 3.6, 0.0], [-0.5, 0.4, 4.4]])
    positions = rng.uniform(-1.0, 5.0, (6, 3))  # also outside the cell: they are wrapped first
    halo = 5.3
    all_positions, owner = demo.with_ghosts(positions, cell, halo)
    local = all_positions[:6]
    np.testing.assert_array_equal(owner[:6], np.arange(6))
    # the local atoms are the atoms moved into the cell by lattice vectors; each ghost is its owner so moved
    def in_cell_units(x):
        return np.linalg.solve(cell.T, x.T).T

    assert np.all((in_cell_units(local) >= 0) & (in_cell_units(local) < 1))
    for moved in (in_cell_units(local - positions), in_cell_units(all_positions[6:] - local[owner[6:]])):
        np.testing.assert_allclose(moved, np.round(moved), atol=1e-9)
    # against brute force over a generous block of images: the same set of atoms
    block = np.array(list(np.ndindex(9, 9, 9))) - 4
    images = (local[None] + (block @ cell)[:, None]).reshape(-1, 3)
    distance = np.linalg.norm(images[:, None] - local[None], axis=-1).min(axis=1)
    expected = images[(distance <= halo) & (np.abs(block).sum(axis=1).repeat(6) > 0)]
    assert len(expected) == len(all_positions) - 6
    found = {tuple(np.round(x, 6)) for x in all_positions[6:]}
    assert found == {tuple(np.round(x, 6)) for x in expected}


@pytest.mark.slow
def test_onnx_step_of_the_quick_model(quick_run):
    # the full demo's ONNX step, on the --quick model (the export takes 30-70 s on 2 cores)
    pytest.importorskip("jax2onnx")
    _, workdir, _ = quick_run
    lines = demo.export_and_check(workdir / "model.npz", "emt", workdir, workdir / "data" / "emt" / "valid" / "Cu_fcc")
    printed = "\n".join(lines)
    assert (workdir / "model-emt.onnx").is_file()
    assert "(float32, head 'emt'" in printed  # the demo trains in float32: the file is float32
    errors = [float(x) for x in re.findall(r"max \|Δ[EF]\|[^=]*= ([-+\d.e]+)", printed)]
    assert len(errors) == 4, printed  # energy and forces, on the periodic frame and with ghost atoms
    # float32 file against the float32 JAX model: measured 3e-8 eV, 2e-8 eV/Å (periodic) and 2e-7 eV,
    # 2e-8 eV/Å (ghosts); 1e-4 is far above float32 round-off here and far below what one wrong
    # neighbour or a missing ghost would do (forces ~1 eV/Å)
    assert max(errors) < 1e-4, printed

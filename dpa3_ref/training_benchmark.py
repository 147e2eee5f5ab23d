"""Training benchmark (issue 8): the multitask water + molecules run, and speed against the official code.

A benchmark script, not a test and not part of the package's import graph:

    python -m dpa3_ref.training_benchmark [--workdir DIR] [--steps 200] [--timing-steps 20] [--repeats 1]
                                          [--skip PART ...]

PARTS (everything under --workdir, default a fresh folder under /tmp; each prints what it runs):

  train     The multitask input (`multitask_input`, written to WORKDIR/multitask/input.json): DPA3 with
            dataset encoding, the water example's architecture (spec §10.2) with the type map O, H, C
            shared by two heads, "molecules" and "water"; one shared descriptor and one shared fitting net
            [240, 240, 240] with dim_case_embd 2 (one-hot index = position in the sorted head names:
            molecules 0, water 1); the water example's loss, learning rate and AdamW.
              water:     ../shared/data/water/data_0..2 for training (batch 1), data_3 for validation
              molecules: the three systems of ../shared/data/nopbc_molecules, each split by frame order:
                         the last 10 % of its frames (at least 1) for validation, the rest for training
                         (written as deepmd/npy under WORKDIR/data/molecules/{train,valid}); batch "auto"
            `dpa3 train` for --steps steps (disp_freq 20), then the first and the last lcurve.out line per
            head, `dpa3 test --head` on each head's validation data, `dpa3 export --head water` and
            `dpa3 eval` of the .onnx file against `dpa3 eval --head water` of model.npz on one water frame.
  multitask `dp --pt train` (deepmd-kit 3.2.0, PyTorch, CPU) on the same input for --timing-steps steps
            (disp_freq 10). Our time per step comes from the `train` part's run, or, when `train` is
            skipped, from `dpa3 train` on the same input right after, in the same conditions.
  water     The single-task water example (spec §10.2: 192 atoms, batch 1, float32), --timing-steps steps
            of `dp --pt train` and of `dpa3 train` (disp_freq 5), --repeats times, alternating.

How time per step is measured
-----------------------------
Each tool reports its own number, printed as such: ours is the summary's `X.XXX s/step` (the mean of the
steps that compiled nothing, display work excluded), deepmd-kit's is the log's `average training time:
X s/batch` (`deepmd/dpmodel/train/timing.py`: wall time of the display intervals after the first
disp_freq steps, so it includes each display's extra evaluations: the other heads' training batches and
the validation batches).

To compare like with like, both runs also record every training step here (the `ours` and `official`
subcommands run the trainer in-process with a recorder, nothing numerical changes): ours from the start
to the end of `Trainer.run_step` (the batch is made, the step runs, metrics come back to the host, which
waits for the device), a step flagged as compiling when it grew the padded table widths; deepmd-kit's
from the entry of `Trainer._next_training_batch` (after zero_grad) to the end of `optimizer.step()` (a
global post-step hook of torch.optim). Display work falls outside both. The table gives per head the
median over the steps after the first of that head (the first pays one-off costs: compilation for us,
allocation warm-up for torch). In multitask the head of each step is drawn at random, and the two
trainers draw from different generators, so a mean over a few steps mixes water (192 atoms) and
molecule (7–10 atoms) steps in different proportions; the comparable figure is the expected time per
step of the input, Σ_h model_prob_h × median_h.

The machine is shared with other jobs: the 1-minute load average is printed before and after every run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
WATER = SHARED / "data" / "water"
MOLECULES = SHARED / "data" / "nopbc_molecules"
OFFICIAL_PYTHON = Path("/work/dpref/bin/python")
OURS_PYTHON = ROOT / ".venv" / "bin" / "python"
OURS_CLI = ROOT / ".venv" / "bin" / "dpa3"

MOLECULE_SYSTEMS = ("C1H4O2", "C3H3O4", "C4H3O1")
VALIDATION_FRACTION = 0.1  # of each molecule system's frames, the last ones
STEP_RECORD = "steps.jsonl"  # per training step: head, seconds, compiled (ours)


# ---------------------------------------------------------------------------------------------------
# The inputs both trainers read
# ---------------------------------------------------------------------------------------------------

def water_example_sections(type_map: list[str], dim_case_embd: int) -> tuple[dict, dict]:
    """The water example's descriptor and fitting net (spec §10.2), as deepmd-kit's input writes them."""
    descriptor = {
        "type": "dpa3",
        "repflow": {
            "n_dim": 128, "e_dim": 64, "a_dim": 32, "nlayers": 6,
            "e_rcut": 6.0, "e_rcut_smth": 5.3, "e_sel": 120,
            "a_rcut": 4.0, "a_rcut_smth": 3.5, "a_sel": 30,
            "axis_neuron": 4, "fix_stat_std": 0.3,
            "a_compress_rate": 1, "a_compress_e_rate": 2, "a_compress_use_split": True,
            "update_angle": True, "update_style": "res_residual", "update_residual": 0.1,
            "update_residual_init": "const", "smooth_edge_update": True, "edge_init_use_dist": True,
            "use_exp_switch": True,
        },
        "activation_function": "silut:10.0",
        "use_tebd_bias": False,
        "precision": "float32",
        "concat_output_tebd": False,
        "seed": 1,
    }
    fitting = {"neuron": [240, 240, 240], "resnet_dt": True, "precision": "float32",
               "activation_function": "silut:10.0", "seed": 1}
    if dim_case_embd:
        fitting["dim_case_embd"] = dim_case_embd
    del type_map  # the sections do not depend on it; kept in the signature to say they are for that map
    return descriptor, fitting


LEARNING_RATE = {"type": "exp", "start_lr": 1e-3, "stop_lr": 3e-5, "decay_steps": 5000}
LOSS = {"type": "ener", "start_pref_e": 0.2, "limit_pref_e": 20.0, "start_pref_f": 100.0, "limit_pref_f": 60.0,
        "start_pref_v": 0.02, "limit_pref_v": 1.0}  # no virial labels here: the v term has find_virial = 0
OPTIMIZER = {"type": "AdamW", "adam_beta1": 0.9, "adam_beta2": 0.999, "weight_decay": 0.001}


def training_keys(steps: int, disp_freq: int) -> dict:
    return {"numb_steps": steps, "seed": 1, "disp_file": "lcurve.out", "disp_freq": disp_freq,
            "save_freq": steps, "save_ckpt": "model.ckpt", "max_ckpt_keep": 1, "gradient_max_norm": 5.0}


def multitask_input(data: Path, steps: int, disp_freq: int) -> dict:
    """deepmd-kit's multitask input, DPA3 style: shared type map, descriptor and fitting net (dataset one-hot)."""
    type_map = ["O", "H", "C"]
    descriptor, fitting = water_example_sections(type_map, dim_case_embd=2)
    water = {"training_data": {"systems": [str(WATER / f"data_{i}") for i in range(3)], "batch_size": 1},
             "validation_data": {"systems": [str(WATER / "data_3")], "batch_size": 1, "numb_btch": 1}}
    molecules = {"training_data": {"systems": [str(data / "molecules" / "train" / name) for name in MOLECULE_SYSTEMS],
                                   "batch_size": "auto"},
                 "validation_data": {"systems": [str(data / "molecules" / "valid" / name)
                                                 for name in MOLECULE_SYSTEMS], "batch_size": "auto", "numb_btch": 1}}
    return {
        "model": {
            "shared_dict": {"type_map_all": type_map, "dpa3_descriptor": descriptor, "shared_fitting": fitting},
            "model_dict": {name: {"type_map": "type_map_all", "descriptor": "dpa3_descriptor",
                                  "fitting_net": "shared_fitting"} for name in ("water", "molecules")},
        },
        "learning_rate": dict(LEARNING_RATE),
        "loss_dict": {"water": dict(LOSS), "molecules": dict(LOSS)},
        "optimizer": dict(OPTIMIZER),
        "training": {"data_dict": {"water": water, "molecules": molecules}, **training_keys(steps, disp_freq)},
    }


def water_input(steps: int, disp_freq: int) -> dict:
    """The single-task water example (spec §10.2), with data_3 as validation data."""
    descriptor, fitting = water_example_sections(["O", "H"], dim_case_embd=0)
    return {
        "model": {"type_map": ["O", "H"], "descriptor": descriptor, "fitting_net": fitting},
        "learning_rate": dict(LEARNING_RATE),
        "loss": dict(LOSS),
        "optimizer": dict(OPTIMIZER),
        "training": {
            "training_data": {"systems": [str(WATER / f"data_{i}") for i in range(3)], "batch_size": 1},
            "validation_data": {"systems": [str(WATER / "data_3")], "batch_size": 1, "numb_btch": 1},
            **training_keys(steps, disp_freq),
        },
    }


def split_molecules(target: Path) -> dict[str, tuple[int, int]]:
    """Each molecule system as two deepmd/npy systems, train (first frames) and valid (last 10 %, >= 1).

    Arrays are copied unchanged (float32 as stored); returns {system: (training frames, validation frames)}."""
    counts = {}
    for name in MOLECULE_SYSTEMS:
        source = MOLECULES / name
        arrays = {key: np.load(source / "set.000" / f"{key}.npy") for key in ("coord", "energy", "force")}
        n_frames = len(arrays["coord"])
        n_valid = max(1, round(VALIDATION_FRACTION * n_frames))
        for split, frames in (("train", slice(0, n_frames - n_valid)), ("valid", slice(n_frames - n_valid, None))):
            system = target / split / name
            (system / "set.000").mkdir(parents=True, exist_ok=True)
            for file in ("type.raw", "type_map.raw", "nopbc"):
                shutil.copyfile(source / file, system / file)
            for key, array in arrays.items():
                np.save(system / "set.000" / f"{key}.npy", array[frames])
        counts[name] = (n_frames - n_valid, n_valid)
    return counts


def one_frame_system(source: Path, frame: int, target: Path) -> Path:
    """Frame `frame` of a periodic deepmd/npy system as a system of its own (for `dpa3 eval`)."""
    (target / "set.000").mkdir(parents=True, exist_ok=True)
    for file in ("type.raw", "type_map.raw"):
        shutil.copyfile(source / file, target / file)
    for key in ("box", "coord", "energy", "force"):
        np.save(target / "set.000" / f"{key}.npy", np.load(source / "set.000" / f"{key}.npy")[frame:frame + 1])
    return target


# ---------------------------------------------------------------------------------------------------
# The recorders: subcommands run inside each trainer's own virtual environment
# ---------------------------------------------------------------------------------------------------

def official_side(rundir: Path) -> None:
    """`dp --pt train input.json --skip-neighbor-stat` in RUNDIR, every training step timed (steps.jsonl).

    Run by deepmd-kit's Python as `/work/dpref/bin/python -P training_benchmark.py official RUNDIR`."""
    from deepmd.main import main as dp_main
    from deepmd.pt.train import training
    from torch.optim.optimizer import register_optimizer_step_post_hook

    os.chdir(rundir)
    records: list[dict] = []
    next_batch = training.Trainer._next_training_batch

    def timed_next_batch(self, task_key, *args, **kwargs):
        records.append({"head": task_key, "start": time.perf_counter()})
        return next_batch(self, task_key, *args, **kwargs)

    def step_done(optimizer, args, kwargs):
        del optimizer, args, kwargs
        records[-1]["seconds"] = time.perf_counter() - records[-1].pop("start")

    training.Trainer._next_training_batch = timed_next_batch
    register_optimizer_step_post_hook(step_done)
    dp_main(["--pt", "train", "input.json", "--skip-neighbor-stat"])
    with open(STEP_RECORD, "w") as stream:
        for step, record in enumerate(records):
            stream.write(json.dumps({"step": step, "head": record["head"], "seconds": record["seconds"],
                                     "compiled": False}) + "\n")


def ours_side(rundir: Path, extra: list[str]) -> int:
    """`dpa3 train input.json EXTRA` in RUNDIR, every training step timed (steps.jsonl).

    Run by our Python as `python -m dpa3_ref.training_benchmark ours RUNDIR [EXTRA...]`, with the
    allocator setting the `dpa3` command sets for itself (GLIBC_TUNABLES, see cli.py)."""
    from dpa3_ref import cli
    from dpa3_ref.train import Trainer

    os.chdir(rundir)
    records: list[dict] = []
    run_step = Trainer.run_step

    def timed_run_step(self, step):
        widths = {key: list(value) for key, value in self.widths.seen.items()}
        start = time.perf_counter()
        head, learning_rate, metrics = run_step(self, step)  # metrics are host floats: the step has finished
        records.append({"step": step, "head": head, "seconds": time.perf_counter() - start,
                        "compiled": self.widths.seen != widths})
        return head, learning_rate, metrics

    Trainer.run_step = timed_run_step
    status = cli.main(["train", "input.json", *extra])
    with open(STEP_RECORD, "w") as stream:
        for record in records:
            stream.write(json.dumps(record) + "\n")
    return status


# ---------------------------------------------------------------------------------------------------
# Running the two trainers
# ---------------------------------------------------------------------------------------------------

def load_average() -> float:
    return os.getloadavg()[0]


def run_logged(command: list[str], rundir: Path, env: dict | None = None) -> dict:
    """Run COMMAND in RUNDIR with output to RUNDIR/train.log; status, wall time and load averages."""
    before = load_average()
    print(f"  $ (cd {rundir} && {' '.join(command)})  > train.log   [load {before:.2f}]", flush=True)
    started = time.perf_counter()
    with open(rundir / "train.log", "w") as log:
        status = subprocess.run(command, cwd=rundir, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    result = {"status": status, "wall_s": time.perf_counter() - started, "load_before": before,
              "load_after": load_average(), "rundir": rundir}
    print(f"    status {status}, {result['wall_s']:.0f} s   [load {result['load_after']:.2f}]", flush=True)
    if status != 0:
        print("    --- last lines of train.log ---")
        print("    " + "\n    ".join((rundir / "train.log").read_text().splitlines()[-25:]))
    return result


def new_run(rundir: Path, config: dict) -> Path:
    rundir.mkdir(parents=True, exist_ok=True)
    (rundir / "input.json").write_text(json.dumps(config, indent=2) + "\n")
    return rundir


def run_official(rundir: Path) -> dict:
    command = [str(OFFICIAL_PYTHON), "-P", str(Path(__file__).resolve()), "official", str(rundir)]
    result = run_logged(command, rundir)
    log = (rundir / "train.log").read_text()
    average = [line for line in log.splitlines() if "average training time" in line]
    result["reported"] = float(average[-1].split("average training time:")[1].split()[0]) if average else None
    result["reported_line"] = average[-1].strip() if average else None
    return result


def run_ours(rundir: Path, extra: list[str]) -> dict:
    env = dict(os.environ)
    env.setdefault("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")  # what the `dpa3` command sets for itself
    command = [str(OURS_PYTHON), "-m", "dpa3_ref.training_benchmark", "ours", str(rundir), *extra]
    result = run_logged(command, rundir, env)
    lines = (rundir / "train.log").read_text().strip().splitlines()
    summary = [line for line in lines if line.startswith("time ") and "s/step" in line]
    result["reported"] = float(summary[-1].split(",")[-1].split()[0]) if summary else None
    result["reported_line"] = summary[-1].strip() if summary else None
    if lines and lines[-1].startswith("final model: "):
        final = Path(lines[-1].removeprefix("final model: ").strip())
        result["model"] = final if final.is_absolute() else rundir / final
    return result


def step_statistics(rundir: Path) -> dict[str, dict]:
    """Per head: number of steps, the median and mean seconds of the steps after the head's first one that
    compiled nothing."""
    path = rundir / STEP_RECORD
    if not path.exists():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines()]
    stats = {}
    for head in sorted({r["head"] for r in records}):
        mine = [r for r in records if r["head"] == head]
        timed = [r["seconds"] for r in mine[1:] if not r["compiled"]]
        stats[head] = {"steps": len(mine), "timed": len(timed),
                       "median": float(np.median(timed)) if timed else float("nan"),
                       "mean": float(np.mean(timed)) if timed else float("nan")}
    return stats


def model_probabilities(config: dict) -> dict[str, float]:
    """model_prob of a multitask input (default: proportional to the number of training systems)."""
    data = config["training"].get("data_dict")
    if data is None:
        return {"Default": 1.0}
    given = config["training"].get("model_prob") or {name: len(d["training_data"]["systems"]) for name, d in data.items()}
    total = sum(given.values())
    return {name: value / total for name, value in given.items()}


def expected_step(stats: dict[str, dict], probabilities: dict[str, float]) -> float:
    if set(probabilities) == {"Default"} and len(stats) == 1:
        return next(iter(stats.values()))["median"]
    return sum(p * stats[name]["median"] for name, p in probabilities.items()) if set(probabilities) <= set(stats) \
        else float("nan")


# ---------------------------------------------------------------------------------------------------
# Reading and checking the results
# ---------------------------------------------------------------------------------------------------

def lcurve_first_last(path: Path) -> tuple[list[str], np.ndarray]:
    header = next(line for line in path.read_text().splitlines() if line.startswith("#"))
    names = header.lstrip("#").split()
    rows = np.atleast_2d(np.loadtxt(path, comments="#"))
    return names, rows


def print_lcurve(path: Path, heads: list[str]) -> dict[str, tuple[float, float]]:
    """The first and last display lines, force and energy RMSE per head; returns {column: (first, last)}."""
    names, rows = lcurve_first_last(path)
    print(f"\nlcurve.out ({len(rows)} display lines): first (step {int(rows[0, 0])}) vs last (step {int(rows[-1, 0])})")
    print(f"  {'column':<24} {'first':>11} {'last':>11} {'last/first':>11}")
    result = {}
    for head in heads:
        for key in ("rmse_f_val", "rmse_f_trn", "rmse_e_val", "rmse_e_trn"):
            column = f"{key}_{head}" if len(heads) > 1 else key
            if column in names:
                first, last = rows[0, names.index(column)], rows[-1, names.index(column)]
                result[column] = (float(first), float(last))
                print(f"  {column:<24} {first:11.3e} {last:11.3e} {last / first:11.3f}")
    return result


def run_command(command: list[str], cwd: Path, log_name: str) -> tuple[int, str]:
    print(f"  $ (cd {cwd} && {' '.join(command)})", flush=True)
    completed = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    output = completed.stdout + completed.stderr
    (cwd / log_name).write_text(output)
    print("    " + "\n    ".join(output.strip().splitlines()[-14:]))
    if completed.returncode:
        print(f"    FAILED with status {completed.returncode}")
    return completed.returncode, output


def check_trained_model(rundir: Path, model: Path, data: Path) -> dict:
    """dpa3 test per head, dpa3 export --head water, and the .onnx file against model.npz on one frame."""
    results = {}
    validation = {"water": [WATER / "data_3"],
                  "molecules": [data / "molecules" / "valid" / name for name in MOLECULE_SYSTEMS]}
    for head, systems in validation.items():
        command = [str(OURS_CLI), "test", "--model", str(model), "--head", head]
        for system in systems:
            command += ["--system", str(system)]
        results[f"test {head}"] = run_command(command, rundir, f"test_{head}.log")[0]
    onnx = rundir / "water.onnx"
    results["export"] = run_command([str(OURS_CLI), "export", "--model", str(model), "--head", "water",
                                     "--out", str(onnx)], rundir, "export.log")[0]
    frame = one_frame_system(WATER / "data_3", 0, data / "water_frame")
    results["eval onnx"] = run_command([str(OURS_CLI), "eval", "--model", str(onnx), "--system", str(frame),
                                        "--out", str(rundir / "eval_onnx.npz")], rundir, "eval_onnx.log")[0]
    results["eval npz"] = run_command([str(OURS_CLI), "eval", "--model", str(model), "--head", "water",
                                       "--system", str(frame), "--out", str(rundir / "eval_npz.npz")],
                                      rundir, "eval_npz.log")[0]
    if results["eval onnx"] == 0 and results["eval npz"] == 0:
        a, b = np.load(rundir / "eval_onnx.npz"), np.load(rundir / "eval_npz.npz")
        n_atoms = a["forces"].shape[1]
        label_e = float(np.load(frame / "set.000" / "energy.npy")[0])
        label_f = np.load(frame / "set.000" / "force.npy")[0].reshape(-1, 3)
        comparison = {
            "energy_onnx": float(a["energy"][0]), "energy_npz": float(b["energy"][0]), "energy_label": label_e,
            "dE_per_atom": abs(float(a["energy"][0]) - float(b["energy"][0])) / n_atoms,
            "max_dF": float(np.max(np.abs(a["forces"] - b["forces"]))),
            "max_dV_per_atom": float(np.max(np.abs(a["virial"] - b["virial"]))) / n_atoms,
            "force_rmse_vs_label": float(np.sqrt(np.mean((b["forces"][0] - label_f) ** 2))),
        }
        print("\n  water.onnx vs model.npz --head water, frame 0 of data_3 (192 atoms):")
        print(f"    energy: onnx {comparison['energy_onnx']:.6f}, npz {comparison['energy_npz']:.6f}, "
              f"label {label_e:.6f} eV;  |dE|/atom {comparison['dE_per_atom']:.2e} eV, "
              f"max|dF| {comparison['max_dF']:.2e} eV/A, max|dV|/atom {comparison['max_dV_per_atom']:.2e} eV")
        results["onnx_vs_npz"] = comparison
    return results


# ---------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------

def print_timing_table(rows: list[tuple[str, str, dict, dict[str, dict], float]]) -> None:
    print("\nTIME PER TRAINING STEP (s; load = 1-minute load average before -> after the run, 2 cores)")
    print(f"  {'input':<10} {'trainer':<9} {'own report':>11} {'per-head median (timed steps/all)':<48} "
          f"{'expected':>9} {'load':>13} {'wall':>6}")
    for name, trainer, result, stats, expected in rows:
        heads = "  ".join(f"{h} {s['median']:.3f} ({s['timed']}/{s['steps']})" for h, s in stats.items())
        reported = f"{result['reported']:.3f}" if result.get("reported") is not None else "-"
        print(f"  {name:<10} {trainer:<9} {reported:>11} {heads:<48} {expected:9.3f} "
              f"{result['load_before']:5.2f}->{result['load_after']:5.2f} {result['wall_s']:6.0f}")


def timing_run(name: str, trainer: str, rundir: Path, probabilities: dict[str, float]) -> tuple:
    """One timed training run in RUNDIR: (input name, trainer, result, step statistics, expected s/step)."""
    result = run_official(rundir) if trainer == "official" else run_ours(rundir, ["--no-progress", "--no-plots"])
    stats = step_statistics(rundir)
    return name, trainer, result, stats, expected_step(stats, probabilities)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["official"]:
        official_side(Path(argv[1]))
        return 0
    if argv[:1] == ["ours"]:
        return ours_side(Path(argv[1]), argv[2:])
    parser = argparse.ArgumentParser(prog="python -m dpa3_ref.training_benchmark",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=None, help="work folder (default: a new one under /tmp)")
    parser.add_argument("--steps", type=int, default=200, help="steps of the multitask training run")
    parser.add_argument("--timing-steps", type=int, default=20, help="steps of each timing run")
    parser.add_argument("--repeats", type=int, default=1, help="official/ours pairs of the water timing")
    parser.add_argument("--skip", nargs="*", default=[], choices=("train", "multitask", "water"),
                        help="parts to leave out")
    args = parser.parse_args(argv)
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="dpa3-training-benchmark-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"work folder: {workdir}")
    data = workdir / "data"
    counts = split_molecules(data / "molecules")
    print("molecules split (training frames, validation frames): "
          + ", ".join(f"{name} {t}/{v}" for name, (t, v) in counts.items()))
    timing_rows, failures = [], []

    if "train" not in args.skip:
        print(f"\n[train] multitask water + molecules, {args.steps} steps of dpa3 train")
        config = multitask_input(data, args.steps, disp_freq=20)
        rundir = new_run(workdir / "multitask" / "ours", config)
        result = run_ours(rundir, ["--no-progress"])
        if result["status"] == 0 and "model" in result:
            print_lcurve(rundir / "lcurve.out", ["water", "molecules"])
            checks = check_trained_model(rundir, result["model"], data)
            failures += [name for name, status in checks.items() if isinstance(status, int) and status]
        else:
            failures.append("dpa3 train (multitask)")
        stats = step_statistics(rundir)
        timing_rows.append(("multitask", "ours", result, stats, expected_step(stats, model_probabilities(config))))

    if "multitask" not in args.skip:
        config = multitask_input(data, args.timing_steps, disp_freq=10)
        for trainer in ("official", "ours"):  # ours again, in the same conditions, unless `train` timed it
            if trainer == "ours" and "train" not in args.skip:
                continue
            print(f"\n[multitask] {trainer}, {args.timing_steps} steps")
            row = timing_run("multitask", trainer, new_run(workdir / "multitask" / f"{trainer}_timing", config),
                             model_probabilities(config))
            timing_rows.append(row)
            failures += [f"{trainer} multitask timing run"] if row[2]["status"] else []

    if "water" not in args.skip:
        config = water_input(args.timing_steps, disp_freq=5)
        for repeat in range(args.repeats):
            for trainer in ("official", "ours"):
                print(f"\n[water] {trainer}, {args.timing_steps} steps (repeat {repeat + 1}/{args.repeats})")
                row = timing_run("water", trainer, new_run(workdir / "water" / f"{trainer}_{repeat}", config),
                                 {"Default": 1.0})
                timing_rows.append(row)
                failures += [f"{trainer} water run {repeat}"] if row[2]["status"] else []

    print_timing_table(timing_rows)
    for name in ("multitask", "water"):
        ours = [row[4] for row in timing_rows if row[0] == name and row[1] == "ours"]
        official = [row[4] for row in timing_rows if row[0] == name and row[1] == "official"]
        if ours and official:
            print(f"  {name}: official / ours (expected s/step, medians over runs) = "
                  f"{np.median(official):.3f} / {np.median(ours):.3f} = {np.median(official) / np.median(ours):.1f}x")
    for name, trainer, result, _, _ in timing_rows:
        if result.get("reported_line"):
            print(f"  {name} {trainer} reports: {result['reported_line']}")
    if failures:
        print(f"\nFAILED: {', '.join(failures)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

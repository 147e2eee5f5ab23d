"""Training parity with the official code (issue 8): N steps of `dpa3 train` against `dp --pt train`.

A benchmark script, not a test and not part of the package's import graph:

    python -m dpa3_ref.training_parity [--workdir DIR] [--steps 20] [--official-only] [--noise-floor]

Both trainers start from the same official model file (`--init-model`), read the same `input.json` and
train on a one-frame dataset, so no data order, batching or sampling can differ. In float64 the trained
models must then agree to round-off accumulated over the steps. One comparison covers the loss, its
prefactors, the learning-rate schedule, gradient clipping, AdamW and its decoupled weight decay together.

What the script does (everything under --workdir, default a fresh folder under /tmp):

  data/           frame 0 of ../shared/data/water/data_0 (192 atoms, periodic) as deepmd/npy, float64,
                  plus a synthetic virial label (see `synthetic_virial`) so the virial term is active
  input.json      the reference model's architecture (water_small_f64/config.json, float64), the `ener`
                  loss with energy, force and virial prefactors, the `exp` learning rate, AdamW, clipping
  official/       deepmd-kit 3.2.0 (PyTorch, CPU) run by /work/dpref/bin/python: start.pt (the starting
                  checkpoint built from the .dp file), `dp --pt train input.json --init-model start.pt
                  --skip-neighbor-stat`, lcurve.out, steps.jsonl (lr, loss, RMSEs and gradient norm per
                  step at full precision) and trained.dp (the checkpoint after N steps, as a .dp file)
  ours/           `dpa3 train input.json --init-model MODEL.dp`; the model file named on its last line
                  (`final model: PATH`) is the result
  ours_ulp/       with --noise-floor: our run again from the start model with every float multiplied by
                  (1 +- 2^-52): the distance between the two runs is the round-off floor of the check

It then evaluates the start model, the official trained model and ours with dpa3_ref on four water
frames (the training frame, two more frames of data_0 and one of data_3), compares every parameter,
and the lcurve columns step by step, prints tables, and exits with status 1 when ours differs from the
official result by more than round-off (thresholds below), 0 otherwise.

How the official `--init-model` works (deepmd-kit 3.2.0, read in the installed wheel)
-------------------------------------------------------------------------------------
- deepmd/pt/entrypoints/main.py `train`: the path gets ".pt" appended unless it ends in ".pt"; the
  file is read with `torch.load(..., weights_only=True)`. A `.dp` or a frozen `.pth` cannot be given
  (`.pth` is a TorchScript archive; `--init-frz-model` exists for it), and `dp convert-backend` writes
  only `.pth` for the PyTorch backend (deepmd/pt/utils/serialization.py `deserialize_to_file`), so the
  starting checkpoint is built here: `deepmd.dpmodel.utils.serialization.load_dp_model(.dp)["model"]`
  -> `deepmd.pt.model.model.BaseModel.deserialize` -> `deepmd.pt.train.wrapper.ModelWrapper(model,
  model_params=input["model"])` -> `torch.save({"model": wrapper.state_dict(), "optimizer": None})`.
  The other direction (checkpoint -> .dp) is `deepmd.entrypoints.convert_backend.convert_backend`, i.e.
  `dp convert-backend model.ckpt-N.pt trained.dp`. Round trip start.pt -> .dp reproduces the
  reference model.dp bit for bit (checked by this script).
- deepmd/pt/train/training.py `Trainer.__init__`: when the loaded dict has a "model" key, its
  "optimizer" key is read too (a KeyError if absent) but only used by `--restart`; the checkpoint's
  `_extra_state` is replaced by the wrapper's own (model_params from input.json, train_infos) and
  `wrapper.load_state_dict(state_dict)` is strict: every parameter and buffer under
  "model.Default.atomic_model...." must be present. `start_step` is 0 (the checkpoint's step is read
  only for `--restart`), the optimizer is new (`_load_optimizer_state` returns unless restarting), EMA
  state is not loaded.
- Statistics are kept, not recomputed: `single_model_stat` calls `compute_or_load_stat` only when the
  trainer has no initial state, so davg/dstd (descriptor.repflows.mean/stddev), out_bias, out_std and
  fitting bias_atom_e all come from the checkpoint. `change_bias_after_training` defaults to false.
- Without `--skip-neighbor-stat` main.py computes neighbour statistics first (`BaseModel.update_sel`)
  and stores min_nbor_dist in the model; neither changes energies. This script passes the flag.

Facts that decide the trained numbers (file/function names in deepmd-kit 3.2.0 / torch 2.13)
-------------------------------------------------------------------------------------------
1. Step t = 0 .. N-1 (training.py `Trainer._run`, inner `step`): zero grads, forward + loss at the
   current parameters with lr_t, `loss.backward()`, clip, `optimizer.step()`, `scheduler.step()`.
2. Learning rate (deepmd/dpmodel/utils/learning_rate.py `LearningRateExp`): value(t) =
   max(start_lr * r^floor(t / s), stop_lr) with r = exp(ln(stop_lr / start_lr) / (N / s)) (a float
   division, so lr(N) = stop_lr when s divides N). If decay_steps s >= N and no decay_rate is given,
   s is replaced by 100 if N // 10 > 100 else N // 100 + 1 (so 1 for N < 100). The optimizer's lr is
   set by `torch.optim.lr_scheduler.LambdaLR(lambda t: value(t) / start_lr)` on initial_lr =
   start_lr (training.py `_create_lr_scheduler`), i.e. lr_t = start_lr * (value(t) / start_lr),
   equal to value(t) up to one ulp. The same lr_t (`scheduler.get_last_lr()[0]`) goes to the loss.
3. Prefactors (deepmd/pt/loss/ener.py `EnergyStdLoss.forward`): p = limit + (start - limit) *
   lr_t / start_lr, start_lr being `learning_rate.start_lr` of input.json. A term is active only if
   both its start and limit prefactors are non-zero (`has_e`, `has_f`, `has_v`), and it is multiplied
   by find_energy/find_force/find_virial (1 when the label file exists).
4. Loss, float64 (GLOBAL_PT_FLOAT_PRECISION), mse, `intensive_ener_virial` false (1/N, not 1/N^2);
   `_inject_atom_mask` adds an all-ones atom mask, so the masked formulas apply, which for one frame of
   N atoms read
       L = p_e (E - E^)^2 / N + p_f mean_{3N}(F - F^)^2 + p_v mean_9(V - V^)^2 / N.
   Displayed: rmse = sqrt(L), rmse_e = |E - E^| / N, rmse_f = sqrt(mean (F - F^)^2),
   rmse_v = sqrt(mean_9 (V - V^)^2) / N.
5. Clipping (deepmd/pt_expt/train/gradient.py `clip_grad_norm_`, then torch
   `nn.utils.clip_grads_with_norm_`): total = ||g||_2 over the parameters whose .grad is not None
   (computed as s * ||g / s||_2 in float64, s = the largest |g_i|), then every gradient is multiplied
   by min(max_norm / (total + 1e-6), 1). Note the + 1e-6: optax's `clip_by_global_norm` has none.
6. AdamW (torch/optim/adam.py `_single_tensor_adam`, decoupled_weight_decay=True; on CPU neither
   `fused` (training.py passes fused = device is not cpu) nor foreach is used), eps = 1e-8 (torch's
   default; input.json cannot set it), for step k = t + 1:
       p <- p (1 - lr_t wd)
       m <- m + (1 - b1)(g - m)             (m.lerp_(g, 1 - b1))
       v <- b2 v + (1 - b2) g^2
       p <- p - lr_t / (1 - b1^k) * m / (sqrt(v) / sqrt(1 - b2^k) + eps)
   Parameters whose .grad is None are skipped entirely, weight decay included: those outside the
   autograd graph of the loss (in this model the last layer's edge and angle updates and the angle
   updates feeding them) stay bit for bit unchanged (measured: their max |change| is exactly 0).
   optax's adamw would decay them; they do not affect energies or forces.
7. Trainable tensors (`wrapper.parameters()`): every MLP matrix, bias and idt (resnet timestep) and
   the res_residual vectors: 8713 numbers for water_small_f64. Buffers, never trained:
   descriptor.repflows.mean/stddev (davg/dstd), atomic_model.out_bias/out_std, fitting bias_atom_e,
   case_embd (when dim_case_embd > 0), min_nbor_dist.
8. lcurve.out (training.py `print_header`/`print_on_training`): the line of step k = t + 1 (written
   when k % disp_freq == 0 or k == 1) holds the loss terms of the forward pass of step t, i.e. at the
   parameters BEFORE update t, and lr_t, the rate that update used. Columns sorted by name: rmse,
   rmse_e, rmse_f, rmse_v (then lr); `%11.2e` (three significant digits), lr `%8.1e`. Without
   validation data there is no _val column.
9. The checkpoint after the last step is model.ckpt-N.pt (`save_freq` or the last step); EMA
   (`training.enable_ema`, default false) would be updated after each optimizer step; it is off here.
10. Labels are read as float64 (energy is `high_prec`); this script writes them as float64 so both
   readers see the same numbers.

Thresholds, and what limits agreement (measured with dpa3 train, water_small_f64, defaults below)
-------------------------------------------------------------------------------------------------
- The two implementations agree on the start model to 1.6e-13 eV/atom and 2e-16 eV/A. The official run
  is deterministic (one intra-op thread or two: bit-identical trained models). Our run from the start
  model with every float multiplied by (1 +- 2^-52) (`--noise-floor`) stays within 7e-16 of the
  unperturbed run in every parameter after 20 steps: the training does not amplify round-off in
  general.
- It does amplify it in one place: Adam's update lr g/(|g| + eps) with eps = 1e-8. After clipping
  (358 -> 5 at step 0) a few hundred gradient elements, tiny by cancellation (layer 0 node_sym,
  edge_self, edge_angle_1 weights), are of size ~eps, where an absolute gradient difference at the
  round-off of the gradient (~1e-16 of its norm) changes the update by ~lr 1e-5. After ONE step ours
  and the official model agree to <= 3e-14 in 99 % of the trained numbers (median 6e-17) but differ by
  up to 7e-9 in those elements (inferred |g_clipped| = 1e-9..3e-8); without clipping (--max-norm 0)
  the gradients are 70x larger, fewer elements sit at eps, and the largest difference drops to 2e-9
  (forces 6e-12 -> 2e-13 eV/A). Over 20 steps the perturbation spreads through the coupled updates:
  median |dp| 2.5e-13, 99th percentile 2e-10, max 8e-9; forces 6e-11 eV/A, energy 3e-12 eV/atom,
  virial 5e-12 eV/atom (the training moves them by 1e-1, 2e-1 and 5e-2).
- So ours fails when |dE|/atom > 1e-9 eV, max |dF| > 1e-9 eV/A, max |dV|/atom > 1e-9 eV, when the MEDIAN
  |difference| over the trained numbers exceeds 1e-11 (a systematic difference moves all of them: a
  relative 1e-8 in the learning rate gives ~1e-10 each, a missing weight decay ~1e-5), or when an lcurve
  value differs by more than its three printed digits allow. The largest parameter differences are
  printed, not failed; arrays the official run leaves untouched (fact 6) are reported, not failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
REFERENCE_MODEL = SHARED / "reference" / "water_small_f64" / "model.dp"
REFERENCE_CONFIG = SHARED / "reference" / "water_small_f64" / "config.json"
WATER = SHARED / "data" / "water"
OFFICIAL_PYTHON = Path("/work/dpref/bin/python")
OURS_CLI = ROOT / ".venv" / "bin" / "dpa3"

# Parity thresholds (see the module docstring).
TOLERANCE_ENERGY_PER_ATOM = 1e-9  # eV
TOLERANCE_FORCE = 1e-9  # eV/A
TOLERANCE_VIRIAL_PER_ATOM = 1e-9  # eV
TOLERANCE_PARAMETER_MEDIAN = 1e-11  # median over the trained numbers
LCURVE_PRINTED_RELATIVE = 5.1e-3  # half a unit in the 3rd significant digit of %11.2e, plus slack

SINGLE_TASK = "Default"  # the head name of a single-task model (deepmd-kit's and ours)

# The frames on which the trained models are compared: (system, frame index).
EVALUATION_FRAMES = (("data_0", 0), ("data_0", 1), ("data_0", 2), ("data_3", 0))


# ---------------------------------------------------------------------------------------------------
# The inputs both trainers read
# ---------------------------------------------------------------------------------------------------

def training_input(model_section: dict, steps: int, start_lr: float, stop_lr: float, decay_steps: int,
                   weight_decay: float, max_norm: float) -> dict:
    """deepmd-kit's input.json: one task, the reference architecture, every term of the algorithm active."""
    return {
        "model": model_section,
        "learning_rate": {"type": "exp", "start_lr": start_lr, "stop_lr": stop_lr, "decay_steps": decay_steps},
        "loss": {
            "type": "ener",
            "start_pref_e": 0.2, "limit_pref_e": 20.0,
            "start_pref_f": 100.0, "limit_pref_f": 60.0,
            "start_pref_v": 0.02, "limit_pref_v": 1.0,
        },
        "optimizer": {"type": "AdamW", "adam_beta1": 0.9, "adam_beta2": 0.999, "weight_decay": weight_decay},
        "training": {
            "training_data": {"systems": ["../data"], "batch_size": 1},
            "numb_steps": steps,
            "seed": 1,
            "disp_file": "lcurve.out",
            "disp_freq": 1,
            "save_freq": steps,
            "save_ckpt": "model.ckpt",
            "gradient_max_norm": max_norm,
        },
    }


def synthetic_virial(start_virial: np.ndarray, n_atoms: int) -> np.ndarray:
    """The virial label: the start model's own virial plus 0.1 eV per atom times a fixed symmetric matrix.

    The water data has no virial; this label makes the virial term of the loss non-zero (rmse_v about
    0.05 eV per atom at step 0) with a gradient that is not parallel to the energy term's.
    """
    offset = np.array([[1.0, 0.2, 0.1], [0.2, -1.0, 0.3], [0.1, 0.3, 0.5]])
    return (start_virial + 0.1 * n_atoms * offset).reshape(1, 9)


def write_one_frame_system(source: Path, frame: int, virial: np.ndarray, target: Path) -> None:
    """deepmd/npy system holding one frame of `source`, every array float64 (exact casts of float32)."""
    (target / "set.000").mkdir(parents=True, exist_ok=True)
    for name in ("type.raw", "type_map.raw"):
        shutil.copyfile(source / name, target / name)
    for name in ("box", "coord", "energy", "force"):
        array = np.load(source / "set.000" / f"{name}.npy")
        np.save(target / "set.000" / f"{name}.npy", array[frame:frame + 1].astype(np.float64))
    np.save(target / "set.000" / "virial.npy", virial.astype(np.float64))


def read_frame(system: Path, frame: int) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Coordinates [atoms, 3], element names and cell [3, 3] of one deepmd/npy frame."""
    type_map = (system / "type_map.raw").read_text().split()
    types = [type_map[int(t)] for t in (system / "type.raw").read_text().split()]
    coord = np.load(system / "set.000" / "coord.npy")[frame].astype(np.float64).reshape(-1, 3)
    cell = np.load(system / "set.000" / "box.npy")[frame].astype(np.float64).reshape(3, 3)
    return coord, types, cell


# ---------------------------------------------------------------------------------------------------
# The official side: runs inside deepmd-kit's virtual environment (torch), as
#     /work/dpref/bin/python -P training_parity.py official WORKDIR MODEL STEPS
# ---------------------------------------------------------------------------------------------------

def official_side(rundir: Path, model_file: Path, steps: int) -> None:
    """Build start.pt from the .dp file, run `dp --pt train --init-model`, write trained.dp and steps.jsonl."""
    import torch
    from deepmd.dpmodel.utils.serialization import load_dp_model
    from deepmd.entrypoints.convert_backend import convert_backend
    from deepmd.main import main as dp_main
    from deepmd.pt.loss.ener import EnergyStdLoss
    from deepmd.pt.model.model import BaseModel
    from deepmd.pt.train import training
    from deepmd.pt.train.wrapper import ModelWrapper

    os.chdir(rundir)
    config = json.loads(Path("input.json").read_text())
    model = BaseModel.deserialize(load_dp_model(str(model_file))["model"])
    wrapper = ModelWrapper(model, model_params=config["model"])
    torch.save({"model": wrapper.state_dict(), "optimizer": None}, "start.pt")
    convert_backend(INPUT="start.pt", OUTPUT="start.dp")  # round trip, compared with MODEL by the caller

    # Record what lcurve.out prints with three digits at full precision; nothing numerical changes.
    records: list[dict] = []
    loss_forward = EnergyStdLoss.forward

    def recording_forward(self, input_dict, model, label, natoms, learning_rate, mae=False):
        prediction, loss, more = loss_forward(self, input_dict, model, label, natoms, learning_rate, mae)
        records.append({"lr": float(learning_rate), "rmse": math.sqrt(float(loss)),
                        **{k: float(v) for k, v in more.items() if k.startswith("rmse_")}})
        return prediction, loss, more

    clip = training.clip_grad_norm_

    def recording_clip(*args, **kwargs):
        total = clip(*args, **kwargs)
        records[-1]["grad_norm"] = float(total)
        return total

    EnergyStdLoss.forward = recording_forward
    training.clip_grad_norm_ = recording_clip
    dp_main(["--pt", "train", "input.json", "--init-model", "start.pt", "--skip-neighbor-stat"])
    with open("steps.jsonl", "w") as stream:
        for step, record in enumerate(records):
            stream.write(json.dumps({"step": step, **record}) + "\n")
    convert_backend(INPUT=f"model.ckpt-{steps}.pt", OUTPUT="trained.dp")


def run_official(workdir: Path, name: str, model_file: Path, steps: int, threads: int | None) -> Path:
    """The official run in WORKDIR/NAME (a subprocess in deepmd-kit's venv); returns the folder."""
    rundir = workdir / name
    rundir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(workdir / "input.json", rundir / "input.json")
    env = dict(os.environ)
    if threads is not None:
        env["DP_INTRA_OP_PARALLELISM_THREADS"] = str(threads)
        env["DP_INTER_OP_PARALLELISM_THREADS"] = "1"
    command = [str(OFFICIAL_PYTHON), "-P", str(Path(__file__).resolve()), "official", str(rundir),
               str(model_file.resolve()), str(steps)]
    print(f"[official] {' '.join(command)}  (log: {rundir / 'train.log'})", flush=True)
    with open(rundir / "train.log", "w") as log:
        status = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    if status != 0 or not (rundir / "trained.dp").exists():
        sys.exit(f"the official run failed (status {status}); see {rundir / 'train.log'}")
    return rundir


# ---------------------------------------------------------------------------------------------------
# Our side
# ---------------------------------------------------------------------------------------------------

def run_ours(workdir: Path, model_file: Path, name: str = "ours") -> Path | None:
    """`dpa3 train input.json --init-model MODEL` in WORKDIR/NAME; the model file of its last line."""
    rundir = workdir / name
    rundir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(workdir / "input.json", rundir / "input.json")
    command = [str(OURS_CLI), "train", "input.json", "--init-model", str(model_file.resolve()), "--no-progress",
               "--no-plots"]
    print(f"[ours] {' '.join(command)}  (log: {rundir / 'train.log'})", flush=True)
    with open(rundir / "train.log", "w") as log:
        status = subprocess.run(command, cwd=rundir, stdout=log, stderr=subprocess.STDOUT).returncode
    lines = (rundir / "train.log").read_text().strip().splitlines()
    if status != 0 or not lines or not lines[-1].startswith("final model: "):
        print(f"our run failed (status {status}); see {rundir / 'train.log'}")
        return None
    final = Path(lines[-1].removeprefix("final model: ").strip())
    return final if final.is_absolute() else rundir / final


def perturbed_model(model_file: Path, target: Path) -> Path:
    """A copy of a .dp file with every float64 array multiplied by 1 +- 2^-52 (random signs, seed 0)."""
    import h5py

    shutil.copyfile(model_file, target)
    signs = np.random.default_rng(0)
    with h5py.File(target, "r+") as h5:
        for name in h5:
            array = h5[name][()]
            if array.dtype == np.float64 and array.size:
                h5[name][...] = array * (1 + signs.choice([-1.0, 1.0], size=array.shape) * 2.0**-52)
    return target


# ---------------------------------------------------------------------------------------------------
# Comparison
# ---------------------------------------------------------------------------------------------------

def evaluate(model_file: Path) -> list[dict[str, np.ndarray]]:
    """Energy, forces and virial of a model on EVALUATION_FRAMES, computed by dpa3_ref."""
    import dpa3_ref

    potential = dpa3_ref.load(model_file, head=SINGLE_TASK)
    return [potential.evaluate(*read_frame(WATER / system, frame)) for system, frame in EVALUATION_FRAMES]


def parameters(model_file: Path) -> dict[str, np.ndarray]:
    """Every array of a model file by its dpa3_ref name."""
    import dpa3_ref
    from dpa3_ref.checkpoint import leaves_by_name

    model = dpa3_ref.load(model_file, head=SINGLE_TASK).model
    return {name: np.asarray(leaf) for name, leaf in leaves_by_name(model).items()}


def output_differences(a: list[dict], b: list[dict]) -> list[dict[str, float]]:
    """Per frame: |dE| per atom, max |dF|, max |dV| per atom, and |E| per atom for scale."""
    rows = []
    for x, y in zip(a, b, strict=True):
        n_atoms = x["forces"].shape[0]
        rows.append({
            "energy_per_atom": abs(float(x["energy"]) - float(y["energy"])) / n_atoms,
            "force": float(np.max(np.abs(x["forces"] - y["forces"]))),
            "virial_per_atom": float(np.max(np.abs(x["virial"] - y["virial"]))) / n_atoms,
        })
    return rows


def print_output_table(title: str, rows: list[dict[str, float]]) -> None:
    print(f"\n{title}")
    print(f"  {'frame':<12} {'|dE|/atom (eV)':>16} {'max|dF| (eV/A)':>16} {'max|dV|/atom (eV)':>18}")
    for (system, frame), row in zip(EVALUATION_FRAMES, rows, strict=True):
        print(f"  {system}[{frame}]{'':<4} {row['energy_per_atom']:16.3e} {row['force']:16.3e} "
              f"{row['virial_per_atom']:18.3e}")


def parameter_differences(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, float]:
    """Max |difference| per named array (arrays present in both)."""
    return {name: float(np.max(np.abs(a[name] - b[name]), initial=0.0)) for name in a if name in b}


def read_lcurve(path: Path) -> tuple[list[str], np.ndarray]:
    """Column names and rows of a deepmd-kit lcurve.out."""
    header = next(line for line in path.read_text().splitlines() if line.startswith("#"))
    names = header.lstrip("#").split()
    return names, np.atleast_2d(np.loadtxt(path, comments="#"))


def compare_lcurves(official: Path, ours: Path, full_precision: Path) -> bool:
    """Column by column, to what lcurve's three printed digits allow; prints a table; True when equal."""
    names_o, rows_o = read_lcurve(official)
    names_u, rows_u = read_lcurve(ours)
    steps = [json.loads(line) for line in full_precision.read_text().splitlines()]
    common = [name for name in names_o if name in names_u]
    missing = [name for name in names_o if name not in names_u]
    if missing:
        print(f"\nlcurve: columns missing from ours: {missing}")
    n = min(len(rows_o), len(rows_u))
    if len(rows_o) != len(rows_u):
        print(f"\nlcurve: {len(rows_o)} official lines, {len(rows_u)} ours; comparing the first {n}")
    print("\nlcurve, step by step (official at full precision from steps.jsonl; rel = |ours - official| / |official|)")
    print("  " + " ".join(f"{name:>24}" for name in common))
    ok = not missing and len(rows_o) == len(rows_u)
    first_bad = None
    for row in range(n):
        step = int(rows_o[row, names_o.index("step")])
        cells = []
        for name in common:
            mine = rows_u[row, names_u.index(name)]
            if name == "step":
                cells.append(f"{step:>24d}")
                continue
            key = name.removesuffix("_trn")
            exact = steps[step - 1][key] if key in steps[step - 1] else rows_o[row, names_o.index(name)]
            relative = abs(mine - exact) / max(abs(exact), 1e-300)
            limit = 5.1e-2 if name == "lr" else LCURVE_PRINTED_RELATIVE  # lr is printed with 2 digits
            bad = relative > limit
            ok &= not bad
            if bad and first_bad is None:
                first_bad = (step, name, mine, exact)
            cells.append(f"{mine:11.4e} {relative:8.1e}{'!' if bad else ' '}  ")
        print("  " + " ".join(cells))
    if first_bad:
        step, name, mine, exact = first_bad
        print(f"  first difference beyond the printed digits: step {step}, {name}: ours {mine:.6e}, "
              f"official {exact:.10e}")
    return ok


def print_official_steps(path: Path) -> None:
    """The official per-step record at full precision (what lcurve.out rounds)."""
    print("\nofficial steps (full precision; values of the forward pass before update t, lr_t, pre-clip norm)")
    print(f"  {'t':>3} {'lr':>22} {'rmse':>22} {'rmse_e':>22} {'rmse_f':>22} {'rmse_v':>22} {'grad_norm':>22}")
    for line in path.read_text().splitlines():
        r = json.loads(line)
        print(f"  {r['step']:>3} " + " ".join(f"{r.get(k, float('nan')):22.15e}"
                                           for k in ("lr", "rmse", "rmse_e", "rmse_f", "rmse_v", "grad_norm")))


def within(rows: list[dict[str, float]]) -> bool:
    return all(r["energy_per_atom"] <= TOLERANCE_ENERGY_PER_ATOM and r["force"] <= TOLERANCE_FORCE
               and r["virial_per_atom"] <= TOLERANCE_VIRIAL_PER_ATOM for r in rows)


# ---------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------

def prepare(workdir: Path, model_file: Path, args: argparse.Namespace) -> None:
    """WORKDIR/data (one frame with a synthetic virial) and WORKDIR/input.json."""
    start = evaluate(model_file)[0]  # the training frame is EVALUATION_FRAMES[0]
    coord, _, _ = read_frame(WATER / "data_0", 0)
    virial = synthetic_virial(start["virial"], len(coord))
    write_one_frame_system(WATER / "data_0", 0, virial, workdir / "data")
    model_section = json.loads(REFERENCE_CONFIG.read_text())
    config = training_input(model_section, args.steps, args.start_lr, args.stop_lr, args.decay_steps,
                            args.weight_decay, args.max_norm)
    (workdir / "input.json").write_text(json.dumps(config, indent=2))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["official"]:  # the subprocess in deepmd-kit's venv
        official_side(Path(argv[1]), Path(argv[2]), int(argv[3]))
        return 0
    parser = argparse.ArgumentParser(prog="python -m dpa3_ref.training_parity", description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=None, help="work folder (default: a new one under /tmp)")
    parser.add_argument("--model", type=Path, default=REFERENCE_MODEL, help="official float64 .dp to start from")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--start-lr", type=float, default=1e-3)
    parser.add_argument("--stop-lr", type=float, default=1e-4)
    parser.add_argument("--decay-steps", type=int, default=5)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--max-norm", type=float, default=5.0)
    parser.add_argument("--official-only", action="store_true", help="run and report the official side only")
    parser.add_argument("--reuse-official", action="store_true", help="keep WORKDIR/official if it has trained.dp")
    parser.add_argument("--noise-floor", action="store_true",
                        help="run ours again from a start perturbed by one ulp: the round-off floor")
    args = parser.parse_args(argv)
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="dpa3-training-parity-"))).resolve()
    if workdir.is_relative_to(SHARED.resolve()):
        sys.exit("--workdir must not be inside ../shared")
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"work folder: {workdir}")

    if not (args.reuse_official and (workdir / "official" / "trained.dp").exists()):
        prepare(workdir, args.model, args)
        run_official(workdir, "official", args.model, args.steps, threads=None)
    official = workdir / "official"
    print_official_steps(official / "steps.jsonl")

    start_params, official_params = parameters(args.model), parameters(official / "trained.dp")
    round_trip = max(parameter_differences(start_params, parameters(official / "start.dp")).values())
    print(f"\nstart.pt -> .dp round trip: max |difference| to {args.model.name} = {round_trip:.1e}")
    moved = parameter_differences(start_params, official_params)
    frozen = sorted(name for name, d in moved.items() if d == 0.0)
    print(f"official training moved the parameters by up to {max(moved.values()):.3e}; unchanged arrays: {frozen}")

    start_out, official_out = evaluate(args.model), evaluate(official / "trained.dp")
    print_output_table("official trained vs start (how far N steps move the outputs)",
                       output_differences(official_out, start_out))

    if args.official_only:
        return 0
    if not OURS_CLI.exists():
        sys.exit(f"{OURS_CLI} not found: install the package (`pip install -e .`) first")
    ours_file = run_ours(workdir, args.model)
    if ours_file is None:
        return 1
    ours_out = evaluate(ours_file)
    if args.noise_floor:
        perturbed = perturbed_model(args.model, workdir / "start_ulp.dp")
        floor_file = run_ours(workdir, perturbed, "ours_ulp")
        if floor_file is not None:
            print_output_table("noise floor: ours from the start model perturbed by one ulp vs ours",
                               output_differences(evaluate(floor_file), ours_out))
            floor = parameter_differences(parameters(floor_file), parameters(ours_file))
            print(f"  trained parameters: max |difference| {max(floor[n] for n in floor if n not in frozen):.3e}")
    parity = output_differences(ours_out, official_out)
    print_output_table("PARITY: ours vs official trained model", parity)
    ours_params = parameters(ours_file)
    param_diff = parameter_differences(ours_params, official_params)
    trained = {name: d for name, d in param_diff.items() if name not in frozen}
    elementwise = np.concatenate([np.abs(ours_params[n] - official_params[n]).ravel() for n in trained])
    median = float(np.median(elementwise))
    print(f"\nparameters the official run trained ({elementwise.size} numbers): |ours - official| median {median:.2e}, "
          f"90 % {np.quantile(elementwise, 0.9):.2e}, 99 % {np.quantile(elementwise, 0.99):.2e}, "
          f"max {elementwise.max():.2e}")
    print(f"largest per array (the official run moved them by up to {max(moved.values()):.1e}):")
    for name, d in sorted(trained.items(), key=lambda item: -item[1])[:8]:
        print(f"  {name:<48} {d:.3e}   (moved {moved[name]:.3e})")
    changed_frozen = {name: param_diff[name] for name in frozen if param_diff.get(name, 0.0) > 0.0}
    if changed_frozen:  # reported, not failed: these arrays cannot change energies or forces
        print("note: arrays outside the loss's autograd graph, which torch leaves untouched (grad None: no "
              f"weight decay), changed in ours by up to {max(changed_frozen.values()):.3e}: {sorted(changed_frozen)}")
    lcurve_ok = compare_lcurves(official / "lcurve.out", workdir / "ours" / "lcurve.out", official / "steps.jsonl")

    outputs_ok = within(parity)
    params_ok = median <= TOLERANCE_PARAMETER_MEDIAN
    print(f"\nthresholds: |dE|/atom, max|dF|, max|dV|/atom <= {TOLERANCE_ENERGY_PER_ATOM:.0e}; median parameter "
          f"difference <= {TOLERANCE_PARAMETER_MEDIAN:.0e}; lcurve to its printed digits")
    print(f"outputs: {'OK' if outputs_ok else 'DIFFER'}; parameters: {'OK' if params_ok else 'DIFFER'}; "
          f"lcurve: {'OK' if lcurve_ok else 'DIFFER'}")
    return 0 if outputs_ok and params_ok and lcurve_ok else 1


if __name__ == "__main__":
    sys.exit(main())

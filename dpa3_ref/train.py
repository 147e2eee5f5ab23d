"""`dpa3 train`: deepmd-kit's training algorithm on a DPA3 model (docs/training.md).

One step t (0-based) of the official loop, for t = t_0 … numb_steps − 1:

    head   ~ model_prob                               multitask: draw the task (rng seeded by (seed, t))
    batch  = next batch of that head's data            one system, its own shuffled epochs (batches.Sampler)
    η      = lr(t),  p = p(η)                          schedule.py
    (L, metrics), g = ∇_θ ener_loss(model_head(θ), batch, p)      loss.py; forces inside L: second order
    θ, opt = clip + Adam/AdamW(θ, g, η)                 optimizer.py
    θ_ema  = d θ_ema + (1 − d) θ                        only with training.enable_ema

and at display steps (t + 1 a multiple of disp_freq, and t = 0) one lcurve.out line: the metrics of this
step's batch (before the update; in multitask, the other heads' on a next training batch each, after it),
the validation metrics after the update, and η. Checkpoints every save_freq steps
and at the end; Ctrl-C and SIGTERM write one before exiting.

Everything a step depends on is saved in a checkpoint: θ (with the buffers), the optimizer state, θ_ema,
the step, every sampler's position and the padded table widths (which fix the compiled programs, and so the
order of floating-point sums). `--restart` therefore continues bit for bit: N + M steps after a restart equal
N + M steps in one go.

Starting points (deepmd-kit's flags): from scratch (statistics from the data), `--init-model M` (weights,
statistics and energy offsets of M; step 0 and a fresh optimizer), `--restart CKPT` (everything),
`--finetune M [--model-branch B]` (finetune.py: weights of M, energy offsets re-fitted to the new data).

Several devices, of one process or of several joined by jax.distributed.initialize() (`--distributed`): each
batch's atoms are split over all of them and the parameters replicated (plain jax.sharding); every process
builds the same batch, and process 0 alone writes files (docs/training.md §9).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from dpa3_ref.batches import Labels, Sampler, batches_per_epoch, make_batch, system_probabilities
from dpa3_ref.checkpoint import TRAINING_CHECKPOINT_FORMAT as CHECKPOINT_FORMAT
from dpa3_ref.checkpoint import fill_like, leaves_by_name, load_model, save_model, write_npz
from dpa3_ref.data import System, read_systems
from dpa3_ref.errors import Dpa3Error
from dpa3_ref.inputs import HeadConfig, LossConfig, TrainInput, read_input
from dpa3_ref.loss import ener_loss, has_term
from dpa3_ref.model import energy_forces_virial
from dpa3_ref.multitask import Head, MultiTaskModel, init_multitask, single_task
from dpa3_ref.optimizer import make_optimizer, reaches_loss, trainable_filter
from dpa3_ref.schedule import ExpSchedule, exp_schedule, prefactor

TERMS = ("e", "f", "v", "ae")


# ------------------------------------------------------------------------------------------- the step
def loss_of(params, static, graph, labels: Labels, prefactors, head: str, loss: LossConfig):
    """L and the metrics of one batch for the model θ = params ∪ static, head `head`."""
    model = eqx.combine(params, static).head(head)
    return ener_loss(energy_forces_virial(model, graph), labels, prefactors, loss)


@eqx.filter_jit
def train_step(params, static, opt_state, ema, graph, labels, prefactors, learning_rate, head, loss, optimizer, ema_decay):
    """One optimizer update; returns the new params, optimizer state, EMA params and this batch's metrics."""
    (_, metrics), grads = eqx.filter_value_and_grad(loss_of, has_aux=True)(
        params, static, graph, labels, prefactors, head, loss
    )
    updates, opt_state = optimizer.update(grads, opt_state, params, learning_rate=learning_rate)
    params = eqx.apply_updates(params, updates)
    if ema is not None:
        ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, ema, params)
    return params, opt_state, ema, metrics


@eqx.filter_jit
def evaluate_step(params, static, graph, labels, prefactors, head, loss):
    return loss_of(params, static, graph, labels, prefactors, head, loss)[1]


# ------------------------------------------------------------------------------------------- data
@dataclasses.dataclass
class HeadData:
    """The training and validation data of one head, and where its sampler stands."""

    config: HeadConfig
    systems: list[System]
    batch_sizes: list[int]
    sampler: Sampler
    validation: list[System]
    validation_batch_sizes: list[int]


def load_head_data(head: HeadConfig, seed: int) -> HeadData:
    """Read and check every system of a head before training starts (errors name the file)."""
    type_map = list(head.model.type_map)
    systems = read_systems(head.training_data.systems, type_map)
    batch_sizes = [head.training_data.batch_size_of(i, s.n_atoms) for i, s in enumerate(systems)]
    n_batches = [batches_per_epoch(s.n_frames, b) for s, b in zip(systems, batch_sizes, strict=True)]
    probabilities = system_probabilities(n_batches, head.training_data.auto_prob, head.training_data.sys_probs)
    sampler = Sampler([s.n_frames for s in systems], batch_sizes, probabilities, seed=seed)
    validation, validation_sizes = [], []
    if head.validation_data is not None:
        validation = read_systems(head.validation_data.systems, type_map)
        validation_sizes = [head.validation_data.batch_size_of(i, s.n_atoms) for i, s in enumerate(validation)]
    return HeadData(head, systems, batch_sizes, sampler, validation, validation_sizes)


def draw_head(heads: list[str], probabilities: np.ndarray, seed: int, step: int) -> str:
    """The task of step t: a draw with the heads' model_prob from a generator seeded by (seed, t)."""
    if len(heads) == 1:
        return heads[0]
    return heads[int(np.random.default_rng([seed, step, 7]).choice(len(heads), p=probabilities))]


class Widths:
    """Padded sizes (atoms, M, K) per system, only ever growing: one compilation per system size, and the
    same padding (so the same sums) after a restart."""

    def __init__(self, state: dict | None = None, multiple: int = 1):
        self.seen: dict[str, list[int]] = dict(state or {})
        self.multiple = multiple  # atoms padded to a multiple of the device count (data parallelism)

    def batch(self, key: str, system: System, frames: np.ndarray, config):
        graph, labels = make_batch(system, frames, config, widths=self.seen.get(key))
        if graph.n_atoms % self.multiple:
            widths = (-(-graph.n_atoms // self.multiple) * self.multiple, graph.max_neighbors, graph.max_angle_neighbors)
            graph, labels = make_batch(system, frames, config, widths=widths)
        self.seen[key] = [graph.n_atoms, graph.max_neighbors, graph.max_angle_neighbors]
        self.last_shape = (*self.seen[key], graph.n_frames)  # what the compiled step depends on
        return graph, labels


# ------------------------------------------------------------------------------------------- the run
@dataclasses.dataclass
class TrainState:
    """What a checkpoint holds."""

    model: MultiTaskModel
    opt_state: object
    ema: object  # EMA of the trainable params (None without training.enable_ema)
    step: int  # next step to run
    samplers: dict[str, dict]
    widths: dict[str, list[int]]
    best: float = math.inf  # best validation score so far (see validation_score)


class Trainer:
    """The data, schedule and optimizer of a run; `start_from(model)` or `restore(checkpoint)` sets its state."""

    def __init__(self, config: TrainInput, workdir: Path):
        self.config, self.workdir = config, workdir
        self.seed = config.seed if config.seed is not None else 0
        self.heads = {head.name: head for head in config.heads}
        self.head_probabilities = np.array([head.model_prob for head in config.heads])
        self.data = {head.name: load_head_data(head, self.seed + index) for index, head in enumerate(config.heads)}
        lr = config.learning_rate
        self.schedule: ExpSchedule = exp_schedule(
            lr.start_lr, config.numb_steps, stop_lr=lr.stop_lr, stop_lr_ratio=lr.stop_lr_ratio,
            decay_steps=lr.decay_steps, decay_rate=lr.decay_rate, warmup_steps=lr.warmup_steps,
            warmup_ratio=lr.warmup_ratio, warmup_start_factor=lr.warmup_start_factor, smooth=lr.smooth,
        )
        self.optimizer = make_optimizer(config.optimizer, config.gradient_max_norm)
        self.mesh = data_parallel_mesh()
        self.writes_files = jax.process_index() == 0  # several processes: all compute, process 0 writes
        self.widths = Widths(multiple=self.mesh.size if self.mesh is not None else 1)
        self.stop_signal: int | None = None
        self.last_checkpoint: Path | None = None  # written (or restarted from) by this run
        self.step_times: list[float] = []
        self.state: TrainState | None = None

    def start_from(self, model: MultiTaskModel) -> None:
        """Step 0 with these weights: a fresh optimizer (and EMA) state."""
        self.unused = self.unused_arrays(model)
        params, _ = eqx.partition(model, self.trainable(model))
        self.state = self.replicated(TrainState(model=model, opt_state=self.optimizer.init(params),
                                                ema=params if self.config.enable_ema else None, step=0,
                                                samplers={}, widths={}))

    def trainable(self, model: MultiTaskModel):
        return trainable_filter(model, self.unused)

    def unused_arrays(self, model: MultiTaskModel) -> frozenset[str]:
        """The paths of the arrays no head's loss reads (optimizer.reaches_loss on one frame of each head)."""
        params, static = eqx.partition(model, trainable_filter(model))
        used = None
        for name, data in self.data.items():
            graph, labels = make_batch(data.systems[0], np.array([0]), self.heads[name].model)
            reaches = reaches_loss(lambda p: loss_of(p, static, graph, labels, self.prefactors(name, 1.0), name,
                                                     self.heads[name].loss)[0], params)
            used = reaches if used is None else jax.tree.map(lambda a, b: a or b, used, reaches)
        flat = jax.tree_util.tree_flatten_with_path(used)[0]
        return frozenset(jax.tree_util.keystr(path) for path, reached in flat if not reached)

    def restore(self, checkpoint: Path) -> None:
        """The state of a checkpoint written by this input (`--restart`)."""
        shapes = eqx.filter_eval_shape(init_multitask, heads_of(self.config), key=jax.random.key(0))
        self.start_from(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes))  # the names and shapes to read
        self.last_checkpoint = latest_checkpoint(Path(checkpoint))
        self.state = self.replicated(read_checkpoint(self.last_checkpoint, skeleton=self.state))

    def replicated(self, state: TrainState) -> TrainState:
        """The model, optimizer state and EMA whole on every device of the mesh, with process 0's numbers.

        jit takes its inputs where they are, and a model built or read by one process lives on one of its
        devices, which the other processes cannot address. Process 0's numbers are broadcast so that a
        statistic that differs in the last bit from host to host cannot leave the copies different."""
        if self.mesh is None:
            return state
        everywhere = NamedSharding(self.mesh, PartitionSpec())
        arrays, rest = eqx.partition((state.model, state.opt_state, state.ema), eqx.is_array)
        arrays = jax.tree.map(lambda x: jax.make_array_from_callback(x.shape, everywhere, lambda index: x[index]),
                              multihost_utils.broadcast_one_to_all(arrays))
        model, opt_state, ema = eqx.combine(arrays, rest)
        return dataclasses.replace(state, model=model, opt_state=opt_state, ema=ema)

    # ---------------------------------------------------------------- one step
    def prefactors(self, head: str, learning_rate: float) -> dict[str, jax.Array]:
        loss = self.heads[head].loss
        return {t: jnp.float64(prefactor(getattr(loss, f"start_pref_{t}"), getattr(loss, f"limit_pref_{t}"),
                                         learning_rate, self.schedule.start_lr)) for t in TERMS}

    def next_batch(self, head: str):
        data = self.data[head]
        system, frames = data.sampler.next_batch()
        graph, labels = self.widths.batch(f"{head}/{system}", data.systems[system], frames, self.heads[head].model)
        return self.place(graph), self.place(labels)

    def place(self, tree):
        """Shard arrays with an atom axis over the devices (data parallelism); others are replicated.

        Every process builds the same whole batch (same data, same seeded sampler) and gives JAX the pieces
        that belong on its own devices."""
        if self.mesh is None:
            return tree
        n_atoms = tree.atom_mask.shape[0] if isinstance(tree, Labels) else tree.positions.shape[0]

        def put(x):
            if not isinstance(x, np.ndarray | jax.Array):
                return x
            x = np.asarray(x)
            spec = PartitionSpec("data") if x.ndim and x.shape[0] == n_atoms else PartitionSpec()
            return jax.make_array_from_callback(x.shape, NamedSharding(self.mesh, spec), lambda index: x[index])

        return jax.tree.map(put, tree)

    def run_step(self, step: int) -> tuple[str, float, dict[str, float]]:
        state = self.state
        head = draw_head(list(self.heads), self.head_probabilities, self.seed, step)
        learning_rate = self.schedule(step)
        graph, labels = self.next_batch(head)
        params, static = eqx.partition(state.model, self.trainable(state.model))
        params, state.opt_state, state.ema, metrics = train_step(
            params, static, state.opt_state, state.ema, graph, labels, self.prefactors(head, learning_rate),
            jnp.float64(learning_rate), head, self.heads[head].loss, self.optimizer, self.config.ema_decay,
        )
        state.model = eqx.combine(params, static)
        state.step = step + 1
        return head, learning_rate, {k: float(v) for k, v in metrics.items()}

    # ---------------------------------------------------------------- validation
    def evaluate_training_batch(self, head: str, learning_rate: float) -> dict[str, float]:
        """The metrics of the head's next training batch under the current weights (no update)."""
        graph, labels = self.next_batch(head)
        params, static = eqx.partition(self.state.model, self.trainable(self.state.model))
        metrics = evaluate_step(params, static, graph, labels, self.prefactors(head, learning_rate), head,
                                self.heads[head].loss)
        return {k: float(v) for k, v in metrics.items()}

    def validate(self, head: str, learning_rate: float) -> dict[str, float]:
        """deepmd-kit's validation: numb_btch batches per system, metrics weighted by their real atoms."""
        data, config = self.data[head], self.heads[head]
        if not data.validation:
            return {}
        model = self.state.model
        params, static = eqx.partition(model, self.trainable(model))
        if self.state.ema is not None:
            params = self.state.ema
        sums, atoms = {}, 0
        for index, system in enumerate(data.validation):
            size = data.validation_batch_sizes[index]
            for batch in range(config.validation_data.numb_btch):
                start = (batch * size) % system.n_frames
                frames = (start + np.arange(size)) % system.n_frames
                graph, labels = self.widths.batch(f"{head}/validation/{index}", system, frames, config.model)
                metrics = evaluate_step(params, static, self.place(graph), self.place(labels),
                                        self.prefactors(head, learning_rate), head, config.loss)
                n = int(np.sum(np.asarray(labels.atom_mask)))
                atoms += n
                for key, value in metrics.items():
                    sums[key] = sums.get(key, 0.0) + float(value) * n
        return {key: value / atoms for key, value in sums.items()}

    # ---------------------------------------------------------------- the loop
    def train(self, progress: bool = True) -> TrainState:
        from tqdm import tqdm

        config, state = self.config, self.state
        self.first_step = state.step
        for name, data in self.data.items():
            if name in state.samplers:
                data.sampler.load_state(state.samplers[name])
        self.widths.seen.update(state.widths)
        # the other processes compute the same lines (validation runs on all devices) and drop them
        disp_file = self.workdir / config.disp_file if self.writes_files else Path(os.devnull)
        lcurve = LearningCurve(disp_file, list(self.heads), restart=state.step > 0)
        handlers = {s: signal.signal(s, self.request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        compiled: set = set()
        # disable=None: no bar when the output is not a terminal (a log file would get one line per update)
        show_bar = progress and self.writes_files
        bar = tqdm(total=config.numb_steps, initial=state.step, disable=None if show_bar else True, unit="step",
                   dynamic_ncols=True, desc="train")
        try:
            for step in range(state.step, config.numb_steps):
                started = time.perf_counter()
                head, learning_rate, metrics = self.run_step(step)
                if not math.isfinite(metrics["rmse"]):
                    raise self.diverged(step + 1, head, metrics["rmse"])
                key = (head, self.widths.last_shape)
                if key in compiled:
                    self.step_times.append(time.perf_counter() - started)
                compiled.add(key)
                lcurve.accumulate(head, metrics)
                bar.update(1)
                bar.set_postfix_str(f"{head} lr {learning_rate:.1e} " + " ".join(
                    f"{k} {v:.3g}" for k, v in metrics.items() if k.startswith(("rmse_e", "rmse_f"))))
                display = step + 1
                if config.disp_freq > 0 and (display % config.disp_freq == 0 or display == 1):
                    for other in self.heads:  # multitask: the other heads on a training batch each, as deepmd-kit
                        if other != head:
                            lcurve.accumulate(other, self.evaluate_training_batch(other, learning_rate))
                    validation = {name: self.validate(name, learning_rate) for name in self.heads}
                    lcurve.write(display, learning_rate, validation)
                    self.keep_best(validation)
                stop = self.agreed_stop()
                if stop is not None:
                    break
                if display == config.numb_steps or (config.save_freq > 0 and display % config.save_freq == 0):
                    self.save_checkpoint()
            else:
                return self.state
            path = self.save_checkpoint()
            raise TrainingInterrupted(stop, path, state.step)
        finally:
            bar.close()
            lcurve.close()
            for s, handler in handlers.items():
                signal.signal(s, handler)

    def diverged(self, step: int, head: str, loss: float) -> Dpa3Error:
        """The error for a loss that is no longer finite: the step's update made the weights NaN or inf, so
        training stops instead of going on silently (nothing of this step is saved)."""
        where = (f"the last checkpoint is {self.last_checkpoint}" if self.last_checkpoint
                 else "no checkpoint was written yet")
        return Dpa3Error(f"training diverged at step {step}: the loss of head {head!r} is {loss} ({where}); "
                         "lower training's learning rate, check the data, or check the model settings "
                         "(e.g. a switch whose smooth radius is far below its cutoff overflows in float32)")

    def request_stop(self, signum, frame) -> None:
        del frame
        self.stop_signal = signum

    def agreed_stop(self) -> int | None:
        """The signal to stop on, as the processes agree: all stop after the same step if any one was
        signalled (one that stopped alone would leave the others waiting for it in the next step)."""
        if jax.process_count() == 1:
            return self.stop_signal
        signals = multihost_utils.process_allgather(np.int32(self.stop_signal or 0))
        return int(np.max(signals)) or None

    # ---------------------------------------------------------------- best model
    def keep_best(self, validation: dict[str, dict[str, float]]) -> None:
        """Keep the model with the lowest validation score (Σ over heads of rmse_e + rmse_f) as model_best.npz."""
        score = validation_score(validation)
        if score < self.state.best:
            self.state.best = score
            if self.writes_files:
                save_model(self.final_model(use_ema=True), self.workdir / "model_best.npz")

    def final_model(self, use_ema: bool = False):
        """The trained model file content: a single model for one head, else the multitask model."""
        model = self.state.model
        if use_ema and self.state.ema is not None:
            _, static = eqx.partition(model, self.trainable(model))
            model = eqx.combine(self.state.ema, static)
        return model.head(model.heads[0].name) if len(model.heads) == 1 else model

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        state = self.state
        state.samplers = {name: data.sampler.state_dict() for name, data in self.data.items()}
        state.widths = dict(self.widths.seen)
        path = self.workdir / f"{self.config.save_ckpt}-{state.step}.npz"
        if self.writes_files:
            write_checkpoint(state, self.config, path)
            (self.workdir / "checkpoint").write_text(path.name + "\n")
            prune_checkpoints(self.workdir, self.config.save_ckpt, self.config.max_ckpt_keep)
        self.last_checkpoint = path
        return path


def validation_score(validation: dict[str, dict[str, float]]) -> float:
    total = 0.0
    for metrics in validation.values():
        for key in ("rmse_e", "rmse_f"):
            if key in metrics and math.isfinite(metrics[key]):
                total += metrics[key]
    return total if validation and any(validation.values()) else math.inf


class TrainingInterrupted(Exception):
    def __init__(self, signum: int, checkpoint: Path, step: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint {checkpoint}")
        self.signum, self.checkpoint, self.step = signum, checkpoint, step


def data_parallel_mesh():
    """A 1-D mesh ("data") over all devices, of every process after jax.distributed.initialize(), or None on
    one device: XLA inserts the gradient all-reduce."""
    devices = jax.devices()
    if len(devices) == 1:
        return None
    return jax.sharding.Mesh(np.array(devices), ("data",))


def write_checkpoint(state: TrainState, config: TrainInput, path: Path) -> None:
    """Everything of a TrainState in one .npz, atomically."""
    arrays = {f"model/{k}": np.asarray(v) for k, v in leaves_by_name(state.model).items()}
    arrays |= {f"opt/{k}": np.asarray(v) for k, v in leaves_by_name(state.opt_state).items()}
    if state.ema is not None:
        arrays |= {f"ema/{k}": np.asarray(v) for k, v in leaves_by_name(state.ema).items()}
    meta = {"format": CHECKPOINT_FORMAT, "step": state.step, "samplers": state.samplers, "widths": state.widths,
            "best": state.best, "heads": [head.to_dict() for head in state.model.heads], "input": config.raw}
    arrays["__meta__"] = np.asarray(json.dumps(meta))
    write_npz(path, arrays)


def read_checkpoint(path: Path, skeleton: TrainState) -> TrainState:
    """A TrainState from `write_checkpoint`'s file; names and shapes checked against `skeleton`'s."""
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise Dpa3Error(f"{path}: not a dpa3-ref training checkpoint ({error})") from None
    with data:
        meta = json.loads(str(data["__meta__"])) if "__meta__" in data else {}
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise Dpa3Error(f"{path}: not a dpa3-ref training checkpoint (no '{CHECKPOINT_FORMAT}' marker)")
        heads = tuple(Head.from_dict(h) for h in meta["heads"])
        if heads != skeleton.model.heads:
            raise Dpa3Error(f"{path}: the checkpoint's heads or model configs differ from the input's")
        model = fill_like(skeleton.model, data, path, prefix="model/")
        opt_state = fill_like(skeleton.opt_state, data, path, prefix="opt/")
        ema = fill_like(skeleton.ema, data, path, prefix="ema/") if skeleton.ema is not None else None
    return TrainState(model=model, opt_state=opt_state, ema=ema, step=int(meta["step"]), samplers=meta["samplers"],
                      widths=meta["widths"], best=float(meta["best"]))


def latest_checkpoint(path: Path) -> Path:
    """A checkpoint file itself, or the newest one named by the `checkpoint` file in a folder, in the file
    `path` names, or beside the prefix `path` (e.g. `model.ckpt`), as deepmd-kit's checkpoint pointer."""
    if path.is_file() and path.suffix == ".npz":
        return path
    pointer = path / "checkpoint" if path.is_dir() else path if path.name == "checkpoint" else path.parent / "checkpoint"
    if pointer.is_file():
        return pointer.parent / pointer.read_text().strip()
    raise Dpa3Error(f"{path}: no such checkpoint (give a model.ckpt-N.npz file, or a folder with a 'checkpoint' file)")


def prune_checkpoints(workdir: Path, prefix: str, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints."""
    def step_of(path: Path) -> int:
        return int(path.name[len(prefix) + 1:-len(".npz")])

    checkpoints = sorted(workdir.glob(f"{prefix}-*.npz"), key=step_of)
    for old in checkpoints[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------- lcurve.out
class LearningCurve:
    """deepmd-kit's lcurve.out: step, then per head `<metric>_val[_head] <metric>_trn[_head]`, then lr.

    Training metrics are those of the display step's batch (deepmd-kit's default, training.disp_avg false);
    validation metrics are computed after that step's update. A restart appends to the file and, as
    deepmd-kit does, writes the header again before its first row (plots.read_lcurve reads such files).
    """

    def __init__(self, path: Path, heads: list[str], restart: bool):
        self.heads = heads
        self.header_written = False
        self.stream = path.open("a" if restart else "w")
        self.last: dict[str, dict[str, float]] = {}

    def accumulate(self, head: str, metrics: dict[str, float]) -> None:
        self.last[head] = metrics

    def write(self, step: int, learning_rate: float, validation: dict[str, dict[str, float]]) -> None:
        multitask = len(self.heads) > 1
        if not self.header_written:
            self.stream.write(self.header(validation, multitask))
            self.header_written = True
        line = f"{step:7d}"
        for head in self.heads:
            train = self.last.get(head) or {key: math.nan for key in validation.get(head, {})}
            for key in sorted(train):
                if validation.get(head):
                    line += f"   {validation[head].get(key, math.nan):11.2e} {train[key]:11.2e}"
                else:
                    line += f"   {train[key]:11.2e}"
        self.stream.write(line + f"   {learning_rate:8.1e}\n")
        self.stream.flush()

    def header(self, validation, multitask: bool) -> str:
        text = "# {:5s}".format("step")
        for head in self.heads:
            suffix = f"_{head}" if multitask else ""
            keys = sorted(self.last.get(head) or validation.get(head, {}))
            for key in keys:
                if validation.get(head):
                    text += f"   {key + '_val' + suffix:>11s} {key + '_trn' + suffix:>11s}"
                else:
                    text += f"   {key + '_trn' + suffix:>11s}"
        return text + "   {:8s}\n".format("lr") + \
            "# If there is no available reference data, rmse_*_{val,trn} will print nan\n"

    def close(self) -> None:
        self.stream.close()


# ------------------------------------------------------------------------------------------- starting points
def heads_of(config: TrainInput) -> tuple[Head, ...]:
    return tuple(Head(h.name, h.descriptor_key, h.fitting_key, h.case_index, h.model) for h in config.heads)


def fresh_model(config: TrainInput, data: dict[str, HeadData]) -> MultiTaskModel:
    """Random weights (training.seed), then the statistics of the training data (stats.py): each head's energy
    offsets by least squares, and, with fix_stat_std = 0, each descriptor's environment statistics (pooled
    over the heads that share it). With a stat_file they are read from / written to that cache."""
    from dpa3_ref.stats import StatFile, merge_descriptor_statistics, sample_frames, task_statistics

    seed = config.seed if config.seed is not None else 0
    model = init_multitask(heads_of(config), key=jax.random.key(seed))
    statistics = {}
    for head in config.heads:
        systems = data[head.name].systems
        frames = sample_frames([s.n_frames for s in systems], data[head.name].batch_sizes, head.data_stat_nbatch,
                               seed=seed)
        # one writer; the other processes compute the same numbers, and start from process 0's (replicated)
        stat_file = StatFile(head.stat_file) if head.stat_file and jax.process_index() == 0 else None
        statistics[head.name] = task_statistics(systems, head.model, frames, stat_file=stat_file, head=head.name)
        model = eqx.tree_at(lambda m: m.out_bias[head.name], model, jnp.asarray(statistics[head.name].out_bias))
    for key, descriptor in model.descriptors.items():
        sharing = [h for h in config.heads if h.descriptor_key == key]
        if sharing[0].model.fix_stat_std > 0:
            continue  # davg = 0, dstd = fix_stat_std, as initialised
        davg, dstd = merge_descriptor_statistics([statistics[h.name].environment for h in sharing], sharing[0].model)
        model = eqx.tree_at(lambda m: (m.descriptors[key].davg, m.descriptors[key].dstd), model,
                            (jnp.asarray(davg, descriptor.davg.dtype), jnp.asarray(dstd, descriptor.dstd.dtype)))
    return model


def init_model_weights(config: TrainInput, path: Path) -> MultiTaskModel:
    """`--init-model`: every array of M (weights, statistics, energy offsets), checked against the input's model."""
    from dpa3_ref.official import load_official

    loaded = load_official(path) if path.suffix in (".dp", ".yaml", ".yml") else load_model(path)
    if not isinstance(loaded, MultiTaskModel):
        loaded = single_task(loaded)
    wanted = heads_of(config)
    if len(wanted) == 1 and len(loaded.heads) == 1:
        loaded = eqx.tree_at(lambda m: m.out_bias, loaded, {wanted[0].name: loaded.out_bias[loaded.heads[0].name]})
        descriptor = next(iter(loaded.descriptors.values()))
        fitting = next(iter(loaded.fittings.values()))
        if loaded.heads[0].config != wanted[0].config:
            raise Dpa3Error(f"{path}: its model differs from the input's model section "
                            f"({config_difference(loaded.heads[0].config, wanted[0].config)})")
        return MultiTaskModel({wanted[0].descriptor_key: descriptor}, {wanted[0].fitting_key: fitting},
                              dict(loaded.out_bias), wanted)
    if loaded.heads != wanted:
        raise Dpa3Error(f"{path}: its heads {loaded.head_names} or their models differ from the input's")
    return loaded


def config_difference(a, b) -> str:
    fields = [f.name for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)]
    return ", ".join(f"{name}: {getattr(a, name)!r} vs {getattr(b, name)!r}" for name in fields)


# ------------------------------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="deepmd-kit training input (input.json), single or multitask")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--init-model", metavar="M", help="start from M's weights (step 0, fresh optimizer)")
    start.add_argument("--restart", metavar="CKPT", help="continue a checkpoint exactly (model.ckpt-N.npz)")
    start.add_argument("--finetune", metavar="M", help="fine-tune M on this input's data (energy offsets re-fitted)")
    parser.add_argument("--model-branch", metavar="B", help="with --finetune: the head of a multitask M to start from")
    parser.add_argument("--output", default="model.npz", help="final model file (default model.npz)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-plots", action="store_true", help="skip the learning-curve and parity plots")
    parser.add_argument("--distributed", action="store_true",
                        help="one process of a multi-host run: jax.distributed.initialize() with the settings of "
                             "the cluster (SLURM, Open MPI, ...); see docs/training.md 9.2")


def run(args: argparse.Namespace) -> int:
    if args.model_branch and not args.finetune:
        raise Dpa3Error("--model-branch is only used with --finetune")
    if args.distributed:
        jax.distributed.initialize()  # before anything touches a device
    try:
        train(read_input(args.input), Path.cwd(), init_model=args.init_model, restart=args.restart,
              finetune=args.finetune, model_branch=args.model_branch, output=args.output,
              progress=not args.no_progress, plots=not args.no_plots)
    except TrainingInterrupted as stop:
        print(f"dpa3 train: {stop}; continue with: dpa3 train {args.input} --restart {stop.checkpoint}", file=sys.stderr)
        return 128 + stop.signum
    return 0


def train(config: TrainInput, workdir: Path, *, init_model=None, restart=None, finetune=None, model_branch=None,
          output: str = "model.npz", progress: bool = True, plots: bool = True) -> Path:
    """`dpa3 train` as a function: train in `workdir`, write the final model there and return its path."""
    started = time.perf_counter()
    workdir = Path(workdir)
    trainer = Trainer(config, workdir)
    if restart:
        trainer.restore(Path(restart))
        print(f"restart  from {restart} at step {trainer.state.step}")
    else:
        if init_model:
            model = init_model_weights(config, Path(init_model))
            print(f"init     weights, statistics and energy offsets from {init_model}")
        elif finetune:
            from dpa3_ref.finetune import finetune_model

            model = finetune_model(config, Path(finetune), model_branch,
                                   {name: data.systems for name, data in trainer.data.items()})
            print(f"finetune from {finetune}" + (f" (head {model_branch})" if model_branch else ""))
        else:
            model = fresh_model(config, trainer.data)
        trainer.start_from(model)
    describe(config, trainer)
    trainer.train(progress=progress)
    path = workdir / output
    if trainer.writes_files:
        save_model(trainer.final_model(), path)
    summarise(trainer, path, time.perf_counter() - started, plots=plots)
    return path


def describe(config: TrainInput, trainer: Trainer) -> None:
    for name, data in trainer.data.items():
        frames = sum(s.n_frames for s in data.systems)
        validation = sum(s.n_frames for s in data.validation)
        head = trainer.heads[name]
        print(f"data     {name}: {len(data.systems)} systems, {frames} frames for training, {validation} for validation"
              + (f", model_prob {head.model_prob:.3f}" if len(trainer.heads) > 1 else ""))
    model = trainer.state.model
    parameters = sum(x.size for x in jax.tree.leaves(eqx.filter(model, trainer.trainable(model))))
    print(f"model    {len(trainer.heads)} head(s), {parameters:,} trained numbers; {config.numb_steps} steps, "
          f"lr {trainer.schedule.start_lr:.1e} -> {trainer.schedule.stop_lr:.1e} every {trainer.schedule.decay_steps}, "
          f"{config.optimizer.type}" + (f" on {trainer.mesh.size} devices" if trainer.mesh is not None else ""))


def summarise(trainer: Trainer, output: Path, elapsed: float, plots: bool) -> None:
    """The closing report; its last line is `final model: PATH`."""
    lr = trainer.schedule(max(trainer.config.numb_steps - 1, 0))
    for name in trainer.heads:
        metrics = trainer.validate(name, lr)
        if metrics:
            print(f"valid    {name}: " + "  ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items()) if k != "rmse"))
    if trainer.step_times:
        print(f"time     {elapsed:.1f} s in all, {np.mean(trainer.step_times):.3f} s/step after compilation "
              f"({len(trainer.step_times)} steps)")
    else:  # every step compiled something (a very short run): the mean includes compilation
        steps = max(trainer.state.step - trainer.first_step, 1)
        print(f"time     {elapsed:.1f} s in all, {elapsed / steps:.3f} s/step including compilation (too few steps)")
    if plots and trainer.writes_files:
        write_plots(trainer, output)
    print(f"final model: {output}")


def write_plots(trainer: Trainer, output: Path) -> None:
    """lcurve.png, and parity plots of the validation data (training data where there is none) per head."""
    from dpa3_ref.plots import plot_learning_curve, plot_parity
    from dpa3_ref.potential import Potential

    workdir = trainer.workdir
    plot_learning_curve(workdir / trainer.config.disp_file, workdir / "lcurve.png")
    predicted, reference = {}, {}
    model = jax.tree.map(lambda x: x.addressable_data(0) if isinstance(x, jax.Array) else x,
                         trainer.state.model)  # this process's copy: the plots are computed here alone
    for name, data in trainer.data.items():
        potential = Potential(model.head(name))
        predicted[name], reference[name] = parity_data(potential, data.validation or data.systems)
    plot_parity(predicted, reference, workdir / "parity.png")
    print(f"plots    {workdir / 'lcurve.png'}, {workdir / 'parity.png'} (validation data)")


def parity_data(potential, systems: list[System], max_frames: int = 64) -> tuple[dict, dict]:
    """Predicted and reference energy per atom and force components of up to `max_frames` frames per system."""
    predicted = {"energy_per_atom": [], "forces": []}
    reference = {"energy_per_atom": [], "forces": []}
    for system in systems:
        for frame in range(min(system.n_frames, max_frames)):
            types = system.frame_type_indices(frame, potential.type_map)
            real = types >= 0  # mixed-type systems pad with virtual atoms
            cell = None if system.cell is None else system.cell[frame]
            out = potential.evaluate(system.coord[frame][real], types[real], cell)
            if system.energy is not None:
                predicted["energy_per_atom"].append([float(out["energy"]) / real.sum()])
                reference["energy_per_atom"].append([system.energy[frame] / real.sum()])
            if system.forces is not None:
                predicted["forces"].append(out["forces"].ravel())
                reference["forces"].append(system.forces[frame][real].ravel())
    return ({k: np.concatenate(v) for k, v in predicted.items() if v},
            {k: np.concatenate(v) for k, v in reference.items() if v})

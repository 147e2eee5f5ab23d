"""Statistics of the training data: per-type energy offsets and environment-matrix scales (spec §6.3, §2.2).

Before training, deepmd-kit looks at a sample of the data and sets two things a network learns badly:

**Which frames** (`sample_frames`). Per system, the training data loader (frames shuffled, `batch_size`
frames a batch) yields its first `min(data_stat_nbatch, n_batches)` batches: `min(data_stat_nbatch · batch_size,
n_frames)` distinct frames. deepmd-kit shuffles with torch's generator, which we cannot reproduce; we draw the
same number of frames with an explicit numpy seed. Whenever the sample is the whole system (small data, and
every parity check) the statistics are exactly deepmd-kit's.

**Energy offsets** (`energy_bias`; the model's `out_bias`, E_i = net_i + out_bias[t_i]). With N_ft the number
of atoms of type t in frame f and E_f the frame's energy label,

    b = argmin_b Σ_f (E_f − Σ_t N_ft b_t)²          numpy.linalg.lstsq(N, E, rcond), the minimum-norm solution

so a type absent from the data gets b_t = 0. Where per-atom energy labels e_i exist they take priority:
b_t = mean of e_i over the labelled atoms of type t, and a type without labelled atoms falls back to the
least-squares value (0 if there is none). (deepmd-kit 3.2.0 looks for these labels under the data key
`atom_energy`, while its `ener` loss loads `atom_ener.npy` as `atom_ener`, and only when the loss uses it:
so `dp --pt train` in practice fits total energies only. `use_atom_energy=False` does the same.) Fine-tuning (`change_by_statistic`) applies the same fit to the
residual label − prediction of the inherited model and *adds* it to the inherited out_bias, so that the new
model reproduces the least-squares-optimal offsets on the new data; `set_by_statistic` (a new fitting net)
fits the labels themselves.

**Environment-matrix scale** (`descriptor_statistics`; the descriptor's davg/dstd [ntypes, e_sel, 4], which
normalise R̂_ij = (R_ij − davg[t_i, slot]) / dstd[t_i, slot]). DPA3 always has davg = 0. With
`fix_stat_std` > 0 (the default, 0.3) dstd = fix_stat_std and nothing is computed. With `fix_stat_std = 0`,
for each centre type t, all e_sel slots of every sampled atom of type t are pooled, empty and excluded
slots counting as zeros, with R_ij = s(r)·[1/(r+p), r_ij/(r+p)²] and s the **polynomial** switch even when
the model uses the exponential one (deepmd-kit's statistic does; spec §14b.6):

    σ_r = std of R[..., 0],   σ_a = std of R[..., 1:4] pooled,   dstd[t, :] = [σ_r, σ_a, σ_a, σ_a]
    std = sqrt(max(Σx²/n − (Σx/n)², 0)), raised to 0.01 if smaller, and 0.1 if type t has no atoms.

The sums (n, Σx, Σx²) are kept (`EnvironmentSums`) because that is what can be merged: a descriptor shared
by several tasks (multitask, sharing level 0) gets the std of the pooled sums (`merge_descriptor_statistics`).

**Caching** (`StatFile`, deepmd-kit's `training.stat_file`): computed statistics are stored in an HDF5 file,
keyed by head, type map and what was computed, with a fingerprint of everything they were computed from
(the sampled frames' contents and the settings). A later run with the same inputs reads them; a run whose
inputs differ recomputes and overwrites them, never reusing a stale entry.

Systems are `dpa3_ref.data.System`s, one composition or the mixed-type layout alike: every function here
reads the per-frame model types (`all_type_indices`, -1 for a virtual atom, which takes no part) and the
optional per-atom labels `atom_energy`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from dpa3_ref.config import DPA3Config
from dpa3_ref.errors import Dpa3Error
from dpa3_ref.model import DPA3Model
from dpa3_ref.neighbors import build_graph

STD_FLOOR = 1e-2  # deepmd-kit's protection: a std below this is raised to it
STD_NO_SAMPLES = 1e-1  # deepmd-kit's std for a centre type with no sampled atoms


# --------------------------------------------------------------------------------------------------------------
# which frames


def sample_frames(
    frame_counts: Sequence[int], batch_sizes: int | Sequence[int], data_stat_nbatch: int, *, seed: int
) -> list[np.ndarray]:
    """The frame indices (sorted) used for statistics from each system: [min(nbatch · batch_size, n_frames)].

    `batch_sizes` are resolved integers (one for all systems, or one per system), as the training loader uses.
    """
    if isinstance(batch_sizes, int | np.integer):
        batch_sizes = [int(batch_sizes)] * len(frame_counts)
    if len(batch_sizes) != len(frame_counts):
        raise Dpa3Error(f"{len(batch_sizes)} batch sizes given for {len(frame_counts)} systems")
    if data_stat_nbatch < 1:
        raise Dpa3Error(f"training.data_stat_nbatch must be at least 1, got {data_stat_nbatch}")
    rng = np.random.default_rng(seed)
    frames = []
    for n_frames, batch_size in zip(frame_counts, batch_sizes, strict=True):
        n_sampled = min(data_stat_nbatch * int(batch_size), n_frames)
        frames.append(np.sort(rng.permutation(n_frames)[:n_sampled]))
    return frames


def _all_frames(systems: Sequence) -> list[np.ndarray]:
    return [np.arange(system.n_frames) for system in systems]


# --------------------------------------------------------------------------------------------------------------
# energy offsets


def count_types(types_per_frame: np.ndarray, ntypes: int) -> np.ndarray:
    """N_ft: [frames, ntypes] float64 number of atoms of each type in each frame; negative types (padding) ignored."""
    types_per_frame = np.asarray(types_per_frame)  # [frames, n]
    counts = np.zeros((types_per_frame.shape[0], ntypes))
    for t in range(ntypes):
        counts[:, t] = np.sum(types_per_frame == t, axis=1)
    return counts


def energy_bias(
    counts: np.ndarray | None,
    energies: np.ndarray | None,
    atom_energies: np.ndarray | None = None,
    atom_types: np.ndarray | None = None,
    *,
    ntypes: int | None = None,
    rcond: float | None = None,
) -> np.ndarray:
    """Per-type energy offsets b [ntypes] float64 (see the module docstring for the rule).

    counts [frames, ntypes] and energies [frames]: frames with a total-energy label (None if there are none).
    atom_energies [atoms] and atom_types [atoms]: every atom with a per-atom label, flattened over frames.
    rcond: the fitting net's `rcond` (deepmd-kit's default None = numpy's machine-precision cut).
    """
    if ntypes is None:
        if counts is None:
            raise Dpa3Error("energy_bias needs ntypes when there are no frame counts")
        ntypes = counts.shape[1]
    by_frames = None
    if counts is not None and len(counts):
        counts, energies = np.asarray(counts, np.float64), np.asarray(energies, np.float64)
        if counts.shape != (energies.shape[0], ntypes):
            raise Dpa3Error(f"counts have shape {counts.shape}, expected ({energies.shape[0]}, {ntypes})")
        by_frames = np.linalg.lstsq(counts, energies, rcond=rcond)[0]  # [ntypes]
    if atom_energies is None or len(atom_energies) == 0:
        if by_frames is None:
            raise Dpa3Error("cannot fit energy offsets: the sampled data has no energy labels")
        return by_frames
    atom_energies, atom_types = np.asarray(atom_energies, np.float64), np.asarray(atom_types)
    by_atoms = np.full(ntypes, np.nan)
    for t in range(ntypes):
        labelled = atom_types == t
        if labelled.any():
            by_atoms[t] = atom_energies[labelled].mean()
    if by_frames is not None:
        by_atoms = np.where(np.isnan(by_atoms), by_frames, by_atoms)
    return np.nan_to_num(by_atoms, nan=0.0)


def set_by_statistic(
    counts: np.ndarray | None,
    energies: np.ndarray | None,
    atom_energies: np.ndarray | None = None,
    atom_types: np.ndarray | None = None,
    *,
    ntypes: int | None = None,
    rcond: float | None = None,
) -> np.ndarray:
    """The new out_bias for a new fitting net: the offsets fitted to the labels (= `energy_bias`)."""
    return energy_bias(counts, energies, atom_energies, atom_types, ntypes=ntypes, rcond=rcond)


def change_by_statistic(
    counts: np.ndarray | None,
    label_energies: np.ndarray | None,
    predicted_energies: np.ndarray | None,
    *,
    atom_types: np.ndarray | None = None,
    atom_labels: np.ndarray | None = None,
    atom_predicted: np.ndarray | None = None,
    ntypes: int | None = None,
    rcond: float | None = None,
) -> np.ndarray:
    """Δb [ntypes] to ADD to the inherited out_bias: the offsets fitted to label − prediction.

    The predictions are the inherited model's (its out_bias included), on the same frames and atoms.
    """
    residual = None if counts is None else np.asarray(label_energies) - np.asarray(predicted_energies)
    atom_residual = None if atom_labels is None else np.asarray(atom_labels) - np.asarray(atom_predicted)
    return energy_bias(counts, residual, atom_residual, atom_types, ntypes=ntypes, rcond=rcond)


@dataclasses.dataclass(frozen=True)
class EnergyLabels:
    """The energy labels of the sampled frames, in the form `energy_bias` takes."""

    counts: np.ndarray  # [frames with a total-energy label, ntypes]
    energy: np.ndarray  # [frames with a total-energy label] eV
    atom_types: np.ndarray  # [atoms with a per-atom label]
    atom_energy: np.ndarray  # [atoms with a per-atom label] eV

    def bias(self, *, rcond: float | None = None) -> np.ndarray:
        return energy_bias(self.counts, self.energy, self.atom_energy, self.atom_types,
                           ntypes=self.counts.shape[1], rcond=rcond)


def energy_labels(systems: Sequence, type_map: Sequence[str], frames: Sequence[np.ndarray] | None = None, *,
                  use_atom_energy: bool = True) -> EnergyLabels:
    """Collect counts and labels of the sampled `frames` of every system (all frames if None); per-atom labels
    are ignored with use_atom_energy=False (what deepmd-kit's training does in practice, module docstring)."""
    frames = _all_frames(systems) if frames is None else frames
    counts, energy, atom_types, atom_energy = [], [], [], []
    for system, chosen in zip(systems, frames, strict=True):
        types = system.all_type_indices(type_map)[chosen]  # [k, n]
        if system.energy is not None:
            counts.append(count_types(types, len(type_map)))
            energy.append(system.energy[chosen])
        if use_atom_energy and system.atom_energy is not None:
            real = types >= 0
            atom_types.append(types[real])
            atom_energy.append(system.atom_energy[chosen][real])
    if not energy and not atom_energy:
        raise Dpa3Error("cannot fit energy offsets: no sampled system has energy labels")

    def joined(parts, shape):
        return np.concatenate(parts) if parts else np.zeros(shape)

    return EnergyLabels(
        counts=joined(counts, (0, len(type_map))),
        energy=joined(energy, (0,)),
        atom_types=joined(atom_types, (0,)).astype(np.int64),
        atom_energy=joined(atom_energy, (0,)),
    )


# --------------------------------------------------------------------------------------------------------------
# environment-matrix statistics


@dataclasses.dataclass(frozen=True)
class EnvironmentSums:
    """Pooled moments of the environment matrix per centre type; column 0 = radial R[..., 0], 1 = R[..., 1:4]."""

    count: np.ndarray  # [ntypes, 2] number of pooled values n
    total: np.ndarray  # [ntypes, 2] Σx
    total_squared: np.ndarray  # [ntypes, 2] Σx²

    @classmethod
    def zeros(cls, ntypes: int) -> EnvironmentSums:
        return cls(*(np.zeros((ntypes, 2)) for _ in range(3)))

    def __add__(self, other: EnvironmentSums) -> EnvironmentSums:
        return EnvironmentSums(self.count + other.count, self.total + other.total,
                               self.total_squared + other.total_squared)

    def scaled(self, weight: float) -> EnvironmentSums:
        return EnvironmentSums(self.count * weight, self.total * weight, self.total_squared * weight)

    def std(self) -> np.ndarray:
        """[ntypes, 2] (σ_r, σ_a) with deepmd-kit's floor and no-sample default."""
        n = np.where(self.count > 0, self.count, 1.0)
        variance = self.total_squared / n - (self.total / n) ** 2
        std = np.maximum(np.sqrt(np.maximum(variance, 0.0)), STD_FLOOR)
        return np.where(self.count > 0, std, STD_NO_SAMPLES)

    def davg_dstd(self, e_sel: int) -> tuple[np.ndarray, np.ndarray]:
        """DPA3's davg (always 0) and dstd [ntypes, e_sel, 4] = [σ_r, σ_a, σ_a, σ_a] in every slot."""
        std = self.std()  # [ntypes, 2]
        row = np.stack([std[:, 0], std[:, 1], std[:, 1], std[:, 1]], axis=-1)  # [ntypes, 4]
        dstd = np.repeat(row[:, None, :], e_sel, axis=1)
        return np.zeros_like(dstd), dstd

    def as_arrays(self) -> dict[str, np.ndarray]:
        return {"count": self.count, "total": self.total, "total_squared": self.total_squared}


def host_polynomial_switch(r: np.ndarray, r_smooth: float, r_cut: float) -> np.ndarray:
    """switch.polynomial_switch in numpy: the statistic runs on the host over frames of many shapes, for
    each of which jax.numpy would compile its operations anew."""
    u = np.clip((r - r_smooth) / (r_cut - r_smooth), 0.0, 1.0)
    return u * u * u * (-6.0 * u * u + 15.0 * u - 10.0) + 1.0


def environment_matrix(positions: np.ndarray, types: np.ndarray, cell: np.ndarray | None,
                       config: DPA3Config) -> np.ndarray:
    """R [n_atoms, e_sel, 4] of one frame with the polynomial switch; empty and excluded slots are 0."""
    graph = build_graph(positions, types, cell, config, pad=False)
    n_atoms, width = graph.neighbors.shape
    positions = np.asarray(graph.positions)
    vectors = np.zeros((n_atoms, config.e_sel, 3))  # [n_atoms, e_sel, 3]
    vectors[:, :width] = positions[np.asarray(graph.neighbors)] - positions[:, None, :] + np.asarray(graph.neighbor_shift)
    mask = np.zeros((n_atoms, config.e_sel), bool)
    mask[:, :width] = np.asarray(graph.neighbor_mask)
    length = np.where(mask, np.linalg.norm(vectors, axis=-1), 1.0)  # [n_atoms, e_sel], 1 on empty slots
    weight = host_polynomial_switch(length, config.e_rcut_smth, config.e_rcut) * mask
    inverse = 1.0 / (length + config.env_protection)
    return np.concatenate([inverse[..., None], vectors * (inverse**2)[..., None]], axis=-1) * weight[..., None]


def environment_sums(systems: Sequence, config: DPA3Config,
                     frames: Sequence[np.ndarray] | None = None) -> EnvironmentSums:
    """The pooled moments of R over the sampled `frames` of every system (all frames if None)."""
    frames = _all_frames(systems) if frames is None else frames
    sums = EnvironmentSums.zeros(config.ntypes)
    for system, chosen in zip(systems, frames, strict=True):
        types = system.all_type_indices(config.type_map)
        for frame in chosen:
            cell = None if system.cell is None else system.cell[frame]
            real = types[frame] >= 0
            environment = environment_matrix(system.coord[frame][real], types[frame][real], cell, config)
            sums = sums + _frame_sums(environment, types[frame][real], config.ntypes)
    return sums


def _frame_sums(environment: np.ndarray, types: np.ndarray, ntypes: int) -> EnvironmentSums:
    count, total, squared = (np.zeros((ntypes, 2)) for _ in range(3))
    for t in range(ntypes):
        of_type = environment[types == t]  # [atoms of type t, e_sel, 4]
        for column, values in enumerate((of_type[..., :1], of_type[..., 1:])):
            count[t, column] = values.size
            total[t, column] = values.sum()
            squared[t, column] = np.square(values).sum()
    return EnvironmentSums(count, total, squared)


def descriptor_statistics(systems: Sequence, config: DPA3Config,
                          frames: Sequence[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """davg, dstd [ntypes, e_sel, 4] float64: fix_stat_std everywhere if set, else computed from the data."""
    if config.fix_stat_std > 0:
        shape = (config.ntypes, config.e_sel, 4)
        return np.zeros(shape), np.full(shape, config.fix_stat_std)
    return environment_sums(systems, config, frames).davg_dstd(config.e_sel)


def merge_descriptor_statistics(per_task: Sequence[EnvironmentSums], config: DPA3Config,
                                weights: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """davg, dstd of a descriptor shared by several tasks, from the pooled (optionally weighted) sums.

    weights=None pools the tasks' sums as they are, which is what deepmd-kit's PyTorch trainer does for DPA3
    (`DescriptorBlock.share_params` adds the tasks' moments unweighted); weights=model_prob reproduces its
    backend-neutral `merge_env_stat` (base + link · p_link / p_base, equal up to a common factor).
    """
    if weights is None:
        weights = [1.0] * len(per_task)
    merged = EnvironmentSums.zeros(config.ntypes)
    for sums, weight in zip(per_task, weights, strict=True):
        merged = merged + sums.scaled(float(weight))
    return merged.davg_dstd(config.e_sel)


# --------------------------------------------------------------------------------------------------------------
# the cache


def fingerprint(systems: Sequence, type_map: Sequence[str], frames: Sequence[np.ndarray] | None = None,
                **settings) -> str:
    """sha256 of the sampled frames' contents (types, coordinates, cells, labels) and of `settings`."""
    frames = _all_frames(systems) if frames is None else frames
    digest = hashlib.sha256(json.dumps({"type_map": list(type_map), **settings}, sort_keys=True).encode())
    for system, chosen in zip(systems, frames, strict=True):
        chosen = np.asarray(chosen)
        parts = [chosen, system.all_type_indices(type_map)[chosen], system.coord[chosen]]
        parts += [array[chosen] for array in (system.cell, system.energy, system.atom_energy) if array is not None]
        for part in parts:
            digest.update(np.ascontiguousarray(part, dtype=np.float64).tobytes())
        digest.update(b"|")
    return digest.hexdigest()


def descriptor_settings(config: DPA3Config) -> dict:
    """What the environment statistics depend on besides the frames (for `fingerprint`)."""
    return {"e_rcut": config.e_rcut, "e_rcut_smth": config.e_rcut_smth,
            "e_sel": config.e_sel, "env_protection": config.env_protection,
            "exclude_types": [list(p) for p in config.exclude_types]}


class StatFile:
    """training.stat_file: computed statistics in one HDF5 file, read back instead of recomputed.

    Layout: /dpa3_ref/<head>/<type map, space-separated>/<kind>/<array>, each <kind> group carrying the
    `fingerprint` of its inputs. A path that is a directory (or has no .h5/.hdf5 suffix, as deepmd-kit
    treats it) holds the file `dpa3_ref_stat.h5`. Our groups live under /dpa3_ref, so a deepmd-kit stat
    file at the same path keeps its own content. Every write goes to a copy that replaces the file in one
    rename, so an interrupted run leaves the old file or the new one, never half of one.
    """

    ROOT = "dpa3_ref"

    def __init__(self, path: str | Path):
        path = Path(path)
        if path.is_dir() or (not path.exists() and path.suffix.lower() not in (".h5", ".hdf5")):
            path = path / "dpa3_ref_stat.h5"
        self.path = path

    def _group_name(self, head: str, type_map: Sequence[str], kind: str) -> str:
        return f"{self.ROOT}/{head}/{' '.join(type_map)}/{kind}"

    def load(self, head: str, type_map: Sequence[str], kind: str, fingerprint: str) -> dict[str, np.ndarray] | None:
        """The stored arrays, or None if absent or computed from other inputs (other fingerprint)."""
        import h5py

        if not self.path.is_file():
            return None
        try:
            with h5py.File(self.path, "r") as file:
                group = file.get(self._group_name(head, type_map, kind))
                if group is None or group.attrs.get("fingerprint") != fingerprint:
                    return None
                return {name: np.asarray(dataset) for name, dataset in group.items()}
        except OSError as error:
            raise Dpa3Error(f"{self.path}: stat_file is not a readable HDF5 file ({error})") from error

    def save(self, head: str, type_map: Sequence[str], kind: str, fingerprint: str,
             arrays: dict[str, np.ndarray]) -> None:
        """Store `arrays` under (head, type map, kind), replacing what was there, atomically."""
        import h5py

        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
        os.close(handle)
        try:
            if self.path.is_file():
                shutil.copyfile(self.path, temporary)
            mode = "a" if self.path.is_file() else "w"
            with h5py.File(temporary, mode) as file:
                name = self._group_name(head, type_map, kind)
                if name in file:
                    del file[name]
                group = file.create_group(name)
                for key, value in arrays.items():
                    group.create_dataset(key, data=np.asarray(value))
                group.attrs["fingerprint"] = fingerprint
            os.replace(temporary, self.path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def load_or_compute(self, head: str, type_map: Sequence[str], kind: str, fingerprint: str,
                        compute: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """Read the entry if it was computed from the same inputs; otherwise compute, store and return it."""
        cached = self.load(head, type_map, kind, fingerprint)
        if cached is not None:
            return cached
        arrays = compute()
        self.save(head, type_map, kind, fingerprint, arrays)
        return arrays


# --------------------------------------------------------------------------------------------------------------
# one call for a task: what deepmd-kit's compute_or_load_stat does


@dataclasses.dataclass(frozen=True)
class TaskStatistics:
    """The statistics of one task (head) before training."""

    out_bias: np.ndarray  # [ntypes] float64
    environment: EnvironmentSums | None  # None when fix_stat_std > 0 (nothing computed)

    def davg_dstd(self, config: DPA3Config) -> tuple[np.ndarray, np.ndarray]:
        if self.environment is None:
            return descriptor_statistics([], config)
        return self.environment.davg_dstd(config.e_sel)


def task_statistics(systems: Sequence, config: DPA3Config, frames: Sequence[np.ndarray] | None = None, *,
                    stat_file: StatFile | None = None, head: str = "Default",
                    rcond: float | None = None, use_atom_energy: bool = True) -> TaskStatistics:
    """Energy offsets and (if fix_stat_std = 0) environment sums of one task, through the cache if given."""
    frames = _all_frames(systems) if frames is None else frames
    type_map = config.type_map

    def bias() -> dict[str, np.ndarray]:
        labels = energy_labels(systems, type_map, frames, use_atom_energy=use_atom_energy)
        return {"out_bias": labels.bias(rcond=rcond)}

    def environment() -> dict[str, np.ndarray]:
        return environment_sums(systems, config, frames).as_arrays()

    def cached(kind: str, compute, **settings):
        if stat_file is None:
            return compute()
        key = fingerprint(systems, type_map, frames, kind=kind, **settings)
        return stat_file.load_or_compute(head, type_map, kind, key, compute)

    out_bias = cached("energy_bias", bias, rcond=rcond, use_atom_energy=use_atom_energy)["out_bias"]
    sums = None
    if config.fix_stat_std == 0:
        sums = EnvironmentSums(**cached("environment", environment, **descriptor_settings(config)))
    return TaskStatistics(out_bias=np.asarray(out_bias, np.float64), environment=sums)


def with_statistics(model: DPA3Model, *, out_bias: np.ndarray | None = None, davg: np.ndarray | None = None,
                    dstd: np.ndarray | None = None) -> DPA3Model:
    """`model` with the given statistics, each cast to the dtype the model keeps it in (None = unchanged)."""
    replacements = {
        "out_bias": (lambda m: m.out_bias, out_bias),
        "davg": (lambda m: m.descriptor.davg, davg),
        "dstd": (lambda m: m.descriptor.dstd, dstd),
    }
    for name, (where, value) in replacements.items():
        if value is None:
            continue
        current = where(model)
        if np.shape(value) != current.shape:
            raise Dpa3Error(f"{name} has shape {np.shape(value)}, the model's is {current.shape}")
        model = eqx.tree_at(where, model, jnp.asarray(value, current.dtype))
    return model

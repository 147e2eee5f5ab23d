"""`dpa3 test`: a model's errors on labelled systems, defined and averaged as deepmd-kit's `dp test` does.

    dpa3 test --model MODEL --system PATH [--system PATH ...] [--head H] [--numb-test N] [--detail-file PREFIX]

PATH is a deepmd/npy system, a directory holding several (every directory below it with a `type.raw`,
as `dp test -s` finds them), or an extxyz file. `--numb-test N` tests the first N frames of each system
(0, the default: all), in set order, as `dp test -n N` without `--shuffle-test`.

For one system of N atoms per frame, with the error Δ = predicted − label of every value (spec §9.2):

    MAE  = mean |Δ|,   RMSE = sqrt(mean Δ²)              over
    e    energy               one value per frame                         eV
    ea   energy / N           one value per frame                         eV/atom
    f    force                every component of every atom of every frame eV/Å
    v    virial               9 components per frame                      eV
    va   virial / N           9 components per frame                      eV/atom
    s    stress = −virial/V   9 components per frame                      eV/Å³

A quantity is reported only where the system has its label; virial and stress only for periodic systems
(deepmd-kit 3.2.0, deepmd/utils/eval_metrics.py: `compute_energy_type_metrics`). The key names above
(`mae_e`, `rmse_ea`, ...) are dp test's.

The average over systems is exact, as if all values had been pooled (deepmd/utils/weight_avg.py): each
system's MAE is weighted by the number of values it was taken over, each RMSE enters squared with the
same weight. So energies and per-atom energies are weighted by frames (not atoms), forces by force
components (frames × atoms × 3), virials and stresses by 9 × frames; a system without a label adds no
weight to that quantity.

`--detail-file PREFIX` writes dp test's detail files, each row one frame (one atom for forces),
reference columns first: PREFIX.e.out (data_e pred_e), .e_peratom.out (the same / N), .f.out
(data_fx data_fy data_fz pred_fx pred_fy pred_fz), .v.out and .v_peratom.out (9 data, 9 pred), and
.s.out (stress, for periodic systems with virial labels). As dp test does, the file name is
`Path(PREFIX).with_suffix(".e.out")`, the systems follow one another and only the first names its system
in the `#` header line. Where dp test writes zeros for a missing label, we write nan, so that a missing
label cannot pass for a zero one. Systems found below a directory are tested in sorted order.

Checked against `dp --pt test` on the official water model: every number of the table agrees to dp
test's 7 printed digits (tests/test_testing_cli.py), and the detail files agreed to 3e-11 eV on energies
of 3e4 eV (compared once, by hand).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dpa3_ref.data import System, find_systems, read_system
from dpa3_ref.errors import Dpa3Error

# dp test key suffix -> (what is compared, unit); the order of the report
QUANTITIES = {
    "e": ("energy", "eV"),
    "ea": ("energy/atom", "eV/atom"),
    "f": ("force", "eV/Å"),
    "v": ("virial", "eV"),
    "va": ("virial/atom", "eV/atom"),
    "s": ("stress", "eV/Å³"),
}

# Frames are evaluated this many atoms at a time (at least one frame): large enough that small systems
# run as one batch, small enough that a batch of 192-atom water frames stays within a few GiB.
ATOMS_PER_BATCH = 512


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", required=True, type=Path,
                        help="deepmd-kit .dp/.yaml model or dpa3-ref model file")
    parser.add_argument("--system", "-s", required=True, type=Path, action="append",
                        help="deepmd/npy system, a directory of systems, or an extxyz file (repeatable)")
    parser.add_argument("--head", default=None, help="the head (task) of a multitask model to test")
    parser.add_argument("--numb-test", "-n", type=int, default=0,
                        help="test the first N frames of each system (0: all)")
    parser.add_argument("--detail-file", "-d", type=Path, default=None,
                        help="prefix of dp test's detail files (PREFIX.e.out, .e_peratom.out, .f.out, .v.out, ...)")


def run(args: argparse.Namespace) -> int:
    import dpa3_ref  # pulls in JAX: only when testing, so `dpa3 --help` stays fast

    if args.numb_test < 0:
        raise Dpa3Error(f"--numb-test must be >= 0 (0 tests every frame), got {args.numb_test}")
    if args.detail_file is not None and not args.detail_file.parent.is_dir():
        raise Dpa3Error(f"--detail-file {args.detail_file}: directory {args.detail_file.parent} does not exist")
    potential = dpa3_ref.load(args.model) if args.head is None else dpa3_ref.load(args.model, head=args.head)
    systems = [read_system(path) for path in expand_system_paths(args.system)]
    scores = score_systems(potential, systems, numb_test=args.numb_test, detail_file=args.detail_file)
    print(format_scores(scores, model=args.model))
    return 0


def expand_system_paths(paths: Sequence[Path]) -> list[Path]:
    """Each path as itself (a system directory or an extxyz file) or, for a directory of systems, its systems."""
    expanded = []
    for path in map(Path, paths):
        if not path.exists():
            raise Dpa3Error(f"--system {path}: no such file or directory")
        if path.is_dir() and not (path / "type.raw").is_file():
            found = find_systems(path)
            if not found:
                raise Dpa3Error(f"--system {path}: no deepmd/npy system (a directory with type.raw) at or below it")
            expanded.extend(found)
        else:
            expanded.append(path)
    return expanded


# --------------------------------------------------------------------------- the numbers
@dataclasses.dataclass(frozen=True)
class ErrorStat:
    """MAE and RMSE of one quantity, and the number of values they were taken over (the averaging weight)."""

    mae: float
    rmse: float
    weight: float

    @classmethod
    def of(cls, error: np.ndarray) -> ErrorStat:
        return cls(float(np.mean(np.abs(error))), float(np.sqrt(np.mean(np.square(error)))), float(error.size))


def score_systems(potential, systems: Sequence[System], *, numb_test: int = 0, detail_file: Path | None = None,
                  progress: bool = True) -> dict:
    """dp test's errors of `potential` on every system and their weighted average.

    Returns {"systems": [one dict per system], "average": {...}}. A system's dict holds "system" (its
    path), "n_frames", "n_atoms" and `mae_<q>`, `rmse_<q>` for every q in QUANTITIES (nan where the system
    has no such label); the average holds "n_systems", "n_frames" and the same keys (nan where no system
    has the label). `numb_test` > 0 keeps only the first numb_test frames of each system.
    """
    if not systems:
        raise Dpa3Error("no system to test")
    for system in systems:  # an unknown element stops the run before any evaluation
        system.type_indices(potential.type_map)
    systems = [_first_frames(system, numb_test) for system in systems]
    per_system, errors_of_systems, details = [], [], []
    for system in systems:
        predicted = predict(potential, system, progress=progress)
        errors = system_errors(predicted, system)
        errors_of_systems.append(errors)
        per_system.append({"system": str(system.source), "n_frames": system.n_frames, "n_atoms": system.n_atoms,
                           **_flatten(errors)})
        if detail_file is not None:
            details.append(detail_rows(predicted, system))
    if detail_file is not None:
        write_detail_files(Path(detail_file), details, [str(system.source) for system in systems])
    average = {"n_systems": len(systems), "n_frames": sum(system.n_frames for system in systems),
               **_flatten(merge_errors(errors_of_systems))}
    return {"systems": per_system, "average": average}


def predict(potential, system: System, *, progress: bool = False) -> dict[str, np.ndarray]:
    """energy [nf], forces [nf, n, 3], virial [nf, 3, 3] of every frame, `ATOMS_PER_BATCH` atoms at a time.

    The last batch is filled up with copies of the system's last frame, so that every batch has one shape
    and compiles once; the copies' results are dropped.
    """
    types = system.type_indices(potential.type_map)  # [n]
    batch = max(1, ATOMS_PER_BATCH // system.n_atoms)
    batch = min(batch, system.n_frames)
    frames = []
    for start in tqdm(range(0, system.n_frames, batch), desc=f"testing {system.source.name}", unit="batch",
                      disable=not progress):
        indices = [min(frame, system.n_frames - 1) for frame in range(start, start + batch)]
        structures = [(system.coord[f], types, None if system.cell is None else system.cell[f]) for f in indices]
        results = potential.evaluate_batch(structures)
        frames.extend(results[: min(batch, system.n_frames - start)])
    return {key: np.stack([np.asarray(result[key], dtype=np.float64) for result in frames])
            for key in ("energy", "forces", "virial")}


def system_errors(predicted: dict[str, np.ndarray], system: System) -> dict[str, ErrorStat]:
    """dp test's errors of one system, for the labels it has (module docstring)."""
    n_atoms = system.n_atoms
    errors = {}
    if system.energy is not None:
        energy_error = predicted["energy"] - system.energy  # [nf]
        errors["e"] = ErrorStat.of(energy_error)
        errors["ea"] = ErrorStat.of(energy_error / n_atoms)
    if system.forces is not None:
        errors["f"] = ErrorStat.of(predicted["forces"] - system.forces)  # over [nf, n, 3]
    if system.virial is not None and system.cell is not None:
        virial_error = predicted["virial"] - system.virial  # [nf, 3, 3]
        errors["v"] = ErrorStat.of(virial_error)
        errors["va"] = ErrorStat.of(virial_error / n_atoms)
        volume = np.abs(np.linalg.det(system.cell))  # [nf] Å³
        has_volume = volume > 0  # dp test drops frames with a singular cell from the stress
        if has_volume.any():
            errors["s"] = ErrorStat.of(-virial_error[has_volume] / volume[has_volume, None, None])
    return errors


def merge_errors(errors_of_systems: Sequence[dict[str, ErrorStat]]) -> dict[str, ErrorStat]:
    """The errors over all systems' values pooled: MAE = Σ w·MAE / Σ w, RMSE = sqrt(Σ w·RMSE² / Σ w)."""
    merged = {}
    for key in QUANTITIES:
        stats = [errors[key] for errors in errors_of_systems if key in errors]
        if stats:
            weight = sum(stat.weight for stat in stats)
            merged[key] = ErrorStat(
                mae=sum(stat.weight * stat.mae for stat in stats) / weight,
                rmse=float(np.sqrt(sum(stat.weight * stat.rmse**2 for stat in stats) / weight)),
                weight=weight,
            )
    return merged


def _flatten(errors: dict[str, ErrorStat]) -> dict[str, float]:
    """{"e": ErrorStat, ...} -> {"mae_e": ..., "rmse_e": ..., ...} with nan for every absent quantity."""
    flat = {}
    for key in QUANTITIES:
        stat = errors.get(key)
        flat[f"mae_{key}"] = np.nan if stat is None else stat.mae
        flat[f"rmse_{key}"] = np.nan if stat is None else stat.rmse
    return flat


def _first_frames(system: System, numb_test: int) -> System:
    """The system cut to its first `numb_test` frames (all of them for 0)."""
    if numb_test == 0 or numb_test >= system.n_frames:
        return system
    per_frame = ("coord", "cell", "energy", "forces", "virial")
    return dataclasses.replace(system, **{
        name: None if getattr(system, name) is None else getattr(system, name)[:numb_test] for name in per_frame
    })


# --------------------------------------------------------------------------- the table
def format_scores(scores: dict, model: Path | str | None = None) -> str:
    """A table: one row per system and one for the weighted average; a column pair (MAE, RMSE) per
    quantity that at least one system has a label for."""
    named_rows = [(f"[{index}]", row) for index, row in enumerate(scores["systems"], start=1)]
    named_rows.append(("average", scores["average"]))
    shown = [key for key in QUANTITIES if any(np.isfinite(row[f"rmse_{key}"]) for _, row in named_rows)]
    lines = [] if model is None else [f"# model : {model}"]
    lines += [f"# {name} {row['system']}  ({row['n_frames']} frames of {row['n_atoms']} atoms)"
              for name, row in named_rows[:-1]]
    if not shown:
        lines.append("# no system has energy, force or virial labels: nothing to compare")
        return "\n".join(lines)
    width = 10  # of one number; a quantity's (MAE, RMSE) pair takes 2 * (width + 1) characters
    titles = ["{} ({})".format(*QUANTITIES[key]) for key in shown]
    lines.append("")
    lines.append(" " * 16 + "".join(f"{title:>{2 * width + 2}}" for title in titles))
    lines.append(f"{'system':<9}{'frames':>7}" + f"{'MAE':>{width + 1}}{'RMSE':>{width + 1}}" * len(shown))
    for name, row in named_rows:
        cells = "".join(f" {_number(row[f'mae_{key}']):>{width}} {_number(row[f'rmse_{key}']):>{width}}"
                        for key in shown)
        lines.append(f"{name:<9}{row['n_frames']:>7}{cells}")
    lines.append(f"# average over {scores['average']['n_systems']} systems as dp test: all values pooled "
                 "(energies weighted by frames, forces by components, virials by 9 x frames); - : no label")
    return "\n".join(lines)


def _number(value: float) -> str:
    return "-" if not np.isfinite(value) else f"{value:.3e}"


# --------------------------------------------------------------------------- dp test's detail files
def _tensor_columns(letter: str) -> str:
    """dp test's column names of a 3 x 3 tensor, data then prediction: data_vxx data_vxy ... pred_vzz."""
    components = [row + column for row in "xyz" for column in "xyz"]
    return " ".join([f"data_{letter}{c}" for c in components] + [f"pred_{letter}{c}" for c in components])


DETAIL_COLUMNS = {  # file suffix -> the header after the system name
    ".e.out": ": data_e pred_e",
    ".e_peratom.out": ": data_e pred_e",
    ".f.out": ": data_fx data_fy data_fz pred_fx pred_fy pred_fz",
    ".v.out": ": " + _tensor_columns("v"),
    ".v_peratom.out": ": " + _tensor_columns("v"),
    ".s.out": " (eV/Å³): " + _tensor_columns("s"),
}


def detail_rows(predicted: dict[str, np.ndarray], system: System) -> dict[str, np.ndarray]:
    """One system's rows of each detail file (module docstring); a missing label is nan."""
    n_frames, n_atoms = system.n_frames, system.n_atoms

    def label(value: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
        return np.full(shape, np.nan) if value is None else value

    energy = np.stack([label(system.energy, (n_frames,)), predicted["energy"]], axis=1)  # [nf, 2]
    forces = np.concatenate([label(system.forces, (n_frames, n_atoms, 3)).reshape(-1, 3),
                             predicted["forces"].reshape(-1, 3)], axis=1)  # [nf * n, 6]
    virial_label = label(system.virial, (n_frames, 3, 3))
    virial = np.concatenate([virial_label.reshape(-1, 9), predicted["virial"].reshape(-1, 9)], axis=1)  # [nf, 18]
    rows = {".e.out": energy, ".e_peratom.out": energy / n_atoms, ".f.out": forces,
            ".v.out": virial, ".v_peratom.out": virial / n_atoms}
    if system.virial is not None and system.cell is not None:
        volume = np.abs(np.linalg.det(system.cell))  # [nf] Å³
        has_volume = volume > 0
        rows[".s.out"] = -virial[has_volume] / volume[has_volume, None]  # [nf with a volume, 18] eV/Å³
    return rows


def write_detail_files(prefix: Path, details: Sequence[dict[str, np.ndarray]], names: Sequence[str]) -> None:
    """Every system's rows, one after the other, under a header naming the first system in the file."""
    for suffix, columns in DETAIL_COLUMNS.items():
        blocks = [(name, rows[suffix]) for name, rows in zip(names, details, strict=True) if suffix in rows]
        if blocks:
            header = f"{blocks[0][0]}{columns}"
            _savetxt_atomically(prefix.with_suffix(suffix), np.concatenate([rows for _, rows in blocks]), header)


def _savetxt_atomically(path: Path, table: np.ndarray, header: str) -> None:
    """`np.savetxt` (dp test's format: %.18e, "# " header) to a temporary file beside `path`, then rename."""
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            np.savetxt(file, table, header=header)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise

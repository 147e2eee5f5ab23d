"""`dpa3 eval`: a model's energy, per-atom energies, forces and virial on every frame of a system.

    dpa3 eval --model MODEL --system PATH --out OUT.npz

MODEL is a deepmd-kit `.dp`/`.yaml` file, a dpa3-ref checkpoint, or an ONNX export (`.onnx`, run by
onnxruntime through the JAX-free client dpa3_onnx, on --threads threads); PATH a deepmd/npy directory or an
extxyz file (see `dpa3_ref.data`). OUT.npz holds

    energy       (nf,)        eV
    atom_energy  (nf, n)      eV
    forces       (nf, n, 3)   eV/Å
    virial       (nf, 3, 3)   eV, deepmd convention (spec §7)

n counts the system's atom slots. In the mixed-type layout, where a frame may leave slots empty (virtual atoms,
type -1), each frame is evaluated on its real atoms only and the empty slots hold 0 in atom_energy and forces.

When the system has DFT labels, the errors are printed as deepmd-kit's `dp test` reports them
(spec §9.2): energy and virial per atom, sqrt(mean_f (ΔE_f / N_f)²), and in total; forces over all components.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dpa3_ref.data import System, read_system
from dpa3_ref.errors import Dpa3Error


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path,
                        help="deepmd-kit .dp/.yaml model, dpa3-ref checkpoint, or ONNX export (.onnx)")
    parser.add_argument("--system", required=True, type=Path, help="deepmd/npy system directory or extxyz file")
    parser.add_argument("--out", required=True, type=Path, help="output .npz: energy, atom_energy, forces, virial")
    parser.add_argument("--head", help="the head (dataset) of a multitask model")
    parser.add_argument("--threads", type=int, help="onnxruntime threads for an .onnx model (default: all cores)")


def run(args: argparse.Namespace) -> int:
    if not args.out.parent.is_dir():
        raise Dpa3Error(f"{args.out}: directory {args.out.parent} does not exist")
    system = read_system(args.system)
    potential = load_any(args.model, args.threads, args.head)
    predictions = evaluate_system(potential, system)
    write_npz_atomically(args.out, predictions)
    slots = "atom slots (mixed types)" if system.is_mixed_type else "atoms"
    print(f"wrote {args.out}: {system.n_frames} frames of {system.n_atoms} {slots}")
    report = rmse_report(predictions, system)
    if report:
        print(format_report(report, system))
    return 0


def load_any(path: Path, threads: int | None = None, head: str | None = None):
    """A model file of any kind: an ONNX export through dpa3_onnx (no JAX), anything else through dpa3_ref
    (`head` picks a head of a multitask model file; an export holds one head already)."""
    if path.suffix == ".onnx":
        from dpa3_onnx import OnnxPotential

        if head is not None:
            raise Dpa3Error("--head applies to multitask model files; an ONNX export holds one head (dpa3 export --head)")
        return OnnxPotential(path, threads=threads)
    if threads is not None:
        raise Dpa3Error("--threads applies to ONNX models (.onnx) only")
    import dpa3_ref  # the model pulls in JAX: only when evaluating, so `dpa3 --help` stays fast

    return dpa3_ref.load(path, head=head)


def evaluate_system(potential, system: System, progress: bool = True) -> dict[str, np.ndarray]:
    """`potential.evaluate` on every frame: energy [nf], atom_energy [nf, n], forces [nf, n, 3], virial [nf, 3, 3].

    Frame by frame, because the atoms can change from frame to frame (the mixed-type layout). A virtual atom
    (type -1, an empty slot) is left out of its frame, and its slot gets 0 in atom_energy and forces, so that
    the outputs keep the system's n atom slots."""
    system.check_type_map(potential.type_map)  # names an element the model lacks before any work is done
    n_frames, n_slots = system.n_frames, system.n_atoms
    out = {"energy": np.zeros(n_frames), "atom_energy": np.zeros((n_frames, n_slots)),
           "forces": np.zeros((n_frames, n_slots, 3)), "virial": np.zeros((n_frames, 3, 3))}
    for frame in tqdm(range(n_frames), desc=f"evaluating {system.source.name}", unit="frame", disable=not progress):
        types = system.frame_type_indices(frame, potential.type_map)  # [n], -1 for a virtual atom
        real = types >= 0  # [n]
        cell = None if system.cell is None else system.cell[frame]
        result = potential.evaluate(system.coord[frame][real], types[real], cell)
        out["energy"][frame] = result["energy"]
        out["atom_energy"][frame, real] = result["atom_energy"]
        out["forces"][frame, real] = result["forces"]
        out["virial"][frame] = result["virial"]
    return out


def rmse_report(pred: dict[str, np.ndarray], system: System) -> dict[str, float]:
    """Root-mean-square errors against the system's labels, for the labels it has (spec §9.2).

    energy_rmse_per_atom = sqrt(mean_f (ΔE_f / N_f)²), energy_rmse = sqrt(mean_f ΔE_f²),
    force_rmse = sqrt(mean over frames, atoms and xyz of ΔF²),
    virial_rmse_per_atom = sqrt(mean_f mean_9 (ΔW_f / N_f)²), virial_rmse = the same without 1/N_f.
    N_f counts the atoms of frame f; virtual atoms (mixed-type layout) count nowhere, forces included.
    """
    n_atoms = system.n_real_atoms  # [nf]
    report = {}
    if system.energy is not None:
        energy_error = pred["energy"] - system.energy  # [nf]
        report["energy_rmse"] = _rms(energy_error)
        report["energy_rmse_per_atom"] = _rms(energy_error / n_atoms)
    if system.forces is not None:
        report["force_rmse"] = _rms((pred["forces"] - system.forces)[system.real_atom_mask])  # [real atoms, 3]
    if system.virial is not None:
        virial_error = pred["virial"] - system.virial  # [nf, 3, 3]
        report["virial_rmse"] = _rms(virial_error)
        report["virial_rmse_per_atom"] = _rms(virial_error / n_atoms[:, None, None])
    return report


def format_report(report: dict[str, float], system: System) -> str:
    """The errors as lines in the style of `dp test`."""
    lines = [f"# number of test data : {system.n_frames}"]
    labels = {  # report key -> (label, unit)
        "energy_rmse": ("Energy RMSE", "eV"),
        "energy_rmse_per_atom": ("Energy RMSE/Natoms", "eV"),
        "force_rmse": ("Force  RMSE", "eV/A"),
        "virial_rmse": ("Virial RMSE", "eV"),
        "virial_rmse_per_atom": ("Virial RMSE/Natoms", "eV"),
    }
    for key, (label, unit) in labels.items():
        if key in report:
            lines.append(f"{label:<19}: {report[key]:e} {unit}")
    return "\n".join(lines)


def write_npz_atomically(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see a half-written file."""
    path = Path(path)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as file:
            np.savez(file, **arrays)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def _rms(values: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(values))))

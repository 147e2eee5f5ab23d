"""`dpa3 demo`: train a multitask DPA3 with dataset encoding, from nothing, in a few minutes on a laptop.

Everything the demo needs is generated on the spot (no downloads), with a real interatomic potential that
ships with ASE: effective-medium theory (EMT) for Cu and Ni. Its steps, each timed:

1. **Data.** Two datasets, written as deepmd/npy systems under WORKDIR/data, each split into training and
   validation frames: fcc Cu and Ni cells of 32 atoms, rattled by random displacements of several
   amplitudes and strained. They stand for two DFT codes with *different settings*:

       dataset "emt"       bulk Cu, bulk Ni                    E = E_EMT                   F = F_EMT
       dataset "emt_b"     bulk Cu, bulk Ni, Cu(111), Ni(100)  E = s·E_EMT + Σ_i μ(t_i)    F = s·F_EMT

   with s = 1.1 (a functional that binds 10 % more strongly) and per-element reference energies μ (another
   pseudopotential). Both datasets hold bulk cells: the same kind of structure has two different labels,
   depending on where it comes from (if the datasets had no structures in common, a single model could
   tell them apart by their structures alone and would need no dataset encoding).
2. **Multitask training with dataset encoding** (spec §6.4, §8): a deepmd-kit multitask input, written to
   WORKDIR/input.json so that it can be read and reused with `dpa3 train`, with one shared descriptor and one
   shared fitting net whose input is extended by the dataset's one-hot (`dim_case_embd` = 2). Each head has
   its own energy offsets out_bias; `dpa3_ref.train.train` runs deepmd-kit's training algorithm on it.
3. **Contrast**: the same architecture trained as a single task on the union of both datasets, in
   WORKDIR/single-task. It has to give one answer for both labellings of a structure.
4. **Validation RMSEs** per dataset of both models, as `dp test` computes them (`dpa3_ref.testing`).
5. **Spot checks** of the trained model in float64: rotation and translation invariance, force = −∇E.
6. **NVE molecular dynamics** with the trained model as an ASE calculator: the drift of the total energy.
7. **ONNX export** of head "emt" (`dpa3 export`, contract v1, float32 like the model) to WORKDIR/model-emt.onnx,
   run by onnxruntime through the JAX-free client dpa3_onnx and compared with JAX: on a validation frame, and
   on the same frame handed over as an MD code with domain decomposition would (local + ghost atoms).
   Needs the export extra (pip install 'dpa3-ref[export]'); without it the step is skipped, saying so.

The learning curve (lcurve.out, lcurve.png) and the parity plots (parity.png) are written by training.
`dpa3 demo --quick` runs the same steps on tiny data for a few dozen steps, without the contrast model and
without the ONNX export (jax2onnx's tracing of the force graph alone takes 30–70 s); it exists so that CI runs
the main job on every change.

Measured on the 2-core development machine, compilation included: the full demo 113 s (132 s of CPU time;
two models of 1000 steps each), `--quick` 39 s (48 s of CPU time).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

TYPE_MAP = ("Cu", "Ni")
DATASETS = ("emt", "emt_b")  # also the heads of the multitask model, in their one-hot order (sorted)


# =========================================================================== sizes of a run
@dataclasses.dataclass(frozen=True)
class DemoSize:
    """How much of everything one run does."""

    rattle: tuple[float, ...]  # Å, rms Gaussian displacement per Cartesian direction; frames at each
    frames_per_rattle: int  # per structure and rattle amplitude, before the training/validation split
    validation_fraction: float
    numb_steps: int  # training steps of each model
    nve_steps: int
    single_task: bool  # train the single-task model on the union for contrast
    onnx: bool  # export to ONNX and check onnxruntime against JAX


FULL = DemoSize(rattle=(0.02, 0.04, 0.06), frames_per_rattle=20, validation_fraction=0.2,
                numb_steps=1000, nve_steps=100, single_task=True, onnx=True)
QUICK = DemoSize(rattle=(0.02, 0.06), frames_per_rattle=3, validation_fraction=0.34,
                 numb_steps=30, nve_steps=10, single_task=False, onnx=False)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", type=Path, default=Path("dpa3-demo"),
                        help="where the data, input.json, models and plots go (default ./dpa3-demo)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny data and a few dozen steps, no contrast model (well under a minute; for CI)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


# =========================================================================== 1. the datasets
@dataclasses.dataclass(frozen=True)
class Reference:
    """The 'DFT settings' of a dataset: E = scale·E_EMT + Σ_i shift[element of atom i], F = scale·F_EMT."""

    scale: float
    shift: dict[str, float]  # eV per atom of each element

    def describe(self) -> str:
        if self.scale == 1.0 and not any(self.shift.values()):
            return "E = E_EMT"
        shifts = ", ".join(f"μ({element}) = {value:+.2f} eV" for element, value in self.shift.items())
        return f"E = {self.scale:g}·E_EMT + Σ μ, {shifts}"


REFERENCES = {
    "emt": Reference(scale=1.0, shift={"Cu": 0.0, "Ni": 0.0}),
    "emt_b": Reference(scale=1.1, shift={"Cu": -0.35, "Ni": 0.25}),
}


def structures(dataset: str) -> dict[str, object]:
    """The ideal structures of a dataset, 32 atoms each.

    The slabs are 8 layers thick, so that their middle atoms have every neighbour a bulk atom has: then
    every frame's neighbour table has the same padded width (e_sel), all batches have one shape, and each
    head's training step compiles once. Slabs are fully periodic with 6 Å of vacuum on each side (DPA3
    treats a cell as all periodic or open)."""
    from ase.build import bulk, fcc100, fcc111

    cells = {"Cu_fcc": bulk("Cu", "fcc", cubic=True).repeat((2, 2, 2)),
             "Ni_fcc": bulk("Ni", "fcc", cubic=True).repeat((2, 2, 2))}
    if dataset == "emt":
        return cells
    cells["Cu_111"] = fcc111("Cu", size=(2, 2, 8), vacuum=6.0, orthogonal=True)
    cells["Ni_100"] = fcc100("Ni", size=(2, 2, 8), vacuum=6.0)
    for atoms in cells.values():
        atoms.pbc = True
    return cells


def sample_frames(ideal, rattle: Sequence[float], per_rattle: int, rng: np.random.Generator) -> list:
    """Rattled and strained copies of `ideal`: Gaussian displacements of rms `rattle` (Å) per direction,
    and a random symmetric strain of up to ±2 % per component (cell and positions deformed together)."""
    frames = []
    for amplitude in rattle:
        for _ in range(per_rattle):
            atoms = ideal.copy()
            strain = rng.uniform(-0.02, 0.02, (3, 3))
            strain = (strain + strain.T) / 2
            if is_slab(atoms):
                strain[2, :] = strain[:, 2] = 0.0  # the vacuum direction is not a lattice direction to strain
            atoms.set_cell(np.asarray(atoms.cell) @ (np.eye(3) + strain), scale_atoms=True)
            atoms.positions += rng.normal(0.0, amplitude, atoms.positions.shape)
            frames.append(atoms)
    return frames


def is_slab(atoms) -> bool:
    """A slab has vacuum along z: its atoms fill less than half of the cell's height."""
    heights = atoms.positions[:, 2]
    return np.ptp(heights) < 0.5 * atoms.cell.lengths()[2]


def label(frames: list, reference: Reference) -> tuple[np.ndarray, np.ndarray]:
    """Energies [nf] (eV) and forces [nf, n, 3] (eV/Å) of every frame under `reference`."""
    from ase.calculators.emt import EMT

    calculator = EMT()
    energies, forces = [], []
    for atoms in frames:
        atoms.calc = calculator
        shift = sum(reference.shift[symbol] for symbol in atoms.get_chemical_symbols())
        energies.append(reference.scale * atoms.get_potential_energy() + shift)
        forces.append(reference.scale * atoms.get_forces())
        atoms.calc = None
    return np.array(energies), np.array(forces)


def write_deepmd_npy(directory: Path, symbols: Sequence[str], coord: np.ndarray, cell: np.ndarray | None,
                     energy: np.ndarray, forces: np.ndarray, type_map: Sequence[str]) -> Path:
    """One deepmd/npy system (layout in data.py): type.raw, type_map.raw, set.000/{coord,box,energy,force}.npy,
    or the `nopbc` marker instead of box.npy when `cell` is None.

    coord [nf, n, 3] Å, cell [nf, 3, 3] Å (rows = lattice vectors), energy [nf] eV, forces [nf, n, 3] eV/Å;
    stored in float64 so that reading back gives the same numbers."""
    directory.mkdir(parents=True, exist_ok=True)
    n_frames = coord.shape[0]
    (directory / "type_map.raw").write_text("".join(f"{element}\n" for element in type_map))
    (directory / "type.raw").write_text("".join(f"{list(type_map).index(s)}\n" for s in symbols))
    data = directory / "set.000"
    data.mkdir(exist_ok=True)
    np.save(data / "coord.npy", coord.reshape(n_frames, -1).astype(np.float64))
    np.save(data / "energy.npy", energy.astype(np.float64))
    np.save(data / "force.npy", forces.reshape(n_frames, -1).astype(np.float64))
    if cell is None:
        (directory / "nopbc").touch()
    else:
        np.save(data / "box.npy", cell.reshape(n_frames, 9).astype(np.float64))
    return directory


@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str
    reference: Reference
    training: list[Path]  # deepmd/npy systems
    validation: list[Path]
    frames: tuple[int, int]  # training, validation


def make_dataset(name: str, root: Path, size: DemoSize, rng: np.random.Generator) -> Dataset:
    """Sample, label and write every structure of one dataset, splitting its frames into training and
    validation systems (root/name/{train,valid}/structure)."""
    reference = REFERENCES[name]
    training, validation, counts = [], [], [0, 0]
    for structure, ideal in structures(name).items():
        frames = sample_frames(ideal, size.rattle, size.frames_per_rattle, rng)
        energy, forces = label(frames, reference)
        coord = np.stack([atoms.positions for atoms in frames])  # [nf, n, 3]
        cell = np.stack([np.asarray(atoms.cell) for atoms in frames])  # [nf, 3, 3]
        order = rng.permutation(len(frames))  # validation frames drawn from every rattle amplitude
        n_valid = max(1, round(size.validation_fraction * len(frames)))
        for split, indices, paths, slot in (("valid", order[:n_valid], validation, 1),
                                            ("train", order[n_valid:], training, 0)):
            paths.append(write_deepmd_npy(root / name / split / structure, ideal.get_chemical_symbols(),
                                          coord[indices], cell[indices], energy[indices], forces[indices],
                                          TYPE_MAP))
            counts[slot] += len(indices)
    return Dataset(name, reference, training, validation, (counts[0], counts[1]))


# =========================================================================== 2–3. the training inputs
def descriptor_section() -> dict:
    """A small but complete DPA3 descriptor: 2 RepFlow layers, node/edge/angle widths 32/16/8.

    e_rcut = 5 Å covers EMT's own range (to between the third and fourth neighbour shells of Cu and Ni);
    e_sel = 64 and a_sel = 16 hold every neighbour of the strained and rattled frames, so that no
    neighbour is ever dropped (which would make the energy jump during molecular dynamics)."""
    return {
        "type": "dpa3",
        "repflow": {"n_dim": 32, "e_dim": 16, "a_dim": 8, "nlayers": 2,
                    "e_rcut": 4.7, "e_rcut_smth": 3.7, "e_sel": 48,
                    "a_rcut": 3.1, "a_rcut_smth": 2.6, "a_sel": 16,
                    "axis_neuron": 4, "update_angle": True, "update_style": "res_residual",
                    "update_residual": 0.1, "update_residual_init": "const", "smooth_edge_update": True,
                    "edge_init_use_dist": True, "use_exp_switch": True, "fix_stat_std": 0.3},
        "activation_function": "silut:10.0",
        "precision": "float32",
    }


def fitting_section(dim_case_embd: int) -> dict:
    return {"neuron": [32, 32], "resnet_dt": True, "activation_function": "silut:10.0", "precision": "float32",
            "dim_case_embd": dim_case_embd}


def training_settings(size: DemoSize, seed: int) -> tuple[dict, dict]:
    """learning_rate and the common training keys: a constant learning rate of 2e-3 (see LOSS)."""
    learning_rate = {"type": "exp", "start_lr": 2e-3, "stop_lr": 2e-3, "decay_steps": max(size.numb_steps // 20, 1)}
    training = {"numb_steps": size.numb_steps, "seed": seed, "disp_freq": max(size.numb_steps // 20, 1),
                "save_freq": size.numb_steps, "max_ckpt_keep": 1}
    return learning_rate, training


# Energy and force terms weighted equally, and a constant learning rate. deepmd-kit's usual recipe (the
# learning rate decaying from 1e-3 to ~1e-5 while the energy prefactor grows from 0.02 to 1 and the force
# prefactor falls from 1000 to 1) is made for 10⁵–10⁶ steps. Measured here on the bulk Cu data alone
# (1000 steps, RMSEs over all validation frames; labels: 18 meV/atom and 0.41 eV/Å standard deviation):
#   lr 2e-3, pref_e = pref_f = 10            6 meV/atom   0.12 eV/Å
#   lr 2e-3, pref_e = 1, pref_f = 100       40 meV/atom   0.07 eV/Å   (the energy is left unfitted)
# and, on more strongly rattled data, a learning rate decaying to 1e-4 doubled the force error.
LOSS = {"type": "ener", "start_pref_e": 10.0, "limit_pref_e": 10.0, "start_pref_f": 10.0, "limit_pref_f": 10.0}


def multitask_input(datasets: dict[str, Dataset], size: DemoSize, seed: int, root: Path) -> dict:
    """deepmd-kit's multitask input, DPA3 style: shared type map, descriptor and fitting net (with the
    dataset one-hot), one model / loss / data entry per dataset; model_prob ∝ the number of systems."""
    learning_rate, training = training_settings(size, seed)
    return {
        "model": {
            "shared_dict": {"type_map_all": list(TYPE_MAP), "dpa3_descriptor": descriptor_section(),
                            "shared_fitting": fitting_section(dim_case_embd=len(datasets))},
            "model_dict": {name: {"type_map": "type_map_all", "descriptor": "dpa3_descriptor",
                                  "fitting_net": "shared_fitting"} for name in datasets},
        },
        "learning_rate": learning_rate,
        "optimizer": {"type": "Adam"},
        "loss_dict": {name: dict(LOSS) for name in datasets},
        "training": {
            "data_dict": {name: {"training_data": {"systems": relative(d.training, root), "batch_size": 1},
                                 "validation_data": {"systems": relative(d.validation, root), "batch_size": 1}}
                          for name, d in datasets.items()},
            **training,
        },
    }


def single_task_input(datasets: dict[str, Dataset], size: DemoSize, seed: int, root: Path) -> dict:
    """The same architecture without dataset encoding, trained on the union of all datasets."""
    learning_rate, training = training_settings(size, seed)
    union = [path for d in datasets.values() for path in d.training]
    union_valid = [path for d in datasets.values() for path in d.validation]
    return {
        "model": {"type_map": list(TYPE_MAP), "descriptor": descriptor_section(),
                  "fitting_net": fitting_section(dim_case_embd=0)},
        "learning_rate": learning_rate,
        "optimizer": {"type": "Adam"},
        "loss": dict(LOSS),
        "training": {"training_data": {"systems": relative(union, root), "batch_size": 1},
                     "validation_data": {"systems": relative(union_valid, root), "batch_size": 1},
                     **training},
    }


def relative(paths: Sequence[Path], root: Path) -> list[str]:
    """Paths as the input file names them: relative to its directory."""
    return [os.path.relpath(path, root) for path in paths]


def write_input(data: dict, path: Path):
    """Write an input as JSON and read it back the way `dpa3 train` does (every key checked)."""
    from dpa3_ref.inputs import read_input

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return read_input(path)


# =========================================================================== 4. validation errors
def validation_errors(model_path: Path, head: str | None, systems: Sequence[Path]) -> tuple[float, float]:
    """Energy RMSE per atom (eV/atom) and force RMSE (eV/Å) over `systems`, pooled as dp test does."""
    import dpa3_ref
    from dpa3_ref.data import read_system
    from dpa3_ref.testing import score_systems

    potential = dpa3_ref.load(model_path, head=head)
    scores = score_systems(potential, [read_system(path) for path in systems], progress=False)
    return scores["average"]["rmse_ea"], scores["average"]["rmse_f"]


def format_table(rows: dict[str, dict[str, tuple[float, float]]], datasets: dict[str, Dataset]) -> str:
    """One line per dataset: validation frames, then (energy, force) RMSE of each model."""
    models = list(next(iter(rows.values())))
    lines = [f"{'':25s}" + "".join(f"{model:>28s}" for model in models),
             f"{'dataset':10s}{'frames':>6s}{'':9s}" + "   E meV/atom    F meV/Å   " * len(models)]
    for name, by_model in rows.items():
        cells = "".join(f"{energy * 1e3:13.2f}{force * 1e3:11.1f}    " for energy, force in by_model.values())
        lines.append(f"{name:10s}{datasets[name].frames[1]:6d}{'':9s}" + cells)
    return "\n".join(lines)


# =========================================================================== 5–7. the trained model at work
def spot_checks(model_path: Path, head: str, atoms, seed: int) -> list[str]:
    """Rotation and translation invariance and force = −∇E of the trained head, in float64."""
    from scipy.spatial.transform import Rotation

    import dpa3_ref
    from dpa3_ref.model import cast_model

    potential = dpa3_ref.Potential(cast_model(dpa3_ref.load(model_path, head=head).model, "float64"))
    positions, symbols, cell = atoms.positions, atoms.get_chemical_symbols(), np.asarray(atoms.cell)
    reference = potential.evaluate(positions, symbols, cell)
    rotation = Rotation.random(random_state=seed + 1).as_matrix()
    rotated = potential.evaluate(positions @ rotation.T, symbols, cell @ rotation.T)
    shifted = potential.evaluate(positions + np.array([0.37, -1.21, 2.05]), symbols, cell)
    step, worst = 1e-5, 0.0
    for atom, axis in [(0, 0), (1, 1), (5, 2)]:
        plus, minus = positions.copy(), positions.copy()
        plus[atom, axis] += step
        minus[atom, axis] -= step
        derivative = (potential.evaluate(plus, symbols, cell)["energy"]
                      - potential.evaluate(minus, symbols, cell)["energy"]) / (2 * step)
        worst = max(worst, abs(reference["forces"][atom, axis] + derivative))
    return [
        f"rotation:    |ΔE| = {abs(rotated['energy'] - reference['energy']):.1e} eV, "
        f"|F(Qx) − F(x)Qᵀ| = {np.abs(rotated['forces'] - reference['forces'] @ rotation.T).max():.1e} eV/Å",
        f"translation: |ΔE| = {abs(shifted['energy'] - reference['energy']):.1e} eV",
        f"force = −∇E: worst |F + dE/dx| = {worst:.1e} eV/Å (central differences, 3 components)",
    ]


def nve(model_path: Path, head: str, atoms, steps: int, seed: int, progress: bool) -> str:
    """Velocity Verlet (1 fs) from 600 K velocities; the drift and the fluctuation of the total energy."""
    from ase import units
    from ase.md import velocitydistribution
    from ase.md.verlet import VelocityVerlet
    from tqdm import tqdm

    import dpa3_ref
    from dpa3_ref.calculator import DPA3Calculator

    atoms = atoms.copy()
    atoms.calc = DPA3Calculator(dpa3_ref.load(model_path, head=head))
    # ASE 3.29 renamed MaxwellBoltzmannDistribution to thermalize_momenta; pyproject allows ASE >= 3.23
    thermalize = getattr(velocitydistribution, "thermalize_momenta", velocitydistribution.MaxwellBoltzmannDistribution)
    thermalize(atoms, temperature_K=600, rng=np.random.default_rng(seed))
    dynamics = VelocityVerlet(atoms, timestep=1.0 * units.fs)
    totals = [atoms.get_total_energy()]
    for _ in tqdm(range(steps), desc="NVE", unit="step", disable=not progress):
        dynamics.run(1)
        totals.append(atoms.get_total_energy())
    totals = np.array(totals) / len(atoms)  # eV/atom
    return (f"{steps} steps of 1 fs, {len(atoms)} atoms, started at 600 K: drift {(totals[-1] - totals[0]) * 1e3:+.4f} "
            f"meV/atom, fluctuation (std) {totals.std() * 1e3:.4f} meV/atom, final T = {atoms.get_temperature():.0f} K")


def export_and_check(model_path: Path, head: str, workdir: Path, system: Path) -> list[str]:
    """Export one head to ONNX (`dpa3 export`, contract v1) and check onnxruntime against JAX.

    The file has the model's own precision (float32 here: descriptor and fitting net are float32, so the
    file's arithmetic, inputs and outputs are float32). It is run by the JAX-free client dpa3_onnx with
    onnxruntime's default threads, on the first frame of `system` (a validation system of `head`), then on
    the same frame as a domain-decomposed MD code hands it over: the cell's atoms as local atoms plus every
    periodic image within the halo (nlayers · e_rcut) as ghost atoms, no cell. There the energy of the local
    atoms, and the forces summed back onto the atoms the ghosts are images of, must be the periodic ones.
    Both are compared with `dpa3_ref.load(model, head=head)` evaluating the periodic frame."""
    import dpa3_ref
    from dpa3_onnx import OnnxPotential
    from dpa3_ref.data import read_system
    from dpa3_ref.export_onnx import export_onnx, float_type

    potential = dpa3_ref.load(model_path, head=head)
    path = workdir / f"model-{head}.onnx"
    started = time.perf_counter()
    with warnings.catch_warnings():  # a float32 file is float32 throughout: JAX says so for each float64 it meets
        warnings.filterwarnings("ignore", message="Explicitly requested dtype float64", category=UserWarning)
        export_onnx(potential, path, head=head)
    export_seconds = time.perf_counter() - started
    onnx_potential = OnnxPotential(path)

    frame = read_system(system)
    positions, symbols, cell = frame.coord[0], frame.atom_names, frame.cell[0]
    reference, jax_seconds = timed(lambda: potential.evaluate(positions, symbols, cell))
    periodic, onnx_seconds = timed(lambda: onnx_potential.evaluate(positions, symbols, cell))
    all_positions, owner = with_ghosts(positions, cell, onnx_potential.info.halo)
    ghosts, ghost_seconds = timed(lambda: onnx_potential.evaluate(all_positions, [symbols[i] for i in owner],
                                                                   n_local=len(positions)))
    folded = np.zeros_like(positions)  # [n, 3] the ghosts' forces added to the atoms they are images of
    np.add.at(folded, owner, ghosts["forces"])
    return [
        f"{path} ({float_type(potential.config)}, head {head!r}, {path.stat().st_size / 1e6:.1f} MB): "
        f"exported in {export_seconds:.0f} s",
        f"onnxruntime ({', '.join(onnx_potential.providers)}, default threads) vs JAX on a validation frame "
        f"({system.name}, {len(positions)} atoms): max |ΔE| = {difference(periodic, reference, 'energy'):.1e} eV, "
        f"max |ΔF| = {difference(periodic, reference, 'forces'):.1e} eV/Å; "
        f"{onnx_seconds * 1e3:.0f} ms per call (JAX {jax_seconds * 1e3:.0f} ms)",
        f"the same frame as {len(positions)} local + {len(all_positions) - len(positions)} ghost atoms (no cell): "
        f"max |ΔE| = {difference(ghosts, reference, 'energy'):.1e} eV, max |ΔF| (ghost forces folded back) = "
        f"{np.abs(folded - reference['forces']).max():.1e} eV/Å; {ghost_seconds * 1e3:.0f} ms per call",
    ]


def timed(evaluate) -> tuple[dict, float]:
    """The result of `evaluate()` and the seconds of a second call (the first one compiles or warms up)."""
    evaluate()
    started = time.perf_counter()
    result = evaluate()
    return result, time.perf_counter() - started


def difference(a: dict, b: dict, key: str) -> float:
    return float(np.abs(np.asarray(a[key]) - np.asarray(b[key])).max())


def with_ghosts(positions: np.ndarray, cell: np.ndarray, halo: float) -> tuple[np.ndarray, np.ndarray]:
    """The atoms wrapped into the cell, followed by every periodic image within `halo` of one of them.

    Returns the positions [n + ghosts, 3] and, for every atom, the index of the atom it is an image of."""
    fractional = np.linalg.solve(cell.T, positions.T).T
    local = (fractional - np.floor(fractional)) @ cell  # [n, 3]
    heights = abs(np.linalg.det(cell)) / np.linalg.norm(np.cross(cell[[1, 2, 0]], cell[[2, 0, 1]]), axis=1)
    reach = int(np.ceil(halo / heights.min()))  # cells to go in each direction
    shifts = np.array(list(np.ndindex(*[2 * reach + 1] * 3))) - reach
    shifts = shifts[np.abs(shifts).sum(axis=1) > 0] @ cell  # [images, 3] Å, every cell but the home one
    images = (local[None] + shifts[:, None]).reshape(-1, 3)
    owner = np.tile(np.arange(len(local)), len(shifts))
    near = np.linalg.norm(images[:, None] - local[None], axis=-1).min(axis=1) <= halo
    return np.concatenate([local, images[near]]), np.concatenate([np.arange(len(local)), owner[near]])


# =========================================================================== the run
class Steps:
    """Numbered steps, each announced with what it does and closed with how long it took."""

    def __init__(self, total: int):
        self.total, self.number, self.started = total, 0, time.perf_counter()

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        self.number += 1
        print(f"\n[{self.number}/{self.total}] {what}", flush=True)
        started = time.perf_counter()
        yield
        print(f"      ({time.perf_counter() - started:.1f} s)", flush=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


def compile_fast() -> None:
    """Ask XLA for its cheapest LLVM optimisation level, unless the user set XLA_FLAGS.

    The demo compiles about ten programs (a training and a validation step per head, evaluation at a few
    sizes) and runs each for a minute at most, so compilation is half of its time. At level 0 a training
    step compiles about 3× faster and runs about 2× slower (measured here, on a busy machine: 25 s vs 76 s
    to compile the two heads' steps, 0.07 vs 0.035 s per step). Takes effect only before JAX starts its CPU backend, as in `dpa3 demo`.
    """
    os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")


def run(args: argparse.Namespace) -> int:
    compile_fast()
    size = QUICK if args.quick else FULL
    workdir = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    from dpa3_ref.export_onnx import missing_export_packages

    missing = missing_export_packages() if size.onnx else []
    onnx_step = size.onnx and not missing
    steps = Steps(total=5 + int(size.single_task) + int(onnx_step))
    rng = np.random.default_rng(args.seed)

    with steps.step("data: Cu and Ni with ASE's EMT, two datasets computed with different settings"):
        datasets = {name: make_dataset(name, workdir / "data", size, rng) for name in DATASETS}
        for name, dataset in datasets.items():
            kinds = ", ".join(path.name for path in dataset.training)
            print(f"      {name:8s} {kinds}: {dataset.frames[0]} training + {dataset.frames[1]} validation frames "
                  f"of 32 atoms; {dataset.reference.describe()}")
        print(f"      written as deepmd/npy systems under {workdir / 'data'}")

    from dpa3_ref.train import train

    with steps.step("train a multitask DPA3 with dataset encoding (shared descriptor and fitting net)"):
        config = write_input(multitask_input(datasets, size, args.seed, workdir), workdir / "input.json")
        print(f"      input: {workdir / 'input.json'} (deepmd-kit's multitask format; dpa3 train reads it)")
        for head in config.heads:
            one_hot = [int(i == head.case_index) for i in range(head.model.dim_case_embd)]
            print(f"      head {head.name!r}: dataset one-hot {one_hot} appended to the fitting net's input")
        model_path = train(config, workdir, output="model.npz", progress=progress)

    if size.single_task:
        contrast = workdir / "single-task"
        with steps.step("for contrast: the same model as a single task on the union of both datasets"):
            union = write_input(single_task_input(datasets, size, args.seed, contrast), contrast / "input.json")
            single_path = train(union, contrast, output="model.npz", progress=progress, plots=False)

    with steps.step("validation RMSEs per dataset (dp test's definitions)"):
        rows = {name: {} for name in datasets}
        for name, dataset in datasets.items():
            rows[name]["multitask, head = dataset"] = validation_errors(model_path, name, dataset.validation)
            if size.single_task:
                rows[name]["single task on the union"] = validation_errors(single_path, None, dataset.validation)
        print(format_table(rows, datasets))

    structure = structures("emt")["Cu_fcc"]
    structure.rattle(0.05, seed=args.seed)
    with steps.step("spot checks of the trained model (head 'emt', float64 copy)"):
        for line in spot_checks(model_path, "emt", structure, args.seed):
            print(f"      {line}")

    with steps.step("NVE molecular dynamics with the trained model (ASE calculator, head 'emt')"):
        print(f"      {nve(model_path, 'emt', structure, size.nve_steps, args.seed, progress)}")

    if not size.onnx:
        print("\n(--quick skips the ONNX export, which takes longer than the rest of --quick; "
              "the full demo runs it)")
    elif missing:
        print(f"\n(no ONNX export: {', '.join(missing)} not installed; pip install 'dpa3-ref[export]')")
    if onnx_step:
        with steps.step("ONNX export of head 'emt' and onnxruntime (dpa3_onnx, no JAX) against JAX"):
            for line in export_and_check(model_path, "emt", workdir, datasets["emt"].validation[0]):
                print(f"      {line}")

    print(f"\nmodel  {model_path} (heads {', '.join(datasets)}: dpa3 test/eval --model {model_path} --head emt)")
    print(f"plots  {workdir / 'lcurve.png'}, {workdir / 'parity.png'}")
    print(f"done in {steps.elapsed():.0f} s")
    return 0

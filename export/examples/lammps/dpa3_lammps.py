"""LAMMPS glue for a DPA3 ONNX file (contract v1), through the JAX-free client dpa3_onnx.

Two ways to put the model into a LAMMPS run, both from a Python process that drives LAMMPS with the `lammps`
module (`run_lammps.py` does it):

- `FixExternalModel`: a `fix external pf/callback` callback. It gets the local atoms and evaluates them with
  the client's periodic path (cell from the LAMMPS box). One MPI rank only: the callback sees one rank's atoms.
- `PairModel`: what the pair-style plugin `pair_dpa3_onnx.cpp` calls. It gets every atom a rank holds, local
  atoms first, then LAMMPS' ghost atoms, with no cell (export/README.md §5), and adds forces on all of them;
  LAMMPS folds the ghost forces back onto their owners (`newton on`). Any number of ranks.

Virial conventions. The file's virial is deepmd-kit's, W_kl = Σ_a F_a,k x_a,l (eV). LAMMPS keeps the six
components xx, yy, zz, xy, xz, yz of Σ_a x_a ⊗ F_a with xy = Σ x_x F_y (as its `virial_fdotr_compute`), in
energy units, and forms the pressure P = (2 KE + tr W) / (3 V) · nktv2p (bar in metal units). So xy = W[1, 0],
xz = W[2, 0], yz = W[2, 1], no sign change.
"""

from __future__ import annotations

import numpy as np

from dpa3_onnx import Dpa3OnnxError, OnnxPotential


def lammps_virial(virial: np.ndarray) -> tuple[float, ...]:
    """deepmd-kit's 3×3 virial W (W_kl = Σ F_k x_l) as LAMMPS' six components xx, yy, zz, xy, xz, yz."""
    w = np.asarray(virial, dtype=np.float64)
    return float(w[0, 0]), float(w[1, 1]), float(w[2, 2]), float(w[1, 0]), float(w[2, 0]), float(w[2, 1])


def cell_from_box(boxlo, boxhi, xy: float, yz: float, xz: float) -> np.ndarray:
    """LAMMPS' (restricted triclinic) box as a cell whose rows are the lattice vectors a, b, c."""
    lx, ly, lz = (np.asarray(boxhi, dtype=np.float64) - np.asarray(boxlo, dtype=np.float64))
    return np.array([[lx, 0.0, 0.0], [xy, ly, 0.0], [xz, yz, lz]])


def type_indices(potential: OnnxPotential, elements: list[str]) -> np.ndarray:
    """Model type index of each LAMMPS type: entry t − 1 for LAMMPS type t (`pair_coeff * * O H`: 1 = O, 2 = H)."""
    unknown = [e for e in elements if e not in potential.type_map]
    if unknown:
        raise Dpa3OnnxError(f"elements {unknown} are not in the model's type map {potential.type_map}")
    return np.array([potential.type_map.index(e) for e in elements], dtype=np.int64)


class FixExternalModel:
    """`fix ID all external pf/callback 1 1` with `fix_modify ID energy yes virial yes`, on one MPI rank.

        model = FixExternalModel(lmp, "water.onnx", ["O", "H"], fix_id="dpa3")
        lmp.set_fix_external_callback("dpa3", model)
    """

    def __init__(self, lmp, model: str, elements: list[str], fix_id: str = "dpa3", threads: int | None = None):
        if lmp.extract_setting("world_size") != 1:
            raise Dpa3OnnxError("fix external sees only one rank's atoms: run it on one MPI rank, or use the "
                                "pair style dpa3/onnx (pair_dpa3_onnx.cpp) on several")
        self.lmp, self.fix_id = lmp, fix_id
        self.potential = OnnxPotential(model, threads=threads)
        self.types = type_indices(self.potential, list(elements))
        self.last: dict[str, np.ndarray] | None = None  # the latest evaluation, for inspection

    def __call__(self, caller, step: int, nlocal: int, tag, x, f) -> None:
        boxlo, boxhi, xy, yz, xz, periodicity, _ = self.lmp.extract_box()
        if not all(periodicity):
            raise Dpa3OnnxError("FixExternalModel handles fully periodic boxes only (boundary p p p)")
        lammps_types = self.lmp.numpy.extract_atom("type")[:nlocal]
        out = self.potential.evaluate(np.array(x[:nlocal]), self.types[lammps_types - 1],
                                      cell_from_box(boxlo, boxhi, xy, yz, xz))
        f[:nlocal] = out["forces"]
        self.lmp.fix_external_set_energy_global(self.fix_id, float(out["energy"]))
        self.lmp.fix_external_set_virial_global(self.fix_id, lammps_virial(out["virial"]))
        self.last = out


class PairModel:
    """The Python half of `pair_style dpa3/onnx MODEL [threads N]` / `pair_coeff * * O H` (pair_dpa3_onnx.cpp).

    The plugin hands over LAMMPS' own arrays as memoryviews (no copies on its side): positions [nall, 3]
    (local atoms first, then ghosts), LAMMPS types [nall] (int32), forces [nall, 3] to add to, per-atom
    energies [nall] to add to (or None), and nlocal. It gets back the energy of its local atoms and the
    virial (six LAMMPS components)."""

    def __init__(self, model: str, elements: list[str], threads: int = 0):
        self.potential = OnnxPotential(model, threads=threads or None)
        self.types = type_indices(self.potential, list(elements))
        self.cutoff = self.potential.info.e_rcut
        self.halo = self.potential.info.halo  # ghost atoms needed within nlayers · e_rcut of a local atom

    def compute(self, x, types, f, eatom, nlocal: int) -> tuple[float, tuple[float, ...]]:
        lammps_types = np.frombuffer(types, dtype=np.int32)
        positions = np.frombuffer(x, dtype=np.float64).reshape(len(lammps_types), 3)
        out = self.potential.evaluate(positions, self.types[lammps_types - 1], n_local=nlocal)
        forces = np.frombuffer(f, dtype=np.float64).reshape(len(lammps_types), 3)
        forces += out["forces"]
        if eatom is not None:
            np.frombuffer(eatom, dtype=np.float64)[:len(lammps_types)] += out["atom_energy"]
        return float(out["energy"]), lammps_virial(out["virial"])

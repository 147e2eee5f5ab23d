"""An ASE calculator on an exported model: energy, per-atom energies, forces and stress, without JAX.

    from dpa3_onnx.calculator import DPA3OnnxCalculator
    atoms.calc = DPA3OnnxCalculator("model.onnx")            # or an OnnxPotential; threads=, device= as there

Stress is ASE's: σ = −W / V (eV/Å³, Voigt order xx yy zz yz xz xy). Periodicity is all or nothing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from ase.calculators.calculator import Calculator, all_changes

from dpa3_onnx.contract import Dpa3OnnxError
from dpa3_onnx.session import OnnxPotential


class DPA3OnnxCalculator(Calculator):
    implemented_properties = ["energy", "free_energy", "energies", "forces", "stress"]

    def __init__(self, model: str | Path | OnnxPotential, *, threads: int | None = None, device: str = "auto",
                 **kwargs):
        super().__init__(**kwargs)
        self.potential = model if isinstance(model, OnnxPotential) else OnnxPotential(model, threads=threads,
                                                                                        device=device)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        pbc = self.atoms.pbc
        if pbc.any() and not pbc.all():
            raise Dpa3OnnxError(f"partly periodic cells (pbc={pbc.tolist()}) are not supported: use full "
                                "periodicity with a vacuum layer, or none")
        cell = np.asarray(self.atoms.cell) if pbc.all() else None
        out = self.potential.evaluate(self.atoms.positions, self.atoms.get_chemical_symbols(), cell)
        energy = float(out["energy"])
        self.results = {"energy": energy, "free_energy": energy, "energies": out["atom_energy"],
                        "forces": out["forces"]}
        if cell is not None:
            stress = -out["virial"] / self.atoms.get_volume()  # [3, 3]
            self.results["stress"] = stress.flat[[0, 4, 8, 5, 2, 1]]

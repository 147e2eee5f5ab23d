"""An ASE calculator on top of `Potential`: energy, per-atom energies, forces and stress.

    atoms.calc = DPA3Calculator(dpa3_ref.load("model.dp"))

Stress is ASE's: σ = −W / V (eV/Å³, Voigt order xx yy zz yz xz xy), from the deepmd-convention virial W.
Periodicity is all or nothing, as in deepmd-kit: a fully periodic cell or open boundaries.
"""

from __future__ import annotations

import numpy as np
from ase.calculators.calculator import Calculator, all_changes

from dpa3_ref.errors import Dpa3Error
from dpa3_ref.potential import Potential


class DPA3Calculator(Calculator):
    implemented_properties = ["energy", "free_energy", "energies", "forces", "stress"]

    def __init__(self, potential: Potential, **kwargs):
        super().__init__(**kwargs)
        self.potential = potential

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        pbc = self.atoms.pbc
        if pbc.any() and not pbc.all():
            raise Dpa3Error(f"partly periodic cells (pbc={pbc.tolist()}) are not supported: use full "
                            "periodicity with a vacuum layer, or none")
        cell = np.asarray(self.atoms.cell) if pbc.all() else None
        out = self.potential.evaluate(self.atoms.positions, self.atoms.get_chemical_symbols(), cell)
        energy = float(out["energy"])
        self.results = {
            "energy": energy,
            "free_energy": energy,
            "energies": out["atom_energy"],
            "forces": out["forces"],
        }
        if cell is not None:
            stress = -out["virial"] / self.atoms.get_volume()  # [3, 3]
            self.results["stress"] = stress.flat[[0, 4, 8, 5, 2, 1]]

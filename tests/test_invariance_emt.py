"""The invariance suite passes on ASE's EMT, a potential known to respect every symmetry it checks.

EMT is smooth only to ~1e-4 eV at its cutoff: it truncates its Fermi-function cutoff at rc + 0.5 Å = 5.88 Å,
where the function is still 6.6e-6, so an isolated pair jumps by 1.6e-5 eV and 2.6e-4 eV/Å as it crosses that
radius (the cases Hypothesis draws reach ~2e-4 eV and ~2e-3 eV/Å). The cutoff tolerances below admit that; a hard
cutoff jumps by ~1e-2 eV and would still fail. Everything else is held to the float64 defaults.
"""

import dataclasses

import numpy as np
import pytest
from ase import Atoms
from ase.calculators.emt import EMT

from dpa3_ref.invariance import TOLERANCES, cutoff_jump, from_ase_calculator, pytest_properties
from dpa3_ref.strategies import CutoffProbe, System

EMT_ELEMENTS = ["Cu", "Ni", "Al", "Ag", "Au", "Pd", "Pt"]


def emt_neighbour_radius() -> float:
    """The radius beyond which EMT ignores a neighbour (rc + 0.5 Å; the same for every element)."""
    calculator = EMT()
    calculator.initialize(Atoms("Cu"))
    return calculator.rc_list


EMT_TOLERANCES = dataclasses.replace(TOLERANCES["float64"], cutoff_energy=1e-3, cutoff_forces=1e-2)

test_emt_has_the_property = pytest_properties(lambda: from_ase_calculator(EMT()), elements=EMT_ELEMENTS,
                                              cutoffs=[emt_neighbour_radius()], tolerances=EMT_TOLERANCES)


def test_cutoff_jump_of_an_emt_dimer_is_its_truncation_step():
    """The jump the smoothness check extrapolates equals the step EMT takes between a pair just inside its
    neighbour radius and the same pair just outside (where both atoms are isolated)."""
    radius = emt_neighbour_radius()
    potential = from_ase_calculator(EMT())

    def dimer_energy(distance):
        return potential(np.array([[0.0, 0.0, 0.0], [0.0, 0.0, distance]]), ["Cu", "Cu"], None).energy

    step_taken = dimer_energy(radius + 1e-9) - dimer_energy(radius - 1e-9)
    probe = CutoffProbe(System([[0.0, 0.0, 0.0], [0.0, 0.0, radius]], ["Cu", "Cu"]), 1, np.zeros(3), radius)
    jump = cutoff_jump(potential, probe, step=1e-6)[f"energy (r={radius:g} Å)"]
    assert step_taken == pytest.approx(1.6e-5, rel=0.05)
    assert jump == pytest.approx(step_taken, rel=1e-4)

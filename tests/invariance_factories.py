"""ASE calculator factories for `dpa3 check-invariance --calculator invariance_factories:NAME` in the CLI tests."""

from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.emt import EMT


def emt() -> EMT:
    return EMT()


class ScaledForcesEMT(EMT):
    """EMT whose forces are 1 % too large: no longer the gradient of its energy."""

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        self.results["forces"] = 1.01 * self.results["forces"]


def emt_with_scaled_forces() -> ScaledForcesEMT:
    return ScaledForcesEMT()


class NonConvergingCalculator(Calculator):
    """Fails on every call, like an electronic-structure code whose SCF never converges."""

    implemented_properties = ["energy", "forces"]

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        raise RuntimeError("SCF did not converge")


def non_converging() -> NonConvergingCalculator:
    return NonConvergingCalculator()

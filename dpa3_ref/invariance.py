"""Property tests any interatomic potential can be checked with: symmetries, conservation, smoothness, locality.

A potential is a callable `(positions [n, 3], symbols, cell [3, 3] | None) -> Result` (see `dpa3_ref.adapters`
for the convention and the adapters). Each *check* below is a plain function that evaluates the potential on a
system and a transformed copy and returns the measured errors, a dict `{quantity: error}`; a separate `Tolerances`
decides pass or fail. A *property* pairs a check with a Hypothesis strategy that draws its inputs
(`dpa3_ref.strategies`); `check_property` runs it, keeps the worst error per quantity and, on failure, the
smallest failing case Hypothesis can shrink to. The formulas are in docs/invariance.md.

Command line:   dpa3 check-invariance --calculator mypkg.calcs:make_calculator --elements Cu,Ni --cutoff 5.0
In pytest:      from dpa3_ref.invariance import from_ase_calculator, pytest_properties
                test_my_calculator = pytest_properties(lambda: from_ase_calculator(MyCalculator()),
                                                       elements=["Cu", "Ni"], cutoffs=[5.0])
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dpa3_ref import strategies as sst
from dpa3_ref.adapters import (AdaptedPotential, Potential, Result, checked_result, from_ase_calculator,
                               from_callable, from_dpa3, from_factory, from_onnx)
from dpa3_ref.errors import Dpa3Error
from dpa3_ref.strategies import CutoffProbe, Geometry, LocalityProbe, System

__all__ = [
    "Potential", "Result", "AdaptedPotential", "from_ase_calculator", "from_factory", "from_callable", "from_dpa3", "from_onnx",
    "Tolerances", "TOLERANCES", "Subject", "make_subject", "Profile", "PROFILES", "PROPERTIES",
    "check_property", "run_suite", "pytest_properties",
    "rotation_error", "translation_error", "wrap_error", "permutation_error", "gradient_error", "net_force_error",
    "strain_error", "virial_symmetry_error", "cutoff_jump", "extensivity_error", "locality_error",
    "additivity_error", "nve_energy_error", "batch_error",
]

Errors = dict[str, float]  # quantity -> measured error, in the unit the property states


# --- tolerances ---------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Tolerances:
    """Pass/fail thresholds, and the finite-difference steps they go with, for one floating-point precision.

    Symmetry checks compare two evaluations of the same physical system, so only rounding separates them.
    Finite-difference checks also carry the truncation error of the step (∝ step²).
    """

    # two evaluations of one physical system (symmetries, extensivity, locality, batching)
    energy: float  # eV/atom
    forces: float  # eV/Å
    virial: float  # eV/atom
    atom_energy: float  # eV
    # F = -∇E and W = -(∂E/∂ε)ᵀ by central differences; Σ F = 0; W = Wᵀ
    gradient_step: float  # Å
    gradient: float  # eV/Å
    strain_step: float  # dimensionless strain
    strain: float  # eV/atom
    net_force: float  # eV/Å, |Σ F| / n_atoms
    asymmetry: float  # eV/atom, |W - Wᵀ| / n_atoms
    # jump of E, F, W as a neighbour crosses a cutoff radius, extrapolated from both sides
    cutoff_step: float  # Å
    cutoff_energy: float  # eV
    cutoff_forces: float  # eV/Å
    cutoff_virial: float  # eV
    # NVE molecular dynamics with velocity Verlet
    md_timestep: float  # fs
    md_drift: float  # eV/atom, fitted change of the total energy over the run
    md_fluctuation: float  # eV/atom, standard deviation about that fit


TOLERANCES = {
    # float64 rounding (ε ≈ 2e-16) on energies of a few eV/atom stays below 1e-12; steps balance truncation
    # (∝ step²) against rounding (∝ ε/step). The cutoff tolerances admit DPA3's exponential switch, which is
    # not zero at r_c (s = 8e-7, s' = -4.3e-5 /Å for 5.3/6.0 Å, spec §2.1); a hard cutoff jumps by ~1e-2 eV.
    # Velocity Verlet's energy oscillates by ~(ω dt)² E: with 0.25 fs, a hot EMT Cu dimer stays below 4e-5.
    "float64": Tolerances(energy=1e-10, forces=1e-9, virial=1e-9, atom_energy=1e-10,
                          gradient_step=1e-5, gradient=1e-6, strain_step=1e-6, strain=1e-7,
                          net_force=1e-10, asymmetry=1e-9,
                          cutoff_step=1e-6, cutoff_energy=1e-5, cutoff_forces=1e-4, cutoff_virial=1e-3,
                          md_timestep=0.25, md_drift=3e-4, md_fluctuation=3e-4),
    # float32 rounding (ε ≈ 6e-8) on a few eV/atom is ~1e-6 eV/atom; finite differences need ~1e-2 Å steps
    # to rise above it, and positions are only resolved to ~1e-6 Å.
    "float32": Tolerances(energy=1e-5, forces=1e-4, virial=1e-4, atom_energy=1e-5,
                          gradient_step=1e-2, gradient=1e-2, strain_step=1e-3, strain=1e-3,
                          net_force=1e-5, asymmetry=1e-4,
                          cutoff_step=1e-3, cutoff_energy=1e-3, cutoff_forces=1e-2, cutoff_virial=1e-2,
                          md_timestep=0.25, md_drift=1e-3, md_fluctuation=1e-3),
}


# --- the potential under test -------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Subject:
    """The potential under test and what the checks need to know about it."""

    potential: Potential
    name: str
    elements: tuple[str, ...]  # systems are drawn from these
    cutoffs: tuple[float, ...] = ()  # Å, radii where neighbours enter the model (smoothness)
    receptive_field: float | None = None  # Å, beyond it an atom cannot change another's energy (locality)
    tolerances: Tolerances = TOLERANCES["float64"]
    geometry: Geometry = Geometry()
    md_steps: int = 100


def make_subject(potential: Potential, *, elements: Sequence[str] | None = None,
                 cutoffs: Sequence[float] | None = None, receptive_field: float | None = None,
                 tolerances: Tolerances | None = None, geometry: Geometry = Geometry(),
                 md_steps: int = 100) -> Subject:
    """Fills what is not given from the potential's attributes (`elements`, `cutoffs`, `receptive_field`,
    `precision`). Without any receptive field the largest cutoff is used: right for potentials whose atom energy
    sees only its own neighbours, too short for message passing (there it is layers × cutoff)."""
    from ase.data import chemical_symbols

    elements = tuple(elements or getattr(potential, "elements", None) or ())
    if not elements:
        raise Dpa3Error("no elements to draw systems from: the potential does not list any, pass --elements Cu,Ni")
    unknown = [symbol for symbol in elements if symbol not in chemical_symbols[1:]]
    if unknown:
        raise Dpa3Error(f"unknown element symbol(s) {unknown}; expected names such as Cu or O")
    cutoffs = tuple(float(radius) for radius in (cutoffs or getattr(potential, "cutoffs", ()) or ()))
    if any(radius <= 0 for radius in cutoffs):
        raise Dpa3Error(f"cutoff radii must be positive, got {list(cutoffs)}")
    receptive_field = receptive_field or getattr(potential, "receptive_field", None) or max(cutoffs, default=None)
    if tolerances is None:
        precision = getattr(potential, "precision", "float64")
        if precision not in TOLERANCES:
            raise Dpa3Error(f"no tolerances for precision {precision!r}; known: {sorted(TOLERANCES)}")
        tolerances = TOLERANCES[precision]
    name = getattr(potential, "name", None) or getattr(potential, "__name__", type(potential).__name__)
    return Subject(potential, name, elements, cutoffs, receptive_field, tolerances, geometry, md_steps)


def evaluate(potential: Potential, system: System) -> Result:
    """One call of the potential on copies of the arrays, its output checked for shapes."""
    cell = None if system.cell is None else system.cell.copy()
    output = potential(system.positions.copy(), list(system.symbols), cell)
    return checked_result(output, system.n_atoms, getattr(potential, "name", "potential"))


def _max_abs(array: np.ndarray) -> float:
    return float(np.max(np.abs(array))) if np.size(array) else 0.0


def _differences(actual: Result, expected: Result, n_atoms: int) -> Errors:
    """Errors of `actual` against `expected`: energy and virial per atom, forces and atom energies as the largest
    deviation of one component. Optional quantities are compared when both results have them."""
    errors = {"energy": abs(actual.energy - expected.energy) / n_atoms,
              "forces": _max_abs(actual.forces - expected.forces)}
    if actual.virial is not None and expected.virial is not None:
        errors["virial"] = _max_abs(actual.virial - expected.virial) / n_atoms
    if actual.atom_energies is not None and expected.atom_energies is not None:
        errors["atom_energies"] = _max_abs(actual.atom_energies - expected.atom_energies)
    return errors


# --- checks: each evaluates the potential and returns the measured errors -----------------------------

def rotation_error(potential: Potential, system: System, rotation: np.ndarray) -> Errors:
    """Rotate positions and cell rows by Q (x -> x Qᵀ, proper or improper): E and atom energies unchanged,
    F -> F Qᵀ, W -> Q W Qᵀ."""
    reference = evaluate(potential, system)
    cell = None if system.cell is None else system.cell @ rotation.T
    rotated = evaluate(potential, system.with_positions(system.positions @ rotation.T, cell))
    virial = None if reference.virial is None else rotation @ reference.virial @ rotation.T
    expected = Result(reference.energy, reference.forces @ rotation.T, virial, reference.atom_energies)
    return _differences(rotated, expected, system.n_atoms)


def translation_error(potential: Potential, system: System, shift: np.ndarray) -> Errors:
    """Shift every atom by the same vector t (the cell stays): nothing changes."""
    reference = evaluate(potential, system)
    shifted = evaluate(potential, system.with_positions(system.positions + shift))
    return _differences(shifted, reference, system.n_atoms)


def wrap_error(potential: Potential, system: System, lattice_shifts: np.ndarray) -> Errors:
    """Move atom i by the lattice vector n_i · cell (periodic systems): the same crystal, nothing changes."""
    reference = evaluate(potential, system)
    wrapped = evaluate(potential, system.with_positions(system.positions + lattice_shifts @ system.cell))
    return _differences(wrapped, reference, system.n_atoms)


def permutation_error(potential: Potential, system: System, order: np.ndarray) -> Errors:
    """Relabel the atoms (new atom i = old atom order[i]): E unchanged, F and atom energies reordered."""
    reference = evaluate(potential, system)
    permuted = evaluate(potential, System(system.positions[order], [system.symbols[i] for i in order], system.cell))
    atom_energies = None if reference.atom_energies is None else reference.atom_energies[order]
    expected = Result(reference.energy, reference.forces[order], reference.virial, atom_energies)
    return _differences(permuted, expected, system.n_atoms)


def _central_difference(energy_at: Callable[[float], float], step: float) -> float:
    """dE/dλ at λ = 0 from (E(+h) - E(-h)) / 2h: error ∝ h²·d³E/dλ³, plus rounding ∝ ε·|E| / h."""
    return (energy_at(step) - energy_at(-step)) / (2 * step)


def gradient_error(potential: Potential, system: System, step: float) -> Errors:
    """F = -∇E: every force component against the central difference of E along that coordinate."""
    reference = evaluate(potential, system)

    def energy_with_displacement(atom: int, axis: int, displacement: float) -> float:
        positions = system.positions.copy()
        positions[atom, axis] += displacement
        return evaluate(potential, system.with_positions(positions)).energy

    numerical = np.empty_like(reference.forces)  # [n_atoms, 3]
    for atom, axis in np.ndindex(*numerical.shape):
        numerical[atom, axis] = -_central_difference(functools.partial(energy_with_displacement, atom, axis), step)
    return {"forces": _max_abs(reference.forces - numerical)}


def net_force_error(potential: Potential, system: System) -> Errors:
    """Σ_i F_i = 0 (translation invariance of E, open or periodic): the mean force."""
    return {"net_force": _max_abs(evaluate(potential, system).forces.sum(axis=0)) / system.n_atoms}


def strain_error(potential: Potential, system: System, step: float) -> Errors:
    """W = -(∂E/∂ε)ᵀ: strain positions and cell as x -> x (I + ε), one component of ε at a time, central
    differences. Returns nothing when the potential gives no virial."""
    reference = evaluate(potential, system)
    if reference.virial is None:
        return {}

    def energy_with_strain(row: int, column: int, strain: float) -> float:
        deformation = np.eye(3)
        deformation[row, column] += strain
        cell = None if system.cell is None else system.cell @ deformation
        return evaluate(potential, system.with_positions(system.positions @ deformation, cell)).energy

    derivative = np.empty((3, 3))  # ∂E/∂ε
    for row, column in np.ndindex(3, 3):
        derivative[row, column] = _central_difference(functools.partial(energy_with_strain, row, column), step)
    return {"virial": _max_abs(reference.virial + derivative.T) / system.n_atoms}


def virial_symmetry_error(potential: Potential, system: System) -> Errors:
    """W = Wᵀ (the antisymmetric part of ∂E/∂ε is an infinitesimal rotation, which cannot change E)."""
    virial = evaluate(potential, system).virial
    return {} if virial is None else {"asymmetry": _max_abs(virial - virial.T) / system.n_atoms}


def cutoff_jump(potential: Potential, probe: CutoffProbe, step: float) -> Errors:
    """Jump of E, F and W as the probe's mover crosses `radius` from `center`.

    The mover is placed at radius + (-1.5, -0.5, +0.5, +1.5)·step; each side is extrapolated linearly to the
    radius (1.5 f(±step/2) - 0.5 f(±3step/2)), so a smooth slope cancels and what remains is the discontinuity
    (plus O(step²)).
    """
    system = probe.system
    direction = system.positions[probe.mover] - probe.center
    direction /= np.linalg.norm(direction)

    def at(offset: float) -> Result:
        positions = system.positions.copy()
        positions[probe.mover] = probe.center + (probe.radius + offset) * direction
        return evaluate(potential, system.with_positions(positions))

    inner_far, inner_near, outer_near, outer_far = (at(k * step) for k in (-1.5, -0.5, 0.5, 1.5))
    errors = {}
    for quantity in ("energy", "forces", "virial"):
        if getattr(inner_far, quantity) is None:
            continue
        inside = 1.5 * np.asarray(getattr(inner_near, quantity)) - 0.5 * np.asarray(getattr(inner_far, quantity))
        outside = 1.5 * np.asarray(getattr(outer_near, quantity)) - 0.5 * np.asarray(getattr(outer_far, quantity))
        errors[f"{quantity} (r={probe.radius:g} Å)"] = _max_abs(outside - inside)
    return errors


def extensivity_error(potential: Potential, system: System, repeats: Sequence[int]) -> Errors:
    """An n1×n2×n3 supercell has n1·n2·n3 times the energy and virial, and the same forces and atom energies."""
    cell = evaluate(potential, system)
    supercell = system.supercell(repeats)
    n_images = supercell.n_atoms // system.n_atoms
    virial = None if cell.virial is None else n_images * cell.virial
    atom_energies = None if cell.atom_energies is None else np.tile(cell.atom_energies, n_images)
    expected = Result(n_images * cell.energy, np.tile(cell.forces, (n_images, 1)), virial, atom_energies)
    return _differences(evaluate(potential, supercell), expected, supercell.n_atoms)


def locality_error(potential: Potential, probe: LocalityProbe) -> Errors:
    """Moving the probe's mover leaves the energy of every atom farther than `radius` from both of its
    positions unchanged. Returns nothing when the potential gives no per-atom energies."""
    system = probe.system
    before = evaluate(potential, system)
    positions = system.positions.copy()
    positions[probe.mover] = probe.new_position
    after = evaluate(potential, system.with_positions(positions))
    if before.atom_energies is None or after.atom_energies is None:
        return {}
    distance_before = np.linalg.norm(system.positions - system.positions[probe.mover], axis=1)  # [n_atoms]
    distance_after = np.linalg.norm(system.positions - probe.new_position, axis=1)  # [n_atoms]
    observers = (distance_before > probe.radius) & (distance_after > probe.radius)
    return {"atom_energies": _max_abs(after.atom_energies[observers] - before.atom_energies[observers])}


def additivity_error(potential: Potential, fragment_a: System, fragment_b: System) -> Errors:
    """Two open fragments farther apart than the receptive field do not interact: energies, virials, forces and
    atom energies of the pair are those of the fragments alone."""
    alone_a, alone_b = evaluate(potential, fragment_a), evaluate(potential, fragment_b)
    together = fragment_a.joined(fragment_b)
    virial = None if alone_a.virial is None or alone_b.virial is None else alone_a.virial + alone_b.virial
    atom_energies = (None if alone_a.atom_energies is None or alone_b.atom_energies is None
                     else np.concatenate([alone_a.atom_energies, alone_b.atom_energies]))
    expected = Result(alone_a.energy + alone_b.energy, np.vstack([alone_a.forces, alone_b.forces]), virial,
                      atom_energies)
    return _differences(evaluate(potential, together), expected, together.n_atoms)


def _masses(symbols: Sequence[str]) -> np.ndarray:
    from ase.data import atomic_masses, atomic_numbers

    return np.array([atomic_masses[atomic_numbers[symbol]] for symbol in symbols])[:, None]  # [n_atoms, 1] amu


def nve_energy_error(potential: Potential, system: System, velocities: np.ndarray, timestep: float,
                     steps: int) -> Errors:
    """Velocity Verlet for `steps` steps of `timestep` fs from `velocities` [n_atoms, 3] (Å/fs). The total
    energy per atom E(t) is fitted by a line a + b·t: drift = |b|·duration, fluctuation = std of the residual."""
    from ase.units import fs

    masses = _masses(system.symbols)  # [n_atoms, 1] amu
    dt = timestep * fs  # ASE time unit: Å·sqrt(amu/eV)
    positions, velocities = system.positions.copy(), velocities / fs  # Å/(ASE time unit)
    result = evaluate(potential, system)
    totals = [result.energy + 0.5 * np.sum(masses * velocities**2)]
    for _ in range(steps):
        velocities = velocities + 0.5 * dt * result.forces / masses
        positions = positions + dt * velocities
        result = evaluate(potential, system.with_positions(positions))
        velocities = velocities + 0.5 * dt * result.forces / masses
        totals.append(result.energy + 0.5 * np.sum(masses * velocities**2))
    times = timestep * np.arange(steps + 1)  # [steps + 1] fs
    per_atom = np.array(totals) / system.n_atoms  # [steps + 1] eV/atom
    slope, intercept = np.polyfit(times, per_atom, 1)
    residual = per_atom - (intercept + slope * times)
    return {"drift": abs(slope) * times[-1], "fluctuation": float(np.std(residual))}


def batch_error(potential: Potential, systems: Sequence[System]) -> Errors:
    """`potential.batch_evaluate(systems)` gives, system by system, what one call per system gives."""
    batched = potential.batch_evaluate(list(systems))
    errors: Errors = {}
    for system, result in zip(systems, batched, strict=True):
        alone = evaluate(potential, system)
        for quantity, error in _differences(checked_result(result, system.n_atoms, "batch"), alone,
                                            system.n_atoms).items():
            errors[quantity] = max(errors.get(quantity, 0.0), error)
    return errors


# --- properties: a check, the strategy that draws its inputs, the tolerance of each quantity ----------

SAME_RESULT = {"energy": ("energy", "eV/atom"), "forces": ("forces", "eV/Å"), "virial": ("virial", "eV/atom"),
               "atom_energies": ("atom_energy", "eV")}
NOT_RETURNED = {"virial": "the potential returned no virial for the systems drawn",
                "asymmetry": "the potential returned no virial for the systems drawn",
                "atom_energies": "the potential returned no per-atom energies"}


def _no_cutoff(subject: Subject) -> str | None:
    return None if subject.cutoffs else "no cutoff radius known: pass cutoffs=[...] (CLI: --cutoff R)"


def _no_receptive_field(subject: Subject) -> str | None:
    return None if subject.receptive_field else "no receptive field known: pass cutoffs or receptive_field"


def _no_batches(subject: Subject) -> str | None:
    has_batches = callable(getattr(subject.potential, "batch_evaluate", None))
    return None if has_batches else "the potential has no batch_evaluate method"


def _systems(subject: Subject, *, periodic: bool | None = None, min_atoms: int = 2) -> st.SearchStrategy[System]:
    """Systems from the subject's elements. Two atoms at least by default: Hypothesis tries the smallest case
    first, and a lone atom in open space has no forces, so most checks would learn nothing from it."""
    return sst.systems(subject.elements, subject.geometry, periodic=periodic, min_atoms=min_atoms)


def _with(per_system: Callable[[System], st.SearchStrategy]) -> Callable[[System], st.SearchStrategy]:
    """For `flatmap`: a system together with something drawn for it (a permutation, lattice shifts, ...)."""
    return lambda system: st.tuples(st.just(system), per_system(system))


def _velocities(system: System) -> st.SearchStrategy[np.ndarray]:
    """Velocities (Å/fs) with components up to about 300 K thermal speed, sqrt(k_B T / m)."""
    from ase.units import fs, kB

    thermal_speed = np.sqrt(kB * 300.0 / _masses(system.symbols)) * fs  # [n_atoms, 1] Å/fs
    unit = hnp.arrays(np.float64, (system.n_atoms, 3), elements=st.floats(-1.0, 1.0))
    return unit.map(lambda draw: draw * thermal_speed)


@dataclasses.dataclass(frozen=True)
class Property:
    """One invariant: how to draw a case, how to measure it, and each measured quantity's tolerance field and
    unit. `example_share` scales the profile's examples for checks that evaluate the potential many times."""

    name: str
    statement: str
    cases: Callable[[Subject], st.SearchStrategy]
    measure: Callable[[Subject, Any], Errors]
    quantities: dict[str, tuple[str, str]]
    example_share: float = 1.0
    unavailable: Callable[[Subject], str | None] = lambda subject: None  # why it cannot run, or None


def _cutoff_jumps(subject: Subject, probes: Sequence[CutoffProbe]) -> Errors:
    """One probe per cutoff radius; quantities are labelled with their radius."""
    errors: Errors = {}
    for probe in probes:
        errors.update(cutoff_jump(subject.potential, probe, subject.tolerances.cutoff_step))
    return errors


PROPERTIES = [
    Property(
        name="rotation",
        statement="E(x Qᵀ) = E(x), F -> F Qᵀ, W -> Q W Qᵀ for proper rotations Q of atoms and cell",
        cases=lambda s: st.tuples(_systems(s), sst.rotations()),
        measure=lambda s, case: rotation_error(s.potential, *case),
        quantities=SAME_RESULT),
    Property(
        name="reflection",
        statement="the same for improper rotations (det Q = -1: mirror images)",
        cases=lambda s: st.tuples(_systems(s), sst.improper_rotations()),
        measure=lambda s, case: rotation_error(s.potential, *case),
        quantities=SAME_RESULT),
    Property(
        name="translation",
        statement="E, F, W, atom energies unchanged by a rigid shift x -> x + t",
        cases=lambda s: st.tuples(_systems(s), sst.translations()),
        measure=lambda s, case: translation_error(s.potential, *case),
        quantities=SAME_RESULT),
    Property(
        name="periodic-wrap",
        statement="nothing changes when any atom moves by a lattice vector",
        cases=lambda s: _systems(s, periodic=True, min_atoms=1).flatmap(
            _with(lambda system: sst.lattice_shifts(system.n_atoms))),
        measure=lambda s, case: wrap_error(s.potential, *case),
        quantities=SAME_RESULT),
    Property(
        name="permutation",
        statement="E, W unchanged, F and atom energies reordered when atoms are relabelled",
        cases=lambda s: _systems(s).flatmap(_with(lambda system: sst.permutations(system.n_atoms))),
        measure=lambda s, case: permutation_error(s.potential, *case),
        quantities=SAME_RESULT),
    Property(
        name="conservative-forces",
        statement="F = -∇E (central differences on every coordinate)",
        cases=lambda s: _systems(s),
        measure=lambda s, system: gradient_error(s.potential, system, s.tolerances.gradient_step),
        quantities={"forces": ("gradient", "eV/Å")},
        example_share=0.5),
    Property(
        name="net-force",
        statement="Σ_i F_i = 0",
        cases=lambda s: _systems(s),
        measure=lambda s, system: net_force_error(s.potential, system),
        quantities={"net_force": ("net_force", "eV/Å")}),
    Property(
        name="virial-strain",
        statement="W = -(∂E/∂ε)ᵀ for the strain x -> x (I + ε) of periodic cells (central differences)",
        cases=lambda s: _systems(s, periodic=True, min_atoms=1),
        measure=lambda s, system: strain_error(s.potential, system, s.tolerances.strain_step),
        quantities={"virial": ("strain", "eV/atom")},
        example_share=0.5),
    Property(
        name="virial-symmetry",
        statement="W = Wᵀ",
        cases=lambda s: _systems(s),
        measure=lambda s, system: virial_symmetry_error(s.potential, system),
        quantities={"asymmetry": ("asymmetry", "eV/atom")}),
    Property(
        name="cutoff-smoothness",
        statement="E, F, W continuous as a neighbour crosses each cutoff radius",
        cases=lambda s: st.tuples(*[sst.cutoff_probes(s.elements, radius, s.geometry) for radius in s.cutoffs]),
        measure=_cutoff_jumps,
        quantities={"energy": ("cutoff_energy", "eV"), "forces": ("cutoff_forces", "eV/Å"),
                    "virial": ("cutoff_virial", "eV")},
        unavailable=_no_cutoff),
    Property(
        name="extensivity",
        statement="an n1×n2×n3 supercell has n1·n2·n3 times E and W, the same F and atom energies",
        cases=lambda s: st.tuples(_systems(s, periodic=True, min_atoms=1), sst.supercell_repeats()),
        measure=lambda s, case: extensivity_error(s.potential, *case),
        quantities=SAME_RESULT),
    Property(
        name="locality",
        statement="an atom's energy ignores atoms moving beyond the receptive field",
        cases=lambda s: sst.locality_probes(s.elements, s.receptive_field, s.geometry),
        measure=lambda s, probe: locality_error(s.potential, probe),
        quantities={"atom_energies": ("atom_energy", "eV")},
        example_share=0.5,
        unavailable=_no_receptive_field),
    Property(
        name="additivity",
        statement="fragments farther apart than the receptive field: E, F, W, atom energies add up",
        cases=lambda s: sst.separated_fragments(s.elements, s.receptive_field, s.geometry),
        measure=lambda s, fragments: additivity_error(s.potential, *fragments),
        quantities=SAME_RESULT,
        unavailable=_no_receptive_field),
    Property(
        name="nve-energy",
        statement="total energy conserved by velocity Verlet: no drift, small fluctuation",
        cases=lambda s: _systems(s).flatmap(_with(_velocities)),
        measure=lambda s, case: nve_energy_error(s.potential, *case, s.tolerances.md_timestep, s.md_steps),
        quantities={"drift": ("md_drift", "eV/atom"), "fluctuation": ("md_fluctuation", "eV/atom")},
        example_share=0.3),
    Property(
        name="batching",
        statement="batch_evaluate gives each system what a single call gives",
        cases=lambda s: st.lists(_systems(s), min_size=2, max_size=3),
        measure=lambda s, systems: batch_error(s.potential, systems),
        quantities=SAME_RESULT,
        unavailable=_no_batches),
]
PROPERTY_NAMES = [prop.name for prop in PROPERTIES]


# --- running a property with Hypothesis and reporting it -----------------------------------------------

@dataclasses.dataclass(frozen=True)
class QuantityReport:
    """One row of the report: the worst error of one quantity over all cases, against its tolerance."""

    quantity: str
    unit: str
    worst: float | None  # None: never measured
    tolerance: float
    status: str  # "pass", "FAIL" or "skip"


@dataclasses.dataclass(frozen=True)
class PropertyReport:
    """The outcome of one property over all the cases Hypothesis drew."""

    name: str
    statement: str
    outcome: str  # "pass", "FAIL", "error" (a case raised) or "skip" (cannot be checked)
    cases: int
    quantities: list[QuantityReport]
    detail: str = ""  # why skipped, or the smallest failing case and its errors / exception

    @property
    def passed(self) -> bool:
        return self.outcome in ("pass", "skip")


class _ToleranceExceeded(AssertionError):
    """Raised inside the Hypothesis test when a case exceeds a tolerance, so that Hypothesis shrinks it."""


def _base_quantity(quantity: str) -> str:
    return quantity.split(" ")[0]  # "energy (r=6 Å)" -> "energy"


def _quantity_reports(prop: Property, tolerances: Tolerances, worst: Errors) -> list[QuantityReport]:
    order = list(prop.quantities)
    rows = []
    for quantity, error in sorted(worst.items(), key=lambda item: (order.index(_base_quantity(item[0])), item[0])):
        field, unit = prop.quantities[_base_quantity(quantity)]
        limit = getattr(tolerances, field)
        rows.append(QuantityReport(quantity, unit, error, limit, "pass" if error <= limit else "FAIL"))
    measured = {_base_quantity(quantity) for quantity in worst}
    for quantity, (field, unit) in prop.quantities.items():
        if quantity not in measured:
            rows.append(QuantityReport(quantity, unit, None, getattr(tolerances, field), "skip"))
    return rows


def _exact_repr(case: Any) -> str:
    """repr with every float printed to full precision, so that a failing case can be pasted back."""
    with np.printoptions(floatmode="unique"):
        return repr(case)


def check_property(prop: Property, subject: Subject, hypothesis_settings: settings | None = None) -> PropertyReport:
    """Runs one property with Hypothesis and reports the worst error of each quantity.

    `hypothesis_settings` default to the loaded profile; their max_examples is scaled by the property's share.
    """
    reason = prop.unavailable(subject)
    if reason:
        return PropertyReport(prop.name, prop.statement, "skip", 0, [], reason)
    base = hypothesis_settings or settings()
    run_settings = settings(base, max_examples=max(1, round(base.max_examples * prop.example_share)),
                            deadline=None, database=None, report_multiple_bugs=False,
                            phases=[phase for phase in base.phases if phase != Phase.explain],
                            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                   HealthCheck.large_base_example])
    worst: Errors = {}
    tried = []  # every case run, in order: after a failure the last one is the shrunk, smallest one
    last_errors: Errors = {}

    @run_settings
    @given(prop.cases(subject))
    def property_holds(case):
        tried.append(case)
        last_errors.clear()
        last_errors.update(prop.measure(subject, case))
        for quantity, error in last_errors.items():
            worst[quantity] = error if math.isnan(error) else max(worst.get(quantity, error), error)
        limits = {q: getattr(subject.tolerances, prop.quantities[_base_quantity(q)][0]) for q in last_errors}
        if not all(error <= limits[q] for q, error in last_errors.items()):
            raise _ToleranceExceeded()

    outcome, detail = "pass", ""
    try:
        property_holds()
    except _ToleranceExceeded:
        errors = ", ".join(f"{quantity} {error:.3g}" for quantity, error in last_errors.items())
        outcome, detail = "FAIL", f"smallest failing case: {_exact_repr(tried[-1])}\n  errors: {errors}"
    except Exception as error:  # the potential (or its adapter) raised: a finding, not a crash
        case = f"\n  on case: {_exact_repr(tried[-1])}" if tried else ""
        outcome, detail = "error", f"{type(error).__name__}: {error}{case}"
    rows = _quantity_reports(prop, subject.tolerances, worst)
    if outcome == "pass" and not worst:
        outcome, detail = "skip", "; ".join(NOT_RETURNED[q] for q in prop.quantities if q in NOT_RETURNED)
    return PropertyReport(prop.name, prop.statement, outcome, len(tried), rows, detail)


@dataclasses.dataclass(frozen=True)
class Profile:
    """How hard to look: cases per property (expensive properties draw a share), system size, MD length."""

    examples: int
    max_atoms: int
    md_steps: int
    derandomize: bool  # the same cases on every run


PROFILES = {"quick": Profile(examples=10, max_atoms=6, md_steps=100, derandomize=True),
            "thorough": Profile(examples=100, max_atoms=10, md_steps=400, derandomize=False)}


def run_suite(subject: Subject, profile: Profile, examples: int | None = None,
              properties: Sequence[str] | None = None) -> list[PropertyReport]:
    """All (or the named) properties under one profile; `examples` overrides the profile's count."""
    examples = examples or profile.examples
    reports = []
    for prop in PROPERTIES:
        if properties is None or prop.name in properties:
            run_settings = settings(max_examples=examples, derandomize=profile.derandomize,
                                    verbosity=Verbosity.quiet)
            reports.append(check_property(prop, subject, run_settings))
    return reports


def pytest_properties(make_potential: Callable[[], Potential], *, properties: Sequence[str] | None = None,
                      **subject_options: Any) -> Callable[..., None]:
    """A pytest test function, parametrised over the properties, for your own test suite:

        test_my_potential = pytest_properties(lambda: from_ase_calculator(MyCalc()), elements=["Cu"],
                                              cutoffs=[5.0])

    `make_potential` is called in each test; `subject_options` go to `make_subject`. Cases per property follow
    the loaded Hypothesis profile (max_examples, derandomize).
    """
    import pytest

    unknown = set(properties or ()) - set(PROPERTY_NAMES)
    if unknown:
        raise Dpa3Error(f"unknown properties {sorted(unknown)}; known: {PROPERTY_NAMES}")
    selected = [prop for prop in PROPERTIES if properties is None or prop.name in properties]

    @pytest.mark.parametrize("prop", selected, ids=[prop.name for prop in selected])
    def test_property(prop: Property) -> None:
        report = check_property(prop, make_subject(make_potential(), **subject_options))
        if report.outcome == "skip":
            pytest.skip(report.detail)
        assert report.passed, format_report([report])

    return test_property


# --- command line: dpa3 check-invariance --------------------------------------------------------------

def format_report(reports: Sequence[PropertyReport]) -> str:
    """A plain-text table, one row per measured quantity, followed by the details of failures and skips."""
    header = f"{'property':<20} {'quantity':<22} {'cases':>5} {'worst error':>11} {'tolerance':>9}  {'unit':<8} result"
    lines = [header, "-" * len(header)]
    for report in reports:
        if not report.quantities:
            lines.append(f"{report.name:<20} {'-':<22} {report.cases:>5} {'-':>11} {'-':>9}  {'':<8} {report.outcome}")
        for row in report.quantities:
            worst = "-" if row.worst is None else f"{row.worst:.2e}"
            status = row.status if report.outcome != "error" else "error"
            lines.append(f"{report.name:<20} {row.quantity:<22} {report.cases:>5} {worst:>11} "
                         f"{row.tolerance:>9.0e}  {row.unit:<8} {status}")
    notes = [f"{report.name} ({report.outcome}): {report.detail}" for report in reports if report.detail]
    return "\n".join(lines + ([""] + notes if notes else []))


def _json_number(value: float | None) -> float | str | None:
    return value if value is None or math.isfinite(value) else str(value)


def reports_to_json(subject: Subject, reports: Sequence[PropertyReport]) -> str:
    """The report as JSON: the subject, `passed`, and per property its outcome, detail and quantity rows."""
    document = {
        "potential": subject.name, "elements": list(subject.elements), "cutoffs": list(subject.cutoffs),
        "receptive_field": subject.receptive_field, "passed": all(report.passed for report in reports),
        "properties": [{"name": r.name, "statement": r.statement, "outcome": r.outcome, "cases": r.cases,
                        "detail": r.detail,
                        "quantities": [{"quantity": q.quantity, "unit": q.unit, "worst": _json_number(q.worst),
                                        "tolerance": q.tolerance, "status": q.status} for q in r.quantities]}
                       for r in reports],
    }
    return json.dumps(document, indent=2, ensure_ascii=False)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", metavar="FILE", help="our DPA3 model file (loaded with dpa3_ref.load)")
    source.add_argument("--onnx", metavar="FILE", help="a model exported to ONNX by `dpa3 export`, run by onnxruntime")
    source.add_argument("--calculator", metavar="MODULE:FACTORY",
                        help="a function returning an ASE calculator, its module importable from PYTHONPATH")
    parser.add_argument("--elements", metavar="A,B", help="elements to draw systems from (default: the model's)")
    parser.add_argument("--cutoff", metavar="R[,R2]",
                        help="cutoff radii in Å for the smoothness checks (default: the model's e_rcut, a_rcut)")
    parser.add_argument("--receptive-field", type=float, metavar="R",
                        help="radius in Å beyond which an atom cannot change another's energy, for the locality "
                             "checks (default: the model's nlayers·e_rcut, else the largest cutoff)")
    parser.add_argument("--examples", type=int, metavar="N", help="cases per property (default: from the profile)")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick",
                        help="quick: 10 cases, up to 6 atoms; thorough: 100 cases, up to 10 atoms, longer MD")
    parser.add_argument("--tolerance", action="append", default=[], metavar="NAME=VALUE",
                        help="override one tolerance (a field of invariance.Tolerances), e.g. cutoff_energy=1e-4; "
                             "repeatable")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")


def _split(text: str | None) -> list[str] | None:
    return None if text is None else [item.strip() for item in text.split(",") if item.strip()]


def _tolerance_overrides(assignments: Sequence[str]) -> dict[str, float]:
    fields = {field.name for field in dataclasses.fields(Tolerances)}
    overrides = {}
    for assignment in assignments:
        name, _, value = assignment.partition("=")
        if name not in fields:
            raise Dpa3Error(f"--tolerance {assignment!r}: unknown tolerance {name!r}; known: {sorted(fields)}")
        try:
            overrides[name] = float(value)
        except ValueError as error:
            raise Dpa3Error(f"--tolerance {assignment!r}: {value!r} is not a number") from error
    return overrides


def _potential_from_arguments(args: argparse.Namespace) -> Potential:
    if args.calculator:
        return from_factory(args.calculator)
    if args.onnx:
        return from_onnx(args.onnx)
    from dpa3_ref import load

    return from_dpa3(load(args.model))


def run(args: argparse.Namespace) -> int:
    """`dpa3 check-invariance`: exit status 0 when every property passes or is skipped, 1 otherwise."""
    if args.examples is not None and args.examples < 1:
        raise Dpa3Error(f"--examples must be at least 1, got {args.examples}")
    try:
        cutoffs = [float(radius) for radius in _split(args.cutoff) or []]
    except ValueError as error:
        raise Dpa3Error(f"--cutoff expects radii in Å such as 6.0 or 6.0,4.0, got {args.cutoff!r}") from error
    overrides = _tolerance_overrides(args.tolerance)
    potential = _potential_from_arguments(args)
    model_elements = getattr(potential, "elements", None)
    elements = _split(args.elements)
    if elements and model_elements and not set(elements) <= set(model_elements):
        raise Dpa3Error(f"--elements {sorted(set(elements) - set(model_elements))} not in the model's type map "
                        f"{list(model_elements)}")
    profile = PROFILES[args.profile]
    subject = make_subject(potential, elements=elements, cutoffs=cutoffs or None,
                           receptive_field=args.receptive_field, geometry=Geometry(max_atoms=profile.max_atoms),
                           md_steps=profile.md_steps)
    subject = dataclasses.replace(subject, tolerances=dataclasses.replace(subject.tolerances, **overrides))
    reports = run_suite(subject, profile, args.examples)
    print(reports_to_json(subject, reports) if args.json else format_report(reports))
    return 0 if all(report.passed for report in reports) else 1

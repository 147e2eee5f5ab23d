"""The invariance suite catches deliberately broken potentials, each under the property it breaks.

The subject is a Morse pair potential written in numpy with a C²-smooth cutoff; its correct form passes every
property. Each bug is one knob of it: a tiny orientation-dependent pair energy, forces that are not the gradient
of the energy (scaled, or with a curl), pair energies weighted by atom labels, a hard cutoff, no periodic
images, and a batch evaluation that lets its padding atoms interact. For every bug we state which properties
must fail and which must still pass; properties whose outcome depends on the cases drawn are left out.
"""

import dataclasses
import functools
import itertools
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import Phase, settings

from dpa3_ref import cli
from dpa3_ref.invariance import (PROPERTIES, PROPERTY_NAMES, TOLERANCES, Result, check_property, cutoff_jump,
                                 from_callable, from_dpa3, make_subject)
from dpa3_ref.strategies import CutoffProbe, System

CUTOFF = 5.0  # Å, the Morse potential is switched off smoothly between 4 and 5 Å
SWITCH_START = 4.0
WELL_DEPTH = {"Cu": 0.35, "Ni": 0.42}  # eV, mixed as sqrt(D_i D_j)
WELL_WIDTH = 1.4  # 1/Å
EQUILIBRIUM = 2.5  # Å


def pairs(positions: np.ndarray, cell: np.ndarray | None, cutoff: float):
    """Ordered pairs (i, j, d_ij = x_j + image shift - x_i) with |d_ij| < cutoff, periodic images included."""
    if cell is None:
        shifts = np.zeros((1, 3))
    else:
        fractional = positions @ np.linalg.inv(cell)
        positions = (fractional - np.floor(fractional)) @ cell  # wrapped into the cell: |Δs_k| < 1 between atoms
        heights = abs(np.linalg.det(cell)) / np.linalg.norm(np.cross(cell[[1, 2, 0]], cell[[2, 0, 1]]), axis=1)
        reach = np.ceil(cutoff / heights).astype(int) + 1  # image layers within the cutoff, +1 for that Δs
        shifts = np.array(list(itertools.product(*[range(-m, m + 1) for m in reach]))) @ cell  # [n_shifts, 3]
    d = positions[None, None, :, :] + shifts[:, None, None, :] - positions[None, :, None, :]  # [s, n, n, 3]
    r = np.linalg.norm(d, axis=-1)  # [s, n, n]
    shift, i, j = np.nonzero((r < cutoff) & (r > 0))
    return i, j, d[shift, i, j]


def switch(r: np.ndarray):
    """s(r) = 1 - 10u³ + 15u⁴ - 6u⁵, u = (r - r_s)/(r_c - r_s) clipped to [0, 1], and ds/dr."""
    u = np.clip((r - SWITCH_START) / (CUTOFF - SWITCH_START), 0.0, 1.0)
    return 1 - 10 * u**3 + 15 * u**4 - 6 * u**5, (-30 * u**2 + 60 * u**3 - 30 * u**4) / (CUTOFF - SWITCH_START)


def morse(positions, symbols, cell, *, hard_cutoff=False, anisotropy=0.0, force_scale=1.0, curl=0.0,
          label_weight=0.0) -> Result:
    """E = ½ Σ_{i≠j, images} φ(d_ij), φ = D[(1 - e^{-a(r - r0)})² - 1]·s(r); F_i = Σ_j ∂φ/∂d_ij;
    W = -½ Σ ∂φ/∂d ⊗ d. Every keyword other than the defaults is a deliberate bug."""
    n_atoms = len(symbols)
    i, j, d = pairs(positions, cell, CUTOFF)
    r = np.linalg.norm(d, axis=1)  # [n_pairs]
    depth = np.sqrt(np.array([WELL_DEPTH[symbols[k]] for k in i]) * np.array([WELL_DEPTH[symbols[k]] for k in j]))
    decay = np.exp(-WELL_WIDTH * (r - EQUILIBRIUM))
    phi, dphi = depth * ((1 - decay) ** 2 - 1), 2 * depth * WELL_WIDTH * decay * (1 - decay)
    s, ds = (np.ones_like(r), np.zeros_like(r)) if hard_cutoff else switch(r)
    phi, dphi = phi * s, dphi * s + phi * ds
    weight = 1.0 + label_weight * (i + j)  # bug: the pair energy depends on the atoms' labels
    phi, dphi = weight * phi, weight * dphi
    gradient = (dphi / r)[:, None] * d  # [n_pairs, 3] ∂φ/∂d
    if anisotropy:  # bug: + c·s(r)·(d_x/r)², an energy that depends on the pair's orientation
        s, ds = switch(r)
        cos2 = (d[:, 0] / r) ** 2
        phi = phi + anisotropy * s * cos2
        gradient = gradient + anisotropy * ((ds * cos2 / r)[:, None] * d
                                            + s[:, None] * (2 * d[:, :1] * np.eye(3)[0] / r[:, None] ** 2
                                                            - 2 * (cos2 / r**2)[:, None] * d))
    atom_energies = 0.5 * np.bincount(i, phi, minlength=n_atoms)  # [n_atoms]
    forces = np.zeros((n_atoms, 3))
    np.add.at(forces, i, gradient)
    if curl:  # bug: a pairwise force about the z axis, c·s(r)·e_z × d, whose curl is 2c·e_z
        np.add.at(forces, i, curl * switch(r)[0][:, None] * np.cross(np.eye(3)[2], d))
    virial = -0.5 * gradient.T @ d  # [3, 3]
    return Result(float(atom_energies.sum()), force_scale * forces, virial, atom_energies)


def morse_potential(name="morse", **bugs):
    return from_callable(functools.partial(morse, **bugs), name=name, elements=list(WELL_DEPTH), cutoffs=[CUTOFF])


def batched(potential, *, leaky_padding: bool):
    """`potential` with a batch_evaluate that pads every system to the largest one, as a GPU batch would. The
    padding atoms sit at (1, 1, 1) Å; the correct version removes them before evaluating, the leaky one lets
    them interact and only trims the outputs."""
    def batch_evaluate(systems):
        n_max = max(system.n_atoms for system in systems)
        results = []
        for system in systems:
            n_pad = n_max - system.n_atoms if leaky_padding else 0
            positions = np.vstack([system.positions, np.ones((n_pad, 3))])
            full = potential(positions, list(system.symbols) + ["Cu"] * n_pad, system.cell)
            n = system.n_atoms
            results.append(Result(full.energy - full.atom_energies[n:].sum(), full.forces[:n], full.virial,
                                  full.atom_energies[:n]))
        return results
    return dataclasses.replace(potential, batch_evaluate=batch_evaluate)


def failing_properties(potential) -> set[str]:
    """The properties a potential fails. Only which ones matter here, so Hypothesis does not shrink."""
    subject = make_subject(potential)
    no_shrinking = settings(phases=[Phase.explicit, Phase.reuse, Phase.generate])
    reports = [check_property(prop, subject, no_shrinking) for prop in PROPERTIES]
    return {report.name for report in reports if report.outcome in ("FAIL", "error")}


def test_correct_morse_passes_every_property():
    subject = make_subject(batched(morse_potential(), leaky_padding=False))
    reports = [check_property(prop, subject) for prop in PROPERTIES]
    assert [report.name for report in reports if report.outcome != "pass"] == []


SYMMETRIES = {"rotation", "reflection", "translation", "periodic-wrap", "permutation"}

# bug -> (properties that must fail, properties that must still pass)
BUGS = {
    "orientation-dependent energy": (
        dict(anisotropy=1e-4), {"rotation", "reflection", "virial-symmetry"},
        {"translation", "periodic-wrap", "permutation", "conservative-forces", "virial-strain",
         "cutoff-smoothness", "extensivity", "locality", "additivity"}),
    "forces scaled by 1.01": (
        dict(force_scale=1.01), {"conservative-forces"},
        SYMMETRIES | {"net-force", "virial-strain", "virial-symmetry", "cutoff-smoothness", "extensivity"}),
    "forces with a curl": (
        dict(curl=1e-3), {"conservative-forces"},
        {"translation", "periodic-wrap", "permutation", "net-force", "virial-strain", "extensivity", "additivity"}),
    "energy depends on atom labels": (
        dict(label_weight=1e-3), {"permutation", "extensivity", "additivity"},
        {"rotation", "reflection", "translation", "periodic-wrap", "conservative-forces", "virial-strain",
         "cutoff-smoothness", "locality"}),
    "hard cutoff": (
        dict(hard_cutoff=True), {"cutoff-smoothness"},
        SYMMETRIES | {"net-force", "virial-strain", "virial-symmetry", "extensivity", "locality", "additivity"}),
}


@pytest.mark.parametrize("bug", BUGS)
def test_bug_fails_the_property_it_breaks_and_passes_the_others(bug):
    knobs, must_fail, must_pass = BUGS[bug]
    failing = failing_properties(morse_potential(**knobs))
    assert must_fail <= failing, f"{bug}: not caught by {must_fail - failing}"
    assert not must_pass & failing, f"{bug}: wrongly failed {must_pass & failing}"


def test_ignoring_periodic_images_fails_wrap_and_extensivity():
    open_only = from_callable(lambda positions, symbols, cell: morse(positions, symbols, None), name="no-images",
                              elements=list(WELL_DEPTH), cutoffs=[CUTOFF])
    failing = failing_properties(open_only)
    assert {"periodic-wrap", "extensivity"} <= failing
    assert not failing & {"rotation", "translation", "permutation", "conservative-forces", "virial-strain",
                          "cutoff-smoothness", "locality", "additivity"}


def test_leaky_batch_padding_fails_batching_only():
    failing = failing_properties(batched(morse_potential(), leaky_padding=True))
    assert failing == {"batching"}


def test_hard_cutoff_jump_is_the_pair_energy_at_the_cutoff():
    """The extrapolated jump of a truncated Morse dimer is φ(r_c), to O(step²)."""
    dimer = CutoffProbe(System([[0.0, 0.0, 0.0], [0.0, 0.0, CUTOFF]], ["Cu", "Cu"]), 1, np.zeros(3), CUTOFF)
    decay = np.exp(-WELL_WIDTH * (CUTOFF - EQUILIBRIUM))
    pair_energy_at_cutoff = WELL_DEPTH["Cu"] * ((1 - decay) ** 2 - 1)
    jump = cutoff_jump(functools.partial(morse, hard_cutoff=True), dimer, step=1e-6)
    assert jump["energy (r=5 Å)"] == pytest.approx(abs(pair_energy_at_cutoff), rel=1e-9)


def test_a_raising_potential_is_reported_with_its_message():
    def raises(positions, symbols, cell):
        raise RuntimeError("SCF did not converge")

    subject = make_subject(from_callable(raises, elements=["Cu"]))
    report = check_property(PROPERTIES[PROPERTY_NAMES.index("rotation")], subject)
    assert report.outcome == "error"
    assert "RuntimeError: SCF did not converge" in report.detail


class MorseAsDpa3Model:
    """Stands in for `dpa3_ref.load(path)`: the model API `from_dpa3` adapts, with Morse numbers behind it."""

    type_map = ["Cu", "Ni"]
    config = SimpleNamespace(e_rcut=CUTOFF, a_rcut=4.0, nlayers=2, precision="float64", fitting_precision="float32")

    def evaluate(self, coord, types, cell=None):
        result = morse(coord, types, cell)
        return {"energy": np.asarray(result.energy), "atom_energy": result.atom_energies, "forces": result.forces,
                "virial": result.virial}


def test_from_dpa3_takes_cutoffs_receptive_field_and_precision_from_the_model():
    potential = from_dpa3(MorseAsDpa3Model())
    subject = make_subject(potential)
    assert (subject.elements, subject.cutoffs, subject.receptive_field) == (("Cu", "Ni"), (CUTOFF, 4.0), 2 * CUTOFF)
    assert subject.tolerances == TOLERANCES["float32"]  # the fitting net runs in float32
    positions = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 2.6]])
    np.testing.assert_array_equal(potential(positions, ["Cu", "Ni"], None).forces,
                                  morse(positions, ["Cu", "Ni"], None).forces)


# --- the command line --------------------------------------------------------------------------------

@pytest.fixture
def dpa3(monkeypatch, capsys):
    """Runs `dpa3 ARGS...` with tests/ on the path; returns (exit status, stdout, stderr). The dispatcher is
    limited to check-invariance: the other subcommands live in other modules."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    monkeypatch.setattr(cli, "SUBCOMMANDS", {"check-invariance": cli.SUBCOMMANDS["check-invariance"]})

    def run(*args):
        status = cli.main(["check-invariance", *args])
        out, err = capsys.readouterr()
        return status, out, err
    return run


EMT_OPTIONS = ["--elements", "Cu,Ni", "--cutoff", "5.8768", "--examples", "3",
               "--tolerance", "cutoff_energy=1e-3", "--tolerance", "cutoff_forces=1e-2"]


def test_cli_passes_emt_and_prints_json(dpa3):
    status, out, _ = dpa3("--calculator", "invariance_factories:emt", *EMT_OPTIONS, "--json")
    report = json.loads(out)
    assert status == 0 and report["passed"]
    assert {prop["name"] for prop in report["properties"]} == set(PROPERTY_NAMES)


def test_cli_fails_emt_with_scaled_forces(dpa3):
    status, out, _ = dpa3("--calculator", "invariance_factories:emt_with_scaled_forces", *EMT_OPTIONS)
    assert status == 1
    assert any(line.startswith("conservative-forces") and line.endswith("FAIL") for line in out.splitlines())


def test_cli_reports_a_raising_calculator_as_a_failure(dpa3):
    status, out, _ = dpa3("--calculator", "invariance_factories:non_converging", *EMT_OPTIONS, "--json")
    properties = json.loads(out)["properties"]
    assert status == 1
    assert all("SCF did not converge" in prop["detail"] for prop in properties if prop["outcome"] == "error")
    assert any(prop["outcome"] == "error" for prop in properties)


def test_cli_user_errors_are_one_line_messages(dpa3):
    status, _, err = dpa3("--calculator", "no_such_module:emt", "--elements", "Cu")
    assert status == 2 and "cannot import module 'no_such_module'" in err
    status, _, err = dpa3("--calculator", "invariance_factories:emt", "--elements", "Cu,Xx")
    assert status == 2 and "unknown element symbol(s) ['Xx']" in err
    status, _, err = dpa3("--calculator", "invariance_factories:emt")
    assert status == 2 and "--elements" in err

"""One calling convention for every interatomic potential the invariance suite can check.

A *potential* here is anything callable as

    result = potential(positions, symbols, cell)

with `positions` a float64 array [n_atoms, 3] in Å, `symbols` a sequence of element names and `cell` a [3, 3]
array whose rows are the lattice vectors (periodic in all three directions) or `None` (open boundaries).
`result` is a `Result`: energy (eV), forces (eV/Å), and, when the potential has them, the virial (eV) and the
per-atom energies (eV).

Virial convention (deepmd-kit, spec §7): for the homogeneous strain x -> x (I + ε) of positions and cell rows,

    W = -(∂E/∂ε)ᵀ,        W[k, l] = Σ_a F_a,k x_a,l   (summed over all atoms and periodic images),

in eV and *not* divided by the volume; stress = -W / V.

Adapters turn what people have into this form and attach what the suite needs to know about the potential
(its elements, its cutoff radii, its receptive field, its floating-point precision):
`from_ase_calculator`, `from_factory` ("module:function" returning an ASE calculator), `from_callable`,
`from_dpa3` (our model, imported lazily so the suite runs without it).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from dpa3_ref.errors import Dpa3Error


@dataclasses.dataclass(frozen=True, eq=False)
class Result:
    """What one evaluation of a potential returns."""

    energy: float  # eV
    forces: np.ndarray  # [n_atoms, 3] eV/Å
    virial: np.ndarray | None = None  # [3, 3] eV, W = -(∂E/∂ε)ᵀ, not divided by the volume
    atom_energies: np.ndarray | None = None  # [n_atoms] eV, summing to `energy`


@runtime_checkable
class Potential(Protocol):
    """Anything with this call signature. Optional attributes the suite reads when present:

    name: str                      shown in reports
    elements: tuple[str, ...]      what the potential can evaluate (default element draw)
    cutoffs: tuple[float, ...]     radii (Å) at which a neighbour enters the model (smoothness checks)
    receptive_field: float         radius (Å) beyond which an atom cannot change another's energy (locality)
    precision: str                 "float64" or "float32" (selects the tolerances)
    batch_evaluate(systems) -> list[Result]   evaluates several `strategies.System`s at once (batching check)
    """

    def __call__(self, positions: np.ndarray, symbols: Sequence[str], cell: np.ndarray | None) -> Result: ...


@dataclasses.dataclass(frozen=True)
class AdaptedPotential:
    """A potential function together with what the suite needs to know about it."""

    evaluate: Callable[[np.ndarray, Sequence[str], np.ndarray | None], Result]
    name: str
    elements: tuple[str, ...] | None = None
    cutoffs: tuple[float, ...] = ()
    receptive_field: float | None = None
    precision: str = "float64"
    batch_evaluate: Callable[[Sequence[Any]], list[Result]] | None = None

    def __call__(self, positions: np.ndarray, symbols: Sequence[str], cell: np.ndarray | None) -> Result:
        return self.evaluate(positions, symbols, cell)


def checked_result(output: Result | Mapping[str, Any], n_atoms: int, name: str) -> Result:
    """Converts a potential's output to a float64 `Result`, or says which quantity has the wrong shape."""
    if isinstance(output, Mapping):
        unknown = set(output) - {field.name for field in dataclasses.fields(Result)}
        if unknown:
            raise Dpa3Error(f"potential {name!r} returned unknown keys {sorted(unknown)}; "
                            "expected energy, forces, virial, atom_energies")
        output = Result(**output)
    if not isinstance(output, Result):
        raise Dpa3Error(f"potential {name!r} returned {type(output).__name__}, expected a Result or a dict")
    expected_shapes = {"energy": (), "forces": (n_atoms, 3), "virial": (3, 3), "atom_energies": (n_atoms,)}
    values = {}
    for key, shape in expected_shapes.items():
        value = getattr(output, key)
        if value is None:
            if key in ("energy", "forces"):
                raise Dpa3Error(f"potential {name!r} returned no {key}")
            values[key] = None
            continue
        array = np.asarray(value, dtype=np.float64)
        if array.shape != shape:
            raise Dpa3Error(f"potential {name!r} returned {key} of shape {array.shape} for {n_atoms} atoms, "
                            f"expected {shape}")
        values[key] = array
    values["energy"] = float(values["energy"])
    return Result(**values)


def from_callable(function: Callable[..., Result | Mapping[str, Any]], *, name: str | None = None,
                  elements: Sequence[str] | None = None, cutoffs: Sequence[float] = (),
                  receptive_field: float | None = None, precision: str = "float64",
                  batch_evaluate: Callable[[Sequence[Any]], list[Result]] | None = None) -> AdaptedPotential:
    """Wraps `function(positions, symbols, cell) -> Result | dict` (dict keys: the `Result` field names)."""
    label = name or getattr(function, "__name__", type(function).__name__)

    def evaluate(positions, symbols, cell):
        return checked_result(function(positions, symbols, cell), len(symbols), label)

    return AdaptedPotential(evaluate, label, tuple(elements) if elements else None, tuple(cutoffs),
                            receptive_field, precision, batch_evaluate)


def from_ase_calculator(calculator: Any, *, name: str | None = None, elements: Sequence[str] | None = None,
                        cutoffs: Sequence[float] = (), receptive_field: float | None = None,
                        precision: str = "float64") -> AdaptedPotential:
    """Wraps an ASE calculator. Virial = -stress · V (periodic cells only); per-atom energies when it has them."""
    import ase
    from ase.calculators.calculator import PropertyNotImplementedError

    label = name or type(calculator).__name__

    def evaluate(positions, symbols, cell):
        periodic = cell is not None
        atoms = ase.Atoms(symbols=list(symbols), positions=positions, cell=cell if periodic else None, pbc=periodic)
        atoms.calc = calculator
        energy = atoms.get_potential_energy()
        forces = atoms.get_forces()  # [n_atoms, 3]
        virial = atom_energies = None
        try:
            if periodic:
                virial = -atoms.get_stress(voigt=False) * atoms.get_volume()  # [3, 3]
        except PropertyNotImplementedError:
            pass
        try:
            atom_energies = atoms.get_potential_energies()  # [n_atoms]
        except PropertyNotImplementedError:
            pass
        return checked_result(Result(energy, forces, virial, atom_energies), len(atoms), label)
    return AdaptedPotential(evaluate, label, tuple(elements) if elements else None, tuple(cutoffs),
                            receptive_field, precision)


def from_factory(spec: str, **metadata: Any) -> AdaptedPotential:
    """Imports `module:function` (module on PYTHONPATH), calls the function and wraps the ASE calculator it returns.

    `metadata` (name, elements, cutoffs, receptive_field, precision) is passed on to `from_ase_calculator`.
    """
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise Dpa3Error(f"calculator factory {spec!r} must have the form MODULE:FUNCTION, e.g. mypkg.calcs:make_emt")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise Dpa3Error(f"cannot import module {module_name!r} of calculator factory {spec!r}: {error}") from error
    factory = getattr(module, function_name, None)
    if not callable(factory):
        raise Dpa3Error(f"module {module_name!r} has no function {function_name!r} (calculator factory {spec!r})")
    calculator = factory()
    if not hasattr(calculator, "get_property"):
        raise Dpa3Error(f"calculator factory {spec!r} returned {type(calculator).__name__}, not an ASE calculator")
    return from_ase_calculator(calculator, **{"name": spec, **metadata})


def from_dpa3(model: Any) -> AdaptedPotential:
    """Wraps our model (`dpa3_ref.load(path)`): `model.evaluate(coord, types, cell)` returns a dict of arrays.

    Cutoffs are the edge and angle radii; the receptive field is nlayers · e_rcut (one edge per message-passing
    layer, spec §11.8); float32 tolerances apply if the descriptor or the fitting net runs in float32.
    """
    config = model.config

    def evaluate(positions, symbols, cell):
        out = model.evaluate(positions, list(symbols), cell=cell)
        return checked_result(Result(energy=out["energy"], forces=out["forces"], virial=out["virial"],
                                     atom_energies=out["atom_energy"]), len(symbols), "dpa3")

    def batch_evaluate(systems):
        outs = model.evaluate_batch([(s.positions, list(s.symbols), s.cell) for s in systems])
        return [checked_result(Result(energy=o["energy"], forces=o["forces"], virial=o["virial"],
                                      atom_energies=o["atom_energy"]), s.n_atoms, "dpa3")
                for o, s in zip(outs, systems, strict=True)]

    cutoffs = tuple(sorted({float(config.e_rcut), float(config.a_rcut)}, reverse=True))
    precisions = {getattr(config, "precision", "float64"), getattr(config, "fitting_precision", "float64")}
    return AdaptedPotential(evaluate, "dpa3", tuple(model.type_map), cutoffs,
                            receptive_field=config.nlayers * float(config.e_rcut),
                            precision="float32" if "float32" in precisions else "float64",
                            batch_evaluate=batch_evaluate if hasattr(model, "evaluate_batch") else None)


def from_onnx(path: str, threads: int | None = None) -> AdaptedPotential:
    """An exported model file (`dpa3 export`), run by onnxruntime through the JAX-free client (dpa3_onnx):
    the same checks as for the JAX model."""
    from dpa3_onnx import Dpa3OnnxError, OnnxPotential

    try:
        potential = OnnxPotential(path, threads=threads)
    except Dpa3OnnxError as error:
        raise Dpa3Error(str(error)) from None
    return dataclasses.replace(from_dpa3(potential), name="onnx")

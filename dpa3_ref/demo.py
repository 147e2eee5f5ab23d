"""`dpa3 demo`: the whole model on a structure it builds itself, with no downloads.

1. a DPA3 model with the water-example architecture (spec §10.2: 6 layers, 128/64/32, float32), random
   weights from a fixed seed;
2. a box of liquid-density water built with ASE (random molecule orientations, fixed seed);
3. energy and forces with timings (the first call includes XLA compilation);
4. spot checks in float64 (same weights): rotation and translation invariance, force = −∇E;
5. a short NVE molecular dynamics run with the ASE calculator, reporting the energy drift.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

WATER_DENSITY = 0.0334  # molecules per Å^3 at 1 g/cm^3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--molecules", type=int, default=32, help="water molecules in the box (default 32)")
    parser.add_argument("--steps", type=int, default=40, help="NVE steps (default 40)")
    parser.add_argument("--timestep", type=float, default=0.5, help="MD time step in fs (default 0.5)")
    parser.add_argument("--seed", type=int, default=0)


def water_box(molecules: int, seed: int):
    """`molecules` randomly oriented H2O on a jittered cubic grid at liquid density (an ase.Atoms)."""
    from ase import Atoms
    from ase.build import molecule
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(seed)
    per_side = int(np.ceil(molecules ** (1 / 3)))
    length = (molecules / WATER_DENSITY) ** (1 / 3)
    spacing = length / per_side
    sites = np.stack(np.meshgrid(*[np.arange(per_side)] * 3, indexing="ij"), -1).reshape(-1, 3)[:molecules]
    water = molecule("H2O")
    box = Atoms(cell=np.eye(3) * length, pbc=True)
    for site, rotation in zip(sites, Rotation.random(molecules, random_state=seed).as_matrix(), strict=True):
        h2o = water.copy()
        h2o.positions = (h2o.positions - h2o.get_center_of_mass()) @ rotation.T
        h2o.positions += (site + 0.5 + rng.uniform(-0.1, 0.1, 3)) * spacing
        box += h2o
    return box


def run(args: argparse.Namespace) -> int:
    import jax
    from ase import units
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
    from ase.md.verlet import VelocityVerlet
    from scipy.spatial.transform import Rotation
    from tqdm import tqdm

    from dpa3_ref import Potential, water_example_config
    from dpa3_ref.calculator import DPA3Calculator
    from dpa3_ref.model import cast_model

    config = water_example_config()
    potential = Potential.init(config, seed=args.seed)
    parameters = sum(x.size for x in jax.tree.leaves(potential.model))
    atoms = water_box(args.molecules, args.seed)
    positions, symbols, cell = atoms.positions, atoms.get_chemical_symbols(), np.asarray(atoms.cell)
    print(f"model   DPA3 water example: {config.nlayers} layers, n/e/a = {config.n_dim}/{config.e_dim}/{config.a_dim}, "
          f"{config.precision}, {parameters:,} numbers (random weights, seed {args.seed})")
    print(f"system  {len(atoms)} atoms ({args.molecules} H2O), cubic box {cell[0, 0]:.2f} Å, periodic")

    start = time.perf_counter()
    out = potential.evaluate(positions, symbols, cell)
    first = time.perf_counter() - start
    start = time.perf_counter()
    out = potential.evaluate(positions, symbols, cell)
    warm = time.perf_counter() - start
    print(f"energy  {float(out['energy']):.6f} eV   |F| max {np.abs(out['forces']).max():.4f} eV/Å")
    print(f"time    first call {first:.2f} s (with compilation), then {warm * 1e3:.0f} ms per energy+forces")

    print("checks  (float64 copy of the same weights)")
    double = Potential(cast_model(potential.model, "float64"))
    reference = double.evaluate(positions, symbols, cell)
    rotation = Rotation.random(random_state=args.seed + 1).as_matrix()
    rotated = double.evaluate(positions @ rotation.T, symbols, cell @ rotation.T)
    shifted = double.evaluate(positions + np.array([0.37, -1.21, 2.05]), symbols, cell)
    print(f"        rotation:    |ΔE| = {abs(rotated['energy'] - reference['energy']):.2e} eV, "
          f"|F(Qx) − F(x)Qᵀ| = {np.abs(rotated['forces'] - reference['forces'] @ rotation.T).max():.2e} eV/Å")
    print(f"        translation: |ΔE| = {abs(shifted['energy'] - reference['energy']):.2e} eV")
    step, worst = 1e-5, 0.0
    for atom, axis in [(0, 0), (1, 1), (5, 2)]:
        plus, minus = positions.copy(), positions.copy()
        plus[atom, axis] += step
        minus[atom, axis] -= step
        derivative = (double.evaluate(plus, symbols, cell)["energy"] - double.evaluate(minus, symbols, cell)["energy"]) / (2 * step)
        worst = max(worst, abs(reference["forces"][atom, axis] + derivative))
    print(f"        force = −∇E: worst |F + dE/dx| = {worst:.2e} eV/Å (central differences, 3 components)")

    atoms.calc = DPA3Calculator(potential)
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(args.seed))
    dynamics = VelocityVerlet(atoms, timestep=args.timestep * units.fs)
    totals = []
    for _ in tqdm(range(args.steps), desc="NVE", unit="step"):
        dynamics.run(1)
        totals.append(atoms.get_potential_energy() + atoms.get_kinetic_energy())
    totals = np.array(totals)
    drift = (totals[-1] - totals[0]) / len(atoms)
    print(f"NVE     {args.steps} steps of {args.timestep} fs at 300 K: total energy drift {drift * 1e3:+.3f} meV/atom, "
          f"fluctuation {totals.std() / len(atoms) * 1e3:.3f} meV/atom, T = {atoms.get_temperature():.0f} K")
    return 0

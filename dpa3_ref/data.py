"""Readers for labelled atomic structures: deepmd/npy directories and extxyz files, checked before training.

A `System` is one set of atom slots seen in several frames (a trajectory, or one composition of a dataset):
coordinates, the element of every atom, the cell of every frame (or none, for open boundaries) and, when the
data has them, the DFT labels energy, forces, virial and per-atom energies. In the *mixed-type* layout the
elements change from frame to frame (frames of different compositions with the same number of atom slots),
and a slot may hold a *virtual atom* that is not there at all (deepmd-kit pads smaller structures with them).

The deepmd/npy layout (one system per directory; deepmd/utils/data.py of deepmd-kit 3.2.0 is the reference):

    type.raw        one integer per atom slot: its index into type_map.raw (one line per slot, n lines)
    type_map.raw    one element name per line (optional when the model's type map is given: the indices of
                    type.raw are then the model's type indices, as deepmd-kit does)
    nopbc           optional empty marker file: open boundaries, no box.npy
    set.000/        frames, split into one or more sets (read in sorted order and concatenated)
        coord.npy             (nf, n*3)  Å
        box.npy               (nf, 9)    Å, rows = lattice vectors (absent with the nopbc marker)
        energy.npy            (nf,)      eV                                   optional
        force.npy             (nf, n*3)  eV/Å                                 optional
        virial.npy            (nf, 9)    eV, deepmd convention                optional
        atom_ener.npy         (nf, n)    eV, per-atom energy labels           optional (or atomic_ener.npy)
        real_atom_types.npy   (nf, n)    int, per-frame index into type_map.raw, -1 = virtual atom:
                                         the mixed-type layout; in every set or in none. type.raw then
                                         only gives the number of slots n.

A label is present in every set or in none: deepmd-kit fills a missing set with zeros, and since a batch
takes its find_* flag from its first frame (collate_batch in deepmd/pt/utils/dataloader.py), it may train on
those zeros. Virtual atoms take no part in anything: their coordinates and labels are ignored, and the
batches (batches.py) leave them out of the graph. An element that type_map.raw lists but no atom uses is
harmless here (deepmd-kit refuses it when the model's type map lacks it).

Units everywhere: Å, eV, eV/Å; the virial is in eV and follows deepmd-kit (spec §7):
W = Σ_a F_a ⊗ x_a = -(∂E/∂ε)ᵀ, so that W = -σV for the stress σ = (1/V) ∂E/∂ε that ASE reports. In extxyz
files a `virial` in a frame's info line is in this same convention (the GAP/QUIP one, which dpdata reads as
deepmd's virial); otherwise the virial is computed from the stress.

Element names, not indices, are what a System hands to a model: `System.frame_type_indices(frame, type_map)`
maps them onto a model's own type map by name and names any element the model does not know.

A dataset (`read_systems`) is a list of paths as in deepmd-kit's `training_data.systems`: each a system
directory, an extxyz file, a directory searched for every system below it, or a glob pattern. Everything a
user can get wrong is reported before training starts, in one sentence that names the file: a path that
does not exist, a missing array, a shape that does not fit, a NaN or infinite coordinate or label, an
element the model does not know, a system without frames or atoms.
"""

from __future__ import annotations

import dataclasses
import glob
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dpa3_ref.errors import Dpa3Error

VIRTUAL_ATOM = -1  # the type of an empty slot in the mixed-type layout (deepmd-kit's convention)


@dataclasses.dataclass(frozen=True, eq=False)
class System:
    """Frames of one set of atom slots, with optional DFT labels. Shapes and values are checked on construction.

    Exactly one of `atom_names` (the same atoms in every frame) and `frame_types` (mixed-type layout: the
    element of every slot in every frame, indices into `elements`, -1 for a virtual atom) is given.
    """

    coord: np.ndarray  # [nf, n, 3] float64, Å
    atom_names: list[str] | None  # [n] element name of every atom; None in the mixed-type layout
    cell: np.ndarray | None  # [nf, 3, 3] float64, rows = lattice vectors, Å; None = open boundaries
    source: Path  # the file or directory this was read from, for messages
    energy: np.ndarray | None = None  # [nf] eV
    forces: np.ndarray | None = None  # [nf, n, 3] eV/Å
    virial: np.ndarray | None = None  # [nf, 3, 3] eV, deepmd convention
    atom_energy: np.ndarray | None = None  # [nf, n] eV, per-atom energy labels
    frame_types: np.ndarray | None = None  # [nf, n] int, index into `elements`; -1 = virtual atom
    elements: tuple[str, ...] = ()  # the element names `frame_types` indexes

    def __post_init__(self):
        if self.coord.ndim != 3:
            raise Dpa3Error(f"{self.source}: coord has shape {self.coord.shape}, expected (frames, atoms, 3)")
        n_frames, n_atoms = self.coord.shape[:2]
        if n_frames == 0:
            raise Dpa3Error(f"{self.source}: the system has no frames")
        if n_atoms == 0:
            raise Dpa3Error(f"{self.source}: the system has no atoms")
        if (self.atom_names is None) == (self.frame_types is None):
            raise Dpa3Error(f"{self.source}: give either atom_names or frame_types (mixed-type layout), not both")
        expected = {
            "coord": (self.coord, (n_frames, n_atoms, 3)),
            "atom_names": (None if self.atom_names is None else np.asarray(self.atom_names), (n_atoms,)),
            "cell": (self.cell, (n_frames, 3, 3)),
            "energy": (self.energy, (n_frames,)),
            "forces": (self.forces, (n_frames, n_atoms, 3)),
            "virial": (self.virial, (n_frames, 3, 3)),
            "atom_energy": (self.atom_energy, (n_frames, n_atoms)),
            "frame_types": (self.frame_types, (n_frames, n_atoms)),
        }
        for name, (array, shape) in expected.items():
            if array is not None and array.shape != shape:
                raise Dpa3Error(
                    f"{self.source}: {name} has shape {array.shape}, expected {shape} "
                    f"for {n_frames} frames of {n_atoms} atoms"
                )
        if self.frame_types is not None:
            self._check_frame_types()
        _check_finite(self.coord, "coordinate", self.source)
        if self.cell is not None:
            _check_finite(self.cell, "cell vector", self.source)
        for label in ("energy", "forces", "virial", "atom_energy"):
            if getattr(self, label) is not None:
                _check_finite(getattr(self, label), f"{label} label", self.source)

    def _check_frame_types(self) -> None:
        bad = np.argwhere((self.frame_types < VIRTUAL_ATOM) | (self.frame_types >= len(self.elements)))
        if bad.size:
            frame, atom = bad[0]
            raise Dpa3Error(
                f"{self.source}: frame {frame}, atom {atom} has type {self.frame_types[frame, atom]}, but the "
                f"type map names {len(self.elements)} elements (and -1 marks a virtual atom)"
            )
        empty = np.flatnonzero(~self.real_atom_mask.any(axis=1))
        if empty.size:
            raise Dpa3Error(f"{self.source}: frame {empty[0]} has only virtual atoms (type -1)")

    @property
    def n_frames(self) -> int:
        return self.coord.shape[0]

    @property
    def n_atoms(self) -> int:
        """Atom slots per frame, virtual atoms included (deepmd-kit's natoms, e.g. for batch_size "auto")."""
        return self.coord.shape[1]

    @property
    def is_mixed_type(self) -> bool:
        return self.frame_types is not None

    @property
    def real_atom_mask(self) -> np.ndarray:
        """[nf, n] bool: the slot holds an atom (False only for virtual atoms of the mixed-type layout)."""
        if self.frame_types is None:
            return np.ones((self.n_frames, self.n_atoms), bool)
        return self.frame_types != VIRTUAL_ATOM

    @property
    def n_real_atoms(self) -> np.ndarray:
        """[nf] int: atoms per frame, virtual atoms not counted."""
        return self.real_atom_mask.sum(axis=1)

    def type_indices(self, type_map: Sequence[str]) -> np.ndarray:
        """The index into `type_map` of every atom's element: [n] int. Raises if an element is missing.
        Only for systems with one composition; `frame_type_indices` works for every system."""
        if self.atom_names is None:
            raise Dpa3Error(f"{self.source}: the composition changes from frame to frame (mixed-type layout); "
                            "ask for the types of one frame")
        index_of = {name: index for index, name in enumerate(type_map)}
        for atom, name in enumerate(self.atom_names):
            if name not in index_of:
                raise Dpa3Error(
                    f"{self.source}: element {name!r} (atom {atom}) is not in the model's type map {list(type_map)}"
                )
        return np.array([index_of[name] for name in self.atom_names], dtype=np.int64)

    def frame_type_indices(self, frame: int, type_map: Sequence[str]) -> np.ndarray:
        """[n] int: the index into `type_map` of every atom's element in `frame`; -1 for a virtual atom."""
        if self.frame_types is None:
            return self.type_indices(type_map)
        return self._element_lookup(type_map)[self.frame_types[frame]]

    def all_type_indices(self, type_map: Sequence[str]) -> np.ndarray:
        """[nf, n] int: `frame_type_indices` of every frame (-1 for virtual atoms)."""
        if self.frame_types is None:
            return np.broadcast_to(self.type_indices(type_map), (self.n_frames, self.n_atoms))
        return self._element_lookup(type_map)[self.frame_types]

    def type_counts(self, type_map: Sequence[str]) -> np.ndarray:
        """[nf, len(type_map)] int: how many atoms of each model type every frame holds (the least-squares
        design matrix of the energy offsets, spec §6.3)."""
        types = self.all_type_indices(type_map)  # [nf, n]
        return np.stack([(types == t).sum(axis=1) for t in range(len(type_map))], axis=1)

    def check_type_map(self, type_map: Sequence[str]) -> None:
        """Raise, naming the element, frame and atom, if an atom's element is not in `type_map`."""
        self.all_type_indices(type_map)

    def _element_lookup(self, type_map: Sequence[str]) -> np.ndarray:
        """[len(elements) + 1] int: model type of each of this system's elements, and -1 (last) for virtual atoms,
        so that indexing with frame_types (where -1 picks the last entry) maps slot types to model types."""
        index_of = {name: index for index, name in enumerate(type_map)}
        for element_index, name in enumerate(self.elements):
            if name not in index_of:
                used = np.argwhere(self.frame_types == element_index)
                if used.size:  # an element listed but never used is harmless
                    frame, atom = used[0]
                    raise Dpa3Error(
                        f"{self.source}: element {name!r} (frame {frame}, atom {atom}) is not in the model's "
                        f"type map {list(type_map)}"
                    )
        return np.array([index_of.get(name, VIRTUAL_ATOM) for name in self.elements] + [VIRTUAL_ATOM], np.int64)


# --------------------------------------------------------------------------- datasets
def read_systems(paths: str | Path | Sequence[str | Path], type_map: Sequence[str]) -> list[System]:
    """Every system of a dataset, read and checked against the model's `type_map` before training starts.

    `paths` is deepmd-kit's `systems` value: one path or a list. Each is expanded by `dataset_paths`.
    """
    systems = []
    for path in dataset_paths(paths):
        system = read_system(path, type_map)
        system.check_type_map(type_map)
        systems.append(system)
    return systems


def dataset_paths(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    """The system paths of a dataset, in the order given: an extxyz file stays itself; a directory becomes
    every system at or below it (sorted, as `find_systems`; deepmd-kit takes them in file-system order);
    a pattern with `*`, `?` or `[` is expanded by glob (sorted), each match then as above."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise Dpa3Error("the list of systems is empty")
    found = []
    for item in paths:
        item = str(item)
        if glob.has_magic(item):
            matches = sorted(glob.glob(item))
            if not matches:
                raise Dpa3Error(f"{item}: the pattern matches no file or directory")
        else:
            matches = [item]
        for match in matches:
            found.extend(_expand(Path(match)))
    return found


def _expand(path: Path) -> list[Path]:
    if not path.exists():
        raise Dpa3Error(f"{path}: no such file or directory")
    if path.is_file():
        return [path]
    systems = find_systems(path)
    if not systems:
        raise Dpa3Error(f"{path}: no deepmd/npy system (a directory with type.raw) at or below it")
    return systems


def read_system(path: str | Path, type_map: Sequence[str] | None = None) -> System:
    """Read a deepmd/npy system directory or an extxyz file. `type_map` (the model's) names the types of a
    deepmd/npy system that has no type_map.raw, as deepmd-kit does; it is not needed otherwise."""
    path = Path(path)
    if not path.exists():
        raise Dpa3Error(f"{path}: no such file or directory")
    if path.is_dir():
        return _read_deepmd_npy(path, type_map)
    return _read_extxyz(path)


def find_systems(root: str | Path) -> list[Path]:
    """Every deepmd/npy system directory (one holding type.raw) at or below `root`, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise Dpa3Error(f"{root}: not a directory")
    return sorted(type_file.parent for type_file in root.rglob("type.raw"))


# --------------------------------------------------------------------------- deepmd/npy
LABEL_FILES = {  # System field -> (file names, the first deepmd-kit's own, then its alternatives; per-frame shape)
    "cell": (("box.npy",), lambda n: (3, 3)),
    "energy": (("energy.npy",), lambda n: ()),
    "forces": (("force.npy",), lambda n: (n, 3)),
    "virial": (("virial.npy",), lambda n: (3, 3)),
    "atom_energy": (("atom_ener.npy", "atomic_ener.npy"), lambda n: (n,)),
}
MIXED_TYPE_FILE = "real_atom_types.npy"


def _read_deepmd_npy(directory: Path, model_type_map: Sequence[str] | None) -> System:
    type_file = directory / "type.raw"
    if not type_file.is_file():
        raise Dpa3Error(f"{directory}: not a deepmd/npy system, type.raw is missing")
    set_dirs = sorted(d for d in directory.glob("set.*") if d.is_dir())
    if not set_dirs:
        raise Dpa3Error(f"{directory}: not a deepmd/npy system, no set.* directory")
    elements = _system_type_map(directory, model_type_map)
    slot_types = _load_types(type_file, elements)  # [n]
    mixed = _is_mixed_type(set_dirs)
    periodic = not (directory / "nopbc").exists()
    sets = [_read_set(set_dir, len(slot_types), periodic, mixed) for set_dir in set_dirs]
    frame_types = np.concatenate([frames["frame_types"] for frames in sets]) if mixed else None
    return System(
        coord=np.concatenate([frames["coord"] for frames in sets]),
        atom_names=None if mixed else [elements[t] for t in slot_types],
        cell=np.concatenate([frames["cell"] for frames in sets]) if periodic else None,
        source=directory,
        energy=_concatenate_label(sets, "energy", set_dirs),
        forces=_concatenate_label(sets, "forces", set_dirs),
        virial=_concatenate_label(sets, "virial", set_dirs),
        atom_energy=_concatenate_label(sets, "atom_energy", set_dirs),
        frame_types=frame_types,
        elements=tuple(elements) if mixed else (),
    )


def _system_type_map(directory: Path, model_type_map: Sequence[str] | None) -> list[str]:
    """The names of the system's types: type_map.raw, or else the model's type map (deepmd-kit's fallback)."""
    type_map_file = directory / "type_map.raw"
    if type_map_file.is_file():
        return type_map_file.read_text().split()
    if model_type_map is None:
        raise Dpa3Error(f"{directory}: type_map.raw is missing, so the types of type.raw have no element names")
    return list(model_type_map)


def _load_types(type_file: Path, type_map: list[str]) -> np.ndarray:
    """The type of every atom slot, from type.raw (indices into the type map): [n] int."""
    if not type_file.read_text().split():
        raise Dpa3Error(f"{type_file}: the system has no atoms (type.raw is empty)")
    try:
        types = np.loadtxt(type_file, dtype=np.int64, ndmin=1)  # [n]
    except ValueError as error:
        raise Dpa3Error(f"{type_file}: expected one integer per atom ({error})") from error
    bad = np.flatnonzero((types < 0) | (types >= len(type_map)))
    if bad.size:
        atom = int(bad[0])
        raise Dpa3Error(
            f"{type_file}: atom {atom} has type {types[atom]}, but the type map names {len(type_map)} elements"
        )
    return types


def _is_mixed_type(set_dirs: list[Path]) -> bool:
    """True if the sets use the mixed-type layout; deepmd-kit requires all sets or none to use it."""
    mixed = [(d / MIXED_TYPE_FILE).is_file() for d in set_dirs]
    if any(mixed) and not all(mixed):
        missing = [str(d) for d, has in zip(set_dirs, mixed, strict=True) if not has]
        raise Dpa3Error(f"{MIXED_TYPE_FILE} is given in some sets but missing in {missing}; all or none must have it")
    return all(mixed)


def _read_set(set_dir: Path, n_atoms: int, periodic: bool, mixed: bool) -> dict[str, np.ndarray | None]:
    """One set.* directory as arrays shaped per frame; absent optional labels are None."""
    if periodic and not (set_dir / "box.npy").is_file():
        raise Dpa3Error(f"{set_dir}: box.npy is missing (an empty 'nopbc' file beside type.raw marks open boundaries)")
    coord_file = set_dir / "coord.npy"
    if not coord_file.is_file():
        raise Dpa3Error(f"{set_dir}: coord.npy is missing")
    coord = np.load(coord_file).astype(np.float64)
    if coord.ndim == 1:  # one frame stored flat, which deepmd-kit accepts
        coord = coord.reshape(1, -1)
    n_frames = coord.shape[0]
    if n_frames == 0:
        raise Dpa3Error(f"{coord_file}: the set has no frames")
    frames = {"coord": _reshape(coord, (n_frames, n_atoms, 3), coord_file), "cell": None}
    for key, (file_names, frame_shape) in LABEL_FILES.items():
        if key == "cell" and not periodic:
            continue
        file = next((set_dir / name for name in file_names if (set_dir / name).is_file()), None)
        frames[key] = None if file is None else _reshape(_load(file), (n_frames, *frame_shape(n_atoms)), file)
    if mixed:
        frames["frame_types"] = _load_frame_types(set_dir / MIXED_TYPE_FILE, n_frames, n_atoms)
    return frames


def _load(file: Path) -> np.ndarray:
    """A .npy file as float64 (the datasets store float32)."""
    return np.load(file).astype(np.float64)


def _load_frame_types(file: Path, n_frames: int, n_atoms: int) -> np.ndarray:
    """real_atom_types.npy as [nf, n] int, checked to hold whole numbers."""
    types = np.load(file)
    if types.dtype.kind == "f" and not np.array_equal(types, np.round(types)):
        raise Dpa3Error(f"{file}: types must be whole numbers")
    return _reshape(types.astype(np.int64), (n_frames, n_atoms), file)


def _reshape(array: np.ndarray, shape: tuple[int, ...], file: Path) -> np.ndarray:
    """Reshape a deepmd/npy array (frames first, the rest flattened) or name the file and both shapes.
    A one-frame set may store its arrays without the frame axis, as deepmd-kit allows."""
    frames_fit = (array.ndim > 0 and array.shape[0] == shape[0]) or shape[0] == 1
    if not frames_fit or array.size != np.prod(shape):
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
        missing = [str(d) for d, has in zip(set_dirs, present, strict=True) if not has]
        raise Dpa3Error(f"{LABEL_FILES[key][0][0]} ({key}) is given in some sets but missing in {missing}")
    return np.concatenate([frames[key] for frames in sets])


# --------------------------------------------------------------------------- extxyz
def _read_extxyz(file: Path) -> System:
    """Every frame of an extxyz file. Frames with the same number of atoms but different elements (or orders)
    become one mixed-type System; different numbers of atoms are refused (one System per atom count)."""
    import ase.io

    try:
        frames = ase.io.read(file, ":")
    except Exception as error:  # ase raises many types for a malformed file
        raise Dpa3Error(f"{file}: cannot read as extxyz ({type(error).__name__}: {error})") from error
    if not frames:
        raise Dpa3Error(f"{file}: the system has no frames")
    for index, atoms in enumerate(frames):
        if len(atoms) != len(frames[0]):
            raise Dpa3Error(
                f"{file}: frame {index} has different atoms than frame 0 "
                f"({atoms.get_chemical_formula()} vs {frames[0].get_chemical_formula()}); "
                "one System holds one number of atoms, so split the file by it"
            )
    symbols = [atoms.get_chemical_symbols() for atoms in frames]  # [nf][n]
    same_atoms = all(frame_symbols == symbols[0] for frame_symbols in symbols)
    elements = tuple(dict.fromkeys(name for frame_symbols in symbols for name in frame_symbols))
    index_of = {name: index for index, name in enumerate(elements)}
    return System(
        coord=np.stack([atoms.get_positions() for atoms in frames]),  # [nf, n, 3]
        atom_names=symbols[0] if same_atoms else None,
        cell=_extxyz_cells(frames, file),
        source=file,
        energy=_extxyz_label(frames, "energy", file),
        forces=_extxyz_label(frames, "forces", file),
        virial=_extxyz_virials(frames, file),
        atom_energy=_extxyz_label(frames, "energies", file),
        frame_types=None if same_atoms else np.array([[index_of[s] for s in f] for f in symbols], np.int64),
        elements=() if same_atoms else elements,
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


def _every_frame_has(frames: list, key: str, file: Path, in_info: bool = False) -> bool:
    """True if every frame has the calculator result (or info entry) `key`, False if none has; else an error."""
    if in_info:
        present = [key in atoms.info for atoms in frames]
    else:
        present = [atoms.calc is not None and key in atoms.calc.results for atoms in frames]
    if any(present) and not all(present):
        raise Dpa3Error(f"{file}: frame {present.index(False)} has no {key!r} while other frames do")
    return all(present)


def _extxyz_virials(frames: list, file: Path) -> np.ndarray | None:
    """Virials in deepmd's convention, [nf, 3, 3] or None: the frames' `virial` info entries as they are,
    or else W = -σV from their stresses."""
    if _every_frame_has(frames, "virial", file, in_info=True):
        virials = [np.asarray(atoms.info["virial"], dtype=np.float64) for atoms in frames]
        for index, virial in enumerate(virials):
            if virial.shape != (3, 3):
                raise Dpa3Error(f"{file}: frame {index} has a virial of shape {virial.shape}, expected 9 numbers")
        return np.stack(virials)
    if not _every_frame_has(frames, "stress", file):
        return None
    if not all(atoms.pbc.all() for atoms in frames):
        raise Dpa3Error(f"{file}: a stress is given for a non-periodic frame, where it has no meaning")
    stresses = np.stack([atoms.get_stress(voigt=False) for atoms in frames])  # [nf, 3, 3] eV/Å³
    volumes = np.array([atoms.get_volume() for atoms in frames])  # [nf] Å³
    return -stresses * volumes[:, None, None]


def _check_finite(array: np.ndarray, what: str, source: Path) -> None:
    """Name the first frame (and atom or row) with a NaN or infinite value."""
    bad = np.argwhere(~np.isfinite(array))
    if not bad.size:
        return
    frame = bad[0][0]
    if array.ndim == 1:
        raise Dpa3Error(f"{source}: non-finite {what} in frame {frame}: {array[frame]}")
    row = bad[0][1]
    which = "atom" if what in ("coordinate", "forces label", "atom_energy label") else "row"
    value = array[frame, row]
    raise Dpa3Error(f"{source}: non-finite {what} in frame {frame}, {which} {row}: {np.asarray(value).tolist()}")

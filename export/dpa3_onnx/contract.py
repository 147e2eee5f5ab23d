"""The ONNX contract, version 1, as data: input and output names, shapes and dtypes, and the metadata.

Symbolic sizes: N atoms (local first, then ghosts), M neighbour-table width, K angle neighbours (K ≤ M),
R reverse-table width. The dtypes below are those of a float64 file; a float32 file (metadata
`dpa3_precision` = "float32") takes and returns float32 for every float and int32 for every index.
export/README.md is the full text.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

CONTRACT_VERSION = 1
INPUTS = {  # name -> (shape, numpy dtype in a float64 file)
    "positions": (("N", 3), np.float64),
    "types": (("N",), np.int64),
    "n_local": ((), np.int64),
    "neighbors": (("N", "M"), np.int64),
    "neighbor_shift": (("N", "M", 3), np.float64),
    "neighbor_mask": (("N", "M"), np.bool_),
    "angle_mask": (("N", "K"), np.bool_),
    "reverse_neighbors": (("N", "R"), np.int64),
}
OUTPUTS = {  # name -> shape (all float64)
    "energy": (1,),
    "atom_energy": ("N",),
    "forces": ("N", 3),
    "virial": (1, 3, 3),
}


def input_dtypes(precision: str) -> dict[str, np.dtype]:
    """The dtype of each input in a file of this precision ("float64" or "float32")."""
    narrow = {np.float64: np.float32, np.int64: np.int32, np.bool_: np.bool_}
    return {name: np.dtype(dtype if precision == "float64" else narrow[dtype]) for name, (_, dtype) in INPUTS.items()}


class Dpa3OnnxError(ValueError):
    """A problem with the input or the model file, said in one sentence."""


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What the file's metadata says (metadata_props, all strings in the file)."""

    type_map: tuple[str, ...]
    e_rcut: float  # Å: edges are pairs with r ≤ e_rcut
    a_rcut: float  # Å: angle neighbours have r < a_rcut
    e_sel: int  # at most this many neighbours per atom, nearest first
    a_sel: int  # angle neighbours: among the first a_sel
    nlayers: int  # message-passing layers: a host's halo is nlayers · e_rcut
    exclude_types: tuple[tuple[int, int], ...]  # type pairs without edges (they keep their slots)
    precision: str  # "float64" or "float32": the arithmetic inside the file, and its input/output types
    head: str  # the head of a multitask model, "" for a single-task one
    config: dict  # the full model configuration (dpa3-ref's DPA3Config as JSON)

    @property
    def halo(self) -> float:
        """How far beyond its local atoms a host must supply ghost atoms (Å)."""
        return self.nlayers * self.e_rcut

    @property
    def fitting_precision(self) -> str:
        return self.config.get("fitting_precision", self.precision)

    @classmethod
    def from_metadata(cls, metadata: dict[str, str], source: str) -> ModelInfo:
        if "dpa3_contract_version" not in metadata:
            raise Dpa3OnnxError(f"{source} is not a DPA3 export of contract v1 or later (no dpa3_contract_version "
                                "in its metadata): export it again with `dpa3 export`")
        version = metadata["dpa3_contract_version"]
        if version != str(CONTRACT_VERSION):
            raise Dpa3OnnxError(f"{source} keeps ONNX contract version {version}, this client knows version "
                                f"{CONTRACT_VERSION} only")
        if metadata.get("dpa3_precision") not in ("float64", "float32"):
            raise Dpa3OnnxError(f"{source}: unknown dpa3_precision {metadata.get('dpa3_precision')!r}")
        try:
            return cls(
                type_map=tuple(json.loads(metadata["dpa3_type_map"])),
                e_rcut=float(metadata["dpa3_e_rcut"]),
                a_rcut=float(metadata["dpa3_a_rcut"]),
                e_sel=int(metadata["dpa3_e_sel"]),
                a_sel=int(metadata["dpa3_a_sel"]),
                nlayers=int(metadata["dpa3_nlayers"]),
                exclude_types=tuple(tuple(p) for p in json.loads(metadata["dpa3_exclude_types"])),
                precision=metadata["dpa3_precision"],
                head=metadata["dpa3_head"],
                config=json.loads(metadata["dpa3_config"]),
            )
        except (KeyError, ValueError) as error:
            raise Dpa3OnnxError(f"{source}: damaged DPA3 metadata ({type(error).__name__}: {error})") from None

    def type_indices(self, types) -> np.ndarray:
        """Element names (matched by name) or type indices → int64 type indices in the model's type map."""
        types = np.asarray(types)
        if types.ndim != 1:
            raise Dpa3OnnxError(f"types must be a list of one element name or type index per atom, got shape {types.shape}")
        if types.dtype.kind in "US":
            lookup = {name: index for index, name in enumerate(self.type_map)}
            for atom, name in enumerate(types.tolist()):
                if name not in lookup:
                    raise Dpa3OnnxError(f"atom {atom} is {name!r}, which is not in the model's type map {list(self.type_map)}")
            return np.array([lookup[name] for name in types.tolist()], np.int64)
        if types.dtype.kind not in "iu":
            raise Dpa3OnnxError(f"types must be element names or integer type indices, got dtype {types.dtype}")
        bad = np.flatnonzero((types < 0) | (types >= len(self.type_map)))
        if bad.size:
            raise Dpa3OnnxError(f"atom {bad[0]} has type index {types[bad[0]]}, the model has types "
                                f"0..{len(self.type_map) - 1} ({list(self.type_map)})")
        return types.astype(np.int64)

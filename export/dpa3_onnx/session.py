"""An exported DPA3 model in an onnxruntime session: provider choice, input checks, evaluation.

onnxruntime runs the file with its default threads (all cores) unless told otherwise: a contract-v1 graph
holds no scatter-add, so every thread count gives the same, correct numbers. With `onnxruntime-gpu`
installed, the CUDA execution provider is chosen (the CPU one stays as the fallback for any operator
CUDA lacks).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dpa3_onnx.contract import INPUTS, OUTPUTS, Dpa3OnnxError, ModelInfo, input_dtypes
from dpa3_onnx.inputs import model_inputs

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


def choose_providers(available: list[str], device: str = "auto") -> list[str]:
    """Execution providers in onnxruntime's order of preference: CUDA then CPU where CUDA is available
    (device "auto" or "cuda"), else CPU; device "cuda" without CUDA is an error."""
    if device not in ("auto", "cpu", "cuda"):
        raise Dpa3OnnxError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and CUDA not in available:
        raise Dpa3OnnxError(f"the CUDA execution provider is not available (onnxruntime has {available}): "
                            "install onnxruntime-gpu instead of onnxruntime")
    if device != "cpu" and CUDA in available:
        return [CUDA, CPU]
    return [CPU]


class OnnxPotential:
    """A `dpa3 export` file run by onnxruntime: `evaluate` as dpa3_ref.Potential's, `run` for ready feeds."""

    def __init__(self, path: str | Path, *, threads: int | None = None, device: str = "auto"):
        import onnxruntime

        path = Path(path)
        if not path.is_file():
            raise Dpa3OnnxError(f"ONNX file {path} does not exist")
        if threads is not None and threads < 1:
            raise Dpa3OnnxError(f"threads must be at least 1, got {threads}")
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # errors only
        if threads is not None:
            options.intra_op_num_threads = threads
        providers = choose_providers(onnxruntime.get_available_providers(), device)
        try:
            self.session = onnxruntime.InferenceSession(str(path), options, providers=providers)
        except Exception as error:  # onnxruntime raises its own exception types for unreadable files
            raise Dpa3OnnxError(f"{path} is not an ONNX model onnxruntime can load "
                                f"({str(error).splitlines()[0][:200]})") from None
        self.info = ModelInfo.from_metadata(self.session.get_modelmeta().custom_metadata_map, str(path))
        names = {i.name for i in self.session.get_inputs()}, {o.name for o in self.session.get_outputs()}
        if names != (set(INPUTS), set(OUTPUTS)):
            raise Dpa3OnnxError(f"{path} says contract v1 but its inputs/outputs are {sorted(names[0])}/{sorted(names[1])}")
        self.dtypes = input_dtypes(self.info.precision)  # name -> numpy dtype the file takes
        self.path = path

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    @property
    def type_map(self) -> list[str]:
        return list(self.info.type_map)

    @property
    def config(self) -> ModelInfo:
        return self.info

    def evaluate(self, coord, types, cell=None, *, n_local: int | None = None) -> dict[str, np.ndarray]:
        """Energy (eV), per-atom energy, forces (eV/Å) and virial (eV, W = −Σ g ⊗ r) of one structure.

        coord [n, 3] Å; types: element names or type indices; cell [3, 3] (rows = lattice vectors) or None for
        open boundaries; n_local: only the first n_local atoms are local (the rest a host's ghost atoms, whose
        energy does not count and whose forces the host folds back onto their owners)."""
        raw = self.run(self.feeds(coord, types, cell, n_local=n_local))
        out = {name: value.astype(np.float64) for name, value in raw.items()}
        return {"energy": out["energy"][0], "atom_energy": out["atom_energy"], "forces": out["forces"],
                "virial": out["virial"][0]}

    def feeds(self, coord, types, cell=None, *, n_local: int | None = None) -> dict[str, np.ndarray]:
        """The contract-v1 inputs of one structure (neighbour and reverse tables) in this file's dtypes."""
        return {name: value.astype(self.dtypes[name]) for name, value in
                model_inputs(coord, types, cell, self.info, n_local).items()}

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The raw outputs for contract-v1 feeds, checked first (a host that builds its own tables calls this)."""
        check_feeds(feeds, self.info, self.dtypes)
        return dict(zip(OUTPUTS, self.session.run(list(OUTPUTS), feeds), strict=True))


def check_feeds(feeds: dict[str, np.ndarray], info: ModelInfo, dtypes: dict[str, np.dtype]) -> None:
    """Raise a Dpa3OnnxError naming the first feed that breaks the contract (names, dtypes, shapes, ranges)."""
    missing, unknown = set(INPUTS) - set(feeds), set(feeds) - set(INPUTS)
    if missing or unknown:
        raise Dpa3OnnxError(f"the inputs must be exactly {list(INPUTS)}; missing {sorted(missing)}, unknown {sorted(unknown)}")
    sizes: dict[str, int] = {}
    for name, (shape, _) in INPUTS.items():
        value, dtype = feeds[name], dtypes[name]
        if not isinstance(value, np.ndarray) or value.dtype != dtype:
            got = value.dtype if isinstance(value, np.ndarray) else type(value).__name__
            raise Dpa3OnnxError(f"input {name} must be a numpy array of {np.dtype(dtype).name}, got {got}")
        if value.ndim != len(shape):
            raise Dpa3OnnxError(f"input {name} must have shape {list(shape)}, got {list(value.shape)}")
        for symbol, size in zip(shape, value.shape, strict=True):
            expected = sizes.setdefault(symbol, size) if isinstance(symbol, str) else symbol
            if size != expected:
                raise Dpa3OnnxError(f"input {name} has shape {list(value.shape)}, expected {list(shape)} with "
                                    f"{', '.join(f'{k}={v}' for k, v in sizes.items())}")
    n_atoms, width = sizes["N"], sizes["M"]
    if n_atoms == 0:
        raise Dpa3OnnxError("the structure has no atoms")
    if sizes["K"] > width:
        raise Dpa3OnnxError(f"angle_mask has K = {sizes['K']} columns, more than the M = {width} of the neighbour table")
    if not 0 <= feeds["n_local"] <= n_atoms:
        raise Dpa3OnnxError(f"n_local = {feeds['n_local']} is not between 0 and N = {n_atoms}")
    if ((feeds["types"] < 0) | (feeds["types"] >= len(info.type_map))).any():
        raise Dpa3OnnxError(f"types must be indices 0..{len(info.type_map) - 1} into the type map {list(info.type_map)}")
    if ((feeds["neighbors"] < 0) | (feeds["neighbors"] >= n_atoms)).any():
        raise Dpa3OnnxError(f"neighbors must be atom indices 0..{n_atoms - 1}, also in masked cells")
    if ((feeds["reverse_neighbors"] < -1) | (feeds["reverse_neighbors"] >= n_atoms * width)).any():
        raise Dpa3OnnxError(f"reverse_neighbors must be flat cells 0..{n_atoms * width - 1} or -1")
    if not np.isfinite(feeds["positions"]).all() or not np.isfinite(feeds["neighbor_shift"]).all():
        raise Dpa3OnnxError("positions and neighbor_shift must be finite")

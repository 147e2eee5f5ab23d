"""ONNX export: the model, its forces and its virial as one onnxruntime graph (first version).

The exported function is `model.energy_forces_virial` itself, traced by jax2onnx with symbolic sizes
(N atoms, M neighbour-table width, K angle neighbours), so one file serves every system size. Inputs are
the arrays of a single-frame `Graph` (neighbors.py), unpadded; integer arrays are int64 (jax2onnx mixes
int32 index arithmetic with int64 constants otherwise, which onnxruntime refuses):

    positions [N, 3] f64, types [N] i64, neighbors [N, M] i64, neighbor_shift [N, M, 3] f64,
    neighbor_mask [N, M] bool, angle_mask [N, K] bool
    -> energy [1] f64, atom_energy [N] f64, forces [N, 3] f64, virial [1, 3, 3] f64

The model config (type map, cutoffs, selection sizes) is stored as JSON in the file's metadata under
"dpa3_config", which is all a client needs to build the inputs. onnxruntime's CPU ScatterND(add) races
with more than one intra-op thread (../shared/docs/onnx_export_notes.md), so the client uses one.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dpa3_ref.config import DPA3Config
from dpa3_ref.errors import Dpa3Error
from dpa3_ref.model import energy_forces_virial
from dpa3_ref.neighbors import Graph, build_graph
from dpa3_ref.potential import Potential

INPUTS = {  # name -> (symbolic shape, dtype)
    "positions": (("N", 3), jnp.float64),
    "types": (("N",), jnp.int64),
    "neighbors": (("N", "M"), jnp.int64),
    "neighbor_shift": (("N", "M", 3), jnp.float64),
    "neighbor_mask": (("N", "M"), jnp.bool_),
    "angle_mask": (("N", "K"), jnp.bool_),
}
OUTPUTS = ("energy", "atom_energy", "forces", "virial")


def _need_onnx():
    try:
        import jax2onnx
        import onnx
        import onnxruntime
    except ImportError as error:
        raise Dpa3Error(f"ONNX support needs the export extra: pip install 'dpa3-ref[export]' ({error})") from None
    return jax2onnx, onnx, onnxruntime


def export_onnx(potential: Potential, path: str | Path) -> None:
    """Write `potential` as an ONNX file computing energy, per-atom energy, forces and virial."""
    jax2onnx, onnx, _ = _need_onnx()
    model = potential.model

    def energy_forces_virial_of_arrays(*arrays):
        graph = Graph(**dict(zip(INPUTS, arrays, strict=True)), atom_frame=jnp.zeros_like(arrays[1]), n_frames=1)
        out = energy_forces_virial(model, graph)
        return tuple(out[name] for name in OUTPUTS)

    import logging

    logging.getLogger("onnx_ir").setLevel(logging.ERROR)  # per-constant "value type not known" chatter
    specs = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in INPUTS.values()]
    proto = jax2onnx.to_onnx(energy_forces_virial_of_arrays, specs, input_names=list(INPUTS),
                             output_names=list(OUTPUTS), enable_double_precision=True)
    entry = proto.metadata_props.add()
    entry.key, entry.value = "dpa3_config", model.config.to_json()
    onnx.save(proto, str(path))


class OnnxPotential:
    """An exported model run by onnxruntime, with the same `evaluate` as `Potential`."""

    def __init__(self, path: str | Path, providers: list[str] | None = None):
        _, onnx, onnxruntime = _need_onnx()
        path = Path(path)
        if not path.exists():
            raise Dpa3Error(f"ONNX file {path} does not exist")
        metadata = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        if "dpa3_config" not in metadata:
            raise Dpa3Error(f"{path}: not a dpa3-ref ONNX export (no 'dpa3_config' metadata)")
        self.config = DPA3Config.from_json(metadata["dpa3_config"])
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1  # ScatterND(add) races on more threads (see module docstring)
        options.log_severity_level = 3  # errors only
        self.session = onnxruntime.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])

    @property
    def type_map(self) -> list[str]:
        return list(self.config.type_map)

    def evaluate(self, coord, types, cell=None) -> dict[str, np.ndarray]:
        types = self.config.type_indices(types)
        graph = build_graph(np.asarray(coord, dtype=np.float64), types, None if cell is None else np.asarray(cell),
                            self.config, pad=False)
        feeds = {}
        for name in INPUTS:
            value = np.asarray(getattr(graph, name))
            feeds[name] = value.astype(np.int64) if value.dtype.kind in "iu" else value
        energy, atom_energy, forces, virial = self.session.run(list(OUTPUTS), feeds)
        return {"energy": energy[0], "atom_energy": atom_energy, "forces": forces, "virial": virial[0]}


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="deepmd-kit .dp/.yaml model or dpa3-ref checkpoint")
    parser.add_argument("--out", required=True, help="output .onnx file")


def run(args) -> int:
    from dpa3_ref.potential import load

    export_onnx(load(args.model), args.out)
    print(f"wrote {args.out}")
    return 0

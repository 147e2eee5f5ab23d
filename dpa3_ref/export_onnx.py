"""ONNX export, contract version 1: the model, its forces and its virial as one onnxruntime graph.

The exported function is `model.energy_forces_virial` itself, traced by jax2onnx with symbolic sizes
(N atoms, M neighbour-table width, K angle neighbours, R reverse-table width), so one file serves every
system size. The contract — inputs, outputs, the selection rule, ghost atoms, metadata — is written down in
export/README.md; export/dpa3_onnx is a client that needs no JAX. In short:

    positions [N, 3] f, types [N] i64, n_local [] i64, neighbors [N, M] i64, neighbor_shift [N, M, 3] f,
    neighbor_mask [N, M] bool, angle_mask [N, K] bool, reverse_neighbors [N, R] i64
    -> energy [1] f, atom_energy [N] f, forces [N, 3] f, virial [1, 3, 3] f     (f: float64, or float32)

Atoms n_local … N−1 are ghosts (a host code's halo): their energy does not count, their forces are returned.
`reverse_neighbors` makes every transpose of the neighbour gather a gather and an axis sum (gather.py), so
the graph holds no scatter-add and runs correctly, and bit-identically, on any number of threads. A float32
export (descriptor and fitting net in float32) is float32 throughout, its float inputs and outputs included:
jax2onnx's float64 mode makes every float a float64. Coordinates are then rounded before the edge vectors are
formed, as deepmd-kit's float32 models do. A model with mixed precisions is exported in float64. Integer inputs
are int64 (jax2onnx mixes int32 index arithmetic with int64 constants otherwise, which onnxruntime refuses).
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp

from dpa3_ref.errors import Dpa3Error
from dpa3_ref.model import cast_model, energy_forces_virial
from dpa3_ref.neighbors import Graph
from dpa3_ref.potential import Potential

CONTRACT_VERSION = 1
INPUTS = {  # name -> (symbolic shape, dtype); float64 means the file's float type
    "positions": (("N", 3), jnp.float64),
    "types": (("N",), jnp.int64),
    "n_local": ((), jnp.int64),
    "neighbors": (("N", "M"), jnp.int64),
    "neighbor_shift": (("N", "M", 3), jnp.float64),
    "neighbor_mask": (("N", "M"), jnp.bool_),
    "angle_mask": (("N", "K"), jnp.bool_),
    "reverse_neighbors": (("N", "R"), jnp.int64),
}
OUTPUTS = ("energy", "atom_energy", "forces", "virial")
SCATTER_OPS = ("ScatterND", "ScatterElements", "Scatter")  # must not appear: see gather.py


def missing_export_packages() -> list[str]:
    """The packages of the export extra (pip install 'dpa3-ref[export]') that are not installed."""
    return [name for name in ("jax2onnx", "onnx", "onnxruntime") if importlib.util.find_spec(name) is None]


def _need_onnx():
    try:
        import jax2onnx
        import onnx
    except ImportError as error:
        raise Dpa3Error(f"ONNX export needs the export extra: pip install 'dpa3-ref[export]' ({error})") from None
    return jax2onnx, onnx


def metadata(config, head: str) -> dict[str, str]:
    """The file's metadata_props: what a client needs to build the inputs, as strings (export/README.md)."""
    return {
        "dpa3_contract_version": str(CONTRACT_VERSION),
        "dpa3_type_map": json.dumps(list(config.type_map)),
        "dpa3_e_rcut": repr(float(config.e_rcut)),
        "dpa3_a_rcut": repr(float(config.a_rcut)),
        "dpa3_e_sel": str(config.e_sel),
        "dpa3_a_sel": str(config.a_sel),
        "dpa3_nlayers": str(config.nlayers),
        "dpa3_exclude_types": json.dumps([list(pair) for pair in config.exclude_types]),
        "dpa3_precision": float_type(config),
        "dpa3_head": head,
        "dpa3_config": config.to_json(),
    }


def float_type(config) -> str:
    """The float type of a file: float32 if the whole network is float32, else float64."""
    return "float32" if config.precision == config.fitting_precision == "float32" else "float64"


def export_onnx(potential: Potential, path: str | Path, *, precision: str | None = None, head: str = "") -> None:
    """Write `potential` as an ONNX file computing energy, per-atom energy, forces and virial (contract v1).

    precision: "float32" or "float64" to cast the model first (default: as it is); head: the name recorded
    in the metadata for a head of a multitask model ("" for a single-task one)."""
    jax2onnx, onnx = _need_onnx()
    model = potential.model if precision is None else cast_model(potential.model, precision)

    def energy_forces_virial_of_arrays(positions, types, n_local, neighbors, neighbor_shift, neighbor_mask,
                                       angle_mask, reverse_neighbors):
        index = jnp.cumsum(jnp.ones_like(types)) - 1  # 0 … N−1 (jnp.arange fails on a symbolic N)
        graph = Graph(positions=positions, types=types, atom_frame=jnp.zeros_like(types), neighbors=neighbors,
                      neighbor_shift=neighbor_shift, neighbor_mask=neighbor_mask, angle_mask=angle_mask,
                      local=index < n_local, reverse_neighbors=reverse_neighbors)
        out = energy_forces_virial(model, graph)
        return tuple(out[name] for name in OUTPUTS)

    logging.getLogger("onnx_ir").setLevel(logging.ERROR)  # per-constant "value type not known" chatter
    double = float_type(model.config) == "float64"
    specs = [jax.ShapeDtypeStruct(shape, dtype if double or dtype != jnp.float64 else jnp.float32)
             for shape, dtype in INPUTS.values()]
    proto = jax2onnx.to_onnx(energy_forces_virial_of_arrays, specs, input_names=list(INPUTS),
                             output_names=list(OUTPUTS), enable_double_precision=double)
    scatters = sorted({node.op_type for node in proto.graph.node if node.op_type in SCATTER_OPS})
    if scatters:  # a new gather somewhere in the model whose transpose bypasses gather.py
        raise Dpa3Error(f"internal error: the exported graph contains {scatters}, which race on several threads")
    for key, value in metadata(model.config, head).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="deepmd-kit .dp/.yaml model or dpa3-ref checkpoint")
    parser.add_argument("--out", required=True, help="output .onnx file")
    parser.add_argument("--precision", choices=("float32", "float64"),
                        help="precision of the network in the file (default: the model's own)")
    parser.add_argument("--head", help="the head to export from a multitask model file")


def run(args) -> int:
    from dpa3_ref.potential import load

    out = Path(args.out)
    if not out.parent.is_dir():
        raise Dpa3Error(f"{out}: directory {out.parent} does not exist")
    potential = load(args.model) if args.head is None else load(args.model, head=args.head)
    export_onnx(potential, out, precision=args.precision, head=args.head or "")
    print(f"wrote {out} (ONNX contract v{CONTRACT_VERSION}, {potential.config.type_map}, "
          f"{args.precision or potential.config.precision})")
    return 0

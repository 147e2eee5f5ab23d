"""Import official DPA3 models serialized by deepmd-kit (`.dp` HDF5 or `.yaml`), spec §12.

deepmd-kit's `serialize()` gives a tree of dicts; every layer is a "Layer" dict whose `@variables` hold
`w` [n_in, n_out] (input-major, like ours: no transposes anywhere), `b` [n_out] or None and `idt` or None.
The map from that tree to our pytree, stated once:

  official path                                              ours                         shape
  model/@variables/out_bias                                  model.out_bias               (1, ntypes, 1) -> [ntypes]
  descriptor/type_embedding/embedding/layers[0]              descriptor.type_embedding    w (ntypes, n)
  descriptor/repflow_variable/edge_embd                      descriptor.edge_embedding    w (1, e), b (e)
  descriptor/repflow_variable/angle_embd                     descriptor.angle_embedding   w (1, a), no b
  descriptor/repflow_variable/@variables/{davg,dstd}         descriptor.{davg,dstd}       (ntypes, e_sel, 4)
  .../repflow_layers[l]/node_self_mlp                        layers[l].node_self          (n, n)
  .../repflow_layers[l]/node_sym_linear                      layers[l].node_sym           (A(e+n), n): rows [edge; node]
  .../repflow_layers[l]/node_edge_linear                     layers[l].node_edge_message  (2n+e, Hn): rows [n_i; n_j; e_ij]
  .../repflow_layers[l]/edge_self_linear                     layers[l].edge_self          (2n+e, e): rows [n_i; n_j; e_ij]
  .../repflow_layers[l]/edge_angle_linear1                   layers[l].edge_angle_1       (D_a, e): rows [a; ñ_i; ẽ_ik; ẽ_ij]
  .../repflow_layers[l]/edge_angle_linear2                   layers[l].edge_angle_2       (e, e)
  .../repflow_layers[l]/angle_self_linear                    layers[l].angle_self         (D_a, a): rows as edge_angle_linear1
  .../repflow_layers[l]/a_compress_{n,e}_linear              layers[l].angle_compress_{node,edge}   (no bias)
  .../repflow_layers[l]/@variables/{n,e,a}_residual[k]       layers[l].{node,edge,angle}_residual[k]
  fitting/nets/networks[0]/layers[k]                         fitting.layers[k]            hidden: w, b, idt; last: linear
  fitting/@variables/bias_atom_e                             fitting.bias_atom_e          (ntypes, 1) -> [ntypes]
  fitting/@variables/case_embd                               fitting.case_embd            (dim_case_embd,) or None

Every array's shape is checked against the architecture the config implies, and our model is built
from the config first, so an array that is missing or misplaced fails loudly with its path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from dpa3_ref.config import DPA3Config
from dpa3_ref.errors import Dpa3Error
from dpa3_ref.model import DPA3Model, init_model
from dpa3_ref.nn import Layer


def load_official(path: str | Path) -> DPA3Model:
    """An official deepmd-kit DPA3 model file (`.dp` or `.yaml`) as our model."""
    path = Path(path)
    if not path.exists():
        raise Dpa3Error(f"model file {path} does not exist")
    if path.suffix == ".dp":
        data = read_dp(path)
    elif path.suffix in (".yaml", ".yml"):
        data = read_yaml(path)
    else:
        raise Dpa3Error(f"{path}: not a deepmd-kit model file (expected .dp or .yaml)")
    try:
        return model_from_dict(data)
    except Dpa3Error as error:
        raise Dpa3Error(f"{path}: {error}") from None


def read_dp(path: Path) -> dict[str, Any]:
    """deepmd-kit's HDF5 format: root attribute "json" holds the tree, arrays are datasets /variable_NNNN."""
    import h5py

    try:
        with h5py.File(path, "r") as h5:
            tree = json.loads(h5.attrs["json"])
            return _resolve(tree, lambda ref: np.asarray(h5[ref]) if ref in h5 else ref)
    except (OSError, KeyError, json.JSONDecodeError) as error:
        raise Dpa3Error(f"{path}: not a deepmd-kit .dp model ({error})") from None


def read_yaml(path: Path) -> dict[str, Any]:
    """deepmd-kit's YAML format: arrays inline as {"@class": "np.ndarray", "dtype", "value"}."""
    import yaml

    try:
        with open(path) as stream:
            tree = yaml.safe_load(stream)
    except yaml.YAMLError as error:
        raise Dpa3Error(f"{path}: not a valid YAML file ({error})") from None
    if not isinstance(tree, dict):
        raise Dpa3Error(f"{path}: not a deepmd-kit model (top level is not a mapping)")
    return _resolve(tree, lambda ref: ref)


def _resolve(tree: Any, dataset) -> Any:
    """Replace array placeholders (dataset paths or inline ndarray dicts) by numpy arrays."""
    if isinstance(tree, dict):
        if tree.get("@class") == "np.ndarray":
            return np.asarray(tree["value"], dtype=tree["dtype"])
        return {k: _resolve(v, dataset) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_resolve(v, dataset) for v in tree]
    if isinstance(tree, str) and tree.startswith("/variable_"):
        return dataset(tree)
    return tree


def model_from_dict(data: dict[str, Any]) -> DPA3Model:
    """Our model from a deepmd-kit serialized model (a file's top-level dict or its "model" section)."""
    model = data.get("model", data)
    if not isinstance(model, dict) or "descriptor" not in model:
        raise Dpa3Error("not a deepmd-kit model: no 'model'/'descriptor' entry")
    config = DPA3Config.from_deepmd(model)
    skeleton = eqx.filter_eval_shape(init_model, config, key=jax.random.key(0))  # shapes only
    descriptor = model["descriptor"]
    repflow = descriptor["repflow_variable"]
    fitting = model["fitting"]
    dtype, fitting_dtype = skeleton.descriptor.dtype, skeleton.fitting.dtype

    def layer(target: Layer | None, source: dict[str, Any] | None, where: str, dt=dtype) -> Layer | None:
        if target is None:
            if source is not None:
                raise Dpa3Error(f"{where}: present in the file but not expected by the config")
            return None
        if source is None:
            raise Dpa3Error(f"{where}: missing from the file")
        weights = source["@variables"]
        bias, timestep = weights.get("b"), weights.get("idt")
        if (bias is None) != (target.bias is None):
            raise Dpa3Error(f"{where}: bias {'missing' if bias is None else 'unexpected'}")
        return Layer(
            weight=_array(weights["w"], target.weight.shape, f"{where}/w", dt),
            bias=None if bias is None else _array(bias, target.bias.shape, f"{where}/b", dt),
            timestep=None if timestep is None else _array(timestep, (target.n_out,), f"{where}/idt", dt),
            activation=target.activation,
            residual=bool(source.get("resnet", False)) and target.residual,
        )

    layers = []
    official_layers = repflow["repflow_layers"]
    if len(official_layers) != config.nlayers:
        raise Dpa3Error(f"descriptor has {len(official_layers)} repflow layers, config says {config.nlayers}")
    for index, (ours, theirs) in enumerate(zip(skeleton.descriptor.layers, official_layers, strict=True)):
        where = f"descriptor/repflow_variable/repflow_layers[{index}]"
        residuals = theirs.get("@variables", {})

        def vectors(name, target, where=where, residuals=residuals):
            found = residuals.get(name) or []
            if len(found) != len(target):
                raise Dpa3Error(f"{where}/@variables/{name}: {len(found)} vectors, expected {len(target)}")
            return [_array(v, t.shape, f"{where}/@variables/{name}[{k}]", dtype) for k, (v, t) in
                    enumerate(zip(found, target, strict=True))]

        layers.append(ours.__class__(
            node_self=layer(ours.node_self, theirs.get("node_self_mlp"), f"{where}/node_self_mlp"),
            node_sym=layer(ours.node_sym, theirs.get("node_sym_linear"), f"{where}/node_sym_linear"),
            node_edge_message=layer(ours.node_edge_message, theirs.get("node_edge_linear"), f"{where}/node_edge_linear"),
            edge_self=layer(ours.edge_self, theirs.get("edge_self_linear"), f"{where}/edge_self_linear"),
            edge_angle_1=layer(ours.edge_angle_1, theirs.get("edge_angle_linear1"), f"{where}/edge_angle_linear1"),
            edge_angle_2=layer(ours.edge_angle_2, theirs.get("edge_angle_linear2"), f"{where}/edge_angle_linear2"),
            angle_self=layer(ours.angle_self, theirs.get("angle_self_linear"), f"{where}/angle_self_linear"),
            angle_compress_node=layer(ours.angle_compress_node, theirs.get("a_compress_n_linear"),
                                      f"{where}/a_compress_n_linear"),
            angle_compress_edge=layer(ours.angle_compress_edge, theirs.get("a_compress_e_linear"),
                                      f"{where}/a_compress_e_linear"),
            node_residual=vectors("n_residual", ours.node_residual),
            edge_residual=vectors("e_residual", ours.edge_residual),
            angle_residual=vectors("a_residual", ours.angle_residual),
            config=config,
        ))

    ours_d = skeleton.descriptor
    statistics = repflow["@variables"]
    tebd_layers = descriptor["type_embedding"]["embedding"]["layers"]
    if len(tebd_layers) != 1:
        raise Dpa3Error(f"type embedding has {len(tebd_layers)} layers, DPA3 has one")
    new_descriptor = ours_d.__class__(
        type_embedding=layer(ours_d.type_embedding, tebd_layers[0], "descriptor/type_embedding/embedding/layers[0]"),
        edge_embedding=layer(ours_d.edge_embedding, repflow["edge_embd"], "descriptor/repflow_variable/edge_embd"),
        angle_embedding=layer(ours_d.angle_embedding, repflow["angle_embd"], "descriptor/repflow_variable/angle_embd"),
        layers=layers,
        davg=_array(statistics["davg"], ours_d.davg.shape, "descriptor/repflow_variable/@variables/davg", dtype),
        dstd=_array(statistics["dstd"], ours_d.dstd.shape, "descriptor/repflow_variable/@variables/dstd", dtype),
        config=config,
    )

    networks = fitting["nets"]["networks"]
    if len(networks) != 1:
        raise Dpa3Error(f"fitting has {len(networks)} networks; DPA3 (mixed types) has one")
    fitting_layers = networks[0]["layers"]
    ours_f = skeleton.fitting
    if len(fitting_layers) != len(ours_f.layers):
        raise Dpa3Error(f"fitting has {len(fitting_layers)} layers, config implies {len(ours_f.layers)}")
    fitting_vars = fitting["@variables"]
    case = fitting_vars.get("case_embd")
    new_fitting = ours_f.__class__(
        layers=[layer(t, s, f"fitting/nets/networks[0]/layers[{k}]", fitting_dtype)
                for k, (t, s) in enumerate(zip(ours_f.layers, fitting_layers, strict=True))],
        bias_atom_e=_array(fitting_vars["bias_atom_e"], (config.ntypes, 1), "fitting/@variables/bias_atom_e",
                           jnp.float64).reshape(-1),
        case_embd=jnp.zeros(ours_f.case_embd.shape, fitting_dtype) if case is None else _array(case, ours_f.case_embd.shape,
                                                                "fitting/@variables/case_embd", fitting_dtype),
    )
    out_bias = model.get("@variables", {}).get("out_bias")
    out_bias = (jnp.zeros(config.ntypes, jnp.float64) if out_bias is None else
                _array(out_bias, (1, config.ntypes, 1), "@variables/out_bias", jnp.float64).reshape(-1))
    return DPA3Model(descriptor=new_descriptor, fitting=new_fitting, out_bias=out_bias, config=config)


def _array(value: Any, shape: tuple[int, ...], where: str, dtype) -> jax.Array:
    if value is None:
        raise Dpa3Error(f"{where}: missing from the file")
    array = np.asarray(value)
    if array.shape != tuple(shape):
        raise Dpa3Error(f"{where}: shape {array.shape}, expected {tuple(shape)}")
    return jnp.asarray(array, dtype=dtype)

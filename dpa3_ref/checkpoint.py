"""Our own model files: one `.npz` with the configuration as JSON and every array under its pytree path.

A single model (one DPA3 energy model):

    __format__   "dpa3-ref/1"
    __config__   DPA3Config.to_json()
    <path>       e.g. "descriptor.layers[0].node_self.weight" -> array

A multitask model (several heads over shared components, multitask.py):

    __format__   "dpa3-ref-multitask/1"
    __heads__    JSON list of heads: name, component keys, dataset index, full model config
    <path>       e.g. "descriptors['shared'].layers[0].node_self.weight", "out_bias['water']"

Readable with plain numpy (no pickle), written atomically (temporary file + rename, so a crash never
leaves a half-written model), and loaded by rebuilding the architecture from the config and filling
it leaf by leaf, with each name and shape checked.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from dpa3_ref.config import DPA3Config
from dpa3_ref.errors import Dpa3Error
from dpa3_ref.model import DPA3Model, init_model
from dpa3_ref.multitask import Head, MultiTaskModel, init_multitask

FORMAT = "dpa3-ref/1"
MULTITASK_FORMAT = "dpa3-ref-multitask/1"
TRAINING_CHECKPOINT_FORMAT = "dpa3-ref-train/1"  # train.py's checkpoints: the model under "model/", and more


def leaves_by_name(tree) -> dict[str, jax.Array]:
    """Every array of a pytree under its path, e.g. "descriptor.layers[0].node_self.weight"."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path).lstrip("."): leaf for path, leaf in flat}


def save_model(model: DPA3Model | MultiTaskModel, path: str | Path) -> None:
    """Write a single or multitask model atomically to `path`."""
    arrays = {name: np.asarray(leaf) for name, leaf in leaves_by_name(model).items()}
    if isinstance(model, MultiTaskModel):
        arrays["__format__"] = np.asarray(MULTITASK_FORMAT)
        arrays["__heads__"] = np.asarray(json.dumps([head.to_dict() for head in model.heads]))
    else:
        arrays["__format__"] = np.asarray(FORMAT)
        arrays["__config__"] = np.asarray(model.config.to_json())
    write_npz(path, arrays)


def write_npz(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez, atomically: a temporary file in the same folder, then a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            np.savez(stream, **arrays)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load_model(path: str | Path) -> DPA3Model | MultiTaskModel:
    """A single model (DPA3Model) or a multitask model (MultiTaskModel) from our model file, or the model of
    a training checkpoint (model.ckpt-N.npz), as deepmd-kit's commands accept its checkpoints."""
    path = Path(path)
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise Dpa3Error(f"{path}: not a dpa3-ref model file ({error})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):  # a single .npy array
        raise Dpa3Error(f"{path}: not a dpa3-ref model file or training checkpoint (one array, not an .npz archive)")
    with data:
        kind = str(data["__format__"]) if "__format__" in data else None
        meta = json.loads(str(data["__meta__"])) if "__meta__" in data else {}
        if meta.get("format") == TRAINING_CHECKPOINT_FORMAT:  # a training checkpoint: its model, as dp test -m ckpt
            heads = tuple(Head.from_dict(head) for head in meta["heads"])
            skeleton = eqx.filter_eval_shape(init_multitask, heads, key=jax.random.key(0))
            model = fill_like(skeleton, data, path, prefix="model/")
            return model.head(heads[0].name) if len(heads) == 1 else model  # as train.py's final model
        if kind == FORMAT:
            config = DPA3Config.from_json(str(data["__config__"]))
            skeleton = eqx.filter_eval_shape(init_model, config, key=jax.random.key(0))  # shapes only
        elif kind == MULTITASK_FORMAT:
            heads = tuple(Head.from_dict(head) for head in json.loads(str(data["__heads__"])))
            skeleton = eqx.filter_eval_shape(init_multitask, heads, key=jax.random.key(0))
        else:
            raise Dpa3Error(f"{path}: not a dpa3-ref model file or training checkpoint (no '{FORMAT}', "
                            f"'{MULTITASK_FORMAT}' or '{TRAINING_CHECKPOINT_FORMAT}' marker)")
        return fill_like(skeleton, data, path)


def fill_like(skeleton, arrays, source: str | Path, prefix: str = ""):
    """`skeleton` (a pytree of shapes) with every leaf read from `arrays[prefix + its path]`, shapes checked."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(skeleton)
    leaves = []
    for key_path, target in flat:
        name = prefix + jax.tree_util.keystr(key_path).lstrip(".")
        if name not in arrays:
            raise Dpa3Error(f"{source}: array {name!r} is missing")
        value = arrays[name]
        if value.shape != target.shape:
            raise Dpa3Error(f"{source}: array {name!r} has shape {value.shape}, expected {target.shape}")
        leaves.append(jnp.asarray(value, dtype=target.dtype))
    return jax.tree_util.tree_unflatten(treedef, leaves)


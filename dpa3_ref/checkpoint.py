"""Our own model file: one `.npz` with the config as JSON and every array under its pytree path.

    __format__   "dpa3-ref/1"
    __config__   DPA3Config.to_json()
    <path>       e.g. "descriptor.layers[0].node_self.weight" -> array

Readable with plain numpy (no pickle), written atomically (temporary file + rename, so a crash never
leaves a half-written model), and loaded by rebuilding the architecture from the config and filling
it leaf by leaf, with each name and shape checked.
"""

from __future__ import annotations

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

FORMAT = "dpa3-ref/1"


def _leaves_by_name(model: DPA3Model) -> dict[str, jax.Array]:
    flat, _ = jax.tree_util.tree_flatten_with_path(model)
    return {jax.tree_util.keystr(path).lstrip("."): leaf for path, leaf in flat}


def save_model(model: DPA3Model, path: str | Path) -> None:
    """Write `model` atomically to `path`."""
    path = Path(path)
    arrays = {name: np.asarray(leaf) for name, leaf in _leaves_by_name(model).items()}
    arrays["__format__"] = np.asarray(FORMAT)
    arrays["__config__"] = np.asarray(model.config.to_json())
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            np.savez(stream, **arrays)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load_model(path: str | Path) -> DPA3Model:
    path = Path(path)
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise Dpa3Error(f"{path}: not a dpa3-ref model file ({error})") from None
    with data:
        if "__format__" not in data or str(data["__format__"]) != FORMAT:
            raise Dpa3Error(f"{path}: not a dpa3-ref model file (no '{FORMAT}' marker)")
        config = DPA3Config.from_json(str(data["__config__"]))
        skeleton = eqx.filter_eval_shape(init_model, config, key=jax.random.key(0))  # shapes only
        flat, treedef = jax.tree_util.tree_flatten_with_path(skeleton)
        leaves = []
        for key_path, target in flat:
            name = jax.tree_util.keystr(key_path).lstrip(".")
            if name not in data:
                raise Dpa3Error(f"{path}: array {name!r} is missing")
            value = data[name]
            if value.shape != target.shape:
                raise Dpa3Error(f"{path}: array {name!r} has shape {value.shape}, expected {target.shape}")
            leaves.append(jnp.asarray(value, dtype=target.dtype))
    return jax.tree_util.tree_unflatten(treedef, leaves)


"""The user-facing API: load a model, evaluate structures, get numpy arrays back.

    potential = dpa3_ref.load("model.dp")            # official .dp/.yaml or our own .npz checkpoint
    out = potential.evaluate(coord, ["O", "H", "H"], cell)   # cell=None: open boundaries
    out["energy"], out["atom_energy"], out["forces"], out["virial"]

Inputs are checked here, at the boundary, with messages that name the atom or array at fault. The
neighbour list is built on the host (numpy/vesin); the model runs as one compiled XLA function per
size bucket (atoms and table widths padded, see neighbors.py), reused for every later frame that fits.
The table widths only grow: a frame is padded to the widest table this potential has seen for its atom
bucket, so that an MD run does not recompile whenever the largest neighbour count dips below a multiple of 8.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from dpa3_ref.config import DPA3Config
from dpa3_ref.errors import Dpa3Error
from dpa3_ref.model import DPA3Model, energy_forces_virial, init_model
from dpa3_ref.neighbors import Graph, batch_graphs, build_graph, pad_graph, pad_to_buckets

_compiled_energy_forces_virial = eqx.filter_jit(energy_forces_virial)


class Potential:
    """A DPA3 model ready to evaluate structures."""

    def __init__(self, model: DPA3Model):
        self.model = model
        self._table_widths: dict[int, tuple[int, int]] = {}  # atom bucket -> widest (M, K) used so far

    @classmethod
    def init(cls, config: DPA3Config, seed: int = 0) -> Potential:
        """A randomly initialised model (deepmd-kit's initialisation)."""
        return cls(init_model(config, key=jax.random.key(seed)))

    @property
    def config(self) -> DPA3Config:
        return self.model.config

    @property
    def type_map(self) -> list[str]:
        return list(self.model.config.type_map)

    def type_indices(self, types: Sequence[str] | Sequence[int] | np.ndarray) -> np.ndarray:
        """Element names or model type indices -> model type indices, by name."""
        return self.config.type_indices(types)

    def graph(self, coord, types, cell=None, *, pad: bool = True) -> Graph:
        """The (by default bucket-padded) graph of one structure."""
        coord = np.asarray(coord, dtype=np.float64)
        cell = None if cell is None else np.asarray(cell)
        return build_graph(coord, self.type_indices(types), cell, self.config, pad=pad)

    def evaluate(self, coord, types, cell=None, case_embd: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Energy (eV), per-atom energy, forces (eV/Å) and virial (eV, deepmd convention) of one structure.

        coord [n, 3] Å; types: n element names or model type indices; cell [3, 3] with lattice vectors
        as rows, or None for open boundaries; case_embd: the dataset one-hot (default: the model's).
        """
        return self.evaluate_batch([(coord, types, cell)], case_embd)[0]

    def evaluate_batch(self, structures: Sequence[tuple], case_embd: np.ndarray | None = None) -> list[dict[str, np.ndarray]]:
        """`evaluate` for several (coord, types, cell) structures in one call (one graph, frames side by side)."""
        graphs = [self.graph(coord, types, cell, pad=False) for coord, types, cell in structures]
        graph = self._sticky_widths(pad_to_buckets(batch_graphs(graphs), self.config))
        out = _compiled_energy_forces_virial(self.model, graph, None if case_embd is None else jnp.asarray(case_embd))
        results, start = [], 0
        for frame, g in enumerate(graphs):
            atoms = slice(start, start + g.n_atoms)
            results.append({
                "energy": np.asarray(out["energy"][frame]),
                "atom_energy": np.asarray(out["atom_energy"][atoms]),
                "forces": np.asarray(out["forces"][atoms]),
                "virial": np.asarray(out["virial"][frame]),
            })
            start += g.n_atoms
        return results

    def _sticky_widths(self, graph: Graph) -> Graph:
        """Pad the tables to the widest seen for this atom bucket (one compilation instead of several)."""
        seen = self._table_widths.get(graph.n_atoms, (0, 0))
        widths = (max(seen[0], graph.max_neighbors), max(seen[1], graph.max_angle_neighbors))
        self._table_widths[graph.n_atoms] = widths
        return pad_graph(graph, graph.n_atoms, *widths)

    def cost_analysis(self, coord, types, cell=None) -> dict[str, Any]:
        """XLA's count of FLOPs and bytes accessed for energy + forces + virial of this structure."""
        graph = self.graph(coord, types, cell)
        compiled = jax.jit(energy_forces_virial).lower(self.model, graph, None).compile()
        analysis = compiled.cost_analysis()
        analysis = analysis[0] if isinstance(analysis, list) else analysis
        return {"flops": float(analysis.get("flops", 0.0)), "bytes accessed": float(analysis.get("bytes accessed", 0.0))}

    def save(self, path: str | Path) -> None:
        from dpa3_ref.checkpoint import save_model

        save_model(self.model, path)


def load(path: str | Path, head: str | None = None) -> Potential:
    """A model from an official deepmd-kit file (.dp, .yaml) or our own model file (.npz).

    A multitask model file holds several heads (one per training dataset): `head` picks one, and is
    required for such a file. For a single model, `head` may be None or "Default".
    """
    path = Path(path)
    if not path.exists():
        raise Dpa3Error(f"model file {path} does not exist")
    if path.suffix in (".dp", ".yaml", ".yml"):
        from dpa3_ref.official import load_official

        model = load_official(path)
    elif path.suffix == ".npz":
        from dpa3_ref.checkpoint import load_model

        model = load_model(path)
    else:
        raise Dpa3Error(f"{path}: unknown model file type {path.suffix!r} (expected .dp, .yaml or .npz)")
    return Potential(select_head(model, head, path))


def select_head(model, head: str | None, source: str | Path) -> DPA3Model:
    """The head `head` of a multitask model, or a single model itself (when head is None or "Default")."""
    from dpa3_ref.multitask import SINGLE_TASK, MultiTaskModel

    if isinstance(model, MultiTaskModel):
        if head is None:
            raise Dpa3Error(f"{source} is a multitask model: choose a head with --head (or head=...), one of {model.head_names}")
        return model.head(head)
    if head not in (None, SINGLE_TASK):
        raise Dpa3Error(f"{source} is a single-task model without heads; it has no head {head!r}")
    return model

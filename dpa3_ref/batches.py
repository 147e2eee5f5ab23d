"""Training batches: how many frames, from which system, in which order — deepmd-kit's rules (PyTorch backend).

The rules are those of deepmd-kit 3.2.0's `deepmd/pt/utils/dataloader.py` (DpLoaderSet, get_weighted_sampler)
and `deepmd/utils/data_system.py` (process_sys_probs, prob_sys_size_ext); the numbers below are theirs.

Batch size of a system with n atom slots (`training_data.batch_size`; virtual atoms count, as in deepmd-kit):

    b                 an integer: every system b frames;  [b_1, b_2, ...]: one per system
    "auto"            "auto:32"
    "auto:N"          the smallest b with b·n ≥ N, i.e. ⌈N / n⌉
    "max:N"           the largest b with b·n ≤ N, at least 1

A batch holds frames of one system only. An epoch of system s is one pass over its frames in a fresh random
order, cut into ⌈n_frames / b⌉ batches: the last one is smaller when b does not divide n_frames (torch's
DataLoader with its default drop_last=False). That number of batches is also the system's weight:

    "prob_uniform"                    p_s = 1 / n_systems
    "prob_sys_size"                   p_s ∝ batches_s
    "prob_sys_size;a:b:w;c:d:v;..."   systems a ≤ s < b share w / (w + v + ...) in proportion to batches_s,
                                      and so on for every block; systems in no block are never drawn
    sys_probs [q_1, q_2, ...]         given; takes precedence over auto_prob. Entries q_s < 0 are "not
                                      assigned": they share 1 − Σ_{q ≥ 0} q in proportion to batches_s

The order (`Sampler`): every step draws a system s with probabilities p, then takes s's next batch from its
own epoch order. deepmd-kit does the same with torch's WeightedRandomSampler and one shuffling DataLoader
per system; we draw from explicit seeds instead, so that the state is a handful of integers and a restart
continues the very same sequence:

    system of draw k                  Generator(SeedSequence([seed, 0, k])).choice(n_systems, p=p)
    frame order of system s, epoch e  Generator(SeedSequence([seed, 1, s, e])).permutation(n_frames_s)

(The tags 0 and 1 keep the two streams apart: SeedSequence pads short entropy with zeros, so [seed, k] and
[seed, s, 0] would otherwise be the same seed for s = k.)

Validation (`validation_batches`) is deterministic: the first `numb_btch` batches of every system, frames in
file order. (deepmd-kit draws `numb_btch` random batches in all from the validation sampler; a fixed set makes
validation numbers comparable from one step to the next.)

`make_batch` turns the frames of one batch into one padded `Graph` (neighbors.py: the disjoint union of the
frames' graphs, padded to a bucket so that jit compiles once per bucket) and the matching `Labels`.
Virtual atoms (mixed-type layout) are left out of the graph; padding atoms have atom_mask 0.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import equinox as eqx
import jax
import numpy as np

from dpa3_ref.config import DPA3Config
from dpa3_ref.data import System
from dpa3_ref.errors import Dpa3Error
from dpa3_ref.neighbors import Graph, batch_graphs, build_graph, pad_graph, pad_to_buckets

AUTO_BATCH_ATOMS = 32  # deepmd-kit's "auto" = "auto:32"


# --------------------------------------------------------------------------- batch sizes and probabilities
def resolve_batch_size(batch_size: int | str, n_atoms: int) -> int:
    """Frames per batch for a system of `n_atoms` atom slots, from an int, "auto", "auto:N" or "max:N"."""
    if isinstance(batch_size, (int, np.integer)) and not isinstance(batch_size, bool):
        if batch_size < 1:
            raise Dpa3Error(f"batch_size must be at least 1, got {batch_size}")
        return int(batch_size)
    if not isinstance(batch_size, str):
        raise Dpa3Error(f"batch_size must be an integer, a list or a rule like 'auto:32', got {batch_size!r}")
    rule, _, atoms = batch_size.partition(":")
    if batch_size == "auto":
        atoms = str(AUTO_BATCH_ATOMS)
    if rule not in ("auto", "max") or not atoms.isdigit() or int(atoms) < 1:
        raise Dpa3Error(
            f"batch_size {batch_size!r} is not supported: use an integer, a list of integers, "
            "'auto', 'auto:N' or 'max:N' with N a positive integer"
        )
    if rule == "auto":
        return -(-int(atoms) // n_atoms)  # ⌈N / n⌉
    return max(int(atoms) // n_atoms, 1)


def resolve_batch_sizes(batch_size: int | str | Sequence[int], n_atoms: Sequence[int]) -> list[int]:
    """`resolve_batch_size` for every system; a list gives one batch size per system."""
    if isinstance(batch_size, (list, tuple)):
        if len(batch_size) != len(n_atoms):
            raise Dpa3Error(f"batch_size lists {len(batch_size)} sizes for {len(n_atoms)} systems")
        return [resolve_batch_size(size, n) for size, n in zip(batch_size, n_atoms, strict=True)]
    return [resolve_batch_size(batch_size, n) for n in n_atoms]


def batches_per_epoch(n_frames: int, batch_size: int) -> int:
    """⌈n_frames / batch_size⌉: the last batch of an epoch may be smaller (drop_last=False)."""
    return -(-n_frames // batch_size)


def system_probabilities(n_batches: Sequence[int], auto_prob: str = "prob_sys_size",
                         sys_probs: Sequence[float] | None = None) -> np.ndarray:
    """[n_systems] float64: the probability of drawing each system (rules in the module docstring)."""
    n_batches = np.asarray(n_batches, dtype=np.float64)
    if sys_probs is not None:
        return _assigned_probabilities(np.asarray(sys_probs, dtype=np.float64), n_batches)
    if auto_prob == "prob_uniform":
        return np.full(n_batches.size, 1.0 / n_batches.size)
    if auto_prob == "prob_sys_size":
        return n_batches / n_batches.sum()
    if auto_prob.startswith("prob_sys_size;"):
        return _block_probabilities(auto_prob, n_batches)
    raise Dpa3Error(f"auto_prob {auto_prob!r} is not one of 'prob_uniform', 'prob_sys_size', "
                    "'prob_sys_size;start:end:weight;...'")


def _assigned_probabilities(sys_probs: np.ndarray, n_batches: np.ndarray) -> np.ndarray:
    if sys_probs.shape != n_batches.shape:
        raise Dpa3Error(f"sys_probs has {sys_probs.size} entries for {n_batches.size} systems")
    assigned = sys_probs >= 0
    rest = 1.0 - sys_probs[assigned].sum()
    if rest < -1e-8:  # deepmd-kit's tolerance for rounding (its issue #1917)
        raise Dpa3Error(f"sys_probs assign {1 - rest:.6g} > 1 in total")
    probabilities = np.where(assigned, sys_probs, 0.0)
    if not np.isclose(rest, 0.0):
        if assigned.all():
            raise Dpa3Error(f"sys_probs sum to {1 - rest:.6g}, not 1, and no entry is negative (unassigned)")
        unassigned_batches = np.where(assigned, 0.0, n_batches)
        probabilities = probabilities + rest * unassigned_batches / unassigned_batches.sum()
    return probabilities


def _block_probabilities(style: str, n_batches: np.ndarray) -> np.ndarray:
    probabilities = np.zeros(n_batches.size)
    blocks = []
    for block in style.split(";")[1:]:
        try:
            start, end, weight = block.split(":")
            blocks.append((int(start), int(end), float(weight)))
        except ValueError as error:
            raise Dpa3Error(f"auto_prob {style!r}: block {block!r} is not start:end:weight") from error
    for start, end, weight in blocks:
        if not (0 <= start < end <= n_batches.size) or weight < 0:
            raise Dpa3Error(f"auto_prob {style!r}: block {start}:{end}:{weight} needs 0 <= start < end <= "
                            f"{n_batches.size} systems and a weight >= 0")
    total_weight = sum(weight for _, _, weight in blocks)
    if total_weight <= 0:
        raise Dpa3Error(f"auto_prob {style!r}: the block weights sum to 0")
    for start, end, weight in blocks:
        block_batches = n_batches[start:end]
        probabilities[start:end] = weight / total_weight * block_batches / block_batches.sum()
    return probabilities


# --------------------------------------------------------------------------- the data order
class Sampler:
    """Which system, and which of its frames, make up each training batch; restartable bit for bit."""

    def __init__(self, n_frames_per_system: Sequence[int], batch_sizes: Sequence[int], probabilities, seed: int):
        self.n_frames = [int(n) for n in n_frames_per_system]
        self.batch_sizes = [int(b) for b in batch_sizes]
        probabilities = np.asarray(probabilities, dtype=np.float64)
        if not (len(self.n_frames) == len(self.batch_sizes) == probabilities.size) or not self.n_frames:
            raise Dpa3Error(f"{len(self.n_frames)} systems, {len(self.batch_sizes)} batch sizes and "
                            f"{probabilities.size} probabilities: one of each per system is needed")
        if (probabilities < 0).any() or not probabilities.sum() > 0:
            raise Dpa3Error(f"system probabilities must be >= 0 and not all 0, got {probabilities.tolist()}")
        self.probabilities = probabilities / probabilities.sum()
        self.seed = int(seed)
        self.draws = 0  # batches handed out so far
        self.epochs = [0] * len(self.n_frames)  # per system: the current epoch
        self.positions = [0] * len(self.n_frames)  # per system: batches of the current epoch handed out
        self._order_cache: dict[int, tuple[int, np.ndarray]] = {}  # system -> (epoch, its frame order)

    def next_batch(self) -> tuple[int, np.ndarray]:
        """(system index, frame indices [b] of one batch), and advance."""
        draw_rng = np.random.default_rng([self.seed, 0, self.draws])
        system = int(draw_rng.choice(len(self.n_frames), p=self.probabilities))
        self.draws += 1
        size, position = self.batch_sizes[system], self.positions[system]
        frames = self._epoch_order(system)[position * size:(position + 1) * size]
        self.positions[system] += 1
        if self.positions[system] == batches_per_epoch(self.n_frames[system], size):
            self.epochs[system] += 1
            self.positions[system] = 0
        return system, frames

    def _epoch_order(self, system: int) -> np.ndarray:
        """[n_frames] the frame order of `system` in its current epoch (a permutation, reshuffled every epoch)."""
        epoch = self.epochs[system]
        cached = self._order_cache.get(system)
        if cached is None or cached[0] != epoch:
            order = np.random.default_rng([self.seed, 1, system, epoch]).permutation(self.n_frames[system])
            self._order_cache[system] = cached = (epoch, order)
        return cached[1]

    def state_dict(self) -> dict:
        """Everything that determines the batches to come, as JSON-friendly Python values."""
        return {
            "n_frames": list(self.n_frames),
            "batch_sizes": list(self.batch_sizes),
            "probabilities": self.probabilities.tolist(),  # floats round-trip exactly through JSON
            "seed": self.seed,
            "draws": self.draws,
            "epochs": list(self.epochs),
            "positions": list(self.positions),
        }

    @classmethod
    def from_state(cls, state: dict) -> Sampler:
        sampler = cls(state["n_frames"], state["batch_sizes"], state["probabilities"], state["seed"])
        sampler.load_state(state)
        return sampler

    def load_state(self, state: dict) -> None:
        """Continue from `state`, which must come from a sampler over the same systems and batch sizes."""
        for key in ("n_frames", "batch_sizes", "probabilities"):
            mine = getattr(self, key)
            if list(np.asarray(mine).tolist()) != list(state[key]):
                raise Dpa3Error(f"the saved data order has {key} {state[key]}, but this run has {list(mine)}: "
                                "the training data or batch sizes changed since the checkpoint")
        self.seed = int(state["seed"])
        self.draws = int(state["draws"])
        self.epochs = [int(e) for e in state["epochs"]]
        self.positions = [int(p) for p in state["positions"]]


def validation_batches(n_frames_per_system: Sequence[int], batch_sizes: Sequence[int],
                       numb_btch: int = 1) -> Iterator[tuple[int, np.ndarray]]:
    """(system index, frame indices) of the first `numb_btch` batches of every system, frames in file order."""
    for system, (n_frames, size) in enumerate(zip(n_frames_per_system, batch_sizes, strict=True)):
        for batch in range(min(numb_btch, batches_per_epoch(n_frames, size))):
            yield system, np.arange(batch * size, min((batch + 1) * size, n_frames))


# --------------------------------------------------------------------------- graphs and labels
class Labels(eqx.Module):
    """The DFT labels of one batch, laid out like its `Graph` (atoms concatenated frame after frame, padded).

    A label the system does not have is zeros with its find_* flag 0 (deepmd-kit's `find_energy` etc.).
    """

    energy: jax.Array  # [frames] float64, eV
    forces: jax.Array  # [atoms, 3] float64, eV/Å; 0 on padding atoms
    virial: jax.Array  # [frames, 3, 3] float64, eV, deepmd convention
    atom_energy: jax.Array  # [atoms] float64, eV; 0 on padding atoms
    find_energy: jax.Array  # [] float64, 1.0 if the system has the label, else 0.0
    find_forces: jax.Array  # []
    find_virial: jax.Array  # []
    find_atom_energy: jax.Array  # []
    atom_mask: jax.Array  # [atoms] float64, 1 real atom, 0 padding
    n_atoms: jax.Array  # [frames] float64, real atoms per frame (the N of per-atom errors)


def make_batch(system: System, frames: np.ndarray, config: DPA3Config,
               widths: tuple[int, int, int] | None = None) -> tuple[Graph, Labels]:
    """One batched Graph of `frames` of `system` and its Labels, both padded to the same atoms.

    Atoms are padded to a bucket (neighbors.pad_to_buckets) and, with `widths` = (atoms, M, K), to at least
    those sizes: a caller that keeps the widest widths seen (as Potential._sticky_widths does) compiles
    its step once per bucket rather than whenever a neighbour count changes.
    """
    frames = np.asarray(frames, dtype=np.int64)
    if frames.ndim != 1 or frames.size == 0:
        raise Dpa3Error(f"{system.source}: a batch needs a non-empty list of frame indices, got {frames.tolist()}")
    types = np.stack([system.frame_type_indices(f, config.type_map) for f in frames])  # [b, n], -1 = virtual
    real = types >= 0  # [b, n]
    graphs = [
        build_graph(system.coord[f][keep], t[keep], None if system.cell is None else system.cell[f], config, pad=False)
        for f, t, keep in zip(frames, types, real, strict=True)
    ]
    graph = pad_to_buckets(batch_graphs(graphs), config)
    if widths is not None:
        graph = pad_graph(graph, max(graph.n_atoms, widths[0]), max(graph.max_neighbors, widths[1]),
                          max(graph.max_angle_neighbors, widths[2]))
    return graph, _labels(system, frames, real, graph.n_atoms)


def _labels(system: System, frames: np.ndarray, real: np.ndarray, n_padded: int) -> Labels:
    """Labels of `frames`, real atoms in the graph's order (frame after frame), padded to `n_padded` atoms."""
    n_real = int(real.sum())

    def per_atom(label: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
        out = np.zeros((n_padded, *shape))
        if label is not None:
            out[:n_real] = label[frames][real]  # [b, n, ...] -> real atoms, frame after frame
        return out

    def per_frame(label: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
        return np.zeros((frames.size, *shape)) if label is None else label[frames].astype(np.float64)

    def found(label: np.ndarray | None) -> np.ndarray:
        return np.array(1.0 if label is not None else 0.0)  # [] float64

    return Labels(
        energy=per_frame(system.energy, ()),
        forces=per_atom(system.forces, (3,)),
        virial=per_frame(system.virial, (3, 3)),
        atom_energy=per_atom(system.atom_energy, ()),
        find_energy=found(system.energy),
        find_forces=found(system.forces),
        find_virial=found(system.virial),
        find_atom_energy=found(system.atom_energy),
        atom_mask=(np.arange(n_padded) < n_real).astype(np.float64),
        n_atoms=real.sum(axis=1).astype(np.float64),
    )


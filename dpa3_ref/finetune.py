"""`dpa3 train INPUT --finetune M [--model-branch B]`: a pretrained model, adapted to new data (docs/training.md).

The rules are deepmd-kit 3.2.0's (`dp --pt train --finetune`: deepmd/utils/finetune.py, the `finetune_model`
parts of deepmd/pt/train/training.py, the atomic model's `change_type_map` and `change_out_bias`).

**Which branch of M each head starts from** (M is our `.npz`, single or multitask, or an official `.dp`/`.yaml`;
a single model has one branch, "Default"):

    single-task input   --model-branch B, else model.finetune_head, else "Default". A multitask M needs one:
                        deepmd-kit would quietly take M's first branch with a new fitting net; we ask.
    multitask input     per head, model_dict[head].finetune_head; without it, a head named like a branch of M
                        continues that branch as it is (deepmd-kit's "resuming": no re-fit of its offsets),
                        and any other head is "RANDOM". --model-branch is refused, as deepmd-kit does.
    "RANDOM"            the descriptor of M's first branch and a new, random fitting net (training.seed).

**What is inherited.** The architecture is the input's (deepmd-kit's default; `--use-pretrain-script` is not
implemented). The descriptor is always inherited, so its settings must equal M's, type map and precision
excepted (arrays are cast to the input's precision). The fitting net is inherited when the input's equals the
branch's (neuron, resnet_dt, activation_function, dim_case_embd) and the branch is not "RANDOM"; otherwise it is
new and random (where deepmd-kit would fail to load M's weights into it).

**Type maps are matched by element name.** With π(t) the index in M's type map of new type t's element:

    T'_t = T_π(t)                       rows of the type-embedding table one-hot(t) W + b (+ skip): W' is solved
                                        from the rows, since the skip exists only when n_dim ∈ {ntypes, 2 ntypes}
    davg'[t], dstd'[t] = davg[π(t)], dstd[π(t)]                            [ntypes, e_sel, 4]
    bias_atom_e'[t] = bias_atom_e[π(t)],   out_bias'[t] = out_bias[π(t)]   [ntypes]
    exclude_types: M's pairs of elements that are both in the new map, re-indexed

so that, before the re-fit below, the new model gives M's energies on every structure (tested). An element M
does not know gets, as in deepmd-kit, a random embedding row (the new model's initialisation), environment
statistics from the new data (fix_stat_std if set) and zero offsets.

**Energy offsets** (`change_out_bias`), on the frames the statistics are sampled from (data_stat_nbatch batches
per system, stats.sample_frames; `data_bias_nsample` is read only by deepmd-kit's TensorFlow backend), with N
the frames' atom counts per type, E their energy labels and Ê the new model's energies before the re-fit:

    change-by-statistic (fitting inherited):   out_bias ← out_bias + lstsq(N, E − Ê)
    set-by-statistic    (new fitting):         out_bias ← lstsq(N, E)
    resuming heads:                            unchanged

Total-energy labels only, as `dp --pt train` in practice (stats.py). Descriptor statistics are inherited, not
recomputed.

**Shared components** (multitask input): a shared descriptor or fitting net comes from the first head, by
sorted name, that inherits it. Our shared fitting holds one bias_atom_e where deepmd-kit keeps one per head,
so a head whose branch had another bias_atom_e gets the difference in its out_bias (the same energies). A
multitask head's dataset one-hot is its own index in the input (multitask.py), while deepmd-kit keeps the
branch's; a single-task head keeps the branch's one-hot, as deepmd-kit does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from dpa3_ref.checkpoint import fill_like, leaves_by_name, load_model
from dpa3_ref.config import REPFLOW_KEYS, DPA3Config
from dpa3_ref.data import System
from dpa3_ref.descriptor import DPA3Descriptor
from dpa3_ref.errors import Dpa3Error
from dpa3_ref.fitting import EnergyFitting
from dpa3_ref.inputs import HeadConfig, TrainInput
from dpa3_ref.model import DPA3Model
from dpa3_ref.multitask import SINGLE_TASK, MultiTaskModel, init_multitask, single_task
from dpa3_ref.nn import Layer

RANDOM = "RANDOM"  # deepmd-kit's branch name for "the descriptor of M, a new fitting net"
DESCRIPTOR_KEYS = (*REPFLOW_KEYS, "activation_function", "concat_output_tebd", "use_tebd_bias", "env_protection")
FITTING_KEYS = ("fitting_neuron", "fitting_resnet_dt", "fitting_activation_function", "dim_case_embd")
EVALUATION_CHUNK = 8  # frames per call when predicting energies


@dataclasses.dataclass(frozen=True)
class Rule:
    """Where one head of the new model comes from."""

    branch: str  # the branch of M that gives the descriptor (and the fitting net, unless new_fitting)
    new_fitting: bool  # a random fitting net; offsets set by statistic
    resume: bool = False  # multitask: a head named like a branch of M, continued without re-fitting its offsets


# ------------------------------------------------------------------------------------------- the whole step
def finetune_model(config: TrainInput, path: Path, model_branch: str | None,
                   systems: dict[str, list[System]]) -> MultiTaskModel:
    """The model `dpa3 train --finetune path` starts from: M's weights in the input's architecture and type map,
    energy offsets re-fitted to each head's training `systems`."""
    pretrained = read_pretrained(path)
    rules = finetune_rules(config, pretrained, model_branch, source=path)
    model = inherited_model(config, pretrained, rules, systems, source=path)
    model = refit_energy_offsets(model, config, rules, systems)
    for head in config.heads:
        rule = rules[head.name]
        fitting = "new fitting net" if rule.new_fitting else "fitting net inherited"
        offsets = ("kept" if rule.resume else "set-by-statistic" if rule.new_fitting else "change-by-statistic")
        print(f"finetune {head.name}: branch {rule.branch!r} of {path}, {fitting}, energy offsets {offsets} "
              f"{np.round(np.asarray(model.out_bias[head.name]), 4).tolist()}")
    return model


def read_pretrained(path: Path) -> MultiTaskModel:
    """M as a multitask model (a single model is one branch, "Default")."""
    from dpa3_ref.official import load_official

    path = Path(path)
    if not path.exists():
        raise Dpa3Error(f"model file {path} to fine-tune from does not exist")
    loaded = load_official(path) if path.suffix in (".dp", ".yaml", ".yml") else load_model(path)
    return loaded if isinstance(loaded, MultiTaskModel) else single_task(loaded)


# ------------------------------------------------------------------------------------------- branches
def finetune_rules(config: TrainInput, pretrained: MultiTaskModel, model_branch: str | None,
                   source: Path) -> dict[str, Rule]:
    """Each head's branch of M and whether its fitting net is new (module docstring)."""
    branches = pretrained.head_names
    multitask_model = branches != [SINGLE_TASK]

    def chosen(head: HeadConfig, branch: str | None) -> Rule:
        if branch == RANDOM:
            return Rule(branches[0], new_fitting=True)
        if branch is None:
            if multitask_model:
                raise Dpa3Error(f"{source} is a multitask model: choose the branch to fine-tune from with "
                                f"--model-branch (or model.finetune_head), one of {branches} or {RANDOM!r}")
            branch = SINGLE_TASK
        if branch not in branches:
            if not multitask_model:
                raise Dpa3Error(f"{source} is a single-task model: its only branch is {SINGLE_TASK!r} "
                                f"(or {RANDOM!r} for a new fitting net), not {branch!r}")
            raise Dpa3Error(f"{source} has no branch {branch!r} (asked for by head {head.name!r}); its branches "
                            f"are {branches}")
        config_of_branch = pretrained.head_info(branch).config
        return Rule(branch, new_fitting=fitting_differs(head.model, config_of_branch))

    if not config.multitask:
        head = config.heads[0]
        return {head.name: chosen(head, model_branch or head.finetune_head)}
    if model_branch:
        raise Dpa3Error(f"{config.source}: --model-branch is for a single-task input; a multitask input names each "
                        "head's branch in model.model_dict[head].finetune_head")
    rules = {}
    for head in config.heads:
        if head.finetune_head is not None:
            rules[head.name] = chosen(head, head.finetune_head)
        elif head.name in branches:
            rule = chosen(head, head.name)
            rules[head.name] = dataclasses.replace(rule, resume=not rule.new_fitting)
        else:
            rules[head.name] = chosen(head, RANDOM)
    return rules


def fitting_differs(new: DPA3Config, old: DPA3Config) -> bool:
    return any(getattr(new, key) != getattr(old, key) for key in FITTING_KEYS)


def check_descriptor(new: DPA3Config, old: DPA3Config, source: Path, branch: str) -> None:
    """The input's descriptor must be M's (type map and precision may differ): a Dpa3Error names the keys."""
    differences = [f"{key}: input {getattr(new, key)!r}, {source} {getattr(old, key)!r}"
                   for key in DESCRIPTOR_KEYS if getattr(new, key) != getattr(old, key)]
    mapped = remapped_exclude_types(old, new.type_map)
    if {tuple(sorted(p)) for p in new.exclude_types} != mapped:
        differences.append(f"exclude_types: input {list(new.exclude_types)}, {source} {sorted(mapped)} "
                           f"(in the input's type map)")
    if differences:
        raise Dpa3Error(f"the input's descriptor differs from that of branch {branch!r} of {source}, which "
                        f"fine-tuning inherits: {'; '.join(differences)}")


def remapped_exclude_types(old: DPA3Config, type_map: Sequence[str]) -> set[tuple[int, int]]:
    """M's excluded type pairs whose elements are both in `type_map`, as indices into it."""
    names = [(old.type_map[a], old.type_map[b]) for a, b in old.exclude_types]
    return {tuple(sorted((type_map.index(a), type_map.index(b))))
            for a, b in names if a in type_map and b in type_map}


def type_index(old_type_map: Sequence[str], new_type_map: Sequence[str]) -> np.ndarray:
    """π: [new ntypes] index of each new type's element in M's type map, −1 for an element M does not know."""
    return np.array([old_type_map.index(name) if name in old_type_map else -1 for name in new_type_map])


def reindexed(old: jax.Array, index: np.ndarray, fallback: jax.Array) -> jax.Array:
    """old[π(t)] along the first axis, fallback[t] where π(t) = −1; in fallback's dtype."""
    rows = jnp.asarray(old)[np.maximum(index, 0)].astype(fallback.dtype)
    known = jnp.asarray(index >= 0).reshape((-1,) + (1,) * (fallback.ndim - 1))
    return jnp.where(known, rows, fallback)


# ------------------------------------------------------------------------------------------- weights
def inherited_model(config: TrainInput, pretrained: MultiTaskModel, rules: dict[str, Rule],
                    systems: dict[str, list[System]], source: Path) -> MultiTaskModel:
    """The input's model with M's weights (module docstring), before the energy offsets are re-fitted."""
    from dpa3_ref.train import heads_of

    for head in config.heads:
        check_descriptor(head.model, pretrained.head_info(rules[head.name].branch).config, source,
                         rules[head.name].branch)
    seed = config.seed if config.seed is not None else 0
    model = init_multitask(heads_of(config), key=jax.random.key(seed))  # new fittings and new elements' rows
    for key in model.descriptors:
        sharing = [head for head in config.heads if head.descriptor_key == key]
        branch = pretrained.head(rules[sharing[0].name].branch)
        statistics = new_element_statistics(sharing, branch.config, systems, seed)
        descriptor = inherited_descriptor(branch.descriptor, model.descriptors[key], source, statistics)
        model = eqx.tree_at(lambda m: m.descriptors[key], model, descriptor)
    for key in model.fittings:
        inheriting = [h for h in config.heads if h.fitting_key == key and not rules[h.name].new_fitting]
        if inheriting:
            branch = pretrained.head(rules[inheriting[0].name].branch)
            fitting = inherited_fitting(branch, model.fittings[key], inheriting[0].model.type_map, source)
            model = eqx.tree_at(lambda m: m.fittings[key], model, fitting)
    for head in config.heads:
        if not rules[head.name].new_fitting:
            branch = pretrained.head(rules[head.name].branch)
            index = type_index(branch.config.type_map, head.model.type_map)
            zeros = jnp.zeros(head.model.ntypes, jnp.float64)
            own_bias_atom_e = reindexed(branch.fitting.bias_atom_e, index, zeros)
            moved = own_bias_atom_e - model.fittings[head.fitting_key].bias_atom_e  # 0 unless a shared fitting
            out_bias = reindexed(branch.out_bias, index, zeros) + moved
            model = eqx.tree_at(lambda m: m.out_bias[head.name], model, out_bias)
    return model


def inherited_descriptor(old: DPA3Descriptor, fresh: DPA3Descriptor, source: Path,
                         new_element_dstd: np.ndarray | None) -> DPA3Descriptor:
    """`fresh` (the input's architecture) holding `old`'s arrays, re-indexed to the new type map."""
    index = type_index(old.config.type_map, fresh.config.type_map)
    dstd_fallback = fresh.dstd if new_element_dstd is None else jnp.asarray(new_element_dstd, fresh.dstd.dtype)
    replaced = {
        "type_embedding.weight": type_embedding_weight(old, fresh, index),
        "davg": reindexed(old.davg, index, fresh.davg),
        "dstd": reindexed(old.dstd, index, dstd_fallback),
    }
    return fill_like(fresh, {**leaves_by_name(old), **replaced}, source)


def type_embedding_weight(old: DPA3Descriptor, fresh: DPA3Descriptor, index: np.ndarray) -> jax.Array:
    """W' [new ntypes, n] such that one-hot(t) W' + b (+ skip') = T_π(t), the row `old` gives element π(t)
    (a new element keeps `fresh`'s row). The bias b is `old`'s; the skip' is the new shape's."""
    rows = reindexed(old.type_table()[:-1], index, fresh.type_table()[:-1])  # [new ntypes, n]; no padding row
    layer = fresh.type_embedding
    one_hot = jnp.eye(fresh.config.ntypes, dtype=layer.weight.dtype)
    skip = Layer(jnp.zeros_like(layer.weight), None, None, layer.activation, layer.residual)(one_hot)
    bias = 0.0 if old.type_embedding.bias is None else old.type_embedding.bias.astype(layer.weight.dtype)
    return rows - bias - skip


def inherited_fitting(branch: DPA3Model, fresh: EnergyFitting, type_map: Sequence[str], source: Path) -> EnergyFitting:
    """`fresh` holding the branch's fitting net (with its one-hot), bias_atom_e re-indexed to `type_map` (new
    elements 0)."""
    index = type_index(branch.config.type_map, type_map)
    bias_atom_e = reindexed(branch.fitting.bias_atom_e, index, jnp.zeros_like(fresh.bias_atom_e))
    return fill_like(fresh, {**leaves_by_name(branch.fitting), "bias_atom_e": bias_atom_e}, source)


def new_element_statistics(sharing: list[HeadConfig], old: DPA3Config, systems: dict[str, list[System]],
                           seed: int) -> np.ndarray | None:
    """dstd rows for elements M does not know, from the new data of the heads sharing the descriptor (deepmd-kit
    computes them with the new model's statistics); None when there are none or fix_stat_std sets them."""
    from dpa3_ref.stats import EnvironmentSums, environment_sums

    config = sharing[0].model
    if all(name in old.type_map for name in config.type_map) or config.fix_stat_std > 0:
        return None
    sums = EnvironmentSums.zeros(config.ntypes)
    for head in sharing:
        head_systems = systems[head.name]
        sums = sums + environment_sums(head_systems, config, statistics_frames(head, head_systems, seed))
    return sums.davg_dstd(config.e_sel)[1]


# ------------------------------------------------------------------------------------------- energy offsets
def statistics_frames(head: HeadConfig, systems: list[System], seed: int) -> list[np.ndarray]:
    """The frames of each system the statistics look at (as `dpa3 train` samples them from scratch)."""
    from dpa3_ref.stats import sample_frames

    batch_sizes = [head.training_data.batch_size_of(i, s.n_atoms) for i, s in enumerate(systems)]
    return sample_frames([s.n_frames for s in systems], batch_sizes, head.data_stat_nbatch, seed=seed)


def refit_energy_offsets(model: MultiTaskModel, config: TrainInput, rules: dict[str, Rule],
                         systems: dict[str, list[System]]) -> MultiTaskModel:
    """change-by-statistic for heads with an inherited fitting net, set-by-statistic for new ones."""
    from dpa3_ref.stats import change_by_statistic, energy_labels, set_by_statistic

    seed = config.seed if config.seed is not None else 0
    for head in config.heads:
        rule = rules[head.name]
        if rule.resume:
            continue
        frames = statistics_frames(head, systems[head.name], seed)
        labels = energy_labels(systems[head.name], head.model.type_map, frames, use_atom_energy=False)
        if rule.new_fitting:
            out_bias = set_by_statistic(labels.counts, labels.energy, ntypes=head.model.ntypes)
        else:
            predicted = predicted_energies(model.head(head.name), systems[head.name], frames)
            out_bias = np.asarray(model.out_bias[head.name]) + change_by_statistic(
                labels.counts, labels.energy, predicted, ntypes=head.model.ntypes)
        model = eqx.tree_at(lambda m: m.out_bias[head.name], model, jnp.asarray(out_bias, jnp.float64))
    return model


def predicted_energies(model: DPA3Model, systems: list[System], frames: list[np.ndarray]) -> np.ndarray:
    """Ê [labelled sampled frames]: the model's energy of every sampled frame of the systems with energy labels,
    in the order of stats.energy_labels."""
    from dpa3_ref.potential import Potential

    potential = Potential(model)
    energies = []
    for system, chosen in zip(systems, frames, strict=True):
        if system.energy is None:
            continue
        types = system.all_type_indices(model.config.type_map)  # [nf, n], −1 for virtual atoms
        structures = [(system.coord[f][types[f] >= 0], types[f][types[f] >= 0],
                       None if system.cell is None else system.cell[f]) for f in chosen]
        for start in range(0, len(structures), EVALUATION_CHUNK):
            outputs = potential.evaluate_batch(structures[start:start + EVALUATION_CHUNK])
            energies.extend(float(out["energy"]) for out in outputs)
    return np.asarray(energies)

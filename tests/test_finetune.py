"""Fine-tuning (`dpa3 train --finetune M`): type maps matched by name, branches, the energy-offset re-fit.

Every test builds a tiny float64 pretrained model M with `init_model` (random weights, and random offsets and
environment statistics so that re-indexing them matters) and tiny labelled systems in tmp_path. Where labels
come from M's own predictions plus known per-element offsets, those offsets are the independent truth. One
test fine-tunes the official reference model and compares with deepmd-kit's own fine-tuning, run once.
"""

import json
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dpa3_ref
from dpa3_ref.checkpoint import leaves_by_name, save_model
from dpa3_ref.config import DPA3Config
from dpa3_ref.data import read_systems
from dpa3_ref.errors import Dpa3Error
from dpa3_ref.finetune import finetune_model, finetune_rules, inherited_model, read_pretrained
from dpa3_ref.inputs import parse_input
from dpa3_ref.model import DPA3Model, init_model
from dpa3_ref.multitask import Head, init_multitask
from dpa3_ref.potential import Potential
from dpa3_ref.train import train
from tests.shared_paths import DATA, REFERENCE, skip_without_shared

# n_dim = 4: the type embedding has its residual skip with 2 types (4 = 2·2) but not with 3, so a change of
# type map must move the skip into and out of the weights.
TINY = DPA3Config(type_map=("H", "C", "O"), n_dim=4, e_dim=4, a_dim=4, nlayers=1, e_sel=20, a_sel=8, e_rcut=4.0,
                  e_rcut_smth=3.5, a_rcut=3.0, a_rcut_smth=2.5, axis_neuron=2, fitting_neuron=(8, 8),
                  use_tebd_bias=True, fix_stat_std=0.0)
ROUND_OFF = dict(rtol=1e-12, atol=1e-10)  # float64 energies of a few eV; the weights differ by adding/subtracting I


def pretrained(config: DPA3Config = TINY, seed: int = 0) -> DPA3Model:
    """A random model with non-trivial per-type arrays (offsets, bias_atom_e, dstd), as a trained one has."""
    rng = np.random.default_rng(seed)
    model = init_model(config, key=jax.random.key(seed))
    dstd = rng.uniform(0.2, 0.5, (config.ntypes, 1, 4)) * np.ones((1, config.e_sel, 1))
    return eqx.tree_at(lambda m: (m.descriptor.dstd, m.fitting.bias_atom_e, m.out_bias), model,
                       (jnp.asarray(dstd), jnp.asarray(rng.normal(size=config.ntypes)),
                        jnp.asarray(rng.normal(-3, 1, config.ntypes))))


def structure(elements: list[str], seed: int, periodic: bool = True):
    rng = np.random.default_rng(seed)
    n = len(elements)
    grid = np.stack(np.meshgrid(*[np.arange(3)] * 3, indexing="ij"), -1).reshape(-1, 3)[:n] * 1.6
    coord = grid + 0.4 + rng.uniform(-0.25, 0.25, (n, 3))
    return coord, elements, (np.eye(3) * 4.8 if periodic else None)


def write_system(path: Path, elements: list[str], n_frames: int, seed: int, label_model: DPA3Model,
                 offsets: dict[str, float] | None = None, periodic: bool = True) -> Path:
    """A deepmd/npy system labelled by `label_model` (energy + Σ_atoms offsets[element], its forces)."""
    names = sorted(set(elements))
    (path / "set.000").mkdir(parents=True)
    (path / "type_map.raw").write_text("\n".join(names) + "\n")
    (path / "type.raw").write_text(" ".join(str(names.index(e)) for e in elements) + "\n")
    potential = Potential(label_model)
    frames = [structure(elements, seed * 100 + f, periodic) for f in range(n_frames)]
    outputs = potential.evaluate_batch(frames)
    shift = sum((offsets or {}).get(e, 0.0) for e in elements)
    np.save(path / "set.000/coord.npy", np.stack([f[0] for f in frames]).reshape(n_frames, -1))
    np.save(path / "set.000/energy.npy", np.array([float(o["energy"]) + shift for o in outputs]))
    np.save(path / "set.000/force.npy", np.stack([o["forces"] for o in outputs]).reshape(n_frames, -1))
    if periodic:
        np.save(path / "set.000/box.npy", np.tile(np.eye(3).ravel() * 4.8, (n_frames, 1)))
    else:
        (path / "nopbc").touch()
    return path


def model_section(config: DPA3Config) -> dict:
    """The input.json model section of `config` (use_dynamic_sel left to its default: inputs.py reads it as an
    integer, as it does every key ending in "_sel")."""
    section = config.to_deepmd()
    assert not section["descriptor"]["repflow"].pop("use_dynamic_sel")
    return section


def single_input(config: DPA3Config, systems: list[Path], numb_steps: int = 2, **model_keys) -> dict:
    return {
        "model": {**model_section(config), **model_keys},
        "learning_rate": {"start_lr": 1e-3, "stop_lr": 1e-4, "decay_steps": 1},
        "loss": {"start_pref_e": 1, "limit_pref_e": 1, "start_pref_f": 1, "limit_pref_f": 1},
        "training": {"training_data": {"systems": [str(s) for s in systems], "batch_size": 2},
                     "numb_steps": numb_steps, "seed": 5, "disp_freq": 1, "save_freq": 100},
    }


def systems_of(config) -> dict:
    return {h.name: read_systems(h.training_data.systems, h.model.type_map) for h in config.heads}


def system_energies(model: DPA3Model, system) -> np.ndarray:
    """The model's energy of every frame of a read system, in one batch."""
    cells = [None] * system.n_frames if system.cell is None else list(system.cell)
    frames = [(system.coord[f], system.atom_names, cells[f]) for f in range(system.n_frames)]
    return np.array([float(out["energy"]) for out in Potential(model).evaluate_batch(frames)])


# ------------------------------------------------------------------------------------------- type maps
def test_a_new_type_map_keeps_the_pretrained_energies(tmp_path):
    """M on [H, C, O] fine-tuned to [O, H]: before the re-fit, the new model's energies are M's (the labels here)."""
    old = pretrained()
    save_model(old, tmp_path / "m.npz")
    systems = [write_system(tmp_path / "a", ["H", "O", "H", "H", "O", "O", "H"], 2, seed=1, label_model=old),
               write_system(tmp_path / "b", ["O", "H", "H"], 2, seed=2, label_model=old, periodic=False)]
    config = parse_input(single_input(TINY.replace(type_map=("O", "H")), systems), tmp_path)
    m = read_pretrained(tmp_path / "m.npz")
    data = systems_of(config)
    new = inherited_model(config, m, finetune_rules(config, m, None, tmp_path), data, tmp_path).head("Default")
    assert new.descriptor.type_embedding.residual and not old.descriptor.type_embedding.residual
    np.testing.assert_array_equal(new.out_bias, np.asarray(old.out_bias)[[2, 0]])
    np.testing.assert_array_equal(new.descriptor.dstd, np.asarray(old.descriptor.dstd)[[2, 0]])
    for system in data["Default"]:
        np.testing.assert_allclose(system_energies(new, system), system.energy, **ROUND_OFF)


def test_an_element_the_pretrained_model_lacks_is_added(tmp_path):
    """[H, C, O] to [O, N, H]: N gets zero offsets (and a fresh embedding row); O/H structures keep M's energies."""
    old = pretrained(TINY.replace(fix_stat_std=0.3))
    save_model(old, tmp_path / "m.npz")
    system = write_system(tmp_path / "a", ["O", "H", "H", "O"], 2, seed=1, label_model=old)
    config = parse_input(single_input(TINY.replace(type_map=("O", "N", "H"), fix_stat_std=0.3), [system]), tmp_path)
    m = read_pretrained(tmp_path / "m.npz")
    data = systems_of(config)
    new = inherited_model(config, m, finetune_rules(config, m, None, tmp_path), data, tmp_path).head("Default")
    np.testing.assert_array_equal(new.out_bias, [old.out_bias[2], 0.0, old.out_bias[0]])
    bias_atom_e = np.asarray(old.fitting.bias_atom_e)
    np.testing.assert_array_equal(new.fitting.bias_atom_e, [bias_atom_e[2], 0.0, bias_atom_e[0]])
    np.testing.assert_allclose(system_energies(new, data["Default"][0]), data["Default"][0].energy, **ROUND_OFF)


# ------------------------------------------------------------------------------------------- energy offsets
def test_change_by_statistic_recovers_a_known_shift_per_element(tmp_path):
    """Labels = M's energies + Σ δ[element]: the re-fit adds exactly δ to M's offsets (in the new type order), and
    the fine-tuned model then reproduces the labels."""
    old = pretrained()
    save_model(old, tmp_path / "m.npz")
    delta = {"O": 1.7, "H": -0.4}
    systems = [write_system(tmp_path / "a", ["O", "H", "H", "O", "H", "H"], 3, seed=1, label_model=old, offsets=delta),
               write_system(tmp_path / "b", ["O", "O", "O", "H", "H"], 3, seed=2, label_model=old, offsets=delta,
                            periodic=False)]
    config = parse_input(single_input(TINY.replace(type_map=("H", "O")), systems), tmp_path)
    model = finetune_model(config, tmp_path / "m.npz", None, systems_of(config)).head("Default")
    np.testing.assert_allclose(np.asarray(model.out_bias) - np.asarray(old.out_bias)[[0, 2]],
                               [delta["H"], delta["O"]], atol=1e-9)
    for system in systems_of(config)["Default"]:
        np.testing.assert_allclose(system_energies(model, system), system.energy, atol=1e-8)


def test_a_new_fitting_net_sets_offsets_by_statistic(tmp_path):
    """Another fitting architecture: a random fitting net, offsets = numpy.linalg.lstsq(N, E) on the labels, the
    descriptor still M's."""
    old = pretrained()
    save_model(old, tmp_path / "m.npz")
    systems = [write_system(tmp_path / "a", ["O", "H", "H"], 3, seed=1, label_model=old, offsets={"O": 5.0}),
               write_system(tmp_path / "b", ["O", "O", "H", "H", "H"], 2, seed=2, label_model=old)]
    new_config = TINY.replace(type_map=("O", "H"), fitting_neuron=(8, 4))
    config = parse_input(single_input(new_config, systems), tmp_path)
    data = systems_of(config)["Default"]
    model = finetune_model(config, tmp_path / "m.npz", None, {"Default": data}).head("Default")
    counts = np.concatenate([s.type_counts(["O", "H"]) for s in data])
    labels = np.concatenate([s.energy for s in data])
    np.testing.assert_allclose(model.out_bias, np.linalg.lstsq(counts, labels, rcond=None)[0], rtol=1e-12)
    assert model.fitting.layers[1].weight.shape == (8, 4)
    np.testing.assert_array_equal(model.descriptor.layers[0].node_self.weight,
                                  old.descriptor.layers[0].node_self.weight)


def test_the_random_branch_gives_a_new_fitting_net(tmp_path):
    old = pretrained()
    save_model(old, tmp_path / "m.npz")
    system = write_system(tmp_path / "a", ["O", "H", "H"], 2, seed=1, label_model=old)
    config = parse_input(single_input(TINY, [system]), tmp_path)
    m = read_pretrained(tmp_path / "m.npz")
    assert finetune_rules(config, m, "RANDOM", tmp_path)["Default"].new_fitting
    assert not finetune_rules(config, m, None, tmp_path)["Default"].new_fitting
    model = finetune_model(config, tmp_path / "m.npz", "RANDOM", systems_of(config)).head("Default")
    assert not np.allclose(model.fitting.layers[0].weight, old.fitting.layers[0].weight)
    np.testing.assert_array_equal(model.descriptor.edge_embedding.weight, old.descriptor.edge_embedding.weight)


# ------------------------------------------------------------------------------------------- branches and checks
def multitask_pretrained(tmp_path: Path) -> Path:
    """M with branches "mol" and "water": one shared descriptor, one fitting net each, random offsets."""
    config = TINY.replace(type_map=("O", "H"))
    heads = tuple(Head(name, "descriptor", f"{name}/fitting", None, config) for name in ("mol", "water"))
    model = init_multitask(heads, key=jax.random.key(1))
    model = eqx.tree_at(lambda m: m.out_bias, model, {"mol": jnp.array([-2.0, -0.5]), "water": jnp.array([-7.0, 1.5])})
    save_model(model, tmp_path / "mt.npz")
    return tmp_path / "mt.npz"


def test_a_branch_of_a_multitask_model_is_chosen_by_name(tmp_path):
    path = multitask_pretrained(tmp_path)
    m = read_pretrained(path)
    system = write_system(tmp_path / "a", ["H", "O", "H"], 2, seed=1, label_model=m.head("water"))
    config = parse_input(single_input(TINY.replace(type_map=("H", "O")), [system]), tmp_path)
    with pytest.raises(Dpa3Error, match=r"multitask model.*\['mol', 'water'\]"):
        finetune_rules(config, m, None, path)
    with pytest.raises(Dpa3Error, match=r"no branch 'ice'.*\['mol', 'water'\]"):
        finetune_rules(config, m, "ice", path)
    model = finetune_model(config, path, "water", systems_of(config)).head("Default")
    for name, value in leaves_by_name(m.head("water").fitting).items():
        if name != "bias_atom_e":
            np.testing.assert_array_equal(leaves_by_name(model.fitting)[name], value, err_msg=name)
    # labels are the branch's own energies: nothing to change
    np.testing.assert_allclose(model.out_bias, [1.5, -7.0], atol=1e-9)
    by_input = parse_input(single_input(TINY.replace(type_map=("H", "O")), [system], finetune_head="mol"), tmp_path)
    assert finetune_rules(by_input, m, None, path)["Default"].branch == "mol"


def test_branch_errors_for_single_task_models_and_multitask_inputs(tmp_path):
    save_model(pretrained(), tmp_path / "m.npz")
    m = read_pretrained(tmp_path / "m.npz")
    system = write_system(tmp_path / "a", ["O", "H", "H"], 2, seed=1, label_model=pretrained())
    config = parse_input(single_input(TINY, [system]), tmp_path)
    with pytest.raises(Dpa3Error, match="single-task model: its only branch is 'Default'"):
        finetune_rules(config, m, "water", tmp_path / "m.npz")
    multitask = {
        "model": {"shared_dict": {"types": ["H", "C", "O"], "descriptor": model_section(TINY)["descriptor"]},
                  "model_dict": {name: {"type_map": "types", "descriptor": "descriptor",
                                        "fitting_net": model_section(TINY)["fitting_net"]} for name in ("a", "b")}},
        "learning_rate": {"start_lr": 1e-3},
        "loss_dict": {"a": {}, "b": {}},
        "training": {"data_dict": {name: {"training_data": {"systems": [str(system)]}} for name in ("a", "b")},
                     "numb_steps": 1},
    }
    with pytest.raises(Dpa3Error, match="--model-branch is for a single-task input"):
        finetune_rules(parse_input(multitask, tmp_path), m, "Default", tmp_path / "m.npz")


def test_multitask_heads_resume_or_finetune_their_own_branch(tmp_path):
    """A head named like a branch continues it (offsets kept); a head with finetune_head re-fits its offsets."""
    path = multitask_pretrained(tmp_path)
    m = read_pretrained(path)
    water = write_system(tmp_path / "w", ["O", "H", "H"], 2, seed=1, label_model=m.head("water"), offsets={"H": 0.3})
    mol = write_system(tmp_path / "m", ["O", "H"], 2, seed=2, label_model=m.head("mol"))
    fitting = model_section(TINY)["fitting_net"]
    data = {
        "model": {"shared_dict": {"types": ["O", "H"], "descriptor": model_section(TINY)["descriptor"]},
                  "model_dict": {"mol": {"type_map": "types", "descriptor": "descriptor", "fitting_net": fitting},
                                 "ice": {"type_map": "types", "descriptor": "descriptor", "fitting_net": fitting,
                                         "finetune_head": "water"}}},
        "learning_rate": {"start_lr": 1e-3},
        "loss_dict": {"mol": {}, "ice": {}},
        "training": {"data_dict": {"mol": {"training_data": {"systems": [str(mol)]}},
                                   "ice": {"training_data": {"systems": [str(water)]}}}, "numb_steps": 1},
    }
    config = parse_input(data, tmp_path)
    rules = finetune_rules(config, m, None, path)
    assert rules["mol"].resume and rules["ice"].branch == "water" and not rules["ice"].resume
    model = finetune_model(config, path, None, systems_of(config))
    np.testing.assert_array_equal(model.out_bias["mol"], m.out_bias["mol"])
    # one O and two H (+0.3 each) in every frame, one composition: the re-fit is lstsq's minimum-norm split of 0.6
    shift = np.asarray(model.out_bias["ice"]) - np.asarray(m.out_bias["water"])
    np.testing.assert_allclose(shift, np.linalg.lstsq(np.array([[1.0, 2.0]] * 2), [0.6, 0.6], rcond=None)[0],
                               atol=1e-9)


def test_a_different_descriptor_is_refused_naming_the_keys(tmp_path):
    save_model(pretrained(), tmp_path / "m.npz")
    system = write_system(tmp_path / "a", ["O", "H", "H"], 2, seed=1, label_model=pretrained())
    config = parse_input(single_input(TINY.replace(e_rcut=3.8, e_sel=16), [system]), tmp_path)
    with pytest.raises(Dpa3Error, match=r"descriptor differs.*e_rcut: input 3.8.*e_sel: input 16"):
        finetune_model(config, tmp_path / "m.npz", None, systems_of(config))


# ------------------------------------------------------------------------------------------- end to end
def test_dpa3_train_finetune_end_to_end(tmp_path):
    """`dpa3 train input.json --finetune M` for 2 steps, then the final model loads and evaluates."""
    old = pretrained()
    save_model(old, tmp_path / "m.npz")
    system = write_system(tmp_path / "a", ["O", "H", "H", "O", "H", "H"], 4, seed=1, label_model=old,
                          offsets={"O": 0.5})
    config = parse_input(single_input(TINY.replace(type_map=("O", "H")), [system]), tmp_path)
    out = train(config, tmp_path, finetune=tmp_path / "m.npz", progress=False, plots=False)
    potential = dpa3_ref.load(out)
    assert potential.type_map == ["O", "H"]
    assert np.isfinite(potential.evaluate(*structure(["O", "H", "H"], seed=3))["energy"])


# ------------------------------------------------------------------------------------------- the official code
# deepmd-kit 3.2.0, run once: start.pt built from water_small_f64_stats/model.dp as dpa3_ref/training_parity.py
# builds it, then `dp --pt train input.json --finetune start.pt --skip-neighbor-stat` on the input and data of
# test_matches_the_official_finetune_of_an_official_model (1 step; out_bias is a buffer the step does not change),
# the checkpoint converted to .dp and its out_bias read. Its log: "Change output bias of ['H', 'O'] from
# [-187.15 -93.57] to [2.20580859 -465.04441983]".
OFFICIAL_FINETUNED_OUT_BIAS = [2.2058085911524756, -465.04441983120427]  # [H, O] eV


def test_matches_the_official_finetune_of_an_official_model(tmp_path):
    """From the official .dp (type map [O, H]) to [H, O] on two water systems of different compositions: the
    re-fitted offsets equal deepmd-kit's to round-off (energies of 3e4 eV, so 1e-9 eV)."""
    skip_without_shared()
    source = DATA / "water/data_0"
    types = np.loadtxt(source / "type.raw", dtype=int)
    arrays = {k: np.load(source / f"set.000/{k}.npy") for k in ("coord", "box", "energy", "force")}
    all_atoms = np.arange(len(types))
    without_ten_h = np.setdiff1d(all_atoms, np.flatnonzero(types == 1)[-10:])
    for name, frames, atoms, shift in (("a", [0, 1], all_atoms, 0.0), ("b", [2, 3], without_ten_h, 3.0)):
        path = tmp_path / name / "set.000"
        path.mkdir(parents=True)
        (path.parent / "type_map.raw").write_text("O\nH\n")
        (path.parent / "type.raw").write_text(" ".join(map(str, types[atoms])) + "\n")
        for key in ("coord", "force"):
            np.save(path / f"{key}.npy", arrays[key][frames].reshape(2, -1, 3)[:, atoms].reshape(2, -1))
        np.save(path / "box.npy", arrays["box"][frames])
        np.save(path / "energy.npy", arrays["energy"][frames] + shift)
    model_section = json.loads((REFERENCE / "water_small_f64_stats/config.json").read_text())
    data = {"model": {**model_section, "type_map": ["H", "O"]},
            "learning_rate": {"type": "exp", "start_lr": 1e-3, "stop_lr": 1e-4, "decay_steps": 1},
            "loss": {"type": "ener", "start_pref_e": 1, "limit_pref_e": 1, "start_pref_f": 1, "limit_pref_f": 1},
            "training": {"training_data": {"systems": [str(tmp_path / "a"), str(tmp_path / "b")], "batch_size": 1},
                         "numb_steps": 1, "seed": 1}}
    config = parse_input(data, tmp_path)
    model = finetune_model(config, REFERENCE / "water_small_f64_stats/model.dp", None, systems_of(config))
    np.testing.assert_allclose(model.out_bias["Default"], OFFICIAL_FINETUNED_OUT_BIAS, rtol=0, atol=1e-9)

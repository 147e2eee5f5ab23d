"""deepmd-kit's training input.json: every key, alias and default as deepmd-kit 3.2.0 reads it, multitask
sharing and dataset encoding, and a clear error for every key that is unknown, missing or unsupported.

The oracle for defaults is deepmd-kit itself (numpy backend): the input goes through the steps of
`dp --pt train` (preprocess_shared_params, update_deepmd_input, normalize) and our dataclasses must hold
the values deepmd-kit ends up with.
"""

import copy
import json
from pathlib import Path

import pytest

from dpa3_ref.config import water_example_config
from dpa3_ref.errors import Dpa3Error
from tests.shared_paths import DATA, needs_shared
from dpa3_ref.inputs import (
    DataConfig,
    LossConfig,
    from_json,
    parse_input,
    read_input,
    to_json,
)

WATER_SYSTEMS = ("water/data_0", "water/data_1", "water/data_2", "water/data_3")
MOLECULES = ("molecules/C1H4O2", "molecules/C3H3O4", "molecules/C4H3O1")


@pytest.fixture
def base(tmp_path) -> Path:
    """A directory laid out like ../shared/data: systems are folders holding a type.raw (all the input reader
    looks at; the data reader checks the rest)."""
    for system in WATER_SYSTEMS + MOLECULES:
        (tmp_path / system).mkdir(parents=True)
        (tmp_path / system / "type.raw").write_text("0\n")
    return tmp_path


def water_input() -> dict:
    """deepmd-kit's examples/water/dpa3/input_torch.json as the spec (§10.2) records it, data paths ours."""
    return {
        "_comment": "that's all",
        "model": {
            "type_map": ["O", "H"],
            "descriptor": {
                "type": "dpa3",
                "repflow": {
                    "n_dim": 128, "e_dim": 64, "a_dim": 32, "nlayers": 6,
                    "e_rcut": 6.0, "e_rcut_smth": 5.3, "e_sel": 120,
                    "a_rcut": 4.0, "a_rcut_smth": 3.5, "a_sel": 30,
                    "axis_neuron": 4, "fix_stat_std": 0.3,
                    "a_compress_rate": 1, "a_compress_e_rate": 2, "a_compress_use_split": True,
                    "update_angle": True, "smooth_edge_update": True, "edge_init_use_dist": True,
                    "use_exp_switch": True, "update_style": "res_residual", "update_residual": 0.1,
                    "update_residual_init": "const",
                },
                "activation_function": "silut:10.0", "use_tebd_bias": False, "precision": "float32",
                "concat_output_tebd": False,
            },
            "fitting_net": {
                "neuron": [240, 240, 240], "resnet_dt": True, "precision": "float32",
                "activation_function": "silut:10.0", "seed": 1, "_comment": " that's all",
            },
            "_comment": " that's all",
        },
        "learning_rate": {"type": "exp", "decay_steps": 5000, "start_lr": 0.001, "stop_lr": 3e-5},
        "loss": {"type": "ener", "start_pref_e": 0.2, "limit_pref_e": 20, "start_pref_f": 100, "limit_pref_f": 60,
                 "start_pref_v": 0.02, "limit_pref_v": 1},
        "optimizer": {"type": "AdamW", "adam_beta1": 0.9, "adam_beta2": 0.999, "weight_decay": 0.001},
        "training": {
            "stat_file": "./dpa3.hdf5",
            "training_data": {"systems": list(WATER_SYSTEMS[:3]), "batch_size": 1},
            "validation_data": {"systems": [WATER_SYSTEMS[3]], "batch_size": 1},
            "numb_steps": 1000000, "gradient_max_norm": 5.0, "seed": 10,
            "disp_file": "lcurve.out", "disp_freq": 100, "save_freq": 2000,
        },
    }


TINY_REPFLOW = {"n_dim": 8, "e_dim": 4, "a_dim": 4, "nlayers": 1, "e_rcut": 4.0, "e_rcut_smth": 3.5, "e_sel": 20,
                "a_rcut": 3.0, "a_rcut_smth": 2.5, "a_sel": 8, "axis_neuron": 2}


def multitask_input(style: str = "dpa3") -> dict:
    """Water and open-boundary molecules, one shared descriptor. "dpa3": one shared fitting net with dataset
    encoding; "dpa2": a fitting net per head. The heads are listed out of alphabetical order on purpose."""
    shared = {
        "type_map_all": ["O", "H", "C"],
        "dpa3_descriptor": {"type": "dpa3", "repflow": dict(TINY_REPFLOW), "precision": "float64"},
    }
    if style == "dpa3":
        shared["shared_fitting"] = {"neuron": [8, 8], "dim_case_embd": 2, "precision": "float64"}
        fittings = {"water": "shared_fitting", "molecules": "shared_fitting"}
    else:
        fittings = {"water": {"neuron": [8, 8]}, "molecules": {"neuron": [16, 16]}}
    return {
        "model": {
            "shared_dict": shared,
            "model_dict": {
                name: {"type_map": "type_map_all", "descriptor": "dpa3_descriptor", "fitting_net": fittings[name]}
                for name in ("water", "molecules")
            },
        },
        "learning_rate": {"start_lr": 1e-3, "stop_lr": 1e-5, "decay_steps": 100},
        "optimizer": {"type": "AdamW", "weight_decay": 0.001},
        "loss_dict": {"water": {"start_pref_e": 0.2, "limit_pref_e": 20}, "molecules": {"start_pref_v": 0}},
        "training": {
            "data_dict": {
                "water": {
                    "training_data": {"systems": list(WATER_SYSTEMS[:3]), "batch_size": 1},
                    "validation_data": {"systems": [WATER_SYSTEMS[3]], "batch_size": 1},
                    "stat_file": "water.hdf5",
                },
                "molecules": {"training_data": {"systems": list(MOLECULES[:2]), "batch_size": "auto"}},
            },
            "numb_steps": 200, "seed": 1,
        },
    }


def minimal_input() -> dict:
    return {
        "model": {"type_map": ["O", "H"], "descriptor": {"type": "dpa3", "repflow": dict(TINY_REPFLOW)},
                  "fitting_net": {}},
        "learning_rate": {"start_lr": 1e-3},
        "loss": {},
        "training": {"training_data": {"systems": "water"}, "numb_steps": 10},
    }


def error_of(data: dict, base: Path) -> str:
    with pytest.raises(Dpa3Error) as caught:
        parse_input(data, base, source="input.json")
    return str(caught.value)


# --------------------------------------------------------------------------- the water example
def test_water_example_reads_as_the_recipe(base):
    train = parse_input(water_input(), base)
    assert not train.multitask and [head.name for head in train.heads] == ["Default"]
    head = train.heads[0]
    assert head.model == water_example_config()
    assert head.loss == LossConfig(start_pref_e=0.2, limit_pref_e=20.0, start_pref_f=100.0, limit_pref_f=60.0,
                                   start_pref_v=0.02, limit_pref_v=1.0)
    assert (train.learning_rate.start_lr, train.learning_rate.stop_lr, train.learning_rate.decay_steps) == (
        1e-3, 3e-5, 5000)
    assert (train.optimizer.type, train.optimizer.weight_decay) == ("AdamW", 1e-3)
    assert (train.numb_steps, train.gradient_max_norm, train.seed, train.disp_freq, train.save_freq) == (
        1000000, 5.0, 10, 100, 2000)
    # systems are taken relative to the input's directory
    assert head.training_data.systems == tuple(str(base / s) for s in WATER_SYSTEMS[:3])
    assert head.validation_data.systems == (str(base / WATER_SYSTEMS[3]),)
    assert head.training_data.batch_size == 1 and head.model_prob == 1.0 and head.case_index is None
    assert train.stat_file == head.stat_file == "./dpa3.hdf5"
    assert train.ignored == ("model.fitting_net.seed",)  # torch's initialisation seed has no meaning here


def test_reads_a_file_relative_to_its_own_directory(base):
    path = base / "input.json"
    path.write_text(json.dumps(water_input()))
    train = read_input(path)
    assert train.source == path and train.raw == water_input()
    assert train.heads[0].training_data.systems[0] == str(base / "water/data_0")


def test_reports_a_file_that_is_not_json(tmp_path):
    path = tmp_path / "input.json"
    path.write_text("{'model': 1}")
    with pytest.raises(Dpa3Error, match="input.json: not valid JSON"):
        read_input(path)


def test_reads_yaml_like_dp_train(base):
    yaml = pytest.importorskip("yaml")
    path = base / "input.yaml"
    path.write_text(yaml.safe_dump(water_input()))
    assert read_input(path) == parse_input(water_input(), base, source=str(path))


# --------------------------------------------------------------------------- defaults against deepmd-kit
def deepmd_normalized(data: dict, multitask: bool = False) -> dict:
    """The input as `dp --pt train` sees it after its preprocessing (deepmd/pt/entrypoints/main.py)."""
    argcheck = pytest.importorskip("deepmd.utils.argcheck", reason="needs deepmd-kit (the oracle)")
    from deepmd.dpmodel.utils.multi_task import preprocess_shared_params
    from deepmd.utils.compat import update_deepmd_input

    data = copy.deepcopy(data)
    if multitask:
        data["model"], _ = preprocess_shared_params(data["model"], lambda *_: None, cascade_defaults=True)
    return argcheck.normalize(update_deepmd_input(data, warning=False), multi_task=multitask)


def assert_reads_like_deepmd(train, reference: dict) -> None:
    """Every value of a single-task TrainInput equals deepmd-kit's normalized input."""
    head = train.heads[0]
    for field, value in vars(head.loss).items():
        assert value == reference["loss"][field], field
    lr = reference["learning_rate"]
    for field, value in vars(train.learning_rate).items():
        assert value == lr[field], field
    # AdamW gets weight_decay 0.0, not argcheck's 0.001: update_deepmd_input fills it first (the quirk)
    assert vars(train.optimizer) == reference["optimizer"]
    for field in ("numb_steps", "disp_file", "disp_freq", "save_freq", "save_ckpt", "max_ckpt_keep",
                  "enable_ema", "ema_decay", "disp_training", "time_training"):
        assert getattr(train, field) == reference["training"][field], field
    assert train.seed == reference["training"].get("seed")
    assert train.gradient_max_norm == reference["training"].get("gradient_max_norm", 0.0)  # pt: .get(..., 0.0)
    for data_config, section in ((head.training_data, "training_data"), (head.validation_data, "validation_data")):
        for field in ("batch_size", "auto_prob", "sys_probs"):
            assert getattr(data_config, field) == reference["training"][section][field], (section, field)
    assert head.validation_data.numb_btch == reference["training"]["validation_data"]["numb_btch"]
    for field in ("data_stat_nbatch", "data_stat_protect", "data_bias_nsample"):
        assert getattr(head, field) == reference["model"][field], field


@pytest.mark.official
@pytest.mark.parametrize("optimizer", [None, "Adam", "AdamW"])
def test_defaults_are_deepmd_kits(base, optimizer):
    data = minimal_input()
    data["training"]["validation_data"] = {"systems": "water/data_3"}
    if optimizer:
        data["optimizer"] = {"type": optimizer}
    reference = deepmd_normalized(data)
    assert_reads_like_deepmd(parse_input(data, base), reference)
    assert reference["learning_rate"]["stop_lr"] == 5e-8  # argcheck's fallback when no stop_lr(_ratio) is given


@pytest.mark.official
def test_water_example_reads_like_deepmd(base):
    assert_reads_like_deepmd(parse_input(water_input(), base), deepmd_normalized(water_input()))


@pytest.mark.official
def test_model_defaults_are_deepmd_kits(base):
    data = minimal_input()
    reference = deepmd_normalized(data)["model"]
    model = parse_input(data, base).heads[0].model
    repflow = reference["descriptor"]["repflow"]
    for key, value in repflow.items():
        if key != "skip_stat":
            assert getattr(model, key) == value, key
    descriptor, fitting = reference["descriptor"], reference["fitting_net"]
    for key in ("concat_output_tebd", "activation_function", "env_protection", "use_tebd_bias"):
        assert getattr(model, key) == descriptor[key], key
    assert descriptor["precision"] == fitting["precision"] == "default" and model.precision == "float64"
    assert list(model.fitting_neuron) == fitting["neuron"]
    assert (model.fitting_resnet_dt, model.fitting_activation_function, model.dim_case_embd) == (
        fitting["resnet_dt"], fitting["activation_function"], fitting["dim_case_embd"])


@pytest.mark.official
def test_legacy_layouts_move_like_deepmd_kits(base):
    # v3.1: optimizer keys and warmup inside `training`; deepmd-kit moves them to their own sections
    data = minimal_input()
    data["training"].update({"opt_type": "AdamW", "weight_decay": 0.01, "warmup_steps": 7, "numb_test": 3})
    reference = deepmd_normalized(data)
    train = parse_input(data, base)
    assert vars(train.optimizer) == reference["optimizer"]
    assert train.learning_rate.warmup_steps == reference["learning_rate"]["warmup_steps"] == 7
    assert "training.numb_test" in train.ignored


# --------------------------------------------------------------------------- multitask
def test_dpa3_style_multitask_shares_descriptor_and_fitting(base):
    train = parse_input(multitask_input("dpa3"), base)
    assert train.multitask
    assert [head.name for head in train.heads] == ["molecules", "water"]  # sorted
    for head in train.heads:
        assert (head.descriptor_key, head.fitting_key) == ("dpa3_descriptor", "shared_fitting")
        assert head.model.type_map == ("O", "H", "C") and head.model.dim_case_embd == 2
    # the one-hot index is the position in the sorted names, not the order of the input (spec §6.4)
    assert {head.name: head.case_index for head in train.heads} == {"molecules": 0, "water": 1}
    molecules, water = train.heads
    assert water.model == molecules.model
    assert water.loss.start_pref_e == 0.2 and molecules.loss.start_pref_e == 0.02
    assert water.stat_file == "water.hdf5" and molecules.stat_file is None and train.stat_file is None
    assert molecules.validation_data is None and water.validation_data.systems == (str(base / WATER_SYSTEMS[3]),)


def test_dpa2_style_multitask_has_a_fitting_per_head(base):
    train = parse_input(multitask_input("dpa2"), base)
    molecules, water = train.heads
    assert molecules.descriptor_key == water.descriptor_key == "dpa3_descriptor"
    assert (molecules.fitting_key, water.fitting_key) == ("molecules/fitting_net", "water/fitting_net")
    assert (molecules.model.fitting_neuron, water.model.fitting_neuron) == ((16, 16), (8, 8))
    assert molecules.case_index is None and water.case_index is None  # no dataset encoding


@pytest.mark.official
def test_multitask_matches_deepmd_kits_expansion(base):
    data = multitask_input("dpa3")
    data["model"]["data_stat_nbatch"] = 3  # model-wide keys are copied into every head
    data["model"]["model_dict"]["water"]["data_stat_nbatch"] = 5  # ... unless the head sets its own
    reference = deepmd_normalized(data, multitask=True)
    train = parse_input(data, base)
    for head in train.heads:
        model = reference["model"]["model_dict"][head.name]
        assert head.data_stat_nbatch == model["data_stat_nbatch"]
        assert list(head.model.type_map) == model["type_map"]
        assert head.model.e_sel == model["descriptor"]["repflow"]["e_sel"]
        assert head.model.dim_case_embd == model["fitting_net"]["dim_case_embd"]
        for field, value in vars(head.loss).items():
            assert value == reference["loss_dict"][head.name][field], (head.name, field)
    assert {head.name: head.data_stat_nbatch for head in train.heads} == {"molecules": 3, "water": 5}


@needs_shared
def test_multitask_on_the_shared_water_and_molecules(tmp_path):
    data = multitask_input("dpa3")
    data["training"]["data_dict"]["molecules"]["training_data"]["systems"] = "nopbc_molecules"
    train = parse_input(data, DATA)
    molecules, water = train.heads
    assert [Path(s).name for s in molecules.training_data.systems] == ["C1H4O2", "C3H3O4", "C4H3O1"]
    assert [Path(s).name for s in water.training_data.systems] == ["data_0", "data_1", "data_2"]
    assert molecules.model_prob == water.model_prob == 0.5  # three systems each


def test_model_prob_defaults_to_the_number_of_systems(base):
    # water has 3 training systems, molecules 2 (deepmd-kit's resolve_model_prob: ∝ get_nsystems())
    train = parse_input(multitask_input(), base)
    assert {head.name: head.model_prob for head in train.heads} == pytest.approx({"water": 0.6, "molecules": 0.4})


@pytest.mark.official
def test_model_prob_normalisation_matches_deepmd_kit(base):
    training_utils = pytest.importorskip("deepmd.dpmodel.utils.training_utils")
    data = multitask_input()
    data["training"]["model_prob"] = {"water": 2, "molecules": 6}
    train = parse_input(data, base)
    names = [head.name for head in train.heads]
    expected = training_utils.resolve_model_prob(names, data["training"]["model_prob"], {})
    assert [head.model_prob for head in train.heads] == pytest.approx(list(expected), rel=1e-15)
    assert [head.model_prob for head in train.heads] == pytest.approx([0.75, 0.25])
    del data["training"]["model_prob"]
    by_size = training_utils.resolve_model_prob(names, {}, {"molecules": [0, 1], "water": [0, 1, 2]})
    assert [head.model_prob for head in parse_input(data, base).heads] == pytest.approx(list(by_size))


@pytest.mark.parametrize(("model_prob", "message"), [
    ({"water": 1.0}, "must give every head a probability; missing \\['molecules'\\]"),
    ({"water": 1.0, "molecules": 1.0, "ice": 1.0}, "names \\['ice'\\], which are not heads"),
    ({"water": -1.0, "molecules": 1.0}, "finite number >= 0"),
    ({"water": 0, "molecules": 0}, "must not be all zero"),
])
def test_model_prob_errors(base, model_prob, message):
    data = multitask_input()
    data["training"]["model_prob"] = model_prob
    assert message.replace("\\", "") in error_of(data, base)


def test_sharing_level_zero_is_accepted_and_others_are_refused(base):
    data = multitask_input()
    data["model"]["model_dict"]["water"]["descriptor"] = "dpa3_descriptor:0"
    assert parse_input(data, base).heads[1].descriptor_key == "dpa3_descriptor"
    data["model"]["model_dict"]["water"]["descriptor"] = "dpa3_descriptor:1"
    assert "shares components at level 0 only" in error_of(data, base)
    data["model"]["model_dict"]["water"]["descriptor"] = "dpa3_descriptr"
    assert "'model.model_dict.water.descriptor' = 'dpa3_descriptr' names no entry" in error_of(data, base)


def test_dataset_encoding_width_must_agree_and_fit_the_heads(base):
    data = multitask_input("dpa2")
    data["model"]["model_dict"]["water"]["fitting_net"]["dim_case_embd"] = 2
    assert "same fitting_net.dim_case_embd" in error_of(data, base)
    data = multitask_input("dpa3")
    data["model"]["shared_dict"]["shared_fitting"]["dim_case_embd"] = 1
    assert "smaller than the number of heads (2)" in error_of(data, base)
    data["model"]["shared_dict"]["shared_fitting"]["dim_case_embd"] = 3  # room for a later head: allowed
    assert [head.case_index for head in parse_input(data, base).heads] == [0, 1]


def test_dpa2_style_with_dataset_encoding_indexes_every_head(base):
    # deepmd-kit sets the case embedding of every head when dim_case_embd > 0, shared fitting or not
    data = multitask_input("dpa2")
    for fitting in (data["model"]["model_dict"][name]["fitting_net"] for name in ("water", "molecules")):
        fitting["dim_case_embd"] = 2
    assert [head.case_index for head in parse_input(data, base).heads] == [0, 1]


def test_single_task_keeps_a_zero_case_embedding(base):
    data = minimal_input()
    data["model"]["fitting_net"]["dim_case_embd"] = 3
    head = parse_input(data, base).heads[0]
    assert head.model.dim_case_embd == 3 and head.case_index is None


def test_multitask_needs_one_shared_type_map(base):
    data = multitask_input()
    for head in data["model"]["model_dict"].values():
        head["type_map"] = ["O", "H", "C"]
    assert "takes its type_map from 'model.shared_dict'" in error_of(data, base)


def test_heads_can_be_picked_by_alias(base):
    data = multitask_input()
    data["model"]["model_dict"]["water"]["model_branch_alias"] = ["H2O"]
    train = parse_input(data, base)
    assert train.head("H2O").name == "water" and train.head("molecules").name == "molecules"
    with pytest.raises(Dpa3Error, match="no head named 'ice'; the heads are \\['molecules', 'water'\\]"):
        train.head("ice")


# --------------------------------------------------------------------------- key checks
@pytest.mark.parametrize(("edit", "path"), [
    (lambda d: d["training"].update(traning_data={}), "training.traning_data"),
    (lambda d: d.update(trainig={}), "trainig"),
    (lambda d: d["model"]["descriptor"]["repflow"].update(n_dimm=8), "model.descriptor.repflow.n_dimm"),
    (lambda d: d["model"]["fitting_net"].update(neurons=[8]), "model.fitting_net.neurons"),
    (lambda d: d["loss"].update(start_pref_x=1.0), "loss.start_pref_x"),
    (lambda d: d["learning_rate"].update(decay_phase_ratio=0.1), "learning_rate.decay_phase_ratio"),  # wsd's
    (lambda d: d["training"]["training_data"].update(numb_btch=2), "training.training_data.numb_btch"),
    (lambda d: d.update(loss_dict={}), "loss_dict"),  # multitask only
])
def test_unknown_keys_are_named_by_their_full_path(base, edit, path):
    data = minimal_input()
    edit(data)
    assert f"unknown key '{path}'" in error_of(data, base)


@pytest.mark.parametrize(("edit", "path"), [
    (lambda d: d["model"]["shared_dict"]["dpa3_descriptor"]["repflow"].update(e_dimm=4),
     "model.shared_dict.dpa3_descriptor.repflow.e_dimm"),
    (lambda d: d["model"]["model_dict"]["water"].update(fiting_net={}), "model.model_dict.water.fiting_net"),
    (lambda d: d["model"].update(data_stat_nbach=3), "model.data_stat_nbach"),
    (lambda d: d["loss_dict"].update(ice={}), "loss_dict.ice"),
    (lambda d: d["training"]["data_dict"]["water"].update(stat_fil="x"), "training.data_dict.water.stat_fil"),
    (lambda d: d["training"].update(training_data={}), "training.training_data"),  # single-task only
])
def test_unknown_multitask_keys_are_named_by_their_full_path(base, edit, path):
    data = multitask_input()
    edit(data)
    assert f"unknown key '{path}'" in error_of(data, base)


def test_comments_are_allowed_anywhere(base):
    data = multitask_input()
    data["_comment"] = "top"
    data["model"]["shared_dict"]["dpa3_descriptor"]["repflow"]["_note"] = "deep"
    data["training"]["data_dict"]["water"]["_why"] = "x"
    assert parse_input(data, base).heads[1].name == "water"


@pytest.mark.parametrize(("edit", "key"), [
    (lambda d: d["loss"].update(relative_f=0.1), "loss.relative_f"),
    (lambda d: d["loss"].update(start_pref_h=1.0, limit_pref_h=1.0), "loss.start_pref_h"),
    (lambda d: d["loss"].update(enable_atom_ener_coeff=True), "loss.enable_atom_ener_coeff"),
    (lambda d: d["loss"].update(f_use_norm=True), "loss.f_use_norm"),
    (lambda d: d["loss"].update(type="tensor"), "loss.type"),
    (lambda d: d["learning_rate"].update(type="cosine"), "learning_rate.type"),
    (lambda d: d.update(optimizer={"type": "LKF"}), "optimizer.type"),
    (lambda d: d["model"]["descriptor"].update(type="dpa2"), "model.descriptor.type"),
    (lambda d: d["model"]["descriptor"]["repflow"].update(e_sel="auto"), "model.descriptor.repflow.e_sel"),
    (lambda d: d["model"]["descriptor"].update(trainable=False), "model.descriptor.trainable"),
    (lambda d: d["model"]["fitting_net"].update(numb_fparam=2), "model.fitting_net.numb_fparam"),
    (lambda d: d["model"]["fitting_net"].update(atom_ener=[1.0, None]), "model.fitting_net.atom_ener"),
    (lambda d: d["model"].update(preset_out_bias={"energy": [1.0, None]}), "model.preset_out_bias"),
    (lambda d: d["model"].update(pair_exclude_types=[[0, 1]]), "model.pair_exclude_types"),
    (lambda d: d["model"].update(type="linear_ener"), "model.type"),
    (lambda d: d["training"].update(numb_epoch=3), "training.numb_epoch"),
    (lambda d: d["training"].update(zero_stage=2), "training.zero_stage"),
    (lambda d: d["training"].update(change_bias_after_training=True), "training.change_bias_after_training"),
    (lambda d: d["training"]["training_data"].update(min_pair_dist=0.5), "training.training_data.min_pair_dist"),
    (lambda d: d["training"]["training_data"].update(batch_size="filter:100"), "training.training_data.batch_size"),
    (lambda d: d.update(validating={"full_validation": True}), "validating.full_validation"),
])
def test_unsupported_options_are_refused_by_name(base, edit, key):
    data = minimal_input()
    edit(data)
    message = error_of(data, base)
    assert f"'{key}'" in message and "is not supported by dpa3-ref" in message


def test_options_without_effect_are_accepted_and_listed(base):
    data = minimal_input()
    data["training"].update(tensorboard=True, profiling=True, disp_training=False)
    data["model"]["descriptor"].update(seed=3, use_loc_mapping=False)
    data["validating"] = {"validation_freq": 10}
    train = parse_input(data, base)
    assert set(train.ignored) == {"training.tensorboard", "training.profiling", "model.descriptor.seed",
                                  "validating.validation_freq"}
    assert train.disp_training is False  # a logging switch we keep


@pytest.mark.parametrize(("edit", "key"), [
    (lambda d: d["training"].pop("training_data"), "training.training_data"),
    (lambda d: d["training"].pop("numb_steps"), "training.numb_steps"),
    (lambda d: d["learning_rate"].pop("start_lr"), "learning_rate.start_lr"),
    (lambda d: d.pop("loss"), "loss"),  # deepmd-kit's trainer reads config["loss"] unconditionally
    (lambda d: d.pop("learning_rate"), "learning_rate"),
    (lambda d: d["model"].pop("type_map"), "model.type_map"),
    (lambda d: d["model"]["descriptor"]["repflow"].pop("e_rcut"), "model.descriptor.repflow.e_rcut"),
    (lambda d: d["training"]["training_data"].pop("systems"), "training.training_data.systems"),
])
def test_missing_required_keys_are_named(base, edit, key):
    data = minimal_input()
    edit(data)
    assert f"missing required key '{key}'" in error_of(data, base)


@pytest.mark.parametrize(("edit", "key"), [
    (lambda d: d["loss_dict"].pop("water"), "loss_dict.water"),
    (lambda d: d["training"]["data_dict"].pop("molecules"), "training.data_dict.molecules"),
])
def test_every_head_needs_a_loss_and_data(base, edit, key):
    data = multitask_input()
    edit(data)
    assert f"missing required key '{key}'" in error_of(data, base)


def test_values_of_the_wrong_type_are_named(base):
    data = minimal_input()
    data["training"]["numb_steps"] = "100"
    assert "'training.numb_steps' must be an integer, got '100'" in error_of(data, base)
    data = minimal_input()
    data["loss"]["use_huber"] = 1
    assert "'loss.use_huber' must be true or false" in error_of(data, base)


def test_deepmd_aliases_are_accepted(base):
    data = minimal_input()
    data["training"]["stop_batch"] = data["training"].pop("numb_steps")
    data["model"]["fitting_net"]["n_neuron"] = [8, 8]
    repflow = data["model"]["descriptor"]["repflow"]
    repflow.update(edge_use_dist=True, use_env_envelope=True)
    data["training"]["training_data"].update(auto_prob_style="prob_uniform")
    data["training"]["validation_data"] = {"systems": "water/data_3", "numb_batch": 3}
    data["loss"]["type"] = "ener_hess"
    train = parse_input(data, base)
    head = train.heads[0]
    assert train.numb_steps == 10 and head.model.fitting_neuron == (8, 8)
    assert head.model.edge_init_use_dist and head.model.use_exp_switch
    assert head.training_data.auto_prob == "prob_uniform" and head.validation_data.numb_btch == 3
    data["training"]["numb_steps"] = 10
    assert "is given twice, as ['numb_steps', 'stop_batch']" in error_of(data, base)


def test_learning_rate_rules_of_argcheck(base):
    data = minimal_input()
    data["learning_rate"].update(stop_lr=1e-5, stop_lr_ratio=0.01)
    assert "'stop_lr' and 'stop_lr_ratio' exclude each other" in error_of(data, base).replace("learning_rate.", "")
    data = minimal_input()
    data["learning_rate"]["stop_lr_ratio"] = 0.01
    lr = parse_input(data, base).learning_rate
    assert (lr.stop_lr, lr.stop_lr_ratio) == (None, 0.01)
    data["learning_rate"]["decay_rate"] = 1.5
    assert "'learning_rate.decay_rate' must be in (0, 1]" in error_of(data, base)


def test_skip_stat_forces_the_fixed_std(base):
    data = minimal_input()
    data["model"]["descriptor"]["repflow"].update(skip_stat=True, fix_stat_std=0.0)
    assert parse_input(data, base).heads[0].model.fix_stat_std == 0.3  # dpmodel/descriptor/dpa3.py


# --------------------------------------------------------------------------- systems and batches
def test_a_directory_is_every_system_below_it_sorted(base):
    data = minimal_input()
    data["training"]["training_data"]["systems"] = "molecules"
    assert parse_input(data, base).heads[0].training_data.systems == tuple(str(base / m) for m in MOLECULES)


def test_rglob_patterns_pick_systems_below_each_path(base):
    data = minimal_input()
    data["training"]["training_data"].update(systems=["."], rglob_patterns=["data_[12]", "C4*"])
    systems = parse_input(data, base).heads[0].training_data.systems
    assert systems == (str(base / "water/data_1"), str(base / "water/data_2"), str(base / "molecules/C4H3O1"))
    data["training"]["training_data"]["rglob_patterns"] = ["ice*"]
    assert "pattern 'ice*' matches no system" in error_of(data, base)


def test_paths_that_give_no_system_are_named(base):
    (base / "empty").mkdir()
    data = minimal_input()
    data["training"]["training_data"]["systems"] = ["water/data_0", "empty"]
    message = error_of(data, base)
    assert "'training.training_data.systems'" in message and str(base / "empty") in message


def test_batch_size_rules(base):
    data = minimal_input()
    data["training"]["training_data"]["batch_size"] = [1, 2]  # 4 systems below water/
    assert "one positive integer per system (4)" in error_of(data, base)
    data["training"]["training_data"]["batch_size"] = "auto:0"
    assert "'training.training_data.batch_size' = 'auto:0'" in error_of(data, base)
    # deepmd/pt/utils/dataloader.py: auto:N is the smallest b with b*n >= N, max:N the largest b with b*n <= N
    assert DataConfig(("a",), "auto").batch_size_of(0, 192) == 1
    assert DataConfig(("a",), "auto").batch_size_of(0, 7) == 5  # 5*7 = 35 >= 32 > 28 = 4*7
    assert DataConfig(("a",), "auto:100").batch_size_of(0, 7) == 15  # 105 >= 100 > 98
    assert DataConfig(("a",), "max:100").batch_size_of(0, 7) == 14  # 98 <= 100 < 105
    assert DataConfig(("a",), "max:100").batch_size_of(0, 192) == 1
    assert DataConfig(("a", "b"), (3, 4)).batch_size_of(1, 7) == 4


def test_auto_prob_blocks_and_sys_probs_are_checked(base):
    data = minimal_input()
    data["training"]["training_data"]["auto_prob"] = "prob_sys_size;0:2:0.5;2:4:0.5"
    assert parse_input(data, base).heads[0].training_data.auto_prob == "prob_sys_size;0:2:0.5;2:4:0.5"
    data["training"]["training_data"]["auto_prob"] = "prob_sys_size;0:5:1"
    assert "0 <= start < end <= 4" in error_of(data, base)
    data = minimal_input()
    data["training"]["training_data"]["sys_probs"] = [0.5, 0.5]
    assert "'training.training_data.sys_probs' has 2 entries for 4 systems" in error_of(data, base)


# --------------------------------------------------------------------------- JSON round trip
@pytest.mark.parametrize("make", [water_input, lambda: multitask_input("dpa3"), lambda: multitask_input("dpa2")])
def test_round_trips_through_json(base, make):
    data = make()
    if "loss" in data:
        data["loss"]["huber_delta"] = [0.1, 0.2, 0.3]  # a tuple-valued field
    train = parse_input(data, base)
    text = to_json(train)
    assert json.loads(text)["heads"][0]["model"]["type_map"]  # plain JSON
    assert from_json(text) == train

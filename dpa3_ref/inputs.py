"""deepmd-kit's training `input.json`, single-task and multitask, read into frozen dataclasses.

The key names, aliases and defaults are deepmd-kit 3.2.0's (`deepmd/utils/argcheck.py`), and the input goes
through the same three steps as in `dp --pt train` (`deepmd/pt/entrypoints/main.py`, `train`):

1. **Multitask expansion** (`preprocess_shared_params`): keys written directly under `model` other than
   `model_dict` and `shared_dict` are copied into every head that does not set them; a head's `type_map`,
   `descriptor` or `fitting_net` given as a string `"name"` or `"name:level"` is replaced by
   `model.shared_dict[name]`, and components with the same name are shared. Exactly one shared `type_map`
   name may be referenced. dpa3-ref shares at level 0 only (everything; for a fitting net everything but the
   per-task `bias_atom_e` and `case_embd`, spec §8).
2. **Compatibility** (`update_deepmd_input`): v3.1 optimizer keys in `training` (`opt_type`, `weight_decay`,
   `adam_beta1`, `adam_beta2`) move to the `optimizer` section, legacy warmup keys in `training` move to
   `learning_rate`, and `training.numb_test` is dropped. A quirk worth knowing: this step fills a missing
   `optimizer.weight_decay` with 0.0 for Adam **and AdamW**, so the AdamW default 0.001 in argcheck never
   reaches a run started with `dp train`; we do the same.
3. **Defaults and checks** (`normalize`): every key has argcheck's default; `stop_lr` defaults to 5e-8 when
   neither `stop_lr` nor `stop_lr_ratio` is given.

Dataset encoding (spec §6.4, `get_case_embd_config` in `deepmd/pt/train/training.py`): the user sets
`fitting_net.dim_case_embd` (deepmd-kit does not set it); it must be the same for every head; when it is
non-zero, head `name` gets the one-hot index `sorted(head names).index(name)`, which must be below
`dim_case_embd`. A single-task model keeps a zero case embedding (no index).

Sampling (spec §8, `resolve_model_prob`): `training.model_prob` must name every head and is normalised; when
it is missing or empty each head's probability is proportional to its number of training systems.

dpa3-ref's own rules on top: an unknown key anywhere is an error naming its full path (keys starting with
"_" are comments, as in deepmd-kit); a key deepmd-kit accepts but dpa3-ref does not implement is an error when
it is set to anything but its default; keys that cannot change the numbers here (logging, profiling, parameter
seeds of torch's generator) are accepted and listed in `TrainInput.ignored`. System paths are taken relative
to the input file's directory (deepmd-kit takes them relative to the working directory, which is the same
when `dp train` runs where its input is).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from dpa3_ref.config import REPFLOW_KEYS, DPA3Config
from dpa3_ref.data import dataset_paths
from dpa3_ref.errors import Dpa3Error

SINGLE_TASK_HEAD = "Default"  # deepmd-kit's model key of a single-task model


# =========================================================================== the configuration
@dataclasses.dataclass(frozen=True)
class LossConfig:
    """`loss` (or `loss_dict[head]`), type "ener" (spec §9.1–9.2)."""

    start_pref_e: float = 0.02
    limit_pref_e: float = 1.0
    start_pref_f: float = 1000.0
    limit_pref_f: float = 1.0
    start_pref_v: float = 0.0
    limit_pref_v: float = 0.0
    start_pref_ae: float = 0.0  # per-atom energy term (atom_ener labels)
    limit_pref_ae: float = 0.0
    loss_func: str = "mse"  # "mse" | "mae"
    use_huber: bool = False
    huber_delta: float | tuple[float, float, float] = 0.01  # one delta, or (energy, force, virial)
    intensive_ener_virial: bool = False  # 1/N² instead of 1/N for the MSE energy and virial terms


@dataclasses.dataclass(frozen=True)
class LearningRateConfig:
    """`learning_rate`, type "exp" (spec §9.3); stop_lr and stop_lr_ratio exclude each other."""

    start_lr: float
    stop_lr: float | None = 5e-8  # argcheck's fallback when neither stop_lr nor stop_lr_ratio is given
    stop_lr_ratio: float | None = None
    decay_steps: int = 5000
    decay_rate: float | None = None
    warmup_steps: int = 0
    warmup_ratio: float | None = None
    warmup_start_factor: float = 0.0
    smooth: bool = False


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """`optimizer`: "Adam" (weight decay as an L2 term in the gradient) or "AdamW" (decoupled)."""

    type: str = "Adam"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 0.0  # for AdamW too: see the module docstring


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """`training_data` / `validation_data` of one head, with `systems` already expanded into system paths."""

    systems: tuple[str, ...]  # one deepmd/npy directory or extxyz file each, in deepmd-kit's order
    batch_size: int | str | tuple[int, ...] = "auto"  # int, one per system, "auto", "auto:N" or "max:N"
    auto_prob: str = "prob_sys_size"  # "prob_uniform", "prob_sys_size" or "prob_sys_size;a:b:w;..."
    sys_probs: tuple[float, ...] | None = None  # one per system; overrides auto_prob
    numb_btch: int = 1  # batches per validation (validation data only)

    def batch_size_of(self, system: int, n_atoms: int) -> int:
        """The batch size of system number `system` with `n_atoms` atoms (deepmd/pt/utils/dataloader.py):
        "auto:N" is the smallest b with b·n_atoms >= N ("auto" = "auto:32"); "max:N" the largest b with
        b·n_atoms <= N, at least 1."""
        if isinstance(self.batch_size, int):
            return self.batch_size
        if isinstance(self.batch_size, tuple):
            return self.batch_size[system]
        rule, _, number = self.batch_size.partition(":")
        limit = int(number) if number else 32
        if rule == "auto":
            return -(-limit // n_atoms)
        return max(limit // n_atoms, 1)


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    """One task of the model; a single-task input has exactly one, named "Default"."""

    name: str
    model: DPA3Config  # the full model of this head (dim_case_embd as the input sets it)
    descriptor_key: str  # the shared_dict name when shared, else f"{name}/descriptor"
    fitting_key: str  # the shared_dict name when shared, else f"{name}/fitting_net"
    case_index: int | None  # one-hot index of dataset encoding (multitask, dim_case_embd > 0); None: all zeros
    loss: LossConfig
    training_data: DataConfig
    validation_data: DataConfig | None
    model_prob: float  # probability of drawing this head at a step (normalised over the heads)
    data_stat_nbatch: int = 10  # batches per system for the statistics (spec §6.3)
    data_stat_protect: float = 1e-2
    data_bias_nsample: int = 10  # batches per system when fine-tuning re-fits the energy bias
    stat_file: str | None = None  # statistics cache (relative to the working directory, like deepmd-kit)
    stat_file_mode: str = "update"  # "update": write what is missing; "read": the cache must be complete
    finetune_head: str | None = None  # the head of a multitask model to fine-tune from
    aliases: tuple[str, ...] = ()  # model_branch_alias: other names that pick this head


@dataclasses.dataclass(frozen=True)
class TrainInput:
    """A whole training input. `heads` are sorted by name."""

    heads: tuple[HeadConfig, ...]
    multitask: bool
    learning_rate: LearningRateConfig
    optimizer: OptimizerConfig
    numb_steps: int
    seed: int | None
    disp_file: str = "lcurve.out"
    disp_freq: int = 1000
    save_freq: int = 1000
    save_ckpt: str = "model.ckpt"
    max_ckpt_keep: int = 5
    gradient_max_norm: float = 0.0  # 0 = no clipping
    stat_file: str | None = None  # single-task stat_file (multitask: per head)
    enable_ema: bool = False
    ema_decay: float = 0.999
    disp_training: bool = True
    time_training: bool = True
    ignored: tuple[str, ...] = ()  # keys set in the input that have no effect in dpa3-ref
    source: Path = Path("input.json")
    raw: dict = dataclasses.field(default_factory=dict)  # the input as read

    def head(self, name: str) -> HeadConfig:
        """The head called `name` or carrying it as an alias."""
        for head in self.heads:
            if name == head.name or name in head.aliases:
                return head
        raise Dpa3Error(f"{self.source}: no head named {name!r}; the heads are {[h.name for h in self.heads]}")


# =========================================================================== entry points
def read_input(path: str | Path) -> TrainInput:
    """Read and check a deepmd-kit training input file: JSON, or YAML for a .yaml/.yml file (as `dp train`)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise Dpa3Error(f"{path}: cannot read the input file ({error.strerror})") from error
    try:
        data = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise Dpa3Error(f"{path}: not valid {'YAML' if path.suffix in ('.yaml', '.yml') else 'JSON'} "
                        f"({error})") from error
    return parse_input(data, path.parent, source=str(path))


def parse_input(data: dict, base_dir: str | Path, source: str = "input.json") -> TrainInput:
    """Check a training input given as a dict; system paths are relative to `base_dir`."""
    reader = _Reader(source, Path(base_dir))
    raw = copy.deepcopy(data)
    top = _Section(data, "", reader)
    multitask = isinstance(top.data.get("model"), dict) and "model_dict" in top.data["model"]
    training = top.section("training")
    learning_rate = _learning_rate(top, training)
    optimizer = _optimizer(top, training)
    models = _multitask_models(top.section("model")) if multitask else _single_task_model(top.section("model"))
    heads = _heads(top, training, models, multitask)
    settings = _training_settings(training)
    if "validating" in top.data:
        _validating(top.section("validating"))
    top.unsupported("nvnmd", None)  # the TensorFlow backend's NVNMD hardware
    top.done()
    return TrainInput(
        heads=heads, multitask=multitask, learning_rate=learning_rate, optimizer=optimizer,
        stat_file=None if multitask else heads[0].stat_file, ignored=tuple(dict.fromkeys(reader.ignored)),
        source=Path(source), raw=raw, **settings,
    )


def to_dict(train_input: TrainInput) -> dict[str, Any]:
    """Plain JSON types: tuples become lists, paths strings."""

    def plain(value: Any) -> Any:
        if isinstance(value, DPA3Config):
            return value.to_dict()
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (tuple, list)):
            return [plain(item) for item in value]
        if isinstance(value, Path):
            return str(value)
        return value

    return plain(train_input)


def from_dict(data: dict[str, Any]) -> TrainInput:
    """The inverse of `to_dict` (no file-system access: the systems are stored expanded)."""

    def flat(cls: type, values: dict[str, Any] | None) -> Any:
        if values is None:
            return None
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    heads = tuple(
        HeadConfig(**{
            **head, "model": DPA3Config.from_dict(head["model"]), "loss": flat(LossConfig, head["loss"]),
            "training_data": flat(DataConfig, head["training_data"]),
            "validation_data": flat(DataConfig, head["validation_data"]), "aliases": tuple(head["aliases"]),
        })
        for head in data["heads"]
    )
    return TrainInput(**{
        **data, "heads": heads, "learning_rate": flat(LearningRateConfig, data["learning_rate"]),
        "optimizer": flat(OptimizerConfig, data["optimizer"]), "ignored": tuple(data["ignored"]),
        "source": Path(data["source"]),
    })


def to_json(train_input: TrainInput) -> str:
    return json.dumps(to_dict(train_input), indent=1)


def from_json(text: str) -> TrainInput:
    return from_dict(json.loads(text))


# =========================================================================== reading one JSON object
_REQUIRED = object()
_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list",
               dict: "a JSON object"}


class _Reader:
    """What all sections of one input share: its name for messages, its directory, the ignored keys."""

    def __init__(self, source: str, base_dir: Path):
        self.source, self.base_dir = source, base_dir
        self.ignored: list[str] = []

    def error(self, message: str) -> Dpa3Error:
        return Dpa3Error(f"{self.source}: {message}")


class _Section:
    """One JSON object of the input, read key by key; a key still unread at `done()` is an unknown key."""

    def __init__(self, data: Any, path: str, reader: _Reader):
        if not isinstance(data, dict):
            raise reader.error(f"{repr(path) if path else 'the input'} must be a JSON object, "
                               f"got {type(data).__name__}")
        self.data = {k: v for k, v in data.items() if not k.startswith("_")}  # "_..." keys are comments
        self.path, self.reader, self.read = path, reader, set()

    def key_path(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str, message: str) -> Dpa3Error:
        return self.reader.error(f"'{self.key_path(key)}' {message}")

    def get(self, key: str, default: Any = _REQUIRED, kind: type | tuple[type, ...] | None = None,
            aliases: Sequence[str] = ()) -> Any:
        """The value of `key` (or of one of its aliases), checked to be of `kind`; None passes when the
        default is None."""
        given = [name for name in (key, *aliases) if name in self.data]
        self.read.update((key, *aliases))
        if len(given) > 1:
            raise self.error(key, f"is given twice, as {given} (aliases of one option)")
        if not given:
            if default is _REQUIRED:
                raise self.reader.error(f"missing required key '{self.key_path(key)}'")
            return default
        value = self.data[given[0]]
        if kind is None or (value is None and default is None):
            return value
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds:
            raise self.error(key, f"must be {_TYPE_NAMES[kinds[0]]}, got {value!r}")
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if not isinstance(value, kinds):
            raise self.error(key, f"must be {' or '.join(_TYPE_NAMES[k] for k in kinds)}, got {value!r}")
        return value

    def section(self, key: str, default: Any = _REQUIRED) -> _Section | None:
        value = self.get(key, default)
        return None if value is None else _Section(value, self.key_path(key), self.reader)

    def unsupported(self, key: str, default: Any, aliases: Sequence[str] = ()) -> None:
        """A deepmd-kit option dpa3-ref does not implement: only its default (or leaving it out) is accepted."""
        value = self.get(key, default, aliases=aliases)
        if value != default and value is not None:
            raise self.error(key, f"= {value!r} is not supported by dpa3-ref (only {default!r})")

    def ignore(self, key: str, default: Any = None, aliases: Sequence[str] = ()) -> None:
        """A deepmd-kit option without effect here: accepted, and listed in `TrainInput.ignored` when set."""
        if self.get(key, default, aliases=aliases) != default:
            self.reader.ignored.append(self.key_path(key))

    def done(self) -> None:
        unknown = [key for key in self.data if key not in self.read]
        if unknown:
            more = f" (and {unknown[1:]})" if len(unknown) > 1 else ""
            raise self.reader.error(f"unknown key '{self.key_path(unknown[0])}'{more}")


def _positive(section: _Section, key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise section.error(key, f"must be {'>= 0' if allow_zero else 'positive'}, got {value}")


# =========================================================================== learning rate, optimizer, loss
def _learning_rate(top: _Section, training: _Section) -> LearningRateConfig:
    section = top.section("learning_rate")
    lr_type = section.get("type", "exp", str)
    if lr_type != "exp":
        raise section.error("type", f"= {lr_type!r} is not supported by dpa3-ref (only 'exp')")
    legacy = {key: training.get(key) for key in ("warmup_steps", "warmup_ratio", "warmup_start_factor")
              if key in training.data}  # deepmd-kit moves these from training (compat.migrate_training_warmup)
    for key in legacy:
        if key in section.data:
            raise training.error(key, "is also given in 'learning_rate'; give it once, in 'learning_rate'")
    section.data.update(legacy)
    section.ignore("scale_by_worker", "linear")  # TensorFlow backend only
    values = {
        "start_lr": section.get("start_lr", kind=float),
        "stop_lr": section.get("stop_lr", None, float),
        "stop_lr_ratio": section.get("stop_lr_ratio", None, float),
        "decay_steps": section.get("decay_steps", 5000, int),
        "decay_rate": section.get("decay_rate", None, float),
        "warmup_steps": section.get("warmup_steps", 0, int),
        "warmup_ratio": section.get("warmup_ratio", None, float),
        "warmup_start_factor": section.get("warmup_start_factor", 0.0, float),
        "smooth": section.get("smooth", False, bool),
    }
    section.done()
    if values["stop_lr"] is not None and values["stop_lr_ratio"] is not None:
        raise section.error("stop_lr", "and 'stop_lr_ratio' exclude each other; give one")
    if values["stop_lr"] is None and values["stop_lr_ratio"] is None:
        values["stop_lr"] = 5e-8
    if values["warmup_steps"] != 0 and values["warmup_ratio"] is not None:
        raise section.error("warmup_steps", "and 'warmup_ratio' exclude each other; give one")
    _positive(section, "decay_steps", values["decay_steps"])
    _positive(section, "warmup_steps", values["warmup_steps"], allow_zero=True)
    if values["decay_rate"] is not None and not 0 < values["decay_rate"] <= 1:
        raise section.error("decay_rate", f"must be in (0, 1], got {values['decay_rate']}")
    return LearningRateConfig(**values)


_LEGACY_OPTIMIZER_KEYS = {"opt_type": "type", "adam_beta1": "adam_beta1", "adam_beta2": "adam_beta2",
                          "weight_decay": "weight_decay"}  # v3.1 layout: in training (compat.py)
_OTHER_OPTIMIZER_KEYS = ("kf_blocksize", "kf_start_pref_e", "kf_limit_pref_e", "kf_start_pref_f",
                         "kf_limit_pref_f", "momentum", "muon_momentum", "lr_adjust", "lr_adjust_coeff",
                         "muon_2d_only", "min_2d_dim")


def _optimizer(top: _Section, training: _Section) -> OptimizerConfig:
    section = top.section("optimizer", {})
    for key in _OTHER_OPTIMIZER_KEYS:
        training.unsupported(key, None)  # options of the LKF and Muon optimizers
    moved = {new: training.get(old) for old, new in _LEGACY_OPTIMIZER_KEYS.items() if old in training.data}
    section.data.update(moved)  # as in deepmd-kit, the legacy keys win over the optimizer section
    optimizer_type = section.get("type", "Adam", str)
    if optimizer_type not in ("Adam", "AdamW"):
        raise section.error("type", f"= {optimizer_type!r} is not supported by dpa3-ref (only 'Adam', 'AdamW')")
    config = OptimizerConfig(
        type=optimizer_type,
        adam_beta1=section.get("adam_beta1", 0.9, float),
        adam_beta2=section.get("adam_beta2", 0.999, float),
        weight_decay=section.get("weight_decay", 0.0, float),
    )
    section.done()
    return config


_LOSS_UNSUPPORTED = {  # ener-loss options of deepmd-kit that dpa3-ref does not implement, with their defaults
    "start_pref_h": 0.0, "limit_pref_h": 0.0, "start_pref_pf": 0.0, "limit_pref_pf": 0.0,
    "use_default_pf": False, "relative_f": None, "enable_atom_ener_coeff": False, "start_pref_gf": 0.0,
    "limit_pref_gf": 0.0, "numb_generalized_coord": 0, "f_use_norm": False,
}


def _loss(section: _Section) -> LossConfig:
    loss_type = section.get("type", "ener", str)
    if loss_type not in ("ener", "ener_hess"):  # ener_hess: argcheck's legacy alias of ener
        raise section.error("type", f"= {loss_type!r} is not supported by dpa3-ref (only 'ener')")
    for key, default in _LOSS_UNSUPPORTED.items():
        section.unsupported(key, default)
    values = {}
    for field in dataclasses.fields(LossConfig):
        if field.name == "huber_delta":
            delta = section.get("huber_delta", field.default, (float, list))
            if isinstance(delta, list):
                if len(delta) != 3 or not all(isinstance(d, (int, float)) and not isinstance(d, bool) for d in delta):
                    raise section.error("huber_delta", f"must be a number or 3 numbers (energy, force, virial), "
                                                       f"got {delta!r}")
                delta = tuple(float(d) for d in delta)
            values["huber_delta"] = delta
        else:
            values[field.name] = section.get(field.name, field.default, type(field.default))
    section.done()
    if values["loss_func"] not in ("mse", "mae"):
        raise section.error("loss_func", f"= {values['loss_func']!r} is not supported (only 'mse', 'mae')")
    for key in ("start_pref_e", "limit_pref_e", "start_pref_f", "limit_pref_f", "start_pref_v", "limit_pref_v",
                "start_pref_ae", "limit_pref_ae"):
        _positive(section, key, values[key], allow_zero=True)
    return LossConfig(**values)


# =========================================================================== data
def _data(section: _Section, validation: bool) -> DataConfig:
    systems = section.get("systems", kind=(str, list))
    patterns = section.get("rglob_patterns", None, list)
    expanded = _expand_systems(section, systems, patterns)
    batch_size = section.get("batch_size", "auto", (int, str, list))
    auto_prob = section.get("auto_prob", "prob_sys_size", str, aliases=("auto_prob_style",))
    sys_probs = section.get("sys_probs", None, list, aliases=("sys_weights",))
    numb_btch = section.get("numb_btch", 1, int, aliases=("numb_batch",)) if validation else 1
    if not validation:
        section.unsupported("min_pair_dist", 0.0)
    section.ignore("set_prefix")  # removed from deepmd-kit, no effect
    section.done()
    config = DataConfig(
        systems=expanded, batch_size=_batch_size(section, batch_size, len(expanded)),
        auto_prob=_auto_prob(section, auto_prob, len(expanded)),
        sys_probs=None if sys_probs is None else tuple(float(p) for p in sys_probs), numb_btch=numb_btch,
    )
    if config.sys_probs is not None and len(config.sys_probs) != len(expanded):
        raise section.error("sys_probs", f"has {len(config.sys_probs)} entries for {len(expanded)} systems")
    _positive(section, "numb_btch", numb_btch)
    return config


def _expand_systems(section: _Section, systems: str | list, patterns: list | None) -> tuple[str, ...]:
    """deepmd-kit's `process_systems`: each path is a system or a directory searched for every system below
    it (with `rglob_patterns`: the directories below it matching a pattern that hold a type.raw). deepmd-kit
    keeps the file system's order within a directory; we sort it, so that runs are reproducible."""
    paths = [systems] if isinstance(systems, str) else systems
    if not paths or not all(isinstance(p, str) for p in paths):
        raise section.error("systems", f"must be a path or a non-empty list of paths, got {systems!r}")
    base = section.reader.base_dir
    if any(path.endswith(".lmdb") or (base / path / "data.mdb").is_file() for path in paths):
        raise section.error("systems", f"= {systems!r}: LMDB datasets are not supported by dpa3-ref")
    if patterns is None:
        try:
            return tuple(str(p) for p in dataset_paths([str(base / p) for p in paths]))
        except Dpa3Error as error:
            raise section.reader.error(f"'{section.key_path('systems')}': {error}") from error
    found = []
    for path in paths:
        for pattern in patterns:
            matches = sorted(d for d in (base / path).rglob(pattern) if (d / "type.raw").is_file())
            if not matches:
                raise section.error("rglob_patterns", f"pattern {pattern!r} matches no system below {base / path}")
            found.extend(str(d) for d in matches)
    return tuple(found)


def _batch_size(section: _Section, value: int | str | list, n_systems: int) -> int | str | tuple[int, ...]:
    if isinstance(value, list):
        if len(value) != n_systems or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0
                                              for b in value):
            raise section.error("batch_size", f"must list one positive integer per system ({n_systems}), "
                                              f"got {value!r}")
        return tuple(value)
    if isinstance(value, int):
        _positive(section, "batch_size", value)
        return value
    rule, colon, number = value.partition(":")
    if value == "auto" or (rule in ("auto", "max") and colon and number.isdigit() and int(number) > 0):
        return value
    if rule in ("filter", "mixed", "mix"):
        raise section.error("batch_size", f"= {value!r} is not supported by dpa3-ref "
                                          "(only an integer, a list, 'auto', 'auto:N', 'max:N')")
    raise section.error("batch_size", f"= {value!r} is not an integer, a list, 'auto', 'auto:N' or 'max:N'")


def _auto_prob(section: _Section, value: str, n_systems: int) -> str:
    """'prob_uniform', 'prob_sys_size' or 'prob_sys_size;start:end:weight;...' (system index blocks)."""
    if value in ("prob_uniform", "prob_sys_size"):
        return value
    style, *blocks = value.split(";")
    if style != "prob_sys_size" or not blocks or not all(_valid_block(block, n_systems) for block in blocks):
        raise section.error("auto_prob", f"= {value!r}: expected 'prob_uniform', 'prob_sys_size' or "
                                         f"'prob_sys_size;start:end:weight;...' with 0 <= start < end <= "
                                         f"{n_systems} (the number of systems) and weight >= 0")
    return value


def _valid_block(block: str, n_systems: int) -> bool:
    parts = block.split(":")
    try:
        start, end, weight = int(parts[0]), int(parts[1]), float(parts[2])
    except (ValueError, IndexError):
        return False
    return len(parts) == 3 and 0 <= start < end <= n_systems and weight >= 0


# =========================================================================== model sections
def _descriptor(section: _Section) -> dict[str, Any]:
    """A `dpa3` descriptor section, checked key by key, as the dict `DPA3Config.from_deepmd` reads."""
    descriptor_type = section.get("type", kind=str)
    if descriptor_type != "dpa3":
        raise section.error("type", f"= {descriptor_type!r} is not supported by dpa3-ref (only 'dpa3')")
    repflow_section = section.section("repflow")
    aliases = {"edge_init_use_dist": ("edge_use_dist",), "use_exp_switch": ("use_env_envelope",)}
    required = ("e_rcut", "e_rcut_smth", "e_sel", "a_rcut", "a_rcut_smth", "a_sel")
    defaults = {f.name: f.default for f in dataclasses.fields(DPA3Config)}
    repflow = {}
    for key in REPFLOW_KEYS:
        default = _REQUIRED if key in required else defaults[key]
        if key.endswith("_sel") and isinstance(repflow_section.data.get(key), str):
            raise repflow_section.error(key, f"= {repflow_section.data[key]!r} (a selection from neighbour "
                                             "statistics) is not supported by dpa3-ref; give an integer")
        kind = int if key in ("e_sel", "a_sel") else type(defaults[key])
        repflow[key] = repflow_section.get(key, default, kind, aliases=aliases.get(key, ()))
    if repflow_section.get("skip_stat", False, bool):  # deprecated: forces fix_stat_std = 0.3 (dpmodel dpa3.py)
        repflow["fix_stat_std"] = 0.3
    repflow_section.done()
    values = {"type": "dpa3", "repflow": repflow}
    for key in ("concat_output_tebd", "activation_function", "precision", "env_protection", "use_tebd_bias"):
        values[key] = section.get(key, defaults[key], type(defaults[key]))
    values["exclude_types"] = section.get("exclude_types", [], list)
    section.unsupported("add_chg_spin_ebd", False)
    section.unsupported("default_chg_spin", None)
    section.unsupported("use_econf_tebd", False)
    section.unsupported("trainable", True)
    section.ignore("seed")  # seeds torch's generator; our initialisation uses training.seed
    section.get("use_loc_mapping", True, bool)  # an implementation choice of deepmd-kit, same numbers
    section.done()
    return values


def _fitting(section: _Section) -> dict[str, Any]:
    """An `ener` fitting_net section, checked key by key."""
    fitting_type = section.get("type", "ener", str)
    if fitting_type != "ener":
        raise section.error("type", f"= {fitting_type!r} is not supported by dpa3-ref (only 'ener')")
    defaults = {f.name: f.default for f in dataclasses.fields(DPA3Config)}
    values = {
        "neuron": section.get("neuron", [120, 120, 120], list, aliases=("n_neuron",)),
        "activation_function": section.get("activation_function", "tanh", str),
        "precision": section.get("precision", "default", str),
        "resnet_dt": section.get("resnet_dt", defaults["fitting_resnet_dt"], bool),
        "dim_case_embd": section.get("dim_case_embd", 0, int),
    }
    trainable = section.get("trainable", True, (bool, list))
    if trainable is not True and not (isinstance(trainable, list) and all(t is True for t in trainable)):
        raise section.error("trainable", f"= {trainable!r} is not supported by dpa3-ref (only true)")
    for key, default in (("numb_fparam", 0), ("numb_aparam", 0), ("default_fparam", None), ("rcond", None),
                         ("atom_ener", []), ("layer_name", None), ("use_aparam_as_mask", False)):
        section.unsupported(key, default)
    section.ignore("seed")
    section.done()
    return values


_MODEL_KEYS_SUPPORTED = ("type_map", "descriptor", "fitting_net", "data_stat_nbatch", "data_stat_protect",
                         "data_bias_nsample", "finetune_head", "model_branch_alias", "info", "type",
                         "bridging_method")
_MODEL_KEYS_UNSUPPORTED = {  # model options of deepmd-kit that dpa3-ref does not implement, with their defaults
    "use_srtab": None, "smin_alpha": None, "sw_rmin": None, "sw_rmax": None, "pair_exclude_types": [],
    "atom_exclude_types": [], "preset_out_bias": None, "type_embedding": None, "modifier": None,
    "compress": None, "spin": None,
}
_MODEL_KEYS_IGNORED = {"srtab_add_bias": True, "bridging_r_inner": 0.5, "bridging_r_outer": 0.8}


@dataclasses.dataclass(frozen=True)
class _Model:
    """One head's model as read: the config, where its parts come from, and the per-model settings."""

    config: DPA3Config
    descriptor_key: str | None  # the shared_dict name, None when the head has its own
    fitting_key: str | None
    settings: dict[str, Any]


def _model_settings(section: _Section) -> dict[str, Any]:
    """The keys of a model section besides type_map, descriptor and fitting_net."""
    model_type = section.get("type", "standard", str)
    if model_type != "standard":
        raise section.error("type", f"= {model_type!r} is not supported by dpa3-ref (only 'standard')")
    for key, default in _MODEL_KEYS_UNSUPPORTED.items():
        section.unsupported(key, default)
    for key, default in _MODEL_KEYS_IGNORED.items():
        section.ignore(key, default)
    bridging = section.get("bridging_method", "None", str)
    if bridging.lower() != "none":
        raise section.error("bridging_method", f"= {bridging!r} is not supported by dpa3-ref (only 'None')")
    section.get("info", {}, dict)  # free-form metadata, kept in TrainInput.raw
    settings = {
        "data_stat_nbatch": section.get("data_stat_nbatch", 10, int),
        "data_stat_protect": section.get("data_stat_protect", 1e-2, float),
        "data_bias_nsample": section.get("data_bias_nsample", 10, int),
        "finetune_head": section.get("finetune_head", None, str),
        "aliases": tuple(section.get("model_branch_alias", [], list)),
    }
    if not all(isinstance(alias, str) for alias in settings["aliases"]):
        raise section.error("model_branch_alias", f"must be a list of names, got {list(settings['aliases'])}")
    _positive(section, "data_stat_nbatch", settings["data_stat_nbatch"])
    return settings


def _build(section: _Section, type_map: Any, descriptor: dict, fitting: dict) -> DPA3Config:
    if not isinstance(type_map, list) or not all(isinstance(t, str) for t in type_map):
        raise section.error("type_map", f"must be a list of element names, got {type_map!r}")
    try:
        return DPA3Config.from_deepmd({"type_map": type_map, "descriptor": descriptor, "fitting_net": fitting})
    except (Dpa3Error, TypeError) as error:  # TypeError: a value of the wrong type reached the dataclass
        raise section.reader.error(f"'{section.path}': {error}") from error


def _single_task_model(section: _Section) -> dict[str, _Model]:
    settings = _model_settings(section)
    config = _build(section, section.get("type_map", kind=list), _descriptor(section.section("descriptor")),
                    _fitting(section.section("fitting_net")))
    section.done()
    return {SINGLE_TASK_HEAD: _Model(config, None, None, settings)}


def _multitask_models(section: _Section) -> dict[str, _Model]:
    """`model.model_dict` with its `shared_dict` references resolved (deepmd-kit's preprocess_shared_params)."""
    shared = section.section("shared_dict", {})
    model_dict = section.section("model_dict")
    defaults = {key: value for key, value in section.data.items() if key not in ("model_dict", "shared_dict")}
    for key in defaults:  # model-wide keys, copied into every head that does not set them
        if key not in (*_MODEL_KEYS_SUPPORTED, *_MODEL_KEYS_UNSUPPORTED, *_MODEL_KEYS_IGNORED):
            raise section.reader.error(f"unknown key '{section.key_path(key)}'")
        section.get(key)
    section.done()
    if not model_dict.data:
        raise model_dict.reader.error("'model.model_dict' names no head")
    models, type_map_refs, used = {}, set(), set()
    for name in sorted(model_dict.data):
        if name == "RANDOM":
            raise model_dict.error(name, "is not a valid head name: 'RANDOM' is reserved by deepmd-kit")
        head = model_dict.section(name)
        for key, value in defaults.items():
            head.data.setdefault(key, copy.deepcopy(value))
        type_map = head.get("type_map")
        if isinstance(type_map, str):
            type_map_refs.add(type_map)
            type_map = shared.data[_shared(shared, head, "type_map", type_map, used)]
        descriptor, descriptor_key = _component(shared, head, "descriptor", _descriptor, used)
        fitting, fitting_key = _component(shared, head, "fitting_net", _fitting, used)
        settings = _model_settings(head)
        models[name] = _Model(_build(head, type_map, descriptor, fitting), descriptor_key, fitting_key, settings)
        head.done()
    if len(type_map_refs) != 1:
        raise section.reader.error(
            f"a multitask model takes its type_map from 'model.shared_dict', all heads referring to it by one "
            f"name (deepmd-kit's rule); the heads refer to {sorted(type_map_refs) or 'none'}")
    for key in sorted(set(shared.data) - used):  # deepmd-kit ignores shared components no head uses
        section.reader.ignored.append(shared.key_path(key))
    _check_heads_agree(section, models)
    return models


def _shared(shared: _Section, head: _Section, kind: str, reference: str, used: set) -> str:
    """The shared_dict name a "name" or "name:level" reference points to."""
    name, colon, level = reference.partition(":")
    if colon and not level.lstrip("-").isdigit():
        raise head.error(kind, f"= {reference!r}: the sharing level after ':' must be an integer")
    if colon and int(level) != 0:
        raise head.error(kind, f"= {reference!r}: dpa3-ref shares components at level 0 only (all parameters)")
    if name not in shared.data:
        raise head.error(kind, f"= {reference!r} names no entry of 'model.shared_dict' "
                               f"(it has {sorted(shared.data)})")
    used.add(name)
    return name


def _component(shared: _Section, head: _Section, kind: str, parse, used: set) -> tuple[dict, str | None]:
    """A head's descriptor or fitting net: its own section, or a reference into shared_dict."""
    value = head.get(kind)
    if isinstance(value, str):
        name = _shared(shared, head, kind, value, used)
        return parse(_Section(copy.deepcopy(shared.data[name]), shared.key_path(name), head.reader)), name
    return parse(head.section(kind)), None


def _check_heads_agree(section: _Section, models: dict[str, _Model]) -> None:
    """What one multitask model needs of its heads: one type map (shared type embedding), one dataset-encoding
    width (deepmd-kit's get_case_embd_config), names and aliases that pick one head each."""
    type_maps = {name: model.config.type_map for name, model in models.items()}
    if len(set(type_maps.values())) > 1:
        raise section.reader.error(f"the heads of a multitask model must share one type_map, got {type_maps}")
    widths = {name: model.config.dim_case_embd for name, model in models.items()}
    if len(set(widths.values())) > 1:
        raise section.reader.error(f"every head must have the same fitting_net.dim_case_embd, got {widths}")
    width = next(iter(widths.values()))
    if 0 < width < len(models):
        raise section.reader.error(
            f"fitting_net.dim_case_embd = {width} is smaller than the number of heads ({len(models)}): each "
            f"head needs its own one-hot index (set it to {len(models)})")
    names = list(models)
    for name, model in models.items():
        for alias in model.settings["aliases"]:
            if alias in names:
                raise section.reader.error(f"model_branch_alias {alias!r} of head {name!r} is already a head name")
            names.append(alias)


# =========================================================================== heads and training
def _heads(top: _Section, training: _Section, models: dict[str, _Model], multitask: bool) -> tuple[HeadConfig, ...]:
    if multitask:
        losses = top.section("loss_dict")
        data_dict = training.section("data_dict")
        for section, what in ((losses, "a loss"), (data_dict, "data")):
            for name in models:
                if name not in section.data:
                    raise section.reader.error(f"missing required key '{section.key_path(name)}' ({what} for head "
                                               f"{name!r})")
            section.read.update(models)  # what is left are names of no head
            section.done()
        loss_sections = {name: losses.section(name) for name in models}
        data_sections = {name: data_dict.section(name) for name in models}
    else:
        loss_sections = {SINGLE_TASK_HEAD: top.section("loss")}
        data_sections = {SINGLE_TASK_HEAD: training}
    data = {name: _head_data(data_sections[name], multitask) for name in models}
    probabilities = _model_prob(training, {name: len(data[name][0].systems) for name in models}, multitask)
    width = next(iter(models.values())).config.dim_case_embd
    heads = []
    for index, (name, model) in enumerate(sorted(models.items())):
        training_data, validation_data, stat_file, stat_file_mode = data[name]
        heads.append(HeadConfig(
            name=name, model=model.config,
            descriptor_key=model.descriptor_key or f"{name}/descriptor",
            fitting_key=model.fitting_key or f"{name}/fitting_net",
            case_index=index if multitask and width > 0 else None,
            loss=_loss(loss_sections[name]), training_data=training_data, validation_data=validation_data,
            model_prob=probabilities[name], stat_file=stat_file, stat_file_mode=stat_file_mode, **model.settings,
        ))
    return tuple(heads)


def _head_data(section: _Section, multitask: bool) -> tuple[DataConfig, DataConfig | None, str | None, str]:
    """training_data, validation_data, stat_file, stat_file_mode: in `training` (single task) or in
    `training.data_dict[head]` (multitask)."""
    training_data = _data(section.section("training_data"), validation=False)
    validation = section.section("validation_data", None)
    validation_data = None if validation is None else _data(validation, validation=True)
    stat_file = section.get("stat_file", None, str)
    stat_file_mode = section.get("stat_file_mode", "update", str)
    if stat_file_mode not in ("update", "read"):
        raise section.error("stat_file_mode", f"must be 'update' or 'read', got {stat_file_mode!r}")
    if stat_file_mode == "read" and stat_file is None:
        raise section.error("stat_file_mode", "= 'read' needs a stat_file")
    if multitask:
        section.done()
    return training_data, validation_data, stat_file, stat_file_mode


def _model_prob(training: _Section, n_systems: dict[str, int], multitask: bool) -> dict[str, float]:
    """Normalised head probabilities: training.model_prob, or proportional to the number of systems."""
    if not multitask:
        return {SINGLE_TASK_HEAD: 1.0}
    training.unsupported("num_epoch_dict", {})
    given = training.get("model_prob", {}, dict)
    if given:
        unknown = sorted(set(given) - set(n_systems))
        missing = sorted(set(n_systems) - set(given))
        if unknown:
            raise training.error("model_prob", f"names {unknown}, which are not heads ({sorted(n_systems)})")
        if missing:
            raise training.error("model_prob", f"must give every head a probability; missing {missing}")
        for name, value in given.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise training.error("model_prob", f"of head {name!r} must be a finite number >= 0, got {value!r}")
    weights = {name: float(given[name]) if given else float(n_systems[name]) for name in n_systems}
    total = sum(weights.values())
    if total <= 0:
        raise training.error("model_prob", f"must not be all zero, got {given}")
    return {name: weight / total for name, weight in weights.items()}


_TRAINING_UNSUPPORTED = {  # training options of deepmd-kit that dpa3-ref does not implement, with defaults
    "save_dir": None, "ckpt_keep_ratio": None, "ema_ckpt_keep": None, "change_bias_after_training": False,
    "disp_avg": False, "acc_freq": 1, "zero_stage": 0, "mixed_precision": None,
}
_TRAINING_IGNORED = {  # logging, profiling and backend switches: no effect on what dpa3-ref computes
    "profiling": False, "profiling_file": "timeline.json", "enable_profiler": False, "tensorboard": False,
    "tensorboard_log_dir": "log", "tensorboard_freq": 1, "neighbor_graph_method": "auto",
    "enable_compile": False, "enable_tf32": False, "numb_test": None,
}


def _training_settings(training: _Section) -> dict[str, Any]:
    for key, default in _TRAINING_UNSUPPORTED.items():
        training.unsupported(key, default)
    training.unsupported("numb_epoch", None, aliases=("num_epochs", "num_epoch", "numb_epochs"))
    for key, default in _TRAINING_IGNORED.items():
        training.ignore(key, default)
    settings = {
        "numb_steps": training.get("numb_steps", kind=int,
                                   aliases=("stop_batch", "num_step", "num_steps", "numb_step")),
        "seed": training.get("seed", None, int),
        "disp_file": training.get("disp_file", "lcurve.out", str),
        "disp_freq": training.get("disp_freq", 1000, int),
        "save_freq": training.get("save_freq", 1000, int),
        "save_ckpt": training.get("save_ckpt", "model.ckpt", str),
        "max_ckpt_keep": training.get("max_ckpt_keep", 5, int),
        "gradient_max_norm": training.get("gradient_max_norm", 0.0, float),
        "enable_ema": training.get("enable_ema", False, bool),
        "ema_decay": training.get("ema_decay", 0.999, float),
        "disp_training": training.get("disp_training", True, bool),
        "time_training": training.get("time_training", True, bool),
    }
    training.done()
    for key in ("numb_steps", "disp_freq", "save_freq", "max_ckpt_keep"):
        _positive(training, key, settings[key])
    _positive(training, "gradient_max_norm", settings["gradient_max_norm"], allow_zero=True)
    if not 0 <= settings["ema_decay"] < 1:
        raise training.error("ema_decay", f"must be in [0, 1), got {settings['ema_decay']}")
    return settings


_VALIDATING_IGNORED = {  # deepmd-kit's full validation settings: no effect while full_validation is off
    "validation_freq": 5000, "save_best": True, "save_best_dir": None, "max_best_ckpt": 1,
    "validation_metric": "E:MAE", "full_val_file": "val.log", "full_val_start": 0.5, "compiled_infer": False,
    "tf32_infer": False, "amp_infer": False,
}


def _validating(section: _Section) -> None:
    section.unsupported("full_validation", False)
    section.unsupported("ema_full_validation", False)
    for key, default in _VALIDATING_IGNORED.items():
        section.ignore(key, default)
    section.done()

"""All hyperparameters of a DPA3 energy model in one frozen dataclass.

Field names are deepmd-kit's own keys (the `repflow` block, the descriptor, the fitting net; spec §10.1),
so an official `input.json` model section or a serialized `.dp` model loads without a translation table.
Fitting-net keys carry a `fitting_` prefix where they would otherwise clash (`neuron`, `precision`,
`activation_function`, `resnet_dt`). The config round-trips through JSON (`to_json` / `from_json`).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np

from dpa3_ref.activations import get_activation
from dpa3_ref.errors import Dpa3Error

PRECISIONS = ("float64", "float32")
UPDATE_STYLES = ("res_residual", "res_avg", "res_incr")
REPFLOW_KEYS = (
    "n_dim", "e_dim", "a_dim", "nlayers", "e_rcut", "e_rcut_smth", "e_sel", "a_rcut", "a_rcut_smth", "a_sel",
    "a_compress_rate", "a_compress_e_rate", "a_compress_use_split", "n_multi_edge_message", "axis_neuron",
    "update_angle", "update_style", "update_residual", "update_residual_init", "fix_stat_std", "optim_update",
    "smooth_edge_update", "edge_init_use_dist", "use_exp_switch", "use_dynamic_sel", "sel_reduce_factor",
    "sequential_update",
)


@dataclasses.dataclass(frozen=True)
class DPA3Config:
    type_map: tuple[str, ...]
    # --- repflow block (spec §10.1 defaults) ---
    n_dim: int = 128  # node feature width
    e_dim: int = 64  # edge feature width
    a_dim: int = 64  # angle feature width
    nlayers: int = 6
    e_rcut: float = 6.0  # edge cutoff r_c (Å)
    e_rcut_smth: float = 5.0  # switch shape parameter r_s
    e_sel: int = 120  # edge neighbours per atom (capacity and normalisation)
    a_rcut: float = 4.0  # angle cutoff r_c^a
    a_rcut_smth: float = 3.5
    a_sel: int = 20  # angle neighbours per atom
    a_compress_rate: int = 0  # 0: no compression of node/edge inputs to the angle update
    a_compress_e_rate: int = 1
    a_compress_use_split: bool = False  # compress by slicing instead of by a bias-free linear map
    n_multi_edge_message: int = 1  # heads of the edge->node message
    axis_neuron: int = 4  # A in the symmetrisation G = M[:, :A]^T M / 3
    update_angle: bool = True
    update_style: str = "res_residual"
    update_residual: float = 0.1
    update_residual_init: str = "const"
    fix_stat_std: float = 0.3
    optim_update: bool = True  # numerically irrelevant here: we always apply weights block-wise (spec §5.6)
    smooth_edge_update: bool = False
    edge_init_use_dist: bool = False
    use_exp_switch: bool = False
    use_dynamic_sel: bool = False
    sel_reduce_factor: float = 10.0
    sequential_update: bool = False
    # --- descriptor ---
    activation_function: str = "silu"
    precision: str = "float64"
    concat_output_tebd: bool = False
    use_tebd_bias: bool = False
    env_protection: float = 0.0
    exclude_types: tuple[tuple[int, int], ...] = ()  # pairs of types whose edges are dropped
    # --- energy fitting net ---
    fitting_neuron: tuple[int, ...] = (120, 120, 120)
    fitting_resnet_dt: bool = True
    fitting_activation_function: str = "tanh"
    fitting_precision: str = "float64"
    dim_case_embd: int = 0  # dataset encoding width (number of datasets), 0 = off

    def __post_init__(self) -> None:
        object.__setattr__(self, "type_map", tuple(self.type_map))
        object.__setattr__(self, "fitting_neuron", tuple(self.fitting_neuron))
        object.__setattr__(self, "exclude_types", tuple(tuple(p) for p in self.exclude_types))
        self.validate()

    # ---------------------------------------------------------------- derived sizes
    @property
    def ntypes(self) -> int:
        return len(self.type_map)

    @property
    def edge_norm(self) -> float:
        """S_e in the edge sums (spec §5.7): the capacity, divided by f in dynamic mode."""
        return self.e_sel / self.sel_reduce_factor if self.use_dynamic_sel else float(self.e_sel)

    @property
    def angle_norm(self) -> float:
        return self.a_sel / self.sel_reduce_factor if self.use_dynamic_sel else float(self.a_sel)

    @property
    def angle_node_dim(self) -> int:
        """|ñ|: width of the node input of the angle update."""
        return self.n_dim if self.a_compress_rate == 0 else self.a_dim // self.a_compress_rate

    @property
    def angle_edge_dim(self) -> int:
        """|ẽ|: width of each edge input of the angle update."""
        if self.a_compress_rate == 0:
            return self.e_dim
        return (self.a_dim // (2 * self.a_compress_rate)) * self.a_compress_e_rate

    @property
    def angle_input_dim(self) -> int:
        """D_a = a + |ñ| + 2|ẽ|, the width of z_ijk = [a_ijk; ñ_i; ẽ_ik; ẽ_ij]."""
        return self.a_dim + self.angle_node_dim + 2 * self.angle_edge_dim

    @property
    def descriptor_dim(self) -> int:
        return 2 * self.n_dim if self.concat_output_tebd else self.n_dim

    def type_indices(self, types) -> np.ndarray:
        """Element names (mapped by name onto type_map) or model type indices -> int32 type indices."""
        types = np.asarray(types)
        if types.dtype.kind in "US":
            lookup = {name: index for index, name in enumerate(self.type_map)}
            unknown = sorted({str(t) for t in types} - set(lookup))
            if unknown:
                raise Dpa3Error(f"element(s) {unknown} not in the model's type map {list(self.type_map)}")
            return np.array([lookup[str(t)] for t in types], dtype=np.int32)
        if types.dtype.kind not in "iu":
            raise Dpa3Error(f"types must be element names or integer type indices, got dtype {types.dtype}")
        return types.astype(np.int32)

    # ---------------------------------------------------------------- validation
    def validate(self) -> None:
        def need(condition: bool, message: str) -> None:
            if not condition:
                raise Dpa3Error(f"invalid DPA3 config: {message}")

        need(len(self.type_map) > 0, "type_map is empty")
        need(len(set(self.type_map)) == len(self.type_map), f"type_map has duplicates: {self.type_map}")
        for name in ("n_dim", "e_dim", "a_dim", "nlayers", "e_sel", "a_sel", "axis_neuron", "n_multi_edge_message"):
            need(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        need(0 < self.e_rcut_smth < self.e_rcut, f"need 0 < e_rcut_smth < e_rcut, got {self.e_rcut_smth}, {self.e_rcut}")
        need(0 < self.a_rcut_smth < self.a_rcut, f"need 0 < a_rcut_smth < a_rcut, got {self.a_rcut_smth}, {self.a_rcut}")
        need(self.a_rcut <= self.e_rcut, f"a_rcut ({self.a_rcut}) must not exceed e_rcut ({self.e_rcut})")
        need(self.a_sel <= self.e_sel, f"a_sel ({self.a_sel}) must not exceed e_sel ({self.e_sel})")
        need(self.axis_neuron <= min(self.e_dim, self.n_dim), "axis_neuron must not exceed e_dim and n_dim")
        need(self.update_style in UPDATE_STYLES, f"update_style must be one of {UPDATE_STYLES}")
        need(self.update_residual_init in ("const", "norm"), "update_residual_init must be 'const' or 'norm'")
        need(self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        need(self.fitting_precision in PRECISIONS, f"fitting_precision must be one of {PRECISIONS}")
        need(self.a_compress_rate >= 0 and self.a_compress_e_rate >= 1, "a_compress rates out of range")
        if self.a_compress_rate > 0:
            need(self.a_dim % self.a_compress_rate == 0, "a_dim must be divisible by a_compress_rate")
            need((self.a_dim * self.a_compress_e_rate) % (2 * self.a_compress_rate) == 0,
                 "a_dim * a_compress_e_rate must be divisible by 2 * a_compress_rate")
            if self.a_compress_use_split:
                need(self.angle_node_dim <= self.n_dim and self.angle_edge_dim <= self.e_dim,
                     "a_compress_use_split needs a_dim/a_compress_rate <= n_dim and the edge slice <= e_dim")
        need(not self.use_dynamic_sel or self.smooth_edge_update, "use_dynamic_sel requires smooth_edge_update")
        need(self.sel_reduce_factor > 0, "sel_reduce_factor must be positive")
        need(not self.sequential_update or (self.update_style == "res_residual" and self.update_angle),
             "sequential_update requires update_style 'res_residual' and update_angle")
        need(self.dim_case_embd >= 0, "dim_case_embd must be >= 0")
        need(all(n > 0 for n in self.fitting_neuron), "fitting_neuron entries must be positive")
        for pair in self.exclude_types:
            need(len(pair) == 2 and all(0 <= t < self.ntypes for t in pair), f"bad exclude_types pair {pair}")
        get_activation(self.activation_function)
        get_activation(self.fitting_activation_function)

    # ---------------------------------------------------------------- JSON round trip
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DPA3Config:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise Dpa3Error(f"unknown DPA3 config keys: {unknown}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> DPA3Config:
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> DPA3Config:
        return dataclasses.replace(self, **changes)

    # ---------------------------------------------------------------- deepmd-kit configs
    @classmethod
    def from_deepmd(cls, model: dict[str, Any]) -> DPA3Config:
        """From a deepmd-kit model section: an `input.json` "model" or a serialized model's "model".

        input.json has `descriptor.repflow` and `fitting_net`; serialized models have
        `descriptor.repflow_args` and `fitting`. Options that change the numbers but that this
        implementation does not have are refused by name rather than silently ignored.
        """
        descriptor = model.get("descriptor")
        fitting = model.get("fitting_net", model.get("fitting"))
        if not isinstance(descriptor, dict) or not isinstance(fitting, dict):
            raise Dpa3Error("not a DPA3 energy model: missing 'descriptor' or 'fitting_net'/'fitting' section")
        if descriptor.get("type") != "dpa3":
            raise Dpa3Error(f"not a DPA3 model: descriptor type is {descriptor.get('type')!r}, expected 'dpa3'")
        fitting_type = fitting.get("type", "ener")
        if fitting_type != "ener":
            raise Dpa3Error(f"only energy fitting is supported, got fitting type {fitting_type!r}")
        repflow = dict(descriptor.get("repflow", descriptor.get("repflow_args", {})))
        _refuse(descriptor, {"add_chg_spin_ebd": False, "use_econf_tebd": False})
        _refuse(fitting, {"numb_fparam": 0, "numb_aparam": 0})
        _refuse(model, {"atom_exclude_types": [], "pair_exclude_types": []})
        if isinstance(repflow.get("e_sel"), list):  # serialized layers store e_sel as a 1-element list
            repflow["e_sel"] = repflow["e_sel"][0]
        values: dict[str, Any] = {k: v for k, v in repflow.items() if k in REPFLOW_KEYS}
        for key in ("activation_function", "precision", "concat_output_tebd", "use_tebd_bias",
                    "env_protection", "exclude_types"):
            if key in descriptor:
                values[key] = descriptor[key]
        for key in ("neuron", "resnet_dt", "activation_function", "precision"):
            if key in fitting:
                values[f"fitting_{key}"] = fitting[key]
        values["dim_case_embd"] = fitting.get("dim_case_embd", 0) or 0
        for key in ("precision", "fitting_precision"):
            if values.get(key) == "default":
                values[key] = "float64"
        return cls(type_map=tuple(model["type_map"]), **values)

    def to_deepmd(self) -> dict[str, Any]:
        """The deepmd-kit `input.json` model section that builds the same architecture."""
        return {
            "type_map": list(self.type_map),
            "descriptor": {
                "type": "dpa3",
                "repflow": {k: getattr(self, k) for k in REPFLOW_KEYS},
                "activation_function": self.activation_function,
                "precision": self.precision,
                "concat_output_tebd": self.concat_output_tebd,
                "use_tebd_bias": self.use_tebd_bias,
                "env_protection": self.env_protection,
                "exclude_types": [list(p) for p in self.exclude_types],
            },
            "fitting_net": {
                "neuron": list(self.fitting_neuron),
                "resnet_dt": self.fitting_resnet_dt,
                "activation_function": self.fitting_activation_function,
                "precision": self.fitting_precision,
                "dim_case_embd": self.dim_case_embd,
            },
        }


def _refuse(section: dict[str, Any], defaults: dict[str, Any]) -> None:
    for key, default in defaults.items():
        value = section.get(key, default)
        if value not in (default, None) and not (isinstance(default, list) and not value):
            raise Dpa3Error(f"option {key}={value!r} is not supported by dpa3-ref (only {default!r})")


def water_example_config() -> DPA3Config:
    """deepmd-kit's examples/water/dpa3 recipe (spec §10.2): 6 layers, 128/64/32, float32."""
    return DPA3Config(
        type_map=("O", "H"),
        n_dim=128, e_dim=64, a_dim=32, nlayers=6,
        e_rcut=6.0, e_rcut_smth=5.3, e_sel=120,
        a_rcut=4.0, a_rcut_smth=3.5, a_sel=30,
        axis_neuron=4, fix_stat_std=0.3,
        a_compress_rate=1, a_compress_e_rate=2, a_compress_use_split=True,
        update_angle=True, smooth_edge_update=True, edge_init_use_dist=True, use_exp_switch=True,
        update_style="res_residual", update_residual=0.1, update_residual_init="const",
        activation_function="silut:10.0", precision="float32",
        fitting_neuron=(240, 240, 240), fitting_resnet_dt=True,
        fitting_activation_function="silut:10.0", fitting_precision="float32",
    )

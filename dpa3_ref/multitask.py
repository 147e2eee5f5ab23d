"""One model, several heads: multitask training and dataset encoding (spec §6.4, §8; docs/training.md §6).

A multitask model is a set of named components and a table of heads. Each head (one task, one dataset) is
a DPA3 energy model assembled from

    a descriptor   (usually one shared by every head),
    a fitting net  (shared by every head: DPA3's "dataset encoding"; or one per head: the DPA-2 style),
    its own per-type energy offsets out_bias, and — with a shared fitting — its dataset one-hot c:

    E_i^(head) = fitting([D_i; c_head])  + out_bias_head[t_i],     c_head = one-hot(index of head in sorted names)

With dataset encoding the model does not grow with the number of datasets: a new dataset adds one row to
the fitting's first weight matrix (W_1 [d + n_heads, N_1]; the rows that multiply c are a learned
per-dataset bias of the first layer: N_1 = 240 numbers for the water example, against 147,361 for a
fitting net of its own) and one out_bias vector. Gradients reach the shared components from
every head's loss because a head is assembled from the components inside the differentiated function.

A single-task model is the special case of one head named "Default" (deepmd-kit's name for it).
"""

from __future__ import annotations

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp

from dpa3_ref.config import DPA3Config
from dpa3_ref.descriptor import DPA3Descriptor, init_descriptor
from dpa3_ref.errors import Dpa3Error
from dpa3_ref.fitting import EnergyFitting, init_fitting
from dpa3_ref.model import DPA3Model

SINGLE_TASK = "Default"


@dataclasses.dataclass(frozen=True)
class Head:
    """Where a head's parts live: component keys, its dataset index, and its full model config."""

    name: str
    descriptor_key: str
    fitting_key: str
    case_index: int | None  # position in the sorted head names when the fitting has dim_case_embd > 0
    config: DPA3Config

    def to_dict(self) -> dict:
        return {**{f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "config"},
                "config": self.config.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> Head:
        return cls(**{**data, "config": DPA3Config.from_dict(data["config"])})


class MultiTaskModel(eqx.Module):
    descriptors: dict[str, DPA3Descriptor]  # by component key
    fittings: dict[str, EnergyFitting]  # by component key
    out_bias: dict[str, jax.Array]  # by head name, [ntypes] float64
    heads: tuple[Head, ...] = eqx.field(static=True)

    @property
    def head_names(self) -> list[str]:
        return [head.name for head in self.heads]

    def head_info(self, name: str) -> Head:
        for head in self.heads:
            if head.name == name:
                return head
        raise Dpa3Error(f"no head {name!r} in this model; its heads are {self.head_names}")

    def head(self, name: str) -> DPA3Model:
        """The energy model of one head (a view: its arrays are the shared components)."""
        info = self.head_info(name)
        fitting = self.fittings[info.fitting_key]
        if info.case_index is not None:  # a single-task head keeps its fitting's one-hot (zeros, or a branch's)
            one_hot = jax.nn.one_hot(info.case_index, info.config.dim_case_embd, dtype=fitting.case_embd.dtype)
            fitting = eqx.tree_at(lambda f: f.case_embd, fitting, one_hot)
        return DPA3Model(
            descriptor=self.descriptors[info.descriptor_key], fitting=fitting, out_bias=self.out_bias[name],
            config=info.config,
        )


def init_multitask(heads: tuple[Head, ...], *, key: jax.Array) -> MultiTaskModel:
    """Random components for a table of heads (deepmd-kit's initialisation, one key per component)."""
    descriptors, fittings = {}, {}
    for index, head in enumerate(heads):
        descriptor_key, fitting_key = jax.random.split(jax.random.fold_in(key, index))
        if head.descriptor_key not in descriptors:
            descriptors[head.descriptor_key] = init_descriptor(head.config, key=descriptor_key)
        if head.fitting_key not in fittings:
            fittings[head.fitting_key] = init_fitting(head.config, key=fitting_key)
    return MultiTaskModel(
        descriptors=descriptors,
        fittings=fittings,
        out_bias={head.name: jnp.zeros(head.config.ntypes, jnp.float64) for head in heads},
        heads=tuple(heads),
    )


def single_task(model: DPA3Model) -> MultiTaskModel:
    """A one-head model ("Default") holding `model`'s arrays."""
    head = Head(SINGLE_TASK, f"{SINGLE_TASK}/descriptor", f"{SINGLE_TASK}/fitting_net", None, model.config)
    return MultiTaskModel(
        descriptors={head.descriptor_key: model.descriptor},
        fittings={head.fitting_key: model.fitting},
        out_bias={SINGLE_TASK: model.out_bias},
        heads=(head,),
    )


def with_head_arrays(multitask: MultiTaskModel, name: str, model: DPA3Model) -> MultiTaskModel:
    """Put a head model's descriptor, fitting (less its one-hot) and out_bias back into the components."""
    info = multitask.head_info(name)
    fitting = eqx.tree_at(lambda f: f.case_embd, model.fitting, multitask.fittings[info.fitting_key].case_embd)
    return eqx.tree_at(
        lambda m: (m.descriptors[info.descriptor_key], m.fittings[info.fitting_key], m.out_bias[name]),
        multitask, (model.descriptor, fitting, model.out_bias),
    )

"""The energy fitting net with dataset encoding (spec §6.2–§6.4).

    x_i = [D_i; c]                       c: one-hot of the dataset ("case"), length dim_case_embd
    y ← φ_f(y W_k + b_k) [⊙ idt_k] [+ y or [y; y]]     hidden layers (skip only where shapes allow)
    ε_i = y W_out + b_out                 one network shared by all element types
    E_i = ε_i + bias_atom_e[t_i] + out_bias[t_i]     (out_bias is held by the model, see model.py)

The case one-hot is a fixed buffer, not a parameter: concatenated to every atom's descriptor it gives
the first layer a learned per-dataset bias, which is how one model trains on datasets computed with
different DFT settings.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

from dpa3_ref.config import DPA3Config
from dpa3_ref.nn import Layer, has_skip, init_layer


class EnergyFitting(eqx.Module):
    layers: list[Layer]  # hidden layers, then the linear output layer [N_K, 1]
    bias_atom_e: jax.Array  # [ntypes] float64, added to the atomic energies
    case_embd: jax.Array  # [dim_case_embd] one-hot of the dataset (buffer, not trained)

    @property
    def dtype(self):
        return self.layers[0].weight.dtype

    def __call__(self, descriptor: jax.Array, types: jax.Array, case_embd: jax.Array | None = None) -> jax.Array:
        """Atomic energies ε_i + bias_atom_e[t_i] in float64."""  # [n_atoms]
        x = descriptor.astype(self.dtype)  # [n_atoms, d]
        case = self.case_embd if case_embd is None else case_embd
        if case.shape[0] > 0:
            x = jnp.concatenate([x, jnp.broadcast_to(case.astype(self.dtype), (x.shape[0], case.shape[0]))], -1)
        for layer in self.layers:
            x = layer(x)
        return jnp.squeeze(x, axis=1).astype(jnp.float64) + self.bias_atom_e[jnp.maximum(types, 0)]


def init_fitting(config: DPA3Config, *, key: jax.Array) -> EnergyFitting:
    dtype = jnp.float64 if config.fitting_precision == "float64" else jnp.float32
    widths = [config.descriptor_dim + config.dim_case_embd, *config.fitting_neuron]
    keys = jax.random.split(key, len(widths))
    hidden = [
        init_layer(
            n_in, n_out, key=k, dtype=dtype, activation=config.fitting_activation_function,
            resnet_dt=config.fitting_resnet_dt and has_skip(n_in, n_out), residual=has_skip(n_in, n_out),
        )
        for n_in, n_out, k in zip(widths[:-1], widths[1:], keys[:-1], strict=True)
    ]
    output = init_layer(widths[-1], 1, key=keys[-1], dtype=dtype)
    return EnergyFitting(
        layers=[*hidden, output],
        bias_atom_e=jnp.zeros(config.ntypes, jnp.float64),
        case_embd=jnp.zeros(config.dim_case_embd, dtype),
    )

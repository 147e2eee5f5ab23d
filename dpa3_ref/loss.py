"""deepmd-kit's `ener` loss (spec §9.2; docs/training.md §2), term by term as the official code adds them.

For a batch of F frames, frame f with N_f real atoms, ΔX = prediction − label:

    L = p_e · mean_f[ ΔE_f² / N_f^k ]                                      energy       (k = 1; 2 if intensive)
      + p_f · Σ_{real i, xyz} ΔF_i² / (3 Σ_f N_f)                          forces
      + p_v · mean_f[ mean_9(ΔW_f²) / N_f^k ]                              virial
      + p_ae · Σ_{real i} ΔE_i² / Σ_f N_f                                  per-atom energies

A term is present only if both its start and limit prefactors are non-zero (the "quirk" of spec §9.1), and
its prefactor is multiplied by find_X ∈ {0, 1}, whether the batch's system has that label at all. The
prefactors p(t) follow the learning rate (schedule.py) and enter as arrays, so changing them never recompiles.

With `loss_func = "mae"` the squares become absolute values and the energy/virial terms use 1/N_f;
with `use_huber` each residual (energies and virials first divided by N_f) goes through
h(r) = r²/2 for |r| ≤ δ, δ(|r| − δ/2) otherwise, averaged.

What is reported, in deepmd's units (NaN where the batch has no such label):

    rmse_e = sqrt(mean_f ΔE_f² / N_f²)   eV/atom       rmse_f = sqrt(mean ΔF²)   eV/Å
    rmse_v = sqrt(mean_f mean_9 ΔW_f² / N_f²)   eV/atom     rmse_ae   eV        rmse = sqrt(L)
    (mae_e, mae_f, mae_v, mae_ae with loss_func = "mae")
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dpa3_ref.batches import Labels
from dpa3_ref.inputs import LossConfig


def has_term(loss: LossConfig, term: str) -> bool:
    """A term is active only if both its start and limit prefactors are non-zero."""
    return getattr(loss, f"start_pref_{term}") != 0.0 and getattr(loss, f"limit_pref_{term}") != 0.0


def huber(residual: jax.Array, delta: float) -> jax.Array:
    """h(r) elementwise."""
    magnitude = jnp.abs(residual)
    return jnp.where(magnitude <= delta, 0.5 * residual**2, delta * (magnitude - 0.5 * delta))


def huber_deltas(loss: LossConfig) -> tuple[float, float, float]:
    """δ for energy, force and virial (one number for all three, or three)."""
    delta = loss.huber_delta
    return (delta, delta, delta) if isinstance(delta, int | float) else tuple(delta)


def ener_loss(
    prediction: dict[str, jax.Array],
    labels: Labels,
    prefactors: dict[str, jax.Array],
    loss: LossConfig,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The loss L (float64 scalar) and the reported metrics of one batch.

    prediction: `model.energy_forces_virial` of the batch's graph; prefactors: p_e, p_f, p_v, p_ae at this step.
    """
    mae = loss.loss_func == "mae"
    delta_e, delta_f, delta_v = huber_deltas(loss)
    power = 2 if loss.intensive_ener_virial else 1
    inverse_atoms = 1.0 / labels.n_atoms  # [frames]
    mask = labels.atom_mask  # [atoms], 1 for real atoms
    total = jnp.zeros((), jnp.float64)
    metrics = {}

    def reported(value, find):
        return jnp.where(find > 0, value, jnp.nan)

    if has_term(loss, "e"):
        error = prediction["energy"] - labels.energy  # [frames]
        weight = prefactors["e"] * labels.find_energy
        if mae:
            total += weight * jnp.mean(jnp.abs(error) * inverse_atoms)
            metrics["mae_e"] = reported(jnp.mean(jnp.abs(error) * inverse_atoms), labels.find_energy)
        else:
            if loss.use_huber:
                total += weight * jnp.mean(huber(error * inverse_atoms, delta_e))
            else:
                total += weight * jnp.mean(error**2 * inverse_atoms**power)
            metrics["rmse_e"] = reported(jnp.sqrt(jnp.mean(error**2 * inverse_atoms**2)), labels.find_energy)

    if has_term(loss, "f"):
        error = prediction["forces"] - labels.forces  # [atoms, 3]
        weight = prefactors["f"] * labels.find_forces
        n_components = 3 * jnp.sum(mask)
        squared = jnp.sum(error**2 * mask[:, None]) / n_components
        if mae:
            absolute = jnp.sum(jnp.abs(error) * mask[:, None]) / n_components
            total += weight * absolute
            metrics["mae_f"] = reported(absolute, labels.find_forces)
        else:
            if loss.use_huber:
                total += weight * jnp.sum(huber(error, delta_f) * mask[:, None]) / n_components
            else:
                total += weight * squared
            metrics["rmse_f"] = reported(jnp.sqrt(squared), labels.find_forces)

    if has_term(loss, "v"):
        error = (prediction["virial"] - labels.virial).reshape(-1, 9)  # [frames, 9]
        weight = prefactors["v"] * labels.find_virial
        if mae:
            absolute = jnp.mean(jnp.mean(jnp.abs(error), axis=1) * inverse_atoms)
            total += weight * absolute
            metrics["mae_v"] = reported(absolute, labels.find_virial)
        else:
            per_frame = jnp.mean(error**2, axis=1)  # [frames]
            if loss.use_huber:
                total += weight * jnp.mean(huber(error * inverse_atoms[:, None], delta_v))
            else:
                total += weight * jnp.mean(per_frame * inverse_atoms**power)
            metrics["rmse_v"] = reported(jnp.sqrt(jnp.mean(per_frame * inverse_atoms**2)), labels.find_virial)

    if has_term(loss, "ae"):
        error = prediction["atom_energy"] - labels.atom_energy  # [atoms]
        weight = prefactors["ae"] * labels.find_atom_energy
        squared = jnp.sum(error**2 * mask) / jnp.sum(mask)
        if mae:
            absolute = jnp.sum(jnp.abs(error) * mask) / jnp.sum(mask)
            total += weight * absolute
            metrics["mae_ae"] = reported(absolute, labels.find_atom_energy)
        else:
            if loss.use_huber:
                total += weight * jnp.sum(huber(error, delta_e) * mask) / jnp.sum(mask)
            else:
                total += weight * squared
            metrics["rmse_ae"] = reported(jnp.sqrt(squared), labels.find_atom_energy)

    metrics["rmse"] = jnp.sqrt(total)
    return total, metrics

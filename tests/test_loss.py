"""deepmd-kit's `ener` loss, term by term, against hand computations in numpy (spec §9.2).

Each case builds a batch of two frames with different atom counts plus padding atoms, so the per-frame 1/N,
the masked force mean and the frame means are all exercised.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from dpa3_ref.batches import Labels
from dpa3_ref.inputs import LossConfig
from dpa3_ref.loss import ener_loss

RNG = np.random.default_rng(0)
N_ATOMS = np.array([3.0, 5.0])  # real atoms of frame 0 and frame 1
MASK = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0, 0], float)  # 8 real atoms, 2 padding
PREDICTION = {
    "energy": RNG.normal(size=2), "atom_energy": RNG.normal(size=10) * MASK,
    "forces": RNG.normal(size=(10, 3)) * MASK[:, None], "virial": RNG.normal(size=(2, 3, 3)),
}
LABELS = Labels(
    energy=RNG.normal(size=2), forces=RNG.normal(size=(10, 3)) * MASK[:, None], virial=RNG.normal(size=(2, 3, 3)),
    atom_energy=RNG.normal(size=10) * MASK, find_energy=np.float64(1), find_forces=np.float64(1),
    find_virial=np.float64(1), find_atom_energy=np.float64(1), atom_mask=MASK, n_atoms=N_ATOMS,
)
PREFACTORS = {"e": 0.7, "f": 3.0, "v": 0.2, "ae": 0.5}
ALL_TERMS = LossConfig(start_pref_e=1, limit_pref_e=1, start_pref_f=1, limit_pref_f=1, start_pref_v=1,
                       limit_pref_v=1, start_pref_ae=1, limit_pref_ae=1)


def loss_of(config, labels=LABELS):
    total, metrics = ener_loss({k: jnp.asarray(v) for k, v in PREDICTION.items()}, labels,
                               {k: jnp.float64(v) for k, v in PREFACTORS.items()}, config)
    return float(total), {k: float(v) for k, v in metrics.items()}


def hand_terms(power=1):
    real = MASK > 0
    de = PREDICTION["energy"] - LABELS.energy
    df = (PREDICTION["forces"] - LABELS.forces)[real]
    dv = (PREDICTION["virial"] - LABELS.virial).reshape(2, 9)
    dae = (PREDICTION["atom_energy"] - LABELS.atom_energy)[real]
    return {
        "e": np.mean(de**2 / N_ATOMS**power), "f": np.mean(df**2),
        "v": np.mean(np.mean(dv**2, axis=1) / N_ATOMS**power), "ae": np.mean(dae**2),
        "rmse_e": np.sqrt(np.mean(de**2 / N_ATOMS**2)), "rmse_f": np.sqrt(np.mean(df**2)),
        "rmse_v": np.sqrt(np.mean(np.mean(dv**2, axis=1) / N_ATOMS**2)), "rmse_ae": np.sqrt(np.mean(dae**2)),
    }


def test_every_term_and_metric_equals_the_hand_computation():
    total, metrics = loss_of(ALL_TERMS)
    hand = hand_terms()
    assert total == pytest.approx(sum(PREFACTORS[t] * hand[t] for t in "e f v ae".split()), rel=1e-14)
    for key in ("rmse_e", "rmse_f", "rmse_v", "rmse_ae"):
        assert metrics[key] == pytest.approx(hand[key], rel=1e-14)
    assert metrics["rmse"] == pytest.approx(np.sqrt(total), rel=1e-14)


def test_intensive_energy_and_virial_divide_by_n_squared():
    total, _ = loss_of(dataclasses.replace(ALL_TERMS, intensive_ener_virial=True))
    hand = hand_terms(power=2)
    assert total == pytest.approx(sum(PREFACTORS[t] * hand[t] for t in "e f v ae".split()), rel=1e-14)


@pytest.mark.parametrize("zero", ["start_pref_v", "limit_pref_v"])
def test_a_term_needs_both_prefactors_nonzero(zero):
    total, metrics = loss_of(dataclasses.replace(ALL_TERMS, **{zero: 0.0}))
    hand = hand_terms()
    assert total == pytest.approx(sum(PREFACTORS[t] * hand[t] for t in "e f ae".split()), rel=1e-14)
    assert "rmse_v" not in metrics


def test_missing_label_removes_its_term_and_reports_nan():
    labels = dataclasses.replace(LABELS, find_virial=np.float64(0), virial=np.zeros((2, 3, 3)))
    total, metrics = loss_of(ALL_TERMS, labels)
    hand = hand_terms()
    assert total == pytest.approx(sum(PREFACTORS[t] * hand[t] for t in "e f ae".split()), rel=1e-14)
    assert np.isnan(metrics["rmse_v"])


def test_mae_uses_absolute_errors_per_atom():
    total, metrics = loss_of(dataclasses.replace(ALL_TERMS, loss_func="mae", start_pref_ae=0, limit_pref_ae=0))
    real = MASK > 0
    de = np.abs(PREDICTION["energy"] - LABELS.energy) / N_ATOMS
    df = np.abs(PREDICTION["forces"] - LABELS.forces)[real]
    dv = np.mean(np.abs(PREDICTION["virial"] - LABELS.virial).reshape(2, 9), axis=1) / N_ATOMS
    assert total == pytest.approx(PREFACTORS["e"] * de.mean() + PREFACTORS["f"] * df.mean()
                                  + PREFACTORS["v"] * dv.mean(), rel=1e-14)
    assert metrics["mae_f"] == pytest.approx(df.mean(), rel=1e-14)


def test_huber_is_quadratic_near_zero_and_linear_far_away():
    delta = 0.3
    config = dataclasses.replace(ALL_TERMS, use_huber=True, huber_delta=delta, start_pref_e=0, start_pref_v=0,
                                 start_pref_ae=0)
    total, _ = loss_of(config)
    r = np.abs(PREDICTION["forces"] - LABELS.forces)[MASK > 0]
    h = np.where(r <= delta, 0.5 * r**2, delta * (r - 0.5 * delta))
    assert total == pytest.approx(PREFACTORS["f"] * h.mean(), rel=1e-14)

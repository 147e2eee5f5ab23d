"""The invariance suite on our own model: every property holds, in float64 and in float32.

A small random model with the polynomial switch (exactly zero at both cutoffs, so the smoothness check is
held to the float64 defaults) and the official reference model with the exponential switch (not zero at
the cutoff: s(6.0) = 8e-7 for r_s = 5.3; the measured jump is ~5e-9 eV on the drawn systems, inside the
default 1e-5). float32 runs the same model in single precision with the suite's float32 tolerances.
"""

import functools

import pytest

from dpa3_ref import DPA3Config, Potential
from dpa3_ref.invariance import from_dpa3, pytest_properties
from dpa3_ref.model import cast_model
from tests.shared_paths import REFERENCE, skip_without_shared

SMALL = DPA3Config(
    type_map=("H", "C", "O"), n_dim=8, e_dim=6, a_dim=4, nlayers=2, e_rcut=4.0, e_rcut_smth=3.0, e_sel=60,
    a_rcut=3.0, a_rcut_smth=2.2, a_sel=24, axis_neuron=2, smooth_edge_update=True, update_residual_init="norm",
    activation_function="silut:3.0", fitting_neuron=(12, 12), fitting_activation_function="tanh",
)
_small = Potential.init(SMALL, seed=11)
_small_float32 = Potential(cast_model(_small.model, "float32"))

test_small_model_float64 = pytest_properties(lambda: from_dpa3(_small))
test_small_model_float32 = pytest_properties(
    lambda: from_dpa3(_small_float32),
    properties=["rotation", "reflection", "translation", "periodic-wrap", "permutation", "net-force",
                "virial-symmetry", "extensivity", "locality"],
)


test_official_model = pytest_properties(
    lambda: from_dpa3(_official()), properties=["rotation", "permutation", "conservative-forces", "cutoff-smoothness"],
)


def _official():
    skip_without_shared()
    return _load_official()


@functools.cache
def _load_official():
    import dpa3_ref

    return dpa3_ref.load(REFERENCE / "water_small_f64" / "model.dp")

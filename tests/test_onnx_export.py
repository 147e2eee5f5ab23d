"""The model exported to ONNX (energy, forces and virial inside the graph) runs in onnxruntime and gives the
official numbers; the invariance suite accepts the file like any other potential.

Tolerances as in test_official_reference.py (float64): energy 1e-8 eV, forces 1e-9 eV/Å, virial 1e-8 eV.
One exported file serves every size: the water frames (192 atoms) and the 39-atom open cluster use the
same file.
"""

import functools
import tempfile

import numpy as np
import pytest

from dpa3_ref.cli import main
from dpa3_ref.invariance import from_onnx, pytest_properties
from tests.shared_paths import REFERENCE, needs_shared, skip_without_shared

pytest.importorskip("jax2onnx")
pytest.importorskip("onnxruntime")


@functools.cache
def _exported() -> str:
    """Export once per test session (about 30 s), into a temporary directory."""
    path = f"{tempfile.mkdtemp(prefix='dpa3-onnx-')}/water_small_f64.onnx"
    assert main(["export", "--model", str(REFERENCE / "water_small_f64" / "model.dp"), "--out", path]) == 0
    return path


@pytest.fixture(scope="module")
def onnx_file():
    skip_without_shared()
    return _exported()


@needs_shared
def test_onnxruntime_reproduces_the_official_numbers(onnx_file):
    from dpa3_ref.export_onnx import OnnxPotential

    potential = OnnxPotential(onnx_file)
    ref = np.load(REFERENCE / "water_small_f64" / "reference.npz")
    cases = [(ref["coord"][0], ref["atype"][0], ref["box"][0], ref["energy"][0], ref["force"][0], ref["virial"][0]),
             (ref["cl_coord"][0], ref["cl_atype"][0], None, ref["cl_energy"][0], ref["cl_force"][0], ref["cl_virial"][0])]
    for coord, types, box, energy, forces, virial in cases:
        out = potential.evaluate(coord, types, box)
        assert abs(out["energy"] - energy) < 1e-8
        np.testing.assert_allclose(out["forces"], forces, rtol=0, atol=1e-9)
        np.testing.assert_allclose(out["virial"], virial, rtol=0, atol=1e-8)


def test_onnx_errors_are_clear(tmp_path):
    from dpa3_ref.errors import Dpa3Error
    from dpa3_ref.export_onnx import OnnxPotential

    with pytest.raises(Dpa3Error, match="does not exist"):
        OnnxPotential(tmp_path / "missing.onnx")


def _onnx_potential():
    skip_without_shared()
    return _onnx_adapted()


@functools.cache
def _onnx_adapted():
    return from_onnx(_exported())


test_onnx_file_has_the_property = pytest_properties(
    _onnx_potential, properties=["rotation", "permutation", "conservative-forces", "periodic-wrap"]
)

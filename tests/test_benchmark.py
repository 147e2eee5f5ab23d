"""`dpa3 bench`'s onnxruntime rows on a small water model, so that they keep working between full runs.

The small model keeps the water example's options (split angle compression among them: its slices must export
without a scatter) with narrow layers and 2 layers; exporting it takes ~15 s on a loaded 2-core machine.
"""

import dataclasses

import numpy as np
import pytest

import dpa3_ref.config
from dpa3_ref import benchmark
from dpa3_ref.potential import Potential
from tests.shared_paths import needs_shared

pytest.importorskip("jax2onnx")
pytest.importorskip("onnxruntime")

from dpa3_onnx import OnnxPotential  # noqa: E402

SMALL_WATER = dataclasses.replace(dpa3_ref.config.water_example_config(), n_dim=16, e_dim=16, a_dim=8, nlayers=2,
                                  fitting_neuron=(16, 16))


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[str, dict]:
    """The bench's export worker on the small model: (file, its report)."""
    path = str(tmp_path_factory.mktemp("bench") / "water_float32.onnx")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dpa3_ref.config, "water_example_config", lambda: SMALL_WATER)
        return path, benchmark.export_water_onnx(path)


@needs_shared
def test_onnx_worker_reports_and_targets(exported, capsys):
    path, export = exported
    assert SMALL_WATER.angle_edge_dim < SMALL_WATER.e_dim and export["export_s"] > 0
    run = benchmark._in_subprocess("measure_onnx", timeout=120, system=str(benchmark.DEFAULT_WATER), n_atoms=192,
                                   repeats=2, path=path, address_space_gib=4.0)
    assert "error" not in run, run
    assert run["n_atoms"] == 192 and len(run["evaluate_times_s"]) == 2
    assert min(run["load_s"], run["first_call_s"], run["inputs_median_s"], run["session_median_s"]) > 0
    assert 0 < run["imports_rss_gib"] <= run["peak_rss_gib"]

    ours = [{"n_atoms": 192, "median_s": run["median_s"] / 2}]  # a JAX row twice as fast
    onnx = {"export": export, "runs": [run], "address_space_gib": 4.0}
    benchmark._print_onnx(onnx, ours)
    printed = capsys.readouterr().out
    assert "2.00×" in printed and "capped at 4.0 GiB" in printed
    targets = benchmark._check_targets(ours, None, onnx)
    assert [(t["target"], t["pass"]) for t in targets if "onnxruntime" in t["target"]] == [
        (f"<= {benchmark.TARGET_ONNX_RATIO}x JAX with onnxruntime at 192 atoms", False)]


@needs_shared
def test_exported_small_water_model_agrees_with_jax(exported):
    coord, atom_names, cell = benchmark.water_structure(benchmark.DEFAULT_WATER, 192)
    ours = Potential.init(SMALL_WATER, seed=0).evaluate(coord, atom_names, cell)
    theirs = OnnxPotential(exported[0], device="cpu").evaluate(coord, atom_names, cell)
    assert theirs["energy"] == pytest.approx(float(ours["energy"]), rel=1e-5)
    scale = np.abs(ours["forces"]).max()
    np.testing.assert_allclose(theirs["forces"], ours["forces"], atol=1e-4 * scale)


def test_without_the_export_extra_the_rows_are_skipped(monkeypatch):
    monkeypatch.setattr(benchmark.importlib.util, "find_spec", lambda name: None)
    assert benchmark._onnx_rows(benchmark.DEFAULT_WATER, [192], 1) == {
        "skipped": "jax2onnx, onnx, onnxruntime not installed (pip install 'dpa3-ref[export]')"}

"""Learning-curve and parity plots: `read_lcurve` on files laid out as deepmd-kit writes them, PNGs that
matplotlib reads back, and RMSE legends equal to numpy's.

The lcurve files here are written with deepmd-kit 3.2.0's format strings (deepmd/pt/train/training.py,
`print_header` and `print_on_training`): header "# {:5s}" for "step", "   %11s %11s" per quantity
(validation name, then training name) or "   %11s" without validation data, "   {:8s}" for "lr", then the
comment line; rows f"{step:7d}", "   %11.2e %11.2e" or "   %11.2e" per quantity, f"   {lr:8.1e}".
Quantities in sorted order; multitask column names carry the head: rmse_e_val_water.
"""

import matplotlib.image
import numpy as np
import pytest

from dpa3_ref.errors import Dpa3Error
from dpa3_ref.plots import (
    learning_curve_figure,
    parity_figure,
    plot_learning_curve,
    plot_parity,
    read_lcurve,
)

QUANTITIES = ["rmse", "rmse_e", "rmse_f", "rmse_v"]  # sorted, as deepmd-kit sorts the loss's keys
NOTE = "# If there is no available reference data, rmse_*_{val,trn} will print nan\n"


def lcurve_header(heads: dict[str | None, bool]) -> str:
    """heads: head name (None for single task) -> whether it has validation data."""
    text = "# {:5s}".format("step")
    for head, has_validation in heads.items():
        suffix = "" if head is None else f"_{head}"
        for quantity in QUANTITIES:
            if has_validation:
                text += "   %11s %11s" % (f"{quantity}_val{suffix}", f"{quantity}_trn{suffix}")
            else:
                text += "   %11s" % f"{quantity}_trn{suffix}"
    return text + "   {:8s}\n".format("lr") + NOTE


def lcurve_row(step: int, lr: float, values: dict[str | None, list[tuple[float, ...]]]) -> str:
    """values: head -> one (val, trn) or (trn,) tuple per quantity."""
    text = f"{step:7d}"
    for per_quantity in values.values():
        for pair in per_quantity:
            text += ("   %11.2e %11.2e" % pair) if len(pair) == 2 else ("   %11.2e" % pair)
    return text + f"   {lr:8.1e}\n"


def as_written(value: float, digits: str = ".2e") -> float:
    """What a value reads back as after deepmd-kit's formatting."""
    return float(format(value, digits))


# --------------------------------------------------------------------------- read_lcurve
def test_reads_a_single_task_lcurve_with_validation(tmp_path):
    rng = np.random.default_rng(0)
    steps, rates = [1, 100, 200], [1e-3, 9.3e-4, 8.7e-4]
    values = rng.uniform(1e-3, 1.0, (3, 4, 2))  # [steps, quantities, (val, trn)]
    values[1, 3, 0] = np.nan  # no virial label in this validation batch
    text = lcurve_header({None: True}) + "".join(
        lcurve_row(step, rate, {None: [tuple(pair) for pair in values[i]]})
        for i, (step, rate) in enumerate(zip(steps, rates, strict=True)))
    (tmp_path / "lcurve.out").write_text(text)

    curve = read_lcurve(tmp_path / "lcurve.out")
    expected_names = ["step"] + [f"{q}_{s}" for q in QUANTITIES for s in ("val", "trn")] + ["lr"]
    assert list(curve) == expected_names
    assert curve["step"].dtype == np.int64 and curve["step"].tolist() == steps
    np.testing.assert_array_equal(curve["lr"], [as_written(r, ".1e") for r in rates])
    np.testing.assert_array_equal(curve["rmse_e_val"], [as_written(v) for v in values[:, 1, 0]])
    np.testing.assert_array_equal(curve["rmse_f_trn"], [as_written(v) for v in values[:, 2, 1]])
    assert np.isnan(curve["rmse_v_val"][1]) and np.isfinite(curve["rmse_v_val"][[0, 2]]).all()


def test_reads_a_single_task_lcurve_without_validation(tmp_path):
    text = lcurve_header({None: False}) + lcurve_row(1, 1e-3, {None: [(0.5,), (0.1,), (0.2,), (np.nan,)]})
    (tmp_path / "lcurve.out").write_text(text)
    curve = read_lcurve(tmp_path / "lcurve.out")
    assert list(curve) == ["step", "rmse_trn", "rmse_e_trn", "rmse_f_trn", "rmse_v_trn", "lr"]
    assert curve["rmse_f_trn"].tolist() == [0.2]


def test_reads_a_multitask_lcurve_with_a_head_without_validation(tmp_path):
    heads = {"mol": False, "water": True}
    rows = [lcurve_row(step, 1e-3, {"mol": [(0.1 * step,)] * 4, "water": [(0.2 * step, 0.3 * step)] * 4})
            for step in (1, 2)]
    (tmp_path / "lcurve.out").write_text(lcurve_header(heads) + "".join(rows))
    curve = read_lcurve(tmp_path / "lcurve.out")
    assert "rmse_e_trn_mol" in curve and "rmse_e_val_mol" not in curve
    np.testing.assert_array_equal(curve["rmse_e_val_water"], [0.2, 0.4])
    np.testing.assert_array_equal(curve["rmse_f_trn_water"], [0.3, 0.6])
    np.testing.assert_array_equal(curve["rmse_v_trn_mol"], [0.1, 0.2])


def test_a_restart_appends_a_header_and_its_rows_replace_the_steps_logged_twice(tmp_path):
    # the run logged steps 1..400 and stopped; the checkpoint was at step 300, so 300 and 400 are logged again
    def row(step, value):
        return lcurve_row(step, 1e-3, {None: [(value, value)] * 4})

    first = lcurve_header({None: True}) + "".join(row(step, 1.0) for step in (1, 100, 200, 300, 400))
    second = lcurve_header({None: True}) + "".join(row(step, 2.0) for step in (300, 400, 500))
    (tmp_path / "lcurve.out").write_text(first + second)
    curve = read_lcurve(tmp_path / "lcurve.out")
    assert curve["step"].tolist() == [1, 100, 200, 300, 400, 500]
    assert curve["rmse_e_val"].tolist() == [1.0, 1.0, 1.0, 2.0, 2.0, 2.0]


def test_malformed_lcurve_names_the_file_and_line(tmp_path):
    path = tmp_path / "lcurve.out"
    path.write_text(lcurve_header({None: False}) + "      1   1.00e-01\n")
    with pytest.raises(Dpa3Error, match=r"lcurve.out, line 3: 2 values for 6 columns"):
        read_lcurve(path)
    path.write_text("      1   1.00e-01\n")
    with pytest.raises(Dpa3Error, match="line 1: a data row before"):
        read_lcurve(path)
    with pytest.raises(Dpa3Error, match="no such learning-curve file"):
        read_lcurve(tmp_path / "absent.out")


# --------------------------------------------------------------------------- figures
def assert_png(path, width_px: int, height_px: int) -> None:
    """A PNG of the figure's size (inches x dpi) that matplotlib reads back, not blank, and no temp file left."""
    image = matplotlib.image.imread(path)  # [height, width, RGBA]
    assert image.shape[:2] == (height_px, width_px)
    assert image[..., :3].std() > 0.01  # something was drawn
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_learning_curve_png_has_a_panel_per_quantity_and_a_line_per_head_and_split(tmp_path):
    heads = {"mol": True, "water": True}
    rows = [lcurve_row(step, 1e-3 * 0.9**k, {"mol": [(1 / step, 2 / step)] * 4, "water": [(3 / step, 4 / step)] * 4})
            for k, step in enumerate((1, 10, 20, 30))]
    (tmp_path / "lcurve.out").write_text(lcurve_header(heads) + "".join(rows))
    curve = read_lcurve(tmp_path / "lcurve.out")

    figure = learning_curve_figure(curve)
    panels = [ax for ax in figure.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["energy per atom", "forces", "virial per atom"]
    assert sorted(line.get_label() for line in panels[0].get_lines()) == [
        "training (mol)", "training (water)", "validation (mol)", "validation (water)"]
    assert all(ax.get_yscale() == "log" for ax in figure.axes)  # the RMSEs and the twin learning-rate axes

    out = tmp_path / "plots" / "lcurve.png"
    out.parent.mkdir()
    plot_learning_curve(tmp_path / "lcurve.out", out)
    assert_png(out, width_px=round(7.5 * 120), height_px=round(3 * 3.2 * 120))


def test_parity_legend_states_the_numpy_rmse(tmp_path):
    rng = np.random.default_rng(1)
    reference = {"water": {"energy_per_atom": rng.normal(-5, 0.1, 8), "forces": rng.normal(0, 1, (8, 6, 3))},
                 "mol": {"energy_per_atom": rng.normal(-3, 0.1, 5), "forces": rng.normal(0, 1, (5, 3, 3))}}
    predicted = {task: {q: v + rng.normal(0, 0.05, v.shape) for q, v in values.items()}
                 for task, values in reference.items()}
    figure = parity_figure(predicted, reference)
    assert len(figure.axes) == 4  # 2 tasks x (energy per atom, forces)
    units = {"energy_per_atom": "eV/atom", "forces": "eV/Å"}
    for ax, (task, quantity) in zip(figure.axes, [(t, q) for t in reference for q in units], strict=True):
        error = predicted[task][quantity] - reference[task][quantity]
        rmse = np.sqrt(np.mean(error**2))
        texts = [text.get_text() for text in ax.get_legend().get_texts()]
        assert texts == ["y = x", f"RMSE = {rmse:.3e} {units[quantity]}"]
        assert task in ax.get_title()

    out = tmp_path / "parity.png"
    plot_parity(predicted, reference, out)
    assert_png(out, width_px=round(2 * 4.2 * 120), height_px=round(2 * 4.0 * 120))


def test_parity_refuses_arrays_that_do_not_match():
    with pytest.raises(Dpa3Error, match=r"task 'water', forces: predicted shape \(2, 3\)"):
        parity_figure({"water": {"forces": np.zeros((2, 3))}}, {"water": {"forces": np.zeros((3, 3))}})
    with pytest.raises(Dpa3Error, match="task 'mol' has predictions but no reference"):
        parity_figure({"mol": {"forces": np.zeros(3)}}, {"water": {"forces": np.zeros(3)}})

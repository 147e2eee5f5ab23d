"""Training plots: the learning curve from deepmd-kit's `lcurve.out`, and parity plots of predictions vs DFT.

`lcurve.out` (deepmd-kit 3.2.0, deepmd/pt/train/training.py: `print_header`, `print_on_training`) is a
whitespace-separated table. The header line is `# step` followed by one name per column, each written
`%11s` after three spaces, and `lr` last; a comment line follows. Each data row is the step (`%7d`), the
values (`%11.2e`, `nan` where a quantity had no data) and the learning rate (`%8.1e`). The columns are
the loss's displayed quantities in sorted order (`rmse`, `rmse_e`, `rmse_f`, `rmse_v`, sometimes `mae_*`):

    single task, with validation data     rmse_e_val rmse_e_trn ...        (validation first)
    single task, without                  rmse_e_trn ...
    multitask, per head in turn           rmse_e_val_water rmse_e_trn_water ... rmse_e_trn_mol ...

`rmse_e` and `rmse_v` are per atom (eV/atom), `rmse_f` per force component (eV/Å) (spec §9.2). A restart
appends to the file and writes the header again, and continues from the checkpoint's step, which may be
before the last row written: `read_lcurve` keeps the later rows of a step written twice.

Every figure is drawn on matplotlib's Agg canvas (no display, no pyplot state) and written atomically:
to a temporary file beside the target, then renamed.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dpa3_ref.errors import Dpa3Error

# lcurve column quantity -> (panel title, unit); the learning curve draws these, in this order
CURVE_PANELS = {
    "rmse_e": ("energy per atom", "eV/atom"),
    "rmse_f": ("forces", "eV/Å"),
    "rmse_v": ("virial per atom", "eV/atom"),
}

# parity quantity -> (what is compared, unit)
PARITY_QUANTITIES = {
    "energy_per_atom": ("energy per atom", "eV/atom"),
    "forces": ("force component", "eV/Å"),
    "virial_per_atom": ("virial per atom", "eV/atom"),
}

_COLUMN = re.compile(r"^(?P<quantity>.+?)_(?P<split>val|trn)(?:_(?P<head>.+))?$")


# --------------------------------------------------------------------------- reading lcurve.out
def read_lcurve(path: str | Path) -> dict[str, np.ndarray]:
    """Every column of an `lcurve.out` by its header name: "step" (int), the quantities and "lr" (float)."""
    path = Path(path)
    if not path.is_file():
        raise Dpa3Error(f"{path}: no such learning-curve file")
    columns: list[str] | None = None
    rows: list[list[float]] = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        words = line.split()
        if not words:
            continue
        if (words[0] == "#" and words[1:2] == ["step"]) or words[0] == "#step":
            header = line.lstrip("#").split()
            if columns is not None and header != columns:
                raise Dpa3Error(f"{path}, line {number}: the columns change after a restart ({header} after {columns})")
            columns = header
        elif words[0].startswith("#"):
            continue  # deepmd-kit's note under the header
        elif columns is None:
            raise Dpa3Error(f"{path}, line {number}: a data row before the '# step ...' header")
        elif len(words) != len(columns):
            raise Dpa3Error(f"{path}, line {number}: {len(words)} values for {len(columns)} columns")
        else:
            try:
                row = [float(word) for word in words]
            except ValueError as error:
                raise Dpa3Error(f"{path}, line {number}: {error}") from None
            while rows and rows[-1][0] >= row[0]:  # a restart re-logs steps after the checkpoint: keep the new rows
                rows.pop()
            rows.append(row)
    if columns is None:
        raise Dpa3Error(f"{path}: no '# step ...' header; not a deepmd-kit lcurve.out")
    table = np.array(rows, dtype=np.float64).reshape(len(rows), len(columns))  # [rows, columns]
    curve = {name: table[:, index] for index, name in enumerate(columns)}
    curve["step"] = curve["step"].astype(np.int64)
    return curve


def curve_columns(curve: Mapping[str, np.ndarray]) -> list[tuple[str, str, str | None, str]]:
    """(quantity, split "val"/"trn", head or None, column name) of every quantity column."""
    parsed = []
    for name in curve:
        match = _COLUMN.match(name)
        if match:
            parsed.append((match["quantity"], match["split"], match["head"], name))
    return parsed


# --------------------------------------------------------------------------- the learning curve
def learning_curve_figure(curve: Mapping[str, np.ndarray]) -> Figure:
    """One panel per quantity of CURVE_PANELS present in `curve`: RMSE against step (log y), validation
    solid and training dashed, one colour per head; the learning rate on a twin log axis."""
    columns = curve_columns(curve)
    panels = [q for q in CURVE_PANELS if any(quantity == q and _has_data(curve[name])
                                             for quantity, _, _, name in columns)]
    if not panels:
        raise Dpa3Error(f"the learning curve has no finite, positive {' / '.join(CURVE_PANELS)} column to plot")
    heads = sorted({head or "" for _, _, head, _ in columns})
    colours = {head: f"C{index}" for index, head in enumerate(heads)}
    figure = Figure(figsize=(7.5, 3.2 * len(panels)), layout="constrained")
    axes = figure.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, quantity in zip(axes, panels, strict=True):
        title, unit = CURVE_PANELS[quantity]
        for column_quantity, split, head, name in columns:
            if column_quantity == quantity and _has_data(curve[name]):
                label = ("validation" if split == "val" else "training") + (f" ({head})" if head else "")
                ax.plot(curve["step"], curve[name], color=colours[head or ""],
                        linestyle="-" if split == "val" else "--", label=label)
        ax.set_yscale("log")
        ax.set_ylabel(f"RMSE ({unit})")
        ax.set_title(title)
        ax.grid(True, which="major", alpha=0.3)
        if "lr" in curve:
            rate_axis = ax.twinx()
            rate_axis.plot(curve["step"], curve["lr"], color="0.5", linestyle=":", label="learning rate")
            rate_axis.set_yscale("log")
            rate_axis.set_ylabel("learning rate", color="0.4")
            handles, labels = ax.get_legend_handles_labels()
            rate_handles, rate_labels = rate_axis.get_legend_handles_labels()
            ax.legend(handles + rate_handles, labels + rate_labels, fontsize="small")
        else:
            ax.legend(fontsize="small")
    axes[-1].set_xlabel("step")
    return figure


def plot_learning_curve(lcurve_path: str | Path, out_png: str | Path) -> None:
    """`lcurve.out` -> a PNG of `learning_curve_figure`."""
    save_png(learning_curve_figure(read_lcurve(lcurve_path)), out_png)


def _has_data(values: np.ndarray) -> bool:
    """True if a log axis can show something: at least one finite, positive value."""
    return bool(np.any(np.isfinite(values) & (values > 0)))


# --------------------------------------------------------------------------- parity plots
def parity_figure(predicted: Mapping[str, Mapping[str, np.ndarray]],
                  reference: Mapping[str, Mapping[str, np.ndarray]]) -> Figure:
    """Predicted against DFT values, one row per task and one column per quantity of PARITY_QUANTITIES.

    predicted, reference: task name -> {quantity: array}, e.g. {"water": {"energy_per_atom": [nf],
    "forces": [nf, n, 3]}}; a single-task model is one task. Each panel shows the y = x line and, in the
    legend, the RMSE sqrt(mean (predicted − reference)²) over every value of the panel.
    """
    tasks = list(predicted)
    if not tasks:
        raise Dpa3Error("parity plot: no task to plot")
    for task in tasks:
        if task not in reference:
            raise Dpa3Error(f"parity plot: task {task!r} has predictions but no reference values")
    quantities = [q for q in PARITY_QUANTITIES if any(q in predicted[task] and q in reference[task] for task in tasks)]
    if not quantities:
        raise Dpa3Error(f"parity plot: no quantity that both sides have (expected some of {list(PARITY_QUANTITIES)})")
    figure = Figure(figsize=(4.2 * len(quantities), 4.0 * len(tasks)), layout="constrained")
    axes = figure.subplots(len(tasks), len(quantities), squeeze=False)
    for row, task in enumerate(tasks):
        for column, quantity in enumerate(quantities):
            ax = axes[row, column]
            if quantity in predicted[task] and quantity in reference[task]:
                _parity_panel(ax, task, quantity, np.asarray(predicted[task][quantity], dtype=np.float64),
                              np.asarray(reference[task][quantity], dtype=np.float64))
            else:
                ax.set_axis_off()
    return figure


def plot_parity(predicted: Mapping[str, Mapping[str, np.ndarray]], reference: Mapping[str, Mapping[str, np.ndarray]],
                out_png: str | Path) -> None:
    """A PNG of `parity_figure`."""
    save_png(parity_figure(predicted, reference), out_png)


def parity_rmse_label(predicted: np.ndarray, reference: np.ndarray, unit: str) -> str:
    """The legend text of a parity panel: "RMSE = 1.234e-02 eV/atom"."""
    return f"RMSE = {np.sqrt(np.mean(np.square(predicted - reference))):.3e} {unit}"


def _parity_panel(ax, task: str, quantity: str, predicted: np.ndarray, reference: np.ndarray) -> None:
    what, unit = PARITY_QUANTITIES[quantity]
    if predicted.shape != reference.shape:
        raise Dpa3Error(f"parity plot, task {task!r}, {quantity}: predicted shape {predicted.shape} "
                        f"differs from the reference shape {reference.shape}")
    predicted, reference = predicted.ravel(), reference.ravel()  # [values]
    low = min(predicted.min(), reference.min())
    high = max(predicted.max(), reference.max())
    ax.plot([low, high], [low, high], color="0.3", linewidth=1, label="y = x")
    ax.scatter(reference, predicted, s=6, alpha=0.6, color="C0", rasterized=True,
               label=parity_rmse_label(predicted, reference, unit))
    ax.set_xlabel(f"DFT {what} ({unit})")
    ax.set_ylabel(f"predicted {what} ({unit})")
    ax.set_title(f"{task}: {what}" if task else what)
    ax.set_aspect("equal", adjustable="datalim")
    ax.legend(fontsize="small", loc="upper left")


# --------------------------------------------------------------------------- writing
def save_png(figure: Figure, path: str | Path, dpi: int = 120) -> None:
    """Render `figure` with Agg to a temporary file beside `path`, then rename: never a half-written PNG."""
    path = Path(path)
    if not path.parent.is_dir():
        raise Dpa3Error(f"{path}: directory {path.parent} does not exist")
    FigureCanvasAgg(figure)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as file:
            figure.savefig(file, format="png", dpi=dpi)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise

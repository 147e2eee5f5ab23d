"""The official DPA3 (deepmd-kit's numpy backend, ``deepmd.dpmodel``) as a live test oracle.

Pure numpy + deepmd-kit; nothing here imports ``dpa3_ref``. What the cross-check tests take from it:

- ``build_official_model(config, rng)``: an official energy model from an ``input.json``-style "model" section
  (``type_map``, ``descriptor`` with ``type: "dpa3"``, ``fitting_net``), with every parameter that default
  initialisation leaves trivial replaced by random numbers, so that a wrong index or a dropped term shows up.
- ``official_energy`` / ``official_energies``: energies through ``model.call`` (deepmd's own periodic images
  and neighbour list, so a cell smaller than twice the cutoff is handled the official way).
- ``fd_forces`` / ``fd_virial``: central finite differences of the official energy. The numpy backend has no
  autodiff, so these are the official forces and virial; see ``FD_STEP`` for their accuracy.
- ``serialized(model)``: the dict ``dpa3_ref.official.model_from_dict`` takes (deepmd's ``serialize()``).
- ``neighbor_distances`` / ``selection_margins``: sorted neighbour distances from deepmd's own image builder,
  so tests can keep systems away from places where the official energy is not differentiable (a neighbour
  on a cutoff, two neighbours tied at a sel-truncation boundary).

deepmd-kit facts this relies on (3.2.0, read from ``deepmd/dpmodel``):

- ``EnergyModel.call(coord, atype, box=None)``: coord (nf, nloc*3) or (nf, nloc, 3) float64, atype (nf, nloc)
  int, box (nf, 9) rows = cell vectors or None. Returns ``energy`` (nf, 1), ``atom_energy`` (nf, nloc, 1) and
  ``mask``; no forces or virial in the numpy backend (``force``/``virial`` appear only in autodiff backends).
- Frames are independent, so finite-difference displacements are evaluated as one batch of frames.
- The neighbour list sorts distances with a non-stable ``argsort``: neighbours at exactly equal distance
  (an atom's own images at +L and -L in a small cell) come out in an unspecified order. Only per-slot
  statistics (``davg``/``dstd`` indexed by neighbour slot) and sel truncation can see that order, hence
  ``per_slot_stats`` below and the margins in ``selection_margins``.
- Invalid configurations raise: ``a_sel > e_sel`` and ``a_rcut > e_rcut`` (assert in the descriptor),
  ``sequential_update`` without ``update_style="res_residual"`` or without ``update_angle`` (ValueError),
  ``use_dynamic_sel`` without ``smooth_edge_update`` (NotImplementedError),
  ``(a_dim * a_compress_e_rate) % (2 * a_compress_rate) != 0`` (assert), ``a_compress_use_split`` with
  ``a_dim / rate > n_dim`` or ``a_dim * e_rate / (2 rate) > e_dim`` (assert on a weight shape),
  ``axis_neuron > e_dim`` or ``> n_dim`` (reshape error at the first call), ``rcut_smth >= rcut`` (ValueError
  at the first call), ``rcut_smth = 0`` with the exponential switch (ZeroDivisionError).
- A left-handed cell (det < 0) gets negative face distances and therefore no periodic images at all, not even
  the centre's own: the official energy is then wrong, silently. Test systems use right-handed cells.
"""

import copy
from typing import Any

import numpy as np
from deepmd.dpmodel.model.base_model import BaseModel
from deepmd.dpmodel.model.model import get_model
from deepmd.dpmodel.utils.nlist import extend_coord_with_ghosts
from deepmd.dpmodel.utils.region import normalize_coord

# Central-difference step in Å (positions) and in strain units (virial). Measured against official autodiff
# (the PyTorch forces/virial stored with ../shared/reference/water_small_f64, 39-atom cluster) the error of a
# central difference of the offset-free energy is 2e-9 eV/Å at 1e-5 and 6e-10 at 1e-4, and grows as 1/step
# below 1e-5 (roundoff: 2e-8 at 1e-6) and as step^2 above 1e-4 (plus kinks: a larger step makes neighbours
# cross cutoffs and swap slots). With the energy offsets kept the roundoff is 100x larger (2e-7 at 1e-5).
# 1e-5 keeps every distance change well inside `FD_MARGIN`.
FD_STEP = 1e-5
# Minimum distance (Å) the test systems keep between any neighbour distance and a cutoff, and between the
# neighbours on either side of a sel-truncation boundary; larger than any distance change a finite-difference
# step can cause (an atom moves by FD_STEP; a strain of FD_STEP moves a neighbour at r_c by FD_STEP * r_c).
FD_MARGIN = 2e-4


# --------------------------------------------------------------------------------------------------------------
# building a randomised official model


def _walk_layers(tree: Any):
    """Yield every serialized ``Layer`` dict (the dicts holding ``w``, ``b``, ``idt``) inside ``tree``."""
    if isinstance(tree, dict):
        if tree.get("@class") == "Layer":
            yield tree
        for value in tree.values():
            yield from _walk_layers(value)
    elif isinstance(tree, list):
        for value in tree:
            yield from _walk_layers(value)


def randomize_parameters(data: dict, rng: np.random.Generator, *, per_slot_stats: bool = True) -> dict:
    """Replace every trivially initialised array of a serialized energy model by random numbers (in place).

    Default initialisation leaves things an importer could get wrong unnoticed: residual vectors all equal to
    ``update_residual`` (0.1), ``davg = 0`` and a constant ``dstd``, zero energy offsets (``out_bias``,
    ``bias_atom_e``), an all-zero ``case_embd`` and fitting timesteps ``idt`` all close to 0.1.

    Args:
        data: the dict of ``EnergyModel.serialize()``; modified and returned.
        rng: the source of randomness.
        per_slot_stats: draw ``davg``/``dstd`` independently for every (centre type, neighbour slot, component).
            With ``False`` they vary with type and component only, which makes the energy independent of the
            order of tied neighbours (see the module docstring).
    """
    for layer in _walk_layers(data):
        variables = layer["@variables"]
        if variables.get("b") is not None:
            variables["b"] = rng.normal(size=variables["b"].shape)
        if variables.get("idt") is not None:
            variables["idt"] = rng.normal(0.1, 0.3, size=variables["idt"].shape)

    repflow = data["descriptor"]["repflow_variable"]
    for layer in repflow["repflow_layers"]:
        variables = layer.get("@variables", {})  # absent unless update_style == "res_residual"
        for name in ("n_residual", "e_residual", "a_residual"):
            if name in variables:
                variables[name] = [r + rng.normal(0.0, 0.05, size=r.shape) for r in variables[name]]

    stats = repflow["@variables"]
    ntypes, nnei, ncomp = stats["davg"].shape
    stat_shape = (ntypes, nnei, ncomp) if per_slot_stats else (ntypes, 1, ncomp)
    stats["davg"] = np.broadcast_to(rng.normal(0.0, 0.1, size=stat_shape), (ntypes, nnei, ncomp)).copy()
    stats["dstd"] = np.broadcast_to(rng.uniform(0.2, 1.0, size=stat_shape), (ntypes, nnei, ncomp)).copy()

    model_vars = data["@variables"]
    model_vars["out_bias"] = rng.normal(0.0, 2.0, size=model_vars["out_bias"].shape)
    model_vars["out_std"] = rng.uniform(0.5, 2.0, size=model_vars["out_std"].shape)  # stored, never applied

    fitting_vars = data["fitting"]["@variables"]
    fitting_vars["bias_atom_e"] = rng.normal(0.0, 1.0, size=fitting_vars["bias_atom_e"].shape)
    if fitting_vars.get("case_embd") is not None:
        dim_case_embd = fitting_vars["case_embd"].shape[0]
        fitting_vars["case_embd"] = np.eye(dim_case_embd)[rng.integers(dim_case_embd)]  # a dataset's one-hot
    return data


def build_official_model(config: dict, rng: np.random.Generator, *, per_slot_stats: bool = True) -> BaseModel:
    """An official deepmd-kit energy model from a "model" config section, with randomised parameters.

    Args:
        config: ``{"type_map": [...], "descriptor": {"type": "dpa3", "repflow": {...}, ...},
            "fitting_net": {"neuron": [...], ...}}`` as in an ``input.json``. Not modified.
        rng: seeds deepmd's own initialisation and draws the extra randomisation (``randomize_parameters``).
        per_slot_stats: see ``randomize_parameters``.

    Returns:
        A ``deepmd.dpmodel`` ``EnergyModel``. Raises whatever deepmd-kit raises for an invalid config.
    """
    config = copy.deepcopy(config)
    config["descriptor"].setdefault("seed", int(rng.integers(2**31)))
    config["fitting_net"].setdefault("seed", int(rng.integers(2**31)))
    data = get_model(config).serialize()
    randomize_parameters(data, rng, per_slot_stats=per_slot_stats)
    return BaseModel.deserialize(data)


def serialized(model: BaseModel) -> dict:
    """The "model" section of a ``.dp`` file for ``model`` (what ``dpa3_ref.official.model_from_dict`` takes).

    A deep copy: ``"@class": "Model"``, ``"type": "standard"``, ``descriptor``, ``fitting``, ``type_map``,
    ``"@variables": {out_bias, out_std}``, arrays as numpy arrays.
    """
    return copy.deepcopy(model.serialize())


def without_energy_offsets(model: BaseModel) -> BaseModel:
    """A copy of ``model`` with ``out_bias`` and ``bias_atom_e`` set to zero.

    The offsets are per-atom constants, so forces and virials do not change; removing them keeps the total
    energy small, and with it the roundoff error of a finite difference (~ eps |E| / step).
    """
    data = serialized(model)
    data["@variables"]["out_bias"] = np.zeros_like(data["@variables"]["out_bias"])
    data["fitting"]["@variables"]["bias_atom_e"] = np.zeros_like(data["fitting"]["@variables"]["bias_atom_e"])
    return BaseModel.deserialize(data)


# --------------------------------------------------------------------------------------------------------------
# official energies and their finite differences


def official_energies(
    model: BaseModel, coords: np.ndarray, atype: np.ndarray, boxes: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Energies of several frames of one system through ``model.call``.

    Args:
        coords: [nf, n, 3] Å.
        atype: [n] model type indices.
        boxes: [nf, 3, 3] rows = cell vectors, or None (open boundaries).

    Returns:
        energy [nf] and atom_energy [nf, n], float64.
    """
    coords = np.asarray(coords, dtype=np.float64)
    nf, n, _ = coords.shape
    atype = np.broadcast_to(np.asarray(atype, dtype=np.int64), (nf, n)).copy()
    box = None if boxes is None else np.asarray(boxes, dtype=np.float64).reshape(nf, 9)
    out = model.call(coords.reshape(nf, n * 3), atype, box)
    return np.asarray(out["energy"]).reshape(nf), np.asarray(out["atom_energy"]).reshape(nf, n)


def official_energy(
    model: BaseModel, coord: np.ndarray, atype: np.ndarray, box: np.ndarray | None
) -> tuple[float, np.ndarray]:
    """Total energy and per-atom energies [n] of one frame (coord [n, 3], box [3, 3] or None)."""
    energy, atom_energy = official_energies(
        model, np.asarray(coord)[None], atype, None if box is None else np.asarray(box)[None]
    )
    return float(energy[0]), atom_energy[0]


def fd_forces(
    model: BaseModel,
    coord: np.ndarray,
    atype: np.ndarray,
    box: np.ndarray | None,
    step: float = FD_STEP,
    atoms: list[int] | None = None,
) -> np.ndarray:
    """Central-difference forces -dE/dx [n, 3] of the official energy (all displaced frames in one call).

    ``atoms`` restricts the rows to those atoms (for large systems). Pass ``without_energy_offsets(model)``
    for the best accuracy.
    """
    coord = np.asarray(coord, dtype=np.float64)
    n = coord.shape[0]
    atoms = list(range(n)) if atoms is None else list(atoms)
    displacements = np.zeros((len(atoms), 3, n, 3))
    for row, i in enumerate(atoms):
        displacements[row, :, i, :] = np.eye(3) * step
    displacements = displacements.reshape(-1, n, 3)  # [3 len(atoms), n, 3]
    frames = np.concatenate([coord + displacements, coord - displacements])
    boxes = None if box is None else np.broadcast_to(box, (len(frames), 3, 3))
    energy, _ = official_energies(model, frames, atype, boxes)
    half = len(displacements)
    return -((energy[:half] - energy[half:]) / (2 * step)).reshape(len(atoms), 3)


def fd_virial(
    model: BaseModel, coord: np.ndarray, atype: np.ndarray, box: np.ndarray | None, step: float = FD_STEP
) -> np.ndarray:
    """Central-difference virial [3, 3] of the official energy, deepmd convention (spec §7).

    Strain ``x -> x (I + eps)``, ``cell -> cell (I + eps)`` (row vectors); ``W = -(dE/d eps)^T``, which equals
    ``sum_a F_a x_a^T`` over extended atoms for an exact gradient. Not divided by the volume.
    """
    coord = np.asarray(coord, dtype=np.float64)
    strains = np.eye(9).reshape(9, 3, 3) * step  # [9, 3, 3]
    deform = np.concatenate([np.eye(3) + strains, np.eye(3) - strains])  # [18, 3, 3]
    frames = coord[None] @ deform  # [18, n, 3]
    boxes = None if box is None else np.asarray(box, dtype=np.float64)[None] @ deform
    energy, _ = official_energies(model, frames, atype, boxes)
    dE_deps = ((energy[:9] - energy[9:]) / (2 * step)).reshape(3, 3)
    return -dE_deps.T


# --------------------------------------------------------------------------------------------------------------
# geometry as the official neighbour list sees it


def neighbor_distances(coord: np.ndarray, box: np.ndarray | None, rcut: float) -> list[np.ndarray]:
    """For each atom, the sorted distances (Å) to all other atoms and periodic images closer than ``rcut``.

    Built with deepmd's own wrapping (``normalize_coord``) and image set (``extend_coord_with_ghosts``), with
    the distance formed the same way (image minus wrapped centre), so a cell smaller than twice the cutoff
    lists every image the official model sees.
    """
    coord = np.asarray(coord, dtype=np.float64)
    n = coord.shape[0]
    atype = np.zeros((1, n), dtype=np.int64)
    if box is not None:
        box = np.asarray(box, dtype=np.float64).reshape(1, 3, 3)
        coord = normalize_coord(coord.reshape(1, n, 3), box).reshape(n, 3)
    cell = None if box is None else box.reshape(1, 9)
    ext, _, _ = extend_coord_with_ghosts(coord.reshape(1, n * 3), atype, cell, rcut)
    ext = ext.reshape(-1, 3)
    dist = np.linalg.norm(ext[None, :, :] - coord[:, None, :], axis=-1)  # [n, nall]
    dist[np.arange(n), np.arange(n)] = np.inf  # the centre itself (the first n extended atoms are the originals)
    return [np.sort(row[row < rcut]) for row in dist]


def selection_margins(
    coord: np.ndarray, box: np.ndarray | None, *, e_rcut: float, e_sel: int, a_rcut: float, a_sel: int
) -> dict[str, float]:
    """How far a system is from the events at which the official energy is not differentiable.

    Returns (all in Å, ``inf`` where the event cannot happen):
        ``cutoff``: smallest |r_ij - r_c| and |r_ij - r_c^a| over all pairs and images;
        ``truncation``: smallest gap between the last kept and the first dropped neighbour, for the edge list
            (atoms with more than ``e_sel`` neighbours inside ``e_rcut``) and the angle list (more than
            ``a_sel`` inside ``a_rcut``);
        ``tie``: smallest gap between consecutive neighbour distances inside ``e_rcut`` (0 for an atom's own
            images at +L and -L): below ~1e-9 the slot order of the two is not reproducible.
    """
    margins = {"cutoff": np.inf, "truncation": np.inf, "tie": np.inf}
    for d in neighbor_distances(coord, box, e_rcut + 1.0):
        if d.size:
            margins["cutoff"] = min(margins["cutoff"], np.abs(d - e_rcut).min(), np.abs(d - a_rcut).min())
        inside = d[d <= e_rcut]
        if inside.size > 1:
            margins["tie"] = min(margins["tie"], np.diff(inside).min())
        if inside.size > e_sel:
            margins["truncation"] = min(margins["truncation"], inside[e_sel] - inside[e_sel - 1])
        n_angle = int(np.sum(inside < a_rcut))
        if n_angle > a_sel:
            margins["truncation"] = min(margins["truncation"], inside[a_sel] - inside[a_sel - 1])
    return {k: float(v) for k, v in margins.items()}


def neighbor_counts(coord: np.ndarray, box: np.ndarray | None, *, e_rcut: float, a_rcut: float) -> tuple[int, int]:
    """Largest number of neighbours of any atom inside ``e_rcut`` (inclusive) and inside ``a_rcut`` (strict)."""
    dists = neighbor_distances(coord, box, e_rcut + 1.0)
    n_edge = max(int(np.sum(d <= e_rcut)) for d in dists)
    n_angle = max(int(np.sum(d < a_rcut)) for d in dists)
    return n_edge, n_angle

"""Properties of our DPA3 model that the official reference files cannot show on their own.

All in float64 on a tiny random model (fast to compile) unless stated. Finite differences use central
steps of 1e-5 Å (force) and 1e-5 (strain); their truncation error here is ~1e-9, so 1e-7 tolerances
would catch any missing gradient path (those are O(|F|) ~ 1e-2 or larger).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dpa3_ref
from dpa3_ref import DPA3Config, Dpa3Error, Potential
from dpa3_ref.activations import get_activation, silut_constants
from dpa3_ref.calculator import DPA3Calculator
from dpa3_ref.model import cast_model, energy_forces_virial, with_config
from dpa3_ref.neighbors import build_graph, pad_graph

TINY = DPA3Config(
    type_map=("H", "C", "O"), n_dim=8, e_dim=6, a_dim=4, nlayers=2, e_rcut=4.0, e_rcut_smth=3.0, e_sel=40,
    a_rcut=3.0, a_rcut_smth=2.2, a_sel=16, axis_neuron=2, smooth_edge_update=True, update_residual_init="norm",
    activation_function="silut:3.0", fitting_neuron=(12, 12), fitting_activation_function="tanh",
)


def random_system(seed, n=10, periodic=True):
    rng = np.random.default_rng(seed)
    cell = np.array([[5.5, 0, 0], [1.2, 5.0, 0], [-0.7, 0.9, 5.8]]) if periodic else None
    # jittered grid: no two atoms closer than ~1 Å
    grid = np.stack(np.meshgrid(*[np.arange(3)] * 3, indexing="ij"), -1).reshape(-1, 3)[:n]
    frac = (grid + 0.5 + rng.uniform(-0.2, 0.2, (n, 3))) / 3
    positions = frac @ (cell if periodic else np.eye(3) * 5.0)
    return positions, rng.integers(0, 3, n), cell


@pytest.fixture(scope="module")
def tiny():
    return Potential.init(TINY, seed=3)


@pytest.mark.parametrize("periodic", [True, False])
def test_forces_are_minus_the_energy_gradient(tiny, periodic):
    positions, types, cell = random_system(0, periodic=periodic)
    out = tiny.evaluate(positions, types, cell)
    step, fd = 1e-5, np.zeros_like(positions)
    for a in range(len(positions)):
        for k in range(3):
            plus, minus = positions.copy(), positions.copy()
            plus[a, k] += step
            minus[a, k] -= step
            fd[a, k] = -(tiny.evaluate(plus, types, cell)["energy"] - tiny.evaluate(minus, types, cell)["energy"]) / (2 * step)
    assert np.abs(out["forces"]).max() > 1e-3  # the test is not vacuous
    np.testing.assert_allclose(out["forces"], fd, rtol=0, atol=1e-7)
    np.testing.assert_allclose(out["forces"].sum(axis=0), 0.0, atol=1e-12)


def test_virial_is_minus_the_strain_derivative(tiny):
    positions, types, cell = random_system(1)
    out = tiny.evaluate(positions, types, cell)
    step, fd = 1e-5, np.zeros((3, 3))
    for k in range(3):
        for m in range(3):
            strain = np.zeros((3, 3))
            strain[k, m] = step
            plus = tiny.evaluate(positions @ (np.eye(3) + strain), types, cell @ (np.eye(3) + strain))["energy"]
            minus = tiny.evaluate(positions @ (np.eye(3) - strain), types, cell @ (np.eye(3) - strain))["energy"]
            fd[k, m] = (plus - minus) / (2 * step)
    np.testing.assert_allclose(out["virial"], -fd.T, rtol=0, atol=1e-7)
    np.testing.assert_allclose(out["virial"], out["virial"].T, atol=1e-10)


def test_dynamic_selection_equals_static_when_nothing_is_truncated():
    """spec §11.10: dynamic (f·S_e, f·S_a, f) == static (S_e, S_a); only the normalisation differs."""
    static = Potential.init(TINY, seed=5)
    dynamic_config = TINY.replace(use_dynamic_sel=True, sel_reduce_factor=4.0, e_sel=4 * TINY.e_sel, a_sel=4 * TINY.a_sel)
    dynamic = Potential(with_config(_retile_statistics(static.model, dynamic_config.e_sel), dynamic_config))
    positions, types, cell = random_system(2)
    a, b = static.evaluate(positions, types, cell), dynamic.evaluate(positions, types, cell)
    np.testing.assert_allclose(a["energy"], b["energy"], rtol=1e-12)
    np.testing.assert_allclose(a["forces"], b["forces"], atol=1e-12)


def _retile_statistics(model, e_sel):
    """davg/dstd (uniform over slots here) stretched to another number of neighbour slots."""
    descriptor = eqx.tree_at(lambda d: (d.davg, d.dstd), model.descriptor,
                             (jnp.repeat(model.descriptor.davg[:, :1], e_sel, 1),
                              jnp.repeat(model.descriptor.dstd[:, :1], e_sel, 1)))
    return eqx.tree_at(lambda m: m.descriptor, model, descriptor)


def test_float32_model_agrees_with_float64(tiny):
    single = Potential(cast_model(tiny.model, "float32"))
    positions, types, cell = random_system(3)
    a, b = tiny.evaluate(positions, types, cell), single.evaluate(positions, types, cell)
    assert b["forces"].dtype == np.float64  # outputs are float64 whatever the model precision
    np.testing.assert_allclose(b["energy"], a["energy"], rtol=1e-6)
    np.testing.assert_allclose(b["forces"], a["forces"], atol=1e-5 * np.abs(a["forces"]).max() + 1e-7)


def test_with_config_casts_every_leaf_as_the_device_does(tiny):
    # with_config takes the new dtypes from a traced (not run) init_model and casts on the host: every leaf
    # must have the dtype a real initialisation gives, and the value of casting on the device (XLA's convert)
    for precision in ("float32", "float64"):
        start = cast_model(tiny.model, "float32") if precision == "float64" else tiny.model
        config = start.config.replace(precision=precision, fitting_precision=precision)
        cast = with_config(start, config)
        assert cast.config == config
        initialised = jax.tree.leaves(Potential.init(config, seed=0).model)
        for new, old, like in zip(jax.tree.leaves(cast), jax.tree.leaves(start), initialised, strict=True):
            assert (new.dtype, new.shape) == (like.dtype, like.shape)
            np.testing.assert_array_equal(np.asarray(new), np.asarray(old.astype(like.dtype)))


def test_padding_does_not_change_results(tiny):
    positions, types, cell = random_system(4)
    graph = build_graph(positions, types, cell, TINY, pad=False)
    bigger = pad_graph(graph, graph.n_atoms + 7, graph.max_neighbors + 5, graph.max_angle_neighbors + 3)
    a = jax.jit(energy_forces_virial)(tiny.model, graph)
    b = jax.jit(energy_forces_virial)(tiny.model, bigger)
    n = len(positions)
    np.testing.assert_allclose(a["energy"], b["energy"], rtol=1e-14)
    np.testing.assert_allclose(a["forces"][:n], b["forces"][:n], atol=1e-14)
    np.testing.assert_array_equal(b["forces"][n:], 0.0)
    np.testing.assert_array_equal(b["atom_energy"][n:], 0.0)


def test_dataset_encoding_shifts_energy_through_the_first_layer():
    model = Potential.init(TINY.replace(dim_case_embd=3), seed=1)
    positions, types, cell = random_system(5)
    energies = [model.evaluate(positions, types, cell, case_embd=np.eye(3)[k])["energy"] for k in range(3)]
    assert len({round(float(e), 8) for e in energies}) == 3  # each dataset gets its own energy
    same = model.evaluate(positions, types, cell, case_embd=np.eye(3)[1])
    np.testing.assert_allclose(same["energy"], energies[1], rtol=1e-14)


@pytest.mark.parametrize("threshold, spec_slope, spec_offset", [(3.0, 1.088104106, 2.857722380), (10.0, 1.000408560, 9.999546021)])
def test_silut_is_continuous_with_continuous_slope_at_threshold(threshold, spec_slope, spec_offset):
    """Constants against the values printed in spec §5.1 (9 decimals)."""
    phi = get_activation(f"silut:{threshold}")
    slope, offset = silut_constants(threshold)
    below, above = jnp.array(threshold - 1e-9), jnp.array(threshold + 1e-9)
    assert abs(phi(below) - phi(above)) < 1e-8
    assert abs(jax.grad(phi)(below) - jax.grad(phi)(above)) < 1e-7
    assert abs(slope - spec_slope) < 1e-9 and abs(offset - spec_offset) < 1e-9
    assert float(phi(jnp.array(1e3))) <= offset + 1.0  # bounded above by c + 1


@pytest.mark.parametrize("name", ["silut:3.0", "silut:10.0", "silu"])
def test_activation_derivative_rules_match_plain_autodiff(name):
    x = jnp.linspace(-8.0, 14.0, 2001)
    phi = get_activation(name)

    def plain(v):
        if name == "silu":
            return v * jax.nn.sigmoid(v)
        threshold = float(name.split(":")[1])
        slope, offset = silut_constants(threshold)
        return jnp.where(v < threshold, v * jax.nn.sigmoid(v), jnp.tanh(slope * (v - threshold)) + offset)

    for derivative in (jax.grad, lambda f: jax.grad(jax.grad(f)), lambda f: jax.grad(jax.grad(jax.grad(f)))):
        np.testing.assert_allclose(jax.vmap(derivative(phi))(x), jax.vmap(derivative(plain))(x), atol=1e-12)


def test_second_derivatives_exist_for_force_training(tiny):
    """Training on forces differentiates forces w.r.t. parameters: must be finite and non-zero."""
    positions, types, cell = random_system(6)
    graph = tiny.graph(positions, types, cell)

    def force_loss(model):
        return jnp.sum(energy_forces_virial(model, graph)["forces"] ** 2)

    grads = jax.grad(force_loss)(tiny.model)
    leaves = [g for g in jax.tree.leaves(grads) if g.size]
    assert all(np.isfinite(g).all() for g in leaves)
    assert max(float(jnp.abs(g).max()) for g in leaves) > 0


def test_ase_calculator_stress_matches_finite_differences(tiny):
    from ase import Atoms

    positions, types, cell = random_system(7)
    atoms = Atoms(np.array(TINY.type_map)[types], positions=positions, cell=cell, pbc=True)
    atoms.calc = DPA3Calculator(tiny)
    stress = atoms.get_stress()
    numerical = atoms.calc.calculate_numerical_stress(atoms, d=1e-5)
    np.testing.assert_allclose(stress, numerical, atol=1e-8)
    assert abs(atoms.get_potential_energy() - tiny.evaluate(positions, types, cell)["energy"]) < 1e-12


def test_errors_name_the_problem(tiny, tmp_path):
    positions, types, cell = random_system(8)
    with pytest.raises(Dpa3Error, match=r"\['Xe'\] not in the model's type map"):
        tiny.evaluate(positions, ["Xe"] + ["H"] * (len(positions) - 1), cell)
    with pytest.raises(Dpa3Error, match="does not exist"):
        dpa3_ref.load(tmp_path / "missing.dp")
    (tmp_path / "junk.dp").write_text("not hdf5")
    with pytest.raises(Dpa3Error, match="not a deepmd-kit .dp model"):
        dpa3_ref.load(tmp_path / "junk.dp")
    np.savez(tmp_path / "junk.npz", a=np.zeros(3))
    with pytest.raises(Dpa3Error, match="not a dpa3-ref model"):
        dpa3_ref.load(tmp_path / "junk.npz")
    (tmp_path / "other.yaml").write_text("model: {descriptor: {type: se_e2_a}, fitting_net: {}, type_map: [H]}")
    with pytest.raises(Dpa3Error, match="not a DPA3 model"):
        dpa3_ref.load(tmp_path / "other.yaml")


def blockwise_for_every_size(monkeypatch) -> list:
    """Make even small systems take the blockwise path (blocks of 4 atoms); returns a list that records its calls."""
    import dpa3_ref.descriptor

    calls, blockwise = [], dpa3_ref.descriptor.blockwise
    monkeypatch.setattr(dpa3_ref.descriptor, "LARGE_SYSTEM", 1)
    monkeypatch.setattr(dpa3_ref.descriptor, "ATOMS_PER_BLOCK", 4)
    monkeypatch.setattr(dpa3_ref.descriptor, "blockwise", lambda *args: calls.append(1) or blockwise(*args))
    return calls


@pytest.mark.parametrize(
    "variant",
    [{}, {"nlayers": 4}, {"nlayers": 3, "sequential_update": True},
     {"nlayers": 3, "update_angle": False, "update_style": "res_avg"},
     {"nlayers": 3, "smooth_edge_update": False, "exclude_types": ((0, 1),)}],
)
def test_memory_saving_path_for_large_systems_gives_the_same_numbers(variant, monkeypatch):
    """Large systems run each layer on blocks of atoms, recomputed in the backward pass; no number may change."""
    potential = Potential.init(TINY.replace(**variant), seed=3)
    positions, types, cell = random_system(9, n=27)
    graph = potential.graph(positions, types, cell)  # 28 atoms after padding: seven blocks of 4
    assert graph.n_atoms % 4 == 0 and graph.n_atoms > 4
    plain = jax.jit(lambda m, g: energy_forces_virial(m, g))(potential.model, graph)
    calls = blockwise_for_every_size(monkeypatch)
    lean = jax.jit(lambda m, g: energy_forces_virial(m, g))(potential.model, graph)
    assert len(calls) == potential.config.nlayers  # every layer took the blockwise path
    np.testing.assert_allclose(lean["energy"], plain["energy"], rtol=1e-13)
    np.testing.assert_allclose(lean["atom_energy"], plain["atom_energy"], atol=1e-13)
    np.testing.assert_allclose(lean["forces"], plain["forces"], atol=1e-13)
    np.testing.assert_allclose(lean["virial"], plain["virial"], atol=1e-12)


@pytest.mark.parametrize("variant", [{}, {"nlayers": 3, "sequential_update": True}])
def test_memory_saving_path_is_differentiable_twice(variant, monkeypatch):
    """Training on forces differentiates forces with respect to the weights, so the blockwise backward pass
    (a custom VJP) must itself be differentiable, and give the plain path's weight gradient."""
    potential = Potential.init(TINY.replace(**variant), seed=3)
    positions, types, cell = random_system(9, n=27)
    graph = potential.graph(positions, types, cell)

    def force_loss(model):
        out = energy_forces_virial(model, graph)
        return jnp.sum(out["forces"] ** 2) + jnp.sum(out["energy"])

    plain = jax.jit(jax.grad(force_loss))(potential.model)
    calls = blockwise_for_every_size(monkeypatch)
    lean = jax.jit(jax.grad(force_loss))(potential.model)
    assert len(calls) == potential.config.nlayers
    plain_leaves, lean_leaves = jax.tree.leaves(plain), jax.tree.leaves(lean)
    assert len(plain_leaves) == len(lean_leaves) > 20
    scale = max(float(jnp.max(jnp.abs(x))) for x in plain_leaves if x.size)
    for a, b in zip(plain_leaves, lean_leaves, strict=True):
        np.testing.assert_allclose(b, a, atol=1e-12 * scale)


def test_table_widths_only_grow_so_md_does_not_recompile(monkeypatch):
    """After a crowded frame, a sparser one with the same atom count is padded to the same table widths (one
    compiled function serves both), with the numbers of an unpadded evaluation."""
    import dpa3_ref.potential

    def table_shapes(graph):
        return graph.neighbors.shape, graph.angle_mask.shape

    shapes, compiled = [], dpa3_ref.potential._compiled_energy_forces_virial
    monkeypatch.setattr(dpa3_ref.potential, "_compiled_energy_forces_virial",
                        lambda model, graph, case: shapes.append(table_shapes(graph)) or compiled(model, graph, case))
    potential = Potential.init(TINY, seed=3)
    positions, types, cell = random_system(6, n=12, periodic=False)
    crowded = potential.graph(positions * 0.6, types)
    sparse = potential.graph(positions * 2.5, types)
    assert sparse.max_neighbors < crowded.max_neighbors  # the test needs two different widths
    potential.evaluate(positions * 0.6, types)
    result = potential.evaluate(positions * 2.5, types)
    assert shapes == [table_shapes(crowded)] * 2
    unpadded = jax.jit(energy_forces_virial)(potential.model, potential.graph(positions * 2.5, types, pad=False))
    np.testing.assert_allclose(result["energy"], unpadded["energy"][0], rtol=1e-13)
    np.testing.assert_allclose(result["forces"], unpadded["forces"], atol=1e-13)


def test_training_gradient_matches_plain_autodiff_and_finite_differences(monkeypatch):
    """Training on forces differentiates the model twice. The weight gradient of an energy + force loss
    must equal (a) the same gradient with the hand-written derivative rules of the activation replaced by
    plain autodiff, to round-off, and (b) central finite differences of the loss along random directions."""
    import dpa3_ref.activations

    potential = Potential.init(TINY, seed=3)
    positions, types, cell = random_system(10, n=12)
    graph = potential.graph(positions, types, cell)
    rng = np.random.default_rng(0)
    energy_label = float(energy_forces_virial(potential.model, graph)["energy"][0]) + 0.5
    force_labels = rng.normal(0.0, 0.3, (graph.n_atoms, 3))

    def loss(model):
        out = energy_forces_virial(model, graph)
        return 0.02 * (out["energy"][0] - energy_label) ** 2 / 12 + 1000.0 * jnp.mean((out["forces"] - force_labels) ** 2)

    gradient = jax.jit(jax.grad(loss))(potential.model)

    def plain_silut(threshold):
        slope, offset = silut_constants(threshold)
        return lambda x: jnp.where(x < threshold, x * jax.nn.sigmoid(x), jnp.tanh(slope * (x - threshold)) + offset)

    with monkeypatch.context() as patch:
        patch.setattr(dpa3_ref.activations, "silut", plain_silut)
        plain = jax.jit(jax.grad(loss))(potential.model)
    leaves, plain_leaves = jax.tree.leaves(gradient), jax.tree.leaves(plain)
    scale = max(float(jnp.max(jnp.abs(x))) for x in plain_leaves if x.size)
    assert scale > 1e-3  # not vacuous
    for a, b in zip(plain_leaves, leaves, strict=True):
        np.testing.assert_allclose(b, a, atol=1e-12 * scale)

    params, static = eqx.partition(potential.model, eqx.is_inexact_array)
    value = jax.jit(lambda p: loss(eqx.combine(p, static)))
    step = 1e-5
    for seed in range(3):
        keys = jax.random.split(jax.random.key(seed), len(jax.tree.leaves(params)))
        direction = jax.tree.unflatten(jax.tree.structure(params),
                                       [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, jax.tree.leaves(params))])
        shifted = [value(jax.tree.map(lambda p, d, s=sign: p + s * step * d, params, direction)) for sign in (1, -1)]
        finite_difference = float(shifted[0] - shifted[1]) / (2 * step)
        analytic = sum(float(jnp.sum(g * d)) for g, d in zip(jax.tree.leaves(eqx.filter(gradient, eqx.is_inexact_array)),
                                                              jax.tree.leaves(direction)))
        np.testing.assert_allclose(analytic, finite_difference, rtol=1e-6)

"""The optimizer is PyTorch's Adam/AdamW after PyTorch's global-norm clipping (spec §9.4).

Oracles: optax's own `adamw` and `adam` (written independently, the same algebra in another order, so equal to
float64 round-off) and the clipping rule of torch.nn.utils.clip_grads_with_norm_ written out by hand.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpa3_ref.config import DPA3Config
from dpa3_ref.model import init_model
from dpa3_ref.multitask import single_task
from dpa3_ref.optimizer import clip_by_global_norm, torch_adam, trainable_filter


def random_tree(seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return {"w": jnp.asarray(rng.normal(size=(4, 3)) * scale), "b": jnp.asarray(rng.normal(size=3) * scale)}


@pytest.mark.parametrize("weight_decay", [0.0, 1e-3, 0.1])
def test_adamw_equals_optax_adamw(weight_decay):
    rates = [1e-2 * 0.9**k for k in range(12)]
    params = random_tree(0)
    mine = torch_adam(0.9, 0.999, weight_decay, decoupled=True)
    reference = optax.inject_hyperparams(optax.adamw)(learning_rate=rates[0], b1=0.9, b2=0.999, eps=1e-8,
                                                      weight_decay=weight_decay)
    p_mine, p_ref = params, params
    s_mine, s_ref = mine.init(params), reference.init(params)
    for step, lr in enumerate(rates):
        grads = random_tree(step + 1, scale=0.1 * (step + 1))
        u, s_mine = mine.update(grads, s_mine, p_mine, learning_rate=jnp.float64(lr))
        p_mine = optax.apply_updates(p_mine, u)
        s_ref.hyperparams["learning_rate"] = jnp.float64(lr)
        u, s_ref = reference.update(grads, s_ref, p_ref)
        p_ref = optax.apply_updates(p_ref, u)
    for a, b in zip(jax.tree.leaves(p_mine), jax.tree.leaves(p_ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)


def test_adam_with_weight_decay_adds_an_l2_gradient():
    # torch.optim.Adam(weight_decay=λ): g + λ p enters the moments (unlike AdamW)
    params = random_tree(0)
    mine = torch_adam(0.9, 0.99, 0.05, decoupled=False)
    reference = optax.chain(optax.add_decayed_weights(0.05), optax.adam(1e-2, b1=0.9, b2=0.99, eps=1e-8))
    p_mine, p_ref, s_mine, s_ref = params, params, mine.init(params), reference.init(params)
    for step in range(8):
        grads = random_tree(step + 1)
        u, s_mine = mine.update(grads, s_mine, p_mine, learning_rate=1e-2)
        p_mine = optax.apply_updates(p_mine, u)
        u, s_ref = reference.update(grads, s_ref, p_ref)
        p_ref = optax.apply_updates(p_ref, u)
    for a, b in zip(jax.tree.leaves(p_mine), jax.tree.leaves(p_ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)


def test_clipping_uses_torch_rule_with_its_epsilon():
    grads = random_tree(3, scale=10.0)
    norm = np.sqrt(sum(np.sum(np.asarray(g) ** 2) for g in jax.tree.leaves(grads)))
    clipped, _ = clip_by_global_norm(5.0).update(grads, optax.EmptyState())
    factor = 5.0 / (norm + 1e-6)  # torch: max_norm / (total_norm + 1e-6), clamped at 1
    for g, c in zip(jax.tree.leaves(grads), jax.tree.leaves(clipped), strict=True):
        np.testing.assert_allclose(c, np.asarray(g) * factor, rtol=1e-15)
    small = random_tree(4, scale=1e-3)
    unchanged, _ = clip_by_global_norm(5.0).update(small, optax.EmptyState())
    for g, c in zip(jax.tree.leaves(small), jax.tree.leaves(unchanged), strict=True):
        np.testing.assert_array_equal(c, g)


def test_buffers_are_not_trained():
    config = DPA3Config(type_map=("O", "H"), n_dim=8, e_dim=4, a_dim=4, nlayers=1, e_sel=20, a_sel=8, e_rcut=4.0,
                        e_rcut_smth=3.5, a_rcut=3.0, a_rcut_smth=2.5, axis_neuron=2, fitting_neuron=(8, 8),
                        dim_case_embd=2)
    model = single_task(init_model(config, key=jax.random.key(0)))
    flags = jax.tree_util.tree_flatten_with_path(trainable_filter(model))[0]
    frozen = [jax.tree_util.keystr(path) for path, trained in flags if not trained]
    trained = [jax.tree_util.keystr(path) for path, trained in flags if trained]
    assert sorted(name.split(".")[-1].split("[")[0] for name in frozen) == [
        "bias_atom_e", "case_embd", "davg", "dstd", "out_bias"]
    assert any("node_self" in name for name in trained) and any("residual" in name for name in trained)
    assert any("type_embedding" in name for name in trained)


def test_arrays_the_loss_never_reads_are_found():
    """PyTorch gives such parameters no gradient and skips them (weight decay included); so do we."""
    from dpa3_ref.optimizer import reaches_loss

    params = {"used": jnp.ones(3), "unused": jnp.ones(2), "dead_end": jnp.ones(2)}

    def loss(p):
        _ = jnp.sum(p["dead_end"] ** 2)  # computed, then thrown away
        return jnp.sum(jnp.sin(p["used"]))

    assert reaches_loss(loss, params) == {"used": True, "unused": False, "dead_end": False}
    grad = jax.grad(lambda p: jax.grad(loss)(p)["used"].sum())(params)  # second order, as with forces
    assert reaches_loss(lambda p: jax.grad(loss)(p)["used"].sum(), params)["used"] and not np.any(grad["unused"])

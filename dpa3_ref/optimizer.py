"""The optimizer: PyTorch's Adam/AdamW after global-norm clipping, as deepmd-kit steps them (spec §9.4).

With gradient g, learning rate η (the schedule's, per step), β1, β2, ε = 1e-8, weight decay λ and t the
1-based update count, one update of every trainable array p is

    g ← g · min(1, c / (‖g‖ + 1e-6))              ‖g‖ over all arrays together; only if c = gradient_max_norm > 0
    g ← g + λ p                                    "Adam" (L2 penalty folded into the gradient)
    p ← p (1 − η λ)                                "AdamW" (decoupled weight decay)
    m ← m + (1 − β1)(g − m)
    v ← β2 v + (1 − β2) g²
    p ← p − η / (1 − β1^t) · m / (√v / √(1 − β2^t) + ε)

which is `torch.optim.Adam`/`AdamW` (the single-tensor CPU path) after `torch.nn.utils.clip_grads_with_norm_`.
Both are optax transformations, so they chain and jit like any other; η enters as an argument of `update`
(`learning_rate=`), so the host-side schedule never causes a recompilation.

What is trained: every array of the model except the buffers deepmd-kit does not train — the environment
statistics (davg, dstd), the fitting's bias_atom_e and dataset one-hot case_embd, and the per-type energy
offsets out_bias (`trainable_filter`) — and except the arrays the loss never reads (`reaches_loss`): the
last RepFlow layer computes only node features, so its edge and angle weights (and the angle weights of
layers whose angle output no later layer reads) have no gradient at all. PyTorch skips such parameters
entirely (their `.grad` is None), weight decay included, so we leave them out of the optimizer too. Weight
decay therefore applies to every weight, bias, residual vector and the type embedding that the energy
depends on (spec §14b.8), and to nothing else.
"""

from __future__ import annotations

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from dpa3_ref.inputs import OptimizerConfig

EPSILON = 1e-8  # PyTorch's default eps
CLIP_EPSILON = 1e-6  # added to the norm by torch.nn.utils.clip_grads_with_norm_
BUFFER_FIELDS = ("davg", "dstd", "bias_atom_e", "case_embd", "out_bias")


def trainable_filter(model, unused: frozenset[str] = frozenset()) -> object:
    """A pytree of bools like `model`: True for trained arrays, False for buffers, non-arrays and the arrays
    named in `unused` (their paths, as jax.tree_util.keystr writes them)."""
    def is_trained(path, leaf) -> bool:
        names = {getattr(key, "name", None) for key in path}
        return (eqx.is_inexact_array(leaf) and not names & set(BUFFER_FIELDS)
                and jax.tree_util.keystr(path) not in unused)

    return jax.tree_util.tree_map_with_path(is_trained, model)


def reaches_loss(loss_fn, params, *args) -> object:
    """A pytree of bools like `params`: whether each array can influence `loss_fn(params, *args)`.

    Backward liveness over the traced program: an operation is live if one of its outputs is; its inputs
    then are. Nested programs (jit, custom derivatives, loops) count as one operation, which can only
    overestimate what is used: an array reported unused is certainly unused.
    """
    from jax.extend.core import Literal

    leaves, treedef = jax.tree.flatten(params)
    jaxpr = jax.make_jaxpr(lambda leaves: loss_fn(jax.tree.unflatten(treedef, leaves), *args))(leaves).jaxpr
    live = {v for v in jaxpr.outvars if not isinstance(v, Literal)}
    for equation in reversed(jaxpr.eqns):
        if equation.effects or any(v in live for v in equation.outvars):
            live.update(v for v in equation.invars if not isinstance(v, Literal))
    return jax.tree.unflatten(treedef, [v in live for v in jaxpr.invars])


def global_norm(tree) -> jax.Array:
    """‖g‖: the L2 norm of all arrays together, in float64."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float64))) for x in jax.tree.leaves(tree)))


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """g · min(1, c / (‖g‖ + 1e-6)), PyTorch's rule (optax's own clips by c / ‖g‖, without the 1e-6)."""

    def update(updates, state, params=None):
        del params
        factor = jnp.minimum(1.0, max_norm / (global_norm(updates) + CLIP_EPSILON))
        return jax.tree.map(lambda g: (g * factor).astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


class AdamState(NamedTuple):
    count: jax.Array  # [] int, t − 1
    mu: object  # m, like params
    nu: object  # v, like params


def torch_adam(beta1: float, beta2: float, weight_decay: float, decoupled: bool) -> optax.GradientTransformationExtraArgs:
    """PyTorch's Adam (decoupled=False) or AdamW (decoupled=True); `update(..., learning_rate=η)` returns Δp."""

    def init(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return AdamState(count=jnp.zeros((), jnp.int32), mu=zeros, nu=zeros)

    def update(grads, state, params, *, learning_rate, **extra):
        del extra
        t = state.count + 1
        if weight_decay and not decoupled:
            grads = jax.tree.map(lambda g, p: g + weight_decay * p, grads, params)
        mu = jax.tree.map(lambda m, g: m + (1 - beta1) * (g - m), state.mu, grads)
        nu = jax.tree.map(lambda v, g: beta2 * v + (1 - beta2) * g * g, state.nu, grads)
        step_size = learning_rate / (1 - beta1 ** t.astype(jnp.float64))
        root_correction = jnp.sqrt(1 - beta2 ** t.astype(jnp.float64))

        def delta(p, m, v):  # Δp, so that optax.apply_updates gives p + Δp
            step = -(step_size * m / (jnp.sqrt(v) / root_correction + EPSILON))
            if decoupled and weight_decay:
                step = step - learning_rate * weight_decay * p
            return step.astype(p.dtype)

        return jax.tree.map(delta, params, mu, nu), AdamState(count=t, mu=mu, nu=nu)

    return optax.GradientTransformationExtraArgs(init, update)


def make_optimizer(config: OptimizerConfig, gradient_max_norm: float) -> optax.GradientTransformationExtraArgs:
    """Clipping (if asked for), then Adam or AdamW, as the training input says."""
    adam = torch_adam(config.adam_beta1, config.adam_beta2, config.weight_decay, decoupled=config.type == "AdamW")
    if gradient_max_norm > 0:
        return optax.chain(clip_by_global_norm(gradient_max_norm), adam)
    return optax.chain(adam)

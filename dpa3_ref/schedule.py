"""The learning-rate schedule and the loss prefactors that follow it (spec §9.1, §9.3; docs/training.md §3).

deepmd-kit's "exp" schedule, with optional linear warm-up over the first w steps:

    lr(t) = lr_w + (lr_0 − lr_w) · t / w                       t < w       (lr_w = warmup_start_factor · lr_0)
    lr(t) = max(lr_0 · γ^⌊(t − w) / s⌋, lr_stop)                t ≥ w       (γ^((t − w)/s) with smooth = true)
    γ     = (max(lr_stop, 1e-10) / lr_0)^(s / (T − w))          unless decay_rate is given

with s = decay_steps and T = numb_steps. If s ≥ T − w (a short run) and no decay_rate is given, s is reset to
100, or to (T − w)//100 + 1 when (T − w)//10 ≤ 100, so that the rate still decays within the run.

PyTorch's LambdaLR, which the official trainer steps, multiplies the base rate back by the schedule's ratio, so
the rate an update actually uses is lr_0 · (lr(t) / lr_0); we compute it the same way (it differs from lr(t) in
the last bit, which is enough to separate two float64 trainings after a few hundred steps).

The prefactors of each loss term interpolate between their start and limit values with the rate:

    p(t) = p_limit + (p_start − p_limit) · lr(t) / lr_0
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from dpa3_ref.errors import Dpa3Error


@dataclasses.dataclass(frozen=True)
class ExpSchedule:
    """deepmd-kit's stepwise exponential decay, resolved for a run of `numb_steps` steps."""

    start_lr: float  # lr_0
    stop_lr: float  # the floor lr_stop
    decay_steps: int  # s, after the short-run rule
    decay_rate: float  # γ
    warmup_steps: int = 0  # w
    warmup_start_lr: float = 0.0  # lr_w
    smooth: bool = False

    def value(self, step: int) -> float:
        """lr(t) as deepmd-kit's schedule computes it (float64)."""
        if step < self.warmup_steps:
            return self.warmup_start_lr + (self.start_lr - self.warmup_start_lr) * (step / self.warmup_steps)
        t = step - self.warmup_steps
        exponent = t / self.decay_steps if self.smooth else float(t // self.decay_steps)
        # numpy's power, exp and log, as deepmd-kit's schedule uses: libm's may differ in the last bit
        return max(self.start_lr * float(np.power(np.float64(self.decay_rate), np.float64(exponent))), self.stop_lr)

    def __call__(self, step: int) -> float:
        """The rate the optimizer uses at update `step` (0-based): LambdaLR's lr_0 · (lr(t) / lr_0)."""
        return self.start_lr * (self.value(step) / self.start_lr)


def exp_schedule(
    start_lr: float,
    numb_steps: int,
    *,
    stop_lr: float | None = None,
    stop_lr_ratio: float | None = None,
    decay_steps: int = 5000,
    decay_rate: float | None = None,
    warmup_steps: int = 0,
    warmup_ratio: float | None = None,
    warmup_start_factor: float = 0.0,
    smooth: bool = False,
) -> ExpSchedule:
    """Resolve deepmd-kit's `learning_rate` options (type "exp") into an `ExpSchedule`."""
    if not (start_lr > 0 and math.isfinite(start_lr)):
        raise Dpa3Error(f"learning_rate.start_lr must be positive and finite, got {start_lr}")
    if (stop_lr is None) == (stop_lr_ratio is None):
        raise Dpa3Error("learning_rate needs exactly one of stop_lr and stop_lr_ratio")
    if decay_steps <= 0:
        raise Dpa3Error(f"learning_rate.decay_steps must be positive, got {decay_steps}")
    if warmup_ratio is not None:
        warmup_steps = int(warmup_ratio * numb_steps)
    if numb_steps > 0 and not 0 <= warmup_steps < numb_steps:
        raise Dpa3Error(f"learning_rate warm-up ({warmup_steps} steps) must be shorter than numb_steps ({numb_steps})")
    stop = start_lr * stop_lr_ratio if stop_lr_ratio is not None else stop_lr
    decay_total = numb_steps - warmup_steps
    if decay_rate is None and decay_steps >= decay_total:
        decay_steps = 100 if decay_total // 10 > 100 else decay_total // 100 + 1
    if decay_rate is None:
        decay_rate = 1.0 if decay_total == 0 else float(np.exp(np.log(max(stop, 1e-10) / start_lr) / (decay_total / decay_steps)))
    return ExpSchedule(
        start_lr=start_lr, stop_lr=stop, decay_steps=decay_steps, decay_rate=decay_rate,
        warmup_steps=warmup_steps, warmup_start_lr=warmup_start_factor * start_lr, smooth=smooth,
    )


def prefactor(start: float, limit: float, lr: float, start_lr: float) -> float:
    """p(t) = p_limit + (p_start − p_limit) · lr(t) / lr_0."""
    return limit + (start - limit) * (lr / start_lr)

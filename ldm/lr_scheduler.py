"""Learning-rate multipliers for ``torch.optim.lr_scheduler.LambdaLR`` (called once per optimizer step)."""
from __future__ import annotations

from typing import Sequence


class LambdaLinearScheduler:
    """Linear warm-up from ``f_start`` to ``f_max`` over ``warm_up_steps``, then linear from ``f_max`` to
    ``f_min`` until the end of the cycle; cycles repeat. With ``f_max == f_min`` this is the
    warm-up-then-constant schedule the SD fine-tuning recipes use. List-valued arguments (one entry per
    cycle) are accepted as in CompVis configs.
    """

    def __init__(self, warm_up_steps: int | Sequence[int], f_start: float | Sequence[float] = 1e-6,
                 f_max: float | Sequence[float] = 1.0, f_min: float | Sequence[float] = 1.0,
                 cycle_lengths: int | Sequence[int] = 10**13, verbosity_interval: int = 0):
        as_list = lambda v: list(v) if isinstance(v, (list, tuple)) else [v]
        self.warm_up_steps, self.f_start = as_list(warm_up_steps), as_list(f_start)
        self.f_max, self.f_min, self.cycle_lengths = as_list(f_max), as_list(f_min), as_list(cycle_lengths)
        lengths = {len(x) for x in (self.warm_up_steps, self.f_start, self.f_max, self.f_min, self.cycle_lengths)}
        if len(lengths) != 1:
            raise ValueError("LambdaLinearScheduler: warm_up_steps, f_start, f_max, f_min and cycle_lengths "
                             "must have one entry per cycle")
        self.cum_lengths = [sum(self.cycle_lengths[: i + 1]) for i in range(len(self.cycle_lengths))]

    def __call__(self, step: int) -> float:
        cycle = next((i for i, end in enumerate(self.cum_lengths) if step < end), len(self.cum_lengths) - 1)
        start = self.cum_lengths[cycle - 1] if cycle > 0 else 0
        n = step - start
        warm, length = self.warm_up_steps[cycle], self.cycle_lengths[cycle]
        if n < warm:
            return self.f_start[cycle] + (self.f_max[cycle] - self.f_start[cycle]) * n / warm
        frac = min(1.0, (n - warm) / max(1, length - warm))
        return self.f_max[cycle] + (self.f_min[cycle] - self.f_max[cycle]) * frac

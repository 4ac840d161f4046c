"""Learning-rate factors for `torch.optim.lr_scheduler.LambdaLR`, named as the original configs.

Each scheduler is a callable `schedule(step) -> factor` over cycles; each cycle warms up linearly
from `f_start` to `f_max` over `warm_up_steps`, then decays towards `f_min` until the cycle ends.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import math

logger = logging.getLogger(__name__)


class LambdaWarmUpCosineScheduler2:
    """Cyclic linear warm-up, then cosine decay from f_max to f_min within each cycle."""

    def __init__(
        self,
        warm_up_steps: list[int],
        f_min: list[float],
        f_max: list[float],
        f_start: list[float],
        cycle_lengths: list[int],
        verbosity_interval: int = 0,
    ):
        lengths = {len(warm_up_steps), len(f_min), len(f_max), len(f_start), len(cycle_lengths)}
        if len(lengths) != 1:
            raise ValueError(
                f"{type(self).__name__}: warm_up_steps, f_min, f_max, f_start and cycle_lengths "
                "must have one entry per cycle (same lengths)"
            )
        self.lr_warm_up_steps = list(warm_up_steps)
        self.f_min, self.f_max, self.f_start = list(f_min), list(f_max), list(f_start)
        self.cycle_lengths = list(cycle_lengths)
        self.cum_cycles = [0, *itertools.accumulate(self.cycle_lengths)]
        self.verbosity_interval = verbosity_interval

    def find_in_interval(self, n: int) -> int:
        """Index of the cycle that step `n` falls in (the last one past the end)."""
        return min(bisect.bisect_left(self.cum_cycles, n, lo=1) - 1, len(self.cycle_lengths) - 1)

    def decay(self, cycle: int, n: int) -> float:
        """Factor after warm-up, `n` steps into `cycle`: the cosine spans the steps after warm-up,
        so f_min comes at the cycle's end (the original's closed form)."""
        warm_up = self.lr_warm_up_steps[cycle]
        progress = min((n - warm_up) / (self.cycle_lengths[cycle] - warm_up), 1.0)
        cosine = 0.5 * (1 + math.cos(progress * math.pi))
        return self.f_min[cycle] + (self.f_max[cycle] - self.f_min[cycle]) * cosine

    def schedule(self, n: int, **kwargs) -> float:
        """The learning-rate factor at global step `n`."""
        cycle = self.find_in_interval(n)
        if self.verbosity_interval > 0 and n % self.verbosity_interval == 0:
            logger.info("lr schedule: step %d, cycle %d", n, cycle)
        n = n - self.cum_cycles[cycle]
        warm_up = self.lr_warm_up_steps[cycle]
        if n < warm_up:
            return self.f_start[cycle] + (self.f_max[cycle] - self.f_start[cycle]) * n / warm_up
        return self.decay(cycle, n)

    def __call__(self, n: int, **kwargs) -> float:
        return self.schedule(n, **kwargs)


class LambdaLinearScheduler(LambdaWarmUpCosineScheduler2):
    """Cyclic linear warm-up, then linear decay from f_max to f_min (SD's 10k-step warm-up)."""

    def decay(self, cycle: int, n: int) -> float:
        remaining = (self.cycle_lengths[cycle] - n) / self.cycle_lengths[cycle]
        return self.f_min[cycle] + (self.f_max[cycle] - self.f_min[cycle]) * remaining

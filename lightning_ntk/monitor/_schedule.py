"""When the tracker computes a report: log-spaced steps, every n steps, every n epochs.

The kernel moves fastest early in training and its drift, like the logit divergence of
hard-label training, is a function of ``log(step)``; the default schedule is therefore
log-spaced: steps ``⌈b^k⌉`` for ``k = 1, 2, 3, ...`` with ``b = log_base`` (default 4:
steps 4, 16, 64, 256, 1024, ...; ``log_base=2`` for 2, 4, 8, ...). A run of ``T`` steps
then costs ``⌊log_b(T)⌋`` kernel evaluations. The schedule starts at ``b`` rather than at
step 1: after one step the kernel has barely moved, and on short runs that report is
a sizeable share of the monitor's cost. ``every_n_steps`` and
``every_n_epochs`` add fixed intervals; a step is due when any of the active rules fires.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Schedule:
    """The steps (optimizer steps, counted from 1) and epochs at which a report is due.

    Args:
        every_n_steps: a report every ``n`` optimizer steps, or ``None``.
        every_n_epochs: a report at the end of every ``n``-th epoch, or ``None``.
        log_base: log-spaced steps ``⌈b^k⌉``, ``k ≥ 1`` (``b > 1``), or ``None`` to turn
            them off.
    """

    every_n_steps: Optional[int] = None
    every_n_epochs: Optional[int] = None
    log_base: Optional[float] = 4.0

    def __post_init__(self) -> None:
        for name in ("every_n_steps", "every_n_epochs"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ValueError(
                    f"Expected `{name}` to be a positive int or None but got {value!r}."
                )
        base = self.log_base
        if base is not None and (
            isinstance(base, bool) or not isinstance(base, (int, float)) or not base > 1
        ):
            raise ValueError(f"Expected `log_base` to be a number > 1 or None but got {base!r}.")
        if self.every_n_steps is None and self.every_n_epochs is None and base is None:
            raise ValueError(
                "The schedule never fires: set `every_n_steps`, `every_n_epochs` or `log_base`."
            )

    def step_due(self, step: int) -> bool:
        """Whether a report is due after optimizer step ``step`` (``step ≥ 1``)."""
        if step < 1:
            return False
        if self.every_n_steps is not None and step % self.every_n_steps == 0:
            return True
        return self.log_base is not None and _on_log_grid(step, self.log_base)

    def next_step(self, step: int) -> float:
        """The first step after ``step`` at which :meth:`step_due` fires (``inf``: none).

        No step strictly between ``step`` and the result is due, which lets a caller
        skip the check on the steps in between.
        """
        candidates = [math.inf]
        if self.every_n_steps is not None:
            n = self.every_n_steps
            candidates.append(n * (max(step, 0) // n + 1))
        if self.log_base is not None:
            candidates.append(_next_on_log_grid(max(step, 1), self.log_base))
        return min(candidates)

    def epoch_due(self, epoch: int) -> bool:
        """Whether a report is due at the end of epoch ``epoch`` (counted from 0)."""
        return self.every_n_epochs is not None and (epoch + 1) % self.every_n_epochs == 0


def trend_wait(schedule: Schedule, steps: list[int], first: int, planned: Optional[int]) -> str:
    """When the logit trend is read, in words, after reports at ``steps`` (oldest first).

    The trend needs two reports from step ``first`` on. When the run's last step
    ``planned`` is known and the schedule's next reports leave it short of two, the
    words say so and name an ``every_n_steps`` that reads it (epoch reports, whose steps
    are not known ahead, are counted as none).
    """
    words = f"it needs two reports from step {first}"
    if planned is None or not steps:
        return words
    readable = sum(s >= first for s in steps)
    step = steps[-1]
    while readable < 2:
        step = schedule.next_step(step)  # type: ignore[assignment]
        if step > planned:
            if schedule.every_n_epochs is not None:
                return words
            every = (planned - first) // 2
            if every < 5:
                return f"{words}, and this run ends at step {planned}, too soon for that"
            return (
                f"{words}, and this run ends at step {planned} before the second one; "
                f"every_n_steps={every} reads it"
            )
        readable += step >= first
    return words


def _on_log_grid(step: int, base: float) -> bool:
    """Whether ``step = ⌈base^k⌉`` for some ``k ≥ 1`` (checked near ``log_base(step)``)."""
    k = round(math.log(step) / math.log(base))
    return any(math.ceil(base**j - 1e-9) == step for j in (k - 1, k, k + 1) if j >= 1)


def _next_on_log_grid(step: int, base: float) -> int:
    """The smallest ``⌈base^k⌉ > step``, ``k ≥ 1`` (every ``k`` from below, none skipped)."""

    def grid(j: int) -> int:
        return math.ceil(base**j - 1e-9)

    j = max(1, int(math.log(step) / math.log(base)) - 1)
    while j > 1 and grid(j) > step:
        j -= 1
    while grid(j) <= step:
        j += 1
    return grid(j)

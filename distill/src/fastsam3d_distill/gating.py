"""Backward gating in the manner of SkipGS (arXiv 2603.08997).

The forward pass always runs and gives each sample's loss. A running per-sample baseline
(an exponential moving average keyed by the sample's id, i.e. the training crop) says what
that sample "usually" costs. When the micro-batch's losses sit at or below their baselines
the sample is already being learnt, so its backward pass and its optimiser contribution are
skipped. A warm-up decides nothing (it seeds the baselines and measures how often skipping
*would* happen, the natural rate ``r``), and a floor on the share of real backward passes
(``max(0.5, 1 - 0.5 r)`` by default, as in SkipGS) stops the gate from starving training.

Decisions are made per *global* micro-batch so that every DDP rank takes the same branch
(a rank that skips a backward while another runs it would deadlock the all-reduce) and a
run on N processes decides exactly as one process with the N-times larger batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


class BackwardGate:
    """Per-sample EMA baseline, warm-up, and a hard floor on the backward share.

    ``min_backward``: ``"auto"`` (SkipGS rule, fixed at the end of warm-up), a float in [0, 1],
    or 0 to disable the floor. The floor is enforced from the first decision after warm-up:
    a skip is vetoed whenever it would take the post-warm-up backward share below the floor,
    so the share never drops under it (SkipGS waits 100 decisions; we do not).
    """

    def __init__(
        self,
        warmup: int = 500,
        threshold: float = 0.0,
        decay: float = 0.95,
        min_backward: float | str = "auto",
        enabled: bool = True,
    ) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"gate decay must be in (0, 1), got {decay}")
        if isinstance(min_backward, str) and min_backward != "auto":
            raise ValueError(f"min_backward must be 'auto' or a float, got {min_backward!r}")
        if not isinstance(min_backward, str) and not 0.0 <= float(min_backward) <= 1.0:
            raise ValueError(f"min_backward must be in [0, 1], got {min_backward}")
        self.enabled = enabled
        self.warmup = int(warmup)
        self.threshold = float(threshold)
        self.decay = float(decay)
        self.min_backward_spec: float | str = min_backward
        self.ema: dict[int, float] = {}
        self.decisions = 0  # all decisions, warm-up included
        self.warmup_would_skip = 0
        self.warmup_eligible = 0  # warm-up decisions where every sample had a baseline
        self.post_decisions = 0  # decisions after warm-up
        self.post_backward = 0
        self.floor: float | None = None if min_backward == "auto" else float(min_backward)
        self.note = ""  # a configuration problem worth telling the user about

    # -- decisions -------------------------------------------------------------------------

    def _would_skip(self, ids: Sequence[int], losses: Sequence[float]) -> bool | None:
        """None when undecidable: an unseen sample or a bad loss (those always train)."""
        ratios = []
        # Sorted by id: the sum (and so the decision) does not depend on the rank order.
        for i, loss in sorted(zip(ids, losses)):
            base = self.ema.get(int(i))
            if base is None or not math.isfinite(loss):
                return None
            ratios.append(loss / max(base, 1e-12))
        if not ratios:
            return None
        return sum(ratios) / len(ratios) <= 1.0 + self.threshold

    def _update(self, ids: Sequence[int], losses: Sequence[float]) -> None:
        for i, loss in zip(ids, losses):
            if not math.isfinite(loss):
                continue
            base = self.ema.get(int(i))
            self.ema[int(i)] = loss if base is None else self.decay * base + (1 - self.decay) * loss

    def decide(self, ids: Sequence[int], losses: Sequence[float]) -> bool:
        """True when the backward pass must run for this (global) micro-batch."""
        would_skip = self._would_skip(ids, losses)
        self._update(ids, losses)
        self.decisions += 1
        if not self.enabled:
            return True
        if self.decisions <= self.warmup:
            if would_skip is not None:
                self.warmup_eligible += 1
                self.warmup_would_skip += int(would_skip)
            if self.decisions == self.warmup:
                self._fix_floor()
            return True
        if self.floor is None:
            self._fix_floor()
        run = not would_skip  # None (undecidable) trains
        if not run:
            share_if_skipped = self.post_backward / (self.post_decisions + 1)
            if share_if_skipped < (self.floor or 0.0):
                run = True  # veto: the skip would break the minimum backward share
        self.post_decisions += 1
        self.post_backward += int(run)
        return run

    def select(self, ids: Sequence[int], losses: Sequence[float]) -> list[bool]:
        """Per-sample form: which samples of the (global) micro-batch run their backward.

        A sample trains when its loss is above its baseline (``loss / baseline > 1 +
        threshold``), when it has no baseline yet, or when its loss is not finite. After
        warm-up at least ``ceil(floor * n)`` samples train per decision (the highest ratios
        fill the budget), so the backward share never drops under the floor. Counts are in
        samples: ``backward_share`` is the share of samples that ran a backward.
        """
        n = len(ids)
        ratios: list[float] = []
        for i, loss in zip(ids, losses):
            base = self.ema.get(int(i))
            if base is None or not math.isfinite(loss):
                ratios.append(math.inf)
            else:
                ratios.append(loss / max(base, 1e-12))
        self._update(ids, losses)
        self.decisions += 1
        if not self.enabled:
            return [True] * n
        if self.decisions <= self.warmup:
            seen = [r for r in ratios if math.isfinite(r)]
            self.warmup_eligible += len(seen)
            self.warmup_would_skip += sum(r <= 1.0 + self.threshold for r in seen)
            if self.decisions == self.warmup:
                self._fix_floor()
            return [True] * n
        if self.floor is None:
            self._fix_floor()
        keep = [r > 1.0 + self.threshold for r in ratios]
        # The budget counts this decision's samples, so the floor holds after every decision.
        need = math.ceil((self.floor or 0.0) * (self.post_decisions + n) - 1e-9)
        missing = need - self.post_backward - sum(keep)
        if missing > 0:
            # Order by ratio, highest first; ties by id so every rank picks the same samples.
            order = sorted(
                (j for j in range(n) if not keep[j]), key=lambda j: (-ratios[j], int(ids[j]))
            )
            for j in order[:missing]:
                keep[j] = True
        self.post_decisions += n
        self.post_backward += sum(keep)
        return keep

    def _fix_floor(self) -> None:
        if self.min_backward_spec == "auto" and self.warmup_eligible == 0:
            self.note = (
                "gate warm-up saw no sample twice, so the natural skip rate is unknown "
                "and the 'auto' floor is 1.0 (nothing is skipped): make --gate-warmup "
                "longer than one epoch or set --gate-min-backward"
            )
        if self.min_backward_spec == "auto":
            r = self.natural_skip_rate
            self.floor = max(0.5, 1.0 - 0.5 * r)
        else:
            self.floor = float(self.min_backward_spec)

    # -- reporting -------------------------------------------------------------------------

    @property
    def natural_skip_rate(self) -> float:
        """How often warm-up would have skipped, over decisions that had baselines."""
        n = self.warmup_eligible
        return self.warmup_would_skip / n if n else 0.0

    @property
    def backward_share(self) -> float:
        """Share of real backward passes since warm-up ended (1.0 before)."""
        return self.post_backward / self.post_decisions if self.post_decisions else 1.0

    @property
    def skip_rate(self) -> float:
        return 1.0 - self.backward_share

    def stats(self) -> dict[str, float]:
        return {
            "gate/skip_rate": self.skip_rate,
            "gate/backward_share": self.backward_share,
            "gate/natural_skip_rate": self.natural_skip_rate,
            "gate/floor": float(self.floor if self.floor is not None else float("nan")),
        }

    # -- resume ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "ema_ids": list(self.ema.keys()),
            "ema_values": list(self.ema.values()),
            "decisions": self.decisions,
            "warmup_would_skip": self.warmup_would_skip,
            "warmup_eligible": self.warmup_eligible,
            "post_decisions": self.post_decisions,
            "post_backward": self.post_backward,
            "floor": self.floor,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema = {int(i): float(v) for i, v in zip(state["ema_ids"], state["ema_values"])}
        self.decisions = int(state["decisions"])
        self.warmup_would_skip = int(state["warmup_would_skip"])
        self.warmup_eligible = int(state["warmup_eligible"])
        self.post_decisions = int(state["post_decisions"])
        self.post_backward = int(state["post_backward"])
        self.floor = state["floor"]

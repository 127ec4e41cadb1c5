"""Per-query statistics and AHRL hints.

AHRL (adaptive hint-based RL): a query the policy rarely solves gets the first p_hint fraction of
its reference solution appended to the prompt, so some rollouts reach the reward and the group has a
learning signal; the hint shrinks as training proceeds, faster for queries that were easier at
first:

    p_hint(x, t) = p_init * exp(-gamma * t * pass_init(x))
    t = iteration, pass_init = first pass rate

The same running accuracy feeds WPSM (objectives.wpsm_weights).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass


def hint_fraction(p_init: float, gamma: float, t: int, pass_init: float) -> float:
    return p_init * math.exp(-gamma * t * pass_init)


def hint_length(fraction: float, solution_len: int) -> int:
    """Hint tokens: the first floor(fraction * len) tokens, never the whole solution."""
    return min(int(math.floor(fraction * solution_len)), max(solution_len - 1, 0))


@dataclass
class QueryRecord:
    pass_init: float  # pass rate of the first group rolled out for this query
    correct: float = 0.0
    total: int = 0

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.total, 1)


class QueryStats:
    """Running accuracy per query key, shared by the trainer (writes) and hint decisions (reads)."""

    def __init__(self):
        self._records: dict[str, QueryRecord] = {}
        self._lock = threading.Lock()

    def update(self, key: str, rewards) -> None:
        rewards = [float(r) for r in rewards]
        with self._lock:
            rec = self._records.setdefault(key, QueryRecord(pass_init=sum(rewards) / len(rewards)))
            rec.correct += sum(rewards)
            rec.total += len(rewards)

    def get(self, key: str) -> QueryRecord | None:
        with self._lock:
            return self._records.get(key)

    def accuracy(self, key: str) -> float:
        rec = self.get(key)
        return 0.0 if rec is None else rec.accuracy

    def hint(self, key: str, t: int, p_init: float, gamma: float, below: float) -> float:
        """Hint fraction for a query at iteration t: 0 until it has been tried, or once it
        passes."""
        rec = self.get(key)
        if rec is None or rec.accuracy >= below:
            return 0.0
        return hint_fraction(p_init, gamma, t, rec.pass_init)

    def state_dict(self) -> dict:
        with self._lock:
            return {k: [r.pass_init, r.correct, r.total] for k, r in self._records.items()}

    def load_state_dict(self, state: dict) -> None:
        with self._lock:
            self._records = {
                k: QueryRecord(float(p), float(c), int(n)) for k, (p, c, n) in state.items()
            }

"""U-RB: the unbiased replay buffer.

Queries are assigned to iteration groups up front (`assign(g)` is a pure function of g). Rollouts
for the next `lookahead` groups run in the background while the trainer consumes the current one. A
group is released only when ALL its rollouts are done, i.e. when its longest rollout finishes, and
groups are released strictly in assignment order: short (often easy) rollouts that finish first
cannot overtake, so what the trainer sees does not depend on rollout lengths or timing.

    assign(0) assign(1) assign(2) ...   submit: one rollout job per query -> worker threads
       |         |         |            (completion order arbitrary)
    [g0: q q q] [g1: q q q] [g2: ...]   release g only when every slot of g is filled, in g order

Each submitted job gets the arguments captured at submission (`context(g)`, e.g. the weights
snapshot and hint decisions), so the content of a group is deterministic as well as its order.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


class UnbiasedReplayBuffer:
    def __init__(
        self,
        assign: Callable[[int], list],
        rollout: Callable[[int, int, Any, Any], Any],
        context: Callable[[int], Any] = lambda g: None,
        lookahead: int = 1,
        workers: int = 1,
    ):
        """assign(g) -> queries of group g; rollout(g, j, query, ctx) -> result for slot j;
        context(g) is evaluated when group g is submitted (in the caller's thread)."""
        self.assign, self.rollout, self.context = assign, rollout, context
        self.lookahead, self.workers = lookahead, workers
        self._pool = (
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="urb") if workers else None
        )
        self._pending: dict[int, list[Future]] = {}
        self._next = 0  # next group to release
        self._submitted = 0  # groups submitted so far
        self._lock = threading.Lock()
        self.completion_log: list[tuple[int, int]] = []  # (group, slot) in completion order

    def _run(self, g: int, j: int, query, ctx):
        result = self.rollout(g, j, query, ctx)
        with self._lock:
            self.completion_log.append((g, j))
        return result

    def _submit(self, g: int) -> None:
        queries, ctx = self.assign(g), self.context(g)
        if self._pool is None:
            self._pending[g] = [_done(self._run(g, j, q, ctx)) for j, q in enumerate(queries)]
        else:
            self._pending[g] = [
                self._pool.submit(self._run, g, j, q, ctx) for j, q in enumerate(queries)
            ]
        self._submitted = g + 1

    def next_group(self) -> tuple[int, list]:
        """(g, results in assignment order) for the next group; blocks until its last rollout is
        done, then tops the background work up to `lookahead` groups beyond it."""
        g = self._next
        if self._submitted <= g:
            self._submit(g)
        results = [f.result() for f in self._pending.pop(g)]  # waits for the longest rollout
        self._next = g + 1
        while self._submitted <= g + self.lookahead:
            self._submit(self._submitted)
        return g, results

    def start(self, first_group: int = 0) -> None:
        """Begin at `first_group` (resume) and launch its rollouts and the look-ahead ones."""
        self._next = self._submitted = first_group
        while self._submitted <= first_group + self.lookahead:
            self._submit(self._submitted)

    def close(self) -> None:
        if self._pool is not None:
            for futures in self._pending.values():
                for f in futures:
                    f.cancel()
            self._pool.shutdown(wait=True)
            self._pool = None


def _done(value) -> Future:
    f: Future = Future()
    f.set_result(value)
    return f

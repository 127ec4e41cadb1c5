"""The `parallel` section: degrees and layout of data, sharding, expert, pipeline and model
parallelism."""

from __future__ import annotations

from dataclasses import dataclass

from ._check import _check


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    dp: int = 1
    sharding: int = 1
    sharding_stage: int = 1
    ep: int = 1
    pp: int = 1
    mp: int = 1
    # Rank layout, slowest axis first. Expert-parallel ranks split Fleet's data axis, so ep comes
    # directly after dp (parallel/topology.py).
    order: tuple[str, ...] = ("dp", "ep", "pp", "sharding", "mp")
    # auto: all-to-all on a GPU build (NCCL), all-gather otherwise (works on gloo).
    dispatcher: str = "auto"  # auto | local | allgather | alltoall
    # Pipeline (pp > 1, parallel/pipeline.py): Fleet's schedule over the stages planned by
    # parallel/stages.py. `ernie5 train` runs 1F1B (FThenB and VPP are sized by `ernie5 plan`).
    pp_schedule: str = "1F1B"  # 1F1B | FThenB | VPP
    pp_chunks: int = 1  # virtual stages per rank (VPP); 1 otherwise
    # Micro-batches one pipeline pass splits each rank's rows into (a divisor of train.batch_size
    # / (dp * ep * sharding)); more of them shrink the bubble, (pp - 1) / (micro_batches + pp - 1).
    # Each of train.grad_accum micro-steps is one pass. Read only when pp > 1.
    micro_batches: int = 1

    def validate(self, at: str) -> None:
        for name in ("dp", "sharding", "ep", "pp", "mp", "micro_batches"):
            _check(at, name, getattr(self, name), getattr(self, name) >= 1, ">= 1")
        _check(
            at, "sharding_stage", self.sharding_stage, self.sharding_stage in (1, 2, 3), "1, 2 or 3"
        )
        _check(
            at,
            "order",
            self.order,
            sorted(self.order) == sorted(("dp", "pp", "sharding", "ep", "mp"))
            and self.order.index("ep") == self.order.index("dp") + 1,
            "a permutation of dp, pp, sharding, ep, mp with ep directly after dp",
        )
        _check(
            at,
            "dispatcher",
            self.dispatcher,
            self.dispatcher in ("auto", "local", "allgather", "alltoall"),
            "one of auto, local, allgather, alltoall",
        )
        _check(
            at,
            "pp_schedule",
            self.pp_schedule,
            self.pp_schedule in ("1F1B", "FThenB", "VPP"),
            "one of 1F1B, FThenB, VPP",
        )
        _check(
            at,
            "pp_chunks",
            self.pp_chunks,
            self.pp_chunks >= 1 and (self.pp_chunks == 1 or self.pp_schedule == "VPP"),
            ">= 1, and > 1 only with pp_schedule=VPP",
        )

"""The `rl` section: RL post-training, also read by the supervised stage (component sft)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ._check import _check


@dataclass(frozen=True, kw_only=True)
class FamilyLevels:
    """Which difficulty levels of one family are drawn (rl/problems.py lists them) and the family's
    share of the training queries."""

    # () = the family's default levels: 0 (the corpus' mix) for arithmetic and counting, every level
    # of sorting, reversal and largest, 0 for a family without levels (image_qa)
    levels: tuple[int, ...] = ()
    # Sampling weight of the family among rl.families (normalised over them); the family's levels
    # share it equally unless level_weights is set.
    weight: float = 1.0
    # How the family's weight is shared by its levels: one number >= 0 per entry of `levels`, in
    # the same order, normalised over the family ([] = equal shares). A level of weight 0 is never
    # drawn for training but keeps its held-out prompts, so it is still measured before and after
    # (e.g. a level whose training pool is small enough to be memorised). Every level of weight 0
    # makes the family measurement-only. A recipe or override that sets `levels` without
    # `level_weights` resets inherited level weights to [] (they were written for other levels).
    level_weights: tuple[float, ...] = field(default=(), metadata={"reset_by": "levels"})

    def validate(self, at: str) -> None:
        _check(
            at,
            "levels",
            self.levels,
            len(set(self.levels)) == len(self.levels) and all(lv >= 0 for lv in self.levels),
            "a list of distinct levels >= 0 ([] = the family's default levels)",
        )
        _check(at, "weight", self.weight, self.weight >= 0, ">= 0")
        if self.level_weights:
            _check(
                at,
                "level_weights",
                self.level_weights,
                len(self.level_weights) == len(self.levels)
                and all(w >= 0 for w in self.level_weights),
                f"one weight >= 0 per entry of levels={list(self.levels)} ([] = equal shares)",
            )

    def level_weight(self, level: int, n_levels: int) -> float:
        """The part of the family's weight that `level` (one of its `n_levels` levels) gets."""
        if not self.level_weights:
            return self.weight / n_levels
        total = sum(self.level_weights)
        return self.weight * self.level_weights[self.levels.index(level)] / total if total else 0.0


@dataclass(frozen=True, kw_only=True)
class CurriculumConfig:
    """Levels and mixture weight per built-in family (rl/problems.py); only the families named in
    rl.families are used. A family without a field here (image_qa, a family registered by a
    plugin) has its default levels and weight 1. Level 0 of arithmetic and counting is the
    pretraining corpus' own mix of questions; levels 1.. are the curriculum (e.g. arithmetic 1 =
    one-digit a + b, 3 = a + b - c, 5 = two-digit a + b, 7-9 = two-digit a + b, three-digit a + b,
    two-digit a - b answered units digit first; counting 1-4 = lists of 3L-2..3L items, 5-7 =
    how many colours among 3-5, 6-8, 9-11 distinct words, answered with a running count; sorting
    and reversal L = lists of L + 1 items; largest 1 = of 3 one-digit numbers, 2-4 = of 2, 3, 5
    two-digit numbers). A running-count level needs rl.max_new_tokens to hold its longest
    reference response (checked when the run starts)."""

    arithmetic: FamilyLevels = field(default_factory=FamilyLevels)
    counting: FamilyLevels = field(default_factory=FamilyLevels)
    sorting: FamilyLevels = field(default_factory=FamilyLevels)
    reversal: FamilyLevels = field(default_factory=FamilyLevels)
    largest: FamilyLevels = field(default_factory=FamilyLevels)

    def of(self, family: str) -> FamilyLevels:
        return getattr(self, family, None) or FamilyLevels()

    def validate(self, at: str) -> None:
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate(f"{at}.{f.name}")


@dataclass(frozen=True, kw_only=True)
class RLConfig:
    """RL post-training on verifiable problem families (rl/): GSPO + token-level IcePop (MISC),
    WPSM, AHRL hints, unbiased replay buffer (U-RB) and rollout router replay. ERNIE5.md names the
    techniques but not their constants; where a value is not disclosed the default is our choice
    and says so.

    `component: sft` reads the family list and problem pools from this section too (the supervised
    stage)."""

    # verifier family names (rl/verifiers.py, rl/image_qa.py)
    families: tuple[str, ...] = ("arithmetic", "counting")
    # levels and mixture weight of each family (rl.curriculum.<family>.levels / .weight)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    # problems drawn per (family, level) before duplicates and the held-out split are removed
    train_problems: int = 4000
    eval_problems: int = 64  # held-out prompts per (family, level) for before/after measurements
    # Held-out measurement: eval_samples sampled responses per prompt at rl.temperature (sampled
    # reward, pass@pass_k by the unbiased estimator) and one greedy decode (pass@1).
    eval_samples: int = 8
    pass_k: int = 8
    # RL sharpens what sampling already finds: a trained task whose held-out pass@k before the first
    # step is below this gives groups with one reward for all responses (no signal), and the run
    # warns, naming the task. 0 = never warn.
    min_start_pass_k: float = 0.2
    # Share of question texts (by hash) never used for training; image_qa uses the image split
    # instead.
    heldout_fraction: float = 0.2
    prompts_per_step: int = 8  # queries per iteration group (U-RB assigns queries to groups)
    group_size: int = 8  # responses per query; GRPO normalises rewards inside the group
    max_new_tokens: int = 8
    temperature: float = 1.0
    num_minibatches: int = 2  # gradient updates per group; the first is on-policy
    # GSPO: sequence ratio s = exp(mean_t log(pi/pi_old)) clipped to [1 - clip_low, 1 + clip_high]
    # (the GSPO paper's values; ERNIE 5.0 does not disclose its own).
    clip_low: float = 3e-4
    clip_high: float = 4e-4
    # IcePop (MISC): tokens whose train/rollout probability ratio is outside [low, high] are masked.
    # Not disclosed; these are IcePop's published bounds.
    icepop_low: float = 0.5
    icepop_high: float = 5.0
    # WPSM: a response to a query with running accuracy > tau and mean token entropy < eta has its
    # loss scaled by (1 - alpha). Not disclosed (our choice).
    wpsm_tau: float = 0.8
    wpsm_eta: float = 0.3
    wpsm_alpha: float = 0.5
    # k3 KL to the initial (reference) policy; 0 = off, no reference model kept
    kl_coef: float = 0.0
    # AHRL: a query whose running pass rate is below hint_below gets the first p_hint of its
    # reference solution, p_hint = p_init * exp(-gamma * t * pass_init(x)), t = iteration. Not
    # disclosed.
    hints: bool = True
    hint_p_init: float = 0.5
    hint_gamma: float = 0.02
    hint_below: float = 0.2
    # U-RB: rollouts for up to `lookahead` future groups run in the background on `rollout_workers`
    # threads with the weights of the step that started them; 0 workers = in the training thread.
    lookahead: int = 1
    rollout_workers: int = 1
    router_replay: bool = True  # the training forward reuses the experts chosen during rollout
    eval_every: int = 0  # held-out reward every N steps; 0 = only before and after
    # Controlled off-policy rollouts (for measuring what router replay and IcePop do; all off by
    # default). rollout_staleness: rollouts use the weights of N optimizer steps before the step
    # that submits them (on top of U-RB's look-ahead). rollout_router_noise: every rollout router's
    # selection bias gets Gaussian noise of this std (in router-score units: softmax probabilities
    # or sigmoid scores), drawn once per policy version: it changes which experts the rollout
    # picks, never the combine weights. rollout_top_k: experts per token at rollout (an elastic
    # sub-model's top-k); 0 = model.moe.top_k.
    rollout_staleness: int = 0
    rollout_router_noise: float = 0.0
    rollout_top_k: int = 0
    # Retention (our choice; the paper does not say how ERNIE 5.0 keeps skills RL does not train):
    # every update adds retain_coef x the cross-entropy of retain_batch reference solutions drawn
    # from the training pools of retain_tasks (task names as in the RL report, e.g. counting/L7;
    # a task may have curriculum weight 0). It keeps a skill the policy already has from drifting
    # while RL trains others: such a task's sampled groups are all right, so GRPO gives it no
    # gradient. 0 = off.
    retain_tasks: tuple[str, ...] = ()
    retain_coef: float = 0.0
    retain_batch: int = 8

    def validate(self, at: str) -> None:
        _check(
            at,
            "families",
            self.families,
            len(self.families) > 0 and len(set(self.families)) == len(self.families),
            "a non-empty list of distinct family names (rl/verifiers.py), e.g. [arithmetic, "
            "counting]",
        )
        for name in (
            "train_problems",
            "eval_problems",
            "prompts_per_step",
            "max_new_tokens",
            "num_minibatches",
            "eval_samples",
            "pass_k",
        ):
            _check(at, name, getattr(self, name), getattr(self, name) >= 1, ">= 1")
        _check(
            at,
            "group_size",
            self.group_size,
            self.group_size >= 2,
            ">= 2 (GRPO compares responses within a group)",
        )
        _check(
            at,
            "num_minibatches",
            self.num_minibatches,
            self.prompts_per_step % self.num_minibatches == 0,
            f"a divisor of prompts_per_step={self.prompts_per_step} (minibatches hold whole "
            "groups)",
        )
        _check(
            at,
            "heldout_fraction",
            self.heldout_fraction,
            0 < self.heldout_fraction < 1,
            "0 < f < 1",
        )
        _check(at, "temperature", self.temperature, self.temperature > 0, "> 0 (rollouts sample)")
        _check(at, "clip_low", self.clip_low, 0 <= self.clip_low < 1, "0 <= eps < 1")
        _check(at, "clip_high", self.clip_high, self.clip_high >= 0, ">= 0")
        _check(at, "icepop_low", self.icepop_low, 0 <= self.icepop_low <= 1, "0..1")
        _check(at, "icepop_high", self.icepop_high, self.icepop_high >= 1, ">= 1")
        for name in ("wpsm_tau", "wpsm_alpha", "hint_p_init", "hint_below", "min_start_pass_k"):
            _check(at, name, getattr(self, name), 0 <= getattr(self, name) <= 1, "0..1")
        for name in (
            "wpsm_eta",
            "kl_coef",
            "hint_gamma",
            "lookahead",
            "rollout_workers",
            "eval_every",
            "rollout_staleness",
            "rollout_router_noise",
            "rollout_top_k",
            "retain_coef",
        ):
            _check(at, name, getattr(self, name), getattr(self, name) >= 0, ">= 0")
        _check(at, "retain_batch", self.retain_batch, self.retain_batch >= 1, ">= 1")
        _check(
            at,
            "retain_tasks",
            self.retain_tasks,
            bool(self.retain_tasks) or self.retain_coef == 0,
            f"a non-empty list of tasks (e.g. [counting/L7]) when retain_coef={self.retain_coef} "
            "> 0",
        )
        _check(
            at,
            "pass_k",
            self.pass_k,
            self.pass_k <= self.eval_samples,
            f"<= rl.eval_samples={self.eval_samples} (pass@k needs k samples per prompt)",
        )
        self.curriculum.validate(f"{at}.curriculum")

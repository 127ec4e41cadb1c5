"""RL post-training loop (`ernie5 train` with `component: rl`).

One iteration = one U-RB group of `prompts_per_step` queries x `group_size` responses:

    U-RB.next_group()  (rolled out in the background with the weights of an earlier step)
      -> rewards (verifiers) -> query stats (running accuracy, AHRL pass_init)
      -> old forward (no grad, router replay): old log-probs, entropy
      -> IcePop token mask, GRPO advantages, WPSM weights
      -> num_minibatches x [forward (router replay) -> GSPO loss (+ KL) (+ retention) -> backward
                            -> AdamW step]

Retention (rl.retain_*): each minibatch's loss also carries the cross-entropy of a few reference
solutions of tasks the policy already solves (rl/supervised.py), whose all-right groups give GRPO
no gradient; it holds them against drift while RL trains the others.

Queries come from the curriculum (rl/curriculum.py: tasks = families x levels, mixed by
rl.curriculum weights). Held-out pass@1 (greedy), pass@k and sampled reward per task are measured
before the first and after the last step (and every `rl.eval_every` steps). Every step logs the
training-inference mismatch (rl/diagnostics.py: |log p_train - log p_rollout|, IcePop's masked
share, tokens routed unlike the rollout with the experts used and with the router's own choice),
entropy, response length and reward per task to metrics.jsonl and VisualDL;
<run_dir>/rl_summary.json holds the held-out tables, those metrics summarised over the run and
how many held-out greedy answers RL changed (right -> wrong, wrong -> right, any change). Every
step also logs rollout and update throughput apart (perf/rollout_tokens_per_s,
perf/update_tokens_per_s).

Controlled off-policy rollouts (rl.rollout_staleness, rl.rollout_router_noise, rl.rollout_top_k)
make the rollout policy differ from the trained one on purpose, for measuring what router replay
and IcePop do. The aux-loss-free router bias is not updated during RL: balancing is a pretraining
concern, and a bias that moves between rollout and training would be one more source of routing
mismatch.
"""

from __future__ import annotations

import json
import math
import os
import time

import numpy as np
import paddle

from .. import config as C
from ..config.train import resume_settings
from ..data.text import get_text_tokenizer
from ..io import checkpoint
from ..model.model import Ernie5Model
from ..model.view import FULL_VIEW, ElasticView
from ..optim.optimizer import (
    build_optimizer,
    clip_by_global_norm,
    load_optimizer_state,
    optimizer_state,
)
from ..optim.schedules import learning_rate
from ..train.logging import RunLogger, flatten
from .curriculum import build_curriculum, check_response_budget
from .diagnostics import (
    logp_gap,
    masked_fraction,
    response_stats,
    routing_mismatch,
    summarise_steps,
)
from .evaluate import evaluate, greedy_changes, weak_starts
from .hints import QueryStats
from .objectives import grpo_advantages, gspo_loss, gspo_ratio, icepop_mask, k3_kl, wpsm_weights
from .replay import UnbiasedReplayBuffer
from .rollout import (
    PolicySnapshot,
    RolloutModels,
    build_batch,
    forward_logp,
    perturb_router_bias,
    rollout_group,
    select,
    snapshot,
)
from .supervised import solution_loss


def load_policy(cfg: C.Config, log=print) -> Ernie5Model:
    model = Ernie5Model(cfg.model)
    if cfg.train.init_from:
        checkpoint.init_weights(model, cfg.train.init_from, warn=log, settings=resume_settings(cfg))
        log(f"initialised policy from {cfg.train.init_from}")
    return model


class RLTrainer:
    def __init__(self, cfg: C.Config, log=print):
        self.cfg, self.log = cfg, log
        tc, rc = cfg.train, cfg.rl
        paddle.seed(tc.seed)
        self.run_dir = tc.run_dir
        self.ckpt_root = os.path.join(self.run_dir, "checkpoints")
        self.tokenizer = get_text_tokenizer(
            cfg.data.cache_dir, cfg.model.vocab_size, cfg.data.split_seed, cfg.data.val_fraction
        )
        self.model = load_policy(cfg, log)
        self.ref = None
        if rc.kl_coef > 0:
            self.ref = Ernie5Model(cfg.model)
            self.ref.set_state_dict(self.model.state_dict())
            self.ref.eval()
        self.optimizer = build_optimizer(self.model, tc)
        self.curriculum = build_curriculum(cfg)
        check_response_budget(self.curriculum, self.tokenizer, rc.max_new_tokens)
        self.retain_pools = retain_pools(self.curriculum, rc)
        self.stats = QueryStats()
        self.rollout_models = RolloutModels(cfg.model)
        self.rollout_view = ElasticView(top_k=rc.rollout_top_k) if rc.rollout_top_k else FULL_VIEW
        self.step = 0
        self._snaps: dict[int, PolicySnapshot] = {}  # version -> rollout weights
        self.buffer = UnbiasedReplayBuffer(
            self.assign, self._rollout, self._context, rc.lookahead, rc.rollout_workers
        )

    # ------------------------------------------------------------------ U-RB plumbing
    def assign(self, g: int) -> list:
        """Queries of iteration group g: curriculum draws number g * prompts_per_step onwards."""
        p = self.cfg.rl.prompts_per_step
        return [self.curriculum.draw(self.cfg.train.seed, i) for i in range(g * p, (g + 1) * p)]

    def rollout_policy(self) -> PolicySnapshot:
        """The weights a group submitted now is rolled out with: those of rl.rollout_staleness
        steps ago (the oldest kept while fewer steps have run since the start or a resume), with
        the router bias perturbed when rl.rollout_router_noise is set."""
        rc = self.cfg.rl
        if self.step not in self._snaps:
            snap = snapshot(self.model, self.step)
            if rc.rollout_router_noise > 0:
                snap = perturb_router_bias(snap, rc.rollout_router_noise, self.cfg.train.seed)
            self._snaps[self.step] = snap
        for version in [v for v in self._snaps if v < self.step - rc.rollout_staleness]:
            del self._snaps[version]
        return self._snaps[min(self._snaps)]

    def _context(self, g: int) -> dict:
        """Captured when group g is submitted: the rollout weights and each query's hint."""
        rc = self.cfg.rl
        hints = {}
        if rc.hints:
            for q in self.assign(g):
                hints[q.key] = self.stats.hint(
                    q.key, self.step, rc.hint_p_init, rc.hint_gamma, rc.hint_below
                )
        return {"snapshot": self.rollout_policy(), "hints": hints}

    def _rollout(self, g: int, j: int, problem, ctx):
        rc = self.cfg.rl
        model = self.rollout_models.get(ctx["snapshot"])
        seed = (self.cfg.train.seed * 1_000_003 + g * 1009 + j) % (2**31)
        return rollout_group(
            model,
            self.tokenizer,
            problem,
            rc.group_size,
            rc.max_new_tokens,
            rc.temperature,
            seed,
            ctx["hints"].get(problem.key, 0.0),
            ctx["snapshot"].version,
            record_routing=True,
            view=self.rollout_view,
        )

    # ------------------------------------------------------------------ one iteration
    def train_step(self) -> dict[str, float]:
        cfg, rc, tc = self.cfg, self.cfg.rl, self.cfg.train
        t0 = time.perf_counter()
        g, rollouts = self.buffer.next_group()
        t_update = time.perf_counter()
        wait_s = t_update - t0
        for r in rollouts:
            self.stats.update(r.problem.key, r.rewards)
        batch = build_batch(rollouts, self.tokenizer.pad_id)
        valid = batch.valid_BN

        self.model.eval()
        with paddle.no_grad():
            old_logp_t, ent_t, out = forward_logp(
                self.model, batch, rc.temperature, rc.router_replay
            )
            old_logp, ent = old_logp_t.numpy(), ent_t.numpy()
            ref_logp = (
                forward_logp(self.ref, batch, rc.temperature, rc.router_replay)[0]
                if self.ref is not None
                else None
            )
            routing = routing_mismatch(self.model, out, batch)
        mask = icepop_mask(old_logp, batch.rollout_logp_BN, valid, rc.icepop_low, rc.icepop_high)
        rewards_QG = np.stack([r.rewards for r in rollouts])
        adv = grpo_advantages(rewards_QG).reshape(-1)
        tokens_B = np.maximum(valid.sum(1), 1)
        resp_entropy = (ent * valid).sum(1) / tokens_B
        acc = np.array([self.stats.accuracy(rollouts[q].problem.key) for q in batch.query_B])
        weight = wpsm_weights(acc, resp_entropy, rc.wpsm_tau, rc.wpsm_eta, rc.wpsm_alpha)
        used = mask.any(axis=1)

        lr = learning_rate(self.step, cfg.train)
        self.optimizer.set_lr(lr)
        self.model.train()
        clip_lo, clip_hi, kl_vals, retain_vals, norms, losses = [], [], [], [], [], []
        for k, chunk in enumerate(np.array_split(np.arange(len(rollouts)), rc.num_minibatches)):
            rows = np.flatnonzero(np.isin(batch.query_B, chunk))
            mb = select(batch, rows)
            new_logp, _, _ = forward_logp(self.model, mb, rc.temperature, rc.router_replay)
            mask_t = paddle.to_tensor(mask[rows])
            ratio = gspo_ratio(new_logp, paddle.to_tensor(old_logp[rows]), mask_t)
            obj = gspo_loss(ratio, adv[rows], weight[rows], used[rows], rc.clip_low, rc.clip_high)
            loss = obj.loss
            if self.retain_pools:
                problems = draw_retained(self.retain_pools, rc.retain_batch, tc.seed, self.step, k)
                ce = solution_loss(self.model, cfg.model, self.tokenizer, problems)
                loss = loss + rc.retain_coef * ce
                retain_vals.append(float(ce))
            if ref_logp is not None:
                kl = k3_kl(new_logp, paddle.gather(ref_logp, paddle.to_tensor(rows)), mask_t)
                loss = loss + rc.kl_coef * kl
                kl_vals.append(float(kl))
            loss.backward()
            norms.append(
                clip_by_global_norm(self.model.parameters(), cfg.train.clip_norm, self.optimizer)
            )
            self.optimizer.step()
            self.optimizer.clear_grad(set_to_zero=False)
            clip_lo.append(obj.clip_low_frac)
            clip_hi.append(obj.clip_high_frac)
            losses.append(float(loss))
        self.step += 1
        update_s = time.perf_counter() - t_update
        response_tokens = int(valid.sum())
        rollout_s = float(sum(r.seconds for r in rollouts))

        metrics = {
            "loss": float(np.mean(losses)),
            "train/lr": lr,
            "train/grad_norm": float(np.mean(norms)),
            "reward/mean": float(np.mean([r.rewards.mean() for r in rollouts])),
            **response_stats(ent, valid),
            "clip/low_frac": float(np.mean(clip_lo)),
            "clip/high_frac": float(np.mean(clip_hi)),
            "icepop/masked_frac": masked_fraction(mask, valid),
            **logp_gap(old_logp, batch.rollout_logp_BN, valid),
            **routing,
            "wpsm/damped_frac": float(np.mean(weight < 1)),
            # groups whose responses all score alike: advantage 0, no learning signal
            "grpo/flat_group_frac": float(np.mean(rewards_QG.std(axis=1) == 0)),
            "hint/query_frac": float(np.mean([r.prompt.hint_len > 0 for r in rollouts])),
            "urb/staleness": float(self.step - 1 - np.mean([r.version for r in rollouts])),
            "urb/wait_s": wait_s,
            # Throughput: rollouts (background worker, sampling + scoring) and the update (old
            # forward + every minibatch's forward, backward and optimizer step), both in response
            # tokens; the update's rows also hold their prompts (update_seq_tokens_per_s).
            "perf/rollout_s": rollout_s,
            "perf/update_s": update_s,
            "perf/rollout_tokens_per_s": response_tokens / max(rollout_s, 1e-9),
            "perf/update_tokens_per_s": response_tokens / max(update_s, 1e-9),
            "perf/update_seq_tokens_per_s": float(
                (batch.start_B - 1 + valid.sum(1)).sum() / max(update_s, 1e-9)
            ),
        }
        if kl_vals:
            metrics["kl/ref"] = float(np.mean(kl_vals))
        if retain_vals:
            metrics["retain/loss"] = float(np.mean(retain_vals))
        for task in self.curriculum.tasks:
            rs = [r.rewards.mean() for r in rollouts if r.problem.task == task]
            if rs:
                metrics[f"reward/{task}"] = float(np.mean(rs))
        return metrics

    # ------------------------------------------------------------------ loop
    def heldout(self, greedy_out: dict | None = None) -> dict[str, dict[str, float]]:
        rc = self.cfg.rl
        return evaluate(
            self.model,
            self.tokenizer,
            self.curriculum.heldout_problems(),
            rc.eval_samples,
            rc.max_new_tokens,
            rc.temperature,
            seed=self.cfg.train.seed + 99,
            pass_k=rc.pass_k,
            greedy_out=greedy_out,
        )

    def save(self) -> str:
        model_state = {k: v.numpy() for k, v in self.model.state_dict().items()}
        meta = {
            "config": resume_settings(self.cfg),  # compared on resume (train.on_config_change)
            "query_stats": self.stats.state_dict(),
        }
        return checkpoint.save(
            self.ckpt_root,
            self.step,
            model_state,
            optimizer_state(self.model, self.optimizer),
            meta,
            self.cfg.train.keep_last,
        )

    def try_resume(self) -> bool:
        tc = self.cfg.train
        found = checkpoint.resumable(
            self.ckpt_root,
            tc.resume,
            resume_settings(self.cfg),
            on_change=tc.on_config_change,
            shapes={k: tuple(v.shape) for k, v in self.model.state_dict().items()},
            validate=_check_meta,
            warn=self.log,
        )
        if found is None:
            return False
        path, model_state, optim_state, meta = found
        self.model.set_state_dict({k: paddle.to_tensor(v) for k, v in model_state.items()})
        load_optimizer_state(self.model, self.optimizer, optim_state)
        self.stats.load_state_dict(meta["query_stats"])
        self.step = int(meta["step"])
        self.log(f"resumed from {path} at step {self.step}")
        return True

    def fit(self) -> dict:
        """Train to train.max_steps holding the run directory's lock (io/checkpoint.RunLock)."""
        with checkpoint.RunLock(self.run_dir, warn=self.log):
            return self._fit()

    def _fit(self) -> dict:
        cfg, tc, rc = self.cfg, self.cfg.train, self.cfg.rl
        resumed = self.try_resume()
        summary_path = os.path.join(self.run_dir, "rl_summary.json")
        summary = _read_summary(summary_path) if resumed else {}
        # Only now that the run goes on: a refused resume leaves the directory as it was.
        C.save_config(cfg, os.path.join(self.run_dir, "config.yaml"))
        logger = RunLogger(self.run_dir, tc.visualdl)
        answers_before: dict = {}  # greedy answer per held-out prompt (not kept over a resume)
        if not resumed:
            logger.hparams(flatten(cfg.to_dict()), ["reward/mean"])
            summary["before"] = self.heldout(answers_before)
            self._log_heldout(logger, summary["before"])
            trained = [t for t, w in zip(self.curriculum.tasks, self.curriculum.weights) if w > 0]
            for line in weak_starts(summary["before"], trained, rc.pass_k, rc.min_start_pass_k):
                self.log(f"warning: {line}")
            # kept now, so a run stopped before its end still has its "before" table on resume
            _write_summary(summary_path, summary)
        history = []
        self.buffer.start(self.step)
        bar = _progress(self.step, tc.max_steps, tc.progress)
        try:
            while self.step < tc.max_steps:
                t0 = time.perf_counter()
                metrics = self.train_step()
                metrics["perf/step_s"] = time.perf_counter() - t0
                if not math.isfinite(metrics["loss"]):
                    raise FloatingPointError(f"RL loss is {metrics['loss']} at step {self.step}")
                history.append(metrics)
                if self.step % tc.log_every == 0 or self.step == tc.max_steps:
                    logger.scalars(self.step, metrics)
                if rc.eval_every and self.step % rc.eval_every == 0 and self.step < tc.max_steps:
                    self._log_heldout(logger, self.heldout())
                if self.step % tc.save_every == 0 or self.step == tc.max_steps:
                    self.save()
                bar.update(1)
                bar.set_postfix(
                    reward=f"{metrics['reward/mean']:.2f}", ent=f"{metrics['entropy']:.2f}"
                )
        finally:
            bar.close()
            self.buffer.close()
        answers_after: dict = {}
        summary["after"] = self.heldout(answers_after)
        self._log_heldout(logger, summary["after"])
        if answers_before:
            # how much RL moved the greedy answers: right -> wrong, wrong -> right, any change
            summary["greedy_changes"] = greedy_changes(answers_before, answers_after)
        logger.close()
        summary.update(
            {
                "steps": self.step,
                "router_replay": rc.router_replay,
                "icepop": [rc.icepop_low, rc.icepop_high],
                "off_policy": {
                    "rollout_staleness": rc.rollout_staleness,
                    "rollout_router_noise": rc.rollout_router_noise,
                    "rollout_top_k": rc.rollout_top_k,
                },
                "tasks": dict(zip(self.curriculum.tasks, self.curriculum.weights.tolist())),
                "run_dir": self.run_dir,
                "train_entropy_first": history[0]["entropy"] if history else None,
                "train_entropy_last": history[-1]["entropy"] if history else None,
                # every logged step of the run (a resumed run's earlier steps included)
                "training": summarise_steps(os.path.join(self.run_dir, "metrics.jsonl")),
            }
        )
        _write_summary(summary_path, summary)
        return summary

    def _log_heldout(self, logger, result: dict) -> None:
        logger.scalars(
            self.step,
            {
                f"heldout/{k}/{task}": v
                for task, r in result.items()
                for k, v in r.items()
                if k != "prompts"
            },
        )
        k = f"pass@{self.cfg.rl.pass_k}"
        self.log(
            f"held-out at step {self.step}: "
            + "; ".join(
                f"{task} greedy {r['greedy_accuracy']:.3f} {k} {r[k]:.3f} "
                f"reward {r['reward']:.3f} entropy {r['entropy']:.3f}"
                for task, r in result.items()
            )
        )


def retain_pools(cur, rc) -> list:
    """The training pools of rl.retain_tasks (none when rl.retain_coef is 0)."""
    if rc.retain_coef == 0:
        return []
    unknown = [t for t in rc.retain_tasks if t not in cur.train]
    if unknown:
        raise C.ConfigError(
            f"rl.retain_tasks={list(rc.retain_tasks)} is invalid: {', '.join(unknown)} not in "
            f"this run's curriculum (tasks: {', '.join(cur.tasks)}; a task of weight 0 counts)"
        )
    return [cur.train[t] for t in rc.retain_tasks]


def draw_retained(pools: list, n: int, seed: int, step: int, minibatch: int) -> list:
    """n problems for the retention term of one update: a task uniformly, then one of its training
    problems; a pure function of (seed, step, minibatch), so a resumed run draws the same."""
    rng = np.random.default_rng([seed, 4243, step, minibatch])
    tasks = rng.integers(len(pools), size=n)
    return [pools[t][int(rng.integers(len(pools[t])))] for t in tasks]


def _check_meta(meta: dict) -> None:
    """The RL fields of a checkpoint's meta.json: query statistics {key: [pass_init, correct,
    total]}."""
    stats = checkpoint.check_dict(meta.get("query_stats"), "query_stats")
    for key, record in stats.items():
        at = f"query_stats.{key}"
        ok = isinstance(record, list) and len(record) == 3
        checkpoint.expect(ok, f"{at} is not [pass_init, correct, total]")
        checkpoint.check_number(record[0], f"{at}[0]")
        checkpoint.check_number(record[1], f"{at}[1]")
        checkpoint.check_int(record[2], f"{at}[2]")


def _write_summary(path: str, summary: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    os.replace(tmp, path)


def _read_summary(path: str) -> dict:
    """rl_summary.json of the run being resumed: its held-out reward before the first step."""
    if not os.path.isfile(path):
        return {}
    try:
        summary = checkpoint.check_dict(checkpoint.read_json(path), "rl_summary.json")
        if "before" in summary:
            checkpoint.check_dict(summary["before"], "rl_summary.json before")
    except checkpoint.Damaged as e:
        raise checkpoint.CheckpointError(
            f"{path} is damaged ({e}); restore it, or set a new train.run_dir"
        ) from None
    return summary


def _progress(start: int, end: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(
        total=end, initial=start, desc="rl", unit="step", disable=not enabled, dynamic_ncols=True
    )


def train_from_config(cfg: C.Config, log=print) -> dict:
    """`ernie5 train` entry for component rl: held-out reward, pass@1 (greedy), pass@k and entropy
    before/after per task."""
    summary = RLTrainer(cfg, log).fit()
    out = {}
    k = f"pass@{cfg.rl.pass_k}"
    for task in summary["after"]:
        for key, name in (
            ("reward", "reward"),
            ("greedy_accuracy", "pass@1"),
            (k, k),
            ("entropy", "entropy"),
        ):
            out[f"{task}/{name}_before"] = summary["before"][task][key]
            out[f"{task}/{name}_after"] = summary["after"][task][key]
    return out

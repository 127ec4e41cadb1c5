"""The pretraining loop. It delegates: data (data/), model (model/), objective (model/losses.py),
optimizer and clipping (optim/optimizer.py), schedule (optim/schedules.py), checkpoints
(io/checkpoint.py), metrics (train/logging.py).

One optimizer step = `grad_accum` micro-batches, each forward + backward; then clip, AdamW step,
and the aux-loss-free bias update of every router from the loads of the whole step.

Multi-process runs (data, expert, sharding parallel) go through `parallel` (parallel/runtime.py):
it slices each global batch, normalises the loss over the global batch, reduces gradients and router
loads, and joins full weights for checkpoints, which rank 0 writes. One process: it does nothing.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import paddle

from .. import config as C
from ..config.train import resume_settings
from ..data.loader import eval_batches, text_data_for, unigram_baseline
from ..io import checkpoint
from ..model.attention import advance_head_fusion
from ..model.generation import generate
from ..model.inputs import to_model_batch
from ..model.losses import (
    compute_loss,
    distillation_kl,
    document_ids,
    sample_anchors,
    simreg_loss,
)
from ..model.model import Ernie5Model
from ..model.params import count_params
from ..optim.optimizer import AdaGC, global_clip_stats
from ..optim.schedules import learning_rate
from ..parallel.runtime import SingleProcess
from .elastic import ElasticSampler, LoadAccumulator, update_router_biases
from .logging import RunLogger, flatten, heatmap_image, load_balance
from .loop import (
    check_numpy_rng_state,
    check_paddle_rng_state,
    paddle_rng_state,
    set_paddle_rng_state,
)
from .precision import Precision
from .pretrained import init_fresh


@dataclass
class FitResult:
    step: int
    val_loss: float
    run_dir: str


class Trainer:
    def __init__(self, cfg: C.Config, log=print, parallel=None):
        self.cfg = cfg
        self.par = parallel or SingleProcess()
        self.log = log if self.par.is_main else (lambda *_: None)
        self.run_dir = cfg.train.run_dir
        self.ckpt_root = os.path.join(self.run_dir, "checkpoints")
        tc, dc = cfg.train, cfg.data
        # First: a precision this device cannot run (fp16 on the CPU) stops before any work.
        self.precision = Precision.for_device(tc.precision, self.par.world_size)
        paddle.seed(tc.seed)
        self.tokenizer, self.text_loader, self.val_packed = text_data_for(cfg, bpe_dropout=True)
        self.loader = self.text_loader
        if dc.mixture.enabled:  # multimodal sources (data/mixture.py); validation stays text
            from ..data.mixture import MixtureContext, MixtureLoader

            ctx = MixtureContext(cfg, self.tokenizer, "train", self.text_loader.docs_ids_fn(0))
            self.loader = MixtureLoader(ctx, tc.batch_size, tc.seed)
        # Seeded again here: building a data cache may draw from Paddle's generator (a cache
        # built by this run or read from disk must give the same initial weights).
        paddle.seed(tc.seed)
        self.model = self.par.wrap_model(Ernie5Model(cfg.model))
        self.optimizer = self.par.build_optimizer(self.model, tc)
        self.elastic = ElasticSampler(cfg.elastic, cfg.model, tc.seed)
        self.adagc = (
            AdaGC(tc.clip, tc.clip.lambda_abs or tc.clip_norm) if tc.clip.mode == "adagc" else None
        )
        self.step = 0

    # ------------------------------------------------------------------ state
    def _state_meta(self) -> dict:
        return {
            "data": self.loader.state_dict(),
            "elastic": self.elastic.state_dict(),
            "paddle_rng": paddle_rng_state(),  # plain JSON values, as train/loop.py stores it
            "config": resume_settings(self.cfg),  # compared on resume (train.on_config_change)
        }

    def _check_meta(self, meta: dict) -> None:
        """What try_resume applies from meta.json, checked before anything is applied (a damaged
        checkpoint is then skipped for the previous one)."""
        checkpoint.check_dict(meta, "meta", ("data", "elastic", "paddle_rng"))
        checkpoint.check_like(meta["data"], self.loader.state_dict(), "data")
        check_numpy_rng_state(meta["elastic"], self.elastic.rng, "elastic")
        check_paddle_rng_state(meta["paddle_rng"], "paddle_rng")

    def save(self) -> str | None:
        model_state, optim_state = self.par.full_states(self.model, self.optimizer)
        if self.adagc is not None:  # identical on every rank: it sees the full gradients' norms
            optim_state = {**optim_state, **self.adagc.state_dict()}
        path = None
        if self.par.is_main:
            path = checkpoint.save(
                self.ckpt_root,
                self.step,
                model_state,
                optim_state,
                self._state_meta(),
                self.cfg.train.keep_last,
            )
        self.par.barrier()
        return path

    def try_resume(self) -> bool:
        tc = self.cfg.train
        found = checkpoint.resumable(
            self.ckpt_root,
            tc.resume,
            resume_settings(self.cfg),
            on_change=tc.on_config_change,
            shapes={k: tuple(v.shape) for k, v in self.model.state_dict().items()},
            local=self.par.local_state,
            validate=self._check_meta,
            warn=self.log,
        )
        if found is None:
            return False
        path, model_state, optim_state, meta = found
        optim_state, adagc_state = AdaGC.split_state(optim_state)
        self.par.load_states(self.model, self.optimizer, model_state, optim_state)
        if self.adagc is not None:
            self.adagc.load_state_dict(adagc_state)
        self.loader.load_state_dict(meta["data"])
        self.elastic.load_state_dict(meta["elastic"])
        set_paddle_rng_state(meta["paddle_rng"])
        self.step = int(meta["step"])
        self.log(f"resumed from {path} at step {self.step}")
        return True

    def init_weights(self, path: str) -> None:
        checkpoint.init_weights(
            self.model,
            path,
            warn=self.log,
            local=self.par.local_state,
            settings=resume_settings(self.cfg),
        )
        self.log(f"initialised model weights from {path}")

    # ------------------------------------------------------------------ steps
    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        self.model.train()
        loads = LoadAccumulator()
        sums = {"loss": 0.0, "loss/text": 0.0, "loss/mtp": 0.0, "loss/aux": 0.0, "loss/z": 0.0}
        tokens = 0
        sim = cfg.train.simreg
        # Forward and backward in train.precision (bf16 on the CPU: weights rounded until the
        # block ends, so the optimizer below updates the float32 masters).
        with self.precision.compute(self.model):
            for micro in range(cfg.train.grad_accum):
                global_batch = self.loader.next_batch()
                if self.par.pipelined:  # every stage's forward and backward: parallel/pipeline.py
                    values, stage_loads = self.par.forward_backward(
                        global_batch, 1.0 / cfg.train.grad_accum
                    )
                    for key, value in values.items():
                        sums[key] = sums.get(key, 0.0) + value
                    for i, (load, mask) in stage_loads.items():
                        loads.add(i, load, mask)
                    tokens += int(global_batch["input_ids"].size)
                    continue
                if sim.enabled:
                    # Drawn for the global batch from counters only: same anchors for any rank
                    # count and after a resume.
                    rng = np.random.default_rng([cfg.train.seed, self.step, micro])
                    drawn = sample_anchors(global_batch["labels"], sim.max_anchors, rng)
                    global_batch = {**global_batch, "simreg_anchors": drawn}
                local = self.par.shard_batch(global_batch)
                anchors = local.pop("simreg_anchors", None)
                batch = to_model_batch(local)
                # Same seed on every rank: every rank runs the same views. With
                # elastic.full_every_step the full model and the sampled sub-model share the
                # micro-batch (weighted mean of their losses).
                views = self.elastic.sample_views()
                weights = self.elastic.view_weights(len(views))
                teacher = None
                distill = len(views) > 1 and cfg.elastic.distill_weight > 0
                forward = self.par.train_forward(self.model)
                for j, view in enumerate(views):
                    out = forward(batch, view)
                    # Read before the loss, which then uses these logits rather than projecting
                    # the hidden state a second time (model.ModelOutput defers them).
                    logits = out.logits if distill else None
                    parts = compute_loss(
                        out, batch["labels"], cfg.model, self.model.head_losses(out, batch)
                    )
                    loss, values = self.par.objective(parts, batch["labels"], cfg.model)
                    if j == 0 and distill:
                        teacher = logits.detach()
                    elif teacher is not None:
                        kd = distillation_kl(logits, teacher, batch["labels"])
                        loss = loss + cfg.elastic.distill_weight * kd
                        sums["elastic/distill_kl"] = sums.get("elastic/distill_kl", 0) + float(kd)
                    if sim.enabled:
                        loss = loss + sim.weight * self._simreg_share(
                            out.hidden, batch, anchors, values
                        )
                    self.precision.backward(loss * (weights[j] / cfg.train.grad_accum))
                    if j == 0:  # logged losses: the first view's (the full model when shared)
                        for key, value in values.items():
                            sums[key] = sums.get(key, 0.0) + value
                    else:
                        sums["elastic/sub_loss"] = sums.get("elastic/sub_loss", 0) + values["loss"]
                    for i, s in out.router_stats.items():
                        loads.add(i, s.load_E.numpy(), s.expert_mask_E)
                tokens += int(global_batch["input_ids"].size)
        self.par.reduce_gradients(self.model)
        loads.load = self.par.reduce_loads(loads.load)
        lr = self.learning_rate_at(self.step)
        self.optimizer.set_lr(lr)
        self.precision.unscale(self.optimizer)
        clip = self._clip()
        self.precision.optimizer_step(self.par, self.model, self.optimizer)
        self.optimizer.clear_grad(set_to_zero=False)
        update_router_biases(self.model.moe_layers(), loads, cfg.model.moe)
        if cfg.model.attention.fusion.active:
            advance_head_fusion(self.model)
        self.step += 1
        metrics = {k: v / cfg.train.grad_accum for k, v in sums.items()}
        metrics.update({"train/lr": lr, **clip.metrics(), "_tokens": tokens})
        for i, load in loads.load.items():
            ent, max_mean = load_balance(load)
            metrics[f"moe/entropy/layer{i}"] = ent
            metrics[f"moe/max_over_mean/layer{i}"] = max_mean
        self._last_loads = loads.load
        return metrics

    def learning_rate_at(self, step: int) -> float:
        """The learning rate of optimizer step `step` (train.schedule); tools/ablate.py overrides it
        to inject a spike."""
        return learning_rate(step, self.cfg.train)

    def _simreg_share(self, hidden, batch, anchors, values: dict):
        """This rank's share of the SimReg mean over every anchor of the global batch (one process:
        the mean). Adds loss/simreg to `values` and its weighted value to values["loss"]."""
        sim_sum, count = simreg_loss(
            hidden,
            batch["labels"],
            document_ids(batch["startend_row_indices"]),
            paddle.to_tensor(anchors),
            self.cfg.train.simreg.temperature,
        )
        total_sum, total_count = self.par.sum_over_data(np.array([float(sim_sum), float(count)]))
        values["loss/simreg"] = total_sum / max(total_count, 1.0)
        values["loss"] += self.cfg.train.simreg.weight * values["loss/simreg"]
        return sim_sum / max(total_count, 1.0)

    def _clip(self):
        """Clip the reduced gradients once per optimizer step: train.clip.mode global or adagc."""
        tc = self.cfg.train
        if self.adagc is None:
            norm = self.par.clip(self.model, tc.clip_norm)
            return global_clip_stats(norm, tc.clip_norm)
        named = [(n, p) for n, p in self.model.named_parameters() if p.grad is not None]
        return self.adagc.clip(named, self.par.grad_sq_norms(named))

    @paddle.no_grad()
    def evaluate(self) -> float:
        """Mean next-token cross-entropy over the validation split (nats/token). Also keeps the
        expert usage and a sample of router logits per MoE layer for the dashboards."""
        self.par.refresh_model(self.model)
        self.model.eval()
        total, count = 0.0, 0.0
        self._eval_usage: dict[int, np.ndarray] = {}
        self._eval_logits: dict[int, np.ndarray] = {}
        limit = self.cfg.data.eval_batches or None
        for n, np_batch in enumerate(eval_batches(self.val_packed, self.cfg.train.batch_size)):
            if limit is not None and n >= limit:
                break
            batch = to_model_batch(np_batch)
            with self.precision.compute(self.model):
                out = self.model(batch, with_mtp=False)
            parts = compute_loss(out, batch["labels"], self.cfg.model)
            c = float(parts.num_targets)
            total += float(parts.text) * c
            count += c
            for i, st in out.router_stats.items():
                self._eval_usage[i] = self._eval_usage.get(i, 0) + st.load_E.numpy()
                if n == 0 and st.logits_TE is not None:
                    self._eval_logits[i] = st.logits_TE.numpy().ravel()
        return total / max(count, 1.0)

    def log_eval_views(self, logger) -> None:
        """Images, histograms and text samples for VisualDL at an evaluation."""
        if not self._eval_usage:
            return
        layers = sorted(self._eval_usage)
        usage = np.stack([self._eval_usage[i] / max(1, self._eval_usage[i].sum()) for i in layers])
        logger.image(self.step, "routing/usage_layers_x_experts/text", heatmap_image(usage))
        for i, logits in self._eval_logits.items():
            logger.histogram(self.step, f"moe/router_logits/layer{i}", logits)
        # Every rank generates (an expert-parallel forward is a collective); only rank 0 writes.
        prompts = self.val_packed["input_ids"][:2, :16]
        sample = generate(self.model, prompts, 32, temperature=0.0)
        for j in range(len(prompts)):
            logger.text(
                self.step,
                "samples/text",
                self.tokenizer.decode(prompts[j].tolist())
                + " ⟶ "
                + self.tokenizer.decode(sample.tokens[j].tolist()),
            )
        if self.cfg.data.mixture.enabled:
            self.log_modality_views(logger)
        if "audio" in self.cfg.model.modalities:  # generated speech, VisualDL samples/speech/*
            from ..eval.audio import log_speech_samples

            log_speech_samples(self.model, self.cfg, self.tokenizer, logger, self.step)

    @paddle.no_grad()
    def log_modality_views(self, logger, captions=((3, 0, 1), (7, 2, 3))) -> None:
        """Per-source routing heatmaps (routing/usage_layers_x_experts/<source>: one held-out batch
        of each multimodal source, its own modality's tokens only) and, with images, generated
        samples (samples/image: greedy text -> image for `captions` given as (digit, fg, bg))."""
        from ..eval.routing import multimodal_source_batches, usage

        for name, batches in multimodal_source_batches(self.cfg, self.tokenizer, 1).items():
            counts = usage(self.model, batches)
            share = counts / np.maximum(1, counts.sum(axis=1, keepdims=True))
            tag = name.split(" (")[0].replace(" ", "_")
            logger.image(self.step, f"routing/usage_layers_x_experts/{tag}", heatmap_image(share))
        if "image" in self.cfg.model.modalities:
            from ..data.digits import image_caption
            from ..data.vision_sources import load_visual_tokenizer
            from ..eval.vision_eval import generate_images

            tok = load_visual_tokenizer(self.cfg.model.vision)
            frames = generate_images(
                self.model, self.cfg, self.tokenizer, tok, [image_caption(*c) for c in captions]
            )
            row = np.concatenate([f[0].transpose(1, 2, 0) for f in frames], axis=1)  # side by side
            logger.image(self.step, "samples/image", (row * 255).round().astype(np.uint8))
        self.model.train()

    # ------------------------------------------------------------------ loop
    def fit(self, stop_at: int | None = None) -> FitResult:
        """Train to `train.max_steps` (or stop after step `stop_at`, saving a checkpoint there).
        Rank 0 holds the run directory's lock (io/checkpoint.RunLock) meanwhile."""
        if not self.par.is_main:
            return self._fit(stop_at)
        with checkpoint.RunLock(self.run_dir, warn=self.log):
            return self._fit(stop_at)

    def _fit(self, stop_at: int | None) -> FitResult:
        cfg, tc = self.cfg, self.cfg.train
        if not self.try_resume():
            if tc.init_from:
                self.init_weights(tc.init_from)
            else:  # a fresh run: layers that start from pre-trained components
                for note in init_fresh(self.model):
                    self.log(note)
        # Only now that the run goes on: a refused resume or start leaves the directory as it was.
        if self.par.is_main:
            C.save_config(cfg, os.path.join(self.run_dir, "config.yaml"))
        params = count_params(cfg.model)
        self.log(f"precision: {self.precision.describe()}")
        self.log(
            f"model: {params['total'] / 1e6:.2f}M parameters, {params['activated'] / 1e6:.2f}M "
            f"activated per token; run dir {self.run_dir}"
        )
        logger = RunLogger(self.run_dir, tc.visualdl) if self.par.is_main else _NullLogger()
        if self.step == 0:
            logger.hparams(flatten(cfg.to_dict()), ["val/loss", "loss"])
        end = tc.max_steps if stop_at is None else min(stop_at, tc.max_steps)
        bar = _progress(self.step, end, tc.progress and self.par.is_main)
        val_loss = float("nan")
        train_seconds, tokens = 0.0, 0
        try:
            while self.step < end:
                t0 = time.perf_counter()
                metrics = self.train_step()
                train_seconds += time.perf_counter() - t0
                tokens += metrics.pop("_tokens")
                if not math.isfinite(metrics["loss"]):
                    raise FloatingPointError(
                        f"loss is {metrics['loss']} at step {self.step}; "
                        "lower train.lr or enable train.clip_norm"
                    )
                tok_s = tokens / max(train_seconds, 1e-9)  # eval and checkpoint time excluded
                if self.step % tc.log_every == 0 or self.step == end:
                    logger.scalars(self.step, {**metrics, "perf/tokens_per_s": tok_s})
                    for i, load in self._last_loads.items():
                        logger.histogram(self.step, f"moe/load/layer{i}", load)
                if self.step % tc.eval_every == 0 or self.step == tc.max_steps:
                    val_loss = self.evaluate()
                    logger.scalars(
                        self.step, {"val/loss": val_loss, "val/ppl": math.exp(min(val_loss, 50))}
                    )
                    self.log_eval_views(logger)
                if self.step % tc.save_every == 0 or self.step == end:
                    self.save()
                bar.update(1)
                bar.set_postfix(
                    loss=f"{metrics['loss']:.3f}", val=f"{val_loss:.3f}", tok_s=f"{tok_s:.0f}"
                )
        finally:
            bar.close()
            logger.close()
        return FitResult(self.step, val_loss, self.run_dir)

    def unigram_loss(self) -> float:
        return unigram_baseline(
            self.text_loader.docs_ids_fn(0), self.val_packed["labels"], self.cfg.model.vocab_size
        )


class _NullLogger:
    """What ranks other than 0 log to: nothing (rank 0 logs the reduced, global metrics)."""

    def scalars(self, *_):
        pass

    histogram = hparams = image = text = scalars

    def close(self):
        pass


def _progress(start: int, end: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(
        total=end, initial=start, desc="train", unit="step", disable=not enabled, dynamic_ncols=True
    )


def read_metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]

"""The one training loop of every component trained apart from the backbone's pretraining: the
tokenizers, codec, judges, merger and the supervised stage. A component supplies its step and its
evaluation; the loop owns seeding, the run directory, progress, logging, periodic evaluation,
checkpoints, exact resume and a clean Ctrl-C (OLMo-core's Trainer, Lightning's fit loop).

    loop = Loop(cfg.train, cfg)          seeds paddle and numpy, writes <run_dir>/config.yaml
    comp = MyComponent(cfg, loop.rng)    builds data, model, optimizer (after seeding, so the same
                                         seed draws the same initial weights)
    metrics = loop.fit(comp)

    resume from the newest checkpoint in <run_dir>/checkpoints (if any)
    for step in start .. train.max_steps - 1:
        scalars = comp.step(step)                   one optimizer step
        every train.log_every steps    scalars -> metrics.jsonl, VisualDL, the progress bar
        every comp.eval_every steps    comp.evaluate() -> eval/* (training RNG state kept)
        every train.save_every steps   checkpoint (and after the last step)
    comp.evaluate() + train_seconds + comp.finish(run_dir)  -> metrics.json

Without a config (`Loop(train)`) the loop runs in memory: the same seeding and steps, no files.

A checkpoint is io/checkpoint.py's directory: model parameters and buffers and the optimizer
moments as safetensors, the rest as JSON in meta.json: the step, the numpy generator's
`bit_generator.state`, Paddle's generator state, the component's `state_dict()` and the seconds
trained so far. Nothing is pickled. Paddle's generator state is stored as the four values its
`GeneratorState` pickles itself to (device, seed, offset and the mt19937_64 engine state as text)
and rebuilt from them with `__setstate__`, which takes plain values, so a resumed run draws the
same dropout masks and random restarts as one that never stopped.

Ctrl-C: the first press lets the current step finish, then the loop checkpoints, prints how to
resume and exits with code 130. A KeyboardInterrupt raised inside a step (a second press) is
checkpointed at the last completed step with the RNG and component state of that moment; if it
struck inside the optimizer update, that checkpoint is not exact.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import numpy as np
import paddle

from ..config import save_config
from ..io import checkpoint, write_json
from ..optim.optimizer import load_optimizer_state, optimizer_state
from .logging import RunLogger


class Component:
    """What a component gives the loop. Subclasses set the attributes in their constructor and
    override `step`; the other methods are optional."""

    name = "component"  # progress-bar label
    model: paddle.nn.Layer  # its parameters and buffers are checkpointed
    optimizer: paddle.optimizer.Optimizer  # its moments are checkpointed
    config: dict | None = None  # plain config a checkpoint must have been written with to resume
    eval_every = 0  # also evaluate every n steps; 0 = at the end only

    def step(self, step: int) -> dict[str, float]:
        """One optimizer step (`step` counts from 0); returns the scalars to log."""
        raise NotImplementedError

    def evaluate(self) -> dict:
        """Held-out metrics; the model is in eval mode."""
        return {}

    def finish(self, run_dir: str) -> dict:
        """Write the trained artefact into `run_dir`; returns metrics that only it can give."""
        return {}

    def state_dict(self) -> dict:
        """JSON-able state the steps carry besides model, optimizer and RNGs."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class Loop:
    def __init__(self, train, config=None):
        """`train`: the recipe's train section; `config`: the whole recipe, whose train.run_dir
        receives config.yaml, logs, checkpoints and metrics.json (None: run in memory)."""
        self.tr = train
        self.run_dir = train.run_dir if config is not None else None
        paddle.seed(train.seed)
        self.rng = np.random.default_rng(train.seed)
        if self.run_dir:
            os.makedirs(self.run_dir, exist_ok=True)
            save_config(config, os.path.join(self.run_dir, "config.yaml"))

    # ------------------------------------------------------------------------------------- fit

    def fit(self, c: Component, stop_at: int | None = None) -> dict | None:
        """Train `c` to train.max_steps and return its final metrics; with `stop_at`, stop after
        that many steps with a checkpoint and return None (what a killed run leaves behind)."""
        from tqdm import tqdm

        tr = self.tr
        end = tr.max_steps if stop_at is None else min(stop_at, tr.max_steps)
        step, seconds = self._resume(c)
        log = RunLogger(self.run_dir, tr.visualdl) if self.run_dir else None
        bar = tqdm(
            total=tr.max_steps,
            initial=step,
            desc=c.name,
            unit="step",
            disable=not tr.progress,
            dynamic_ncols=True,
        )
        try:
            step, seconds = self._steps(c, step, end, seconds, log, bar)
            bar.close()
            if step < tr.max_steps:
                return None
            c.model.eval()
            metrics = {**c.evaluate(), "train_seconds": round(seconds, 1)}
            if self.run_dir:
                metrics.update(c.finish(self.run_dir))
                log.scalars(tr.max_steps, {f"eval/{k}": v for k, v in metrics.items()})
                write_json(os.path.join(self.run_dir, "metrics.json"), metrics)
            return metrics
        finally:
            bar.close()
            if log is not None:
                log.close()

    def _steps(self, c, step, end, seconds, log, bar) -> tuple[int, float]:
        """Steps `step..end-1`; returns (steps done, seconds spent in steps). Ctrl-C: checkpoint,
        print how to resume, exit 130."""
        c.model.train()
        boundary = self._boundary(c, seconds)
        try:
            with _DeferredInterrupt() as ctrl_c:
                while not ctrl_c.pressed and step < end:
                    t0 = time.perf_counter()
                    scalars = c.step(step)
                    seconds += time.perf_counter() - t0
                    step += 1
                    boundary = self._boundary(c, seconds)
                    bar.update(1)
                    self._after_step(c, step, end, scalars, log, bar, boundary)
                if ctrl_c.pressed:
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            if self.run_dir is None:
                raise
            bar.close()
            path = self._save(c, step, boundary)
            print(
                f"interrupted after step {step} of {self.tr.max_steps}; checkpoint {path}. "
                f"Resume: run the same command again (it continues in {self.run_dir})",
                file=sys.stderr,
            )
            raise SystemExit(130) from None
        return step, seconds

    def _after_step(self, c, step, end, scalars, log, bar, boundary) -> None:
        tr = self.tr
        if step % tr.log_every == 0 or step == tr.max_steps:
            bar.set_postfix({k.rpartition("/")[2]: f"{v:.4g}" for k, v in scalars.items()})
            if log is not None:
                log.scalars(step, scalars)
        if log is not None and c.eval_every and step % c.eval_every == 0 and step < tr.max_steps:
            log.scalars(step, {f"eval/{k}": v for k, v in self._evaluate_between_steps(c).items()})
        if self.run_dir and (step % tr.save_every == 0 or step == end):
            self._save(c, step, boundary)

    def _evaluate_between_steps(self, c: Component) -> dict:
        """Evaluate mid-run without changing what training draws next."""
        numpy_state, paddle_state = self.rng.bit_generator.state, paddle.get_rng_state()
        c.model.eval()
        try:
            return c.evaluate()
        finally:
            c.model.train()
            self.rng.bit_generator.state = numpy_state
            paddle.set_rng_state(paddle_state)

    # ------------------------------------------------------------------------------ checkpoints

    @property
    def _root(self) -> str:
        return os.path.join(self.run_dir, "checkpoints")

    def _boundary(self, c: Component, seconds: float) -> dict:
        """Everything but model and optimizer that a checkpoint taken now holds (JSON)."""
        return {
            "numpy_rng": self.rng.bit_generator.state,
            "paddle_rng": paddle_rng_state(),
            "component": c.state_dict(),
            "train_seconds": seconds,
        }

    def _save(self, c: Component, step: int, boundary: dict) -> str:
        model = {k: v.numpy() for k, v in c.model.state_dict().items()}
        meta = {"model_config": c.config, "loop": boundary}
        return checkpoint.save(
            self._root, step, model, optimizer_state(c.model, c.optimizer), meta, self.tr.keep_last
        )

    def _resume(self, c: Component) -> tuple[int, float]:
        """(first step, seconds trained before it): from the newest valid checkpoint of the run
        directory unless train.resume says never (components without that field always resume)."""
        if self.run_dir is None:
            return 0, 0.0
        resume = getattr(self.tr, "resume", "auto")
        found = checkpoint.resumable(
            self._root, resume, c.config, warn=lambda m: print(m, file=sys.stderr)
        )
        if found is None:
            return 0, 0.0
        path, model_state, optim_state, meta = found
        if "loop" not in meta:  # not written by this loop: no RNG state to resume from
            raise checkpoint.CheckpointError(
                f"checkpoint {path} holds no loop state (RNGs, step counters) to resume from; "
                "set a new train.run_dir"
            )
        c.model.set_state_dict({k: paddle.to_tensor(v) for k, v in model_state.items()})
        load_optimizer_state(c.model, c.optimizer, optim_state)
        state = meta["loop"]
        self.rng.bit_generator.state = state["numpy_rng"]
        set_paddle_rng_state(state["paddle_rng"])
        c.load_state_dict(state["component"])
        print(f"resumed from {path} at step {meta['step']}", file=sys.stderr)
        return int(meta["step"]), float(state["train_seconds"])


def paddle_rng_state() -> list[dict]:
    """Paddle's generator states as JSON: the values `GeneratorState.__getstate__` gives."""
    out = []
    for s in paddle.get_rng_state():
        device, seed, offset, engine = s.__getstate__()
        out.append(
            {
                "device": device,
                "seed": seed,
                "offset": offset,
                "engine": bytes(engine).decode("ascii"),
            }
        )
    return out


def set_paddle_rng_state(states: list[dict]) -> None:
    from paddle.base.libpaddle import GeneratorState

    built = []
    for s in states:
        g = GeneratorState.__new__(GeneratorState)
        g.__setstate__((s["device"], s["seed"], s["offset"], list(s["engine"].encode("ascii"))))
        built.append(g)
    paddle.set_rng_state(built)


class _DeferredInterrupt:
    """While active (main thread only), the first SIGINT sets `pressed` instead of raising, so
    the step under way completes; a second raises KeyboardInterrupt at once."""

    def __enter__(self):
        self.pressed = False
        self._old = None
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.pressed:
            raise KeyboardInterrupt
        self.pressed = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False

"""The one training loop of every component trained apart from the backbone's pretraining: the
tokenizers, codec, judges, merger and the supervised stage. A component supplies its step and its
evaluation; the loop owns seeding, the run directory, progress, logging, periodic evaluation,
checkpoints, exact resume and a clean Ctrl-C (OLMo-core's Trainer, Lightning's fit loop).

    loop = Loop(cfg.train, cfg)          seeds paddle and numpy
    comp = MyComponent(cfg, loop.rng)    builds data, model, optimizer (after seeding, so the same
                                         seed draws the same initial weights)
    metrics = loop.fit(comp)

    lock <run_dir> (io/checkpoint.RunLock: a second run on it stops with exit 2)
    resume from the newest checkpoint in <run_dir>/checkpoints (if any; refused ones stop with
        exit 2 before anything in <run_dir> is written), then write <run_dir>/config.yaml
    for step in start .. train.max_steps - 1:
        scalars = comp.step(step)                   one optimizer step
        every train.log_every steps    scalars -> metrics.jsonl, VisualDL, the progress bar
        every comp.eval_every steps    comp.evaluate() -> eval/* (training RNG state kept)
        every train.save_every steps   checkpoint (and after the last step)
    comp.evaluate() + train_seconds + comp.finish(run_dir)  -> metrics.json

Without a config (`Loop(train)`) the loop runs in memory: the same seeding and steps, no files.

A checkpoint is io/checkpoint.py's directory: model parameters and buffers and the optimizer
moments as safetensors, the rest as JSON in meta.json: the step, the recipe's settings
(config/train.resume_settings, compared on resume per train.on_config_change), the numpy
generator's `bit_generator.state`, Paddle's generator state, the component's `state_dict()` and the
seconds trained so far. Nothing is pickled. Paddle's generator state is stored as the four values
its `GeneratorState` pickles itself to (device, seed, offset and the mt19937_64 engine state as
text) and rebuilt from them with `__setstate__`, which takes plain values, so a resumed run draws
the same dropout masks and random restarts as one that never stopped (`paddle_rng_state`,
`set_paddle_rng_state`; the backbone trainer stores its generator the same way). Every field is
checked before anything is applied; a damaged checkpoint falls back to the previous one.

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
from ..config.train import flat_settings, resume_settings
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
        self.tr, self.config = train, config
        self.run_dir = train.run_dir if config is not None else None
        paddle.seed(train.seed)
        self.rng = np.random.default_rng(train.seed)

    # ------------------------------------------------------------------------------------- fit

    def fit(self, c: Component, stop_at: int | None = None) -> dict | None:
        """Train `c` to train.max_steps and return its final metrics; with `stop_at`, stop after
        that many steps with a checkpoint and return None (what a killed run leaves behind)."""
        if self.run_dir is None:
            return self._fit(c, stop_at)
        with checkpoint.RunLock(self.run_dir, warn=_stderr):
            return self._fit(c, stop_at)

    def _fit(self, c: Component, stop_at: int | None) -> dict | None:
        from tqdm import tqdm

        tr = self.tr
        end = tr.max_steps if stop_at is None else min(stop_at, tr.max_steps)
        step, seconds = self._resume(c)
        if self.run_dir:  # only now: a refused resume leaves the run directory as it was
            save_config(self.config, os.path.join(self.run_dir, "config.yaml"))
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

    def _settings(self, c: Component) -> dict:
        """What a checkpoint records and a resume compares: the recipe's settings and the
        component's own config (under "component.")."""
        return {**resume_settings(self.config), **flat_settings(c.config or {}, "component")}

    def _save(self, c: Component, step: int, boundary: dict) -> str:
        model = {k: v.numpy() for k, v in c.model.state_dict().items()}
        meta = {"config": self._settings(c), "loop": boundary}
        return checkpoint.save(
            self._root, step, model, optimizer_state(c.model, c.optimizer), meta, self.tr.keep_last
        )

    def _resume(self, c: Component) -> tuple[int, float]:
        """(first step, seconds trained before it): from the newest valid checkpoint of the run
        directory unless train.resume says never (components without that field always resume)."""
        if self.run_dir is None:
            return 0, 0.0
        resume = getattr(self.tr, "resume", "auto")

        def validate(meta: dict) -> None:
            loop = checkpoint.check_dict(
                meta.get("loop"), "loop", ("numpy_rng", "paddle_rng", "component", "train_seconds")
            )
            check_numpy_rng_state(loop["numpy_rng"], self.rng, "loop.numpy_rng")
            check_paddle_rng_state(loop["paddle_rng"], "loop.paddle_rng")
            checkpoint.check_number(loop["train_seconds"], "loop.train_seconds", lo=0)
            # The component's own check: loading it (a later load of the chosen one replaces it).
            c.load_state_dict(checkpoint.check_dict(loop["component"], "loop.component"))

        found = checkpoint.resumable(
            self._root,
            resume,
            self._settings(c),
            on_change=self.tr.on_config_change,
            shapes={k: tuple(v.shape) for k, v in c.model.state_dict().items()},
            validate=validate,
            warn=_stderr,
        )
        if found is None:
            return 0, 0.0
        path, model_state, optim_state, meta = found
        c.model.set_state_dict({k: paddle.to_tensor(v) for k, v in model_state.items()})
        load_optimizer_state(c.model, c.optimizer, optim_state)
        state = meta["loop"]
        self.rng.bit_generator.state = state["numpy_rng"]
        set_paddle_rng_state(state["paddle_rng"])
        c.load_state_dict(state["component"])
        print(f"resumed from {path} at step {meta['step']}", file=sys.stderr)
        return int(meta["step"]), float(state["train_seconds"])


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def paddle_rng_state() -> list[dict]:
    """Paddle's generator states as JSON: the values `GeneratorState.__getstate__` gives. Used by
    every trainer that checkpoints Paddle's generator (this loop, train/trainer.py)."""
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


def check_paddle_rng_state(states, at: str = "paddle_rng") -> list[dict]:
    """`states` is what `paddle_rng_state` gives for this process's generators (one per device),
    each engine state the mt19937_64 text (312 words and an index); else `checkpoint.Damaged`.
    Paddle itself would take any text and make a garbage generator of it."""
    checkpoint.check_list(states, at)
    want = len(paddle.get_rng_state())
    checkpoint.expect(len(states) == want, f"{at} holds {len(states)} generator states, not {want}")
    for i, s in enumerate(states):
        where = f"{at}[{i}]"
        checkpoint.check_dict(s, where, ("device", "seed", "offset", "engine"))
        checkpoint.check_int(s["device"], f"{where}.device", lo=-1)
        checkpoint.check_int(s["seed"], f"{where}.seed", hi=2**64 - 1)
        checkpoint.check_int(s["offset"], f"{where}.offset", hi=2**64 - 1)
        words = checkpoint.check_str(s["engine"], f"{where}.engine").split()
        ok = (
            len(words) == _MT_WORDS + 1
            and all(w.isascii() and w.isdigit() for w in words)
            and all(int(w) < 2**64 for w in words[:-1])
            and int(words[-1]) <= _MT_WORDS
        )
        checkpoint.expect(ok, f"{where}.engine is not an mt19937_64 state")
    return states


_MT_WORDS = 312  # mt19937_64's state size


def check_numpy_rng_state(state, rng: np.random.Generator, at: str) -> dict:
    """`state` is a `bit_generator.state` of the same kind as `rng`'s (assigned to a scratch
    generator to let numpy check it); else `checkpoint.Damaged`."""
    checkpoint.check_dict(state, at, ("bit_generator",))
    kind = type(rng.bit_generator)
    checkpoint.expect(
        state["bit_generator"] == kind.__name__,
        f"{at}.bit_generator is {state['bit_generator']!r}, not {kind.__name__!r}",
    )

    def integers(value, where):  # numpy would take floats and booleans
        if isinstance(value, dict):
            for k, v in value.items():
                integers(v, f"{where}.{k}")
        elif isinstance(value, list):
            for i, v in enumerate(value):
                integers(v, f"{where}[{i}]")
        elif not isinstance(value, str):
            checkpoint.check_int(value, where)

    integers({k: v for k, v in state.items() if k != "bit_generator"}, at)
    try:
        kind().state = state
    except (TypeError, ValueError, KeyError, OverflowError) as e:
        raise checkpoint.Damaged(f"{at} is not a {kind.__name__} state ({e})") from None
    return state


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

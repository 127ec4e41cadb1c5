"""Run logging: VisualDL scalars/histograms plus a metrics.jsonl file in the run directory.

One VisualDL log directory per run (<run_dir>/vdl) so `visualdl --logdir runs` shows runs side by
side. metrics.jsonl holds one JSON object per logged step; tests and tools read it back.
"""

from __future__ import annotations

import json
import os

import numpy as np


def load_balance(load_E: np.ndarray) -> tuple[float, float]:
    """(normalised entropy of the expert-load distribution, max/mean load); (1.0, 1.0) is
    balanced."""
    load = np.asarray(load_E, dtype=np.float64)
    total = load.sum()
    if total <= 0 or load.size < 2:
        return 1.0, 1.0
    p = load / total
    nz = p[p > 0]
    return float(-(nz * np.log(nz)).sum() / np.log(load.size)), float(load.max() / load.mean())


class RunLogger:
    def __init__(self, run_dir: str, visualdl: bool = True):
        os.makedirs(run_dir, exist_ok=True)
        self._jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "ab", buffering=0)
        self._vdl = None
        if visualdl:
            from visualdl import LogWriter

            self._vdl = LogWriter(logdir=os.path.join(run_dir, "vdl"))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        # One whole line or nothing: a write that fails (a full disk) is cut back off, so the file
        # never holds half a line that would garble the next one.
        line = (json.dumps({"step": step, **values}) + "\n").encode("utf-8")
        fd = self._jsonl.fileno()
        end = os.lseek(fd, 0, os.SEEK_END)
        try:
            done = 0
            while done < len(line):
                done += os.write(fd, line[done:])
        except OSError:
            os.ftruncate(fd, end)
            raise
        if self._vdl is not None:
            for tag, value in values.items():
                self._vdl.add_scalar(tag=tag, value=float(value), step=step)

    def histogram(self, step: int, tag: str, values: np.ndarray) -> None:
        if self._vdl is not None:
            self._vdl.add_histogram(
                tag=tag,
                values=np.asarray(values, dtype=np.float64),
                step=step,
                buckets=min(64, max(2, np.asarray(values).size)),
            )

    def image(self, step: int, tag: str, image_HWC: np.ndarray) -> None:
        if self._vdl is not None:
            self._vdl.add_image(tag=tag, img=np.asarray(image_HWC, dtype=np.uint8), step=step)

    def text(self, step: int, tag: str, text: str) -> None:
        if self._vdl is not None:
            self._vdl.add_text(tag=tag, text_string=text, step=step)

    def audio(self, step: int, tag: str, wave: np.ndarray, sample_rate: int) -> None:
        """Mono float audio in [-1, 1] (VisualDL plays it)."""
        if self._vdl is not None:
            self._vdl.add_audio(
                tag=tag,
                audio_array=np.clip(np.asarray(wave, np.float32), -1, 1),
                step=step,
                sample_rate=sample_rate,
            )

    def hparams(self, flat_config: dict, metrics: list[str]) -> None:
        if self._vdl is not None:
            hp = {
                k: (v if isinstance(v, (int, float, str)) and not isinstance(v, bool) else str(v))
                for k, v in flat_config.items()
            }
            self._vdl.add_hparams(hparams_dict=hp, metrics_list=metrics)

    def close(self) -> None:
        self._jsonl.close()
        if self._vdl is not None:
            self._vdl.close()


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def heatmap_image(share_LE: np.ndarray, cell: int = 12) -> np.ndarray:
    """[layers, experts] usage shares -> an RGB uint8 image (viridis), `cell` pixels per entry,
    each row scaled to its own maximum so every layer's pattern is visible."""
    from matplotlib import colormaps

    share = np.asarray(share_LE, dtype=np.float64)
    share = share / np.maximum(share.max(axis=1, keepdims=True), 1e-12)
    rgb = (colormaps["viridis"](share)[..., :3] * 255).astype(np.uint8)
    return np.repeat(np.repeat(rgb, cell, axis=0), cell, axis=1)

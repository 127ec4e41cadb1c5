"""`ernie5 eval`: load a run's model, evaluate it, write Markdown and JSON next to it."""

from __future__ import annotations

import json
import os

from .. import config as C
from ..io import checkpoint
from ..model.model import Ernie5Model
from .elastic_grid import markdown, run_grid
from .suite import TextEval, text_metrics


def load_model(path: str, log=print):
    """(config, model with weights) for a run, checkpoint or exported-model directory."""
    cfg_path, source = checkpoint.find_run(path)
    cfg = C.load_config(cfg_path)
    model = Ernie5Model(cfg.model)
    checkpoint.set_weights(
        model,
        checkpoint.load_model_weights(source, warn=log),
        f"the weights in {source}",
        f"; {cfg_path} holds another model (was a run directory reused?)",
    )
    model.eval()
    return cfg, model


def evaluate_run(
    path: str, elastic_grid: bool = False, compare: list[str] = (), max_batches: int = 0, log=print
):
    cfg, model = load_model(path, log)
    ev = TextEval(cfg, max_batches)
    out_dir = (
        path
        if os.path.isfile(os.path.join(path, "config.yaml"))
        else os.path.dirname(checkpoint.find_run(path)[0])
    )
    if elastic_grid:
        others = [(os.path.basename(os.path.normpath(p)), load_model(p, log)[1]) for p in compare]
        rows = run_grid(model, cfg, ev, others, log=log)
        report = markdown(rows, rows[0]["text/unigram_ppl"])
        name = "eval_elastic_grid"
    else:
        m = text_metrics(ev, model)
        rows = [m]
        report = (
            "| metric | value | baseline |\n|---|---:|---:|\n"
            f"| text perplexity (validation) | {m['text/ppl']:.2f} | "
            f"unigram {m['text/unigram_ppl']:.1f} |\n"
            f"| decode tokens/s (batch 1, greedy) | {m['decode/tokens_per_s']:.0f} | |\n"
        )
        if "audio" in cfg.model.modalities:  # ASR and TTS beside chance (audio.py)
            from .audio import audio_metrics, report_rows

            m.update(audio_metrics(cfg, model, ev.tokenizer, log))
            report += report_rows(m)
        if {"image", "video"} & set(cfg.model.modalities):  # vision beside chance (vision_eval.py)
            from . import vision_eval

            m.update(vision_eval.vision_metrics(cfg, model, ev.tokenizer, log=log))
            report += vision_eval.report_rows(m)
        if cfg.data.mixture.passkey > 0:  # passkey retrieval and long-text perplexity
            from . import long_context

            m.update(long_context.long_context_metrics(cfg, model, ev.tokenizer, log=log))
            report += long_context.report_rows(m)
        name = "eval"
    with open(os.path.join(out_dir, f"{name}.md"), "w", encoding="utf-8") as f:
        f.write(report)
    with open(os.path.join(out_dir, f"{name}.json"), "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=1)
    return rows, report


def routing_report(path: str, out_dir: str = "", max_batches: int = 4, log=print) -> str:
    """Run held-out data of every source through the model at `path`; write figures and
    report.md."""
    from ..data.text import get_text_tokenizer
    from .routing import (
        model_windows,
        multimodal_source_batches,
        text_source_batches,
        usage,
        write_report,
    )

    cfg, model = load_model(path, log)
    tokenizer = get_text_tokenizer(
        cfg.data.cache_dir, cfg.model.vocab_size, cfg.data.split_seed, cfg.data.val_fraction
    )
    sources = text_source_batches(cfg, tokenizer, max_batches)
    if cfg.data.mixture.enabled:
        sources.update(multimodal_source_batches(cfg, tokenizer, max_batches))
    usages = {name: usage(model, batches) for name, batches in sources.items()}
    out_dir = out_dir or os.path.join(
        os.path.dirname(checkpoint.find_run(path)[0]), "routing_report"
    )
    text = write_report(usages, [i for i, _ in model.moe_layers()], out_dir, model_windows(model))
    log(f"wrote {out_dir}/report.md and figures")
    return text

"""Decode speed and KV-cache size of a Decoupled-Head Attention model beside its source.

    python tools/bench_dha.py --source runs/pretrain_tiny --dha runs/dha_tiny_merged --threads 1

Both models decode the same random prompts greedily with `generate` (the fast loop, static KV
cache) in this one process, in interleaved rounds (benchlib.interleaved_median_ms: each round runs
every model once, so load from other processes spreads over them); a speed is new tokens of all
rows over the median time. The table gives, per batch size and prompt length, tokens/s of each
model, their ratio, and the KV cache per token (float32 keys and values of every layer, the cache
decoding holds) of each.
"""

from __future__ import annotations

import argparse
import os

from benchlib import interleaved_median_ms, load_eval_model


def kv_bytes_per_token(model_cfg, dtype_bytes: int = 4) -> int:
    a = model_cfg.attention
    return dtype_bytes * a.head_dim * a.kv_cache_heads(model_cfg.num_layers)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--source", required=True, help="the source run (or exported model)")
    ap.add_argument("--dha", required=True, help="the merged DHA model (convert-dha output)")
    ap.add_argument("--batch", type=int, action="append", help="batch sizes (default 1, 8)")
    ap.add_argument("--prompt", type=int, action="append", help="prompt lengths (default 16, 192)")
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per decode")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="0 = all cores")
    args = ap.parse_args()
    threads = args.threads or os.cpu_count() or 1
    os.environ["OMP_NUM_THREADS"] = str(threads)
    from paddle_ernie5.cpu import cpu_model_name

    print(f"cpu: {cpu_model_name() or 'unknown CPU'} ({os.cpu_count()} cores); threads {threads}")
    import warnings

    warnings.filterwarnings("ignore")
    import numpy as np

    from paddle_ernie5.model.generation import generate

    models = {
        "source": load_eval_model(args.source, "", []),
        "dha": load_eval_model(args.dha, "", []),
    }
    for name, (m, _) in models.items():
        a = m.attention
        heads = [a.computed_heads(i) for i in range(m.num_layers)]
        print(f"{name}: (key, value) heads per layer {heads}, {kv_bytes_per_token(m)} B/token")
    rng = np.random.default_rng(0)
    vocab = models["source"][0].vocab_size
    print(
        f"\ngreedy decode of {args.tokens} new tokens, median of {args.repeats} interleaved "
        "rounds\n\n| batch | prompt | source tok/s | DHA tok/s | DHA / source | KV B/token source "
        "| KV B/token DHA |\n|---:|---:|---:|---:|---:|---:|---:|"
    )
    for b in args.batch or [1, 8]:
        for p in args.prompt or [16, 192]:
            prompt = rng.integers(3, vocab, size=(b, p))
            runs = [
                lambda model=model, prompt=prompt: generate(
                    model, prompt, args.tokens, temperature=0.0
                )
                for _, model in models.values()
            ]
            src_ms, dha_ms = interleaved_median_ms(runs, args.repeats)
            src, dha = b * args.tokens / (src_ms / 1e3), b * args.tokens / (dha_ms / 1e3)
            print(
                f"| {b} | {p} | {src:.0f} | {dha:.0f} | {dha / src:.2f} | "
                f"{kv_bytes_per_token(models['source'][0])} | "
                f"{kv_bytes_per_token(models['dha'][0])} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Long-context inference side by side: full attention vs RRAttention block-sparse prefill, and NACL
KV-cache eviction vs a recent-window and a uniform-random baseline, on the built-in passkey task
(data/long_context.py) and long held-out text.

    python tools/bench_long_context.py --checkpoint runs/long_context_tiny --threads 2
    python tools/bench_long_context.py --checkpoint RUN --lengths 4096 --samples 4    # quick
    python tools/bench_long_context.py --checkpoint RUN --no-nacl --lengths 16384 --samples 16

Per length L (prompts of L positions, the needle at evenly spread depths):

  attention  full attention and RRAttention at each --taus value (same weights, model rebuilt with
             model.attention.sparse_prefill=rr), run in turn on each example (interleaved, so load
             from other processes spreads over all): median prefill seconds (the whole model's
             forward over the prompt), its ratio to full attention, the median selection
             seconds inside it (summed over the layers), the share of the causal 128 x 128 blocks
             computed, teacher-forced passkey accuracy (whole key; characters) and perplexity of
             --ppl-windows L-token windows of held-out text (seeded starts; all their tokens).
  KV cache   NACL at each --budgets value beside the recent window and a uniform random keep at the
             same budgets (budget 1 keeps everything): the KV cache after the prefill (MB, float32,
             all layers), greedy passkey accuracy of generation after the eviction, and decode
             tokens/s (--decode-tokens steps on the first example, the model forwards of the
             decode steps timed; median of --speed-repeats interleaved rounds).

Chance: whole key 10^-4, a character 0.1. The load average is printed beside the timings; compare
ratios within one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def _args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="run, checkpoint or exported-model dir")
    ap.add_argument("--lengths", default="4096,8192,16384,32768", help="prompt lengths")
    ap.add_argument("--samples", type=int, default=8, help="passkey examples per length")
    ap.add_argument("--taus", default="0.9,0.7", help="RRAttention tau values")
    ap.add_argument("--stride", type=int, default=0, help="rr_stride (0 = the run's)")
    ap.add_argument("--budgets", default="1,0.5,0.25", help="KV budgets")
    ap.add_argument("--decode-tokens", type=int, default=32, help="decode steps timed")
    ap.add_argument("--speed-repeats", type=int, default=3, help="decode timings per policy")
    ap.add_argument("--no-rr", action="store_true", help="skip the attention table")
    ap.add_argument("--no-nacl", action="store_true", help="skip the KV-cache table")
    ap.add_argument(
        "--ppl-windows", type=int, default=4, help="held-out text windows per perplexity"
    )
    ap.add_argument("--threads", type=int, default=0, help="0 = all cores")
    return ap.parse_args(argv)


def _loadavg() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def attention_rows(model, ev, length: int, n: int, taus, stride: int, windows: int = 1):
    from paddle_ernie5.eval import long_context as LC

    changes = {"rr_stride": stride} if stride else {}
    variants = [("full", model)] + [
        (f"rr tau={t:g}", LC.with_attention(model, sparse_prefill="rr", rr_tau=t, **changes))
        for t in taus
    ]
    examples = ev.examples(length, n)
    LC.prefill_answers(model, examples[0])  # warm-up (the op's first call, allocator)
    stats = {
        name: {"exact": 0, "chars": 0, "sec": [], "sel": [], "kept": 0, "total": 0}
        for name, _ in variants
    }
    for ex in examples:
        for name, m in variants:
            pred, sec = LC.prefill_answers(m, ex)
            st = LC.selection_stats(m)
            right = pred == ex.answer
            row = stats[name]
            row["exact"] += int(right.all())
            row["chars"] += int(right.sum())
            row["sec"].append(sec)
            row["sel"].append(st["select_s"])
            row["kept"] += st["blocks_kept"]
            row["total"] += st["blocks_total"]
    texts = [ev.text(length, w) for w in range(windows)]
    rows = []
    for name, m in variants:
        row = stats[name]
        sec = statistics.median(row["sec"])
        rows.append(
            {
                "variant": name,
                "prefill_s": sec,
                "select_s": statistics.median(row["sel"]),
                "density": row["kept"] / row["total"] if row["total"] else 1.0,
                "exact": row["exact"] / n,
                "chars": row["chars"] / (4 * n),
                "ppl": LC.pooled_perplexity(m, texts),
            }
        )
    full = rows[0]["prefill_s"]
    for r in rows:
        r["speedup"] = full / r["prefill_s"]
    return rows


def cache_rows(model, ev, length: int, n: int, budgets, decode_tokens: int, repeats: int):
    from paddle_ernie5.config import GenerateConfig
    from paddle_ernie5.eval import long_context as LC

    examples = ev.examples(length, n)
    prompt = len(examples[0].prompt)
    rows = []
    for budget in budgets:
        for policy in ("nacl", "recent", "random"):
            if budget >= 1 and policy != "nacl":
                continue
            settings = GenerateConfig(kv_budget=budget, kv_policy=policy)
            s = LC.generated_scores(model, examples, settings)
            rows.append(
                {
                    "policy": "full cache" if budget >= 1 else policy,
                    "budget": budget,
                    "settings": settings,
                    "kv_mb": LC.kv_cache_bytes(model.cfg, prompt, budget) / 2**20,
                    "exact": s["exact"],
                    "chars": s["chars"],
                    "speeds": [],
                }
            )
    for _ in range(repeats):  # interleaved rounds: load spreads over every policy
        for r in rows:
            r["speeds"].append(
                LC.decode_tokens_per_s(model, examples[0].prompt, r["settings"], decode_tokens)
            )
    for r in rows:
        r["decode_tok_s"] = statistics.median(r["speeds"])
    return rows


def print_attention(length: int, rows) -> None:
    print(f"\n### attention, {length} tokens ({_loadavg()})")
    print(
        "| variant | prefill s | speed-up | selection s | blocks computed | passkey exact "
        "| chars | perplexity | ppl vs full |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    ppl = rows[0]["ppl"]
    for r in rows:
        print(
            f"| {r['variant']} | {r['prefill_s']:.3f} | {r['speedup']:.2f}x | {r['select_s']:.3f} "
            f"| {100 * r['density']:.1f}% | {r['exact']:.3f} | {r['chars']:.3f} "
            f"| {r['ppl']:.3f} | {100 * (r['ppl'] / ppl - 1):+.2f}% |"
        )


def print_cache(length: int, rows) -> None:
    print(f"\n### KV cache after the prefill, {length} tokens ({_loadavg()})")
    print("| policy | budget | KV MB | passkey exact | chars | decode tok/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['policy']} | {r['budget']:g} | {r['kv_mb']:.2f} | {r['exact']:.3f} "
            f"| {r['chars']:.3f} | {r['decode_tok_s']:.1f} |"
        )


def main(argv=None) -> int:
    args = _args(argv)
    threads = args.threads or os.cpu_count() or 1
    os.environ["OMP_NUM_THREADS"] = str(threads)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from paddle_ernie5.cpu import cpu_model_name
    from paddle_ernie5.data.text import get_text_tokenizer
    from paddle_ernie5.eval import long_context as LC
    from paddle_ernie5.eval.runner import load_model

    cfg, model = load_model(args.checkpoint, log=lambda *_: None)
    tok = get_text_tokenizer(
        cfg.data.cache_dir, cfg.model.vocab_size, cfg.data.split_seed, cfg.data.val_fraction
    )
    ev = LC.LongContextEval(cfg, tok)
    lengths = [int(x) for x in args.lengths.split(",")]
    taus = [float(x) for x in args.taus.split(",")]
    budgets = [float(x) for x in args.budgets.split(",")]
    print(f"cpu: {cpu_model_name()} ({os.cpu_count()} logical cores); threads {threads}")
    print(f"checkpoint {args.checkpoint}; {args.samples} passkey examples per length; {_loadavg()}")
    att = cfg.model.attention
    print(
        f"rr: stride {args.stride or att.rr_stride}, block {att.rr_block}, mask heads "
        f"{att.rr_mask_heads}, sink blocks {att.rr_sink_blocks}"
    )
    for length in lengths:
        t0 = time.perf_counter()
        if not args.no_rr:
            print_attention(
                length,
                attention_rows(
                    model, ev, length, args.samples, taus, args.stride, args.ppl_windows
                ),
            )
        if not args.no_nacl:
            print_cache(
                length,
                cache_rows(
                    model, ev, length, args.samples, budgets, args.decode_tokens, args.speed_repeats
                ),
            )
        print(f"({length} tokens: {time.perf_counter() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

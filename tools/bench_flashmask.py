"""Benchmark: FlashMask CPU op vs Paddle dense-mask attention vs torch FlexAttention (forward).

    python tools/bench_flashmask.py                        # the full table (tens of minutes)
    python tools/bench_flashmask.py --sizes 1024,2048 --masks causal --kv-heads 8   # quick look
    python tools/bench_flashmask.py --block-density 0.5 --sizes 16384 --masks causal --kv-heads 2

--block-density P: the block-sparse section instead of the table. The same op runs with a block
mask that keeps every 128 x 128 block and with a random one that keeps a fraction P of them (per kv
head, fixed seed); it prints both times and their ratio, forward (and forward+backward unless
--no-backward), and the share of 64 x 64 tiles each computes.

Every implementation runs in this process with the same number of threads (--threads, set as
OMP_NUM_THREADS before Paddle and torch are imported, and torch.set_num_threads). Times are the
best of --repeats rounds after a warm-up round, the implementations interleaved within each round
(a single run when one run takes over 5 s). Peak memory is the rise of the process's peak RSS over
the call, the inputs excluded (the indices or the dense mask built inside). GFLOP/s counts the
FLOPs of the 64x64 tiles the op does not skip (4 S_tile D per tile and head forward, 3.5x that
forward+backward) and divides the same count by each implementation's time, so the numbers compare
useful work. Paddle's dense path (scaled_dot_product_attention with a boolean mask) is skipped
where its estimated memory exceeds the machine's available memory; FlexAttention (torch.compile,
CPU, forward only: it has no CPU backward) runs when torch is importable, with block-mask creation
and compilation timed apart.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import time

import numpy as np

MASKS = ("causal", "causal_document", "share_question", "sliding_window", "block_causal")
TILE = 64


def build_mask(name: str, s: int):
    """(indices [S, C], causal) for the benchmark's mask of length s."""
    from paddle_ernie5.ops import masks

    if name == "causal":
        return masks.causal(s), True
    if name == "causal_document":  # documents of S/16 .. 3S/16 tokens, about 8 of them
        rng = np.random.default_rng(0)
        lens = []
        while sum(lens) < s:
            lens.append(int(rng.integers(s // 16, 3 * s // 16 + 1)))
        lens[-1] -= sum(lens) - s
        return masks.causal_document([n for n in lens if n > 0], s), True
    if name == "share_question":  # a prompt of S/4 and three answers of S/4
        return masks.share_question(s // 4, [s // 4] * 3, s), True
    if name == "sliding_window":
        return masks.sliding_window(s, 1024), True
    if name == "block_causal":  # blocks of 512: bidirectional inside, causal across
        return masks.scale_block_causal([512] * (s // 512), s), False
    raise ValueError(f"unknown mask {name!r}; choose from {MASKS}")


def computed_tiles(idx: np.ndarray, causal: bool, sq: int) -> int:
    """Number of (64 x 64) tiles the op computes: the kernel's tile test, in numpy."""
    return int(tile_grid(idx, causal, sq).sum())


def tile_grid(idx: np.ndarray, causal: bool, sq: int) -> np.ndarray:
    """Boolean [query tiles, key tiles]: the (64 x 64) tiles the op computes."""
    sk, c = idx.shape
    full = np.full(sk, sq)
    zero = np.zeros(sk, dtype=np.int64)
    if causal:
        lts, lte, uts, ute = idx[:, 0], idx[:, 1] if c == 2 else full, zero, zero
    elif c == 2:
        lts, lte, uts, ute = idx[:, 0], full, zero, idx[:, 1]
    else:
        lts, lte, uts, ute = idx.T
    nkt = -(-sk // TILE)
    pad = nkt * TILE - sk
    cols = [
        np.concatenate([a, np.full(pad, f)]).reshape(nkt, TILE)
        for a, f in ((lts, 0), (lte, sq + TILE), (uts, 0), (ute, 0))
    ]
    lts_max, lte_min = cols[0].max(1), cols[1].min(1)
    uts_max, ute_min = cols[2].max(1), cols[3].min(1)
    r0 = np.arange(0, sq, TILE)[:, None]
    r1 = np.minimum(r0 + TILE, sq)
    j0 = (np.arange(nkt) * TILE)[None, :]
    skip = ((lts_max <= r0) & (lte_min >= r1)) | ((uts_max <= r0) & (ute_min >= r1))
    if causal:
        skip |= j0 > r1 - 1 + (sk - sq)
    return ~skip


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> float:
    """Reset the kernel's peak-RSS counter; returns the current RSS in MB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return peak_rss_mb()


def settle() -> None:
    # OpenMP workers of the previous implementation (Intel's spin 200 ms by default) would
    # compete for the cores: let them go idle first.
    time.sleep(0.3)


def time_once(fn) -> float:
    settle()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def best_times(calls: dict, repeats: int) -> dict:
    """Best time of each callable over `repeats` interleaved rounds after a warm-up round.

    Interleaving gives every implementation the same chances when other load comes and goes.
    Within a round each callable runs twice back to back and the second (warm) run is timed; a
    callable whose warm-up took over 5 s is not repeated (its warm-up time is kept)."""
    best = {name: time_once(fn) for name, fn in calls.items()}
    again = [name for name, t in best.items() if t <= 5.0]
    for name in again:
        best[name] = float("inf")
    for _ in range(repeats):
        for name in again:
            settle()
            calls[name]()
            start = time.perf_counter()
            calls[name]()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def memory_of(fn) -> float:
    settle()
    base = reset_peak_rss()
    fn()
    return peak_rss_mb() - base


def available_mb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable"):
                return int(line.split()[1]) / 1024
    return float("inf")


def matmul_gflops() -> float:
    import paddle

    a, b = paddle.randn([4096, 4096]), paddle.randn([4096, 4096])
    paddle.matmul(a, b)
    best = min(_time_once(lambda: paddle.matmul(a, b)) for _ in range(5))
    return 2 * 4096**3 / best / 1e9


def _time_once(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class Case:
    """Inputs of one (mask, S, Hk) configuration, shared by every implementation."""

    def __init__(self, mask: str, s: int, h: int, hk: int, d: int):
        import paddle

        self.mask, self.s, self.h, self.hk, self.d = mask, s, h, hk, d
        self.idx_np, self.causal = build_mask(mask, s)
        self.tiles = computed_tiles(self.idx_np, self.causal, s)
        self.fwd_flops = self.tiles * 4 * TILE * TILE * d * h
        rng = np.random.default_rng(0)

        def make(heads):
            return paddle.to_tensor(rng.standard_normal((1, s, heads, d), np.float32))

        self.q, self.k, self.v = make(h), make(hk), make(hk)
        self.dout = make(h)


def flashmask_call(case: Case, grad: bool, block_mask=None):
    import paddle

    from paddle_ernie5.ops import masks
    from paddle_ernie5.ops.flashmask import flashmask_attention

    blocks = None if block_mask is None else paddle.to_tensor(block_mask)

    def call():
        idx = paddle.to_tensor(masks.batched(case.idx_np))
        q, k, v = case.q, case.k, case.v
        if grad:
            q, k, v = (t.detach() for t in (q, k, v))
            for t in (q, k, v):
                t.stop_gradient = False
        out = flashmask_attention(
            q, k, v, idx, causal=case.causal, block_mask=blocks, backend="cpu"
        )
        if grad:
            paddle.grad([out], [q, k, v], grad_outputs=[case.dout])

    return call


def dense_estimate_mb(case: Case, measured: tuple[int, float] | None) -> float:
    """Peak MB of the dense path: a measured smaller size scaled by (S / s)^2, else ~6 S^2
    tensors."""
    if measured is not None:
        s, peak = measured
        return peak * (case.s / s) ** 2
    return 6 * case.h * case.s**2 * 4 / 2**20


def dense_call(case: Case, grad: bool):
    """Paddle's scaled_dot_product_attention with a dense boolean mask (built inside the call)."""
    import paddle
    import paddle.nn.functional as F

    from paddle_ernie5.ops import masks

    def call():
        mask = paddle.to_tensor(masks.to_dense(case.idx_np, case.causal)).reshape(
            [1, 1, case.s, case.s]
        )
        q, k, v = case.q, case.k, case.v
        if case.hk != case.h:
            k, v = (t.repeat_interleave(case.h // case.hk, axis=2) for t in (k, v))
        if grad:
            q, k, v = (t.detach() for t in (q, k, v))
            for t in (q, k, v):
                t.stop_gradient = False
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        if grad:
            paddle.grad([out], [q, k, v], grad_outputs=[case.dout])

    return call


def flex_call(case: Case, threads: int):
    """(forward callable, block-mask seconds, compile seconds) of torch FlexAttention (CPU)."""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    torch.set_num_threads(threads)
    idx = torch.from_numpy(case.idx_np.astype(np.int64))
    s, causal, c = case.s, case.causal, case.idx_np.shape[1]
    full = torch.full((s,), s)
    lts = idx[:, 0]
    lte = idx[:, 1] if (causal and c == 2) or (not causal and c == 4) else full
    uts = idx[:, 2] if c == 4 else torch.zeros(s, dtype=torch.int64)
    ute = idx[:, 3] if c == 4 else (idx[:, 1] if not causal else torch.zeros(s, dtype=torch.int64))
    # Inductor's CPU template wants the mask's captured tensors dense.
    lts, lte, uts, ute = (t.contiguous() for t in (lts, lte, uts, ute))

    def mask_mod(b, h, q_idx, kv_idx):
        masked = ((q_idx >= lts[kv_idx]) & (q_idx < lte[kv_idx])) | (
            (q_idx >= uts[kv_idx]) & (q_idx < ute[kv_idx])
        )
        if causal:
            masked = masked | (kv_idx > q_idx)
        return ~masked

    start = time.perf_counter()
    block_mask = create_block_mask(mask_mod, 1, 1, s, s, device="cpu")
    mask_seconds = time.perf_counter() - start

    def to_torch(t):
        return torch.from_numpy(t.numpy()).transpose(1, 2).contiguous()

    q, k, v = to_torch(case.q), to_torch(case.k), to_torch(case.v)
    compiled = torch.compile(flex_attention, dynamic=False)
    scale = case.d**-0.5

    def call():
        with torch.no_grad():
            compiled(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=case.hk != case.h)

    compile_seconds = time_once(call)
    return call, mask_seconds, compile_seconds


def random_block_mask(case: Case, density: float, seed: int = 0) -> np.ndarray:
    """int32 [1, Hk, ceil(S/128), ceil(S/128)] keeping each block with probability `density`."""
    nb = -(-case.s // 128)
    rng = np.random.default_rng(seed)
    return (rng.random((1, case.hk, nb, nb)) < density).astype(np.int32)


def block_tiles(case: Case, block_mask: np.ndarray) -> float:
    """Share of all (64 x 64) tiles of all heads that the op computes under `block_mask`."""
    grid = tile_grid(case.idx_np, case.causal, case.s)
    n = grid.shape[0]
    kept = np.repeat(np.repeat(block_mask[0], 2, axis=1), 2, axis=2)[:, :n, :n].astype(bool)
    return float((grid[None] & kept).sum()) / (case.hk * n * n)


def block_density_section(args) -> list[str]:
    """Times of the same op with every block kept and with a random `args.block_density` of them."""
    p = args.block_density
    backward = not args.no_backward
    lines = [
        f"block-sparse: threads={args.threads}, B=1, H={args.heads}, D={args.head_dim}, fp32, "
        f"random block mask keeping {p:.2f} of the 128 x 128 blocks (per kv head) vs all blocks; "
        f"best of {args.repeats}",
        "",
        "| mask | S | Hk | tiles % all | tiles % sparse | all fwd ms | sparse fwd ms | fwd ratio "
        "| all fwd+bwd ms | sparse fwd+bwd ms | fwd+bwd ratio |",
        "|---" * 11 + "|",
    ]
    print("\n".join(lines), flush=True)
    for mask in args.masks.split(","):
        for s in (int(x) for x in args.sizes.split(",")):
            for hk in (int(x) for x in args.kv_heads.split(",")):
                case = Case(mask, s, args.heads, hk, args.head_dim)
                ones = np.ones_like(random_block_mask(case, 1.0))
                sparse = random_block_mask(case, p)
                calls = {
                    "all_fwd": flashmask_call(case, False, ones),
                    "sparse_fwd": flashmask_call(case, False, sparse),
                }
                if backward:
                    calls["all_fb"] = flashmask_call(case, True, ones)
                    calls["sparse_fb"] = flashmask_call(case, True, sparse)
                t = best_times(calls, args.repeats)
                ms = {key: t[key] * 1e3 for key in t}
                row = [
                    mask,
                    s,
                    hk,
                    f"{100 * block_tiles(case, ones):.1f}",
                    f"{100 * block_tiles(case, sparse):.1f}",
                    fmt(ms["all_fwd"]),
                    fmt(ms["sparse_fwd"]),
                    fmt(ms["sparse_fwd"] / ms["all_fwd"], ".2f"),
                    fmt(ms.get("all_fb")),
                    fmt(ms.get("sparse_fb")),
                    fmt(ms["sparse_fb"] / ms["all_fb"] if backward else None, ".2f"),
                ]
                lines.append("| " + " | ".join(str(x) for x in row) + " |")
                print(lines[-1], flush=True)
    return lines


def fmt(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


def format_row(case: Case, ours, dense, dense_estimate, flex, matmul: float) -> str:
    """One markdown row; times in ms. A skipped dense run shows its estimated peak memory."""
    fwd, fb, mem = ours
    d_fwd, d_fb, d_mem = dense
    total_tiles = (-(-case.s // TILE)) ** 2
    gf = case.fwd_flops / fwd / 1e9

    def ms(t):
        return None if t is None else t * 1e3

    if d_mem is None and dense_estimate is not None:
        dense_mem = f"skipped (est. {dense_estimate:.0f})"
        mem_ratio = dense_estimate / max(mem, 1.0)
    else:
        dense_mem = fmt(d_mem, ".0f")
        mem_ratio = None if d_mem is None else d_mem / max(mem, 1.0)
    row = [
        case.mask,
        case.s,
        case.hk,
        f"{100 * case.tiles / total_tiles:.1f}",
        fmt(ms(fwd)),
        fmt(ms(fb)),
        f"{gf:.1f} ({100 * gf / matmul:.0f}%)",
        fmt(None if fb is None else 3.5 * case.fwd_flops / fb / 1e9),
        fmt(mem, ".0f"),
        fmt(ms(d_fwd)),
        fmt(ms(d_fb)),
        dense_mem,
        fmt(None if d_fb is None or fb is None else d_fb / fb),
        fmt(mem_ratio, ".0f"),
        fmt(ms(flex[2])),
        fmt(None if flex[2] is None else fwd / flex[2], ".2f"),
        fmt(None if flex[0] is None else flex[0] + flex[1]),
    ]
    return "| " + " | ".join(str(x) for x in row) + " |"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1024,2048,4096,8192,16384")
    p.add_argument("--masks", default=",".join(MASKS))
    p.add_argument("--kv-heads", default="8,2")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-backward", action="store_true", help="forward only")
    p.add_argument("--no-dense", action="store_true", help="skip Paddle's dense-mask attention")
    p.add_argument("--no-flex", action="store_true", help="skip torch FlexAttention")
    p.add_argument(
        "--flex-kv-heads",
        default="8",
        help="Hk values FlexAttention runs for (each size and mask costs a compilation)",
    )
    p.add_argument(
        "--block-density",
        type=float,
        help="run the block-sparse section: a random block mask keeping this fraction of blocks "
        "vs every block kept, through the same op",
    )
    p.add_argument("--output", help="also write the markdown table to this file")
    return p.parse_args(argv)


def return_freed_memory_to_os() -> None:
    # glibc keeps freed blocks below its (self-raising) mmap threshold; fix the threshold so large
    # buffers are unmapped on free and the peak-RSS counter sees each call's own allocations.
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB
    except OSError:
        pass


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # read by Paddle, torch and the op
    return_freed_memory_to_os()
    import paddle

    paddle.set_device("cpu")
    if args.block_density is not None:
        lines = block_density_section(args)
        if args.output:
            with open(args.output, "w") as f:
                f.write("\n".join(lines) + "\n")
        return 0
    try:
        import torch  # noqa: F401  (only probing whether torch is installed)

        have_torch = not args.no_flex
    except ImportError:
        have_torch = False
    sizes = [int(x) for x in args.sizes.split(",")]
    kv_heads = [int(x) for x in args.kv_heads.split(",")]
    flex_kv = {int(x) for x in args.flex_kv_heads.split(",")}
    backward = not args.no_backward

    mm = matmul_gflops()
    lines = [
        f"threads={args.threads}, B=1, H={args.heads}, D={args.head_dim}, fp32; "
        f"measured fp32 matmul (Paddle, 4096^3): {mm:.1f} GFLOP/s",
        "",
        "| mask | S | Hk | tiles % | op fwd ms | op fwd+bwd ms | op fwd GFLOP/s (% matmul) "
        "| op fwd+bwd GFLOP/s | op peak MB | dense fwd ms | dense fwd+bwd ms | dense peak MB "
        "| dense/op time | dense/op memory | flex fwd ms | op/flex fwd | flex mask+compile s |",
        "|---" * 17 + "|",
    ]
    print("\n".join(lines), flush=True)
    dense_seen: dict[tuple[str, int], tuple[int, float]] = {}
    for mask in args.masks.split(","):
        for s in sizes:
            for hk in kv_heads:
                case = Case(mask, s, args.heads, hk, args.head_dim)
                calls = {"op_fwd": flashmask_call(case, False)}
                if backward:
                    calls["op_fb"] = flashmask_call(case, True)
                estimate = None
                if not args.no_dense:
                    estimate = dense_estimate_mb(case, dense_seen.get((mask, hk)))
                    if 1.3 * estimate < available_mb():
                        estimate = None
                        calls["dense_fwd"] = dense_call(case, False)
                        if backward:
                            calls["dense_fb"] = dense_call(case, True)
                flex_setup = None
                if have_torch and hk in flex_kv:
                    calls["flex_fwd"], *flex_setup = flex_call(case, args.threads)
                t = best_times(calls, args.repeats)
                mem = memory_of(calls["op_fb" if backward else "op_fwd"])
                dense = (None, None, None)
                if "dense_fwd" in calls:
                    dense_mem = memory_of(calls["dense_fb" if backward else "dense_fwd"])
                    dense = (t["dense_fwd"], t.get("dense_fb"), dense_mem)
                    dense_seen[(mask, hk)] = (s, dense_mem)
                flex = (None, None, None)
                if flex_setup:
                    flex = (flex_setup[0], flex_setup[1], t["flex_fwd"])
                ours = (t["op_fwd"], t.get("op_fb"), mem)
                line = format_row(case, ours, dense, estimate, flex, mm)
                lines.append(line)
                print(line, flush=True)
    mm_end = matmul_gflops()
    lines.append("")
    lines.append(
        f"matmul GFLOP/s measured again at the end: {mm_end:.1f} (percentages above use "
        f"the first, {mm:.1f}); other load on the machine lowers both."
    )
    print(lines[-1])
    if args.output:
        with open(args.output, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    from paddle_ernie5.cpu import apply_mkl_fix  # before paddle loads (paddle_ernie5/cpu.py)

    print(apply_mkl_fix(), file=sys.stderr)
    sys.exit(main())

"""FlashMask attention: one entry point with Paddle's signature, several backends.

Shapes: query [B, Sq, H, D], key [B, Sk, Hk, D], value [B, Sk, Hv, D] (H a multiple of Hk and
of Hv; query head h reads key head h // (H / Hk) and value head h // (H / Hv)),
startend_row_indices [B, 1|Hk|H, Sk, C] int32 (format in masks.py), lse [B, H, Sq].

Differing key and value head counts (Decoupled-Head Attention, model/attention.py) reach the CPU op
and Paddle's kernel as G = lcm(Hk, Hv) heads of each (`expand_kv_heads`: key head i repeated G/Hk
times, value heads G/Hv times; a per-key-head mask repeated alike): query head h then reads
expanded head h // (H / G), which is a copy of its key head and of its value head, and the
gradients of the copies sum back onto each head through the repeat's backward. The reference
repeats both to H heads, as it does for GQA.

block_mask (optional, as Paddle's): [B, 1|Hk|H, ceil(Sq/128), ceil(Sk/128)] int32 or bool; entry
(b, h, i, j) nonzero keeps the 128 x 128 block of query rows 128i.. and key columns 128j.. for
query head h (one entry per kv head applies to each of its query heads), zero masks the whole
block on top of startend_row_indices. The CPU op skips the blocks that are not kept, forward and
backward. Paddle's GPU kernel further requires int32, block_mask.shape[1] equal to
startend_row_indices.shape[1] and head_dim 128; its own checks apply on the "paddle" backend.

Backends (`backend=`, from the model config):
  "cpu"        the C++ custom op in custom_ops/flashmask (fp32 math; fp16/bf16 inputs are cast)
  "paddle"     paddle.nn.functional.flashmask_attention (GPU build, fp16/bf16 tensors on a GPU)
  "reference"  flashmask_attention_reference below: dense, O(S^2) memory, exact
  "auto"       CPU tensors: "cpu". GPU tensors: "paddle" for float16/bfloat16 and "reference" for
               float32 (Paddle's kernel has no float32 variant and the CPU op cannot read GPU
               memory, so a float32 model on a GPU runs the dense reference: exact, O(S^2) memory)
A backend that cannot run the given call raises an error that says why.

Under `paddle.amp.auto_cast` on a GPU, float32 query/key/value are first cast to the autocast dtype,
as Paddle casts the inputs of its white-listed ops (its own `flash_attn` among them); "auto" then
resolves to Paddle's kernel. On the CPU nothing is cast: Paddle's CPU autocast keeps float32.
"""

from __future__ import annotations

import functools
import math

import paddle

BACKENDS = ("auto", "cpu", "reference", "paddle")
_FLOAT_DTYPES = (paddle.float32, paddle.float16, paddle.bfloat16)
_BLOCK = 128  # block_mask granularity fixed by Paddle's GPU kernel


_HALF = (paddle.float16, paddle.bfloat16)


def resolve(backend: str, on_gpu: bool, dtype, gpu_build: bool) -> str:
    """The concrete backend `backend` means for `dtype` tensors on a GPU (`on_gpu`) or on the CPU,
    with a CUDA build of Paddle (`gpu_build`) or not. Pure: the place and build are arguments.

    auto -> "cpu" for CPU tensors; for GPU tensors "paddle" (Paddle's flashmask_attention) when
    `dtype` is float16/bfloat16 and "reference" (the pure-Paddle dense reference) for float32. The
    CPU op never receives GPU tensors."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is unknown; choose one of {BACKENDS}")
    where = f"{dtype} tensors on {'a GPU' if on_gpu else 'the CPU'}"
    if backend == "auto":
        if not on_gpu:
            return "cpu"
        return "paddle" if dtype in _HALF else "reference"
    if backend == "paddle" and not (gpu_build and on_gpu and dtype in _HALF):
        raise RuntimeError(
            "attention backend 'paddle' needs a CUDA build of Paddle and float16/bfloat16 tensors "
            f"on a GPU (got {where}); use 'cpu' or 'auto' instead"
        )
    if backend == "cpu" and on_gpu:
        raise RuntimeError(
            f"attention backend 'cpu' needs CPU tensors (got {where}); use 'auto', 'paddle' "
            "(float16/bfloat16) or 'reference'"
        )
    return backend


def resolve_backend(backend: str, query) -> str:
    """The concrete backend that `backend` means for this query tensor (see `resolve`)."""
    return resolve(backend, query.place.is_gpu_place(), query.dtype, paddle.is_compiled_with_cuda())


def autocast_inputs(query, key, value):
    """query, key, value in the dtype `paddle.amp.auto_cast` computes in on a GPU (float32 tensors
    cast to it); unchanged on the CPU, outside auto_cast and for float16/bfloat16 inputs."""
    if (
        query.dtype != paddle.float32
        or not query.place.is_gpu_place()
        or not paddle.amp.is_autocast_enabled()
    ):
        return query, key, value
    dtype = paddle.amp.get_autocast_dtype()
    return tuple(t.astype(dtype) if t.dtype == paddle.float32 else t for t in (query, key, value))


def window_indices(window_size, batch: int, sq: int, sk: int, causal: bool):
    """startend_row_indices for Paddle's `window_size` argument (sliding-window attention)."""
    left, right = (window_size, window_size) if isinstance(window_size, int) else window_size
    cols = paddle.arange(sk, dtype="int32")
    lts = paddle.clip(cols + (left + 1), 0, sq)
    if causal:
        idx = lts.reshape([1, 1, sk, 1])
    else:
        ute = paddle.clip(cols - right, 0, sq)
        idx = paddle.stack([lts, ute], axis=-1).reshape([1, 1, sk, 2])
    return idx.expand([batch, 1, sk, idx.shape[-1]])


def default_indices(batch: int, sq: int, sk: int, causal: bool):
    """Indices that mask nothing (the causal flag still adds its triangle)."""
    if causal:
        return paddle.full([batch, 1, sk, 1], sq, dtype="int32")
    full = paddle.to_tensor([sq, 0], dtype="int32").reshape([1, 1, 1, 2])
    return full.expand([batch, 1, sk, 2])


def check_inputs(query, key, value, startend_row_indices, causal: bool) -> None:
    """Raise TypeError/ValueError for arguments the FlashMask format does not allow."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(
                f"flashmask_attention: {name} must be float32/float16/bfloat16, got {t.dtype}"
            )
        if len(t.shape) != 4:
            raise ValueError(
                f"flashmask_attention: {name} must be 4-D [B, S, heads, D], got shape {t.shape}"
            )
    b, sq, h, d = query.shape
    if list(key.shape[:2]) + key.shape[3:] != list(value.shape[:2]) + value.shape[3:]:
        raise ValueError(
            f"flashmask_attention: key {key.shape} and value {value.shape} differ in more than "
            "their head counts"
        )
    bk, sk, hk, dk = key.shape
    hv = value.shape[2]
    if bk != b or dk != d:
        raise ValueError(
            f"flashmask_attention: query {query.shape} and key {key.shape} disagree "
            "on batch size or head dim"
        )
    if hk == 0 or h % hk or hv == 0 or h % hv:
        raise ValueError(
            f"flashmask_attention: query heads ({h}) must be a multiple of key heads ({hk}) and "
            f"of value heads ({hv})"
        )
    if startend_row_indices is None:
        return
    idx = startend_row_indices
    if idx.dtype != paddle.int32:
        raise TypeError(f"flashmask_attention: startend_row_indices must be int32, got {idx.dtype}")
    if (
        len(idx.shape) != 4
        or idx.shape[0] != b
        or idx.shape[2] != sk
        or idx.shape[1] not in (1, hk, h)
    ):
        raise ValueError(
            f"flashmask_attention: startend_row_indices must be [B={b}, 1|{hk}|{h}, "
            f"Sk={sk}, C], got {idx.shape}"
        )
    c = idx.shape[3]
    allowed = (1, 2) if causal else (2, 4)
    if c not in allowed:
        raise ValueError(
            f"flashmask_attention: with causal={causal} the last dim of "
            f"startend_row_indices must be one of {allowed}, got {c}"
        )
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi > sq:
        raise ValueError(
            f"flashmask_attention: startend_row_indices must lie in [0, Sq={sq}], "
            f"got values in [{lo}, {hi}]"
        )


def check_block_mask(block_mask, query, key) -> None:
    """Raise TypeError/ValueError unless block_mask is [B, 1|Hk|H, ceil(Sq/128), ceil(Sk/128)]
    int32/bool."""
    b, sq, h = query.shape[:3]
    sk, hk = key.shape[1], key.shape[2]
    if block_mask.dtype not in (paddle.int32, paddle.bool):
        raise TypeError(
            f"flashmask_attention: block_mask must be int32 or bool, got {block_mask.dtype}"
        )
    nbq, nbk = -(-sq // _BLOCK), -(-sk // _BLOCK)
    shape = list(block_mask.shape)
    if len(shape) != 4 or shape[0] != b or shape[1] not in (1, hk, h) or shape[2:] != [nbq, nbk]:
        raise ValueError(
            f"flashmask_attention: block_mask must be [B={b}, 1|{hk}|{h}, "
            f"ceil(Sq/{_BLOCK})={nbq}, ceil(Sk/{_BLOCK})={nbk}], got {shape}"
        )


def _reject_rng_options(
    backend, dropout, training, return_seed_offset, fixed_seed_offset, rng_name
):
    if dropout and training:
        raise NotImplementedError(
            f"flashmask_attention: dropout={dropout} is only supported by "
            f"the 'paddle' GPU backend, not {backend!r}"
        )
    if return_seed_offset or fixed_seed_offset is not None or rng_name:
        raise NotImplementedError(
            "flashmask_attention: return_seed_offset, fixed_seed_offset and "
            f"rng_name belong to the GPU dropout RNG; backend {backend!r} "
            "has no dropout"
        )


def dense_allowed_mask(startend_row_indices, sq: int, sk: int, causal: bool):
    """Boolean [B, 1|Hk|H, Sq, Sk] mask: True where query row i may attend key column j."""
    idx = startend_row_indices.astype("int64")
    c = idx.shape[-1]
    rows = paddle.arange(sq, dtype="int64").reshape([1, 1, sq, 1])

    def col(t):
        return t.transpose([0, 1, 3, 2])  # [B, h, Sk, 1] -> [B, h, 1, Sk]

    if causal:
        lts = col(idx[..., 0:1])
        lte = col(idx[..., 1:2]) if c == 2 else paddle.full_like(lts, sq)
        masked = (rows >= lts) & (rows < lte)
    elif c == 2:
        masked = (rows >= col(idx[..., 0:1])) | (rows < col(idx[..., 1:2]))
    else:
        lt = (rows >= col(idx[..., 0:1])) & (rows < col(idx[..., 1:2]))
        ut = (rows >= col(idx[..., 2:3])) & (rows < col(idx[..., 3:4]))
        masked = lt | ut
    allowed = ~masked
    if causal:
        cols = paddle.arange(sk, dtype="int64").reshape([1, 1, 1, sk])
        allowed = allowed & (cols <= rows + (sk - sq))
    return allowed


def per_query_head(mask, h: int):
    """A [B, 1|Hk|H, ...] boolean mask with its head axis broadcastable to H query heads (a mask
    per kv head repeated over the query heads of its group)."""
    if mask.shape[1] in (1, h):
        return mask
    return mask.astype("int32").repeat_interleave(h // mask.shape[1], axis=1).astype("bool")


def flashmask_attention_reference(
    query,
    key,
    value,
    startend_row_indices=None,
    *,
    dropout=0.0,
    causal=False,
    window_size=None,
    return_softmax_lse=False,
    return_seed_offset=False,
    fixed_seed_offset=None,
    rng_name="",
    training=True,
    name=None,
    softmax_scale=None,
    block_mask=None,
):
    """Dense pure-Paddle reference: O(S^2) memory, exact semantics, differentiable."""
    _reject_rng_options(
        "reference", dropout, training, return_seed_offset, fixed_seed_offset, rng_name
    )
    b, sq, h, d = query.shape
    sk, hk = key.shape[1], key.shape[2]
    if window_size is not None:
        if startend_row_indices is not None:
            raise ValueError(
                "flashmask_attention: window_size and startend_row_indices are exclusive"
            )
        startend_row_indices = window_indices(window_size, b, sq, sk, causal)
    check_inputs(query, key, value, startend_row_indices, causal)
    scale = softmax_scale if softmax_scale is not None else d**-0.5
    q = query.astype("float32").transpose([0, 2, 1, 3])
    k = key.astype("float32").transpose([0, 2, 1, 3])
    v = value.astype("float32").transpose([0, 2, 1, 3])
    if hk != h:
        k = k.repeat_interleave(h // hk, axis=1)
    if value.shape[2] != h:
        v = v.repeat_interleave(h // value.shape[2], axis=1)
    scores = paddle.matmul(q, k, transpose_y=True) * scale
    if startend_row_indices is None:
        startend_row_indices = default_indices(b, sq, sk, causal)
    allowed = per_query_head(dense_allowed_mask(startend_row_indices, sq, sk, causal), h)
    if block_mask is not None:
        check_block_mask(block_mask, query, key)
        blocks = block_mask.astype("int32").repeat_interleave(_BLOCK, axis=2)
        blocks = blocks.repeat_interleave(_BLOCK, axis=3)[:, :, :sq, :sk]
        allowed = allowed & per_query_head(blocks.astype("bool"), h)
    scores = paddle.where(allowed, scores, paddle.full_like(scores, float("-inf")))
    row_max = scores.max(axis=-1, keepdim=True)
    row_max = paddle.where(paddle.isfinite(row_max), row_max, paddle.zeros_like(row_max)).detach()
    # where() again after exp: Paddle's CPU exp clamps its input, so exp(-inf) is not exactly 0.
    p = paddle.where(allowed, paddle.exp(scores - row_max), paddle.zeros_like(scores))
    denom = p.sum(axis=-1, keepdim=True)
    probs = p / paddle.where(denom > 0, denom, paddle.ones_like(denom))
    out = paddle.matmul(probs, v).astype(query.dtype).transpose([0, 2, 1, 3])
    if not return_softmax_lse:
        return out
    lse = (row_max + paddle.log(denom)).squeeze(-1)
    lse = paddle.where(denom.squeeze(-1) > 0, lse, paddle.full_like(lse, float("inf")))
    return out, lse


def expand_kv_heads(key, value, startend_row_indices=None, block_mask=None):
    """(key, value, startend_row_indices, block_mask) with key and value both at G = lcm(Hk, Hv)
    heads (each head repeated in place) and a per-key-head mask or block mask repeated to G alike;
    unchanged when Hk == Hv."""
    hk, hv = key.shape[2], value.shape[2]
    if hk == hv:
        return key, value, startend_row_indices, block_mask
    g = math.lcm(hk, hv)

    def grow(t, heads, axis):
        return (
            t
            if t is None or t.shape[axis] != heads or g == heads
            else (t.repeat_interleave(g // heads, axis=axis))
        )

    return (
        grow(key, hk, 2),
        grow(value, hv, 2),
        grow(startend_row_indices, hk, 1),
        grow(block_mask, hk, 1),
    )


@functools.lru_cache(maxsize=1)
def _cpu_op():
    # Imported lazily: loading registers the op with Paddle and may build it on first use.
    from paddle_ernie5.ops import build

    return build.load(auto_build=True)


def _flashmask_cpu(
    query, key, value, startend_row_indices, causal, softmax_scale, return_softmax_lse, block_mask
):
    b, sq, h, d = query.shape
    sk = key.shape[1]
    idx = startend_row_indices
    if idx is None:
        idx = default_indices(b, sq, sk, causal)
    scale = float(softmax_scale) if softmax_scale is not None else d**-0.5
    dtype = query.dtype
    tensors = []
    for t in (query, key, value, idx):
        if t.dtype in (paddle.float16, paddle.bfloat16):
            t = t.astype("float32")
        tensors.append(t if t.is_contiguous() else t.contiguous())
    if block_mask is not None:
        if block_mask.dtype != paddle.int32:
            block_mask = block_mask.astype("int32")
        elif not block_mask.is_contiguous():
            block_mask = block_mask.contiguous()
    out, lse = _cpu_op().flashmask_cpu(*tensors, block_mask, bool(causal), scale)
    if dtype != paddle.float32:
        out = out.astype(dtype)
    return (out, lse) if return_softmax_lse else out


def flashmask_attention(
    query,
    key,
    value,
    startend_row_indices=None,
    *,
    dropout=0.0,
    causal=False,
    window_size=None,
    return_softmax_lse=False,
    return_seed_offset=False,
    fixed_seed_offset=None,
    rng_name="",
    training=True,
    name=None,
    softmax_scale=None,
    block_mask=None,
    backend="auto",
):
    """FlashMask attention with `paddle.nn.functional.flashmask_attention`'s signature.

    Returns out, or (out, lse) with return_softmax_lse; on the "cpu" backend both are
    differentiable."""
    query, key, value = autocast_inputs(query, key, value)
    chosen = resolve_backend(backend, query)
    if chosen == "paddle":
        if key.shape[2] != value.shape[2]:
            check_inputs(query, key, value, startend_row_indices, causal)
            key, value, startend_row_indices, block_mask = expand_kv_heads(
                key, value, startend_row_indices, block_mask
            )
        if softmax_scale is not None and softmax_scale == query.shape[-1] ** -0.5:
            softmax_scale = None  # the default; Paddle's FA2 path rejects an explicit scale
        return paddle.nn.functional.flashmask_attention(
            query,
            key,
            value,
            startend_row_indices,
            dropout=dropout,
            causal=causal,
            window_size=window_size,
            return_softmax_lse=return_softmax_lse,
            return_seed_offset=return_seed_offset,
            fixed_seed_offset=fixed_seed_offset,
            rng_name=rng_name,
            training=training,
            name=name,
            softmax_scale=softmax_scale,
            block_mask=block_mask,
        )
    if chosen == "reference":
        return flashmask_attention_reference(
            query,
            key,
            value,
            startend_row_indices,
            dropout=dropout,
            causal=causal,
            window_size=window_size,
            return_softmax_lse=return_softmax_lse,
            return_seed_offset=return_seed_offset,
            fixed_seed_offset=fixed_seed_offset,
            rng_name=rng_name,
            training=training,
            softmax_scale=softmax_scale,
            block_mask=block_mask,
        )
    _reject_rng_options("cpu", dropout, training, return_seed_offset, fixed_seed_offset, rng_name)
    if window_size is not None:
        if startend_row_indices is not None:
            raise ValueError(
                "flashmask_attention: window_size and startend_row_indices are exclusive"
            )
        b, sq = query.shape[:2]
        startend_row_indices = window_indices(window_size, b, sq, key.shape[1], causal)
    check_inputs(query, key, value, startend_row_indices, causal)
    if block_mask is not None:
        check_block_mask(block_mask, query, key)
    key, value, startend_row_indices, block_mask = expand_kv_heads(
        key, value, startend_row_indices, block_mask
    )
    return _flashmask_cpu(
        query,
        key,
        value,
        startend_row_indices,
        causal,
        softmax_scale,
        return_softmax_lse,
        block_mask,
    )

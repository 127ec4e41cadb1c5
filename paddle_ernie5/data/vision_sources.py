"""Vision sources of the pretraining mixture: image_gen, image_qa, video_gen, video_qa.

The built-in digits (data/digits.py) are coded once by the frozen visual tokenizer
(model.vision.tokenizer_dir) and cached in data.cache_dir under the hash of the tokenizer's files,
so training never runs the tokenizer; the cache carries its format and checksum (io/cache.py), and
a damaged or stale one is rebuilt with one line on stderr. Per sample the cache holds the bit tokens
of every frame (signs, int8) and the pre-quantisation features (float16).

Documents (positions in brackets are one attention block; t/h/w from model/vision.py):

    image_gen   <bos> caption <boi> [scale 0] [scale 1] ... [scale n-1] <eoi>
    video_gen   <bos> caption <bov> [f0 s0] [f0 s1] [f0 s2] [f1 s0] ... <eov>
    image_qa    <bos> <boi> [merged patches] <eoi> (question answer)+ <eos>
    video_qa    <bos> <bov> [merged patches] <eov> (question answer)+ <eos>
                (QA: loss on the answers and <eos>)

The caption is the only text with a loss in the generation documents besides the <boi>/<bov> that
follows it; with probability cond_drop_prob it is dropped (unconditional rows for guidance). Images
of held-out (digit, colour, background) combinations never appear in image_gen training: the judged
text-to-image accuracy is measured on their captions. Video: in training each earlier frame is
hidden from the later ones with probability frame_mask_prob, and a frame never sees more than
temporal_window earlier frames (Segment.horizon).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np

from ..config import SPECIAL_TOKENS, Config, VisionModelConfig
from ..io import cache
from ..model.vision import (
    FEATURE_KEY,
    IMAGE_ID,
    PATCH_INDEX_KEY,
    VIDEO_ID,
    caption_row,
    generation_positions,
    history_bits,
    previous_frame_context,
    span_extent,
)
from .digits import (
    PALETTE,
    digit_images,
    digit_videos,
    image_caption,
    image_questions,
    video_caption,
    video_questions,
)
from .mixture import MixtureContext, register_source
from .multimodal import Segment, text_segment
from .packing import IGNORE

CACHE_VERSION = 2  # the cache file format (io/cache.py); bump when the encoding changes
DELIMITERS = {"image": ("<boi>", "<eoi>"), "video": ("<bov>", "<eov>")}


# ------------------------------------------------------------------------------ encoded data set


@dataclass(frozen=True)
class EncodedSet:
    tokens: np.ndarray  # int8 [N, T, tokens per frame, bits] in {-1, +1}, scale order
    feats: np.ndarray  # float16 [N, T, K, h, w] pre-quantisation features
    labels: dict  # digit, fg, bg (+ direction, speed in pixels per frame for videos)

    def __len__(self) -> int:
        return len(self.tokens)


def tokenizer_fingerprint(path: str) -> str:
    """Hash of a tokenizer checkpoint's files (weights and config)."""
    if os.path.isdir(os.path.join(path, "tokenizer")):
        path = os.path.join(path, "tokenizer")
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        try:
            with open(os.path.join(path, name), "rb") as f:
                h.update(f.read())
        except OSError as e:
            from ..errors import UserError

            raise UserError(
                f"model.vision.tokenizer_dir={path!r} holds no readable visual tokenizer ({e}); "
                "train one with `ernie5 train recipes/visual_tokenizer.yaml` or fix the path"
            ) from None
    return h.hexdigest()[:16]


def load_visual_tokenizer(vcfg: VisionModelConfig):
    from ..errors import UserError
    from ..tokenizers.visual import VisualTokenizer

    try:
        tok = VisualTokenizer.load(vcfg.tokenizer_dir)
    except (OSError, ValueError) as e:
        raise UserError(f"model.vision.tokenizer_dir={vcfg.tokenizer_dir!r}: {e}") from None
    if tok.cfg.bits != vcfg.bits or tuple(tok.cfg.scales) != tuple(vcfg.scales):
        raise UserError(
            f"model.vision (bits={vcfg.bits}, scales={list(vcfg.scales)}) does not match the "
            f"tokenizer at {vcfg.tokenizer_dir} (bits={tok.cfg.bits}, "
            f"scales={list(tok.cfg.scales)}); set model.vision.bits/scales to its values"
        )
    return tok


def encode_frames(tok, pixels: np.ndarray, num_scales: int, batch: int = 128):
    """pixels [N, T, 3, H, W] -> (tokens int8 [N, T, tokens per frame, bits], feats float16)."""
    import paddle

    tokens, feats = [], []
    with paddle.no_grad():
        for i in range(0, len(pixels), batch):
            f, codes = tok.encode(pixels[i : i + batch])
            codes = codes[:num_scales]
            n, t = codes[0].shape[:2]
            flat = [c.reshape([n, t, -1, c.shape[-1]]) for c in codes]
            tokens.append(paddle.concat(flat, axis=2).numpy().astype(np.int8))
            feats.append(f.numpy().astype(np.float16))
    return np.concatenate(tokens), np.concatenate(feats)


def _digit_pixels(cfg: Config, kind: str, split: str, size: int, centred: bool = False):
    """(the built-in digit set, its frames [N, T, 3, H, W]) of `kind` and `split`: the pictures
    encoded_digits codes, in its order (training images twice, with other random placements);
    `centred`: clips rolled by centre_clips."""
    if kind == "image":
        copies = 2 if split == "train" else 1
        data = digit_images(split, size=size, cache_dir=cfg.data.cache_dir, copies=copies)
        return data, data.pixels[:, None]
    data = digit_videos(split, size=size, cache_dir=cfg.data.cache_dir)
    if centred:
        return data, centre_clips(data.pixels, data.labels["fg"], data.labels["bg"])
    return data, data.pixels


def centre_clips(pixels: np.ndarray, fg: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """Clips [N, T, 3, H, W] rolled (all frames alike; the built-in clips wrap round the edges, so
    a roll is another clip of the same motion) so that the digit's ink centroid in the first frame
    lies at the frame's centre. The centroid is the circular mean of the ink along each axis."""
    ink = ink_maps(pixels[:, :1], fg, bg)[:, 0]  # [N, H, W]
    out = np.empty_like(pixels)
    for i, a in enumerate(ink):
        shift = []
        for profile in (a.sum(1), a.sum(0)):  # rows, then columns
            n = len(profile)
            angle = 2 * np.pi * np.arange(n) / n
            mean = np.arctan2((profile * np.sin(angle)).sum(), (profile * np.cos(angle)).sum())
            shift.append(int(np.round((n - 1) / 2 - mean * n / (2 * np.pi))) % n)
        out[i] = np.roll(pixels[i], shift, axis=(-2, -1))
    return out


def encoded_digits(
    cfg: Config, kind: str, split: str, tok=None, centred: bool = False
) -> EncodedSet:
    """The digits of `kind` (image | video) and `split` (train | heldout), coded by the tokenizer at
    model.vision.tokenizer_dir; built once and cached under the tokenizer's fingerprint.
    `centred` (clips only): the clips rolled by centre_clips (model.vision.centre_clips)."""
    v = cfg.model.vision
    tag = f"{kind}_{split}"
    if kind == "video":
        qa = "" if v.qa_frames == v.video_frames else f"_q{v.qa_frames}"
        tag += f"_f{v.video_frames}{qa}_s{v.video_scales}" + ("_centred" if centred else "")
    path = os.path.join(
        cfg.data.cache_dir,
        f"vision_v{CACHE_VERSION}_{tokenizer_fingerprint(v.tokenizer_dir)}_{tag}.npz",
    )
    arrays = cache.load(path, CACHE_VERSION, "encoded digits")
    if arrays is None:
        tok = tok or load_visual_tokenizer(v)
        data, pixels = _digit_pixels(cfg, kind, split, tok.cfg.image_size, centred)
        if kind == "image":
            scales = len(v.scales)
        else:
            pixels, scales = pixels[:, : max(v.video_frames, v.qa_frames)], v.video_scales
        tokens, feats = encode_frames(tok, pixels, scales)
        if kind == "video":  # the tokenizer is causal in time: a prefix codes as it would alone
            tokens, feats = tokens[:, : v.video_frames], feats[:, : v.qa_frames]
        arrays = {
            "tokens": tokens,
            "feats": feats,
            **{f"label_{k}": x for k, x in data.labels.items()},
        }
        cache.save(path, arrays, CACHE_VERSION)
    labels = {k[6:]: arrays[k].astype(np.int64) for k in arrays if k.startswith("label_")}
    return EncodedSet(arrays["tokens"], arrays["feats"], labels)


def ink_maps(pixels: np.ndarray, fg: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """Share of every pixel the digit covers, [N, T, H, W] in [0, 1], from frames [N, T, 3, H, W]
    in [0, 1] painted as ink * fg + (1 - ink) * bg (data/digits.py) and their colour labels."""
    f = PALETTE[fg][:, None, :, None, None]
    b = PALETTE[bg][:, None, :, None, None]
    ink = ((pixels.astype(np.float32) - b) * (f - b)).sum(2) / ((f - b) ** 2).sum(2)
    return np.clip(ink, 0.0, 1.0)


def cell_shares(ink_NTHW: np.ndarray, scales) -> np.ndarray:
    """Mean ink of every cell of every scale, [N, T, tokens per frame] in scale order, row-major
    (the order of a frame's generation positions)."""
    n, t, h, w = ink_NTHW.shape
    out = []
    for s in scales:
        cells = ink_NTHW.reshape(n, t, s, h // s, s, w // s).mean(axis=(3, 5))
        out.append(cells.reshape(n, t, s * s))
    return np.concatenate(out, axis=-1).astype(np.float32)


def is_heldout_combo(digit: int, fg: int, bg: int, fraction: float) -> bool:
    """Stable split of (digit, colour, background) combinations by hash."""
    h = hashlib.blake2b(f"{digit}-{fg}-{bg}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2.0**64 < fraction


def caption_of(kind: str, labels: dict, i: int) -> str:
    l = {k: int(x[i]) for k, x in labels.items()}
    if kind == "image":
        return image_caption(l["digit"], l["fg"], l["bg"])
    return video_caption(l["digit"], l["fg"], l["bg"], l["direction"], l["speed"])


def questions_of(kind: str, labels: dict, i: int) -> list[tuple[str, str]]:
    l = {k: int(x[i]) for k, x in labels.items()}
    if kind == "image":
        return image_questions(l["digit"], l["fg"], l["bg"])
    return video_questions(l["digit"], l["fg"], l["bg"], l["direction"], l["speed"])


# ------------------------------------------------------------------------------ segments


def generation_segment(
    tokens_TNb: np.ndarray,
    v: VisionModelConfig,
    kind: str,
    start: int,
    rng: np.random.Generator | None = None,
    shape_TN: np.ndarray | None = None,
    caption_classes: tuple[int, int] | None = None,
    caption_ids: list[int] | None = None,
) -> Segment:
    """The bit tokens of one image or clip as generation positions; `rng` (training) draws the
    random masking of historical frames; `shape_TN` (cell_shares of the picture) adds the targets
    of the shape head (model.vision.shape_loss_weight); `caption_classes` (digit, direction; -1 =
    none) those of the caption heads (caption_loss_weight); `caption_ids` the pooled caption
    (caption_pooling)."""
    frames, per_frame, _ = tokens_TNb.shape
    scales = v.scales if kind == "image" else v.scales[: v.video_scales]
    n_scales = len(scales)
    tokens = tokens_TNb.astype(np.float32)
    k = np.concatenate([np.full(s * s, i) for i, s in enumerate(scales)])
    blocks = (np.arange(frames)[:, None] * n_scales + k[None]).reshape(-1)
    extras = {
        "vis_in": history_bits(tokens, scales).reshape(frames * per_frame, -1),
        "vis_target": tokens.reshape(frames * per_frame, -1),
        "vis_scale": np.tile(k + 1, frames).astype(np.int64),
    }
    if v.cell_embedding:
        extras["vis_cell"] = np.arange(frames * per_frame, dtype=np.int64)
    if shape_TN is not None:
        extras["vis_shape"] = np.asarray(shape_TN, np.float32).reshape(frames * per_frame)
    if v.caption_pooling:
        extras["vis_prompt"] = np.tile(
            caption_row(caption_ids or [], v.caption_pooling), (frames * per_frame, 1)
        )
    if caption_classes is not None:  # stored + 1: 0 (also the padding) = no target
        extras["vis_caption"] = np.tile(
            np.asarray(caption_classes, np.int64) + 1, (len(k) * frames, 1)
        )
    horizon = None
    masked = np.zeros(frames, bool)
    if frames > 1:
        frame_start = np.arange(frames) * per_frame
        h = np.full(frames, -1, np.int64)
        if v.temporal_window:
            later = np.arange(frames) + v.temporal_window + 1
            h = np.where(later < frames, later * per_frame, -1)
        if rng is not None and v.frame_mask_prob > 0:
            masked = rng.random(frames) < v.frame_mask_prob
            masked[-1] = False
            h = np.where(masked, frame_start + per_frame, h)
        horizon = np.repeat(h, per_frame)
    if v.temporal_context and kind == "video":
        prev = previous_frame_context(tokens, scales, v.temporal_context)
        # a frame hidden from the later ones is hidden from the next one's context too
        prev[1:][masked[:-1]] = 0.0
        extras["vis_prev"] = prev.reshape(frames * per_frame, -1)
    type_id = IMAGE_ID if kind == "image" else VIDEO_ID
    return Segment(
        np.full(frames * per_frame, type_id, np.int64),
        generation_positions(scales, v.scales[-1], frames, start),
        blocks=blocks,
        extras=extras,
        horizon=horizon,
    )


def merged_segment(feats_TKhw: np.ndarray, v: VisionModelConfig, kind: str, start: int) -> Segment:
    """Pre-quantisation features cut into patch groups (merge x merge cells, and merge_frames frames
    for video), one bidirectional block; each group becomes one token through the patch merger."""
    f = feats_TKhw.astype(np.float32)
    T, K, h, w = f.shape
    m, mt = v.merge, (1 if kind == "image" else v.merge_frames)
    if T % mt:
        raise ValueError(f"{T} frames do not split into groups of merge_frames={mt}")
    g = f.reshape(T // mt, mt, K, h // m, m, w // m, m).transpose(0, 3, 5, 1, 4, 6, 2)
    groups = g.reshape(-1, mt * m * m, K)  # [(T/mt) * (h/m) * (w/m), G, K]
    if (v.merger_position or v.merger_place_projection) and len(groups) > v.merged_places(kind):
        raise ValueError(
            f"a {kind} of {T} frames x {h}x{w} cells holds {len(groups)} merged groups, more "
            f"than the {v.merged_places(kind)} that model.vision (scales, video_frames, merge) "
            "describes; code pictures with the tokenizer the model was built for"
        )
    nt, ny, nx = T // mt, h // m, w // m
    centre = 2 * m * np.arange(ny) + m - 1  # group centre in doubled latent units
    t = np.repeat(np.arange(nt), ny * nx)
    y = np.tile(np.repeat(centre, nx), nt)
    x = np.tile(np.tile(2 * m * np.arange(nx) + m - 1, ny), nt)
    n = len(groups)
    type_id = IMAGE_ID if kind == "image" else VIDEO_ID
    return Segment(
        np.full(n, type_id, np.int64),
        np.stack([start + t, start + y, start + x]).astype(np.int64),
        blocks=np.zeros(n, np.int64),
        extras={FEATURE_KEY[kind]: groups, PATCH_INDEX_KEY: np.arange(n, dtype=np.int64)},
    )


def generation_prompt(ctx_ids: list[int], bos: int, open_id: int) -> list[int]:
    """<bos> caption <boi|bov>: what generation is conditioned on."""
    return [bos, *ctx_ids, open_id]


def generation_document(
    caption_ids: list[int],
    tokens_TNb: np.ndarray,
    v: VisionModelConfig,
    kind: str,
    ids: dict,
    rng: np.random.Generator | None = None,
    shape_TN: np.ndarray | None = None,
    caption_classes: tuple[int, int] | None = None,
) -> list[Segment]:
    prompt = generation_prompt(caption_ids, ids["bos"], ids[DELIMITERS[kind][0]])
    start = len(prompt)
    seg = generation_segment(
        tokens_TNb, v, kind, start, rng, shape_TN, caption_classes, caption_ids
    )
    end = start + span_extent(tokens_TNb.shape[0], v.scales[-1])
    return [text_segment(prompt), seg, text_segment([ids[DELIMITERS[kind][1]]], end)]


def qa_document(
    feats_TKhw: np.ndarray,
    question_ids: list[int],
    answer_ids: list[int],
    v: VisionModelConfig,
    kind: str,
    ids: dict,
    earlier: list[tuple[list[int], list[int]]] = (),
) -> list[Segment]:
    """<bos> <boi> [patches] <eoi> (q a)* question answer <eos>; only answers and <eos> are targets.
    `earlier`: question/answer pairs about the same picture asked first."""
    open_id, close_id = (ids[d] for d in DELIMITERS[kind])
    seg = merged_segment(feats_TKhw, v, kind, 2)
    end = 2 + span_extent(feats_TKhw.shape[0], v.scales[-1])
    tokens, target = [close_id], [False]
    for q, a in [*earlier, (question_ids, answer_ids)]:
        tokens += [*q, *a]
        target += [False] * len(q) + [True] * len(a)
    tokens.append(ids["eos"])
    target.append(True)
    tail = text_segment(tokens, end)
    tail.labels[:-1] = np.where(target[1:], tail.labels[:-1], IGNORE)
    head = text_segment([ids["bos"], open_id])
    head.labels[:] = IGNORE
    return [head, seg, tail]


def qa_prompt(
    feats_TKhw: np.ndarray, question_ids: list[int], v: VisionModelConfig, kind: str, ids: dict
) -> list[Segment]:
    """<bos> <boi> [patches] <eoi> question: the head of a QA document, what an answer continues
    (positions and mask exactly as in qa_document)."""
    head, seg, tail = qa_document(feats_TKhw, question_ids, [], v, kind, ids)
    return [head, seg, text_segment(tail.input_ids[:-1], int(tail.positions[0, 0]))]  # drop <eos>


def special_ids(vocab_size: int, tokenizer) -> dict:
    """Ids of the visual delimiters (after the text vocabulary, config.SPECIAL_TOKENS), <bos> and
    <eos>."""
    out = {
        name: vocab_size + SPECIAL_TOKENS.index(name)
        for pair in DELIMITERS.values()
        for name in pair
    }
    out.update(bos=tokenizer.bos_id, eos=tokenizer.eos_id)
    return out


# ------------------------------------------------------------------------------ sources


def _split(ctx: MixtureContext) -> str:
    return "train" if ctx.split == "train" else "heldout"


def _encoded(ctx: MixtureContext, kind: str, centred: bool = False) -> EncodedSet:
    key = ("vision", kind, _split(ctx), centred)
    if key not in ctx.cache:
        ctx.cache[key] = encoded_digits(ctx.cfg, kind, _split(ctx), centred=centred)
    return ctx.cache[key]


def _shape_targets(ctx: MixtureContext, kind: str, centred: bool = False) -> np.ndarray:
    """cell_shares of every picture of the encoded split, in its order (the pictures that
    encoded_digits codes)."""
    key = ("vision_shape", kind, _split(ctx), centred)
    if key not in ctx.cache:
        v = ctx.cfg.model.vision
        size = load_visual_tokenizer(v).cfg.image_size
        data, pixels = _digit_pixels(ctx.cfg, kind, _split(ctx), size, centred)
        if kind == "image":
            scales = v.scales
        else:
            pixels, scales = pixels[:, : v.video_frames], v.scales[: v.video_scales]
        ink = ink_maps(pixels, data.labels["fg"], data.labels["bg"])
        ctx.cache[key] = cell_shares(ink, scales)
    return ctx.cache[key]


class _VisionSource:
    """What every vision source holds: the vision config, the encoded split, the delimiter ids."""

    kind = "image"
    generates = False

    def __init__(self, ctx: MixtureContext):
        self.v = ctx.cfg.model.vision
        self.centred = self.generates and self.kind == "video" and self.v.centre_clips
        self.data = _encoded(ctx, self.kind, self.centred)
        self.ids = special_ids(ctx.cfg.model.vocab_size, ctx.tokenizer)
        self.ctx = ctx


class GenerationSource(_VisionSource):
    """caption -> image / clip (next-frame-and-scale bits)."""

    generates = True

    def __init__(self, ctx: MixtureContext):
        super().__init__(ctx)
        self.train = ctx.split == "train"
        lab = self.data.labels
        keep = np.arange(len(self.data))
        if self.kind == "image":  # held-out combinations are for measuring generation only
            keep = np.array(
                [
                    i
                    for i in keep
                    if not is_heldout_combo(
                        int(lab["digit"][i]),
                        int(lab["fg"][i]),
                        int(lab["bg"][i]),
                        self.v.heldout_combo_fraction,
                    )
                ]
            )
        self.index = keep
        self._captions: dict[int, list[int]] = {}
        self.shape = (
            _shape_targets(ctx, self.kind, self.centred) if self.v.shape_loss_weight > 0 else None
        )

    def __len__(self) -> int:
        return len(self.index)

    def longest(self) -> int:
        """Positions of the longest document: <bos> longest caption <boi|bov> picture <eoi|eov>."""
        _, frames, per_frame, _ = self.data.tokens.shape
        captions = {caption_of(self.kind, self.data.labels, int(i)) for i in self.index}
        return 3 + frames * per_frame + max((len(self.ctx.text(c)) for c in captions), default=0)

    def caption_ids(self, i: int) -> list[int]:
        if i not in self._captions:
            self._captions[i] = self.ctx.text(caption_of(self.kind, self.data.labels, i))
        return self._captions[i]

    def document(self, index: int, rng: np.random.Generator) -> list[Segment]:
        i = int(self.index[index])
        caption = [] if self.train and rng.random() < self.v.cond_drop_prob else self.caption_ids(i)
        classes = None
        if self.v.caption_loss_weight > 0:
            lab = self.data.labels
            direction = int(lab["direction"][i]) if "direction" in lab else -1
            classes = (int(lab["digit"][i]), direction) if caption else (-1, -1)
        return generation_document(
            caption,
            self.data.tokens[i],
            self.v,
            self.kind,
            self.ids,
            rng if self.train else None,
            None if self.shape is None else self.shape[i],
            classes,
        )


class QASource(_VisionSource):
    """image / clip + question -> answer, from pre-quantisation features through the patch
    merger."""

    def __init__(self, ctx: MixtureContext):
        super().__init__(ctx)
        self._text: dict[str, list[int]] = {}

    def __len__(self) -> int:
        return len(self.data)

    def longest(self) -> int:
        """Positions of the longest document: the merged picture with every question about it
        answered, and the 4 delimiters."""
        _, frames, _, h, w = self.data.feats.shape
        m, mt = self.v.merge, (1 if self.kind == "image" else self.v.merge_frames)
        places = (frames // mt) * (h // m) * (w // m)
        text = max(
            (
                sum(len(self._ids(q)) + len(self._ids(" " + a)) for q, a in qa)
                for qa in (questions_of(self.kind, self.data.labels, i) for i in range(len(self)))
            ),
            default=0,
        )
        return 4 + places + text

    def _ids(self, s: str) -> list[int]:
        if s not in self._text:
            self._text[s] = self.ctx.text(s)
        return self._text[s]

    def document(self, index: int, rng: np.random.Generator) -> list[Segment]:
        # A random number of the picture's questions in random order: every answer is a target,
        # and a document of one question (what evaluation asks) is as common as any other length.
        qa = questions_of(self.kind, self.data.labels, index)
        order = rng.permutation(len(qa))[: int(rng.integers(1, len(qa) + 1))]
        pairs = [(self._ids(qa[j][0]), self._ids(" " + qa[j][1])) for j in order]
        return qa_document(
            self.data.feats[index], *pairs[-1], self.v, self.kind, self.ids, pairs[:-1]
        )


@register_source("image_gen")
class ImageGenSource(GenerationSource):
    kind = "image"


@register_source("video_gen")
class VideoGenSource(GenerationSource):
    kind = "video"


@register_source("image_qa")
class ImageQASource(QASource):
    kind = "image"


@register_source("video_qa")
class VideoQASource(QASource):
    kind = "video"

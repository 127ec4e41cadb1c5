"""Vision metrics of a multimodal model, each with its chance level.

    image QA        held-out images; per question (digit, digit colour, background colour) the
                    answer candidates are ranked by the model's log-probability of
                    "answer <eos>"; accuracy vs 1 / number of candidates
    video QA        held-out clips, "Which way does the digit move?", four directions
    text -> image   captions of held-out (digit, colour, background) combinations (never
                    generated in training) are sampled into images, and the independent judge
                    (eval/vision_judge.py) reads digit, colour and background off them; chance is
                    a random digit and colours. One greedy image per caption (t2i_*) and
                    model.vision.judge_samples sampled ones (t2i_sampled_*, temperature 1: lower
                    variance between runs). Beside them, the judge's accuracy on the real held-out
                    images (judge_real_*): what a perfect generator would score
    text -> video   captions of held-out clips are sampled into clips (video_frames frames,
                    video_scales scales) and judged for direction (t2v_*); beside it the judge on
                    the real clips cut to the same frames (judge_real_video_*) and on their
                    tokenizer reconstructions at the same scales (judge_recon_video_*)
    caption information
                    teacher-forced bit loss of the held-out images without their caption minus
                    with it (nats per bit, scales weighted as in training): how much the caption
                    tells the model about the picture; 0 = nothing

Ranking candidates measures understanding without a free-form parser; `ernie5 generate --image`
answers greedily instead.
"""

from __future__ import annotations

import os

import numpy as np
import paddle
import paddle.nn.functional as F

from ..data.digits import COLOUR_PAIRS, COLOURS, DIRECTIONS, PACES, image_caption, pace_word
from ..data.multimodal import pack_segments
from ..data.packing import IGNORE
from ..data.vision_sources import (
    DELIMITERS,
    caption_of,
    encoded_digits,
    generation_document,
    generation_prompt,
    is_heldout_combo,
    load_visual_tokenizer,
    qa_document,
    special_ids,
)
from ..model.vision_sampling import decode_tokens, sample_visual

CANDIDATES = {
    "What digit is this?": [str(d) for d in range(10)],
    "What colour is the digit?": list(COLOURS),
    "What colour is the background?": list(COLOURS),
    "Which way does the digit move?": list(DIRECTIONS),
    "How fast does the digit move?": list(PACES),
}
IMAGE_QUESTIONS = {
    "digit": ("What digit is this?", lambda l, i: str(l["digit"][i])),
    "fg": ("What colour is the digit?", lambda l, i: COLOURS[l["fg"][i]]),
    "bg": ("What colour is the background?", lambda l, i: COLOURS[l["bg"][i]]),
}
VIDEO_QUESTIONS = {
    "direction": ("Which way does the digit move?", lambda l, i: DIRECTIONS[l["direction"][i]]),
    "speed": ("How fast does the digit move?", lambda l, i: pace_word(l["speed"][i])),
}


@paddle.no_grad()
def target_logprobs(model, docs, batch: int = 96) -> np.ndarray:
    """Sum of the log-probabilities of every text target of each document (one document per
    row)."""
    from ..model.inputs import to_model_batch

    model.eval()
    out = []
    for i in range(0, len(docs), batch):
        chunk = docs[i : i + batch]
        seq = max(sum(len(s) for s in d) for d in chunk)
        b = to_model_batch(pack_segments(chunk, seq, one_per_row=True))
        logp = F.log_softmax(model(b, with_mtp=False).logits.astype("float32"), axis=-1)
        labels = b["labels"]
        picked = paddle.take_along_axis(
            logp, paddle.clip(labels, min=0).unsqueeze(-1), axis=-1
        ).squeeze(-1)
        out.append((picked * (labels != IGNORE).astype("float32")).sum(-1).numpy())
    return np.concatenate(out)


def qa_accuracy(
    model, cfg, tokenizer, kind: str, feats, questions: list[tuple[int, str, str]]
) -> float:
    """questions: (item, question, true answer); accuracy of ranking CANDIDATES[question]."""
    ids = special_ids(cfg.model.vocab_size, tokenizer)
    v = cfg.model.vision
    docs, spans = [], []
    for item, question, _ in questions:
        q = tokenizer.encode(question)
        start = len(docs)
        for cand in CANDIDATES[question]:
            docs.append(qa_document(feats[item], q, tokenizer.encode(" " + cand), v, kind, ids))
        spans.append((start, len(docs)))
    scores = target_logprobs(model, docs)
    right = [
        CANDIDATES[q][int(np.argmax(scores[a:b]))] == ans
        for (a, b), (_, q, ans) in zip(spans, questions)
    ]
    return float(np.mean(right))


def heldout_combos(fraction: float) -> list[tuple[int, int, int]]:
    return [
        (d, f, b) for d in range(10) for f, b in COLOUR_PAIRS if is_heldout_combo(d, f, b, fraction)
    ]


def generate_images(
    model,
    cfg,
    tokenizer,
    tok,
    captions: list[str],
    *,
    temperature: float = 0.0,
    cfg_scale: float | None = None,
    seed: int = 0,
    kind: str = "image",
) -> np.ndarray:
    """Frames [N, T, 3, H, W] for captions (prompts of equal token length are sampled
    together)."""
    ids = special_ids(cfg.model.vocab_size, tokenizer)
    v = cfg.model.vision
    open_id = ids[DELIMITERS[kind][0]]
    scale = v.guidance_scale(kind) if cfg_scale is None else cfg_scale
    uncond = np.array([generation_prompt([], ids["bos"], open_id)])
    prompts = [generation_prompt(tokenizer.encode(c), ids["bos"], open_id) for c in captions]
    scales = v.scales if kind == "image" else v.scales[: v.video_scales]
    frames = [None] * len(prompts)
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    for n, (_, idx) in enumerate(sorted(by_len.items())):
        tokens = sample_visual(
            model,
            np.array([prompts[i] for i in idx]),
            kind,
            uncond_BP=uncond,
            cfg_scale=scale,
            temperature=temperature,
            seed=seed + n,
        )
        for i, x in zip(idx, decode_tokens(tok, tokens, scales)):
            frames[i] = x
    return np.stack(frames)


def vision_metrics(
    cfg, model, tokenizer, max_items: int = 0, temperature: float = 0.0, log=print
) -> dict:
    """Metrics (and chance levels) for the visual modalities of `model`; {} for a text-only
    model."""
    mods = cfg.model.modalities
    if "image" not in mods and "video" not in mods:
        return {}
    v = cfg.model.vision
    tok = load_visual_tokenizer(v)
    out: dict = {}
    limit = (lambda n: min(n, max_items)) if max_items else (lambda n: n)
    if "image" in mods:
        data = encoded_digits(cfg, "image", "heldout", tok)
        n = limit(len(data))
        for name, (question, truth) in IMAGE_QUESTIONS.items():
            items = [(i, question, truth(data.labels, i)) for i in range(n)]
            out[f"vision/image_qa_{name}"] = qa_accuracy(
                model, cfg, tokenizer, "image", data.feats, items
            )
            out[f"vision/image_qa_{name}_chance"] = 1 / len(CANDIDATES[question])
        out["vision/image_qa"] = float(
            np.mean([out[f"vision/image_qa_{k}"] for k in IMAGE_QUESTIONS])
        )
        out["vision/image_qa_chance"] = float(
            np.mean([out[f"vision/image_qa_{k}_chance"] for k in IMAGE_QUESTIONS])
        )
        out["vision/image_qa_items"] = n
        log(f"image QA on {n} held-out images: {out['vision/image_qa']:.3f}")
        out.update(caption_information(model, cfg, tokenizer, data, n))
        log(f"caption information: {out['vision/t2i_caption_nats']:.4f} nats per bit")
        if v.judge and os.path.isdir(v.judge):
            out.update(text_to_image_judged(model, cfg, tokenizer, tok, max_items, temperature))
            log(f"text->image judged (all three right): {out['vision/t2i_all']:.3f}")
            out.update(judge_on_real_images(cfg, max_items))
    if "video" in mods:
        data = encoded_digits(cfg, "video", "heldout", tok)
        n = limit(len(data))
        for name, (question, truth) in VIDEO_QUESTIONS.items():
            items = [(i, question, truth(data.labels, i)) for i in range(n)]
            out[f"vision/video_qa_{name}"] = qa_accuracy(
                model, cfg, tokenizer, "video", data.feats, items
            )
            out[f"vision/video_qa_{name}_chance"] = 1 / len(CANDIDATES[question])
        out["vision/video_qa_items"] = n
        log(
            f"video QA on {n} held-out clips: direction {out['vision/video_qa_direction']:.3f}, "
            f"speed {out['vision/video_qa_speed']:.3f}"
        )
        if v.judge and os.path.isdir(v.judge):
            out.update(text_to_video_judged(model, cfg, tokenizer, tok, data, n, temperature))
            log(f"text->video judged direction: {out['vision/t2v_direction']:.3f}")
    return out


def judge_on_real_images(cfg, max_items: int = 0) -> dict:
    """The judge's accuracy on the real held-out images (digit, colour, background): the
    ceiling of every judged text -> image number."""
    from ..data.digits import digit_images
    from .vision_judge import VisionJudge

    judge = VisionJudge.load(cfg.model.vision.judge)
    images = digit_images(
        "heldout", size=judge.cfg.image_size, cache_dir=cfg.data.cache_dir, copies=1
    )
    n = min(len(images), max_items) if max_items else len(images)
    scores = judge.score(images.pixels[:n], {k: x[:n] for k, x in images.labels.items()})
    return {f"vision/judge_real_image_{k}": scores[k] for k in ("digit", "fg", "bg")}


VIDEO_JUDGED = ("direction", "digit", "fg", "bg", "speed")


def text_to_video_judged(
    model, cfg, tokenizer, tok, data, n: int, temperature: float = 0.0
) -> dict:
    """Captions of the first n held-out clips of `data` (encoded_digits video set) sampled into
    clips and judged (t2v_*), beside the judge on the real clips cut to the generated frames
    (judge_real_video_*) and on their tokenizer reconstructions (judge_recon_video_*)."""
    from ..data.digits import DIRECTIONS, SPEEDS, digit_videos
    from .vision_judge import VisionJudge

    v = cfg.model.vision
    judge = VisionJudge.load(v.judge)
    truth = {k: data.labels[k][:n] for k in VIDEO_JUDGED}
    truth["speed"] = np.searchsorted(SPEEDS, truth["speed"])
    captions = [caption_of("video", data.labels, i) for i in range(n)]
    clips = generate_images(
        model, cfg, tokenizer, tok, captions, temperature=temperature, kind="video"
    )
    recon = decode_tokens(tok, data.tokens[:n].astype(np.float32), v.scales[: v.video_scales])
    real = digit_videos(
        "heldout", size=judge.cfg.image_size, frames=judge.cfg.frames, cache_dir=cfg.data.cache_dir
    ).pixels[:n, : v.video_frames]
    out = {}
    for prefix, x in (("t2v", clips), ("judge_recon_video", recon), ("judge_real_video", real)):
        pred = judge.predict(x)
        out.update({f"vision/{prefix}_{k}": float(np.mean(pred[k] == truth[k])) for k in truth})
    chance = {"direction": 1 / len(DIRECTIONS), "digit": 0.1, "speed": 1 / len(SPEEDS)}
    chance.update(fg=1 / len(COLOURS), bg=1 / len(COLOURS))
    out.update({f"vision/t2v_{k}_chance": c for k, c in chance.items()})
    out["vision/t2v_clips"] = n
    return out


@paddle.no_grad()
def caption_information(model, cfg, tokenizer, data, n: int, batch: int = 64) -> dict:
    """Mean teacher-forced bit loss of the first n images of `data` without their caption minus with
    it (nats per bit); chance (a model that ignores the caption) is 0."""
    from ..model.inputs import to_model_batch

    v = cfg.model.vision
    ids = special_ids(cfg.model.vocab_size, tokenizer)
    model.eval()
    loss = {}
    for name, with_caption in (("cond", True), ("uncond", False)):
        total = 0.0
        for a in range(0, n, batch):
            docs = [
                generation_document(
                    tokenizer.encode(caption_of("image", data.labels, i)) if with_caption else [],
                    data.tokens[i],
                    v,
                    "image",
                    ids,
                )
                for i in range(a, min(n, a + batch))
            ]
            b = to_model_batch(
                pack_segments(docs, max(sum(len(s) for s in d) for d in docs), one_per_row=True)
            )
            bits, _, _ = model.head_losses(model(b, with_mtp=False), b)["image_bits"]
            # One image per row, the same bit targets in each: rows weigh equally.
            total += float(bits) * len(docs)
        loss[name] = total / n
    return {
        "vision/t2i_caption_nats": loss["uncond"] - loss["cond"],
        "vision/t2i_caption_nats_chance": 0.0,
    }


def text_to_image_judged(
    model, cfg, tokenizer, tok, max_items: int = 0, temperature: float = 0.0
) -> dict:
    from .vision_judge import VisionJudge

    v = cfg.model.vision
    judge = VisionJudge.load(v.judge)
    combos = heldout_combos(v.heldout_combo_fraction)
    if max_items:
        combos = combos[:max_items]
    captions = [image_caption(*c) for c in combos]
    truth = {k: np.array([c[j] for c in combos]) for j, k in enumerate(("digit", "fg", "bg"))}

    def judged(images) -> dict:
        pred = judge.predict(images)
        return {k: pred[k] == np.tile(truth[k], len(images) // len(combos)) for k in truth}

    def rates(hits, prefix) -> dict:
        out = {f"{prefix}_{k}": float(np.mean(h)) for k, h in hits.items()}
        out[f"{prefix}_all"] = float(np.mean(hits["digit"] & hits["fg"] & hits["bg"]))
        chance = {
            "digit": 0.1,
            "fg": 1 / len(COLOURS),
            "bg": 1 / len(COLOURS),
            "all": 1 / (10 * len(COLOUR_PAIRS)),
        }
        out.update({f"{prefix}_{k}_chance": c for k, c in chance.items()})
        return out

    out = rates(
        judged(
            generate_images(model, cfg, tokenizer, tok, captions, temperature=temperature)[:, 0]
        ),
        "vision/t2i",
    )
    out["vision/t2i_prompts"] = len(combos)
    if v.judge_samples:
        images = np.concatenate(
            [
                generate_images(
                    model, cfg, tokenizer, tok, captions, temperature=1.0, seed=1000 * (s + 1)
                )[:, 0]
                for s in range(v.judge_samples)
            ]
        )
        out.update(rates(judged(images), "vision/t2i_sampled"))
        out["vision/t2i_sampled_images"] = len(images)
    return out


def report_rows(m: dict) -> str:
    """Markdown rows (metric | value | baseline) of the vision metrics present in `m`."""
    rows = []

    def row(label, key):
        if key in m:
            rows.append(f"| {label} | {m[key]:.3f} | chance {m[key + '_chance']:.3f} |")

    row("image QA accuracy, held-out images (digit, colour, background)", "vision/image_qa")
    for k, what in (("digit", "digit"), ("fg", "digit colour"), ("bg", "background")):
        row(f"image QA: {what}", f"vision/image_qa_{k}")
    row(
        "text->image judged: digit, colour and background all right (held-out combinations)",
        "vision/t2i_all",
    )
    for k, what in (("digit", "digit"), ("fg", "digit colour"), ("bg", "background")):
        row(f"text->image judged: {what}", f"vision/t2i_{k}")
    n = m.get("vision/t2i_sampled_images", 0)
    row(
        f"text->image judged, {n} sampled images (temperature 1): all three right",
        "vision/t2i_sampled_all",
    )
    for k, what in (("digit", "digit"), ("fg", "digit colour"), ("bg", "background")):
        row(f"text->image judged, sampled: {what}", f"vision/t2i_sampled_{k}")
    if "vision/t2i_caption_nats" in m:
        rows.append(
            f"| caption information (held-out images, teacher-forced), nats per bit | "
            f"{m['vision/t2i_caption_nats']:.4f} | chance 0 |"
        )
    for k, what in (("digit", "digit"), ("fg", "digit colour"), ("bg", "background")):
        key = f"vision/judge_real_image_{k}"
        if key in m:
            rows.append(f"| judge on real held-out images: {what} | {m[key]:.3f} | |")
    row("video QA: direction, held-out clips", "vision/video_qa_direction")
    row("video QA: speed, held-out clips", "vision/video_qa_speed")
    for k in VIDEO_JUDGED:
        key = f"vision/t2v_{k}"
        if key in m:
            real, recon = m[f"vision/judge_real_video_{k}"], m[f"vision/judge_recon_video_{k}"]
            rows.append(
                f"| text->video judged: {k} (judge on the real clips / their reconstructions: "
                f"{real:.3f} / {recon:.3f}) | {m[key]:.3f} | chance {m[key + '_chance']:.3f} |"
            )
    return "".join(r + "\n" for r in rows)


@paddle.no_grad()
def answer_question(model, cfg, tokenizer, tok, pixels, question: str, max_tokens: int = 8) -> str:
    """Greedy answer to `question` about one image [3, H, W] (or clip [T, 3, H, W]) in [0, 1]."""
    from ..model.inputs import to_model_batch

    kind = "video" if pixels.ndim == 4 else "image"
    feats, _ = tok.encode(paddle.to_tensor(pixels[None].astype(np.float32)))
    feats = feats.numpy()[0]
    ids = special_ids(cfg.model.vocab_size, tokenizer)
    q = tokenizer.encode(question)
    answer: list[int] = []
    model.eval()
    for _ in range(max_tokens):
        # The document ends "... question answer-so-far <eos>": the position before <eos> predicts
        # the next answer token and, being causal, is not affected by the placeholder.
        doc = qa_document(feats, q, answer, cfg.model.vision, kind, ids)
        seq = sum(len(s) for s in doc)
        logits = model(to_model_batch(pack_segments([doc], seq)), with_mtp=False).logits
        nxt = int(logits[0, seq - 2].argmax())
        if nxt == ids["eos"]:
            break
        answer.append(nxt)
    return tokenizer.decode(answer).strip()

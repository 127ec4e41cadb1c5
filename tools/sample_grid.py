"""A sample grid of a multimodal checkpoint: generated images for every digit x a few colour pairs,
and strips of generated video frames, in one PNG, through the project's own generation path
(eval/vision_eval.generate_images -> model/vision_sampling.sample_visual -> the tokenizer's
decoder). Each cell is labelled with the judge's reading (eval/vision_judge.py) when the run has
one: digit (and direction for clips), green when it matches the caption, red when not.

    python tools/sample_grid.py --checkpoint runs/multimodal_tiny \
        --out docs/img/vision_sample_grid.png
    python tools/sample_grid.py --checkpoint RUN --colours red:blue,white:green --temperature 0

Rows: one per (digit colour, background) pair; columns: digits 0-9. Below: one strip per
direction (left, right, up, down) of video_frames generated frames. Also prints the judged share
of right digits (images) and directions (clips).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEFAULT_PAIRS = "red:blue,white:green,yellow:magenta,cyan:red"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="a multimodal run or checkpoint directory")
    ap.add_argument("--out", default="vision_sample_grid.png")
    ap.add_argument(
        "--colours", default=DEFAULT_PAIRS, help="digit:background pairs, comma-separated"
    )
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy bits")
    ap.add_argument(
        "--cfg-scale",
        type=float,
        default=None,
        help="default: the run's cfg_scale (clips: its video_cfg_scale, when set)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--upscale", type=int, default=4, help="pixels per generated pixel")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--judge", default=None, help="a vision_judge run (default: the run's judge)")
    return ap.parse_args(argv)


def colour_pairs(spec: str) -> list[tuple[int, int]]:
    from paddle_ernie5.data.digits import COLOURS

    pairs = []
    for item in spec.split(","):
        fg, _, bg = item.partition(":")
        if fg not in COLOURS or bg not in COLOURS or fg == bg:
            raise SystemExit(f"--colours: {item!r} is not two different colours of {COLOURS}")
        pairs.append((COLOURS.index(fg), COLOURS.index(bg)))
    return pairs


def _cell(frame_CHW: np.ndarray, upscale: int) -> np.ndarray:
    img = np.clip(frame_CHW, 0, 1).transpose(1, 2, 0)
    return img.repeat(upscale, axis=0).repeat(upscale, axis=1)


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from paddle_ernie5.data.digits import COLOURS, DIRECTIONS, image_caption, video_caption
    from paddle_ernie5.data.vision_sources import load_visual_tokenizer
    from paddle_ernie5.eval.runner import load_model
    from paddle_ernie5.eval.vision_eval import generate_images
    from paddle_ernie5.eval.vision_judge import VisionJudge
    from paddle_ernie5.generate import _text_tokenizer

    cfg, model = load_model(args.checkpoint, log=lambda *_: None)
    v = cfg.model.vision
    tok = load_visual_tokenizer(v)
    text_tok = _text_tokenizer(cfg)
    judge_dir = args.judge or v.judge
    judge = VisionJudge.load(judge_dir) if judge_dir and os.path.isdir(judge_dir) else None
    pairs = colour_pairs(args.colours)
    common = dict(temperature=args.temperature, cfg_scale=args.cfg_scale, seed=args.seed)

    combos = [(d, fg, bg) for fg, bg in pairs for d in range(10)]
    images = generate_images(
        model, cfg, text_tok, tok, [image_caption(*c) for c in combos], **common
    )[:, 0]
    clips, clip_caps = None, []
    if "video" in cfg.model.modalities:
        fg, bg = pairs[0]
        clip_caps = [(3, fg, bg, k, 1) for k in range(len(DIRECTIONS))]
        clips = generate_images(
            model,
            cfg,
            text_tok,
            tok,
            [video_caption(*c) for c in clip_caps],
            kind="video",
            **common,
        )
    read = judge.predict(images) if judge else None
    read_clips = judge.predict(clips) if judge and clips is not None else None

    rows = len(pairs) + (len(clip_caps) if clips is not None else 0)
    cols = 10
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.1, rows * 1.25), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for n, (d, fg, bg) in enumerate(combos):
        ax = axes[n // 10, n % 10]
        ax.imshow(_cell(images[n], args.upscale))
        if read is not None:
            ok = read["digit"][n] == d
            ax.set_title(
                f"{d}: judge {read['digit'][n]}", fontsize=7, color="green" if ok else "red"
            )
        else:
            ax.set_title(str(d), fontsize=7)
        if d == 0:
            ax.text(
                -4,
                images.shape[-1] * args.upscale / 2,
                f"{COLOURS[fg]}\non {COLOURS[bg]}",
                fontsize=7,
                ha="right",
                va="center",
            )
    for j, cap in enumerate(clip_caps):
        r = len(pairs) + j
        for t in range(clips.shape[1]):
            ax = axes[r, t]
            ax.imshow(_cell(clips[j, t], args.upscale))
        title = f"clip '{DIRECTIONS[cap[3]]}'"
        if read_clips is not None:
            got = DIRECTIONS[read_clips["direction"][j]]
            title += f": judge {got}"
            axes[r, clips.shape[1]].text(
                0,
                0.5,
                title,
                fontsize=7,
                va="center",
                color="green" if got == DIRECTIONS[cap[3]] else "red",
            )
        else:
            axes[r, clips.shape[1]].text(0, 0.5, title, fontsize=7, va="center")
    fig.suptitle(
        f"{os.path.basename(os.path.normpath(args.checkpoint))}: generated from captions "
        f"'a <colour> <digit> on a <colour> background' (temperature {args.temperature})",
        fontsize=8,
    )
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    if read is not None:
        digits = np.array([c[0] for c in combos])
        print(f"judged digit right: {np.mean(read['digit'] == digits):.3f} of {len(combos)} images")
        fgs, bgs = np.array([c[1] for c in combos]), np.array([c[2] for c in combos])
        print(
            f"judged colour / background right: {np.mean(read['fg'] == fgs):.3f} / "
            f"{np.mean(read['bg'] == bgs):.3f}"
        )
    if read_clips is not None:
        want = np.array([c[3] for c in clip_caps])
        print(
            f"judged direction right: {np.mean(read_clips['direction'] == want):.3f} "
            f"of {len(clip_caps)} clips"
        )


if __name__ == "__main__":
    main()

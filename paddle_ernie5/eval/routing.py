"""Routing analysis (ERNIE 5.0's figures, reproduced on our model).

For every source (a modality or a kind of text) we run held-out batches and count, per MoE layer,
how often each expert is chosen. From the usage matrix U[source][layer, expert]:
- heatmaps (layers x experts) per source;
- IoU of the top-25% most used experts between source pairs, per layer (first / middle / last);
- normalised routing entropy per layer: NE = -sum p log p / log E (1 = uniform use of all experts).

A universal pool (MoUE, model/universal.py) has one usage column per pool expert; each layer uses
only its window, so its entropy is normalised over the window (log W), and the report adds the
usage per layer window and the pool's balance over the depth (`window_report`).
"""

from __future__ import annotations

import itertools
import os

import numpy as np
import paddle

PAPER_IOU = {  # first / middle / last layer, ERNIE5.md; names are sources or GROUPS
    ("text", "audio"): (0.12, 0.32, 0.40),
    ("image understanding", "video understanding"): (0.98, 0.52, 0.64),
    ("understanding", "generation"): (0.2, 0.2, 0.2),
}


@paddle.no_grad()
def usage(model, batches) -> np.ndarray:
    """[MoE layers, experts] assignment counts over `batches`. A batch may carry `routing_select`
    (numpy bool [B, S]): then only the chosen experts of those positions count (for example the
    image tokens of an image-understanding document, not its question text)."""
    model.eval()
    layers = [i for i, _ in model.moe_layers()]
    num_experts = model.cfg.moe.num_experts
    counts = np.zeros([len(layers), num_experts], dtype=np.int64)
    for batch in batches:
        select = batch.get("routing_select")
        inputs = {k: v for k, v in batch.items() if k != "routing_select"}
        stats = model(inputs, with_mtp=False).router_stats
        for row, layer in enumerate(layers):
            if select is None:
                counts[row] += stats[layer].load_E.numpy()
            else:
                ids_TK = stats[layer].topk_ids_TK.numpy()
                counts[row] += count_selected(ids_TK, select.reshape(-1), num_experts)
    return counts


def count_selected(ids_TK: np.ndarray, select_T: np.ndarray, num_experts: int) -> np.ndarray:
    """Per-expert choice counts of the selected tokens (ids outside [0, E) are dropped choices)."""
    ids = ids_TK[select_T.astype(bool)].reshape(-1)
    ids = ids[(ids >= 0) & (ids < num_experts)]
    return np.bincount(ids, minlength=num_experts)[:num_experts]


# Multimodal sources of the routing report:
# mixture source -> (report name, modality whose tokens count).
MULTIMODAL_SOURCES = {
    "image_qa": ("image understanding", "image"),
    "video_qa": ("video understanding", "video"),
    "image_gen": ("image generation", "image"),
    "video_gen": ("video generation", "video"),
    "asr": ("audio understanding (ASR)", "audio"),
    "tts": ("audio generation (TTS)", "audio"),
}
# Aggregates compared with the paper: name -> the report sources (prefixes) whose usages are summed.
GROUPS = {
    "text": ("text/",),
    "audio": ("audio ",),
    "understanding": ("image understanding", "video understanding"),
    "generation": ("image generation", "video generation"),
}


def group_usages(usages: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Summed usages of GROUPS present in `usages` (a group needs at least one member)."""
    out = {}
    for name, prefixes in GROUPS.items():
        members = [u for t, u in usages.items() if any(t.startswith(p) for p in prefixes)]
        if members:
            out[name] = np.sum(members, axis=0)
    return out


def multimodal_source_batches(cfg, tokenizer, max_batches: int = 4) -> dict[str, list]:
    """Held-out documents of every multimodal source the recipe trains (data.mixture weight > 0),
    packed into model batches whose `routing_select` marks the positions of the source's
    modality."""
    from ..data.mixture import SOURCES, MixtureContext, draw_documents, load_source_modules
    from ..data.multimodal import pack_segments
    from ..model.embeddings import MODALITY_IDS
    from ..model.inputs import to_model_batch

    load_source_modules()
    ctx = MixtureContext(cfg, tokenizer, "val")
    out = {}
    for source, w in cfg.data.mixture.weights().items():
        if w <= 0 or source not in MULTIMODAL_SOURCES or source not in SOURCES:
            continue
        name, modality = MULTIMODAL_SOURCES[source]
        source = SOURCES[source](ctx)
        rng = np.random.default_rng([cfg.train.seed, 0x5EED])
        batches = []
        for _ in range(max_batches):
            docs, _ = draw_documents(
                {source: source}, {source: 1.0}, rng, cfg.data.seq_len, cfg.train.batch_size
            )
            np_batch = pack_segments(docs, cfg.data.seq_len, tokenizer.pad_id)
            batch = to_model_batch(np_batch)
            batch["routing_select"] = np_batch["token_types"] == MODALITY_IDS[modality]
            batches.append(batch)
        out[name] = batches
    return out


def top_set(counts_E: np.ndarray, fraction: float = 0.25) -> set[int]:
    """The ceil(fraction * E) most used experts (ties: lower index)."""
    k = max(1, int(np.ceil(fraction * counts_E.size)))
    order = np.lexsort((np.arange(counts_E.size), -counts_E))
    return set(order[:k].tolist())


def iou(a: set, b: set) -> float:
    return len(a & b) / max(1, len(a | b))


def normalised_entropy(counts_E: np.ndarray) -> float:
    p = counts_E / max(1, counts_E.sum())
    nz = p[p > 0]
    return float(-(nz * np.log(nz)).sum() / np.log(counts_E.size)) if counts_E.size > 1 else 1.0


def model_windows(model) -> dict[int, np.ndarray] | None:
    """Block index -> pool experts of its window for a universal-pool model, else None."""
    from ..model.universal import layer_windows

    return layer_windows(model.cfg) if model.cfg.moe.universal.enabled else None


def analyse(usages: dict[str, np.ndarray], windows: list[np.ndarray] | None = None) -> dict:
    """IoU matrices at the first/middle/last MoE layer and entropy per layer, per source.
    `windows`: per usage row, the columns that layer can use (universal pool); IoU and entropy
    then look only at those."""
    sources = list(usages)
    n_layers = next(iter(usages.values())).shape[0]

    def row(u, l):
        return u[l] if windows is None else u[l][windows[l]]

    picks = {"first": 0, "middle": n_layers // 2, "last": n_layers - 1}
    iou_mats = {}
    for name, layer in picks.items():
        sets = {t: top_set(row(usages[t], layer)) for t in sources}
        iou_mats[name] = np.array([[iou(sets[a], sets[b]) for b in sources] for a in sources])
    entropy = {
        t: [normalised_entropy(row(u, l)) for l in range(n_layers)] for t, u in usages.items()
    }
    return {"sources": sources, "layers": picks, "iou": iou_mats, "entropy": entropy}


def window_report(counts_LE: np.ndarray, layer_ids: list[int], windows: dict) -> list[str]:
    """Markdown: usage per layer window of a universal pool (window, entropy over the window,
    max/mean load inside it, share of the layer's load on experts the previous MoE layer's window
    also holds) and the pool's balance over the depth (model/universal.py `balance_stats`)."""
    from ..model.universal import balance_stats

    num_experts = counts_LE.shape[1]
    loads = {l: counts_LE[r] for r, l in enumerate(layer_ids)}
    st = balance_stats(loads, windows, num_experts)
    lines = [
        "| layer | window (pool experts) | entropy over window | max/mean in window "
        "| load on experts shared with the previous window |",
        "|---|---|---:|---:|---:|",
    ]
    prev = None
    for l in layer_ids:
        win, load = windows[l], loads[l]
        shared = (
            "-"
            if prev is None
            else f"{load[np.intersect1d(win, prev)].sum() / max(1, load.sum()):.2f}"
        )
        first, last = int(win[0]), int(win[-1])
        span = f"{first}..{last}" if last >= first else f"{first}..{num_experts - 1}, 0..{last}"
        lines.append(
            f"| L{l} | {span} | {normalised_entropy(load[win]):.3f} "
            f"| {st['per_window'][l]:.2f} | {shared} |"
        )
        prev = win
    exp = st["exposure_P"]
    lines += [
        "",
        f"Pool of {num_experts} experts, exposure (windows per expert) "
        f"{int(exp.min())}..{int(exp.max())}; total load over the depth, max/mean "
        f"{st['max_over_mean']:.2f}; per unit of exposure, max/mean "
        f"{st['per_exposure_max_over_mean']:.2f}; normalised entropy of the total "
        f"{normalised_entropy(st['total_P']):.3f}.",
    ]
    return lines


def write_report(
    usages: dict[str, np.ndarray],
    layer_ids: list[int],
    out_dir: str,
    windows: dict[int, np.ndarray] | None = None,
) -> str:
    """PNG figures + report.md under out_dir; returns the Markdown text. `windows`: a universal
    pool's layer windows (`model_windows`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    rows = None if windows is None else [windows[l] for l in layer_ids]
    res = analyse(usages, rows)
    sources = res["sources"]
    fig, axes = plt.subplots(
        len(sources), 1, figsize=(10, 1.2 + 0.9 * len(sources) * 1.2), squeeze=False
    )
    for ax, t in zip(axes[:, 0], sources):
        share = usages[t] / np.maximum(1, usages[t].sum(axis=1, keepdims=True))
        ax.imshow(share, aspect="auto", cmap="viridis")
        ax.set_title(f"{t}: expert usage share", fontsize=9)
        ax.set_yticks(range(len(layer_ids)), [f"L{i}" for i in layer_ids], fontsize=7)
        ax.set_xlabel("expert", fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "usage_heatmaps.png"), dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(4 * 3, 4))
    for ax, (name, mat) in zip(axes, res["iou"].items()):
        ax.imshow(mat, vmin=0, vmax=1, cmap="magma")
        ax.set_title(
            f"top-25% IoU, {name} MoE layer (L{layer_ids[res['layers'][name]]})", fontsize=8
        )
        ax.set_xticks(range(len(sources)), sources, rotation=60, fontsize=7)
        ax.set_yticks(range(len(sources)), sources, fontsize=7)
        for i, j in itertools.product(range(len(sources)), repeat=2):
            ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=6, color="w")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "iou_top25.png"), dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for t in sources:
        ax.plot(layer_ids, res["entropy"][t], marker="o", label=t)
    ax.set_xlabel("layer")
    ax.set_ylabel("normalised routing entropy")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "entropy.png"), dpi=110)
    plt.close(fig)

    lines = [
        "# Routing report",
        "",
        "![usage](usage_heatmaps.png) ![iou](iou_top25.png) ![entropy](entropy.png)",
        "",
        "## Normalised routing entropy per layer",
        "",
        "| source | " + " | ".join(f"L{i}" for i in layer_ids) + " |",
        "|---|" + "---:|" * len(layer_ids),
    ]
    lines += [
        f"| {t} | " + " | ".join(f"{v:.3f}" for v in res["entropy"][t]) + " |" for t in sources
    ]
    lines += [
        "",
        "## Top-25% expert IoU between sources (first / middle / last MoE layer)",
        "",
        "| source pair | first | middle | last |",
        "|---|---:|---:|---:|",
    ]
    for a, b in itertools.combinations(range(len(sources)), 2):
        vals = [res["iou"][n][a, b] for n in ("first", "middle", "last")]
        lines.append(
            f"| {sources[a]} vs {sources[b]} | " + " | ".join(f"{v:.2f}" for v in vals) + " |"
        )
    lines += [
        "",
        "## Against the paper",
        "",
        "| source pair | paper (first / middle / last) | ours |",
        "|---|---|---|",
    ]
    pool = {**group_usages(usages), **usages}
    for (a, b), vals in PAPER_IOU.items():
        if a in pool and b in pool:
            pair = analyse({a: pool[a], b: pool[b]}, rows)
            ours = " / ".join(f"{pair['iou'][n][0, 1]:.2f}" for n in ("first", "middle", "last"))
        else:
            ours = "not measurable: the model has no such sources"
        lines.append(f"| {a} vs {b} | {' / '.join(f'{v:.2f}' for v in vals)} | {ours} |")
    lines += [
        "",
        "Groups: "
        + "; ".join(
            f"{g} = sum of {', '.join(p.strip() + '*' for p in prefixes)}"
            for g, prefixes in GROUPS.items()
        )
        + ". Multimodal sources count "
        "only the positions of their own modality (`routing_select`).",
    ]
    if windows is not None:
        for t in sources:
            lines += ["", f"## Universal pool: usage per layer window ({t})", ""]
            lines += window_report(usages[t], layer_ids, windows)
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write(text)
    return text


def text_source_batches(cfg, tokenizer, max_batches: int = 4) -> dict[str, list]:
    """Held-out text grouped by kind (prose, arithmetic, counting, ...), packed into model
    batches."""
    from ..data.loader import eval_batches
    from ..data.packing import pack_documents
    from ..data.text import validation_documents_by_kind
    from ..model.inputs import to_model_batch

    out = {}
    for kind, docs in validation_documents_by_kind(
        cfg.data.split_seed, cfg.data.val_fraction
    ).items():
        if not docs:
            continue
        packed = pack_documents(
            tokenizer.encode_batch(docs),
            cfg.data.seq_len,
            tokenizer.pad_id,
            tokenizer.bos_id,
            tokenizer.eos_id,
        )
        out[f"text/{kind}"] = [
            to_model_batch(b)
            for b in itertools.islice(eval_batches(packed, cfg.train.batch_size), max_batches)
        ]
    return out

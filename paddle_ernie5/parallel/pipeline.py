"""Ernie5Model as Fleet's PipelineLayer: the model's own modules, cut where parallel/stages.py cuts.

    PipelineLayer entries   EmbedStage │ BlockStage 0 │ ... │ BlockStage L-1 │ HeadStage
    plan_stages items       embed      │ block.0      │ ... │ block.L-1      │ head
    seg_method              the plan's boundaries, as Fleet's explicit list [0, b1, ..., L+2]

Every entry wraps modules of ONE Ernie5Model (the same objects, nothing copied or re-initialised),
so a pipeline stage computes exactly what the single-device forward computes for its layers, and the
model's parameter names stay what they are (`model_names` maps the PipelineLayer's names back).

What a stage hands the next one (a dict; Fleet sends its tensors with their keys):

    hidden      [b, S, M]     the residual stream                          (gradient flows back)
    next_embed  [b, S, M]     embedding of token i+1, the MTP input; the table lives on the
                              embedding stage                              (gradient flows back)
    aux, z      [1]           sums of the MoE aux and z losses of every layer run so far
                                                                           (gradient flows back)
    positions   [b, 3, S]     Uni-RoPE positions (each stage computes its own cos/sin once)
    mask        [b, 1, S, C]  FlashMask row indices
    causal      [1]           the batch's mask_causal

The head stage passes its input on to Fleet's loss_fn, `PipelineObjective`, which runs on the last
stage with the micro-batch (every key of the batch, targets included) as Fleet's "labels": the final
norm and heads (model/model.output_heads) and every loss term with the weights of
model/losses.compute_loss. Router loads are handed to `record` by the block stage that ran the
layer, so they stay on the rank that holds the router.
"""

from __future__ import annotations

import paddle
from paddle import nn
from paddle.distributed.fleet.meta_parallel import PipelineLayer

from ..config import ConfigError, ModelConfig, ParallelConfig
from ..model.losses import IGNORE, compute_loss, mtp_labels
from ..model.model import ModelOutput, head_losses, next_token_embeddings, output_heads
from ..model.rope import rope_cos_sin
from .stages import plan_stages

_STAGE_LOCAL = "cos_sin"  # computed by a stage's first block, never sent


def check_supported(cfg: ModelConfig, pcfg: ParallelConfig) -> None:
    """ConfigError for what this pipeline cannot run (Paddle 3.3.1 on the CPU)."""
    if pcfg.pp_chunks > 1 or pcfg.pp_schedule != "1F1B":
        raise ConfigError(
            f"parallel.pp_schedule={pcfg.pp_schedule}, parallel.pp_chunks={pcfg.pp_chunks} is "
            "invalid for `ernie5 train`: allowed pp_schedule=1F1B with pp_chunks=1. Paddle 3.3.1 "
            "runs FThenB and VPP only as interleaved (virtual-stage) schedules, which assert "
            "pp > 2 and accumulate_steps >= pp, require cached p2p shapes (a multimodal step "
            "changes them) and cut only with a 'layer:<name>' seg_method (equal layer counts, not "
            "parallel/stages.py's boundaries)"
        )
    if cfg.tie_embeddings:
        raise ConfigError(
            "model.tie_embeddings=true is invalid with parallel.pp > 1: allowed false (the text "
            "head would share the embedding table across stages, which this pipeline does not "
            "synchronise)"
        )


def stage_bounds(cfg: ModelConfig, pcfg: ParallelConfig) -> list[int]:
    """plan_stages' cut as entry boundaries [0, ..., num_layers + 2] of the PipelineLayer."""
    bounds = [0]
    for stage in plan_stages(cfg, pcfg):
        bounds.append(bounds[-1] + len(stage.items))
    return bounds


class EmbedStage(nn.Layer):
    """Embeddings of every modality (the batch's own keys), the MTP input, empty loss sums."""

    def __init__(self, model):
        super().__init__()
        self.embed = model.embed
        self.with_mtp = model.mtp is not None

    def forward(self, batch):
        acts = {"hidden": self.embed(batch)}
        if self.with_mtp:
            acts["next_embed"] = next_token_embeddings(self.embed, batch["input_ids"])
        acts["aux"] = paddle.zeros([1], dtype="float32")
        acts["z"] = paddle.zeros([1], dtype="float32")
        acts["positions"] = batch["positions"]
        acts["mask"] = batch["startend_row_indices"]
        acts["causal"] = batch["mask_causal"]
        return acts


class BlockStage(nn.Layer):
    """One transformer block; an MoE block adds its aux and z losses to the running sums and hands
    its router stats to `record(layer index, stats)`."""

    def __init__(self, model, index: int, record):
        super().__init__()
        self.block = model.blocks[index]
        self.index = index
        self.attention = model.cfg.attention
        self.record = record

    def forward(self, acts):
        if _STAGE_LOCAL not in acts:
            a = self.attention
            cos_sin = rope_cos_sin(acts["positions"], a.head_dim, a.rope_base, a.rope_sections)
            acts = {**acts, _STAGE_LOCAL: cos_sin}
        cos, sin = acts[_STAGE_LOCAL]
        x, stats = self.block(acts["hidden"], cos, sin, acts["mask"], causal=_causal(acts))
        acts = {**acts, "hidden": x}
        if stats is not None:
            acts["aux"] = acts["aux"] + stats.aux_loss
            acts["z"] = acts["z"] + stats.z_loss
            self.record(self.index, stats)
        return acts


class HeadStage(nn.Layer):
    """The final norm, text head, MTP module and modality heads; they run in `PipelineObjective`,
    which also needs the micro-batch (targets, and the inputs some heads read)."""

    def __init__(self, model):
        super().__init__()
        self.norm = model.norm
        self.text_head = model.text_head
        self.mtp = model.mtp
        self.heads = model.heads

    def forward(self, acts):
        return acts


def _causal(acts) -> bool:
    return bool(acts["causal"].reshape([-1])[0])


class ErniePipeline(PipelineLayer):
    """Fleet's PipelineLayer whose stage outputs are the tensors to send: stage-local entries
    dropped, and tensors a stage passed through unchanged copied, because Fleet frees the memory of
    what a stage sent while the stage's own graph may still need it (attention keeps the FlashMask
    indices for its backward)."""

    def forward(self, input, chunk_id=None):
        received = [t for t in input.values() if isinstance(t, paddle.Tensor)]
        out = super().forward(input, chunk_id)
        return {
            k: v.clone() if any(v is t for t in received) else v
            for k, v in out.items()
            if k != _STAGE_LOCAL
        }


def build_pipeline(model, pcfg: ParallelConfig, topology, record, loss_fn) -> ErniePipeline:
    """`model`'s modules as a PipelineLayer over `topology` (Fleet's hybrid topology); this rank
    registers the entries of its own stage. `record(layer, stats)` receives every MoE layer's
    router stats; `loss_fn` is Fleet's loss function (a PipelineObjective)."""
    cfg = model.cfg
    check_supported(cfg, pcfg)
    layers = [
        EmbedStage(model),
        *(BlockStage(model, i, record) for i in range(cfg.num_layers)),
        HeadStage(model),
    ]
    pipe = ErniePipeline(
        layers=layers,
        topology=topology,
        loss_fn=loss_fn,
        seg_method=stage_bounds(cfg, pcfg),
    )
    if isinstance(loss_fn, PipelineObjective) and isinstance(pipe.run_function[-1], HeadStage):
        loss_fn.head = pipe.run_function[-1]
    return pipe


def model_name(pipe_name: str, num_layers: int) -> str:
    """The Ernie5Model name of a PipelineLayer parameter or buffer: entry k = 1..L is block k-1
    (`3.block.attn.q.weight` -> `blocks.2.attn.q.weight`); the embedding and head entries hold the
    model's modules under the model's own attribute names (`0.embed.x` -> `embed.x`)."""
    index, _, rest = pipe_name.partition(".")
    k = int(index)
    if 1 <= k <= num_layers:
        attr, _, tail = rest.partition(".")
        assert attr == "block", pipe_name
        return f"blocks.{k - 1}.{tail}"
    return rest


def model_names(pipe: PipelineLayer, num_layers: int) -> dict[str, str]:
    """PipelineLayer state name -> Ernie5Model state name, for this rank's stage."""
    return {n: model_name(n, num_layers) for n in pipe.state_dict()}


class PipelineObjective:
    """Fleet's loss_fn on the last stage: the loss of one micro-batch as its share of the loss of
    the whole step, so that the shares of every micro-batch and data rank sum to what
    model/losses.compute_loss gives one process over the global batch:

        text, MTP, each modality head   mean over the micro-batch x its count / the global count
        aux, z (sums over all stages)   / (micro-batches x data ranks): both are means over equal
                                        sequences / tokens

    `begin` is called before each pipeline pass with the global counts; Fleet divides what this
    returns by its accumulate_steps, which is undone here. `values` accumulates the logged terms."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self.head: HeadStage | None = None  # set by build_pipeline on the last stage
        self.begin({}, 1, 1, 1.0)

    def begin(self, totals: dict, micro_batches: int, data_ranks: int, scale: float) -> None:
        self.totals, self.micro_batches, self.data_ranks = totals, micro_batches, data_ranks
        self.scale = scale
        # The keys of the whole batch, on every data rank (their values are summed over them).
        heads = [f"loss/{k}" for k in totals if k not in ("text", "mtp")]
        keys = ("loss", "loss/text", "loss/mtp", "loss/aux", "loss/z", *heads)
        self.values: dict[str, float] = dict.fromkeys(keys, 0.0)

    @paddle.no_grad()
    def global_counts(self, batch) -> dict:
        """Target counts of a whole batch (model tensors): text, MTP and every modality head's loss.
        A head reports its count with its loss, so the heads run once on a zero hidden state."""
        labels = batch["labels"]
        counts = {
            "text": float((labels != IGNORE).sum()),
            "mtp": float((mtp_labels(labels) != IGNORE).sum()),
        }
        if self.head is not None and len(self.head.heads):
            b, s = labels.shape
            h = paddle.zeros([b, s, self.cfg.hidden_size], dtype="float32")
            extra = {name: head(h, batch) for name, head in self.head.heads.items()}
            out = ModelOutput(None, None, h, {}, extra)
            for key, (_, count, _) in head_losses(self.head.heads, out, batch).items():
                counts[key] = float(count)
        return counts

    def __call__(self, acts, batch):
        cfg, head = self.cfg, self.head
        a = cfg.attention
        cos, sin = rope_cos_sin(acts["positions"], a.head_dim, a.rope_base, a.rope_sections)
        attn_args = (cos, sin, acts["mask"], _causal(acts))
        out = output_heads(head, acts["hidden"], batch, attn_args, acts.get("next_embed"))
        labels = batch["labels"]
        parts = compute_loss(out, labels, cfg, head_losses(head.heads, out, batch))

        def share(mean, count, key):
            return mean * (float(count) / max(self.totals[key], 1.0))

        terms = {"loss/text": share(parts.text, parts.num_targets, "text")}
        total = terms["loss/text"]
        for key, (loss, count, weight) in parts.heads.items():
            terms[f"loss/{key}"] = share(loss, count, key)
            total = total + weight * terms[f"loss/{key}"]
        terms["loss/mtp"] = paddle.zeros([], dtype="float32")
        if parts.mtp is not None:
            count = (mtp_labels(labels) != IGNORE).sum()
            terms["loss/mtp"] = share(parts.mtp, count, "mtp")
            total = total + cfg.mtp_loss_weight * terms["loss/mtp"]
        parts_of_step = self.micro_batches * self.data_ranks
        terms["loss/aux"] = acts["aux"].reshape([]) / parts_of_step
        terms["loss/z"] = acts["z"].reshape([]) / parts_of_step
        if cfg.moe.aux_loss_weight > 0:
            total = total + cfg.moe.aux_loss_weight * terms["loss/aux"]
        if cfg.moe.z_loss_weight > 0:
            total = total + cfg.moe.z_loss_weight * terms["loss/z"]
        for key, value in {"loss": total, **terms}.items():
            self.values[key] += float(value)
        return total * (self.scale * self.micro_batches)

"""Frozen configuration: dataclasses, YAML recipes with `base:` inheritance, dotted overrides.

A recipe is a YAML mapping whose top-level keys are the sections of `Config` (model, data, train,
parallel, elastic, visual_tokenizer, vision_judge, vision_merger, ...) plus an optional `base:` path
(relative to the recipe) that it is merged over.
Overrides on the command line are `section.key=value` with the value parsed as YAML.

Every problem is reported as one `ConfigError` naming the key, the bad value and what is allowed;
the CLI turns it into a one-line message and exit code 2 before any work starts. This module does not
import paddle so that entry points can set the thread count before paddle is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from .errors import UserError


class ConfigError(UserError, ValueError):
    """A recipe or override is wrong; the message names the key, the value and what is allowed."""


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class AttentionConfig:
    num_heads: int = 4
    num_kv_heads: int = 2  # GQA: num_heads must be a multiple of it
    head_dim: int = 32
    rope_base: float = 1e6  # ERNIE5.md
    # Uni-RoPE: share of rotary frequency pairs given to the (t, h, w) axes. Not disclosed; we follow
    # the usual multimodal-RoPE split that gives time a quarter and the two spatial axes the rest.
    rope_sections: tuple[float, float, float] = (0.25, 0.375, 0.375)
    # auto: Paddle's flashmask_attention on a GPU build with fp16/bf16, the CPU FlashMask op otherwise.
    backend: str = "auto"

    def validate(self, at: str) -> None:
        _check(at, "num_heads", self.num_heads, self.num_heads >= 1, ">= 1")
        _check(at, "num_kv_heads", self.num_kv_heads,
               self.num_kv_heads >= 1 and self.num_heads % self.num_kv_heads == 0,
               f"a divisor of num_heads={self.num_heads}")
        _check(at, "head_dim", self.head_dim, self.head_dim >= 2 and self.head_dim % 2 == 0,
               "an even number >= 2")
        _check(at, "rope_base", self.rope_base, self.rope_base > 1, "> 1")
        _check(at, "rope_sections", self.rope_sections,
               len(self.rope_sections) == 3 and all(s >= 0 for s in self.rope_sections)
               and abs(sum(self.rope_sections) - 1) < 1e-6, "three non-negative shares summing to 1")
        _check(at, "backend", self.backend, self.backend in ("auto", "cpu", "reference", "paddle"),
               "one of auto, cpu, reference, paddle")


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    num_experts: int = 32  # ONE pool shared by every modality (ERNIE5.md)
    top_k: int = 4
    expert_hidden: int = 128  # fine-grained SwiGLU experts
    num_shared_experts: int = 1
    shared_expert_hidden: int = 128
    first_dense_layers: int = 0  # layers before this index use a dense SwiGLU instead of MoE
    # Width of those dense SwiGLUs (and of the MTP block's); 0 = top_k * expert_hidden + shared width,
    # the activated width of an MoE layer.
    dense_hidden: int = 0
    score_func: str = "softmax"  # router scores; top-k weights are renormalised to sum to 1
    bias_update_rate: float = 1e-3  # aux-free balancing; the paper uses 1e-4 at scale
    aux_loss_weight: float = 0.0  # optional sequence-level balance loss
    z_loss_weight: float = 0.0  # optional router z-loss
    capacity_factor: float = 0.0  # 0 = dropless (the default and the paper's choice)
    # Routed experts (paddle_ernie5/ops/moe_experts.py): cpu_op = the C++ op (token rows by index, no
    # padded grid), grouped = batched matmuls over an [E, C, M] grid; auto = cpu_op for CPU tensors,
    # grouped on a GPU. Expert-parallel dispatchers always use grouped.
    expert_backend: str = "auto"

    def dense_width(self) -> int:
        return self.dense_hidden or (self.top_k * self.expert_hidden
                                     + self.num_shared_experts * self.shared_expert_hidden)

    def validate(self, at: str) -> None:
        _check(at, "num_experts", self.num_experts, self.num_experts >= 1, ">= 1")
        _check(at, "top_k", self.top_k, 1 <= self.top_k <= self.num_experts,
               f"1 <= top_k <= num_experts={self.num_experts}")
        _check(at, "expert_hidden", self.expert_hidden, self.expert_hidden >= 1, ">= 1")
        _check(at, "num_shared_experts", self.num_shared_experts, self.num_shared_experts >= 0, ">= 0")
        _check(at, "shared_expert_hidden", self.shared_expert_hidden,
               self.shared_expert_hidden >= 1, ">= 1")
        _check(at, "first_dense_layers", self.first_dense_layers, self.first_dense_layers >= 0, ">= 0")
        _check(at, "dense_hidden", self.dense_hidden, self.dense_hidden >= 0, ">= 0 (0 = derived)")
        _check(at, "score_func", self.score_func, self.score_func in ("softmax", "sigmoid"),
               "softmax or sigmoid")
        _check(at, "bias_update_rate", self.bias_update_rate, self.bias_update_rate >= 0, ">= 0")
        _check(at, "aux_loss_weight", self.aux_loss_weight, self.aux_loss_weight >= 0, ">= 0")
        _check(at, "z_loss_weight", self.z_loss_weight, self.z_loss_weight >= 0, ">= 0")
        _check(at, "capacity_factor", self.capacity_factor,
               self.capacity_factor == 0 or self.capacity_factor >= 1, "0 (dropless) or >= 1")
        _check(at, "expert_backend", self.expert_backend,
               self.expert_backend in ("auto", "cpu_op", "grouped"), "one of auto, cpu_op, grouped")


@dataclass(frozen=True, kw_only=True)
class AudioModelConfig:
    """Audio in the backbone (model/audio.py), used when model.modalities includes audio.

    An audio token is one codec frame: the embeddings of its `levels` RVQ codes are summed. The
    depth-wise head predicts the next frame from the final hidden state: level 0 (with one extra class,
    <eoa>: the speech ends here), then level l from the hidden state plus the embeddings of the codes of
    levels < l (the true codes in training, the sampled ones in generation)."""

    codec_dir: str = "runs/audio_codec"  # trained codec (tokenizers/audio.py); its codes are the tokens
    levels: int = 4  # RVQ levels read and predicted: a prefix of the codec's levels
    codebook_size: int = 256  # must equal the codec's
    embed_dim: int = 64  # per-level code tables, projected to hidden_size; = codec code_dim to init
    init_from_codebooks: bool = False  # a fresh run starts the input tables at the codec's codebooks
    head_hidden: int = 256  # width of each level's MLP in the depth-wise head; 0 = a linear layer
    # Cross-entropy weight per level; () = 1 for level 0 and 0.5 for each residual level. Not disclosed:
    # level 0 carries the words and the end of speech, the residual levels add acoustic detail that
    # Griffin-Lim and the judge barely hear, so they count half.
    level_loss_weights: tuple[float, ...] = ()
    loss_weight: float = 1.0  # weight of the whole audio head in the total loss
    max_frames: int = 50  # generation stops here without <eoa> (2 s at 25 Hz)
    # ASR documents: <bos> <boa> frames <eoa> asr_prompt " transcript" <eos>. Not disclosed. A question
    # such as "What is said?" makes speech recognition one more question answered from a non-text input,
    # like image and video QA; "" = the transcript follows <eoa> directly.
    asr_prompt: str = ""
    judge: str = "runs/speech_judge"  # evaluation only: speech judge scoring generated speech ("" = skip)

    def validate(self, at: str) -> None:
        for name in ("levels", "codebook_size", "embed_dim", "max_frames"):
            _check(at, name, getattr(self, name), getattr(self, name) >= 1, ">= 1")
        _check(at, "head_hidden", self.head_hidden, self.head_hidden >= 0, ">= 0 (0 = linear)")
        w = self.level_weights()
        _check(at, "level_loss_weights", self.level_loss_weights,
               len(w) == self.levels and all(x >= 0 for x in w) and w[0] > 0,
               f"() or levels={self.levels} weights >= 0, the first > 0 (it also scores the end of speech)")
        _check(at, "loss_weight", self.loss_weight, self.loss_weight >= 0, ">= 0")

    def level_weights(self) -> tuple[float, ...]:
        return self.level_loss_weights or (1.0,) + (0.5,) * (self.levels - 1)


@dataclass(frozen=True, kw_only=True)
class VisionModelConfig:
    """Images and video in the backbone (model/vision.py, data/vision_tasks.py), used when
    model.modalities includes image or video.

    Generation: a visual token is the `bits` signs of the frozen tokenizer at one cell of one scale;
    the positions of scale k take the (nearest-upsampled) bits of scale k-1 as input and predict the
    bits of scale k, all cells at once (bidirectional inside a scale, causal to earlier scales and
    frames). Understanding: pre-quantisation tokenizer features, groups of patches merged by
    self-attention, mean-pool and a projection. Choices the paper does not disclose are ours."""

    tokenizer_dir: str = "runs/visual_tokenizer"  # frozen tokenizer (tokenizers/visual.py)
    bits: int = 8  # must equal the tokenizer's bits
    scales: tuple[int, ...] = (1, 2, 4, 8)  # image token-map sides; must equal the tokenizer's scales
    # Video: 8 frames x 85 tokens does not fit a cheap CPU row, so a clip is its first `video_frames`
    # frames, each coded with the first `video_scales` scales (4 x 21 = 84 tokens at 1, 2, 4).
    video_frames: int = 4
    video_scales: int = 3
    # Training robustness: each history (input) bit is flipped with this probability.
    bit_flip_prob: float = 0.05
    # Per-token weight of scale k in the bit loss is scale_loss_decay**k (coarse scales count more per
    # token); scale_loss_weights, when given, sets the per-token weight of every image scale instead.
    scale_loss_decay: float = 0.7
    scale_loss_weights: tuple[float, ...] = ()
    # Video: a frame sees at most `temporal_window` earlier frames (0 = all); in training each earlier
    # frame is hidden from the later ones with probability frame_mask_prob.
    temporal_window: int = 2
    frame_mask_prob: float = 0.1
    # Patch merger (understanding): groups of merge x merge cells (4 patches) for images and
    # merge x merge x merge_frames (16 over 4 frames) for video.
    merge: int = 2
    merge_frames: int = 4
    merger_width: int = 64
    merger_heads: int = 4
    # Add a learned embedding of each group's place in the picture (frame group, row, column) to its
    # merged token. The merger sees one group at a time and Uni-RoPE only steers attention, so without
    # it no token's content says where in the picture it lies (digit shape and motion are then hard).
    merger_position: bool = True
    # Each merged token also gets W[place] x (its pooled group): a projection of its own for every
    # place, so that a plain average of a picture's tokens (what attention does before it has learned
    # anything sharper) is a place-aware linear readout of the whole picture. Without it the backbone
    # must assemble shape from place-blind contents, which a tiny model trained from scratch does not
    # learn in a short run (digit and motion answers stay at chance while colour answers are right).
    merger_place_projection: bool = True
    # Video: each patch of a group also carries its difference from the same cell one frame earlier
    # (zero in the group's first frame), so motion is an input of the merger, not something its one
    # attention layer must discover.
    merger_motion: bool = True
    # A vision_merger run (train/vision_merger.py) whose pre-trained image and video embeddings (patch
    # mergers, place tables) a fresh run starts from; "" = random. Not on resume or train.init_from.
    merger_init: str = ""
    # Kinds (image, video) whose pre-trained merger (and place tables) stay fixed: the backbone learns
    # to read them. Trained further at the backbone's learning rate from the first step, they lose what
    # they learned.
    freeze_merger: tuple[str, ...] = ()
    head_hidden: int = 128  # MLP width of the bit head; 0 = a linear layer
    loss_weight: float = 1.0  # weight of the bit loss in the total
    cond_drop_prob: float = 0.1  # training: caption dropped (unconditional rows for guidance)
    cfg_scale: float = 1.0  # sampling: classifier-free guidance scale (1 = off)
    # Held-out (digit, fg, bg) combinations never used for image generation training; the judged
    # text-to-image accuracy is measured on their captions.
    heldout_combo_fraction: float = 0.15
    judge: str = "runs/vision_judge"  # evaluation only: judge of generated images ("" = skip)
    # Evaluation only: besides the greedy image per held-out caption, this many sampled ones
    # (temperature 1) are judged; one greedy image per prompt leaves the judged rates noisy between
    # runs. 0 = greedy only.
    judge_samples: int = 8

    def merged_places(self, kind: str) -> int:
        """Merged groups in one picture (image) or clip (video): frame groups x rows x columns."""
        frame_groups = -(-self.video_frames // self.merge_frames) if kind == "video" else 1
        return frame_groups * (self.scales[-1] // self.merge) ** 2

    def validate(self, at: str) -> None:
        _check(at, "freeze_merger", self.freeze_merger,
               all(k in ("image", "video") for k in self.freeze_merger)
               and (not self.freeze_merger or bool(self.merger_init)),
               "kinds among image, video, and only with model.vision.merger_init (a pre-trained merger)")
        _check(at, "bits", self.bits, 1 <= self.bits <= 30, "1..30")
        _check(at, "scales", self.scales,
               len(self.scales) >= 1 and self.scales[0] >= 1
               and all(a < b for a, b in zip(self.scales, self.scales[1:])), "increasing sides >= 1")
        _check(at, "video_frames", self.video_frames, self.video_frames >= 1, ">= 1")
        _check(at, "video_scales", self.video_scales, 1 <= self.video_scales <= len(self.scales),
               f"1..len(scales)={len(self.scales)}")
        _check(at, "bit_flip_prob", self.bit_flip_prob, 0 <= self.bit_flip_prob < 0.5, "0 <= p < 0.5")
        _check(at, "scale_loss_decay", self.scale_loss_decay, 0 < self.scale_loss_decay <= 1, "0 < d <= 1")
        _check(at, "scale_loss_weights", self.scale_loss_weights,
               not self.scale_loss_weights or (len(self.scale_loss_weights) == len(self.scales)
                                               and all(w >= 0 for w in self.scale_loss_weights)),
               f"() or {len(self.scales)} weights >= 0")
        _check(at, "temporal_window", self.temporal_window, self.temporal_window >= 0, ">= 0 (0 = all)")
        _check(at, "frame_mask_prob", self.frame_mask_prob, 0 <= self.frame_mask_prob < 1, "0 <= p < 1")
        _check(at, "merge", self.merge, self.merge >= 1 and self.scales[-1] % self.merge == 0,
               f"a divisor of the latent side {self.scales[-1]}")
        _check(at, "merge_frames", self.merge_frames,
               self.merge_frames >= 1 and self.video_frames % self.merge_frames == 0,
               f"a divisor of video_frames={self.video_frames}")
        for name in ("merger_width", "merger_heads"):
            _check(at, name, getattr(self, name), getattr(self, name) >= 1, ">= 1")
        _check(at, "merger_width", self.merger_width, self.merger_width % self.merger_heads == 0,
               f"a multiple of merger_heads={self.merger_heads}")
        _check(at, "head_hidden", self.head_hidden, self.head_hidden >= 0, ">= 0 (0 = linear)")
        _check(at, "loss_weight", self.loss_weight, self.loss_weight >= 0, ">= 0")
        _check(at, "cond_drop_prob", self.cond_drop_prob, 0 <= self.cond_drop_prob < 1, "0 <= p < 1")
        _check(at, "cfg_scale", self.cfg_scale, self.cfg_scale >= 0, ">= 0 (1 = off)")
        _check(at, "judge_samples", self.judge_samples, self.judge_samples >= 0, ">= 0 (0 = greedy only)")
        _check(at, "heldout_combo_fraction", self.heldout_combo_fraction,
               0 <= self.heldout_combo_fraction < 1, "0 <= f < 1")

    def scale_weights(self) -> tuple[float, ...]:
        """Per-token loss weight of each image scale (video frames use the first video_scales)."""
        return self.scale_loss_weights or tuple(self.scale_loss_decay ** k for k in range(len(self.scales)))

    @property
    def tokens_per_image(self) -> int:
        return sum(s * s for s in self.scales)

    @property
    def tokens_per_video_frame(self) -> int:
        return sum(s * s for s in self.scales[:self.video_scales])


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    vocab_size: int = 4096  # text BPE vocabulary; the tokenizer is trained to this size
    hidden_size: int = 128
    num_layers: int = 4
    max_seq_len: int = 256
    rms_eps: float = 1e-6
    init_std: float = 0.02
    tie_embeddings: bool = False
    num_mtp_modules: int = 1  # DeepSeek-V3 style multi-token prediction depth
    mtp_loss_weight: float = 0.3  # ERNIE5.md: 0.3 in the first stage
    modalities: tuple[str, ...] = ("text",)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    audio: AudioModelConfig = field(default_factory=AudioModelConfig)
    vision: VisionModelConfig = field(default_factory=VisionModelConfig)

    def validate(self, at: str) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "max_seq_len"):
            _check(at, name, getattr(self, name), getattr(self, name) >= 1, ">= 1")
        _check(at, "num_mtp_modules", self.num_mtp_modules, self.num_mtp_modules in (0, 1), "0 or 1")
        _check(at, "mtp_loss_weight", self.mtp_loss_weight, self.mtp_loss_weight >= 0, ">= 0")
        _check(at, "modalities", self.modalities,
               len(self.modalities) > 0 and set(self.modalities) <= set(MODALITIES),
               f"a non-empty subset of {list(MODALITIES)}")
        _check(at, "moe.first_dense_layers", self.moe.first_dense_layers,
               self.moe.first_dense_layers <= self.num_layers, f"<= num_layers={self.num_layers}")
        self.attention.validate(f"{at}.attention")
        self.moe.validate(f"{at}.moe")
        self.audio.validate(f"{at}.audio")
        self.vision.validate(f"{at}.vision")

    @property
    def multimodal(self) -> bool:
        return tuple(self.modalities) != ("text",)

    @property
    def text_vocab(self) -> int:
        """Rows of the text embedding and text head: the BPE vocabulary plus, in a multimodal model,
        the modality delimiters (tokenizers/text.SPECIAL_TOKENS: <boi> <eoi> <bov> <eov> <boa> <eoa>)."""
        return self.vocab_size + (len(SPECIAL_TOKENS) if self.multimodal else 0)


MODALITIES = ("text", "image", "video", "audio")
# Delimiters of modality spans, ids vocab_size + index (multimodal models only; ModelConfig.text_vocab).
MIXTURE_MODALITY = {"text": "text", "image_gen": "image", "image_qa": "image", "video_gen": "video",
                    "video_qa": "video", "asr": "audio", "tts": "audio"}
SPECIAL_TOKENS = ("<boi>", "<eoi>", "<bov>", "<eov>", "<boa>", "<eoa>")
TASKS = ("pretrain", "visual_tokenizer", "vision_judge", "vision_merger", "audio_codec", "speech_judge", "sft",
         "rl")


@dataclass(frozen=True, kw_only=True)
class MixtureConfig:
    """Sampling weights of the pretraining tasks (data/mixture.py). All non-text weights 0 (the default)
    means the plain packed text loader; otherwise each document of a row is drawn from the tasks in
    proportion to these weights. The task names are the keys of data/mixture.TASKS."""

    text: float = 1.0  # pretraining text (data/text.py)
    image_gen: float = 0.0  # caption -> image (next-scale bits)
    image_qa: float = 0.0  # image + question -> answer
    video_gen: float = 0.0  # caption -> video (next-frame-and-scale bits)
    video_qa: float = 0.0  # video + question -> answer
    asr: float = 0.0  # speech -> transcript
    tts: float = 0.0  # transcript -> speech (depth-wise codec codes)

    def weights(self) -> dict[str, float]:
        return {f.name: float(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def validate(self, at: str) -> None:
        for name, w in self.weights().items():
            _check(at, name, w, w >= 0, ">= 0")
        _check(at, "text", self.text, sum(self.weights().values()) > 0, "at least one weight > 0")

    @property
    def enabled(self) -> bool:
        return any(w > 0 for k, w in self.weights().items() if k != "text")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    seq_len: int = 256
    bpe_dropout: float = 0.0  # BPE-dropout probability during training (0 = off)
    val_fraction: float = 0.05
    cache_dir: str = ".cache/paddle_ernie5"  # tokenizer models and built datasets
    eval_batches: int = 0  # 0 = the whole validation split
    mixture: MixtureConfig = field(default_factory=MixtureConfig)

    def validate(self, at: str) -> None:
        self.mixture.validate(f"{at}.mixture")
        _check(at, "seq_len", self.seq_len, self.seq_len >= 8, ">= 8")
        _check(at, "bpe_dropout", self.bpe_dropout, 0 <= self.bpe_dropout < 1, "0 <= p < 1")
        _check(at, "val_fraction", self.val_fraction, 0 < self.val_fraction < 0.5, "0 < f < 0.5")
        _check(at, "eval_batches", self.eval_batches, self.eval_batches >= 0, ">= 0")


@dataclass(frozen=True, kw_only=True)
class ClipConfig:
    """Gradient clipping, applied once per optimizer step to the accumulated, reduced gradients.

    global: scale all gradients so their global L2 norm is at most train.clip_norm.
    adagc: AdaGC (arXiv 2502.11034), per-tensor clipping against an EMA of each tensor's own clipped
    norms: h = min(1, lambda_rel * gamma / ||g||), gamma <- beta * gamma + (1 - beta) * ||h g||. For the
    first `warmup_steps` steps it clips globally at lambda_abs while gamma tracks each tensor's running
    minimum clipped norm. The defaults (beta 0.98, lambda_rel 1.05, lambda_abs = the global clip value,
    100 warm-up steps) are the settings published with the paper. Tensors without a gradient in a step
    (layers an elastic view skipped) keep their state."""

    mode: str = "global"  # global | adagc
    beta: float = 0.98
    lambda_rel: float = 1.05
    lambda_abs: float = 0.0  # warm-up global threshold; 0 = train.clip_norm
    warmup_steps: int = 100

    def validate(self, at: str) -> None:
        _check(at, "mode", self.mode, self.mode in ("global", "adagc"), "global or adagc")
        _check(at, "beta", self.beta, 0 <= self.beta < 1, "0 <= beta < 1")
        _check(at, "lambda_rel", self.lambda_rel, self.lambda_rel > 0, "> 0")
        _check(at, "lambda_abs", self.lambda_abs, self.lambda_abs >= 0, ">= 0 (0 = train.clip_norm)")
        _check(at, "warmup_steps", self.warmup_steps, self.warmup_steps >= 0, ">= 0")


@dataclass(frozen=True, kw_only=True)
class SimRegConfig:
    """SimReg: a supervised-contrastive loss on the final hidden states added to the objective,
    total = CE + weight * L_sim. Within one document, positions whose next-token labels agree are
    positives and the others negatives; up to `max_anchors` anchors per sequence are sampled (seeded by
    train.seed and the step, so resumed runs draw the same ones). Weight and temperature are our choice."""

    enabled: bool = False
    # At initialisation of the tiny recipe the SimReg gradient (temperature 0.1) is ~5x the CE one, so a
    # weight of 0.05 keeps it at about a quarter of the objective's gradient under one clipping budget.
    weight: float = 0.05
    temperature: float = 0.1  # cosine similarities are divided by it (the usual SupCon value)
    max_anchors: int = 64  # anchors per sequence; cost is O(seq_len * max_anchors) per sequence

    def validate(self, at: str) -> None:
        _check(at, "weight", self.weight, self.weight >= 0, ">= 0")
        _check(at, "temperature", self.temperature, self.temperature > 0, "> 0")
        _check(at, "max_anchors", self.max_anchors, self.max_anchors >= 1, ">= 1")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    run_dir: str = "runs/pretrain_tiny"
    max_steps: int = 600
    batch_size: int = 8  # sequences per micro-batch
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr: float = 3e-4
    schedule: str = "wsd"  # wsd (warmup-stable-decay, ERNIE5.md 8K stage) | cosine
    warmup_steps: int = 50
    decay_fraction: float = 0.2  # WSD: share of steps spent decaying to min_lr
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0  # global-norm clipping threshold (clip.mode=global); 0 disables
    clip: ClipConfig = field(default_factory=ClipConfig)
    simreg: SimRegConfig = field(default_factory=SimRegConfig)
    seed: int = 1234
    threads: int = 0  # intra-op CPU threads; 0 = all cores
    log_every: int = 10
    eval_every: int = 200
    save_every: int = 200
    keep_last: int = 2
    resume: str = "auto"  # auto: continue from the newest complete checkpoint | never
    # Start from these model weights (a run dir, a checkpoint dir or an exported model) when the run
    # has no checkpoint of its own yet; optimizer and data start fresh. "" = random initialisation.
    init_from: str = ""
    visualdl: bool = True
    progress: bool = True

    def validate(self, at: str) -> None:
        for name in ("max_steps", "batch_size", "grad_accum", "log_every", "eval_every",
                     "save_every", "keep_last"):
            _check(at, name, getattr(self, name), getattr(self, name) >= 1, ">= 1")
        _check(at, "lr", self.lr, self.lr > 0, "> 0")
        _check(at, "min_lr", self.min_lr, 0 <= self.min_lr <= self.lr, f"0 <= min_lr <= lr={self.lr}")
        _check(at, "schedule", self.schedule, self.schedule in ("wsd", "cosine"), "wsd or cosine")
        _check(at, "warmup_steps", self.warmup_steps, 0 <= self.warmup_steps <= self.max_steps,
               f"0 <= warmup_steps <= max_steps={self.max_steps}")
        _check(at, "decay_fraction", self.decay_fraction, 0 <= self.decay_fraction <= 1, "0..1")
        _check(at, "weight_decay", self.weight_decay, self.weight_decay >= 0, ">= 0")
        _check(at, "beta1", self.beta1, 0 <= self.beta1 < 1, "0 <= beta1 < 1")
        _check(at, "beta2", self.beta2, 0 <= self.beta2 < 1, "0 <= beta2 < 1")
        _check(at, "eps", self.eps, self.eps > 0, "> 0")
        _check(at, "clip_norm", self.clip_norm, self.clip_norm >= 0, ">= 0 (0 disables)")
        _check(at, "threads", self.threads, self.threads >= 0, ">= 0 (0 = all cores)")
        _check(at, "resume", self.resume, self.resume in ("auto", "never"), "auto or never")
        self.clip.validate(f"{at}.clip")
        self.simreg.validate(f"{at}.simreg")


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    dp: int = 1
    sharding: int = 1
    sharding_stage: int = 1
    ep: int = 1
    pp: int = 1
    mp: int = 1
    # Rank layout, slowest axis first. Expert-parallel ranks split Fleet's data axis, so ep comes
    # directly after dp (parallel/topology.py).
    order: tuple[str, ...] = ("dp", "ep", "pp", "sharding", "mp")
    # auto: all-to-all on a GPU build (NCCL), all-gather otherwise (works on gloo).
    dispatcher: str = "auto"  # auto | local | allgather | alltoall
    # Fleet pipeline schedule on GPUs (parallel/pipeline.py); micro-batches per step = train.grad_accum.
    pp_schedule: str = "1F1B"  # 1F1B | FThenB | VPP
    pp_chunks: int = 1  # virtual stages per rank (VPP); 1 otherwise

    def validate(self, at: str) -> None:
        for name in ("dp", "sharding", "ep", "pp", "mp"):
            _check(at, name, getattr(self, name), getattr(self, name) >= 1, ">= 1")
        _check(at, "sharding_stage", self.sharding_stage, self.sharding_stage in (1, 2, 3), "1, 2 or 3")
        _check(at, "order", self.order,
               sorted(self.order) == sorted(("dp", "pp", "sharding", "ep", "mp"))
               and self.order.index("ep") == self.order.index("dp") + 1,
               "a permutation of dp, pp, sharding, ep, mp with ep directly after dp")
        _check(at, "dispatcher", self.dispatcher,
               self.dispatcher in ("auto", "local", "allgather", "alltoall"),
               "one of auto, local, allgather, alltoall")
        _check(at, "pp_schedule", self.pp_schedule, self.pp_schedule in ("1F1B", "FThenB", "VPP"),
               "one of 1F1B, FThenB, VPP")
        _check(at, "pp_chunks", self.pp_chunks,
               self.pp_chunks >= 1 and (self.pp_chunks == 1 or self.pp_schedule == "VPP"),
               ">= 1, and > 1 only with pp_schedule=VPP")


@dataclass(frozen=True, kw_only=True)
class ElasticConfig:
    """Once-for-all sampling of sub-models (depth, expert width, top-k), one draw per micro-batch.

    Each axis independently keeps the full setting with its `*_full_prob` (ERNIE5.md: 0.75-0.8),
    otherwise draws uniformly: a layer count in [min_layers, L-1], an expert-subset size in
    [min_experts, E-1], a top-k in [1, k-1]. Which layers and experts: `depth_rule` and `width_rule`."""

    enabled: bool = False
    depth_full_prob: float = 0.75
    min_layers: int = 1
    # even: keep n layers evenly spaced over the depth, first and last included; prefix: the first n.
    depth_rule: str = "even"
    width_full_prob: float = 0.8
    min_experts: int = 0  # smallest expert subset; 0 = model.moe.top_k
    # random: a uniformly random subset each draw (so any subset can be exported later); prefix: 0..n-1.
    width_rule: str = "random"
    topk_full_prob: float = 0.8
    # true: when the draw is a proper sub-model, the micro-batch also trains the full model and the loss
    # is their weighted mean (ERNIE5.md: full and sampled sub-models in the same backward pass); costs
    # up to 2x compute per step. false: the micro-batch trains the drawn view only.
    full_every_step: bool = True
    # With full_every_step, the weight of the sub-model's loss beside the full model's 1; the two are
    # normalised to sum to 1 (0.5: the full model gets 2/3 of the micro-batch's gradient, 1: the mean).
    sub_loss_weight: float = 0.5
    # With full_every_step, in-place distillation: the sub-model's loss also gets this weight x the mean
    # KL(full || sub) of the next-token distributions over the text targets, the full model's (from
    # the same micro-batch, detached) as the teacher. 0 = labels only.
    distill_weight: float = 0.0

    def validate(self, at: str) -> None:
        for name in ("depth_full_prob", "width_full_prob", "topk_full_prob"):
            _check(at, name, getattr(self, name), 0 <= getattr(self, name) <= 1, "0..1")
        _check(at, "min_layers", self.min_layers, self.min_layers >= 1, ">= 1")
        _check(at, "sub_loss_weight", self.sub_loss_weight, self.sub_loss_weight > 0, "> 0")
        _check(at, "distill_weight", self.distill_weight, self.distill_weight >= 0, ">= 0 (0 = off)")
        _check(at, "min_experts", self.min_experts, self.min_experts >= 0, ">= 0 (0 = top_k)")
        _check(at, "depth_rule", self.depth_rule, self.depth_rule in ("even", "prefix"), "even or prefix")
        _check(at, "width_rule", self.width_rule, self.width_rule in ("random", "prefix"),
               "random or prefix")


@dataclass(frozen=True, kw_only=True)
class VisualTokenizerConfig:
    """Multi-scale bit-wise visual tokenizer (tokenizers/visual.py), trained by task visual_tokenizer.

    A frame of image_size^2 pixels becomes a latent of (image_size / downsample)^2 cells; each scale
    in `scales` is a token map of that side whose tokens are `bits` signs (vocabulary 2**bits)."""

    image_size: int = 16  # frames are image_size x image_size RGB
    frames: int = 8  # frames per video clip in training and evaluation
    width: int = 32  # channels of the first conv stage; doubled per downsampling, capped at 4x
    downsample: int = 2  # pixels per latent cell side (a power of 2)
    bits: int = 8
    scales: tuple[int, ...] = (1, 2, 4, 8)  # token-map sides, increasing; the last is the latent side
    # Progressive bits (ERNIE5.md): training is cut into equal phases that use these many bits, e.g.
    # (4, 8); () = `bits` throughout. Unused bits are zero in the quantised latent.
    bit_schedule: tuple[int, ...] = ()
    temporal_kernel: int = 2  # causal temporal mixing over this frame and k-1 earlier ones
    commit_weight: float = 0.25  # pulls encoder features toward their quantisation
    video_every: int = 2  # add a video batch every n steps; 0 = images only
    video_batch_size: int = 4  # clips per video batch
    image_copies: int = 2  # colourings per handwritten sample in the training images
    judge: str = ""  # a vision_judge run dir: also report its accuracy on reconstructions ("" = skip)

    def validate(self, at: str) -> None:
        for name in ("image_size", "frames", "width", "bits", "temporal_kernel", "video_batch_size",
                     "image_copies"):
            _check(at, name, getattr(self, name), getattr(self, name) >= 1, ">= 1")
        _check(at, "downsample", self.downsample,
               self.downsample >= 1 and self.downsample & (self.downsample - 1) == 0
               and self.image_size % self.downsample == 0,
               f"a power of 2 dividing image_size={self.image_size}")
        _check(at, "bits", self.bits, 1 <= self.bits <= 30, "1..30")
        side = self.image_size // max(1, self.downsample)
        _check(at, "scales", self.scales,
               len(self.scales) >= 1 and all(a < b for a, b in zip(self.scales, self.scales[1:]))
               and self.scales[0] >= 1 and self.scales[-1] == side,
               f"increasing sides >= 1 ending at image_size / downsample = {side}")
        _check(at, "bit_schedule", self.bit_schedule,
               not self.bit_schedule
               or (all(a <= b for a, b in zip(self.bit_schedule, self.bit_schedule[1:]))
                   and self.bit_schedule[0] >= 1 and self.bit_schedule[-1] == self.bits),
               f"() or non-decreasing bit counts >= 1 ending at bits={self.bits}")
        _check(at, "commit_weight", self.commit_weight, self.commit_weight >= 0, ">= 0")
        _check(at, "video_every", self.video_every, self.video_every >= 0, ">= 0 (0 = images only)")


@dataclass(frozen=True, kw_only=True)
class VisionJudgeConfig:
    """Independent classifier of digit, colours and motion (eval/vision_judge.py), task vision_judge."""

    image_size: int = 16
    frames: int = 8
    width: int = 32  # channels of the first conv; doubled at each of the two poolings
    video_every: int = 2  # add a video batch every n steps; 0 = images only (no direction head)
    video_batch_size: int = 16
    image_copies: int = 2

    def validate(self, at: str) -> None:
        for name in ("image_size", "frames", "width", "video_batch_size", "image_copies"):
            _check(at, name, getattr(self, name), getattr(self, name) >= 1, ">= 1")
        _check(at, "image_size", self.image_size, self.image_size >= 8, ">= 8")
        _check(at, "frames", self.frames, self.frames >= 2, ">= 2 (motion needs two frames)")
        _check(at, "video_every", self.video_every, self.video_every >= 0, ">= 0 (0 = images only)")


@dataclass(frozen=True, kw_only=True)
class VisionMergerConfig:
    """Pre-training of the patch mergers (train/vision_merger.py), task vision_merger: which caption
    attributes the mean of a picture's tokens learns to predict, per kind (a kind with none is not
    pre-trained). Colours are left out: they are learned first and at once, and while their heads are
    trained the digit and motion heads stay at chance (measured); the backbone reads colours from the
    merged tokens without help. Images are left out by default: a merger pre-trained on the digit
    (0.73 held out through the mean readout) gave no better image QA after joint training, and frozen
    it lost the colours (docs/benchmarks.md, "Merger pre-training")."""

    image_attributes: tuple[str, ...] = ()
    video_attributes: tuple[str, ...] = ("direction", "speed")

    def validate(self, at: str) -> None:
        image, video = ("digit", "fg", "bg"), ("digit", "fg", "bg", "direction", "speed")
        _check(at, "image_attributes", self.image_attributes,
               all(a in image for a in self.image_attributes), f"a subset of {image}")
        _check(at, "video_attributes", self.video_attributes,
               all(a in video for a in self.video_attributes), f"a subset of {video}")
        _check(at, "image_attributes + video_attributes", self.image_attributes + self.video_attributes,
               len(self.image_attributes + self.video_attributes) > 0, "at least one attribute")


@dataclass(frozen=True, kw_only=True)
class AudioCodecConfig:
    """Mel RVQ codec (tokenizers/audio.py), trained by task audio_codec on the built-in speech.

    16 kHz audio -> 100 Hz log-mel (data/mel.py) -> conv encoder -> frames at `frame_rate` -> `levels`
    residual codebooks of `codebook_size` codes; level 0 also feeds a character CTC head so that it
    carries the words. Mel is turned back into a waveform by Griffin-Lim."""

    frame_rate: float = 25.0  # codec frames per second: 12.5, 25 or 50 (100 Hz mel / 8, 4 or 2)
    levels: int = 4
    codebook_size: int = 256
    code_dim: int = 64
    channels: int = 128  # conv width of encoder and decoder
    res_blocks: int = 2  # residual conv blocks at the codec frame rate, in encoder and in decoder
    codebook_learning: str = "ema"  # ema (k-means-like running averages) | gradient (codebook loss)
    ema_decay: float = 0.99
    commit_weight: float = 0.25
    # A code whose running usage (EMA of assignments per step) falls below this is restarted at a
    # random residual of the current batch.
    dead_code_threshold: float = 0.05
    quantizer_dropout: float = 0.5  # share of steps that train with a random 1..levels prefix of levels
    content_weight: float = 0.5  # character CTC loss on level-0 codes
    max_seconds: float = 1.6  # utterances are zero-padded (masked) to this length in training
    griffin_lim_iters: int = 32
    judge: str = ""  # a speech_judge run dir: also report its accuracy on reconstructions ("" = skip)

    def validate(self, at: str) -> None:
        _check(at, "frame_rate", self.frame_rate, self.frame_rate in (12.5, 25.0, 50.0), "12.5, 25 or 50")
        for name in ("levels", "codebook_size", "code_dim", "channels", "griffin_lim_iters"):
            _check(at, name, getattr(self, name), getattr(self, name) >= 1, ">= 1")
        _check(at, "res_blocks", self.res_blocks, self.res_blocks >= 0, ">= 0")
        _check(at, "codebook_learning", self.codebook_learning,
               self.codebook_learning in ("ema", "gradient"), "ema or gradient")
        _check(at, "ema_decay", self.ema_decay, 0 < self.ema_decay < 1, "0 < decay < 1")
        for name in ("commit_weight", "dead_code_threshold", "content_weight"):
            _check(at, name, getattr(self, name), getattr(self, name) >= 0, ">= 0")
        _check(at, "quantizer_dropout", self.quantizer_dropout, 0 <= self.quantizer_dropout <= 1, "0..1")
        frame_s = 1 / self.frame_rate
        frames = self.max_seconds / frame_s
        _check(at, "max_seconds", self.max_seconds, frames >= 1 and abs(frames - round(frames)) < 1e-6,
               f"a positive multiple of one codec frame ({frame_s:g} s)")


@dataclass(frozen=True, kw_only=True)
class SpeechJudgeConfig:
    """Independent spoken-word classifier (eval/speech_judge.py), task speech_judge."""

    channels: int = 64  # conv width over log-mel frames (25 Hz after the first conv)
    max_seconds: float = 1.2  # input window; shorter speech is placed at a random offset in training
    dropout: float = 0.1

    def validate(self, at: str) -> None:
        _check(at, "channels", self.channels, self.channels >= 1, ">= 1")
        _check(at, "max_seconds", self.max_seconds, 0.2 <= self.max_seconds <= 10, "0.2..10")
        _check(at, "dropout", self.dropout, 0 <= self.dropout < 1, "0 <= p < 1")


@dataclass(frozen=True, kw_only=True)
class RLConfig:
    """RL post-training on verifiable tasks (rl/): GSPO + token-level IcePop (MISC), WPSM, AHRL hints,
    unbiased replay buffer (U-RB) and rollout router replay. ERNIE5.md names the techniques but not
    their constants; where a value is not disclosed the default is our choice and says so.

    `task: sft` reads the task list and problem pools from this section too (the supervised stage)."""

    tasks: tuple[str, ...] = ("arithmetic", "counting")  # verifier task names (rl/verifiers.py, rl/image_qa.py)
    train_problems: int = 4000  # problems drawn per task before the held-out split is removed
    eval_problems: int = 64  # held-out prompts per task for the before/after measurement
    # Share of question texts (by hash) never used for training; image_qa uses the image split instead.
    heldout_fraction: float = 0.2
    prompts_per_step: int = 8  # queries per iteration group (U-RB assigns queries to groups)
    group_size: int = 8  # responses per query; GRPO normalises rewards inside the group
    max_new_tokens: int = 8
    temperature: float = 1.0
    num_minibatches: int = 2  # gradient updates per group; the first is on-policy
    # GSPO: sequence ratio s = exp(mean_t log(pi/pi_old)) clipped to [1 - clip_low, 1 + clip_high]
    # (the GSPO paper's values; ERNIE 5.0 does not disclose its own).
    clip_low: float = 3e-4
    clip_high: float = 4e-4
    # IcePop (MISC): tokens whose train/rollout probability ratio is outside [low, high] are masked.
    # Not disclosed; these are IcePop's published bounds.
    icepop_low: float = 0.5
    icepop_high: float = 5.0
    # WPSM: a response to a query with running accuracy > tau and mean token entropy < eta has its
    # loss scaled by (1 - alpha). Not disclosed (our choice).
    wpsm_tau: float = 0.8
    wpsm_eta: float = 0.3
    wpsm_alpha: float = 0.5
    kl_coef: float = 0.0  # k3 KL to the initial (reference) policy; 0 = off, no reference model kept
    # AHRL: a query whose running pass rate is below hint_below gets the first p_hint of its reference
    # solution, p_hint = p_init * exp(-gamma * t * pass_init(x)), t = iteration. Not disclosed.
    hints: bool = True
    hint_p_init: float = 0.5
    hint_gamma: float = 0.02
    hint_below: float = 0.2
    # U-RB: rollouts for up to `lookahead` future groups run in the background on `rollout_workers`
    # threads with the weights of the step that started them; 0 workers = in the training thread.
    lookahead: int = 1
    rollout_workers: int = 1
    router_replay: bool = True  # the training forward reuses the experts chosen during rollout
    eval_every: int = 0  # held-out reward every N steps; 0 = only before and after

    def validate(self, at: str) -> None:
        _check(at, "tasks", self.tasks, len(self.tasks) > 0 and len(set(self.tasks)) == len(self.tasks),
               "a non-empty list of distinct task names (rl/verifiers.py), e.g. [arithmetic, counting]")
        for name in ("train_problems", "eval_problems", "prompts_per_step", "max_new_tokens",
                     "num_minibatches"):
            _check(at, name, getattr(self, name), getattr(self, name) >= 1, ">= 1")
        _check(at, "group_size", self.group_size, self.group_size >= 2,
               ">= 2 (GRPO compares responses within a group)")
        _check(at, "num_minibatches", self.num_minibatches,
               self.prompts_per_step % self.num_minibatches == 0,
               f"a divisor of prompts_per_step={self.prompts_per_step} (minibatches hold whole groups)")
        _check(at, "heldout_fraction", self.heldout_fraction, 0 < self.heldout_fraction < 1, "0 < f < 1")
        _check(at, "temperature", self.temperature, self.temperature > 0, "> 0 (rollouts sample)")
        _check(at, "clip_low", self.clip_low, 0 <= self.clip_low < 1, "0 <= eps < 1")
        _check(at, "clip_high", self.clip_high, self.clip_high >= 0, ">= 0")
        _check(at, "icepop_low", self.icepop_low, 0 <= self.icepop_low <= 1, "0..1")
        _check(at, "icepop_high", self.icepop_high, self.icepop_high >= 1, ">= 1")
        for name in ("wpsm_tau", "wpsm_alpha", "hint_p_init", "hint_below"):
            _check(at, name, getattr(self, name), 0 <= getattr(self, name) <= 1, "0..1")
        for name in ("wpsm_eta", "kl_coef", "hint_gamma", "lookahead", "rollout_workers", "eval_every"):
            _check(at, name, getattr(self, name), getattr(self, name) >= 0, ">= 0")


@dataclass(frozen=True, kw_only=True)
class Config:
    name: str = "pretrain_tiny"
    # What `ernie5 train` runs: the backbone, or one of the separately trained components
    # (train/tasks.py maps each name to its trainer).
    task: str = "pretrain"
    # large: the recipe only sizes a model (config + parameter count, the planner); never allocated.
    build_only: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    elastic: ElasticConfig = field(default_factory=ElasticConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    visual_tokenizer: VisualTokenizerConfig = field(default_factory=VisualTokenizerConfig)
    vision_judge: VisionJudgeConfig = field(default_factory=VisionJudgeConfig)
    vision_merger: VisionMergerConfig = field(default_factory=VisionMergerConfig)
    audio_codec: AudioCodecConfig = field(default_factory=AudioCodecConfig)
    speech_judge: SpeechJudgeConfig = field(default_factory=SpeechJudgeConfig)

    def validate(self) -> "Config":
        _check("config", "task", self.task, self.task in TASKS, f"one of {', '.join(TASKS)}")
        self.model.validate("model")
        self.data.validate("data")
        self.train.validate("train")
        self.parallel.validate("parallel")
        self.elastic.validate("elastic")
        self.rl.validate("rl")
        _check("train.clip", "mode", self.train.clip.mode,
               self.train.clip.mode == "global" or self.task == "pretrain",
               f"global for task {self.task!r} (only the pretraining trainer implements adagc)")
        for task, w in self.data.mixture.weights().items():
            need = MIXTURE_MODALITY[task]
            _check("data.mixture", task, w, w == 0 or need in self.model.modalities,
                   f"0 unless model.modalities includes {need!r}")
        self.visual_tokenizer.validate("visual_tokenizer")
        self.vision_judge.validate("vision_judge")
        self.vision_merger.validate("vision_merger")
        self.audio_codec.validate("audio_codec")
        self.speech_judge.validate("speech_judge")
        _check("data", "seq_len", self.data.seq_len, self.data.seq_len <= self.model.max_seq_len,
               f"<= model.max_seq_len={self.model.max_seq_len}")
        _check("parallel", "ep", self.parallel.ep, self.model.moe.num_experts % self.parallel.ep == 0,
               f"a divisor of model.moe.num_experts={self.model.moe.num_experts}")
        data_ranks = self.parallel.dp * self.parallel.ep * self.parallel.sharding
        _check("train", "batch_size", self.train.batch_size, self.train.batch_size % data_ranks == 0,
               f"a multiple of parallel.dp * ep * sharding = {data_ranks} (batch_size is the global "
               "batch; each rank takes an equal slice)")
        _check("elastic", "min_layers", self.elastic.min_layers,
               self.elastic.min_layers <= self.model.num_layers,
               f"<= model.num_layers={self.model.num_layers}")
        _check("elastic", "min_experts", self.elastic.min_experts,
               self.elastic.min_experts == 0
               or self.model.moe.top_k <= self.elastic.min_experts <= self.model.moe.num_experts,
               f"0 or model.moe.top_k={self.model.moe.top_k} <= min_experts <= "
               f"model.moe.num_experts={self.model.moe.num_experts}")
        return self

    def to_dict(self) -> dict:
        return to_plain(self)


def _check(at: str, key: str, value: Any, ok: bool, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{at}.{key}={value!r} is invalid: allowed {allowed}")


def to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [to_plain(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------
# Building dataclasses from plain mappings, with type checking
# ---------------------------------------------------------------------------------------------


def from_dict(cls: type, data: dict, at: str = "") -> Any:
    """Build dataclass `cls` from a mapping; unknown keys and wrong types raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{at or 'recipe'} must be a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{at}.{key}" if at else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {'.'.join(filter(None, [at, close[0]]))}?)" if close else ""
            raise ConfigError(f"unknown key {path!r}{hint}; known keys here: {', '.join(names)}")
        kwargs[key] = _coerce(hints[key], value, path)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, path: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    origin = typing.get_origin(tp)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}={value!r} has the wrong type: expected a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, path) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{path}={value!r} is invalid: expected a list of {len(args)} values")
        return tuple(_coerce(a, v, path) for a, v in zip(args, value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}={value!r} has the wrong type: expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}={value!r} has the wrong type: expected an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}={value!r} has the wrong type: expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}={value!r} has the wrong type: expected a string")
        return value
    raise TypeError(f"unsupported config field type {tp} at {path}")


# ---------------------------------------------------------------------------------------------
# Recipes
# ---------------------------------------------------------------------------------------------


def _read_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"recipe {path!r} does not exist; recipes live in recipes/*.yaml")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {path!r} is not valid YAML: {e}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path!r} must be a YAML mapping of sections")
    return data


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_recipe_dict(path: str, _seen: tuple[str, ...] = ()) -> dict:
    """The recipe at `path` merged over its `base:` chain (paths relative to each recipe)."""
    path = os.path.abspath(path)
    if path in _seen:
        raise ConfigError(f"recipe {path!r} inherits from itself through base:")
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"base={base!r} in {path!r} must be a path to another recipe")
    return _merge(load_recipe_dict(os.path.join(os.path.dirname(path), base), _seen + (path,)), data)


def parse_overrides(overrides: list[str]) -> dict:
    """['train.max_steps=50', 'model.moe.top_k=2'] -> nested dict with YAML-parsed values."""
    out: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} is malformed: expected section.key=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override of {part!r}")
        node[parts[-1]] = value
    return out


def load_config(path: str, overrides: list[str] | None = None) -> Config:
    """Resolve a recipe plus dotted overrides into a validated, frozen `Config`."""
    data = _merge(load_recipe_dict(path), parse_overrides(overrides or []))
    data.setdefault("name", os.path.splitext(os.path.basename(path))[0])
    return from_dict(Config, data).validate()


def replace(cfg: Any, **changes: Any) -> Any:
    """dataclasses.replace that re-validates a top-level Config."""
    new = dataclasses.replace(cfg, **changes)
    return new.validate() if isinstance(new, Config) else new


def save_config(cfg: Config, path: str) -> None:
    """Write the resolved config (YAML) next to a run; `load_config` reads it back unchanged."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    os.replace(tmp, path)


def config_hash(cfg: Config) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:12]

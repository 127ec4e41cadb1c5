"""Top-level recipe classes, one per kind of training run, chosen by the recipe's `component:`.

`Config` is a backbone recipe (components pretrain, sft, rl): model, data, the full `train`
section, parallel, elastic and rl. `ComponentConfig` is the recipe of a separately trained
component (visual_tokenizer, vision_judge, audio_codec, speech_judge): data (its cache), the loop
settings of `train` (`LoopConfig`) and the component sections. `MergerComponentConfig`
(vision_merger) also has `model`: the merger is pre-trained for the backbone's vision settings.
Every recipe class keeps all five component sections, so a judge's section can be set beside the
tokenizer or codec it scores (a backbone recipe may carry them too).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ._check import _check, to_plain
from .components import (
    AudioCodecConfig,
    SpeechJudgeConfig,
    VisionJudgeConfig,
    VisionMergerConfig,
    VisualTokenizerConfig,
)
from .data import MIXTURE_MODALITY, DataConfig
from .elastic import ElasticConfig
from .generate import GenerateConfig
from .model import ModelConfig
from .parallel import ParallelConfig
from .rl import RLConfig
from .train import LoopConfig, TrainConfig

# What `ernie5 train` runs (train/components.py maps each name to its trainer).
COMPONENTS = (
    "pretrain",
    "visual_tokenizer",
    "vision_judge",
    "vision_merger",
    "audio_codec",
    "speech_judge",
    "sft",
    "rl",
)
# The components trained by the backbone trainers; the others have a recipe class of their own.
BACKBONE_COMPONENTS = ("pretrain", "sft", "rl")


class _Recipe:
    """What every recipe class has besides its fields."""

    def to_dict(self) -> dict:
        return to_plain(self)

    def _validate_components(self) -> None:
        self.visual_tokenizer.validate("visual_tokenizer")
        self.vision_judge.validate("vision_judge")
        self.vision_merger.validate("vision_merger")
        self.audio_codec.validate("audio_codec")
        self.speech_judge.validate("speech_judge")


@dataclass(frozen=True, kw_only=True)
class Config(_Recipe):
    """A backbone recipe: pretraining (pretrain) or its supervised (sft) and RL (rl) stages."""

    name: str = "pretrain_tiny"
    component: str = "pretrain"
    # large: the recipe only sizes a model (config + parameter count, the planner); never allocated.
    build_only: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    elastic: ElasticConfig = field(default_factory=ElasticConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    # Sampling with a KV cache (`ernie5 generate --text`; its flags override these).
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    visual_tokenizer: VisualTokenizerConfig = field(default_factory=VisualTokenizerConfig)
    vision_judge: VisionJudgeConfig = field(default_factory=VisionJudgeConfig)
    vision_merger: VisionMergerConfig = field(default_factory=VisionMergerConfig)
    audio_codec: AudioCodecConfig = field(default_factory=AudioCodecConfig)
    speech_judge: SpeechJudgeConfig = field(default_factory=SpeechJudgeConfig)

    def validate(self) -> Config:
        _check(
            "config",
            "component",
            self.component,
            self.component in BACKBONE_COMPONENTS,
            f"one of {', '.join(BACKBONE_COMPONENTS)} in a backbone recipe (Config)",
        )
        self.model.validate("model")
        self.data.validate("data")
        self.train.validate("train")
        self.parallel.validate("parallel")
        self.elastic.validate("elastic")
        self.rl.validate("rl")
        self.generate.validate("generate")
        _check(
            "train.clip",
            "mode",
            self.train.clip.mode,
            self.train.clip.mode == "global" or self.component == "pretrain",
            f"global for component {self.component!r} (only the pretraining trainer implements "
            "adagc)",
        )
        _check(
            "train",
            "precision",
            self.train.precision,
            self.train.precision == "fp32" or self.component == "pretrain",
            f"fp32 for component {self.component!r} (only the pretraining trainer implements "
            "bf16 and fp16)",
        )
        for source, w in self.data.mixture.weights().items():
            need = MIXTURE_MODALITY[source]
            _check(
                "data.mixture",
                source,
                w,
                w == 0 or need in self.model.modalities,
                f"0 unless model.modalities includes {need!r}",
            )
        self._validate_components()
        _check(
            "data",
            "seq_len",
            self.data.seq_len,
            self.data.seq_len <= self.model.max_seq_len,
            f"<= model.max_seq_len={self.model.max_seq_len}",
        )
        for source, w in self.data.mixture.weights().items():
            if w > 0 and MIXTURE_MODALITY[source] in ("image", "video"):
                n, what = self.model.vision.picture_positions(source)
                _check(
                    "data",
                    "seq_len",
                    self.data.seq_len,
                    self.data.seq_len >= n,
                    f">= {n} with data.mixture.{source} > 0: its shortest document holds {what}; "
                    f"raise data.seq_len and model.max_seq_len (text needs room too), make the "
                    f"pictures smaller (model.vision) or set data.mixture.{source}=0",
                )
        _check(
            "parallel",
            "ep",
            self.parallel.ep,
            self.model.moe.num_experts % self.parallel.ep == 0,
            f"a divisor of model.moe.num_experts={self.model.moe.num_experts}",
        )
        uni = self.model.moe.universal
        _check(
            "parallel",
            "pp",
            self.parallel.pp,
            self.parallel.pp == 1 or not uni.enabled,
            "1 with model.moe.universal.enabled (every pipeline stage would need the shared pool)",
        )
        _check(
            "elastic",
            "min_experts",
            self.elastic.min_experts,
            not uni.enabled
            or self.elastic.min_experts <= uni.window_size(self.model.moe.num_experts),
            "<= model.moe.universal.window with a universal pool (experts drawn per window)",
        )
        data_ranks = self.parallel.dp * self.parallel.ep * self.parallel.sharding
        _check(
            "train",
            "batch_size",
            self.train.batch_size,
            self.train.batch_size % data_ranks == 0,
            f"a multiple of parallel.dp * ep * sharding = {data_ranks} (batch_size is the "
            "global batch; each rank takes an equal slice)",
        )
        _check(
            "parallel",
            "micro_batches",
            self.parallel.micro_batches,
            self.parallel.pp == 1
            or (self.train.batch_size // data_ranks) % self.parallel.micro_batches == 0,
            "a divisor of this rank's rows, train.batch_size / (dp * ep * sharding) = "
            f"{self.train.batch_size // data_ranks} (a pipeline pass splits them into "
            "micro-batches)",
        )
        _check(
            "elastic",
            "min_layers",
            self.elastic.min_layers,
            self.elastic.min_layers <= self.model.num_layers,
            f"<= model.num_layers={self.model.num_layers}",
        )
        _check(
            "elastic",
            "min_experts",
            self.elastic.min_experts,
            self.elastic.min_experts == 0
            or self.model.moe.top_k <= self.elastic.min_experts <= self.model.moe.num_experts,
            f"0 or model.moe.top_k={self.model.moe.top_k} <= min_experts <= "
            f"model.moe.num_experts={self.model.moe.num_experts}",
        )
        return self


@dataclass(frozen=True, kw_only=True)
class ComponentConfig(_Recipe):
    """The recipe of a separately trained component: tokenizer, codec or judge."""

    # The components this class is the recipe of.
    for_components: ClassVar[tuple[str, ...]] = (
        "visual_tokenizer",
        "vision_judge",
        "audio_codec",
        "speech_judge",
    )
    build_only: ClassVar[bool] = False  # components are always trained

    name: str = "component"
    component: str = "visual_tokenizer"
    data: DataConfig = field(default_factory=DataConfig)  # components read data.cache_dir
    train: LoopConfig = field(default_factory=LoopConfig)
    visual_tokenizer: VisualTokenizerConfig = field(default_factory=VisualTokenizerConfig)
    vision_judge: VisionJudgeConfig = field(default_factory=VisionJudgeConfig)
    vision_merger: VisionMergerConfig = field(default_factory=VisionMergerConfig)
    audio_codec: AudioCodecConfig = field(default_factory=AudioCodecConfig)
    speech_judge: SpeechJudgeConfig = field(default_factory=SpeechJudgeConfig)

    def validate(self) -> ComponentConfig:
        _check(
            "config",
            "component",
            self.component,
            self.component in self.for_components,
            f"one of {', '.join(self.for_components)} in a {type(self).__name__}",
        )
        self.data.validate("data")
        self.train.validate("train")
        self._validate_components()
        return self


@dataclass(frozen=True, kw_only=True)
class MergerComponentConfig(ComponentConfig):
    """The recipe of the patch-merger pre-training (train/vision_merger.py): a component recipe
    plus the backbone's `model`, whose vision settings (tokenizer, merger shape) it trains for."""

    for_components: ClassVar[tuple[str, ...]] = ("vision_merger",)

    component: str = "vision_merger"
    model: ModelConfig = field(default_factory=ModelConfig)

    def validate(self) -> MergerComponentConfig:
        super().validate()
        self.model.validate("model")
        return self


RECIPE_CLASSES: dict[str, type] = {
    **{c: Config for c in BACKBONE_COMPONENTS},
    **{c: ComponentConfig for c in ComponentConfig.for_components},
    **{c: MergerComponentConfig for c in MergerComponentConfig.for_components},
}

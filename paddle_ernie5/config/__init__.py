"""Frozen configuration: dataclasses, YAML recipes with `base:` inheritance, dotted overrides.

One module per concern: model.py (backbone model and modality constants; its audio and vision
sub-sections in modalities.py), data.py, train.py (`TrainConfig` and the component loops'
`LoopConfig`), parallel.py, elastic.py, rl.py, generate.py (sampling with a KV cache),
components.py (tokenizers, codecs, judges, merger), recipe.py (the top-level recipe classes and
COMPONENTS) and loader.py (YAML, `base:`, overrides, typed construction, save and hash).

Every problem is reported as one `ConfigError` naming the key, the bad value and what is allowed;
the CLI turns it into a one-line message and exit code 2 before any work starts. This package does
not import paddle, so that entry points can set the thread count before paddle is loaded.
"""

from ._check import ConfigError, to_plain
from .components import (
    AudioCodecConfig,
    SpeechJudgeConfig,
    VisionJudgeConfig,
    VisionMergerConfig,
    VisualTokenizerConfig,
)
from .data import MIXTURE_MODALITY, DataConfig, MixtureConfig
from .elastic import ElasticConfig
from .generate import KV_POLICIES, GenerateConfig
from .loader import (
    config_hash,
    from_dict,
    load_config,
    load_recipe_dict,
    parse_overrides,
    replace,
    save_config,
)
from .modalities import AudioModelConfig, VisionModelConfig
from .model import MODALITIES, SPECIAL_TOKENS, AttentionConfig, ModelConfig, MoEConfig
from .parallel import ParallelConfig
from .recipe import (
    BACKBONE_COMPONENTS,
    COMPONENTS,
    RECIPE_CLASSES,
    ComponentConfig,
    Config,
    MergerComponentConfig,
)
from .rl import RLConfig
from .train import ClipConfig, LoopClipConfig, LoopConfig, SimRegConfig, TrainConfig

__all__ = [
    "ConfigError",
    # sections
    "AttentionConfig",
    "MoEConfig",
    "AudioModelConfig",
    "VisionModelConfig",
    "ModelConfig",
    "MixtureConfig",
    "DataConfig",
    "ClipConfig",
    "SimRegConfig",
    "TrainConfig",
    "LoopClipConfig",
    "LoopConfig",
    "ParallelConfig",
    "ElasticConfig",
    "RLConfig",
    "GenerateConfig",
    "VisualTokenizerConfig",
    "VisionJudgeConfig",
    "VisionMergerConfig",
    "AudioCodecConfig",
    "SpeechJudgeConfig",
    # recipes
    "Config",
    "ComponentConfig",
    "MergerComponentConfig",
    "COMPONENTS",
    "BACKBONE_COMPONENTS",
    "RECIPE_CLASSES",
    # constants
    "MODALITIES",
    "SPECIAL_TOKENS",
    "MIXTURE_MODALITY",
    "KV_POLICIES",
    # loading and saving
    "load_config",
    "load_recipe_dict",
    "parse_overrides",
    "from_dict",
    "to_plain",
    "replace",
    "save_config",
    "config_hash",
]

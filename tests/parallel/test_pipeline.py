"""parallel/pipeline.py in one process: every stage of the PipelineLayer built here (Fleet's
topology replaced by one that places this process on the stage wanted). The stages hold exactly the
model's parameters, and run one after another (Fleet's schedule and p2p left out) they give the
model's loss, loss terms and gradients on a multimodal batch split into micro-batches."""

import collections

import numpy as np
import paddle
import pytest

from paddle_ernie5.config import AudioCodecConfig, ConfigError
from paddle_ernie5.model import audio as A
from paddle_ernie5.model.inputs import to_model_batch
from paddle_ernie5.model.losses import compute_loss
from paddle_ernie5.model.model import Ernie5Model
from paddle_ernie5.parallel import fleet_compat
from paddle_ernie5.parallel.pipeline import (
    PipelineObjective,
    build_pipeline,
    model_names,
    stage_bounds,
)
from paddle_ernie5.parallel.pipeline_runtime import _pipeline_batch
from paddle_ernie5.parallel.runtime import _loss_values
from paddle_ernie5.parallel.stages import plan_stages
from paddle_ernie5.tokenizers.audio import AudioCodec

PP = 2


class StageTopology:
    """What PipelineLayer reads of Fleet's topology, with this process on pipeline stage `stage`."""

    def __init__(self, pp: int, stage: int):
        self.pp, self.stage = pp, stage

    def get_coord(self, rank):
        return collections.namedtuple("Coord", "pipe")(self.stage)

    def get_dim_size(self, name):
        return self.pp

    def get_dim(self, name):
        # Read only to decide whether weights shared across stages need groups (which would need
        # fleet.init); the model shares none between stages.
        return 1


@pytest.fixture(scope="module", autouse=True)
def cpu_pipeline():
    # PipelineLayer reads ParallelEnv().device_id, which a CPU build lacks: fleet_compat closes it
    # as on every CPU pipeline run.
    fleet_compat.apply("gloo", pp=PP, cuda=False)


@pytest.fixture
def cfg(debug_config, tmp_path):
    """Debug model with 4 blocks, audio (embeddings and a head with one loss per level), MTP, and
    aux and z losses."""
    paddle.seed(1)
    codec = AudioCodecConfig(
        levels=3, codebook_size=16, code_dim=8, channels=16, res_blocks=0, griffin_lim_iters=2
    )
    AudioCodec(codec).save(str(tmp_path / "codec"))
    return debug_config(
        "model.num_layers=4",
        "model.modalities=[text,audio]",
        f"model.audio.codec_dir={tmp_path / 'codec'}",
        "model.audio.levels=3",
        "model.audio.codebook_size=16",
        "model.audio.embed_dim=8",
        "model.audio.head_hidden=32",
        "model.audio.max_frames=6",
        "model.moe.aux_loss_weight=0.01",
        "model.moe.z_loss_weight=0.001",
        f"parallel.pp={PP}",
        "parallel.micro_batches=2",
    )


def stages(model, cfg):
    return [
        build_pipeline(
            model, cfg.parallel, StageTopology(PP, s), lambda *_: None, PipelineObjective(cfg.model)
        )
        for s in range(PP)
    ]


def audio_batch(cfg, b=4, s=12, seed=0, text_rows=0) -> dict:
    """Text, then audio frames at positions 4..9 with next-frame targets (a TTS layout), numpy; the
    first `text_rows` rows are text only."""
    rng = np.random.default_rng(seed)
    a = cfg.model.audio
    types = np.zeros((b, s), np.int64)
    types[text_rows:, 4:10] = A.AUDIO_TYPE
    codes = np.zeros((b, s, a.levels), np.int64)
    codes[:, 4:10] = rng.integers(0, a.codebook_size, (b, 6, a.levels))
    targets = np.zeros_like(codes)
    mask = np.zeros((b, s, a.levels), np.float32)
    codes[:text_rows] = 0
    targets[:, 3:9], mask[text_rows:, 3:9] = codes[:, 4:10], 1.0
    targets[:3, 9, 0], mask[text_rows:3, 9, 0] = a.codebook_size, 1.0  # <eoa>: counts differ
    ids = rng.integers(0, cfg.model.vocab_size, (b, s))
    ids[types == A.AUDIO_TYPE] = 0
    labels = np.where(types == 0, np.roll(ids, -1, 1), -100)
    labels[0, :3] = -100  # uneven text targets over the micro-batches
    return {
        "input_ids": ids,
        "token_types": types,
        "positions": np.broadcast_to(np.arange(s), (b, s)).copy(),
        "startend_row_indices": np.full((b, 1, s, 1), s, np.int32),
        "labels": labels,
        "audio_codes": codes,
        "audio_targets": targets,
        "audio_target_mask": mask,
    }


def test_stages_hold_exactly_the_models_parameters(cfg):
    model = Ernie5Model(cfg.model)
    params, state = dict(model.named_parameters()), model.state_dict()
    plan = plan_stages(cfg.model, cfg.parallel)
    assert stage_bounds(cfg.model, cfg.parallel)[-1] == cfg.model.num_layers + 2
    held, count = [], 0
    for s, pipe in enumerate(stages(model, cfg)):
        names = model_names(pipe, cfg.model.num_layers)
        held += names.values()
        # the model's own tensors, not copies
        for pipe_name, p in pipe.named_parameters():
            assert p is params[names[pipe_name]]
            count += int(p.numel())
        items = {n.split(".")[0] for n in names.values()}
        want = {"blocks" if i.startswith("block") else i for i in plan[s].items}
        if "head" in want:
            want = (want - {"head"}) | {"norm", "text_head", "mtp", "heads"}
        assert items == want
    assert sorted(held) == sorted(state)  # each parameter and buffer on exactly one stage
    assert count == model.num_params()


@pytest.mark.parametrize("text_rows", [0, 2])  # 2: the first micro-batch holds no audio
def test_stages_in_sequence_give_the_models_loss_and_gradients(cfg, text_rows):
    paddle.seed(0)
    model = Ernie5Model(cfg.model)
    np_batch = audio_batch(cfg, text_rows=text_rows)
    batch = to_model_batch(np_batch)
    out = model(batch)
    parts = compute_loss(out, batch["labels"], cfg.model, model.head_losses(out, batch))
    assert len(parts.heads) == 3 and float(parts.aux) > 0  # one loss per audio level
    parts.total.backward()
    want = {n: p.grad.numpy() for n, p in model.named_parameters() if p.grad is not None}
    model.clear_gradients()

    pipes = stages(model, cfg)
    objective = pipes[-1]._loss_fn[0]
    m = cfg.parallel.micro_batches
    objective.begin(objective.global_counts(batch), m, 1, 1.0)
    rows = len(np_batch["input_ids"]) // m
    for k in range(m):
        micro = _pipeline_batch({key: v[k * rows : (k + 1) * rows] for key, v in np_batch.items()})
        acts = micro
        for pipe in pipes:
            acts = pipe(acts)
        (objective(acts, micro) / m).backward()  # Fleet divides by its accumulate_steps
    values = _loss_values(parts)
    assert sorted(objective.values) == sorted(values)
    for key, value in values.items():
        assert abs(objective.values[key] - value) < 1e-5, key
    got = {n: p.grad.numpy() for n, p in model.named_parameters() if p.grad is not None}
    assert sorted(got) == sorted(want)
    assert max(float(np.abs(got[n] - want[n]).max()) for n in want) < 1e-6


def test_what_the_pipeline_refuses(debug_config):
    model = Ernie5Model(debug_config("model.tie_embeddings=true").model)
    pcfg = debug_config("parallel.pp=2").parallel
    with pytest.raises(ConfigError, match="tie_embeddings=true is invalid with parallel.pp > 1"):
        build_pipeline(model, pcfg, StageTopology(PP, 0), None, None)
    vpp = debug_config("parallel.pp=2", "parallel.pp_schedule=VPP", "parallel.pp_chunks=2")
    with pytest.raises(ConfigError, match="allowed pp_schedule=1F1B with pp_chunks=1"):
        build_pipeline(Ernie5Model(vpp.model), vpp.parallel, StageTopology(PP, 0), None, None)

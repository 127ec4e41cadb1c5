"""The backbone's per-modality sub-sections: `model.audio` (codec frames in, depth-wise codec
heads out) and `model.vision` (next-scale bits for generation, merged patches for understanding).
"""

from __future__ import annotations

from dataclasses import dataclass

from ._check import _check


@dataclass(frozen=True, kw_only=True)
class AudioModelConfig:
    """Audio in the backbone (model/audio.py), used when model.modalities includes audio.

    An audio token is one codec frame: the embeddings of its `levels` RVQ codes are summed. The
    depth-wise head predicts the next frame from the final hidden state: level 0 (with one extra
    class, <eoa>: the speech ends here), then level l from the hidden state plus the embeddings
    of the codes of levels < l (the true codes in training, the sampled ones in generation)."""

    # trained codec (tokenizers/audio.py); its codes are the tokens
    codec_dir: str = "runs/audio_codec"
    levels: int = 4  # RVQ levels read and predicted: a prefix of the codec's levels
    codebook_size: int = 256  # must equal the codec's
    embed_dim: int = 64  # per-level code tables, projected to hidden_size; = codec code_dim to init
    # a fresh run starts the input tables at the codec's codebooks
    init_from_codebooks: bool = False
    head_hidden: int = 256  # width of each level's MLP in the depth-wise head; 0 = a linear layer
    # Cross-entropy weight per level; () = 1 for level 0 and 0.5 for each residual level. Not
    # disclosed: level 0 carries the words and the end of speech, the residual levels add acoustic
    # detail that Griffin-Lim and the judge barely hear, so they count half.
    level_loss_weights: tuple[float, ...] = ()
    loss_weight: float = 1.0  # weight of the whole audio head in the total loss
    max_frames: int = 50  # generation stops here without <eoa> (2 s at 25 Hz)
    # ASR documents: <bos> <boa> frames <eoa> asr_prompt " transcript" <eos>. Not disclosed. A
    # question such as "What is said?" makes speech recognition one more question answered from a
    # non-text input, like image and video QA; "" = the transcript follows <eoa> directly.
    asr_prompt: str = ""
    # evaluation only: speech judge scoring generated speech ("" = skip)
    judge: str = "runs/speech_judge"

    def validate(self, at: str) -> None:
        for name in ("levels", "codebook_size", "embed_dim", "max_frames"):
            _check(at, name, getattr(self, name), getattr(self, name) >= 1, ">= 1")
        _check(at, "head_hidden", self.head_hidden, self.head_hidden >= 0, ">= 0 (0 = linear)")
        w = self.level_weights()
        _check(
            at,
            "level_loss_weights",
            self.level_loss_weights,
            len(w) == self.levels and all(x >= 0 for x in w) and w[0] > 0,
            f"() or levels={self.levels} weights >= 0, the first > 0 (it also scores the end "
            "of speech)",
        )
        _check(at, "loss_weight", self.loss_weight, self.loss_weight >= 0, ">= 0")

    def level_weights(self) -> tuple[float, ...]:
        return self.level_loss_weights or (1.0,) + (0.5,) * (self.levels - 1)


# Classes of the caption heads (VisionModelConfig.caption_loss_weight): digit, direction
# (data/digits.py).
CAPTION_CLASSES = (("digit", 10), ("direction", 4))


@dataclass(frozen=True, kw_only=True)
class VisionModelConfig:
    """Images and video in the backbone (model/vision.py, data/vision_sources.py), used when
    model.modalities includes image or video.

    Generation: a visual token is the `bits` signs of the frozen tokenizer at one cell of one scale;
    the positions of scale k take the (nearest-upsampled) bits of scale k-1 as input and predict the
    bits of scale k, all cells at once (bidirectional inside a scale, causal to earlier scales and
    frames). Understanding: pre-quantisation tokenizer features, groups of patches merged by
    self-attention, mean-pool and a projection. Choices the paper does not disclose are ours."""

    tokenizer_dir: str = "runs/visual_tokenizer"  # frozen tokenizer (tokenizers/visual.py)
    bits: int = 8  # must equal the tokenizer's bits
    # image token-map sides; must equal the tokenizer's scales
    scales: tuple[int, ...] = (1, 2, 4, 8)
    # Video: 8 frames x 85 tokens does not fit a cheap CPU row, so a clip is its first
    # `video_frames` frames, each coded with the first `video_scales` scales
    # (4 x 21 = 84 tokens at scales 1, 2, 4).
    video_frames: int = 4
    # Frames of a clip read for understanding (video QA, the video merger); 0 = video_frames. Apart
    # from video_frames, so that generated clips can be fewer frames at more scales (the 8x8 scale
    # carries the motion: the judge reads direction from reconstructions of 4 frames x scales
    # 1, 2, 4 at 0.53, of 2 frames x scales 1, 2, 4, 8 at 0.88) while understanding keeps 4.
    video_qa_frames: int = 0
    video_scales: int = 3
    # Training robustness: each history (input) bit is flipped with this probability.
    bit_flip_prob: float = 0.05
    # Per-token weight of scale k in the bit loss is scale_loss_decay**k (coarse scales count more
    # per token); scale_loss_weights, when given, sets the per-token weight of every image scale
    # instead.
    scale_loss_decay: float = 0.7
    scale_loss_weights: tuple[float, ...] = ()
    # Video: a frame sees at most `temporal_window` earlier frames (0 = all); in training each
    # earlier frame is hidden from the later ones with probability frame_mask_prob.
    temporal_window: int = 2
    frame_mask_prob: float = 0.1
    # Patch merger (understanding): groups of merge x merge cells (4 patches) for images and
    # merge x merge x merge_frames (16 over 4 frames) for video.
    merge: int = 2
    merge_frames: int = 4
    merger_width: int = 64
    merger_heads: int = 4
    # Add a learned embedding of each group's place in the picture (frame group, row, column) to its
    # merged token. The merger sees one group at a time and Uni-RoPE only steers attention, so
    # without it no token's content says where in the picture it lies (digit shape and motion are
    # then hard).
    merger_position: bool = True
    # Each merged token also gets W[place] x (its pooled group): a projection of its own for every
    # place, so that a plain average of a picture's tokens (what attention does before it has
    # learned anything sharper) is a place-aware linear readout of the whole picture. Without it the
    # backbone must assemble shape from place-blind contents, which a tiny model trained from
    # scratch does not learn in a short run (digit and motion answers stay at chance while colour
    # answers are right).
    merger_place_projection: bool = True
    # Video: each patch of a group also carries its difference from the same cell one frame earlier
    # (zero in the group's first frame), so motion is an input of the merger, not something its one
    # attention layer must discover.
    merger_motion: bool = True
    # A vision_merger run (train/vision_merger.py) whose pre-trained image and video embeddings
    # (patch mergers, place tables) a fresh run starts from; "" = random. Not on resume or
    # train.init_from.
    merger_init: str = ""
    # Kinds (image, video) whose pre-trained merger (and place tables) stay fixed: the backbone
    # learns to read them. Trained further at the backbone's learning rate from the first step, they
    # lose what they learned.
    freeze_merger: tuple[str, ...] = ()
    head_hidden: int = 128  # MLP width of the bit head; 0 = a linear layer
    # Each generation position also gets a learned embedding of its place: (frame, scale, cell),
    # batch key vis_cell. Uni-RoPE only steers attention, so without it a token's own content (its
    # parent's bits and its scale) does not say which cell it codes: the caption's colours are
    # drawn (they are the same in every cell) but not the digit's shape.
    cell_embedding: bool = False
    # Generation-side auxiliary: a linear head reads, at every generation position, the share of its
    # cell that the digit covers (its ink: a colour-free map of the shape, from the built-in digits'
    # pixels and colours) off the final hidden state; mean squared error x this weight (0 = off).
    # A bit of a cell flips with the colours (the same stroke is +1 on one colour pair and -1 on
    # another), so the bit loss alone asks for digit x cell x colours at once; the ink asks for
    # digit x cell, and the bit head adds the colours.
    shape_loss_weight: float = 0.0
    # Generation-side auxiliary: linear heads read the caption's digit (and, for clips, its
    # direction) off every generation position's final hidden state; cross-entropy x this weight
    # (0 = off; rows whose caption was dropped have no target). The bit loss depends on the digit
    # only through its shape in one cell under one colour pair; this asks every position for the
    # digit itself, so that attention carries it from the caption into the picture.
    caption_loss_weight: float = 0.0
    # Pooled caption conditioning: every generation position's input also gets the mean of a
    # table of its own over the caption's tokens (at most this many; 0 = off, batch key
    # vis_prompt), as pooled text embeddings condition text-to-image models. Through attention
    # alone the bits of a tiny model never come to depend on the caption's digit in a short run.
    caption_pooling: int = 0
    # Clips: every generation position of frame t > 0 also gets a linear embedding of frame t-1's
    # bits at the same scale in its cell and the cells up to this many rows and columns away
    # (wrapping round the edges, as the built-in clips do; batch key vis_prev; 0 = off). In
    # training frame t-1 is the true frame, in sampling the generated one. Through attention alone
    # the second frame does not copy the first (teacher-forced bit loss of frame 2 is hardly below
    # frame 1's, and a true frame 1 is not carried over); with its neighbourhood in the input,
    # "the previous frame shifted by the caption's direction" is a local read.
    temporal_context: int = 0
    # Caption -> clip documents (video_gen) roll every clip (all frames alike; the built-in clips
    # wrap round the edges, so this is another clip of the same digit, colours and motion) so that
    # the digit's ink centroid in the first frame sits at the frame's centre
    # (data/vision_sources.centre_clips). The caption does not say where the digit starts; learned
    # from clips that start anywhere, the first frame's bits are a mixture over places, and bits
    # decoded per cell (greedy, or sampled independently) draw a flat background without a digit.
    # Understanding (video_qa) keeps the clips as they are.
    centre_clips: bool = False
    loss_weight: float = 1.0  # weight of the bit loss in the total
    cond_drop_prob: float = 0.1  # training: caption dropped (unconditional rows for guidance)
    cfg_scale: float = 1.0  # sampling: classifier-free guidance scale (1 = off)
    # Sampling clips: their guidance scale (0 = cfg_scale). The second frame's motion is what the
    # caption's direction changes; guidance scales that change up.
    video_cfg_scale: float = 0.0
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
        frame_groups = -(-self.qa_frames // self.merge_frames) if kind == "video" else 1
        return frame_groups * (self.scales[-1] // self.merge) ** 2

    def picture_positions(self, source: str) -> tuple[int, str]:
        """(fewest positions, what they are) of a document of `source` (image_gen, video_gen,
        image_qa, video_qa): its picture and delimiters plus the least text it can hold (none for
        generation, whose caption may be dropped; one question and one answer token for QA)."""
        kind = source.split("_")[0]
        if source.endswith("_gen"):
            if kind == "image":
                tokens, how = sum(s * s for s in self.scales), f"scales {list(self.scales)}"
            else:
                per_frame = sum(s * s for s in self.scales[: self.video_scales])
                tokens = self.video_frames * per_frame
                how = f"{self.video_frames} frames x {per_frame} tokens"
            return 3 + tokens, f"the {kind} ({tokens} tokens: {how}) and 3 delimiters"
        places = self.merged_places(kind)
        return 6 + places, f"the {kind} ({places} merged tokens), 4 delimiters and a 2-token QA"

    def validate(self, at: str) -> None:
        _check(
            at,
            "freeze_merger",
            self.freeze_merger,
            all(k in ("image", "video") for k in self.freeze_merger)
            and (not self.freeze_merger or bool(self.merger_init)),
            "kinds among image, video, and only with model.vision.merger_init (a pre-trained "
            "merger)",
        )
        _check(at, "bits", self.bits, 1 <= self.bits <= 30, "1..30")
        _check(
            at,
            "scales",
            self.scales,
            len(self.scales) >= 1
            and self.scales[0] >= 1
            and all(a < b for a, b in zip(self.scales, self.scales[1:])),
            "increasing sides >= 1",
        )
        _check(at, "video_frames", self.video_frames, self.video_frames >= 1, ">= 1")
        _check(
            at,
            "video_qa_frames",
            self.video_qa_frames,
            self.video_qa_frames >= 0,
            ">= 0 (0 = video_frames)",
        )
        _check(
            at,
            "video_scales",
            self.video_scales,
            1 <= self.video_scales <= len(self.scales),
            f"1..len(scales)={len(self.scales)}",
        )
        _check(
            at, "bit_flip_prob", self.bit_flip_prob, 0 <= self.bit_flip_prob < 0.5, "0 <= p < 0.5"
        )
        _check(
            at,
            "scale_loss_decay",
            self.scale_loss_decay,
            0 < self.scale_loss_decay <= 1,
            "0 < d <= 1",
        )
        _check(
            at,
            "scale_loss_weights",
            self.scale_loss_weights,
            not self.scale_loss_weights
            or (
                len(self.scale_loss_weights) == len(self.scales)
                and all(w >= 0 for w in self.scale_loss_weights)
            ),
            f"() or {len(self.scales)} weights >= 0",
        )
        _check(
            at, "temporal_window", self.temporal_window, self.temporal_window >= 0, ">= 0 (0 = all)"
        )
        _check(
            at, "frame_mask_prob", self.frame_mask_prob, 0 <= self.frame_mask_prob < 1, "0 <= p < 1"
        )
        _check(
            at,
            "merge",
            self.merge,
            self.merge >= 1 and self.scales[-1] % self.merge == 0,
            f"a divisor of the latent side {self.scales[-1]}",
        )
        _check(
            at,
            "merge_frames",
            self.merge_frames,
            self.merge_frames >= 1 and self.qa_frames % self.merge_frames == 0,
            f"a divisor of the understood clip's frames (video_qa_frames or video_frames) "
            f"{self.qa_frames}",
        )
        for name in ("merger_width", "merger_heads"):
            _check(at, name, getattr(self, name), getattr(self, name) >= 1, ">= 1")
        _check(
            at,
            "merger_width",
            self.merger_width,
            self.merger_width % self.merger_heads == 0,
            f"a multiple of merger_heads={self.merger_heads}",
        )
        _check(at, "head_hidden", self.head_hidden, self.head_hidden >= 0, ">= 0 (0 = linear)")
        _check(at, "loss_weight", self.loss_weight, self.loss_weight >= 0, ">= 0")
        _check(at, "shape_loss_weight", self.shape_loss_weight, self.shape_loss_weight >= 0, ">= 0")
        _check(at, "caption_pooling", self.caption_pooling, self.caption_pooling >= 0, ">= 0")
        _check(
            at,
            "temporal_context",
            self.temporal_context,
            0 <= self.temporal_context <= self.scales[-1] // 2,
            f"0..{self.scales[-1] // 2} (cells either side; 0 = off)",
        )
        _check(
            at,
            "caption_loss_weight",
            self.caption_loss_weight,
            self.caption_loss_weight >= 0,
            ">= 0",
        )
        _check(
            at, "cond_drop_prob", self.cond_drop_prob, 0 <= self.cond_drop_prob < 1, "0 <= p < 1"
        )
        _check(at, "cfg_scale", self.cfg_scale, self.cfg_scale >= 0, ">= 0 (1 = off)")
        _check(
            at,
            "video_cfg_scale",
            self.video_cfg_scale,
            self.video_cfg_scale >= 0,
            ">= 0 (0 = cfg_scale, 1 = off)",
        )
        _check(
            at,
            "judge_samples",
            self.judge_samples,
            self.judge_samples >= 0,
            ">= 0 (0 = greedy only)",
        )
        _check(
            at,
            "heldout_combo_fraction",
            self.heldout_combo_fraction,
            0 <= self.heldout_combo_fraction < 1,
            "0 <= f < 1",
        )

    def scale_weights(self) -> tuple[float, ...]:
        """Per-token loss weight of each image scale (video frames use the first video_scales)."""
        return self.scale_loss_weights or tuple(
            self.scale_loss_decay**k for k in range(len(self.scales))
        )

    def generation_cells(self, kind: str) -> int:
        """Generation positions of one image or clip: the size of the vis_cell table."""
        if kind == "image":
            return self.tokens_per_image
        return self.video_frames * self.tokens_per_video_frame

    def guidance_scale(self, kind: str) -> float:
        """Classifier-free guidance scale of sampled images or clips (kind image | video)."""
        return self.video_cfg_scale if kind == "video" and self.video_cfg_scale else self.cfg_scale

    @property
    def temporal_context_width(self) -> int:
        """Inputs of the temporal context embedding: bits of (2 r + 1)^2 cells (0 = off)."""
        r = self.temporal_context
        return (2 * r + 1) ** 2 * self.bits if r else 0

    @property
    def qa_frames(self) -> int:
        """Frames of a clip read for understanding."""
        return self.video_qa_frames or self.video_frames

    @property
    def tokens_per_image(self) -> int:
        return sum(s * s for s in self.scales)

    @property
    def tokens_per_video_frame(self) -> int:
        return sum(s * s for s in self.scales[: self.video_scales])

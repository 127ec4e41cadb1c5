import numpy as np
import paddle

from paddle_ernie5.config import AttentionConfig, ModelConfig, MoEConfig
from paddle_ernie5.data.multimodal import Segment, pack_segments, text_segment
from paddle_ernie5.data.packing import pack_documents
from paddle_ernie5.model.inputs import to_model_batch
from paddle_ernie5.model.model import Ernie5Model
from paddle_ernie5.ops.masks import to_dense


def _image(scale_lens, t=0):
    """Visual tokens of one image: one block per scale."""
    n = sum(scale_lens)
    blocks = np.repeat(np.arange(len(scale_lens)), scale_lens)
    pos = np.stack([np.full(n, t), np.arange(n), np.arange(n)])
    return Segment(
        np.ones(n, np.int64),
        pos,
        blocks=blocks,
        extras={"visual_bits": np.ones((n, 4), np.float32)},
    )


def _expected(structure, seq_len):
    """Brute force from the definition: per document, a list of (start, end, bidirectional)."""
    allowed = np.zeros((seq_len, seq_len), bool)
    for doc_start, doc_end, blocks in structure:
        for i in range(doc_start, doc_end):
            for j in range(doc_start, doc_end):
                same = any(b0 <= i < b1 and b0 <= j < b1 for b0, b1 in blocks)
                allowed[i, j] = j <= i or same
    return allowed


def test_block_causal_mask_of_a_packed_row_equals_the_definition():
    doc1 = [text_segment([5, 6, 7]), _image([1, 4]), text_segment([8, 9])]
    doc2 = [_image([1, 4, 2]), text_segment([3])]
    batch = pack_segments([doc1, doc2], seq_len=24)
    assert batch["mask_causal"] is False
    got = to_dense(batch["startend_row_indices"][0, 0], causal=False)
    # doc1: text 0-2, scales [3,4) [4,8), text 8-9;
    # doc2 from 10: scales [10,11) [11,15) [15,17), text 17
    want = _expected([(0, 10, [(3, 4), (4, 8)]), (10, 18, [(10, 11), (11, 15), (15, 17)])], 24)
    np.testing.assert_array_equal(got, want)
    assert batch["visual_bits"].shape == (1, 24, 4)
    np.testing.assert_array_equal(
        batch["visual_bits"][0, :, 0],
        np.isin(np.arange(24), [3, 4, 5, 6, 7, 10, 11, 12, 13, 14, 15, 16]),
    )
    np.testing.assert_array_equal(batch["labels"][0, :3], [6, 7, -100])


def test_text_only_rows_equal_the_causal_document_packing_and_give_the_same_logits():
    docs = [[10, 11, 12], [20, 21], [30]]  # pack_documents adds bos=2 / eos=3 itself
    seq = 16
    mm = pack_segments([[text_segment([2, *d, 3])] for d in docs], seq)
    ref = pack_documents(docs, seq, pad_id=0)
    np.testing.assert_array_equal(mm["input_ids"], ref["input_ids"])
    np.testing.assert_array_equal(mm["labels"], ref["labels"])
    np.testing.assert_array_equal(
        to_dense(mm["startend_row_indices"][0, 0], causal=False)[:12, :12],
        to_dense(ref["startend_row_indices"][0, 0], causal=True)[:12, :12],
    )
    paddle.seed(0)
    cfg = ModelConfig(
        vocab_size=64,
        hidden_size=32,
        num_layers=2,
        attention=AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=8),
        moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=16, shared_expert_hidden=8),
    )
    model = Ernie5Model(cfg)
    model.eval()
    a = model(to_model_batch(mm)).logits.numpy()[0, :12]
    b = model(to_model_batch(ref)).logits.numpy()[0, :12]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_documents_are_never_split_and_too_long_documents_are_refused():
    docs = [
        [text_segment(np.arange(6))],
        [text_segment(np.arange(6))],
        [text_segment(np.arange(3))],
    ]
    batch = pack_segments(docs, seq_len=10)
    assert batch["input_ids"].shape == (2, 10)
    np.testing.assert_array_equal(batch["startend_row_indices"][0, 0, :, 0], [6] * 6 + [0] * 4)
    try:
        pack_segments([[text_segment(np.arange(11))]], seq_len=10)
    except ValueError as e:
        assert "does not fit seq_len=10" in str(e)
    else:
        raise AssertionError("expected a ValueError")

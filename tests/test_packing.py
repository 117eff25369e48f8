"""Tests of sequence packing: segment ids, positions, padding, unpacking and encoder-decoder alignment."""

from __future__ import annotations

import numpy as np
import pytest

from llmjax.data.packing import pack, unpack
from llmjax.data.vocab import SpecialIds
from llmjax.objectives.causal_lm import CausalLM, CausalLMConfig
from llmjax.objectives.prefix_lm import PrefixLM, PrefixLMConfig

IDS = SpecialIds(vocab_size=1000)


def decoder_examples(rng, count, low, high):
    """Decoder-only examples whose tokens are unique across examples (so unpacked ones can be matched)."""
    examples, next_id = [], 10
    for _ in range(count):
        n = int(rng.integers(low, high))
        tokens = np.arange(next_id, next_id + n, dtype=np.int32)
        next_id += n
        examples.append(
            {
                "inputs": tokens,
                "targets": tokens + 1,
                "weights": rng.random(n).astype(np.float32) + 0.5,
                "prefix_mask": rng.random(n) < 0.5,
            }
        )
    return examples


def as_key(example):
    return tuple((k, example[k].tobytes()) for k in sorted(example))


def check_layout(segment_ids, positions, length):
    """Segments are runs 1, 2, ... k in order, then padding 0; positions count 0.. within each segment."""
    assert segment_ids.shape[-1] == positions.shape[-1] == length
    for seg, pos in zip(segment_ids, positions):
        used = int(np.count_nonzero(seg))
        assert np.all(seg[used:] == 0) and np.all(pos[used:] == 0)
        ids = seg[:used]
        assert used <= length
        if used:
            assert ids[0] == 1 and np.all(np.diff(ids) >= 0) and np.all(np.diff(ids) <= 1)
            for k in np.unique(ids):
                np.testing.assert_array_equal(pos[:used][ids == k], np.arange(np.sum(ids == k)))


@pytest.mark.parametrize("strategy", ["first_fit", "sequential"])
def test_pack_decoder_examples_and_unpack(strategy):
    rng = np.random.default_rng(0)
    examples = decoder_examples(rng, 300, 1, 40)
    packed = pack(examples, 64, strategy=strategy)
    rows = packed["inputs"].shape[0]
    assert all(v.shape == (rows, 64) for v in packed.values())
    assert packed["segment_ids"].dtype == packed["positions"].dtype == packed["inputs"].dtype == np.int32
    assert packed["weights"].dtype == np.float32 and packed["prefix_mask"].dtype == bool
    check_layout(packed["segment_ids"], packed["positions"], 64)
    pad = packed["segment_ids"] == 0
    assert np.all(packed["weights"][pad] == 0) and np.all(packed["inputs"][pad] == 0)
    assert not packed["prefix_mask"][pad].any()
    assert pad.sum() < rows * 64  # something was packed
    # Each token is in the row exactly once: no example dropped, duplicated or cut.
    assert int((~pad).sum()) == sum(len(e["inputs"]) for e in examples)

    back = unpack(packed)
    if strategy == "sequential":  # order is kept
        assert [as_key(e) for e in back] == [as_key(e) for e in examples]
    else:
        assert sorted(as_key(e) for e in back) == sorted(as_key(e) for e in examples)


def test_first_fit_is_at_least_as_dense_as_sequential():
    rng = np.random.default_rng(1)
    examples = decoder_examples(rng, 200, 1, 60)
    first_fit = pack(examples, 64)["inputs"].shape[0]
    sequential = pack(examples, 64, strategy="sequential")["inputs"].shape[0]
    total = sum(len(e["inputs"]) for e in examples)
    assert -(-total // 64) <= first_fit <= sequential


def test_unpack_a_single_row():
    examples = decoder_examples(np.random.default_rng(2), 3, 2, 5)
    packed = pack(examples, 32)
    assert packed["inputs"].shape[0] == 1
    back = unpack({k: v[0] for k, v in packed.items()})
    assert [as_key(e) for e in back] == [as_key(e) for e in examples]


def test_encoder_decoder_pairs_stay_aligned():
    rng = np.random.default_rng(3)
    examples = []
    for i in range(1, 201):  # example i has tokens i on both sides, of independent lengths
        ne, nd = int(rng.integers(1, 30)), int(rng.integers(1, 12))
        examples.append(
            {
                "encoder_inputs": np.full(ne, i, np.int32),
                "decoder_inputs": np.concatenate([[0], np.full(nd - 1, i)]).astype(np.int32),
                "decoder_targets": np.full(nd, i, np.int32),
                "decoder_weights": np.ones(nd, np.float32),
            }
        )
    lengths = {"encoder": 48, "decoder": 16}
    packed = pack(examples, lengths)
    check_layout(packed["encoder_segment_ids"], packed["encoder_positions"], 48)
    check_layout(packed["decoder_segment_ids"], packed["decoder_positions"], 16)
    for r in range(packed["encoder_inputs"].shape[0]):
        es, ds = packed["encoder_segment_ids"][r], packed["decoder_segment_ids"][r]
        assert es.max() == ds.max()
        for k in range(1, es.max() + 1):
            (owner,) = np.unique(packed["encoder_inputs"][r][es == k])
            assert np.all(packed["decoder_targets"][r][ds == k] == owner)
            # The decoder restarts from the start token in every segment.
            assert packed["decoder_inputs"][r][ds == k][0] == 0
    assert np.all(packed["decoder_weights"][packed["decoder_segment_ids"] == 0] == 0)
    back = unpack(packed)
    assert sorted(as_key(e) for e in back) == sorted(as_key(e) for e in examples)


def test_encoder_decoder_packing_needs_room_on_both_sides():
    ex = lambda ne, nd: {"encoder_inputs": np.ones(ne, np.int32), "decoder_targets": np.ones(nd, np.int32)}
    # The second example fits the encoder row but not the decoder row: it must open a new row.
    packed = pack([ex(2, 7), ex(2, 7)], {"encoder": 8, "decoder": 8})
    assert packed["encoder_inputs"].shape[0] == 2


def test_overflow_truncate_and_split():
    long = {"inputs": np.arange(10, 35, dtype=np.int32), "weights": np.ones(25, np.float32)}
    truncated = pack([long], 8)
    assert truncated["inputs"].shape == (1, 8)
    np.testing.assert_array_equal(truncated["inputs"][0], np.arange(10, 18))
    split = pack([long], 8, overflow="split", strategy="sequential")
    assert split["inputs"].shape == (4, 8)
    check_layout(split["segment_ids"], split["positions"], 8)
    pieces = unpack(split)
    assert [len(p["inputs"]) for p in pieces] == [8, 8, 8, 1]
    np.testing.assert_array_equal(np.concatenate([p["inputs"] for p in pieces]), long["inputs"])
    enc_dec = {"encoder_inputs": np.ones(20, np.int32), "decoder_targets": np.ones(20, np.int32)}
    truncated = pack([enc_dec], {"encoder": 8, "decoder": 4})
    assert truncated["encoder_segment_ids"].sum() == 8 and truncated["decoder_segment_ids"].sum() == 4
    with pytest.raises(ValueError, match="split"):
        pack([enc_dec], {"encoder": 8, "decoder": 4}, overflow="split")


def test_per_example_values_get_one_row_each():
    examples = [{"inputs": np.ones(3, np.int32), "nsp_labels": np.array(i % 2, np.int32)} for i in range(5)]
    packed = pack(examples, 16)
    assert packed["inputs"].shape == (5, 16) and packed["nsp_labels"].tolist() == [0, 1, 0, 1, 0]
    assert [int(e["nsp_labels"]) for e in unpack(packed)] == [0, 1, 0, 1, 0]


def test_pack_errors_are_clear():
    single = [{"inputs": np.ones(3, np.int32)}]
    enc_dec = [{"encoder_inputs": np.ones(3, np.int32), "decoder_targets": np.ones(2, np.int32)}]
    with pytest.raises(ValueError, match="encoder-decoder examples need length"):
        pack(enc_dec, 8)
    with pytest.raises(ValueError, match="'encoder' and 'decoder'"):
        pack(single, {"encoder": 8, "decoder": 8})
    with pytest.raises(ValueError, match="strategy"):
        pack(single, 8, strategy="best_fit")
    with pytest.raises(ValueError, match="has length 2"):
        pack([{"inputs": np.ones(3, np.int32), "targets": np.ones(2, np.int32)}], 8)
    with pytest.raises(ValueError, match="features"):
        pack(single + [{"targets": np.ones(3, np.int32)}], 8)
    assert pack([], 8) == {}


def test_packed_causal_and_prefix_lm_keep_their_invariants():
    rng = np.random.default_rng(4)
    docs = [rng.integers(7, 900, rng.integers(0, 50)).astype(np.int32) for _ in range(100)]
    causal = CausalLM(CausalLMConfig(max_length=32), IDS)
    packed = pack(causal(docs, rng), causal.pack_length)
    check_layout(packed["segment_ids"], packed["positions"], 32)
    for inputs, targets, seg in zip(packed["inputs"], packed["targets"], packed["segment_ids"]):
        same = (seg[1:] == seg[:-1]) & (seg[1:] > 0)
        np.testing.assert_array_equal(inputs[1:][same], targets[:-1][same])  # shifted within each segment
    prefix = PrefixLM(PrefixLMConfig(max_length=32), IDS, family="encoder_decoder")
    examples = prefix(docs, rng)
    packed = pack(examples, prefix.pack_length)
    back = unpack(packed)
    assert sorted(as_key(e) for e in back) == sorted(as_key(e) for e in examples)

"""The Grain input pipeline: determinism, per-epoch shuffling, process slicing, exact resume, packed layout and
the one-pass validation iterator, on a tiny prepared corpus."""

from __future__ import annotations

import json
import multiprocessing
from collections import Counter

import numpy as np
import pytest

from llmjax.data import corpus
from llmjax.data.packing import feature_side, unpack
from llmjax.data.pipeline import batch_spec, make_eval_iterator, make_train_iterator
from llmjax.data.prepare import default_data_config, prepare
from llmjax.data.shards import TokenShards
from llmjax.data.vocab import SpecialIds
from llmjax.objectives import make_objective

VOCAB, SENTINELS = 400, 20
IDS = SpecialIds(VOCAB, SENTINELS)

OBJECTIVES = {
    "causal_lm": ("causal_lm", "decoder", dict(max_length=64)),
    "prefix_lm_decoder": ("prefix_lm", "decoder", dict(max_length=64)),
    "prefix_lm_encdec": ("prefix_lm", "encoder_decoder", dict(max_length=48)),
    "span_encdec": ("span_corruption", "encoder_decoder", dict(inputs_length=48)),
    "span_decoder": ("span_corruption", "decoder", dict(inputs_length=48)),
    "mlm": ("mlm", "encoder", dict(max_length=64)),
    "mlm_whole_word": ("mlm", "encoder", dict(max_length=64, whole_word=True)),
    "mlm_nsp": ("mlm", "encoder", dict(max_length=64, nsp=True)),
    "ul2_decoder": ("ul2", "decoder", dict(max_length=64)),
    "ul2r_encdec": ("ul2r", "encoder_decoder", dict(max_length=48)),
}


def objective(key):
    name, family, config = OBJECTIVES[key]
    return make_objective(name, IDS, family, **config)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """450 short prose documents (pydoc paragraphs, ~10-50 tokens) prepared with a 400-piece tokenizer."""
    root = tmp_path_factory.mktemp("pipeline")
    paragraphs = [p.strip()[:160] for d in corpus.topic_documents() for p in d.text.split("\n\n") if p.strip()]
    source = root / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in paragraphs[:450]))
    cfg = default_data_config()
    cfg.sources = (str(source),)
    cfg.vocab_size, cfg.num_sentinels = VOCAB, SENTINELS
    cfg.max_train_sentences = 1000
    cfg.validation_fraction = 0.1
    cfg.data_dir = str(root / "data")
    return prepare(cfg, progress=False)["dir"]


class Recording:
    """A document source that remembers which documents were read, in order."""

    def __init__(self, documents):
        self.documents, self.reads = documents, []

    def __len__(self):
        return len(self.documents)

    def __getitem__(self, i):
        self.reads.append(int(i))
        return self.documents[i]


def as_key(example):
    return tuple((k, example[k].tobytes()) for k in sorted(example))


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert sorted(x) == sorted(y)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def train(data, key, **kw):
    kw = {"global_batch_size": 4, "seed": 0, "process_index": 0, "process_count": 1, **kw}
    return make_train_iterator(data, objective(key) if isinstance(key, str) else key, **kw)


# ------------------------------------------------------------------------------------------- determinism
def test_same_seed_same_batches_different_seed_different(data_dir):
    first = take(train(data_dir, "causal_lm", seed=7), 3)
    assert_same_batches(first, take(train(data_dir, "causal_lm", seed=7), 3))
    other = take(train(data_dir, "causal_lm", seed=8), 3)
    assert any(not np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(first, other))


def test_every_epoch_is_a_new_permutation():
    # One stream reads global positions 0, 1, 2, ...: epoch e is reads[e*N:(e+1)*N].
    n = 24
    source = Recording([np.full(3 + i % 5, 10 + i, np.int32) for i in range(n)])
    it = train(source, make_objective("causal_lm", IDS, "decoder", max_length=16), global_batch_size=1, seed=3)
    while len(source.reads) < 3 * n:
        next(it)
    epochs = [source.reads[e * n : (e + 1) * n] for e in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(n))
    assert epochs[0] != epochs[1] != epochs[2] != epochs[0]
    assert epochs[0] != list(range(n))


def test_mlm_masking_is_reproducible(data_dir):
    a, b = take(train(data_dir, "mlm", seed=1), 2), take(train(data_dir, "mlm", seed=1), 2)
    assert_same_batches(a, b)
    assert 0 < a[0]["weights"].sum() < (a[0]["segment_ids"] > 0).sum()


# ----------------------------------------------------------------------------------------- processes
@pytest.mark.parametrize("key", ["causal_lm", "span_encdec", "mlm_nsp", "ul2_decoder"])
def test_processes_build_disjoint_slices_of_one_global_batch(data_dir, key):
    shards = TokenShards(data_dir, "train")
    whole = Recording(shards)
    reference = take(train(whole, key, global_batch_size=4, seed=5), 4)
    assert len(whole.reads) < len(shards)  # still in the first epoch: documents read once at most
    parts, reads = [], []
    for p in range(2):
        source = Recording(shards)
        parts.append(take(train(source, key, global_batch_size=4, seed=5, process_index=p, process_count=2), 4))
        reads.append(set(source.reads))
    assert not reads[0] & reads[1]
    assert reads[0] | reads[1] == set(whole.reads)
    for step, batch in enumerate(reference):
        assert all(len(v) == 2 for v in parts[0][step].values())
        joined = {k: np.concatenate([parts[0][step][k], parts[1][step][k]]) for k in batch}
        assert_same_batches([batch], [joined])


def test_state_of_one_process_restores_on_two(data_dir):
    it = train(data_dir, "causal_lm", global_batch_size=4)
    take(it, 2)
    state = json.loads(json.dumps(it.get_state()))
    expected = next(it)
    for p in range(2):
        part = train(data_dir, "causal_lm", global_batch_size=4, process_index=p, process_count=2)
        part.set_state(state)
        assert_same_batches([next(part)], [{k: v[2 * p : 2 * p + 2] for k, v in expected.items()}])
    small = train(data_dir, "causal_lm", global_batch_size=4, process_index=1, process_count=2)
    small.set_state(json.loads(json.dumps(small.get_state())))  # its own state: streams [2, 4)
    with pytest.raises(ValueError, match=r"row streams \[2, 4\).*builds \[0, 2\)"):
        train(data_dir, "causal_lm", global_batch_size=4, process_index=0, process_count=2).set_state(
            small.get_state())


# ---------------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("key,workers", [("mlm_nsp", 0), ("span_encdec", 0), ("causal_lm", 2), ("ul2r_encdec", 2)])
def test_restored_state_continues_with_the_next_batch(data_dir, key, workers):
    it = train(data_dir, key, num_workers=workers)
    head = take(it, 2)
    # Restore where some stream has packed examples ahead of its oldest waiting one (ahead != 0), if it can.
    while len(head) < 10 and not any(ahead for _, _, ahead in it.get_state()["positions"]):
        head.append(next(it))
    state = json.loads(json.dumps(it.get_state()))
    assert state["step"] == len(head) and (key == "mlm_nsp" or len(head) < 10)
    tail = take(it, 3)
    it.close()
    restored = train(data_dir, key, num_workers=workers)
    restored.set_state(state)
    assert_same_batches(take(restored, 3), tail)
    restored.close()
    if workers:  # prefetching workers change nothing in the batches, and stop when closed
        assert_same_batches(take(train(data_dir, key), len(head) + 3), head + tail)
        assert not [p for p in multiprocessing.active_children() if p.name.startswith("grain")]


def test_restore_with_examples_packed_far_ahead():
    # A 200-token document does not fit after the first one; the 70 one-token documents behind it do, so the
    # state records 70 examples packed ahead of the oldest waiting one: more than 64 bits.
    docs = [np.full(100, 10, np.int32), np.full(200, 11, np.int32)]
    docs += [np.full(1, 12 + i, np.int32) for i in range(70)] + [np.full(50, 99, np.int32)] * 3
    obj = make_objective("causal_lm", IDS, "decoder", max_length=256)
    kw = dict(global_batch_size=1, process_index=0, process_count=1)
    it = make_eval_iterator(docs, obj, **kw)
    first = next(it)
    assert first["segment_ids"].max() == 71
    state = json.loads(json.dumps(it.get_state()))
    assert state["positions"] == [[1, 0, 2**71 - 2]]
    rest = list(it)
    restored = make_eval_iterator(docs, obj, **kw)
    restored.set_state(state)
    assert_same_batches(list(restored), rest)
    assert len(rest) == 2 and [b["segment_ids"].max() for b in rest] == [2, 2]


def test_grain_checkpoint_handler_saves_and_restores_the_iterator(data_dir, tmp_path):
    from etils import epath
    from grain.checkpoint import CheckpointHandler

    it = train(data_dir, "span_encdec")
    take(it, 2)
    CheckpointHandler().save(epath.Path(tmp_path), item=it)
    expected = take(it, 2)
    restored = CheckpointHandler().restore(epath.Path(tmp_path), item=train(data_dir, "span_encdec"))
    assert_same_batches(take(restored, 2), expected)


def test_restoring_a_state_of_another_pipeline_fails(data_dir):
    state = train(data_dir, "causal_lm", seed=1).get_state()
    with pytest.raises(ValueError, match="seed=1.*seed=2"):
        train(data_dir, "causal_lm", seed=2).set_state(state)


# ---------------------------------------------------------------------------------------------- layout
def check_side(segment_ids, positions, features):
    """Segments 1..k in contiguous runs from the start of the row, then padding where every feature is 0."""
    for r, (seg, pos) in enumerate(zip(segment_ids, positions)):
        used = int(np.count_nonzero(seg))
        assert np.all(seg[used:] == 0) and np.all(pos[used:] == 0)
        for name, values in features.items():
            assert not np.any(values[r][used:]), f"{name} is not 0 in the padding"
        if used:
            runs = seg[:used]
            assert runs[0] == 1 and np.all(np.diff(runs) >= 0) and np.all(np.diff(runs) <= 1)
            for k in range(1, runs[-1] + 1):
                np.testing.assert_array_equal(pos[:used][runs == k], np.arange(np.sum(runs == k)))


@pytest.mark.parametrize("key", list(OBJECTIVES))
def test_packed_rows_have_the_configured_layout(data_dir, key):
    obj = objective(key)
    spec = batch_spec(obj, 4)
    batches = take(train(data_dir, obj, global_batch_size=4), 4)
    for batch in batches:
        assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {k: (s.shape, s.dtype) for k, s in spec.items()}
        for side in {feature_side(k) for k, v in batch.items() if v.ndim == 2}:
            prefix = f"{side}_" if side else ""
            features = {k: v for k, v in batch.items() if v.ndim == 2 and feature_side(k) == side
                        and k not in (prefix + "segment_ids", prefix + "positions")}
            check_side(batch[prefix + "segment_ids"], batch[prefix + "positions"], features)
        if "encoder_segment_ids" in batch:  # example k has segment k on both sides
            np.testing.assert_array_equal(batch["encoder_segment_ids"].max(1), batch["decoder_segment_ids"].max(1))
        if "prefix_mask" in batch:  # the bidirectional prefix starts each segment and stays inside it
            for ex in unpack(batch):
                mask = ex["prefix_mask"]
                assert mask[0] and np.all(np.diff(mask.astype(int)) <= 0) and not np.any(ex["weights"][mask][:-1])
        if "nsp_labels" in batch:
            assert np.all(batch["segment_ids"].max(1) == 1) and np.all(batch["nsp_weights"] == 1)
    segments = [b[k] for b in batches for k in b if k.endswith("segment_ids")]
    assert np.mean([(s > 0).mean() for s in segments]) > 0.4  # little padding
    if "nsp_labels" not in spec:  # rows are packed: several examples in many of them
        assert np.mean([s.max(1).mean() for s in segments]) > 1.2


def test_rows_hold_exactly_the_objective_examples(data_dir):
    """No example is cut, merged with another or lost: one stream's rows, unpacked, are the objective's
    examples of the documents it read, each once, but for the few still waiting for a row."""
    obj = objective("causal_lm")
    shards = TokenShards(data_dir, "train")
    source = Recording(shards)
    unpacked = [ex for batch in take(train(source, obj, global_batch_size=1), 12) for ex in unpack(batch)]
    expected = Counter(as_key(ex) for i in source.reads for ex in obj(shards[i]))
    assert len(unpacked) > 12  # several documents per row
    for ex in unpacked:
        assert expected[as_key(ex)] > 0, "a row holds an example the objective did not make"
        expected[as_key(ex)] -= 1
    waiting = sum(expected.values())
    assert waiting <= 8 + max(len(obj(shards[i])) for i in source.reads)  # pack_window + the newest group


# ------------------------------------------------------------------------------------------- validation
def examples_of_stream(batches, r):
    return Counter(as_key(ex) for b in batches for ex in unpack({k: v[r : r + 1] for k, v in b.items()}))


def test_validation_is_one_deterministic_pass_over_every_document(data_dir):
    obj = objective("causal_lm")
    shards = TokenShards(data_dir, "validation")
    it = make_eval_iterator(data_dir, obj, global_batch_size=4, process_index=0, process_count=1)
    batches = list(it)
    assert len(batches) == it.num_batches > 0
    assert_same_batches(batches, list(make_eval_iterator(data_dir, obj, global_batch_size=4, process_count=1,
                                                         process_index=0)))
    for r in range(4):  # stream r holds the examples of documents r, r + 4, ..., each once
        expected = Counter(as_key(ex) for i in range(r, len(shards), 4) for ex in obj(shards[i]))
        assert examples_of_stream(batches, r) == expected
    padding = batches[-1]["segment_ids"].max(1) == 0
    assert not padding.all()  # the pass ends with the last batch that holds a document
    assert not batches[-1]["weights"][padding].any()

    longer = list(make_eval_iterator(data_dir, obj, global_batch_size=4, num_batches=len(batches) + 2,
                                     process_index=0, process_count=1))
    assert_same_batches(longer[: len(batches)], batches)
    assert all(not b["weights"].any() and not b["segment_ids"].any() for b in longer[len(batches) :])
    shorter = list(make_eval_iterator(data_dir, obj, global_batch_size=4, num_batches=2, process_index=0,
                                      process_count=1))
    assert_same_batches(shorter, batches[:2])

    parts = [list(make_eval_iterator(data_dir, obj, global_batch_size=4, process_index=p, process_count=2))
             for p in range(2)]
    assert len(parts[0]) == len(parts[1]) == len(batches)  # every process runs the same number of steps
    assert_same_batches([{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(*parts)], batches)


def test_validation_with_workers_is_the_same_pass(data_dir):
    kw = dict(global_batch_size=4, process_index=0, process_count=1)
    inline = list(make_eval_iterator(data_dir, objective("mlm"), **kw))
    it = make_eval_iterator(data_dir, objective("mlm"), num_workers=2, **kw)
    assert_same_batches(list(it), inline)
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("grain")]  # stopped at the end


def test_validation_with_nsp_marks_padding_rows(data_dir):
    batches = list(make_eval_iterator(data_dir, objective("mlm_nsp"), global_batch_size=2, process_index=0,
                                      process_count=1))
    weights = np.concatenate([b["nsp_weights"] for b in batches])
    real = np.concatenate([b["segment_ids"].max(1) > 0 for b in batches])
    np.testing.assert_array_equal(weights, real.astype(np.float32))
    assert real.sum() > 0


# ----------------------------------------------------------------------------------------------- errors
def test_global_batch_must_divide_among_processes(data_dir):
    with pytest.raises(ValueError, match=r"global_batch_size=6 is not divisible by process_count=4"):
        train(data_dir, "causal_lm", global_batch_size=6, process_index=0, process_count=4)
    with pytest.raises(ValueError, match=r"process_index=2 must be in \[0, process_count=2\)"):
        train(data_dir, "causal_lm", process_index=2, process_count=2)


def test_objective_family_and_vocabulary_are_checked(data_dir):
    kw = dict(global_batch_size=2, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="objective 'mlm' cannot train a 'decoder' model"):
        make_train_iterator(data_dir, "mlm", family="decoder", **kw)
    with pytest.raises(ValueError, match="objective 'causal_lm' cannot train a 'encoder' model"):
        make_train_iterator(data_dir, objective("causal_lm"), family="encoder", **kw)
    with pytest.raises(ValueError, match="built for the 'decoder' family but family='encoder_decoder'"):
        make_train_iterator(data_dir, objective("prefix_lm_decoder"), family="encoder_decoder", **kw)
    with pytest.raises(ValueError, match="vocab_size=500.*vocab_size=400"):
        make_train_iterator(data_dir, make_objective("causal_lm", SpecialIds(500, SENTINELS), "decoder"), **kw)
    by_name = make_train_iterator(data_dir, "span_corruption", family="encoder_decoder",
                                  objective_config={"inputs_length": 32}, **kw)
    assert next(by_name)["encoder_inputs"].shape == (2, 32)

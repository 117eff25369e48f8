"""Tests of the objective transforms (numpy) and the losses (JAX on CPU): rates, structure, invariants."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.data.packing import pack
from llmjax.data.vocab import SpecialIds
from llmjax.objectives import FAMILIES, OBJECTIVE_FAMILIES, check_family, make_objective
from llmjax.objectives import losses
from llmjax.objectives.causal_lm import CausalLM, CausalLMConfig
from llmjax.objectives.mlm import MLM, NSP_IS_NEXT, NSP_IS_RANDOM, MLMConfig, word_start_table
from llmjax.objectives.prefix_lm import PrefixLM, PrefixLMConfig
from llmjax.objectives.span_corruption import (
    SpanCorruption,
    SpanCorruptionConfig,
    corrupted_lengths,
    noise_counts,
    random_spans_noise_mask,
    span_corruption_lengths,
)

IDS = SpecialIds(vocab_size=32000)  # large, so a random replacement rarely equals the original token
FIRST_REGULAR = IDS.first_sentinel - IDS.num_regular


def random_docs(rng, count, low, high, ids=IDS):
    """Documents of regular tokens with lengths in [low, high)."""
    return [
        rng.integers(FIRST_REGULAR, ids.first_sentinel, rng.integers(low, high)).astype(np.int32) for _ in range(count)
    ]


def is_regular(tokens, ids=IDS):
    return (tokens >= FIRST_REGULAR) & (tokens < ids.first_sentinel)


# ------------------------------------------------------------------------------------------------- families
def test_families_match_model_config():
    from llmjax.models.config import FAMILIES as MODEL_FAMILIES

    assert FAMILIES == MODEL_FAMILIES


@pytest.mark.parametrize(
    "objective,family",
    [("causal_lm", "encoder"), ("causal_lm", "encoder_decoder"), ("prefix_lm", "encoder"), ("mlm", "decoder"),
     ("mlm", "encoder_decoder"), ("span_corruption", "encoder")],
)
def test_check_family_rejects_invalid_pairs(objective, family):
    with pytest.raises(ValueError) as err:
        check_family(objective, family)
    message = str(err.value)
    assert objective in message and repr(family) in message
    for valid in OBJECTIVE_FAMILIES[objective]:
        assert valid in message
    with pytest.raises(ValueError):  # the objectives refuse it too
        make_objective(objective, IDS, family)


def test_check_family_accepts_valid_pairs_and_rejects_unknown_names():
    for objective, families in OBJECTIVE_FAMILIES.items():
        for family in families:
            check_family(objective, family)
            config = {"denoisers": [{"objective": "prefix_lm", "rate": 1}]} if objective == "mixture" else {}
            assert make_objective(objective, IDS, family, **config).family == family
    with pytest.raises(ValueError, match="unknown objective 'ul3'"):
        check_family("ul3", "decoder")
    with pytest.raises(ValueError, match="unknown model family 'rnn'"):
        check_family("mlm", "rnn")


# ------------------------------------------------------------------------------------------------ causal_lm
def test_causal_lm_targets_are_inputs_shifted():
    rng = np.random.default_rng(0)
    docs = random_docs(rng, 20, 0, 30)
    objective = CausalLM(CausalLMConfig(max_length=64), IDS)
    examples = objective(docs, rng)
    assert len(examples) == len(docs)
    for doc, ex in zip(docs, examples):
        np.testing.assert_array_equal(ex["targets"], np.append(doc, IDS.eos))
        assert ex["inputs"][0] == IDS.bos
        np.testing.assert_array_equal(ex["inputs"][1:], ex["targets"][:-1])
        assert ex["weights"].dtype == np.float32 and np.all(ex["weights"] == 1.0)
        assert ex["inputs"].dtype == ex["targets"].dtype == np.int32


def test_causal_lm_long_documents_continue_in_the_next_example():
    doc = np.arange(10, 60, dtype=np.int32)  # 50 tokens + eos = 51 targets
    examples = CausalLM(CausalLMConfig(max_length=16), IDS)(doc)
    assert [len(ex["targets"]) for ex in examples] == [16, 16, 16, 3]
    np.testing.assert_array_equal(np.concatenate([ex["targets"] for ex in examples]), np.append(doc, IDS.eos))
    np.testing.assert_array_equal(
        np.concatenate([ex["inputs"] for ex in examples]), np.concatenate([[IDS.bos], doc])
    )


# ------------------------------------------------------------------------------------------------ prefix_lm
def test_prefix_lm_decoder_loss_only_on_suffix_and_split_in_bounds():
    rng = np.random.default_rng(1)
    docs = random_docs(rng, 400, 20, 200)
    config = PrefixLMConfig(max_length=256, min_prefix_fraction=0.2, max_prefix_fraction=0.6)
    examples = PrefixLM(config, IDS, family="decoder")(docs, rng)
    fractions = []
    for doc, ex in zip(docs, examples):
        n = len(doc)
        s = int(ex["prefix_mask"].sum()) - 1  # prefix tokens; the start token is visible too
        fractions.append(s / n)
        assert 0.2 * n <= s <= 0.6 * n
        np.testing.assert_array_equal(ex["prefix_mask"], np.arange(n + 1) <= s)
        np.testing.assert_array_equal(ex["targets"], np.append(doc, IDS.eos))
        np.testing.assert_array_equal(ex["inputs"], np.concatenate([[IDS.bos], doc]))
        np.testing.assert_array_equal(ex["weights"], (np.arange(n + 1) >= s).astype(np.float32))
        # The weighted targets are exactly the suffix and eos.
        np.testing.assert_array_equal(ex["targets"][ex["weights"] > 0], np.append(doc[s:], IDS.eos))
    # The split is random over the whole allowed range, not stuck at one end.
    assert min(fractions) < 0.23 and max(fractions) > 0.57
    assert abs(np.mean(fractions) - 0.4) < 0.02


def test_prefix_lm_encoder_decoder_prefix_to_encoder_rest_to_decoder():
    rng = np.random.default_rng(2)
    docs = random_docs(rng, 200, 2, 100)
    config = PrefixLMConfig(max_length=128, min_prefix_fraction=0.5, max_prefix_fraction=0.5)
    for doc, ex in zip(docs, PrefixLM(config, IDS, family="encoder_decoder")(docs, rng)):
        s = len(ex["encoder_inputs"]) - 1
        assert s == min(max(1, math.ceil(0.5 * len(doc))), len(doc) - 1)
        np.testing.assert_array_equal(ex["encoder_inputs"], np.append(doc[:s], IDS.eos))
        np.testing.assert_array_equal(ex["decoder_targets"], np.append(doc[s:], IDS.eos))
        np.testing.assert_array_equal(ex["decoder_inputs"], np.concatenate([[IDS.pad], ex["decoder_targets"][:-1]]))
        assert np.all(ex["decoder_weights"] == 1.0)


def test_prefix_lm_rejects_bad_bounds():
    with pytest.raises(ValueError, match="min_prefix_fraction"):
        PrefixLMConfig(min_prefix_fraction=0.7, max_prefix_fraction=0.3)


# ------------------------------------------------------------------------------------------------------ mlm
def original_tokens(ex):
    return np.where(ex["weights"] > 0, ex["targets"], ex["inputs"])


def test_mlm_rates_and_replacements_over_100k_tokens():
    rng = np.random.default_rng(3)
    docs = random_docs(rng, 1000, 50, 300)
    # Sprinkle special tokens and sentinels into the documents: they must never be selected.
    specials = np.array([IDS.unk, IDS.mask, IDS.cls, IDS.sep, IDS.sentinel(0), IDS.sentinel(5)])
    for d in docs:
        where = rng.random(len(d)) < 0.05
        d[where] = rng.choice(specials, where.sum())
    examples = MLM(MLMConfig(max_length=128), IDS)(docs, rng)

    candidates = selected = masked = randomised = unchanged = 0
    for ex in examples:
        orig, sel = original_tokens(ex), ex["weights"] > 0
        assert ex["inputs"][0] == IDS.cls and ex["inputs"][-1] == IDS.sep and np.all(ex["token_type_ids"] == 0)
        assert len(ex["inputs"]) <= 128
        assert np.all(is_regular(orig[sel])), "a special token was selected"
        assert np.all(ex["inputs"][~sel] == orig[~sel]) and np.all(ex["targets"][~sel] == IDS.pad)
        assert set(np.unique(ex["weights"])) <= {0.0, 1.0}
        inp = ex["inputs"][sel]
        is_mask, is_same = inp == IDS.mask, inp == orig[sel]
        assert np.all(is_regular(inp[~is_mask & ~is_same])), "random replacement is not a regular token"
        candidates += int(is_regular(orig).sum())
        selected += int(sel.sum())
        masked += int(is_mask.sum())
        unchanged += int(is_same.sum())
        randomised += int((~is_mask & ~is_same).sum())
    assert candidates >= 100_000
    assert abs(selected / candidates - 0.15) <= 0.005
    assert abs(masked / selected - 0.8) <= 0.01
    assert abs(randomised / selected - 0.1) <= 0.01
    assert abs(unchanged / selected - 0.1) <= 0.01


def test_mlm_num_to_predict_rounds_and_caps():
    rng = np.random.default_rng(4)
    for n in (1, 3, 10, 17, 30, 100):
        doc = rng.integers(FIRST_REGULAR, IDS.first_sentinel, n)
        (ex,) = MLM(MLMConfig(max_length=128), IDS)(doc, rng)
        assert ex["weights"].sum() == max(1, math.floor(n * 0.15 + 0.5))
        (ex,) = MLM(MLMConfig(max_length=128, max_predictions=5), IDS)(doc, rng)
        assert ex["weights"].sum() == min(5, max(1, math.floor(n * 0.15 + 0.5)))


def test_mlm_random_replacements_are_uniform_regular_tokens():
    # A vocabulary that is mostly special ids and sentinels: a wrong replacement range would hit them.
    ids = SpecialIds(vocab_size=120, num_sentinels=100)
    first_regular = ids.first_sentinel - ids.num_regular
    rng = np.random.default_rng(14)
    docs = [rng.integers(first_regular, ids.first_sentinel, 100) for _ in range(300)]
    config = MLMConfig(max_length=128, mask_token_rate=0.0, random_token_rate=1.0)
    replaced = np.concatenate([ex["inputs"][ex["weights"] > 0] for ex in MLM(config, ids)(docs, rng)])
    assert np.all((replaced >= first_regular) & (replaced < ids.first_sentinel))
    counts = np.bincount(replaced - first_regular, minlength=ids.num_regular)
    assert counts.min() > 0.8 * len(replaced) / ids.num_regular  # every regular id, about equally often


def words_of(tokens, starts):
    """Word index per position (-1 for special tokens), from word-start flags; specials also split words."""
    regular = is_regular(tokens)
    previous = np.concatenate([[False], regular[:-1]])
    begins = regular & (starts | ~previous)
    return np.where(regular, np.cumsum(begins) - 1, -1)


def assert_whole_words(ex, starts):
    word = words_of(original_tokens(ex), starts)
    sel = ex["weights"] > 0
    for w in np.unique(word[word >= 0]):
        assert len(set(sel[word == w])) == 1, "a word was partly selected"
    return int(sel.sum()), int((word >= 0).sum())


def test_mlm_whole_word_masking_with_a_piece_table():
    pieces = ["<x>"] * 7 + [("\u2581w" if i % 3 == 0 else "p") + str(i) for i in range(7, IDS.vocab_size)]
    table = word_start_table(pieces)
    rng = np.random.default_rng(5)
    docs = random_docs(rng, 400, 20, 300)
    examples = MLM(MLMConfig(max_length=64, whole_word=True), IDS)(docs, rng, word_starts=table.__getitem__)
    selected = candidates = 0
    for ex in examples:
        s, c = assert_whole_words(ex, table[original_tokens(ex)])
        selected, candidates = selected + s, candidates + c
    assert abs(selected / candidates - 0.15) < 0.015  # words that overshoot the budget are skipped, as BERT


def test_mlm_whole_word_masking_with_arrays_and_nsp():
    rng = np.random.default_rng(6)
    # Every token id occurs once in the corpus, so a token tells which document (and word) it came from.
    unique = rng.permutation(np.arange(FIRST_REGULAR, IDS.first_sentinel, dtype=np.int32))
    docs = np.split(unique[:4000], np.sort(rng.choice(np.arange(1, 4000), 99, replace=False)))
    starts = [rng.random(len(d)) < 0.4 for d in docs]
    start_of = {int(t): bool(s) for d, st in zip(docs, starts) for t, s in zip(d, st)}
    # Pieces of documents move around (chunks; NSP's A and B, B maybe from another document); a piece that
    # opens mid-word starts a word of its own, and words never cross [SEP].
    for config in (MLMConfig(max_length=64, whole_word=True), MLMConfig(max_length=64, whole_word=True, nsp=True)):
        for ex in MLM(config, IDS)(docs, rng, word_starts=starts):
            assert_whole_words(ex, np.array([start_of.get(int(t), True) for t in original_tokens(ex)]))
    with pytest.raises(ValueError, match="whole_word"):
        MLM(MLMConfig(whole_word=True), IDS)(docs, rng)


def test_mlm_nsp_structure_and_true_pair_rate():
    rng = np.random.default_rng(7)
    block = 200
    # Document d holds the consecutive ids base_d, base_d + 1, ...: a true next segment continues A by +1.
    docs = [np.arange(FIRST_REGULAR + d * block, FIRST_REGULAR + (d + 1) * block, dtype=np.int32) for d in range(150)]
    objective = MLM(MLMConfig(max_length=24, nsp=True), IDS)
    examples = objective(docs, rng)
    labels = []
    for ex in examples:
        tokens, types = original_tokens(ex), ex["token_type_ids"]
        seps = np.flatnonzero(tokens == IDS.sep)
        assert tokens[0] == IDS.cls and len(seps) == 2 and seps[1] == len(tokens) - 1 and len(tokens) <= 24
        a, b = tokens[1 : seps[0]], tokens[seps[0] + 1 : -1]
        assert len(a) >= 1 and len(b) >= 1
        np.testing.assert_array_equal(types, (np.arange(len(tokens)) > seps[0]).astype(np.int32))
        assert ex["nsp_labels"].shape == () and ex["nsp_labels"].dtype == np.int32
        same_doc = (a[0] - FIRST_REGULAR) // block == (b[0] - FIRST_REGULAR) // block
        if ex["nsp_labels"] == NSP_IS_NEXT:
            np.testing.assert_array_equal(np.diff(np.concatenate([a, b])), 1)
        else:
            assert ex["nsp_labels"] == NSP_IS_RANDOM and not same_doc
            assert np.all(np.diff(b) == 1)  # a contiguous window of the other document
        labels.append(int(ex["nsp_labels"]))
    assert len(labels) >= 1000
    assert abs(np.mean(np.array(labels) == NSP_IS_NEXT) - 0.5) < 0.04
    packed = pack(examples, objective.pack_length)  # one pair per row: the label is per row
    assert packed["nsp_labels"].shape == (len(examples),) and packed["segment_ids"].max() == 1


# ------------------------------------------------------------------------------------------ span corruption
def test_span_corruption_lengths_match_t5():
    assert span_corruption_lengths(512, 0.15, 3.0) == (568, 114)  # T5's published numbers
    for inputs_length in (16, 64, 128, 512, 626, 1024):
        for density, mean in ((0.15, 3.0), (0.5, 8.0), (0.15, 1.0)):
            raw, targets = span_corruption_lengths(inputs_length, density, mean)
            assert corrupted_lengths(raw, density, mean) == (inputs_length, targets)
            assert corrupted_lengths(raw + 1, density, mean)[0] > inputs_length  # the largest raw length


def test_noise_counts_by_hand():
    assert noise_counts(568, 0.15, 3.0) == (85, 28)  # T5's 512-token inputs
    assert noise_counts(113, 0.15, 3.0) == (17, 6)  # 16.95 -> 17 noise; 17 / 3 = 5.67 -> 6 spans (rounded)
    assert noise_counts(3, 0.15, 3.0) == (1, 1)  # at least one noise token
    assert noise_counts(2, 0.9, 1.0) == (1, 1)  # at least one kept token
    assert noise_counts(1, 0.15, 3.0) == (0, 0)


def reconstruct(inputs, targets, ids=IDS):
    """Independent merge: put each sentinel's target span back in place of the sentinel in the inputs."""
    assert inputs[-1] == ids.eos and targets[-1] == ids.eos
    spans, current = {}, None
    for t in targets[:-1]:
        if t >= ids.first_sentinel:
            current = spans.setdefault(int(t), [])
        else:
            current.append(int(t))
    out = []
    for t in inputs[:-1]:
        out.extend(spans.pop(int(t)) if t >= ids.first_sentinel else [int(t)])
    assert not spans, "a target span has no sentinel in the inputs"
    return np.array(out, np.int32)


def test_span_corruption_statistics_reconstruction_and_exact_lengths():
    rng = np.random.default_rng(8)
    objective = SpanCorruption(SpanCorruptionConfig(inputs_length=128), IDS)
    raw = objective.raw_length
    docs = random_docs(rng, 300, 1, 3 * raw)
    examples = objective(docs, rng)
    pieces = [d[i : i + raw] for d in docs for i in range(0, len(d), raw)]
    assert len(examples) == len(pieces)
    noise = spans = total = 0
    for piece, ex in zip(pieces, examples):
        inputs, targets = ex["encoder_inputs"], ex["decoder_targets"]
        np.testing.assert_array_equal(reconstruct(inputs, targets), piece)
        sentinels = inputs[inputs >= IDS.first_sentinel]
        # Sentinels count down from the top of the vocabulary, in the same order in inputs and targets.
        np.testing.assert_array_equal(sentinels, IDS.vocab_size - 1 - np.arange(len(sentinels)))
        np.testing.assert_array_equal(targets[targets >= IDS.first_sentinel], sentinels)
        np.testing.assert_array_equal(ex["decoder_inputs"], np.concatenate([[IDS.pad], targets[:-1]]))
        if len(piece) == raw:
            assert (len(inputs), len(targets)) == (128, objective.targets_length)
        spans += len(sentinels)
        noise += len(targets) - len(sentinels) - 1
        total += len(piece)
    assert abs(noise / total - 0.15) < 0.01
    assert abs(noise / spans / 3.0 - 1.0) < 0.05

    # Full-length examples fill packed rows exactly; shorter ones share rows.
    packed = pack(examples, objective.pack_length)
    full = np.all(packed["encoder_segment_ids"] == 1, axis=1)
    assert full.sum() == sum(len(p) == raw for p in pieces)
    assert np.all(packed["decoder_segment_ids"][full] == 1)


def test_random_spans_noise_mask_shape_of_spans():
    rng = np.random.default_rng(9)
    masks = np.stack([random_spans_noise_mask(568, 0.15, 3.0, rng) for _ in range(2000)])
    assert np.all(masks.sum(axis=1) == 85)
    starts = masks & ~np.concatenate([np.zeros((len(masks), 1), bool), masks[:, :-1]], axis=1)
    assert np.all(starts.sum(axis=1) == 28)
    assert not masks[:, 0].any() and masks[:, -1].all()  # T5: begins with kept tokens, ends with noise
    # Span placement is spread over the sequence, not bunched at one end.
    rate = masks[:, 1:-1].mean(axis=0)
    assert abs(rate[:283].mean() - rate[283:].mean()) < 0.01
    assert random_spans_noise_mask(1, 0.15, 3.0, rng).tolist() == [False]
    assert random_spans_noise_mask(0, 0.15, 3.0, rng).shape == (0,)


def test_span_corruption_as_a_decoder_objective():
    rng = np.random.default_rng(10)
    objective = SpanCorruption(SpanCorruptionConfig(inputs_length=64), IDS, family="decoder")
    docs = random_docs(rng, 30, 1, 200)
    pieces = [d[i : i + objective.raw_length] for d in docs for i in range(0, len(d), objective.raw_length)]
    for piece, ex in zip(pieces, objective(docs, rng)):
        n_in = int(ex["prefix_mask"].sum()) - 1  # inputs part, then the targets part
        inputs, targets = ex["targets"][:n_in], ex["targets"][n_in:]
        np.testing.assert_array_equal(reconstruct(inputs, targets), piece)
        np.testing.assert_array_equal(ex["weights"], (np.arange(len(ex["targets"])) >= n_in).astype(np.float32))
        np.testing.assert_array_equal(ex["inputs"], np.concatenate([[IDS.bos], ex["targets"][:-1]]))
        if len(piece) == objective.raw_length:
            assert len(ex["targets"]) == objective.pack_length


def test_span_corruption_for_a_causal_decoder_has_no_prefix_mask():
    """bidirectional_inputs=False: the same sequence and loss weights, attended causally (Raffel et al.'s
    decoder-only LM with the denoising objective)."""
    docs = random_docs(np.random.default_rng(12), 10, 50, 200)
    config = dict(inputs_length=64)
    a = SpanCorruption(SpanCorruptionConfig(**config), IDS, family="decoder")(docs, np.random.default_rng(3))
    b = SpanCorruption(SpanCorruptionConfig(**config, bidirectional_inputs=False), IDS, family="decoder")(
        docs, np.random.default_rng(3))
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert "prefix_mask" in x and "prefix_mask" not in y
        for k in ("inputs", "targets", "weights"):
            np.testing.assert_array_equal(x[k], y[k])


def test_span_corruption_refuses_more_spans_than_sentinels():
    with pytest.raises(ValueError, match="sentinels"):
        SpanCorruption(SpanCorruptionConfig(inputs_length=512), SpecialIds(1000, num_sentinels=10))


@pytest.mark.parametrize(
    "name,family,config",
    [("causal_lm", "decoder", {}), ("prefix_lm", "decoder", {}), ("prefix_lm", "encoder_decoder", {}),
     ("mlm", "encoder", {"nsp": True, "max_length": 64}), ("span_corruption", "decoder", {"inputs_length": 64})],
)
def test_objectives_are_deterministic_given_the_seed(name, family, config):
    docs = random_docs(np.random.default_rng(11), 20, 5, 150)
    objective = make_objective(name, IDS, family, **config)
    a, b = objective(docs, np.random.default_rng(0)), objective(docs, np.random.default_rng(0))
    c = objective(docs, np.random.default_rng(1))
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
    if name != "causal_lm":  # the others are random: another seed gives other examples
        assert any(not np.array_equal(x[k], y[k]) for x, y in zip(a, c) for k in x)


# --------------------------------------------------------------------------------------------------- losses
@pytest.fixture(params=["xla", "cpu-kernel"])
def loss_device(request):
    """The loss tests run twice: with XLA's softmax statistics (all 8 test devices) and with the C++ kernel
    llmjax.kernels.cpu_cross_entropy (under a one-CPU-device mesh, where losses.token_cross_entropy uses it)."""
    from llmjax import sharding as shd

    devices = jax.devices()[:1] if request.param == "cpu-kernel" else jax.devices()
    with jax.set_mesh(shd.make_mesh(shd.mesh_config(data=len(devices)), devices)):
        yield request.param


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1], ids=["plain", "smoothed"])
def test_cross_entropy_kernel_is_used_on_one_cpu_device(loss_device, label_smoothing):
    """On one CPU device the loss and its gradient are two kernel calls (no XLA reductions over the logits); on
    8 devices XLA computes them. Both agree with float64 numpy on a vocabulary that is not a multiple of the
    kernel's 16 lanes, over rows split between threads."""
    rng = np.random.default_rng(15)
    logits = jnp.asarray(rng.normal(size=(4, 64, 1001)) * 4, jnp.float32)
    targets = jnp.asarray(rng.integers(0, 1001, (4, 64)))
    fn = jax.jit(jax.value_and_grad(lambda x: losses.cross_entropy(x, targets, label_smoothing=label_smoothing).loss))
    hlo = fn.lower(logits).as_text()
    kernel = loss_device == "cpu-kernel"
    assert ("@llmjax_softmax_stats(" in hlo and "@llmjax_softmax_stats_bwd(" in hlo) == kernel
    value, grad = fn(logits)
    logp = naive_log_softmax(logits)
    q = (1 - label_smoothing) * np.eye(1001)[np.asarray(targets)] + label_smoothing / 1001
    np.testing.assert_allclose(float(value), -np.sum(q * logp), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), np.exp(logp) - q, atol=1e-6)


def naive_log_softmax(logits):
    x = np.asarray(logits, np.float64)
    return x - np.log(np.sum(np.exp(x), axis=-1, keepdims=True))


def test_cross_entropy_matches_naive_numpy(loss_device):
    rng = np.random.default_rng(12)
    logits = rng.normal(size=(3, 7, 11)).astype(np.float32) * 3
    targets = rng.integers(0, 11, (3, 7))
    weights = (rng.random((3, 7)) < 0.7).astype(np.float32)
    logp = naive_log_softmax(logits)
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    sums = jax.jit(losses.cross_entropy)(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights))
    np.testing.assert_allclose(sums.loss, np.sum(nll * weights), rtol=1e-5)
    assert float(sums.weight) == weights.sum()
    assert float(sums.correct) == np.sum((logits.argmax(-1) == targets) * weights)
    mean_loss, accuracy = losses.mean(sums)
    np.testing.assert_allclose(mean_loss, np.sum(nll * weights) / weights.sum(), rtol=1e-5)
    # bf16 logits are upcast: same answer as the float32 computation of the rounded logits.
    bf16 = jnp.asarray(logits, jnp.bfloat16)
    expected = -np.take_along_axis(naive_log_softmax(np.asarray(bf16.astype(jnp.float32))), targets[..., None], -1)
    np.testing.assert_allclose(losses.cross_entropy(bf16, jnp.asarray(targets)).loss, expected.sum(), rtol=1e-5)


@pytest.mark.parametrize("label_smoothing, z_loss", [(0.0, 0.0), (0.1, 0.0), (0.0, 1e-2), (0.2, 1e-2)])
def test_cross_entropy_gradient_matches_autodiff_of_the_formula(label_smoothing, z_loss, loss_device):
    """cross_entropy's hand-written backward pass against JAX's gradient of the textbook formula."""
    rng = np.random.default_rng(13)
    logits = jnp.asarray(rng.normal(size=(3, 5, 17)) * 3, jnp.float32)
    targets = jnp.asarray(rng.integers(0, 17, (3, 5)))
    weights = jnp.asarray(rng.random((3, 5)), jnp.float32)

    def plain(x):
        logp = jax.nn.log_softmax(x, -1)
        q = (1 - label_smoothing) * jax.nn.one_hot(targets, 17) + label_smoothing / 17
        lse = jax.nn.logsumexp(x, -1)
        return jnp.sum((-(q * logp).sum(-1) + z_loss * lse ** 2) * weights)

    ours = lambda x: losses.cross_entropy(x, targets, weights, label_smoothing=label_smoothing, z_loss=z_loss).loss
    np.testing.assert_allclose(ours(logits), plain(logits), rtol=1e-5)
    np.testing.assert_allclose(jax.grad(ours)(logits), jax.grad(plain)(logits), atol=1e-6)


def test_accuracy_is_argmax_with_its_tie_breaking(loss_device):
    """Ties go to the lowest index, as jnp.argmax: a target tied with an earlier logit is wrong, with a later
    one right (the accuracy is computed without an arg-reduction)."""
    rng = np.random.default_rng(14)
    logits = jnp.asarray(rng.integers(0, 3, (4000, 6)), jnp.float32)  # many ties
    targets = jnp.asarray(rng.integers(0, 6, 4000))
    sums = losses.cross_entropy(logits, targets)
    assert float(sums.correct) == int(np.sum(np.argmax(np.asarray(logits), -1) == np.asarray(targets)))
    tied = jnp.zeros((1, 1, 4))
    assert float(losses.cross_entropy(tied, jnp.array([[0]])).correct) == 1.0
    assert float(losses.cross_entropy(tied, jnp.array([[2]])).correct) == 0.0


def test_label_smoothing_and_z_loss_by_hand(loss_device):
    logits = jnp.log(jnp.array([[[1.0, 2.0, 3.0, 4.0]]]))  # p = 0.1, 0.2, 0.3, 0.4; logsumexp = log 10
    target = jnp.array([[3]])
    # q = 0.8 * onehot(3) + 0.2 / 4 -> 0.05, 0.05, 0.05, 0.85
    smoothed = -(0.85 * math.log(0.4) + 0.05 * (math.log(0.1) + math.log(0.2) + math.log(0.3)))
    np.testing.assert_allclose(losses.cross_entropy(logits, target, label_smoothing=0.2).loss, smoothed, rtol=1e-6)
    with_z = -math.log(0.4) + 1e-2 * math.log(10.0) ** 2
    np.testing.assert_allclose(losses.cross_entropy(logits, target, z_loss=1e-2).loss, with_z, rtol=1e-6)
    both = smoothed + 1e-2 * math.log(10.0) ** 2
    np.testing.assert_allclose(
        losses.cross_entropy(logits, target, label_smoothing=0.2, z_loss=1e-2).loss, both, rtol=1e-6
    )


def test_cross_entropy_respects_weights_and_is_stable(loss_device):
    logits = jnp.array([[[1e4, 0.0], [0.0, 1e4], [3.0, -2.0]]])  # huge logits: naive exp would overflow
    targets = jnp.array([[0, 0, 1]])
    per_token = np.array([0.0, 1e4, 5.0 + math.log1p(math.exp(-5.0))])
    for w in ([1, 1, 1], [1, 0, 1], [2, 0, 0.5], [0, 0, 0]):
        sums = losses.cross_entropy(logits, targets, jnp.array([w], jnp.float32))
        np.testing.assert_allclose(sums.loss, np.dot(per_token, w), rtol=1e-6)
        assert float(sums.weight) == sum(w) and float(sums.correct) == w[0]
    # What sits at weight-0 positions cannot change the result.
    a = losses.cross_entropy(logits, targets, jnp.array([[1.0, 0.0, 1.0]]))
    b = losses.cross_entropy(logits.at[0, 1].set(jnp.array([-7.0, 123.0])), targets, jnp.array([[1.0, 0.0, 1.0]]))
    assert a == b
    assert losses.mean(losses.cross_entropy(logits, targets, jnp.zeros((1, 3)))) == (0.0, 0.0)


@pytest.mark.parametrize("selected", [[5, 10, 3], [5, 12, 40]], ids=["gathered", "a-full-row-takes-every-position"])
def test_mlm_loss_gives_the_full_heads_sums_and_gradients(selected):
    """mlm_loss runs the MLM head on the K = T / 4 positions of each row holding its selected tokens (BERT's
    gather_indexes), or on every position when a row has more than K: either way the sums and the gradients are
    those of the head over all positions (mlm_nsp_loss on the model's full mlm_logits)."""
    from flax import nnx  # only this test builds a model

    from llmjax.models.config import ModelConfig
    from llmjax.models.transformer import build_model
    from llmjax.objectives.loss import mlm_loss

    V, T = 101, 40
    model = build_model(ModelConfig(family="encoder", vocab_size=V, d_model=32, num_layers=2, num_heads=4, mlp_dim=48,
                                    max_length=64, dropout_rate=0.0, pooler=True), 0)
    rng = np.random.default_rng(0)
    weights = np.zeros((3, T), np.float32)
    for i, n in enumerate(selected):
        weights[i, rng.choice(T, n, replace=False)] = rng.choice([1.0, 0.5], n)
    batch = {"inputs": rng.integers(10, V, (3, T)), "targets": rng.integers(10, V, (3, T)), "weights": weights,
             "segment_ids": np.ones((3, T), np.int32), "positions": np.tile(np.arange(T), (3, 1)),
             "nsp_labels": np.array([NSP_IS_NEXT, NSP_IS_RANDOM, NSP_IS_NEXT])}
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    kw = dict(label_smoothing=0.1, z_loss=1e-3)

    def ours(m):
        _, sums = mlm_loss(m, batch, **kw)
        return sums["lm"].loss + sums["nsp"].loss, sums

    def full(m):
        out = m(batch["inputs"], batch["segment_ids"], batch["positions"])
        sums = losses.mlm_nsp_loss(out["mlm_logits"], batch["targets"], batch["weights"], out["nsp_logits"],
                                   batch["nsp_labels"], **kw)
        return sums["mlm"].loss + sums["nsp"].loss, {"lm": sums["mlm"], "nsp": sums["nsp"]}

    (a, sums_a), grads_a = nnx.jit(lambda m: nnx.value_and_grad(ours, has_aux=True)(m))(model)
    (b, sums_b), grads_b = nnx.jit(lambda m: nnx.value_and_grad(full, has_aux=True)(m))(model)
    np.testing.assert_allclose(a, b, rtol=1e-6)
    for part in ("lm", "nsp"):
        for x, y in zip(sums_a[part], sums_b[part]):
            np.testing.assert_allclose(x, y, rtol=1e-6)
    for x, y in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_mlm_nsp_loss_is_the_two_cross_entropies():
    rng = np.random.default_rng(13)
    mlm_logits = jnp.asarray(rng.normal(size=(2, 6, 9)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 9, (2, 6)))
    weights = jnp.asarray(rng.random((2, 6)) < 0.3, jnp.float32)
    nsp_logits = jnp.asarray(rng.normal(size=(2, 2)), jnp.float32)
    nsp_labels = jnp.array([NSP_IS_NEXT, NSP_IS_RANDOM])
    out = losses.mlm_nsp_loss(mlm_logits, targets, weights, nsp_logits, nsp_labels, jnp.array([1.0, 0.0]))
    assert out["mlm"] == losses.cross_entropy(mlm_logits, targets, weights)
    expected_nsp = -naive_log_softmax(np.asarray(nsp_logits))[0, NSP_IS_NEXT]  # the second row is padding
    np.testing.assert_allclose(out["nsp"].loss, expected_nsp, rtol=1e-5)
    assert float(out["nsp"].weight) == 1.0
    assert set(losses.mlm_nsp_loss(mlm_logits, targets, weights)) == {"mlm"}

"""Generation: cached decoding equals uncached recomputation, beam search vs greedy, sampling, EOS, prefix LM."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llmjax.data.vocab import EOS_ID
from llmjax.generate import filter_logits, generate
from llmjax.models.config import ModelConfig
from llmjax.models.transformer import build_model

V = 97
N = 8  # max_new_tokens
COMMON = dict(vocab_size=V, d_model=32, num_layers=2, num_heads=4, mlp_dim=48, max_length=64, init_std=0.2)
CONFIGS = {
    # Learned absolute positions: a wrong position offset after left padding would change the outputs.
    "decoder": ModelConfig(family="decoder", activation="gelu_tanh", position="learned", **COMMON),
    "encoder_decoder": ModelConfig(family="encoder_decoder", activation="geglu_tanh", norm="rmsnorm", use_bias=False,
                                   position="relative", scale_attention=False, relative_max_distance=16, **COMMON),
}
# RoPE and grouped-query attention (4 query heads share 2 kv heads), SwiGLU, an untied output projection.
LLAMA = ModelConfig(family="decoder", activation="swiglu", norm="rmsnorm", use_bias=False, position="rope",
                    num_kv_heads=2, tie_embeddings=False, **COMMON)
# Different lengths, so rows are padded differently (decoder prompts start with bos = 3).
PROMPTS = [[3, 41, 17, 88, 9, 23, 60], [3, 12], [3, 70, 33, 51], [3]]


@functools.lru_cache(maxsize=None)
def model(family):
    return build_model(CONFIGS[family], 0)


def enc_prompts(family):
    return [p[1:] or [5] for p in PROMPTS] if family == "encoder_decoder" else PROMPTS


# ------------------------------------------------------------------------------ uncached references
@nnx.jit
def _log_probs_decoder(m, tokens, prefix_mask):  # [B, T] -> [B, T, V]
    return jax.nn.log_softmax(m(tokens, prefix_mask=prefix_mask))


@nnx.jit
def _log_probs_encoder_decoder(m, enc, enc_seg, dec):  # -> [B, T, V]
    return jax.nn.log_softmax(m(enc, dec, enc_seg))


def _right_padded(rows, length):
    out = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def full_log_probs(m, prompts, continuations, prefix_lm=False):
    """Uncached forward over prompt + continuation (no left padding, no cache): for each row the log-prob
    rows [len(continuation) + 1, V] that predicted each continuation token (and the next one).
    Fixed lengths (continuations up to N tokens), so each model compiles this once."""
    cont_len = N + 1
    if m.cfg.family == "decoder":
        seqs = [list(p) + list(c) for p, c in zip(prompts, continuations)]
        length = max(len(p) for p in PROMPTS) + cont_len
        prefix = np.arange(length)[None] < np.array([len(p) if prefix_lm else 0 for p in prompts])[:, None]
        lp = np.asarray(_log_probs_decoder(m, _right_padded(seqs, length), prefix))
        return [lp[i, len(p) - 1:len(p) - 1 + len(c) + 1] for i, (p, c) in enumerate(zip(prompts, continuations))]
    enc = _right_padded(prompts, max(len(p) for p in prompts))
    dec = _right_padded([[0] + list(c) for c in continuations], cont_len)  # decoder starts from pad (T5)
    lp = np.asarray(_log_probs_encoder_decoder(m, enc, (enc > 0).astype(np.int32), dec))
    return [lp[i, :len(c) + 1] for i, c in enumerate(continuations)]


def reference_greedy(m, prompts, n, prefix_lm=False):
    """Greedy decoding that recomputes the full forward on the growing sequences at every step."""
    out, done = [[] for _ in prompts], [False] * len(prompts)
    for _ in range(n):
        rows = full_log_probs(m, prompts, out, prefix_lm)
        for i, lp in enumerate(rows):
            if not done[i]:
                out[i].append(int(np.argmax(lp[len(out[i])])))
                done[i] = out[i][-1] == EOS_ID
    return [o[:-1] if d else o for o, d in zip(out, done)], np.array(done)


def sequence_log_prob(m, prompts, out, prefix_lm=False):
    """Sum of log-probs of each row's new tokens (EOS included when emitted), by an uncached forward."""
    conts = [t + [EOS_ID] * bool(f) for t, f in zip(out.tokens, out.finished)]
    rows = full_log_probs(m, prompts, conts, prefix_lm)
    return np.array([lp[np.arange(len(c)), c].sum() for lp, c in zip(rows, conts)])


# ----------------------------------------------------------------------------- cached == uncached
@pytest.mark.parametrize("family", ["decoder", "encoder_decoder"])
def test_cached_greedy_equals_uncached_greedy(family):
    m, prompts = model(family), enc_prompts(family)
    out = generate(m, prompts, max_new_tokens=N)
    ref, ref_done = reference_greedy(m, prompts, N)
    assert out.tokens == ref
    np.testing.assert_array_equal(out.finished, ref_done)
    np.testing.assert_allclose(out.log_probs, sequence_log_prob(m, prompts, out), rtol=1e-4, atol=1e-4)
    assert out.sequences.shape == (len(prompts), N)
    # Each row decodes as if it were alone: batching (and its padding) changes nothing.
    alone = generate(m, [prompts[1]], max_new_tokens=N)
    assert alone.tokens[0] == out.tokens[1]


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_grouped_query_decoding_equals_uncached_greedy(scan):
    """Llama-style (RoPE, grouped-query heads read from the heads-first cache), unrolled or scanned (caches
    stacked over the layers): cached greedy == uncached greedy, log-probs too."""
    m = build_model(LLAMA.replace(scan_layers=scan), 0)
    out = generate(m, PROMPTS, max_new_tokens=N)
    ref, ref_done = reference_greedy(m, PROMPTS, N)
    assert out.tokens == ref
    np.testing.assert_array_equal(out.finished, ref_done)
    np.testing.assert_allclose(out.log_probs, sequence_log_prob(m, PROMPTS, out), rtol=1e-4, atol=1e-4)


def test_prefix_lm_decoding_equals_uncached_prefix_lm_greedy():
    m = model("decoder")
    out = generate(m, PROMPTS, max_new_tokens=N, prefix_lm=True)
    ref, _ = reference_greedy(m, PROMPTS, N, prefix_lm=True)
    assert out.tokens == ref
    np.testing.assert_allclose(out.log_probs, sequence_log_prob(m, PROMPTS, out, prefix_lm=True), rtol=1e-4, atol=1e-4)
    causal = generate(m, PROMPTS, max_new_tokens=N)
    assert not np.allclose(out.log_probs, causal.log_probs, atol=1e-3)  # the prefix really is bidirectional


def test_one_compile_per_shape():
    """A second batch with other prompts of the same padded shape reuses the compiled program."""
    compiles = []
    listener = lambda event, duration, **kw: compiles.append(event) if "backend_compile" in event else None
    m = model("decoder")
    generate(m, PROMPTS, max_new_tokens=N)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        generate(m, [[3, 5, 6], [3, 7, 8, 9, 10], [3, 11, 12, 13, 14, 15, 16, 17], [3, 4]], max_new_tokens=N, seed=3)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []


# --------------------------------------------------------------------------------------------- beam
@pytest.mark.parametrize("family", ["decoder", "encoder_decoder"])
def test_beam_search(family):
    m, prompts = model(family), enc_prompts(family)
    greedy = generate(m, prompts, max_new_tokens=N)
    one = generate(m, prompts, max_new_tokens=N, method="beam", num_beams=1, length_penalty=0.6)
    assert one.tokens == greedy.tokens
    np.testing.assert_allclose(one.log_probs, greedy.log_probs, rtol=1e-5)

    beam = generate(m, prompts, max_new_tokens=N, method="beam", num_beams=4, length_penalty=0.0)
    # The reported log-prob is the sequence's true log-prob (so the cache followed each beam's parents) ...
    recomputed = sequence_log_prob(m, prompts, beam)
    np.testing.assert_allclose(beam.log_probs, recomputed, rtol=1e-4, atol=1e-4)
    # ... and, on these prompts, at least as high as greedy's and higher somewhere (not a theorem in general).
    assert np.all(recomputed >= greedy.log_probs - 1e-4)
    assert np.any(recomputed > greedy.log_probs + 1e-3)
    np.testing.assert_allclose(beam.scores, beam.log_probs)  # length_penalty 0: score = log-prob

    gnmt = generate(m, prompts, max_new_tokens=N, method="beam", num_beams=4, length_penalty=0.6)
    lengths = np.array([len(t) + f for t, f in zip(gnmt.tokens, gnmt.finished)])
    np.testing.assert_allclose(gnmt.scores, gnmt.log_probs / ((5 + lengths) / 6) ** 0.6, rtol=1e-5)


# ----------------------------------------------------------------------------------------- sampling
def test_sampling_limits_and_seeds():
    m = model("decoder")
    greedy = generate(m, PROMPTS, max_new_tokens=N)
    assert generate(m, PROMPTS, max_new_tokens=N, method="sample", top_k=1, seed=5).tokens == greedy.tokens
    assert generate(m, PROMPTS, max_new_tokens=N, method="sample", top_p=1e-6, seed=5).tokens == greedy.tokens
    assert generate(m, PROMPTS, max_new_tokens=N, method="sample", temperature=0.0).tokens == greedy.tokens
    a = generate(m, PROMPTS, max_new_tokens=N, method="sample", seed=1)
    assert generate(m, PROMPTS, max_new_tokens=N, method="sample", seed=1).tokens == a.tokens
    assert generate(m, PROMPTS, max_new_tokens=N, method="sample", seed=2).tokens != a.tokens
    np.testing.assert_allclose(a.log_probs, sequence_log_prob(m, PROMPTS, a), rtol=1e-4, atol=1e-4)


def test_sampled_first_token_frequencies_match_softmax():
    """Many rows of one prompt draw independent first tokens; their frequencies match the filtered softmax."""
    m, n = model("decoder"), 4000
    prompt = [3, 41, 17, 88]
    logits = full_log_probs(m, [prompt], [[]])[0][0]  # [V] log-probs: logits up to a constant

    def frequencies(**kw):
        out = generate(m, [prompt] * n, max_new_tokens=1, method="sample", seed=11, **kw)
        return np.bincount(out.sequences[:, 0], minlength=V) / n

    def check(freq, p):
        assert np.all(freq[p == 0] == 0)
        np.testing.assert_array_less(np.abs(freq - p), 4.5 * np.sqrt(p * (1 - p) / n) + 1.5 / n)

    for temperature in (0.5, 1.5):
        p = np.exp(logits / temperature)
        check(frequencies(temperature=temperature), p / p.sum())
    top5 = np.argsort(logits)[-5:]
    p = np.zeros(V)
    p[top5] = np.exp(logits[top5])
    check(frequencies(top_k=5), p / p.sum())
    order = np.argsort(logits)[::-1]
    probs = np.exp(logits[order]) / np.exp(logits).sum()
    nucleus = order[: int(np.searchsorted(np.cumsum(probs), 0.3)) + 1]  # smallest prefix with mass >= 0.3
    p = np.zeros(V)
    p[nucleus] = np.exp(logits[nucleus])
    check(frequencies(top_p=0.3), p / p.sum())


def test_filter_logits():
    logits = jnp.log(jnp.array([[0.1, 0.5, 0.15, 0.25]]))
    keep = lambda **kw: np.isfinite(np.asarray(filter_logits(logits, **kw)))[0].tolist()
    assert keep(top_k=2) == [False, True, False, True]
    assert keep(top_p=0.5) == [False, True, False, False]
    assert keep(top_p=0.6) == [False, True, False, True]
    assert keep(top_k=3, top_p=0.8) == [False, True, False, True]  # top-p applies to the renormalised top 3
    assert keep(top_k=3, top_p=0.85) == [False, True, True, True]
    assert keep() == [True] * 4


# ---------------------------------------------------------------------------------------------- EOS
@pytest.mark.parametrize("family", ["decoder", "encoder_decoder"])
def test_eos_stops_each_row(family):
    """A model whose EOS logit is a scaled copy of the token row 0 emits third: row 0 stops early, others run on."""
    base, prompts = model(family), enc_prompts(family)
    stop_like = generate(base, prompts, max_new_tokens=N).sequences[0, 2]
    m = nnx.clone(base)
    table = m.embedder.tokens.embedding  # tied: also the output projection
    table[...] = table[...].at[EOS_ID].set(1.3 * table[stop_like])
    out = generate(m, prompts, max_new_tokens=N)
    ref, ref_done = reference_greedy(m, prompts, N)
    assert out.tokens == ref
    np.testing.assert_array_equal(out.finished, ref_done)
    assert out.finished[0] and 1 <= len(out.tokens[0]) <= 2 and not out.finished.all()
    for row, tokens, done in zip(out.sequences, out.tokens, out.finished):
        assert EOS_ID not in tokens
        if done:  # EOS, then pad only
            assert row[len(tokens)] == EOS_ID and np.all(row[len(tokens) + 1:] == 0)
    np.testing.assert_allclose(out.log_probs, sequence_log_prob(m, prompts, out), rtol=1e-4, atol=1e-4)
    beam = generate(m, prompts, max_new_tokens=N, method="beam", num_beams=4, length_penalty=0.0)
    np.testing.assert_allclose(beam.log_probs, sequence_log_prob(m, prompts, beam), rtol=1e-4, atol=1e-4)
    assert beam.finished.any()


# ------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("family, prompts, kw, needle", [
    ("decoder", [[3], []], {}, "prompt 1 is empty"),
    ("decoder", [[3] * 60], {}, "model.max_length=64"),
    ("decoder", [[3, 200]], {}, "outside the vocabulary"),
    ("decoder", [[3]], dict(method="nucleus"), "method"),
    ("decoder", [[3]], dict(top_p=0.0), "top_p"),
    ("encoder_decoder", [[5]], dict(prefix_lm=True), "prefix_lm"),
])
def test_bad_arguments_are_named(family, prompts, kw, needle):
    with pytest.raises(ValueError, match=needle):
        generate(model(family), prompts, max_new_tokens=N, **kw)

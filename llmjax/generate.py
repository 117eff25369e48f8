"""KV-cached generation for decoder-only and encoder-decoder models: greedy, temperature / top-k / top-p
sampling and beam search, each one jit-compiled while_loop over a cache of fixed size.

Shape letters: B batch (prompts), K beams, P padded prompt length, S padded encoder length, L cache length,
N max_new_tokens, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llmjax.data.vocab import EOS_ID, PAD_ID
from llmjax.models.attention import KVCache

METHODS = ("greedy", "sample", "beam")
# (tokens [B'], step t, cache) -> (logits [B', V] for the token after `tokens`, cache)
StepFn = Callable[[jax.Array, jax.Array, object], tuple[jax.Array, object]]


class Decoded(NamedTuple):
    """What the jitted loops return, on device."""

    tokens: jax.Array  # [B, N] new tokens; EOS included; pad after EOS
    log_probs: jax.Array  # [B] float32, sum of the model's log-probabilities of the new tokens up to EOS
    scores: jax.Array  # [B] float32, = log_probs, or log_probs / length penalty for beam search
    finished: jax.Array  # [B] bool, EOS was emitted


@dataclasses.dataclass
class GenerateOutput:
    """Per prompt: `tokens` are the new tokens up to and EXCLUDING EOS (`finished` says whether EOS came);
    `log_probs` sum the model's (untempered) log-probabilities of the new tokens INCLUDING EOS; `scores`
    equal `log_probs`, or for beam search `log_probs / length_penalty(len)`; `sequences` is the raw
    [B, N] array (EOS included, pad after it)."""

    tokens: list[list[int]]
    log_probs: np.ndarray  # [B]
    scores: np.ndarray  # [B]
    finished: np.ndarray  # [B] bool
    sequences: np.ndarray  # [B, N]


# ------------------------------------------------------------------------------------------- choosing
def filter_logits(logits: jax.Array, *, top_k: jax.Array | int = 0, top_p: jax.Array | float = 1.0) -> jax.Array:
    """Set to -inf every logit outside the top k (0 = off) and outside the nucleus: the smallest set of most
    likely tokens whose probability reaches top_p (1 = off; the most likely token is always kept). Both may
    be traced scalars, so changing them does not recompile. logits [B, V] -> [B, V]."""
    desc = jnp.sort(logits, axis=-1)[:, ::-1]  # [B, V]
    kth = jax.lax.dynamic_index_in_dim(desc, jnp.maximum(top_k, 1) - 1, axis=1)  # [B, 1]
    logits = jnp.where((top_k > 0) & (logits < kth), -jnp.inf, logits)
    desc = jnp.where((top_k > 0) & (desc < kth), -jnp.inf, desc)
    probs = jax.nn.softmax(desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
    kept = jnp.where(before < top_p, desc, jnp.inf).min(-1, keepdims=True)  # least likely kept logit
    nucleus = jnp.where(logits < kept, -jnp.inf, logits)
    return jnp.where(top_p >= 1.0, logits, nucleus)  # top_p = 1 keeps all, immune to cumsum rounding


def choose_tokens(logits: jax.Array, key: jax.Array, *, greedy: bool, temperature, top_k, top_p) -> jax.Array:
    """Next token per row from logits [B, V] -> [B] int32: argmax, or a sample from
    softmax(filter(logits / temperature)) (temperature, then top-k, then top-p)."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    # The filters sort the vocabulary (every row, every step): only when one is on.
    filtered = jax.lax.cond((top_k > 0) | (top_p < 1.0), lambda x: filter_logits(x, top_k=top_k, top_p=top_p),
                            lambda x: x, logits / temperature)
    return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)


def length_penalty_fn(length, alpha):
    """GNMT / T5 length penalty ((5 + length) / 6) ** alpha; alpha = 0 ranks by raw log-probability."""
    return ((5.0 + length) / 6.0) ** alpha


# ---------------------------------------------------------------------------------------------- loops
def sample_loop(step_fn: StepFn, logits, cache, key, temperature, top_k, top_p, *, max_new_tokens: int,
                greedy: bool, eos_id: int, pad_id: int) -> Decoded:
    """Greedy / sampled decoding from the logits [B, V] of each row's first new token. A row that emitted EOS
    emits pad afterwards; the loop stops when every row has finished or N tokens were chosen."""
    b, n = logits.shape[0], max_new_tokens

    def select(t, logits, tokens, log_probs, finished):
        tok = choose_tokens(logits, jax.random.fold_in(key, t), greedy=greedy, temperature=temperature,
                            top_k=top_k, top_p=top_p)
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits), tok[:, None], axis=-1)[:, 0]
        tok = jnp.where(finished, pad_id, tok)
        log_probs = log_probs + jnp.where(finished, 0.0, logp)
        return tok, tokens.at[:, t].set(tok), log_probs, finished | (tok == eos_id)

    def body(carry):
        t, logits, cache, tokens, log_probs, finished = carry
        tok, tokens, log_probs, finished = select(t, logits, tokens, log_probs, finished)
        logits, cache = step_fn(tok, t, cache)
        return t + 1, logits, cache, tokens, log_probs, finished

    init = (jnp.int32(0), logits, cache, jnp.full((b, n), pad_id, jnp.int32), jnp.zeros((b,), jnp.float32),
            jnp.zeros((b,), bool))
    # The last token is chosen after the loop, so the model never runs on a token nobody reads.
    t, logits, _, tokens, log_probs, finished = jax.lax.while_loop(
        lambda c: (c[0] < n - 1) & ~c[-1].all(), body, init)
    _, tokens, log_probs, finished = select(t, logits, tokens, log_probs, finished)
    return Decoded(tokens, log_probs, log_probs, finished)


def _is_cache(x) -> bool:
    return isinstance(x, KVCache)


def _take_rows(tree, rows: jax.Array):
    """Gather the batch rows `rows` of every array and cache (the scalar write index is shared)."""
    return jax.tree.map(lambda x: x.take_rows(rows) if _is_cache(x) else x[rows] if x.ndim else x, tree,
                        is_leaf=_is_cache)


def _repeat_rows(tree, k: int):
    return jax.tree.map(lambda x: x.repeat_rows(k) if _is_cache(x) else jnp.repeat(x, k, axis=0) if x.ndim else x,
                        tree, is_leaf=_is_cache)


def beam_search_loop(step_fn: StepFn, logits, cache, length_penalty, *, num_beams: int, max_new_tokens: int,
                     eos_id: int, pad_id: int) -> Decoded:
    """Beam search from the logits [B*K, V] of the first new token (the K beams of a row start identical;
    row b's beam k is batch row b*K + k of logits and cache).

    Each step the K beams of a row are replaced by the K best of: every one-token extension of an unfinished
    beam, and every finished beam carried over unchanged; all are ranked by log_prob / length_penalty(len),
    len counting the new tokens including EOS. With K = 1 this is exactly greedy decoding. The loop stops
    when every beam has emitted EOS or N tokens were chosen; the best-scoring beam of each row is returned.
    """
    bk, v = logits.shape
    k, n = num_beams, max_new_tokens
    b = bk // k

    def select(t, logits, seq, logp, length, finished):
        token_logp = jax.nn.log_softmax(logits).reshape(b, k, v)
        grow = logp[..., None] + token_logp  # [B, K, V]
        grow_score = jnp.where(finished[..., None], -jnp.inf, grow / length_penalty_fn(t + 1, length_penalty))
        keep_score = jnp.where(finished, logp / length_penalty_fn(length, length_penalty), -jnp.inf)  # [B, K]
        # Candidates per row: K * (V + 1); column V of beam j = "beam j, finished, carried over".
        score = jnp.concatenate([grow_score, keep_score[..., None]], -1).reshape(b, k * (v + 1))
        cand_logp = jnp.concatenate([grow, logp[..., None]], -1).reshape(b, k * (v + 1))
        cand_len = jnp.concatenate([jnp.full((b, k, v), t + 1), length[..., None]], -1).reshape(b, k * (v + 1))
        _, idx = jax.lax.top_k(score, k)  # [B, K]
        beam, col = idx // (v + 1), idx % (v + 1)
        carried = col == v
        tok = jnp.where(carried, pad_id, col).astype(jnp.int32)
        seq = jnp.take_along_axis(seq, beam[..., None], axis=1).at[:, :, t].set(tok)
        logp = jnp.take_along_axis(cand_logp, idx, axis=1)
        length = jnp.take_along_axis(cand_len, idx, axis=1)
        return tok, beam, seq, logp, length, carried | (tok == eos_id)

    def body(carry):
        t, logits, cache, seq, logp, length, finished = carry
        tok, beam, seq, logp, length, finished = select(t, logits, seq, logp, length, finished)
        cache = _take_rows(cache, (jnp.arange(b)[:, None] * k + beam).reshape(-1))  # follow each beam's parent
        logits, cache = step_fn(tok.reshape(bk), t, cache)
        return t + 1, logits, cache, seq, logp, length, finished

    # Only beam 0 is live at first, so the K identical beams do not fill the beam with K copies.
    logp0 = jnp.where(jnp.arange(k) == 0, 0.0, -jnp.inf) * jnp.ones((b, 1))
    init = (jnp.int32(0), logits, cache, jnp.full((b, k, n), pad_id, jnp.int32), logp0.astype(jnp.float32),
            jnp.zeros((b, k), jnp.int32), jnp.zeros((b, k), bool))
    t, logits, _, seq, logp, length, finished = jax.lax.while_loop(
        lambda c: (c[0] < n - 1) & ~c[-1].all(), body, init)
    _, _, seq, logp, length, finished = select(t, logits, seq, logp, length, finished)
    score = logp / length_penalty_fn(length, length_penalty)  # [B, K]
    best = jnp.argmax(score, axis=-1)[:, None]
    pick = lambda x: jnp.take_along_axis(x, best, axis=1)[:, 0]
    return Decoded(jnp.take_along_axis(seq, best[..., None], axis=1)[:, 0], pick(logp), pick(score), pick(finished))


def _run_loop(step_fn, logits, cache, key, temperature, top_k, top_p, length_penalty, *, method, max_new_tokens,
              num_beams, eos_id, pad_id) -> Decoded:
    if method == "beam":
        return beam_search_loop(step_fn, logits, cache, length_penalty, num_beams=num_beams,
                                max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id)
    return sample_loop(step_fn, logits, cache, key, temperature, top_k, top_p, max_new_tokens=max_new_tokens,
                       greedy=method == "greedy", eos_id=eos_id, pad_id=pad_id)


# ------------------------------------------------------------------------------------- model families
_STATIC = ("cache_length", "method", "max_new_tokens", "num_beams", "eos_id", "pad_id")


@functools.partial(nnx.jit, static_argnames=_STATIC)
def decoder_only_generate(model, tokens, segment_ids, positions, prefix_mask, key, temperature, top_k, top_p,
                          length_penalty, *, cache_length: int, method: str, max_new_tokens: int,
                          num_beams: int = 1, eos_id: int = EOS_ID, pad_id: int = PAD_ID) -> Decoded:
    """Decode from LEFT-padded prompts tokens [B, P] (segment_ids 1 real / 0 pad; positions from 0 at each
    row's first token; prefix_mask [B, P] True on the bidirectional prompt of a prefix LM, None = causal) with a
    cache of L >= P + N - 1 slots. One prefill pass over the prompts, then one token per step for all rows in
    lockstep. The scalars (key, temperature, top_k, top_p, length_penalty) are traced: no recompiles."""
    b = tokens.shape[0]
    lengths = segment_ids.sum(-1).astype(jnp.int32)  # [B] next position of each row
    cache = model.init_cache(b, cache_length)
    logits, cache = model(tokens, segment_ids, positions, prefix_mask=prefix_mask, cache=cache)  # [B, P, V]
    logits = logits[:, -1]  # left padding: the last column is every row's last prompt token
    if method == "beam":
        logits, cache, lengths = _repeat_rows((logits, cache, lengths), num_beams)

    def step(tok, t, cache):  # the token chosen at step t sits at position length + t
        logits, cache = model(tok[:, None], jnp.ones_like(tok)[:, None], (lengths + t)[:, None], cache=cache)
        return logits[:, 0], cache

    return _run_loop(step, logits, cache, key, temperature, top_k, top_p, length_penalty, method=method,
                     max_new_tokens=max_new_tokens, num_beams=num_beams, eos_id=eos_id, pad_id=pad_id)


@functools.partial(nnx.jit, static_argnames=_STATIC)
def encoder_decoder_generate(model, encoder_tokens, encoder_segment_ids, key, temperature, top_k, top_p,
                             length_penalty, *, cache_length: int, method: str, max_new_tokens: int,
                             num_beams: int = 1, eos_id: int = EOS_ID, pad_id: int = PAD_ID) -> Decoded:
    """Decode from RIGHT-padded encoder inputs [B, S] (segment ids 1 real / 0 pad). The encoder runs once and
    each cross-attention layer's K/V are cached once; the decoder starts from pad_id (T5) and its
    self-attention cache has L >= N slots."""
    b = encoder_tokens.shape[0]
    enc_pos = jnp.where(encoder_segment_ids > 0, jnp.arange(encoder_tokens.shape[1]), 0)
    encoded = model.encode(encoder_tokens, encoder_segment_ids, enc_pos)  # [B, S, D]
    if method == "beam":
        encoded, encoder_segment_ids, enc_pos = _repeat_rows((encoded, encoder_segment_ids, enc_pos), num_beams)
        b *= num_beams
    cache, cross = model.init_cache(b, cache_length, encoded, encoder_segment_ids, enc_pos)

    def step(tok, t, cache):  # the token chosen at step t sits at decoder position t + 1
        logits, cache = model.decode(tok[:, None], None, segment_ids=jnp.ones_like(tok)[:, None],
                                     positions=jnp.full((b, 1), t + 1, jnp.int32), cache=cache, cross_cache=cross)
        return logits[:, 0], cache

    logits, cache = step(jnp.full((b,), pad_id, jnp.int32), -1, cache)  # start token at position 0
    return _run_loop(step, logits, cache, key, temperature, top_k, top_p, length_penalty, method=method,
                     max_new_tokens=max_new_tokens, num_beams=num_beams, eos_id=eos_id, pad_id=pad_id)


# ------------------------------------------------------------------------------------------- padding
def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int = PAD_ID):
    """Decoder-only prompts -> tokens, segment_ids, positions [B, length] int32, each row's tokens at the right
    end; padding has segment 0 and position 0, real tokens positions 0, 1, ... from the first one."""
    b = len(prompts)
    tokens = np.full((b, length), pad_id, np.int32)
    segment_ids = np.zeros((b, length), np.int32)
    positions = np.zeros((b, length), np.int32)
    for i, p in enumerate(prompts):
        if len(p):
            tokens[i, length - len(p):] = p
            segment_ids[i, length - len(p):] = 1
            positions[i, length - len(p):] = np.arange(len(p))
    return tokens, segment_ids, positions


def right_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int = PAD_ID):
    """Encoder inputs -> tokens, segment_ids [B, length] int32, padding (segment 0) on the right."""
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    segment_ids = np.zeros((len(prompts), length), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
        segment_ids[i, :len(p)] = 1
    return tokens, segment_ids


# ------------------------------------------------------------------------------------------------- API
def generate(model, prompts: Sequence[Sequence[int]] | np.ndarray, *, max_new_tokens: int, method: str = "greedy",
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, num_beams: int = 4,
             length_penalty: float = 0.6, eos_id: int = EOS_ID, pad_id: int = PAD_ID, seed: int = 0,
             prefix_lm: bool = False, length_bucket: int = 16) -> GenerateOutput:
    """Continue each prompt of a DecoderOnly model, or decode from each encoder input of an EncoderDecoder.

    method: 'greedy'; 'sample' (temperature, then top_k (0 = off), then top_p (1 = off); temperature 0 is
    greedy; `seed` fixes the draws); or 'beam' (num_beams, GNMT length penalty ((5 + len) / 6) ** length_penalty,
    see beam_search_loop). prefix_lm: the decoder-only prompt is a bidirectional prefix (prefix-LM models).
    Prompt and cache lengths are rounded up to a multiple of `length_bucket`, so batches of similar
    lengths share one compiled program (one per batch size, bucket and static option).
    """
    cfg = model.cfg
    prompts = [[int(t) for t in p] for p in (prompts.tolist() if isinstance(prompts, np.ndarray) else prompts)]
    _check(cfg, prompts, max_new_tokens, method, temperature, top_k, top_p, num_beams, prefix_lm, length_bucket)
    if method == "sample" and temperature == 0.0:
        method = "greedy"
    longest = max(len(p) for p in prompts)
    static = dict(method=method, max_new_tokens=max_new_tokens, num_beams=num_beams if method == "beam" else 1,
                  eos_id=eos_id, pad_id=pad_id)
    scalars = (jax.random.key(seed), jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p),
               jnp.float32(length_penalty))
    if cfg.family == "decoder":
        p = _round_up(longest, length_bucket)
        tokens, segment_ids, positions = left_pad(prompts, p, pad_id)
        prefix = segment_ids > 0 if prefix_lm else None
        out = decoder_only_generate(model, tokens, segment_ids, positions, prefix, *scalars,
                                    cache_length=_round_up(p + max_new_tokens, length_bucket), **static)
    else:
        tokens, segment_ids = right_pad(prompts, max(_round_up(longest, length_bucket), length_bucket), pad_id)
        out = encoder_decoder_generate(model, tokens, segment_ids, *scalars,
                                       cache_length=_round_up(max_new_tokens, length_bucket), **static)
    seqs, finished = np.asarray(out.tokens), np.asarray(out.finished)
    new = [row[: list(row).index(eos_id)].tolist() if done else row.tolist() for row, done in zip(seqs, finished)]
    return GenerateOutput(new, np.asarray(out.log_probs), np.asarray(out.scores), finished, seqs)


def _check(cfg, prompts, max_new_tokens, method, temperature, top_k, top_p, num_beams, prefix_lm, length_bucket):
    """One clear message for every argument or prompt that cannot work."""
    if cfg.family not in ("decoder", "encoder_decoder"):
        raise ValueError(f"generate needs a decoder or encoder_decoder model, got model.family={cfg.family!r}")
    if method not in METHODS:
        raise ValueError(f"method: unknown {method!r}; choose one of {', '.join(METHODS)}")
    for name, value, ok in [
        ("max_new_tokens", max_new_tokens, isinstance(max_new_tokens, int) and max_new_tokens >= 1),
        ("temperature", temperature, temperature >= 0.0),
        ("top_k", top_k, isinstance(top_k, int) and 0 <= top_k <= cfg.vocab_size),
        ("top_p", top_p, 0.0 < top_p <= 1.0),
        ("num_beams", num_beams, isinstance(num_beams, int) and num_beams >= 1),
        ("length_bucket", length_bucket, isinstance(length_bucket, int) and length_bucket >= 1),
    ]:
        if not ok:
            raise ValueError(f"{name}={value!r} is out of range (max_new_tokens, num_beams, length_bucket >= 1; "
                             f"temperature >= 0; 0 <= top_k <= vocab_size={cfg.vocab_size}; 0 < top_p <= 1)")
    if not prompts:
        raise ValueError("prompts is empty: pass at least one prompt")
    for i, p in enumerate(prompts):
        bad = [t for t in p if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token ids {bad[:5]} outside the vocabulary [0, {cfg.vocab_size})")
        if cfg.family == "decoder" and not p:
            raise ValueError(f"prompt {i} is empty; a decoder-only model needs at least one token to continue "
                             "(start it with the bos id)")
    if prefix_lm and cfg.family != "decoder":
        raise ValueError("prefix_lm=True is for decoder-only models; an encoder-decoder's encoder already sees "
                         "its whole input")
    if cfg.position == "learned":  # the learned position table has model.max_length rows
        longest = max(len(p) for p in prompts)
        need = longest + max_new_tokens - 1 if cfg.family == "decoder" else max(longest, max_new_tokens)
        if need > cfg.max_length:
            raise ValueError(f"generation needs positions up to {need - 1} but model.max_length={cfg.max_length}; "
                             "shorten the prompts or lower max_new_tokens")


@nnx.jit
def mlm_logits(model, tokens):
    """The masked-language-model logits [B, T, V] of an encoder for token ids [B, T]."""
    return model(tokens)["mlm_logits"]

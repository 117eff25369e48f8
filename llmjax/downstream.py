"""The downstream yardstick of `llmjax compare`: one text-to-text task on which encoder, decoder and
encoder-decoder models meet. The task is docstring -> name (llmjax.data.tasks.docstring_to_name_rows): the
first paragraph of a stdlib function's or class's docstring, and the model writes the name. Exact match of
the whole name is the score.

Each family reads and writes the pair in its own format (`input` = the docstring's tokens, `mode` = a
mixture's mode token or nothing, `name` = the name's tokens, at most target_length - 1):

  decoder          [bos] mode input [sep] | name [eos]        loss on name [eos]; the part before | is a
                                                               bidirectional prefix for cells that trained
                                                               with one (prefix LM, span corruption, UL2)
  encoder_decoder  encoder: mode input [eos]; decoder: name [eos]
  encoder          [cls] input [sep] [mask] x target_length [sep]
                                                               the slots hold name [eos] [eos] ...; loss on
                                                               name and the first [eos]

Decoder and encoder-decoder write greedily, a token at a time (a full forward pass per token over a batch of
fixed width: short targets, and the same code path as training, prefix mask included); the encoder fills its
slots in one pass, which is how a masked LM can write at all (BERT-style non-autoregressive filling). A
prediction matches when its tokens up to its first [eos] are the name's.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from flax import nnx

from llmjax.objectives import decoder_example, encoder_decoder_example

SIDES = ("inputs", "encoder_inputs", "decoder_inputs")  # the token rows of a batch, each with its segment ids


@dataclasses.dataclass(frozen=True)
class Format:
    """How one cell reads the task."""

    family: str
    input_length: int  # docstring tokens kept (the first ones)
    target_length: int  # name tokens + [eos]
    mode: int | None = None  # a mixture's mode token, leading the inputs
    prefix_lm: bool = False  # decoder: the inputs are a bidirectional prefix


def encode(rows: list[dict], tokenizer, fmt: Format) -> list[tuple[np.ndarray, np.ndarray]]:
    """(input ids, name ids) of every row whose name fits target_length - 1 tokens; inputs truncated."""
    out = []
    names = tokenizer.encode_batch([r["target"] for r in rows])
    inputs = tokenizer.encode_batch([r["input"] for r in rows])
    for x, y in zip(inputs, names):
        if 0 < len(y) < fmt.target_length:
            out.append((np.asarray(x[:fmt.input_length], np.int32), np.asarray(y, np.int32)))
    return out


def _lead(fmt: Format) -> np.ndarray:
    return np.array([] if fmt.mode is None else [fmt.mode], np.int32)


def _width(fmt: Format) -> dict:
    lead = 0 if fmt.mode is None else 1
    if fmt.family == "decoder":
        return {"inputs": 1 + lead + fmt.input_length + 1 + fmt.target_length}
    if fmt.family == "encoder_decoder":
        return {"encoder_inputs": lead + fmt.input_length + 1, "decoder_inputs": fmt.target_length}
    return {"inputs": fmt.input_length + fmt.target_length + 3}


def _example(x: np.ndarray, y: np.ndarray, ids, fmt: Format) -> dict:
    eos = np.array([ids.eos], np.int32)
    if fmt.family == "decoder":
        prefix = np.concatenate([_lead(fmt), x, [ids.sep]]).astype(np.int32)
        return decoder_example(prefix, np.concatenate([y, eos]), ids.bos, with_prefix_mask=fmt.prefix_lm)
    if fmt.family == "encoder_decoder":
        return encoder_decoder_example(np.concatenate([_lead(fmt), x, eos]), np.concatenate([y, eos]), start=ids.pad)
    slots = np.full(fmt.target_length, ids.eos, np.int32)
    slots[:len(y)] = y
    head = np.concatenate([[ids.cls], x, [ids.sep]]).astype(np.int32)
    weights = np.zeros(len(head) + fmt.target_length + 1, np.float32)
    weights[len(head):len(head) + len(y) + 1] = 1.0
    return {"inputs": np.concatenate([head, np.full(fmt.target_length, ids.mask), [ids.sep]]).astype(np.int32),
            "targets": np.concatenate([head, slots, [ids.sep]]).astype(np.int32), "weights": weights}


def pad_rows(rows: list[dict], widths: dict[str, int] | None = None) -> dict:
    """Stack examples of varying length (the dicts of decoder_example, encoder_decoder_example or an MLM
    example) into a batch: every key padded with 0 to the width of its side ("inputs", "encoder_inputs" or
    "decoder_inputs": `widths[side]`, else the side's longest row), plus each side's segment ids (1 on real
    tokens, 0 on padding) and positions; a prefix_mask is bool."""
    lengths = {side: np.array([len(r[side]) for r in rows]) for side in SIDES if side in rows[0]}
    widths = {side: int(n.max()) for side, n in lengths.items()} if widths is None else widths
    out = {}
    for key in rows[0]:
        side = "encoder_inputs" if key.startswith("encoder") else "decoder_inputs" if key.startswith("decoder") \
            else "inputs"
        arr = np.zeros((len(rows), widths[side]), np.asarray(rows[0][key]).dtype)
        for i, r in enumerate(rows):
            arr[i, :len(r[key])] = r[key]
        out[key] = arr
    for side, n in lengths.items():
        width, prefix = widths[side], side.removesuffix("inputs")
        out[prefix + "segment_ids"] = (np.arange(width)[None] < n[:, None]).astype(np.int32)
        out[prefix + "positions"] = np.broadcast_to(np.arange(width, dtype=np.int32), (len(rows), width)).copy()
    if "prefix_mask" in out:
        out["prefix_mask"] = out["prefix_mask"].astype(bool)
    return out


def batch(pairs: list[tuple[np.ndarray, np.ndarray]], ids, fmt: Format) -> dict:
    """A training batch of fixed shape (the widths of `fmt`), in the keys of the family's pretraining batches;
    padding has segment id 0 and weight 0."""
    return pad_rows([_example(x, y, ids, fmt) for x, y in pairs], _width(fmt))


@nnx.jit
def _argmax(model, b):
    """The most likely token at every position of a batch."""
    family = model.cfg.family
    if family == "decoder":
        logits = model(b["inputs"], b["segment_ids"], b["positions"], prefix_mask=b.get("prefix_mask"))
    elif family == "encoder_decoder":
        logits = model(b["encoder_inputs"], b["decoder_inputs"], b["encoder_segment_ids"], b["decoder_segment_ids"],
                       b["encoder_positions"], b["decoder_positions"])
    else:
        logits = model(b["inputs"], b["segment_ids"], b["positions"], jnp.zeros_like(b["inputs"]))["mlm_logits"]
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def predict(model, pairs: list[tuple[np.ndarray, np.ndarray]], ids, fmt: Format) -> list[np.ndarray]:
    """The model's name for every input (its tokens before the first [eos]), written greedily; the names in
    `pairs` are not looked at (only their batch layout is built from them, then overwritten)."""
    blank = [(x, np.zeros(0, np.int32)) for x, _ in pairs]
    b = batch(blank, ids, fmt)
    rows = np.arange(len(pairs))
    T = fmt.target_length
    if fmt.family == "encoder":
        start = np.array([len(x) + 2 for x, _ in pairs])  # [cls] x [sep], then the slots
        out = np.asarray(_argmax(model, {k: jnp.asarray(v) for k, v in b.items()}))
        written = np.stack([out[i, start[i]:start[i] + T] for i in rows])
    else:
        written = np.zeros((len(pairs), T), np.int32)
        if fmt.family == "decoder":  # position p predicts token p of prefix ++ name; its input is token p - 1
            first = np.array([len(x) + 1 + (fmt.mode is not None) for x, _ in pairs])  # len(prefix)
            key, seg = "inputs", "segment_ids"
        else:
            first = np.zeros(len(pairs), int)
            key, seg = "decoder_inputs", "decoder_segment_ids"
        for t in range(T):  # the real tokens so far: the prefix and t written ones
            b[seg] = (np.arange(b[seg].shape[1])[None] <= (first + t)[:, None]).astype(np.int32)
            out = np.asarray(_argmax(model, {k: jnp.asarray(v) for k, v in b.items()}))
            written[:, t] = out[rows, first + t]
            if t + 1 < T:
                b[key][rows, first + t + 1] = written[:, t]
    names = []
    for w in written:
        end = np.flatnonzero(w == ids.eos)
        names.append(w[:end[0]] if len(end) else w)
    return names


def evaluate(model, pairs, ids, fmt: Format, batch_size: int = 64) -> dict:
    """{"exact_match": the fraction of `pairs` whose name the model writes exactly (predict),
    "token_accuracy": the teacher-forced accuracy on the tokens of name [eos] (partial credit: the next token
    right given the true ones before it)}."""
    hits = correct = total = 0
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        n = len(chunk)
        if n < batch_size:  # one compiled shape: fill the last batch with copies, not counted
            chunk = chunk + [chunk[0]] * (batch_size - n)
        got = predict(model, chunk, ids, fmt)
        hits += sum(np.array_equal(g, y) for g, (_, y) in zip(got[:n], chunk[:n]))
        b = batch(chunk, ids, fmt)
        best = np.asarray(_argmax(model, {k: jnp.asarray(v) for k, v in b.items()}))[:n]
        targets, weights = ((b["decoder_targets"], b["decoder_weights"]) if fmt.family == "encoder_decoder"
                            else (b["targets"], b["weights"]))
        scored = weights[:n] > 0
        correct += int(np.sum((best == targets[:n]) & scored))
        total += int(np.sum(scored))
    return {"exact_match": hits / len(pairs), "token_accuracy": correct / total}

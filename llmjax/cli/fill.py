"""`llmjax fill --workdir RUN --text "... [MASK] ..." [--top N]`: predict the [MASK] tokens of a text with a
trained encoder (BERT-style, masked-language-model head): the top-N tokens per mask and the best filling."""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.cli.generate import load
from llmjax.generate import mlm_logits

EXAMPLE = "llmjax fill --workdir runs/bert_tiny --text 'The [MASK] of the function.' --top 5"


def main(args: list[str]) -> int:
    p = argparse.ArgumentParser(prog="llmjax fill", description=__doc__.split("\n\n")[0],
                                epilog=f"example: {EXAMPLE}")
    p.add_argument("--workdir", required=True, help="training / fine-tuning workdir or export directory")
    p.add_argument("--text", required=True, help="text with one or more [MASK] tokens")
    p.add_argument("--top", type=int, default=5, help="predictions per mask")
    p.add_argument("--tokenizer", default=None, help="tokenizer .model (default: the run's own)")
    ns = p.parse_args(args)
    if ns.top < 1:
        raise SystemExit(f"llmjax fill: --top must be at least 1, got {ns.top}")
    if "[MASK]" not in ns.text:
        raise SystemExit(f"llmjax fill: --text has no [MASK] token: {ns.text!r}; write [MASK] where a token "
                         "should be predicted")
    model, cfg, tok, what = load(ns.workdir, ns.tokenizer, "fill")
    if model.cfg.family != "encoder":
        raise SystemExit(f"llmjax fill: --workdir {ns.workdir} holds a {model.cfg.family} model (model.family="
                         f"{model.cfg.family!r}); fill needs an encoder (BERT-style) model. Use `llmjax generate` "
                         "for decoders and encoder-decoders")
    ids = [tok.special_ids.cls] + tok.encode(ns.text, parse_special=True) + [tok.special_ids.sep]
    if model.cfg.position == "learned" and len(ids) > model.cfg.max_length:
        raise SystemExit(f"llmjax fill: --text is {len(ids)} tokens long but the model takes at most "
                         f"model.max_length={model.cfg.max_length}")
    masks = [i for i, t in enumerate(ids) if t == tok.special_ids.mask]
    logits = mlm_logits(model, jnp.asarray([ids], jnp.int32))[0]  # [T, V]
    probs = np.array(jax.nn.softmax(logits[jnp.asarray(masks)], axis=-1))  # [M, V]
    special = list(tok.special_ids.special)
    probs[:, special] = 0.0  # never propose [CLS], padding, sentinels...
    print(f"# {what}: encoder model, top {ns.top} per [MASK]")
    best_fill = ns.text
    for m, (pos, row) in enumerate(zip(masks, probs)):
        top = np.argsort(-row)[: ns.top]
        word = tok.decode([int(top[0])])
        best_fill = best_fill.replace("[MASK]", word.strip() or repr(word), 1)
        shown = ", ".join(f"{tok.decode([int(t)]).strip() or tok.id_to_piece(int(t))!r} {row[t]:.3f}" for t in top)
        print(f"[MASK {m + 1}] {shown}")
    print("best: " + best_fill)
    return 0

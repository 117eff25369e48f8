"""`llmjax generate --workdir RUN --prompt TEXT [--prompt TEXT ...]`: continue prompts with a trained decoder or
encoder-decoder (training workdir, fine-tuning workdir or export directory): greedy, sampling or beam search."""

from __future__ import annotations

import argparse

from llmjax import storage
from llmjax.generate import METHODS, generate
from llmjax.objectives import PREFIX_OBJECTIVES
from llmjax.runs import RunError, load_for_inference

EXAMPLE = "llmjax generate --workdir runs/gpt_tiny --prompt 'The ' --method sample --top-k 40"


def load(workdir, tokenizer, command: str):
    """load_for_inference, its errors as the command's one-line message."""
    storage.check_reachable(workdir, "--workdir")  # a gs:// URL that cannot be reached: one line, at once
    if tokenizer:
        storage.check_reachable(tokenizer, "--tokenizer")
    try:
        return load_for_inference(workdir, tokenizer)
    except RunError as e:
        raise SystemExit(f"llmjax {command}: {e}") from None


def main(args: list[str]) -> int:
    p = argparse.ArgumentParser(prog="llmjax generate", description=__doc__.split("\n\n")[0],
                                epilog=f"example: {EXAMPLE}")
    p.add_argument("--workdir", required=True, help="training / fine-tuning workdir or export directory")
    p.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--method", choices=METHODS, default="greedy")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--num-beams", type=int, default=4)
    p.add_argument("--length-penalty", type=float, default=0.6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default=None, help="tokenizer .model (default: the run's own)")
    ns = p.parse_args(args)
    model, cfg, tok, what = load(ns.workdir, ns.tokenizer, "generate")
    family = model.cfg.family
    if family == "encoder":
        raise SystemExit(f"llmjax generate: --workdir {ns.workdir} holds an encoder (BERT-style) model, which does "
                         f"not generate text; use `llmjax fill --workdir {ns.workdir} --text '... [MASK] ...'`")
    if any(not s.strip() for s in ns.prompt) and family == "encoder_decoder":
        raise SystemExit("llmjax generate: --prompt is empty; an encoder-decoder needs some input text")
    if family == "decoder":
        prompts = [[tok.special_ids.bos] + tok.encode(s, parse_special=True) for s in ns.prompt]
    else:  # the encoder input ends with eos, as in pretraining; '<extra_id_0>' etc. are sentinels
        prompts = [tok.encode(s, parse_special=True) + [tok.special_ids.eos] for s in ns.prompt]
    prefix_lm = family == "decoder" and cfg.get("objective") in PREFIX_OBJECTIVES
    try:
        out = generate(model, prompts, max_new_tokens=ns.max_new_tokens, method=ns.method,
                       temperature=ns.temperature, top_k=ns.top_k, top_p=ns.top_p, num_beams=ns.num_beams,
                       length_penalty=ns.length_penalty, seed=ns.seed, prefix_lm=prefix_lm)
    except ValueError as e:  # generate() names its argument (top_k=...): name the flag instead
        name = str(e).split("=")[0].split(":")[0].strip()
        flag = f"--{name.replace('_', '-')}: " if name.replace("_", "-") in {
            "max-new-tokens", "method", "temperature", "top-k", "top-p", "num-beams"} else ""
        raise SystemExit(f"llmjax generate: {flag}{e}") from None
    print(f"# {what}: {family} model, {ns.method} decoding, up to {ns.max_new_tokens} new tokens")
    for i, (prompt, new, done) in enumerate(zip(ns.prompt, out.tokens, out.finished)):
        if family == "decoder":  # decoded together, so the continuation keeps its leading space
            text = tok.decode(prompts[i][1:] + list(new))
        else:
            text = f"{prompt} => {tok.decode(new)}"
        print(f"[{i + 1}] {text}" + ("" if done else " ..."))
    return 0

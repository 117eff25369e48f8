"""Decoding speed of llmjax.generate against Hugging Face `generate` (benchmarks/hf_generate.py), side by side in
one run: the same random-weight model (imported into llmjax with `from_hf`), the same prompts, the two timed
alternately so that a load change on the machine hits both. JSON in benchmarks/results/<name>.json.

    python -m benchmarks.decoding [--models gpt2,llama] [--batches 1,8] [--methods greedy,sample] [--rounds 3]

Per cell (model, batch, method), medians over the rounds of:
- a whole call with 64 new tokens (16-token prompts): seconds, new tokens/s, ms per step (= seconds / 64);
- the marginal step: (seconds for 64 new tokens - seconds for 2) / 62, i.e. one decode step after the prompt,
  without the prefill and call overheads;
- the memory-bandwidth bound of a step: bytes read per step (every weight a step streams once: all but the
  looked-up rows of an input embedding that is not also the output projection and of a position table; plus the
  cached keys and values of the tokens so far, on average prompt + 32) / a bandwidth measured in this run with
  np.copyto of 1 GiB (the best of the measurements before and after the cells), and the marginal step's
  fraction of it (bound / marginal step; 1 = at the bound). Two conventions: `copy` counts the bytes copied per
  second (issue 24's), `traffic` the bytes moved (read + written, twice as many): a one-thread copy moves less
  than the decode step's reads on all cores, so the `copy` bound is no ceiling; the `traffic` one is the
  tighter.
Greedy cells check that llmjax's tokens equal HF's. Sampling is plain temperature-1 sampling on both sides
(top_k 0, top_p 1), so only the speed is compared. torch runs on --threads threads (default 2).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import numpy as np

from benchmarks import hf_generate as hfg

COPY_BYTES = 2**30


def copy_bandwidth(repeats: int = 5) -> float:
    """Bytes per second np.copyto moves between two 1 GiB arrays (the best of `repeats`)."""
    src = np.ones(COPY_BYTES // 4, np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return COPY_BYTES / best


def streamed_weight_bytes(model) -> int:
    """Bytes of the weights a decode step reads whole: all but the tables it only looks rows up in (the token
    embedding unless it is also the output projection, learned positions)."""
    lookup = [] if model.cfg.tie_embeddings else [model.embedder.tokens.embedding]
    if model.embedder.positions is not None:
        lookup.append(model.embedder.positions.embedding)
    return int(sum(x.nbytes for x in jax.tree.leaves(model)) - sum(t[...].nbytes for t in lookup))


def step_bytes(cfg, weight_bytes: int, batch: int, tokens: float) -> float:
    """Bytes a decode step must read: the streamed weights once and the cached K and V (float32) of `tokens`
    tokens."""
    return weight_bytes + 2 * cfg.num_layers * batch * tokens * cfg.kv_heads * cfg.head_size * 4


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="gpt2,llama")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--methods", default="greedy,sample")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="decoding")
    ap.add_argument("--save", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args(argv[1:])

    import torch  # after parsing the arguments (--help loads neither torch nor llmjax)

    from benchmarks.common import machine_info, table, write_result
    from llmjax.generate import generate
    from llmjax.interop.hf import from_hf

    torch.set_num_threads(args.threads)
    n, short = hfg.NEW_TOKENS, 2
    bandwidths = [copy_bandwidth()]

    def run_llmjax(model, prompts, new, method):
        t = time.perf_counter()
        out = generate(model, prompts, max_new_tokens=new, method=method, eos_id=-1, **(
            hfg.SAMPLING if method == "sample" else {}))
        return out.sequences, time.perf_counter() - t

    cells, rows = [], []
    for name in args.models.split(","):
        hf_model = hfg.make_model(name)
        cfg, model = from_hf(hf_model)
        wbytes = streamed_weight_bytes(model)
        for batch in map(int, args.batches.split(",")):
            prompts = hfg.random_prompts(cfg.vocab_size, batch)
            for method in args.methods.split(","):
                for new in (n, short):  # compile llmjax, warm both up
                    run_llmjax(model, prompts, new, method)
                    hfg.generate(hf_model, prompts, max_new_tokens=new, method=method)
                times = {k: [] for k in ("llmjax", "hf", "llmjax_short", "hf_short")}
                equal = []
                for r in range(args.rounds):  # alternating: a load change hits both sides
                    ours, t = run_llmjax(model, prompts, n, method)
                    times["llmjax"].append(t)
                    theirs, t = hfg.generate(hf_model, prompts, method=method, seed=r)
                    times["hf"].append(t)
                    times["llmjax_short"].append(run_llmjax(model, prompts, short, method)[1])
                    times["hf_short"].append(hfg.generate(hf_model, prompts, max_new_tokens=short, method=method)[1])
                    if method == "greedy":
                        equal.append(float(np.mean(ours == theirs)))
                med = {k: statistics.median(v) for k, v in times.items()}
                step = {s: (med[s] - med[f"{s}_short"]) / (n - short) for s in ("llmjax", "hf")}
                cells.append(dict(
                    model=name, batch=batch, method=method, weight_bytes=wbytes,
                    step_bytes=step_bytes(cfg, wbytes, batch, hfg.PROMPT_LEN + n / 2), times_s=times,
                    llmjax_s=med["llmjax"], hf_s=med["hf"], speedup_vs_hf=med["hf"] / med["llmjax"],
                    llmjax_tokens_per_s=batch * n / med["llmjax"], hf_tokens_per_s=batch * n / med["hf"],
                    llmjax_ms_per_step=med["llmjax"] / n * 1e3, hf_ms_per_step=med["hf"] / n * 1e3,
                    llmjax_marginal_step_ms=step["llmjax"] * 1e3, hf_marginal_step_ms=step["hf"] * 1e3,
                    tokens_equal_hf=min(equal) if equal else None))
                print(f"{name} batch {batch} {method}: llmjax {med['llmjax']:.3f} s, HF {med['hf']:.3f} s",
                      file=sys.stderr, flush=True)
    bandwidths.append(copy_bandwidth())
    bw = max(bandwidths)
    for c in cells:
        for conv, b in (("copy", bw), ("traffic", 2 * bw)):
            c[f"bound_{conv}_ms"] = c["step_bytes"] / b * 1e3
            c[f"fraction_of_bound_{conv}"] = c[f"bound_{conv}_ms"] / c["llmjax_marginal_step_ms"]
            c[f"hf_fraction_of_bound_{conv}"] = c[f"bound_{conv}_ms"] / c["hf_marginal_step_ms"]
        rows.append((f"{c['model']} b{c['batch']} {c['method']}",
                     f"llmjax {c['llmjax_tokens_per_s']:6.1f} tok/s {c['llmjax_marginal_step_ms']:5.1f} ms/step | "
                     f"HF {c['hf_tokens_per_s']:6.1f} tok/s {c['hf_marginal_step_ms']:5.1f} ms/step | "
                     f"x{c['speedup_vs_hf']:.2f} | bound {c['bound_traffic_ms']:4.1f} ms "
                     f"({c['fraction_of_bound_traffic']:.0%}; copy {c['bound_copy_ms']:4.1f} ms)"
                     + ("" if c["tokens_equal_hf"] is None else f" | = HF {c['tokens_equal_hf']:.0%}")))
    rows.append(("bandwidth", f"{bw / 1e9:.1f} GB/s copied, {2 * bw / 1e9:.1f} GB/s traffic (np.copyto 1 GiB; "
                              f"{', '.join(f'{b / 1e9:.1f}' for b in bandwidths)})"))
    print(table(rows))
    result = dict(name=args.name, command="python -m benchmarks.decoding " + " ".join(argv[1:]),
                  prompt_len=hfg.PROMPT_LEN, new_tokens=n, torch_threads=args.threads, sampling=hfg.SAMPLING,
                  copy_bandwidth_Bps=bw, copy_bandwidths_Bps=bandwidths, cells=cells, machine=machine_info(),
                  torch=torch.__version__)
    if args.save:
        print(f"wrote {write_result(args.name, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

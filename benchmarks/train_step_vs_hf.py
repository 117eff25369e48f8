"""Each family's training step against its Hugging Face PyTorch counterpart on this machine, alternating the
two in one run. JSON in benchmarks/results/<name>.json (default train_step_vs_hf).

    python -m benchmarks.train_step_vs_hf [--families bert_tiny,t5_tiny,gpt_tiny] [--rounds 12] [--warmup 2]
    python -m benchmarks.train_step_vs_hf --families bench_gpt --name bench_gpt_vs_hf

bench_gpt (23M parameters, 8 x 256, exact GELU) is the shape of the nanoGPT comparison in docs/performance.md;
its peer here is HF's GPT2LMHeadModel, which computes what nanoGPT's model.py computes.

llmjax: the real sharded train step of configs/<family>.py as benchmarks/throughput.py builds it
(llmjax.compile.build_train_step, compiled once, state donated, dropout as in the config) on a synthetic batch of
the config's shapes. Hugging Face: the model of the same architecture and size, built from llmjax's own config
converters (llmjax.interop.<bert|t5|gpt2>.hf_config_from) and started from llmjax's initial weights (params_to_hf),
so both sides take the same first step and their losses can be compared; float32, AdamW with the config's lr
schedule, betas, eps and weight decay (matrices only, as llmjax.state.decay_mask), gradient clipping when the config
clips, in its own process (benchmarks/hf_train_step.py: no llmjax or JAX import, glibc's default malloc,
torch.set_num_threads(--torch_threads)), driven over a pipe and timing its own step.

Both sides train on the same token ids with the same loss positions:
- bert_tiny, MLM vs BertForMaskedLM: [CLS] 126 tokens [SEP] rows; 15% of the 126 (19 per row, as
  llmjax.objectives.mlm.num_to_predict) are the loss positions, 80% of them replaced by [MASK];
- t5_tiny, span corruption vs T5ForConditionalGeneration: encoder rows of seq_length, decoder rows of the
  span-corruption target length, every decoder position a loss token;
- gpt_tiny, causal LM vs GPT2LMHeadModel: HF shifts the labels inside the model, so the last position of each
  llmjax row gets weight 0 too (seq_length - 1 loss tokens per row on both sides).

Per round one HF step, then one llmjax step; --warmup rounds untimed. tokens/s counts the rows' input tokens
(batch x seq_length, the encoder's for T5); "speed" is HF median step time / llmjax median step time.
"""

from __future__ import annotations

import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import hf_train_step  # the peer's own setup helpers (it imports neither torch nor JAX at the top)

ROOT = Path(__file__).resolve().parent.parent
PEER = Path(hf_train_step.__file__).resolve()
# family config -> (llmjax.interop module, HF model class): the HF classes a user trains each objective with.
HF_CLASS = {"bert_tiny": ("bert", "BertForMaskedLM"), "t5_tiny": ("t5", "T5ForConditionalGeneration"),
            "gpt_tiny": ("gpt2", "GPT2LMHeadModel"), "bench_gpt": ("gpt2", "GPT2LMHeadModel")}
# Environment variables that would change the peer's malloc or threads away from a plain PyTorch run.
_PEER_ENV_DROP = ("LD_PRELOAD", "XLA_FLAGS", "PYTHONPATH", "MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_",
                  "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")


def _define(fv):
    from absl import flags  # as benchmarks/throughput.py: loaded only when the flags are defined

    flags.DEFINE_list("families", ["bert_tiny", "t5_tiny", "gpt_tiny"], "configs/<family>.py to compare "
                      f"(any of {', '.join(HF_CLASS)})", flag_values=fv)
    flags.DEFINE_integer("rounds", 12, "timed rounds (one HF step, then one llmjax step)", flag_values=fv)
    flags.DEFINE_integer("warmup", 2, "untimed rounds first (after compilation)", flag_values=fv)
    flags.DEFINE_integer("torch_threads", 0, "torch.set_num_threads of the HF peer; 0 = os.cpu_count()",
                         flag_values=fv)
    flags.DEFINE_string("name", "train_step_vs_hf", "result name", flag_values=fv)
    flags.DEFINE_bool("save", True, "write benchmarks/results/<name>.json (--nosave for smoke runs)", flag_values=fv)


def family_batch(family: str, cfg, spec: dict, vocab_size: int) -> tuple[dict, dict]:
    """(llmjax batch, HF forward kwargs) of the same tokens and loss positions (see the module doc)."""
    import numpy as np  # as run_family's imports: nothing of JAX's before main() has prepared the process

    from llmjax.compile import random_batch
    from llmjax.data.vocab import CLS_ID, MASK_ID, SEP_ID
    from llmjax.objectives.mlm import MLMConfig, num_to_predict

    rng = np.random.default_rng(1)
    b = random_batch(spec, vocab_size)
    ones = lambda x: np.ones_like(x, dtype=np.int64)  # noqa: E731
    if cfg.objective == "mlm":
        rows, length = b["inputs"].shape
        tokens = b["inputs"].copy()
        tokens[:, 0], tokens[:, -1] = CLS_ID, SEP_ID
        n = num_to_predict(length - 2, MLMConfig(max_length=length))
        pos = np.stack([np.sort(rng.choice(np.arange(1, length - 1), n, replace=False)) for _ in range(rows)])
        selected = np.zeros_like(tokens, dtype=bool)
        np.put_along_axis(selected, pos, True, axis=1)
        masked = selected & (rng.random(tokens.shape) < 0.8)
        b["inputs"] = np.where(masked, MASK_ID, tokens).astype(b["inputs"].dtype)
        b["targets"] = tokens.astype(b["targets"].dtype)
        b["weights"] = selected.astype(b["weights"].dtype)
        b["token_type_ids"] = np.zeros_like(b["token_type_ids"])
        hf = {"input_ids": b["inputs"], "token_type_ids": b["token_type_ids"], "attention_mask": ones(tokens),
              "labels": np.where(selected, tokens, -100)}
    elif "encoder_inputs" in b:
        hf = {"input_ids": b["encoder_inputs"], "attention_mask": ones(b["encoder_inputs"]),
              "decoder_input_ids": b["decoder_inputs"],
              "labels": np.where(b["decoder_weights"] > 0, b["decoder_targets"], -100)}
    else:
        b["targets"][:, :-1] = b["inputs"][:, 1:]
        b["weights"][:, -1] = 0  # HF's shifted labels have no target for the last position
        hf = {"input_ids": b["inputs"], "attention_mask": ones(b["inputs"]), "labels": b["inputs"]}
    return b, {k: np.asarray(v, np.int64) for k, v in hf.items()}


class Peer:
    """benchmarks/hf_train_step.py in its own process, one JSON line each way."""

    def __init__(self, setup: dict):
        env = {k: v for k, v in os.environ.items() if k not in _PEER_ENV_DROP}
        env.setdefault("TRANSFORMERS_VERBOSITY", "error")  # its config notices would break up the table
        self.proc = subprocess.Popen([sys.executable, str(PEER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env, cwd=tempfile.gettempdir())
        self.info = self._ask(json.dumps(setup))
        if not self.info.get("ready"):
            raise RuntimeError(f"HF peer failed to start: {self.info}")

    def _ask(self, line: str) -> dict:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline()
        if not reply:
            raise RuntimeError(f"HF peer exited (rc {self.proc.wait()}); its stderr is above")
        return json.loads(reply)

    def step(self) -> tuple[float, float]:
        r = self._ask("step")
        return r["step_s"], r["loss"]

    def close(self):
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
        except BrokenPipeError:  # it has exited already; its error is what the caller reports
            pass
        self.proc.wait(timeout=60)


def run_family(family: str, fv, tmp: Path) -> dict:
    import jax  # here, not at the top: main() sets the XLA flags and malloc before JAX starts
    import numpy as np

    from llmjax.compile import build_train_step
    from llmjax.config import load_config
    from llmjax.kernels.dispatch import resolve_kernel
    from llmjax.step import global_batch

    cfg = load_config(ROOT / "configs" / f"{family}.py")
    interop_name, model_class = HF_CLASS[family]
    interop = importlib.import_module(f"llmjax.interop.{interop_name}")
    load_before = os.getloadavg()[0]

    parts = build_train_step(cfg)
    mc = parts.model_cfg
    local, hf_batch = family_batch(family, cfg, parts.batch_spec, mc.vocab_size)
    state = parts.init_state(int(cfg.train.seed))
    np.savez(tmp / f"{family}_weights.npz", **interop.params_to_hf(state.params, mc))  # before the donating step
    top = {}
    for path, x in jax.tree_util.tree_leaves_with_path(state.params):
        key = str(getattr(path[0], "key", path[0]))
        top[key] = top.get(key, 0) + int(np.prod(x.shape))
    ours_params = sum(top.values())
    batch = global_batch(local, parts.mesh)
    t = time.perf_counter()
    compiled = parts.step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t

    hf_config = interop.hf_config_from(mc)
    np.savez(tmp / f"{family}.npz", **hf_batch)
    o = cfg.optim
    setup = {"model_class": model_class, "config_class": type(hf_config).__name__, "hf_config": hf_config.to_dict(),
             "untie_lm_head": interop_name == "t5" and not mc.tie_embeddings,
             "shifted_labels": interop_name == "gpt2", "batch": str(tmp / f"{family}.npz"),
             "weights": str(tmp / f"{family}_weights.npz"),
             "threads": fv.torch_threads or os.cpu_count(), "seed": int(cfg.train.seed),
             "optim": hf_train_step.optim_setup(o, cfg.train.steps)}
    if o.optimizer != "adamw" or o.schedule not in ("cosine", "linear", "constant"):
        raise SystemExit(f"{family}: optim {o.optimizer}/{o.schedule} has no HF counterpart here (AdamW; cosine, "
                         "linear or constant schedule)")
    peer = Peer(setup)
    try:
        ours_t, theirs_t, losses = [], [], []
        for r in range(fv.warmup + fv.rounds):
            hf_s, hf_loss = peer.step()
            t = time.perf_counter()
            state, m = compiled(state, batch)
            jax.block_until_ready((state, m))
            dt = time.perf_counter() - t
            losses.append((float(m["loss"]), hf_loss))
            if r >= fv.warmup:
                ours_t.append(dt)
                theirs_t.append(hf_s)
    finally:
        peer.close()
    info = peer.info
    weights = local.get("weights", local.get("decoder_weights"))
    rows_key = "encoder_inputs" if "encoder_inputs" in local else "inputs"
    tokens = int(np.prod(local[rows_key].shape))
    ours_s, theirs_s = statistics.median(ours_t), statistics.median(theirs_t)
    notes = []
    if info["parameters"] != ours_params:
        diff = ours_params - info["parameters"]
        notes.append(f"parameter counts differ: llmjax {ours_params:,} vs HF {model_class} {info['parameters']:,} "
                     f"(llmjax {diff:+,})" + (f"; llmjax's pooler + NSP head hold "
                                               f"{top.get('pooler', 0) + top.get('nsp', 0):,}, which "
                                               "BertForMaskedLM lacks and the MLM loss does not use"
                                               if family == "bert_tiny" else ""))
    if info["unloaded"]:
        notes.append(f"HF kept its own initial values for {info['unloaded']}")
    if abs(losses[0][0] - losses[0][1]) > 1e-3 * abs(losses[0][1]):
        notes.append(f"first losses differ: llmjax {losses[0][0]:.6f} vs HF {losses[0][1]:.6f} (same weights, same "
                     "batch: the two sides do not compute the same step)")
    if int(weights.sum()) != info["loss_tokens"]:
        notes.append(f"loss tokens differ: llmjax {int(weights.sum())} vs HF {info['loss_tokens']}")
    return {
        "family": family,
        "config": f"configs/{family}.py",
        "objective": cfg.objective,
        "hf_model": model_class,
        "hf_attn_implementation": info["attn_implementation"],
        "llmjax_attention_kernel": resolve_kernel(mc.attention_kernel),
        "batch": {k: list(v.shape) for k, v in local.items()},
        "hf_batch": {k: list(v.shape) for k, v in hf_batch.items()},
        "tokens_per_step": tokens,
        "loss_tokens_per_step": int(weights.sum()),
        "hf_loss_tokens_per_step": info["loss_tokens"],
        "parameters": {"llmjax": ours_params, "hf": info["parameters"], "llmjax_by_top_level": top},
        "dropout": {"dropout_rate": mc.dropout_rate, "attention_dropout_rate": mc.attention_dropout_rate},
        "optim": setup["optim"],
        "hf_peer": {k: info[k] for k in ("torch", "transformers", "torch_threads", "jax_imported", "llmjax_imported")},
        "llmjax_step_times_s": ours_t,
        "hf_step_times_s": theirs_t,
        "llmjax_median_step_s": ours_s,
        "hf_median_step_s": theirs_s,
        "llmjax_tokens_per_s": tokens / ours_s,
        "hf_tokens_per_s": tokens / theirs_s,
        "speed_llmjax_over_hf": theirs_s / ours_s,
        "llmjax_compile_s": compile_s,
        "first_loss": {"llmjax": losses[0][0], "hf": losses[0][1]},
        "final_loss": {"llmjax": losses[-1][0], "hf": losses[-1][1]},
        "hf_weights_not_from_llmjax": info["unloaded"],
        "hf_weights_unused": info["unused"],
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "notes": notes,
    }


def main(argv: list[str]) -> int:
    from benchmarks.common import machine_info, parse_flags, table, write_result  # light: JAX only when called
    from llmjax import runtime

    runtime.prepare_process(many_steps=True)  # as `llmjax train` does, before JAX starts
    fv = parse_flags(argv, _define, __doc__)
    unknown = [f for f in fv.families if f not in HF_CLASS]
    if unknown:
        raise SystemExit(f"--families: no HF counterpart for {unknown}; choose from {', '.join(HF_CLASS)}")

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="llmjax-vs-hf-") as tmp:
        rows = [run_family(f, fv, Path(tmp)) for f in fv.families]
    result = {
        "name": fv.name,
        "command": "python -m benchmarks.train_step_vs_hf " + " ".join(argv[1:]),
        "rounds_timed": fv.rounds,
        "warmup_rounds": fv.warmup,
        "families": rows,
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "machine": machine_info(),
    }
    ms = lambda s: f"{s * 1e3:8.1f}"  # noqa: E731
    print(f"{'family':<10} {'llmjax ms':>10} {'HF ms':>10} {'llmjax tok/s':>13} {'HF tok/s':>10} {'speed':>7}  "
          f"{'first loss':>17}  {'last loss':>17}  parameters (llmjax / HF)")
    for r in rows:
        print(f"{r['family']:<10} {ms(r['llmjax_median_step_s']):>10} {ms(r['hf_median_step_s']):>10} "
              f"{r['llmjax_tokens_per_s']:>13,.0f} {r['hf_tokens_per_s']:>10,.0f} {r['speed_llmjax_over_hf']:>6.2f}x  "
              f"{r['first_loss']['llmjax']:8.4f}/{r['first_loss']['hf']:<8.4f}  "
              f"{r['final_loss']['llmjax']:8.4f}/{r['final_loss']['hf']:<8.4f}  "
              f"{r['parameters']['llmjax']:,} / {r['parameters']['hf']:,}")
    print(table([
        ("rounds", f"{fv.rounds} timed after {fv.warmup} warm-up (one HF step, then one llmjax step); medians"),
        ("speed", "HF median step time / llmjax median step time (> 1: llmjax is faster)"),
        ("losses", "llmjax / HF, of the first and the last step: both start from llmjax's initial weights"),
        ("load average 1 min", f"{load_before:.2f} before, {result['load_average_1min']['after']:.2f} after"),
    ]))
    for r in rows:
        for n in r["notes"]:
            print(f"note ({r['family']}): {n}")
    if fv.save:
        print(f"wrote {write_result(fv.name, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

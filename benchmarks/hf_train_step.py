"""The Hugging Face PyTorch peer of benchmarks/train_step_vs_hf.py: one training step of a transformers model
with AdamW, timed here, driven over a pipe. It imports neither llmjax nor JAX and leaves malloc alone, as a
user's PyTorch run would; the parent starts it with a clean environment.

Protocol (one JSON object per line): the parent writes the setup
    {"model_class", "config_class", "hf_config", "untie_lm_head", "shifted_labels", "batch", "weights", "optim",
     "threads", "seed"}
where "batch" names an .npz of the forward's keyword arguments ("labels" included, -100 = no loss) and
"weights" an .npz of the initial state dict (HF names), and the child answers {"ready": true, "parameters",
"unloaded", "unused", ...} (the model's weights the file lacks, the file's weights the model lacks); then
each "step" line is answered {"step_s", "loss"} with the step's own time (forward, backward, clipping,
optimizer and schedule step, zero_grad), so the pipe's latency is not counted; "quit" ends it.
"""

from __future__ import annotations

import json
import math
import sys
import time


def optim_setup(optim, total_steps: int) -> dict:
    """The setup's "optim": the fields of an llmjax `optim` config section (llmjax.state) that the peer
    reproduces, plus the run's total steps (the schedule's length)."""
    fields = ("learning_rate", "b1", "b2", "eps", "weight_decay", "clip_norm", "schedule", "warmup_steps",
              "min_lr_ratio", "decay_embeddings")
    return {k: optim[k] for k in fields} | {"total_steps": int(total_steps)}


def lr_lambda(optim: dict):
    """The llmjax schedule (llmjax.state.learning_rate_schedule) as a multiplier of the peak: linear warm-up
    from 0, then cosine to min_lr_ratio (or linear / constant)."""
    warm, total, alpha = int(optim["warmup_steps"]), int(optim["total_steps"]), float(optim["min_lr_ratio"])
    decay = max(total - warm, 1)

    def f(step):
        if step < warm:
            return step / warm
        t = min(step - warm, decay) / decay
        if optim["schedule"] == "cosine":
            return alpha + (1 - alpha) * 0.5 * (1 + math.cos(math.pi * t))
        if optim["schedule"] == "linear":
            return 1 + (alpha - 1) * t
        return 1.0

    return f


def build(setup: dict):
    import numpy as np  # after the setup line: nothing is loaded before the parent asks
    import torch
    import transformers

    torch.set_num_threads(int(setup["threads"]))
    torch.manual_seed(int(setup["seed"]))
    hf_config = getattr(transformers, setup["config_class"]).from_dict(setup["hf_config"])
    model = getattr(transformers, setup["model_class"])(hf_config).float()
    if setup["untie_lm_head"] and model.get_output_embeddings().weight is model.get_input_embeddings().weight:
        # As llmjax.interop.t5.new_hf_model: an untied T5 v1.1 has its own lm_head weight.
        model.lm_head.weight = torch.nn.Parameter(model.shared.weight.detach().clone())
        model.all_tied_weights_keys.pop("lm_head.weight", None)
    with np.load(setup["weights"]) as z:
        given = {k: torch.from_numpy(z[k]) for k in z.files}
    missing, unused = model.load_state_dict(given, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight") and model.get_output_embeddings().weight
            is model.get_input_embeddings().weight}
    model.train()
    o = setup["optim"]
    # Weight decay as llmjax.state.decay_mask: matrices only, not embeddings, norms or biases.
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay = [p for p in model.parameters() if p.ndim >= 2 and (o["decay_embeddings"] or id(p) not in embeddings)]
    ids = {id(p) for p in decay}
    rest = [p for p in model.parameters() if id(p) not in ids]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": float(o["weight_decay"])},
                             {"params": rest, "weight_decay": 0.0}],
                            lr=float(o["learning_rate"]), betas=(float(o["b1"]), float(o["b2"])), eps=float(o["eps"]))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(o))
    with np.load(setup["batch"]) as z:
        batch = {k: torch.from_numpy(z[k].astype(np.int64)) for k in z.files}
    info = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "unloaded": sorted(set(missing) - tied), "unused": sorted(unused),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        # A causal LM shifts its labels inside the model: the first label of each row is never a target.
        "loss_tokens": int((batch["labels"][:, 1 if setup["shifted_labels"] else 0:] != -100).sum()),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "jax_imported": "jax" in sys.modules, "llmjax_imported": "llmjax" in sys.modules,
    }
    clip = float(o["clip_norm"])

    def step():
        t = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t
        return dt, loss.item()

    return step, info


def main() -> int:
    out = sys.stdout
    sys.stdout = sys.stderr  # library prints must not reach the pipe
    step, info = build(json.loads(sys.stdin.readline()))
    out.write(json.dumps({"ready": True, **info}) + "\n")
    out.flush()
    for line in sys.stdin:
        if line.strip() != "step":
            break
        dt, loss = step()
        out.write(json.dumps({"step_s": dt, "loss": loss}) + "\n")
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`llmjax merge-lora --base RUN --adapters RUN --out DIR`: fold a LoRA fine-tuning run's adapters into the base
weights, W + (alpha / r) A B, and write an export directory (config.json + params/) that loads like any other."""

from __future__ import annotations

import argparse
import json

from flax import nnx

from llmjax import checkpoint as ckpt
from llmjax import storage
from llmjax.cli.flags import setup_logging
from llmjax.data.shards import TOKENIZER_FILE
from llmjax.runs import FINETUNE_INFO, RunError, load_finetuned, merge_lora_model, model_dict

EXAMPLE = "llmjax merge-lora --base runs/bert_tiny --adapters runs/dvc_lora --out runs/dvc_merged"


def main(args: list[str]) -> int:
    p = argparse.ArgumentParser(prog="llmjax merge-lora", description=__doc__.split("\n\n")[0],
                                epilog=f"example: {EXAMPLE}")
    p.add_argument("--base", required=True, help="the pretrained training workdir or export directory")
    p.add_argument("--adapters", required=True, help="the LoRA fine-tuning workdir (llmjax finetune --workdir)")
    p.add_argument("--out", required=True, help="export directory to write (config.json + params/)")
    ns = p.parse_args(args)
    setup_logging()
    for flag in ("base", "adapters", "out"):  # a gs:// URL that cannot be reached: one line, before any work
        storage.check_reachable(getattr(ns, flag), f"--{flag}")
    adapters = storage.path(ns.adapters)  # local paths or gs:// URLs, like every path flag
    if not (adapters / FINETUNE_INFO).is_file():
        raise SystemExit(f"llmjax merge-lora: --adapters {adapters} is not a fine-tuning workdir (no {FINETUNE_INFO})")
    if not storage.path(ns.base).exists():
        raise SystemExit(f"llmjax merge-lora: --base {ns.base} does not exist")
    cfg = json.loads((adapters / "config.json").read_text())
    if not cfg["model"].get("lora_rank"):
        raise SystemExit(f"llmjax merge-lora: --adapters {adapters} was fully fine-tuned (lora.rank=0): nothing "
                         f"to merge; export it with `llmjax export --workdir {adapters} --out DIR`")
    try:
        model, cfg = load_finetuned(adapters, base=ns.base)
    except (FileNotFoundError, RunError) as e:
        raise SystemExit(f"llmjax merge-lora: {e}") from None
    merged = merge_lora_model(model)
    out = storage.path(ns.out)
    merged_cfg = {**cfg, "model": model_dict(merged.cfg), "merged_from": {"base": str(ns.base),
                                                                            "adapters": str(adapters)}}
    # The export layout, written as `llmjax export` writes it (never a half-written directory that looks whole).
    ckpt.write_params(out, nnx.state(merged, nnx.Param).to_pure_dict(), merged_cfg,
                      copy_files={name: adapters / name for name in (TOKENIZER_FILE, FINETUNE_INFO)
                                  if (adapters / name).is_file()})
    print(f"merged the rank-{model.cfg.lora_rank} adapters of {adapters} (step {cfg.get('finetuned_step')}) into "
          f"{ns.base}: wrote {out}")
    return 0

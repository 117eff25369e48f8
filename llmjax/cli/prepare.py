"""`llmjax prepare --config FILE [--workdir DIR]`: train the tokenizer and tokenize the corpus into shards
(WORKDIR/data, or data.data_dir); a second run with the same inputs does nothing."""

from __future__ import annotations


from llmjax.cli.flags import parse_config_flags, setup_logging
from llmjax.config import check_workdir
from llmjax.data.prepare import prepare

EXAMPLE = "llmjax prepare --config configs/gpt_tiny.py --workdir runs/gpt_tiny"


def main(args: list[str]) -> int:
    fv = parse_config_flags(["llmjax prepare", *args], about=__doc__.split("\n\n")[0], example=EXAMPLE)
    setup_logging()
    cfg = fv.config
    if cfg.data.vocab_size != cfg.model.vocab_size:
        raise SystemExit(
            f"llmjax prepare: data.vocab_size={cfg.data.vocab_size} differs from model.vocab_size="
            f"{cfg.model.vocab_size}; set both to the same value")
    if fv.workdir:
        check_workdir(fv.workdir)  # a file or an unwritable directory is refused before anything is written
    manifest = prepare(cfg.data, fv.workdir)
    splits = manifest["splits"]
    print(f"prepared data in {manifest['dir']}: "
          + ", ".join(f"{k}: {v['documents']} documents, {v['tokens']} tokens" for k, v in splits.items()))
    return 0

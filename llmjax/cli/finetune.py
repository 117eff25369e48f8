"""`llmjax finetune --config FILE --init-from RUN --workdir DIR`: fine-tune a pretrained run (training workdir,
fine-tuning workdir or export directory) on a task: classification, tagging, text-to-text or causal LM,
fully or with LoRA adapters (--config.lora.rank=8)."""

from __future__ import annotations


from absl import flags

from llmjax import storage
from llmjax.cli.flags import parse_config_flags, setup_logging
from llmjax.config import check_workdir
from llmjax.finetune import finetune
from llmjax.models.config import ConfigError

EXAMPLE = "llmjax finetune --config configs/finetune/doc_vs_code.py --init-from runs/bert_tiny --workdir runs/dvc"


def _define(fv):
    flags.DEFINE_string("init_from", None, "pretrained training workdir, fine-tuning workdir or export directory",
                        flag_values=fv)


def main(args: list[str]) -> int:
    fv = parse_config_flags(["llmjax finetune", *args], define=_define, about=__doc__.split("\n\n")[0],
                            example=EXAMPLE)
    setup_logging()
    if not fv.init_from:
        raise SystemExit("llmjax finetune: --init-from is required (a training workdir or an export directory)")
    if not fv.workdir:
        raise SystemExit("llmjax finetune: --workdir is required (the fine-tuned run is written there)")
    check_workdir(fv.workdir)  # a file or an unwritable directory is refused before anything is written
    storage.check_reachable(fv.init_from, "--init-from")  # a gs:// URL that cannot be reached: one line
    try:
        finetune(fv.config, fv.init_from, fv.workdir)  # other user errors become one line in llmjax.cli.main
    except FileNotFoundError as e:
        raise ConfigError(f"--init-from: {e}") from e
    return 0

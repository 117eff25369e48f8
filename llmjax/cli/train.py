"""`llmjax train --config FILE --workdir DIR [--config.a.b=value ...]`: pretrain a model; the same command
resumes from the newest good checkpoint in WORKDIR/checkpoints after any interruption."""

from __future__ import annotations

import logging

import jax

from llmjax.cli.flags import parse_config_flags, setup_logging
from llmjax.config import check_workdir
from llmjax.launch.distributed import maybe_initialize_distributed
from llmjax.train import train_and_evaluate

EXAMPLE = "llmjax train --config configs/gpt_tiny.py --workdir runs/gpt_tiny --config.train.steps=100"


def main(args: list[str]) -> int:
    fv = parse_config_flags(["llmjax train", *args], about=__doc__.split("\n\n")[0], example=EXAMPLE)
    setup_logging()
    if not fv.workdir:
        raise SystemExit("llmjax train: --workdir DIR is required (config, metrics, plots and checkpoints go there)")
    check_workdir(fv.workdir)  # a file or an unwritable directory is refused before anything is written
    maybe_initialize_distributed()  # joins a multi-process run (launcher env vars or srun); else nothing
    logging.getLogger("llmjax").info("JAX %s devices: %s", jax.default_backend(), jax.devices())
    train_and_evaluate(fv.config, fv.workdir)  # user errors become one line in llmjax.cli.main
    return 0

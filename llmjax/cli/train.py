"""`llmjax train --config FILE --workdir DIR [--config.a.b=value ...]`: pretrain a model; the same command
resumes from the newest good checkpoint in WORKDIR/checkpoints after any interruption. `--init-from RUN` starts
a new run from the weights of another (a training workdir or an export; either layer layout), with a fresh
optimizer."""

from __future__ import annotations

import logging

import jax
from absl import flags

from llmjax import storage
from llmjax.cli.flags import parse_config_flags, setup_logging
from llmjax.config import check_workdir
from llmjax.launch.distributed import maybe_initialize_distributed
from llmjax.train import train_and_evaluate

EXAMPLE = "llmjax train --config configs/gpt_tiny.py --workdir runs/gpt_tiny --config.train.steps=100"


def _define(fv):
    flags.DEFINE_string("init_from", None, "start a new run from the parameters of this training workdir or export "
                        "directory (ignored when WORKDIR already has checkpoints: the run resumes)", flag_values=fv)


def main(args: list[str]) -> int:
    fv = parse_config_flags(["llmjax train", *args], define=_define, about=__doc__.split("\n\n")[0],
                            example=EXAMPLE)
    setup_logging()
    if not fv.workdir:
        raise SystemExit("llmjax train: --workdir DIR is required (config, metrics, plots and checkpoints go there)")
    check_workdir(fv.workdir)  # a file or an unwritable directory is refused before anything is written
    if fv.init_from:
        storage.check_reachable(fv.init_from, "--init-from")  # a gs:// URL that cannot be reached: one line
    maybe_initialize_distributed()  # joins a multi-process run (launcher env vars or srun); else nothing
    logging.getLogger("llmjax").info("JAX %s devices: %s", jax.default_backend(), jax.devices())
    train_and_evaluate(fv.config, fv.workdir, init_from=fv.init_from)  # user errors: one line in llmjax.cli.main
    return 0

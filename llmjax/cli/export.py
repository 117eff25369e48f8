"""`llmjax export --workdir DIR --out DIR2`: the parameters of the newest good checkpoint in
WORKDIR/checkpoints -> OUT/params (Orbax) + OUT/config.json (+ the run's tokenizer)."""

from __future__ import annotations

import argparse

from llmjax import storage
from llmjax.cli.flags import setup_logging
from llmjax.checkpoint import export

EXAMPLE = "llmjax export --workdir runs/gpt_tiny --out runs/gpt_tiny_export"


def main(args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="llmjax export", description=__doc__.split("\n\n")[0],
                                     epilog=f"example: {EXAMPLE}")
    parser.add_argument("--workdir", required=True, help="training workdir (its checkpoints/)")
    parser.add_argument("--out", required=True, help="export directory to write")
    ns = parser.parse_args(args)
    setup_logging()
    for flag in ("workdir", "out"):  # a gs:// URL that cannot be reached: one line, before any work
        storage.check_reachable(getattr(ns, flag), f"--{flag}")
    try:
        step = export(ns.workdir, ns.out)
    except (FileNotFoundError, FileExistsError) as e:
        raise SystemExit(f"llmjax export: {e}") from None
    print(f"exported the parameters of step {step} to {ns.out}")
    return 0

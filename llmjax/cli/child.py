"""`python -m llmjax.cli.child <llmjax command> [args]`: what every launched process runs (llmjax.launch).

It joins the multi-process runtime the launcher described in the environment (`maybe_initialize_distributed`),
then runs the ordinary command line, e.g. `train --config ... --workdir ...`.
"""

from __future__ import annotations

import sys

from llmjax import cli, runtime
from llmjax.launch.distributed import maybe_initialize_distributed


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in cli.COMMANDS:  # process settings first: joining the runtime imports JAX
        runtime.prepare_process(many_steps=cli.COMMANDS[args[0]][2])
    maybe_initialize_distributed()
    return cli.main(["llmjax", *args]) or 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m llmjax.launch.child <llmjax command> [args]`: what every launched process runs.

It joins the multi-process runtime the launcher described in the environment
(`maybe_initialize_distributed`), then runs the ordinary command line, e.g. `train --config ... --workdir ...`.
"""

from __future__ import annotations

import sys

from llmjax.launch.distributed import maybe_initialize_distributed


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    maybe_initialize_distributed()
    from llmjax import cli

    return cli.main(["llmjax", *args]) or 0


if __name__ == "__main__":
    sys.exit(main())

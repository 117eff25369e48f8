"""The one-line message of a user error from the command line, run in-process: flag errors exit through SystemExit
(argparse / absl style), errors the library raises are printed by llmjax.cli.main, which returns 2."""

from __future__ import annotations

from llmjax import cli


def user_error(argv: list[str], capsys) -> str:
    """Run `llmjax ARGV...` (argv[0] = "llmjax"); assert it failed as a user error; return its message."""
    capsys.readouterr()
    try:
        code = cli.main(argv)
    except SystemExit as e:
        assert e.code not in (0, None), f"{argv} succeeded"
        return str(e.code)
    # In-process, stderr also holds the run's log lines (a subprocess test checks that the message is the only
    # line without --debug): the message is the line the command line printed.
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith(f"llmjax {argv[1]}: ")]
    assert code == 2 and lines, (code, lines)
    return lines[-1]

"""`llmjax <command> [flags]`: the command line. Each command is one module of this package with a `main(args)`
returning the exit code; this table is the one list of them. Library modules never import this package.

Before a command module (and with it JAX) is imported, the process settings of llmjax.runtime are applied.
"""

from __future__ import annotations

import difflib
import errno
import importlib
import os
import sys

from llmjax import runtime

# name -> (module in llmjax.cli, one line for `llmjax --help`, runs many steps (keep_freed_host_memory))
COMMANDS = {
    "prepare": ("prepare", "train the tokenizer and tokenize the corpus into shards", False),
    "train": ("train", "pretrain a model (resumes from WORKDIR/checkpoints)", True),
    "export": ("export", "parameters of a run's newest good checkpoint + config.json", False),
    "finetune": ("finetune", "fine-tune a pretrained run on a task, fully or with LoRA", True),
    "merge-lora": ("merge_lora", "fold a LoRA fine-tuning run's adapters into the base weights", False),
    "generate": ("generate", "continue prompts with a decoder or encoder-decoder run", False),
    "fill": ("fill", "predict the [MASK] tokens of a text with an encoder run", False),
    "compare": ("compare", "compare objectives and families at a fixed FLOP budget", True),
    "compile": ("compile", "compile the sharded train step for a TPU topology, on this CPU", False),
    "launch": ("launch", "run a command as a multi-process job: local, SLURM, Kubernetes, TPU VM", False),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: llmjax <command> [flags]   (llmjax <command> --help lists a command's flags)", "", "commands:"]
    lines += [f"  {name:<{width}}  {about}" for name, (_, about, _) in COMMANDS.items()]
    lines += ["", "example: llmjax train --config configs/gpt_tiny.py --workdir runs/gpt_tiny",
              "", "A user error (bad config field, missing file, unwritable workdir, bad data) prints one line and",
              "exits non-zero; `llmjax <command> --debug ...` or LLMJAX_DEBUG=1 shows its traceback instead."]
    return "\n".join(lines)


# Exceptions whose message is written for the user (it names the field, flag or file and the fix):
# (module, class). Looked up in sys.modules only after the command ran, so nothing is imported before
# llmjax.runtime has set up the process; a class whose module was never imported cannot have been raised.
USER_ERRORS = (
    ("llmjax.models.config", "ConfigError"),
    ("llmjax.data.sources", "SourceError"),
    ("llmjax.data.prepare", "PrepareError"),
    ("llmjax.data.shards", "ShardError"),
    ("llmjax.data.tasks", "TaskDataError"),
    ("llmjax.data.tokenizer", "TokenizerError"),
    ("llmjax.runs", "RunError"),
    ("llmjax.launch.distributed", "LaunchError"),
    ("llmjax.interop.hf", "InteropError"),
)
# OS errors about the paths a user passes (a missing file, a directory where a file was expected, ...)
USER_OS_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, FileExistsError)
# ... and the state of the disk they are on: full, over quota, mounted read-only
USER_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("LLMJAX_DEBUG", "") not in ("", "0")


def user_error_message(error: BaseException) -> str | None:
    """The one line to print for an error the user caused, or None for anything else (a bug: traceback)."""
    types = tuple(getattr(sys.modules[m], c) for m, c in USER_ERRORS if m in sys.modules
                  and isinstance(getattr(sys.modules[m], c, None), type))
    if types and isinstance(error, types):
        return str(error).strip() or type(error).__name__
    if isinstance(error, USER_OS_ERRORS) or (isinstance(error, OSError) and error.errno in USER_ERRNOS):
        if error.filename is not None:
            why = error.strerror or str(error)
            return f"{why}: {str(error.filename)!r}" + (
                f" -> {str(error.filename2)!r}" if getattr(error, "filename2", None) else "")
        return str(error)
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("--help", "-h", "help"):
        print(usage(), file=sys.stdout if len(argv) >= 2 else sys.stderr)
        return 0 if len(argv) >= 2 else 2
    command = argv[1]
    if command not in COMMANDS:
        near = difflib.get_close_matches(command, COMMANDS, n=1)
        hint = f"did you mean '{near[0]}'? " if near else ""
        print(f"llmjax: unknown command '{command}'; {hint}`llmjax --help` lists the commands", file=sys.stderr)
        return 2
    module, _, many_steps = COMMANDS[command]
    if command == "launch":  # its arguments are another command's: a --debug there is that command's
        debug, args = debug_requested([]), argv[2:]
    else:
        debug, args = debug_requested(argv[2:]), [a for a in argv[2:] if a != "--debug"]
    runtime.prepare_process(many_steps=many_steps)
    try:
        return importlib.import_module(f"{__name__}.{module}").main(args)
    except Exception as e:  # noqa: BLE001 - user errors become one line; anything else keeps its traceback
        message = None if debug else user_error_message(e)
        if message is None:
            raise
        print(f"llmjax {command}: {message}", file=sys.stderr)
        return 2

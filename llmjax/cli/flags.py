"""Command-line flags of the commands that take a config file: --config FILE, dotted --config.a.b=value
overrides (ml_collections), --workdir, and each command's own flags; --help lists them all."""

from __future__ import annotations

import difflib
import logging
import os
import sys
import traceback

from absl import flags
from ml_collections import config_flags

from llmjax.config import load_config
from llmjax.launch.distributed import config_path


def parse_config_flags(argv: list[str], define=None, *, config_required: bool = True, about: str = "",
                       example: str = ""):
    """Parse `argv` (argv[0] = the program, e.g. "llmjax train") with absl: --config FILE plus --config.a.b=value
    overrides, --workdir, and whatever flags `define(flag_values)` adds. Returns the FlagValues. --help prints
    the flags and exits 0; a user error exits with one line naming the flag or field and the fix."""
    prog = argv[0]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "ml_collections config file (configs/*.py)", flag_values=fv,
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "run directory (prepared data goes to WORKDIR/data by default)",
                        flag_values=fv)
    if define is not None:
        define(fv)
    args = [_underscores(a) for a in argv[1:]]
    if any(a in ("--help", "-h", "--helpfull") for a in args):
        print(usage(prog, fv, about, example))
        raise SystemExit(0)
    check_config_file(prog, args)
    saved = sys.argv
    sys.argv = [prog, *args]  # config_flags finds the --config.x overrides by reading sys.argv
    try:
        fv([prog, *args])
    except flags.Error as e:
        raise SystemExit(f"{prog}: {_first_line(e)}; see `{prog} --help`") from None
    except (AttributeError, KeyError) as e:  # an override naming a field the config does not have
        raise SystemExit(f"{prog}: {unknown_field_message(args, e)}") from None
    finally:
        sys.argv = saved
    if fv.config is None and config_required:
        raise SystemExit(f"{prog}: --config is required, e.g. --config configs/gpt_tiny.py")
    return fv


def check_config_file(prog: str, args: list[str], example: str = "configs/gpt_tiny.py") -> None:
    """A --config FILE that is missing (or a directory) is named here, before absl tries to import it (which
    would end in "Failed loading config file" with the path only inside a chained traceback)."""
    path = config_path(args)
    if path is None:
        return
    hint = f"pass e.g. --config {example}"
    if not os.path.exists(path) and ":" in path and os.path.isfile(path.rsplit(":", 1)[0]):
        return  # ml_collections' FILE:ARGUMENT form (get_config(ARGUMENT))
    if not os.path.exists(path):
        raise SystemExit(f"{prog}: --config: file {path!r} does not exist; {hint}")
    if not os.path.isfile(path):
        raise SystemExit(f"{prog}: --config: {path!r} is not a file; {hint}")
    try:  # an error inside the file is named here, with its line (absl would say only "Error whilst parsing")
        load_config(path)
    except Exception as e:  # noqa: BLE001 - whatever the user's file raised
        line = next((f.lineno for f in reversed(traceback.extract_tb(e.__traceback__))
                     if os.path.abspath(f.filename) == os.path.abspath(path)), None)
        where = f"line {line} of {path}" if line else path
        raise SystemExit(f"{prog}: --config: {where} raised {type(e).__name__}: {_first_line(e)}; fix the config "
                         "file") from None


def setup_logging() -> None:
    """INFO messages to stderr as plain lines. A library imported earlier may already have given the root logger
    a handler (so logging.basicConfig would do nothing): that one gets the plain format instead of a second
    handler; handlers of other kinds (a test's log capture) are left alone."""
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    plain = [h for h in root.handlers if type(h) is logging.StreamHandler]
    if not plain:
        plain = [logging.StreamHandler()]
        root.addHandler(plain[0])
    for handler in plain:
        handler.setFormatter(logging.Formatter("%(message)s"))


def usage(prog: str, fv, about: str, example: str) -> str:
    """`prog --help`: what the command does, an example, and its flags with their help and defaults."""
    lines = [f"usage: {prog} --config FILE [--config.SECTION.FIELD=VALUE ...] [flags]", ""]
    if about:
        lines += [about, ""]
    if example:
        lines += ["example:", f"  {example}", ""]
    lines.append("flags:")
    for name in sorted(fv):
        flag = fv[name]
        if name != flag.name or name.startswith("config.") or name in _ABSL_BUILTIN:
            continue
        default = "" if flag.default in (None, "") else f" (default: {flag.default})"
        lines.append(f"  --{name.replace('_', '-')}: {flag.help}{default}")
    lines += ["  --config.SECTION.FIELD=VALUE: override any field of the config file, e.g. "
              "--config.train.steps=1000 --config.model.num_layers=6"]
    lines += ["  --debug: show the traceback of a user error instead of one line (or set LLMJAX_DEBUG=1)"]
    return "\n".join(lines)


_ABSL_BUILTIN = {"flagfile", "undefok"}


def unknown_field_message(args: list[str], error: Exception) -> str:
    """"unknown config field 'stepz'; did you mean 'steps'? (--config.train.stepz=3)" for the first override
    whose path the config file does not have."""
    config_file = config_path(args)
    overrides = [a for a in args if a.startswith("--config.")]
    try:
        cfg = load_config(config_file)
    except Exception:
        cfg = None
    for arg in overrides:
        path = arg[len("--config."):].split("=", 1)[0].split(".")
        node = cfg
        for i, name in enumerate(path):
            keys = list(node.keys()) if hasattr(node, "keys") else []
            if name in keys:
                node = node[name]
                continue
            near = difflib.get_close_matches(name, keys, n=1)
            where = ".".join(path[:i])
            hint = f"did you mean '{near[0]}'?" if near else (
                f"the fields of {where} are {', '.join(map(str, keys))}" if where else
                f"the sections are {', '.join(map(str, keys))}")
            return f"unknown config field '{name}'; {hint} ({arg})"
    return f"unknown config field {_first_line(error)} in {' '.join(overrides)}; see the config file for the fields"


def _underscores(arg: str) -> str:
    """--init-from=x -> --init_from=x: every command flag accepts dashes (config overrides keep theirs)."""
    if not arg.startswith("--") or arg.startswith("--config"):
        return arg
    name, eq, value = arg[2:].partition("=")
    return "--" + name.replace("-", "_") + eq + value


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0]

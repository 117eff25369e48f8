"""What every benchmark records next to its numbers: the machine, the software and the load."""

from __future__ import annotations

import json
import os
import platform
import resource
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict:
    import jax

    return {
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "load_average_1_5_15": list(os.getloadavg()),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "device_count": jax.device_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def write_result(name: str, result: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def parse_flags(argv: list[str], define, doc: str):
    """absl flags of a benchmark without --config: `define(flag_values)` adds them. --help prints `doc` and the
    flags and exits 0; a bad flag exits with one line."""
    from absl import flags  # as machine_info's jax: only the scripts that parse flags load it

    fv = flags.FlagValues()
    define(fv)
    if any(a in ("--help", "-h", "--helpfull") for a in argv[1:]):
        print(doc.strip() + "\n\nflags:\n" + fv.get_help(include_special_flags=False))
        raise SystemExit(0)
    try:
        fv(argv)
    except flags.Error as e:
        raise SystemExit(f"{argv[0]}: {e}") from None
    return fv

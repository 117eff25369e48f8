"""Golden losses: the first 5 training losses of the tiny configs' end-to-end runs (test_end_to_end, and
test_moe for moe_tiny: fixed seed, the shared small corpus) equal those recorded in
tests/golden/first_losses.json, to a few float32 ulps (RTOL). One run serves both checks.

A refactor that changes no behaviour keeps them; a deliberate change of numerics re-records them with
`LLMJAX_WRITE_GOLDEN=1 pytest -m slow tests/test_end_to_end.py tests/test_moe.py -k trains` and says why in its
commit."""

from __future__ import annotations

import json
import math
import os
import pathlib

GOLDEN = pathlib.Path(__file__).resolve().parent.parent / "golden" / "first_losses.json"
STEPS = 5
# Bit-exact only on one kind of CPU: XLA and the CPU kernels sum in another order for another vector width (an
# AMD EPYC with AVX-512 moves the last 1-3 bits of the Intel Xeon's losses, ~2e-7 relative). A behaviour change
# moves them far more.
RTOL = 1e-6


def check_first_losses(name: str, rows: list[dict]) -> None:
    """Assert that the first STEPS train losses in `rows` (metrics logged every step) are the recorded ones."""
    logged = [r for r in rows if "train/loss" in r][:STEPS]
    assert [r["step"] for r in logged] == list(range(1, STEPS + 1)), "log every step: train.log_every=1"
    losses = [r["train/loss"] for r in logged]
    if os.environ.get("LLMJAX_WRITE_GOLDEN") == "1":
        recorded = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
        recorded[name] = losses
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(dict(sorted(recorded.items())), indent=2) + "\n")
    expected = json.loads(GOLDEN.read_text())[name]
    close = all(math.isclose(a, b, rel_tol=RTOL, abs_tol=0.0) for a, b in zip(losses, expected))
    assert len(losses) == len(expected) and close, (
        f"{name}: first losses {losses} != recorded {expected} within rtol {RTOL} (see tests/helpers/golden.py)")

"""Golden losses: the first 5 training losses of the tiny configs' end-to-end runs (test_end_to_end, and
test_moe for moe_tiny: fixed seed, the shared small corpus) equal, bit for bit, those recorded in
tests/golden/first_losses.json. One run serves both checks.

A refactor that changes no behaviour keeps them; a deliberate change of numerics re-records them with
`LLMJAX_WRITE_GOLDEN=1 pytest -m slow tests/test_end_to_end.py tests/test_moe.py -k trains` and says why in its
commit."""

from __future__ import annotations

import json
import os
import pathlib

GOLDEN = pathlib.Path(__file__).resolve().parent.parent / "golden" / "first_losses.json"
STEPS = 5


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
    assert losses == expected, f"{name}: first losses {losses} != recorded {expected} (see tests/helpers/golden.py)"

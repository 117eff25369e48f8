"""Every path flag of the command line reaches object storage when given a gs:// URL: against a real GCS API
server (fake-gcs-server, tests/helpers/gcs.py), a URL in a bucket the server does not have is refused in one
line naming the flag, before any work, and nothing is created locally. (The bucket workdir, export and
decoding end to end: tests/test_gcs_end_to_end.py; the data fields: tests/test_data_gcs.py.)"""

import pathlib

import pytest

from helpers.cli_errors import user_error
from helpers.gcs import gcs_server

ROOT = pathlib.Path(__file__).parent.parent
MISSING = "gs://no-such-bucket/x"


@pytest.fixture(scope="module")
def server():
    with gcs_server() as gcs:
        yield gcs


CASES = {
    "--workdir": ["train", f"--config={ROOT / 'configs' / 'gpt_tiny.py'}", f"--workdir={MISSING}"],
    "--workdir ": ["export", f"--workdir={MISSING}", "--out=/nonexistent/out"],
    "--out": ["export", "--workdir=gs://bkt/run", f"--out={MISSING}"],
    "--workdir  ": ["generate", f"--workdir={MISSING}", "--prompt=The "],
    "--init-from": ["finetune", f"--config={ROOT / 'configs' / 'finetune' / 'doc_vs_code.py'}",
                    f"--init-from={MISSING}", "--workdir=gs://bkt/ft"],
    "--workdir   ": ["compare", f"--grid={ROOT / 'configs' / 'compare' / 'objectives.py'}", f"--workdir={MISSING}"],
    "--base": ["merge-lora", f"--base={MISSING}", "--adapters=gs://bkt/ft", "--out=gs://bkt/merged"],
}


@pytest.mark.parametrize("flag", list(CASES), ids=[f"{c[0]} {f.strip()}" for f, c in CASES.items()])
def test_a_gs_url_reaches_the_server_and_a_missing_bucket_is_one_line(server, flag, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = CASES[flag]
    message = user_error(["llmjax", *argv], capsys)
    assert f"{flag.strip()} {MISSING}: bucket no-such-bucket does not exist" in message, message
    assert "\n" not in message.strip()
    assert not any(tmp_path.iterdir()), list(tmp_path.iterdir())  # nothing written here (no local "gs:" dir)

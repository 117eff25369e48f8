"""Real multi-process JAX (2 processes x 2 CPU devices, gloo collectives) runs the same train step as
1 process x 4 devices: each process feeds only its own rows of the global batch, built by the input pipeline
for its process index."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import portpicker
import pytest

SCRIPT = pathlib.Path(__file__).parent / "helpers" / "multiprocess_losses.py"


def _run(nproc, ndev, *args):
    port = portpicker.pick_unused_port()
    procs = [subprocess.Popen([sys.executable, str(SCRIPT), str(i), str(nproc), str(port), str(ndev), *args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(nproc)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    return outs


# encoder_decoder: ~50 s on 2 cores (~25 s for decoder), so with the slow ones
@pytest.mark.parametrize("family", ["decoder", pytest.param("encoder_decoder", marks=pytest.mark.slow)])
def test_ul2_two_processes_equal_one_process(family):
    """UL2 rows built by each process's input pipeline (its slice of the global batch's row streams, each
    example's denoiser drawn there) train as the rows one process builds for the whole batch: 2 processes x 2
    devices give the losses of 1 process x 4 devices."""
    single = _run(1, 4, "ul2", family)[0]
    multi = _run(2, 2, "ul2", family)
    assert [m["devices"] for m in multi] == [4, 4] and [m["process"] for m in multi] == [0, 1]
    assert single["rows"] == 8 and [m["rows"] for m in multi] == [4, 4]
    for m in multi:
        np.testing.assert_allclose(m["losses"], single["losses"], rtol=1e-5)

"""Run 5 train steps on synthetic batches in one of N JAX processes (CPU, gloo) and print the losses.

    python multiprocess_losses.py PROCESS_ID NUM_PROCESSES PORT DEVICES_PER_PROCESS
(NUM_PROCESSES=1: no distributed runtime.) Prints one JSON line: {"losses": [...]} from every process.
"""

import json
import os
import sys

pid, nproc, port, ndev = (int(a) for a in sys.argv[1:5])
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={ndev}"

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
if nproc > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=nproc, process_id=pid)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from test_train import optim, synthetic_batches, tiny_cfg  # noqa: E402

from llmjax import sharding as shd  # noqa: E402
from llmjax.state import init_state, make_optimizer  # noqa: E402
from llmjax.step import batch_shardings, global_batch, make_train_step  # noqa: E402

cfg = tiny_cfg()
mesh = shd.make_mesh(shd.mesh_config(data=2, fsdp=-1))
tx = make_optimizer(optim(), total_steps=10)
graphdef, state, state_sh = init_state(cfg, tx, mesh, shd.rules_dict(shd.DEFAULT_RULES), seed=0)
batches = synthetic_batches(5)
rows = batches[0]["inputs"].shape[0] // jax.process_count()
local = lambda b: {k: v[jax.process_index() * rows:(jax.process_index() + 1) * rows] for k, v in b.items()}
step = make_train_step(graphdef, tx, state_sh, batch_shardings(mesh, batches[0]))
losses = []
for b in batches:
    state, metrics = step(state, global_batch(local(b), mesh))  # each process gives only its own rows
    losses.append(float(metrics["loss"]))
print(json.dumps({"process": jax.process_index(), "devices": jax.device_count(), "losses": losses}), flush=True)

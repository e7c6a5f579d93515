"""Fixtures: an isolated corpus cache for every test, the device of the model tests, and a
private PostgreSQL server."""

import hashlib
import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _one_thread_per_xdist_worker():
    # `make test` runs two workers (pytest-xdist) on CI's two cores: each trains in-process on
    # one thread, so the two do not fight over both cores. Subprocesses keep their defaults.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def device():
    """Where the model tests place models and tensors: NAS_TEST_DEVICE (`cuda` in
    benchmarks/gpu_smoke.sh), else the CPU, as on CI."""
    import torch

    return torch.device(os.environ.get("NAS_TEST_DEVICE", "cpu"))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # One builtin-corpus cache for the whole session, outside the user's home.
    cache = tmp_path_factory.getbasetemp() / "cache"
    monkeypatch.setenv("RESFORMER_NAS_CACHE", str(cache))


@pytest.fixture(scope="session")
def pg_cluster():
    """A private PostgreSQL server for the session (Debian's binaries; never skipped)."""
    from tests.pg import PgCluster, PgUnavailable

    try:
        cluster = PgCluster().start()
    except PgUnavailable as exc:
        pytest.fail(f"PostgreSQL tests need a server: {exc}", pytrace=False)
    yield cluster
    cluster.stop()


@pytest.fixture
def pg_url(pg_cluster, request):
    """The URL of a fresh database on the session's PostgreSQL server, one per test."""
    readable = "".join(c if c.isalnum() else "_" for c in request.node.name.lower())[:40]
    # PostgreSQL cuts names at 63 bytes: a digest of the whole name keeps the parameters of a
    # long test's cases apart.
    digest = hashlib.sha1(request.node.name.encode()).hexdigest()[:8]
    return pg_cluster.create_database(f"t_{readable}_{digest}")

"""Fixtures: an isolated corpus cache for every test, and a private PostgreSQL server."""

import pytest


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
    name = "t_" + "".join(c if c.isalnum() else "_" for c in request.node.name.lower())[:50]
    return pg_cluster.create_database(name)

"""pytest plugin: a real HDFS (Hadoop 3.3.6 MiniDFSCluster) for the test session.

Load it with ``pytest_plugins = ["tests.conftest_hdfs"]`` in tests/conftest.py, with
``-p tests.conftest_hdfs`` on the command line, or, when tests/ itself is on
sys.path, as ``conftest_hdfs``.

Fixtures
--------
``hdfs_cluster`` (session)
    A running :class:`MiniDFSCluster` (see tests/support/minidfs.py): ``.hdfs_url``
    ("hdfs://127.0.0.1:<port>"), ``.host``, ``.port``, ``.http_port``,
    ``.webhdfs_url``, ``.user``, ``.hdfs_fs()``, ``.webhdfs_fs()``, ``.restart()``,
    ``.stop()``/``.kill()``/``.start()``, ``.log_path``. Started once per session;
    the jars are fetched with Maven on first use and cached (see
    ``OTEACHECK_HADOOP_CACHE``).
    Skipped when ``java`` (or, with an empty jar cache, ``mvn``) is not on PATH;
    with ``CI=true`` that is a failure instead.

``hdfs_root`` (function)
    ``"hdfs://127.0.0.1:<port>/tests/<uuid hex>"``: a fresh, already created, empty
    directory, unique per test. Not deleted afterwards (the whole cluster lives in
    pytest's tmp dir).
"""

from __future__ import annotations

import os
import shutil
import uuid

import pytest

if __package__:  # imported as tests.conftest_hdfs
    from .support.minidfs import MiniDFSCluster, cached_classpath, ensure_hadoop_jars
else:  # imported as top-level conftest_hdfs with tests/ on sys.path
    from support.minidfs import MiniDFSCluster, cached_classpath, ensure_hadoop_jars


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("CI", "").strip().lower() == "true":
        pytest.fail(f"{reason} (CI=true, so this is an error, not a skip)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def hdfs_cluster(tmp_path_factory):
    if shutil.which("java") is None:
        _skip_or_fail("HDFS tests need `java` (17 works) on PATH to run Hadoop's MiniDFSCluster")
    if shutil.which("mvn") is None and cached_classpath() is None:
        _skip_or_fail("HDFS tests need `mvn` on PATH to fetch the Hadoop 3.3.6 jars from Maven Central")
    classpath = ensure_hadoop_jars()
    cluster = MiniDFSCluster(tmp_path_factory.mktemp("minidfs"), classpath=classpath)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def hdfs_root(hdfs_cluster) -> str:
    if not hdfs_cluster.running:  # a previous test stopped it and failed before restarting
        hdfs_cluster.start()
    path = f"/tests/{uuid.uuid4().hex}"
    _mkdirs(hdfs_cluster, path)
    return f"{hdfs_cluster.hdfs_url}{path}"


def _mkdirs(cluster: MiniDFSCluster, path: str) -> None:
    try:
        from hdfs_native import Client
    except ImportError:  # hdfs-native is an optional extra: fall back to WebHDFS
        cluster._webhdfs("PUT", path, "MKDIRS")
        return
    Client(cluster.hdfs_url).mkdirs(path, 0o755, True)

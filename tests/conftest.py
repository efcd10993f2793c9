"""Shared fixtures: the real HDFS (MiniDFSCluster) comes from tests/conftest_hdfs.py."""

from tests.conftest_hdfs import hdfs_cluster, hdfs_root  # noqa: F401

"""Real-HDFS tests (no mocks) against the session MiniDFSCluster from tests/conftest_hdfs.py.

Two fsspec clients are exercised:

* ``hdfs://``: hdfs-native's filesystem (registered through the ``fsspec.specs``
  entry point as ``hdfs``), talking the NameNode RPC / DataNode transfer protocol.
* ``webhdfs://``: fsspec's built-in REST client; reads/writes are redirected by
  the NameNode to the DataNode's HTTP address, which must be 127.0.0.1 too.
"""

from __future__ import annotations

import os
import sys
import urllib.parse

import fsspec
import pytest
import requests
from hdfs_native.fsspec import HdfsFileSystem


def _path(url: str) -> str:
    return urllib.parse.urlparse(url).path


def _file_id(cluster, path: str) -> int:
    """HDFS inode id (only WebHDFS exposes it); a rename keeps it, a copy does not."""
    return cluster.webhdfs_fs().info(path)["fileId"]


# ----------------------------------------------------------------- hdfs:// (hdfs-native)


def test_url_to_fs_gives_hdfs_native(hdfs_cluster, hdfs_root):
    fs, path = fsspec.url_to_fs(hdfs_root)
    assert isinstance(fs, HdfsFileSystem)
    assert (fs.host, fs.port) == ("127.0.0.1", hdfs_cluster.port)
    assert path == _path(hdfs_root)
    assert fs.isdir(path) and fs.ls(path) == []  # hdfs_root is fresh and empty
    # explicit construction gives the same thing
    fs2 = fsspec.filesystem("hdfs", host="127.0.0.1", port=hdfs_cluster.port)
    assert isinstance(fs2, HdfsFileSystem) and fs2.isdir(path)


def _write_list_read(fs, root, payloads, top_level, makedirs=False):
    """Writes ``payloads`` through ``fs``, then checks the listing, sizes and contents it reports."""
    for path, data in payloads.items():
        if makedirs:
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with fs.open(path, "wb") as f:
            f.write(data)
    assert sorted(fs.ls(root, detail=False)) == top_level
    assert sorted(fs.find(root)) == sorted(payloads)
    for path, data in payloads.items():
        assert fs.info(path)["size"] == len(data)
        assert fs.cat_file(path) == data


def test_hdfs_write_list_read(hdfs_root):
    fs, root = fsspec.url_to_fs(hdfs_root)
    payloads = {
        f"{root}/a.bin": os.urandom(1000),
        f"{root}/sub/b.bin": b"",
        f"{root}/sub/deeper/c.bin": os.urandom(3 * 1024 * 1024 + 17),  # several packets
    }
    _write_list_read(fs, root, payloads, [f"{root}/a.bin", f"{root}/sub"], makedirs=True)

    big = f"{root}/sub/deeper/c.bin"
    with fs.open(big, "rb") as f:  # random access
        f.seek(2 * 1024 * 1024)
        assert f.read(100) == payloads[big][2 * 1024 * 1024 : 2 * 1024 * 1024 + 100]

    # fsspec's top-level URL API works too
    with fsspec.open(f"{hdfs_root}/a.bin", "rb") as f:
        assert f.read() == payloads[f"{root}/a.bin"]
    with pytest.raises(FileNotFoundError):
        fs.cat_file(f"{root}/missing")


def test_hdfs_mv_is_an_atomic_rename(hdfs_cluster, hdfs_root):
    fs, root = fsspec.url_to_fs(hdfs_root)
    src, dst = f"{root}/ckpt.tmp", f"{root}/ckpt"
    data = os.urandom(64 * 1024)
    fs.pipe_file(src, data)
    before = fs.info(src)
    inode = _file_id(hdfs_cluster, src)

    fs.mv(src, dst)

    assert not fs.exists(src)
    assert fs.cat_file(dst) == data
    # Same inode and mtime: a single NameNode rename, not copy + delete.
    assert _file_id(hdfs_cluster, dst) == inode
    assert fs.info(dst)["modification_time"] == before["modification_time"]

    # No silent clobbering: onto an existing file it raises and changes nothing ...
    fs.pipe_file(src, b"new")
    with pytest.raises(FileExistsError):
        fs.mv(src, dst)
    assert fs.cat_file(src) == b"new" and fs.cat_file(dst) == data
    # ... unless asked to: overwrite=True replaces the destination in one step.
    fs.mv(src, dst, overwrite=True)
    assert not fs.exists(src) and fs.cat_file(dst) == b"new"

    # Directories are renamed as a whole (write-to-temp-dir-then-publish pattern).
    fs.pipe_file(f"{root}/step.tmp/shard0", b"0")
    fs.pipe_file(f"{root}/step.tmp/shard1", b"1")
    dir_inode = _file_id(hdfs_cluster, f"{root}/step.tmp")
    fs.rename(f"{root}/step.tmp", f"{root}/step-1")  # fsspec alias of mv
    assert not fs.exists(f"{root}/step.tmp")
    assert sorted(fs.find(f"{root}/step-1")) == [f"{root}/step-1/shard0", f"{root}/step-1/shard1"]
    assert _file_id(hdfs_cluster, f"{root}/step-1") == dir_inode


# ---------------------------------------------------------------------------- webhdfs://


def test_webhdfs_redirects_to_loopback_datanode(hdfs_cluster, hdfs_root):
    # The NameNode answers CREATE/OPEN with a 307 to the DataNode's HTTP server.
    url = f"{hdfs_cluster.http_url}/webhdfs/v1{_path(hdfs_root)}/x"
    with requests.Session() as s:
        s.trust_env = False
        r = s.put(url, params={"op": "CREATE", "user.name": hdfs_cluster.user}, allow_redirects=False)
    assert r.status_code == 307, r.text
    location = urllib.parse.urlparse(r.headers["Location"])
    assert location.hostname == "127.0.0.1"
    assert location.port not in (hdfs_cluster.http_port, hdfs_cluster.port)


def test_webhdfs_write_list_read(hdfs_cluster, hdfs_root):
    w = fsspec.filesystem(
        "webhdfs", host="127.0.0.1", port=hdfs_cluster.http_port, user=hdfs_cluster.user,
        skip_instance_cache=True,
    )
    w.session.trust_env = False
    root = _path(hdfs_root)
    payloads = {f"{root}/w1.bin": os.urandom(5000), f"{root}/dir/w2.bin": b"hello webhdfs"}
    _write_list_read(w, root, payloads, [f"{root}/dir", f"{root}/w1.bin"])
    with w.open(f"{root}/w1.bin", "rb") as f:
        f.seek(4000)
        assert f.read() == payloads[f"{root}/w1.bin"][4000:]

    # Both clients see the same namespace.
    fs = hdfs_cluster.hdfs_fs()
    assert fs.cat_file(f"{root}/dir/w2.bin") == b"hello webhdfs"
    fs.pipe_file(f"{root}/from-native", b"native")
    assert w.cat_file(f"{root}/from-native") == b"native"


def test_webhdfs_mv_is_an_atomic_rename(hdfs_cluster, hdfs_root):
    w = hdfs_cluster.webhdfs_fs()
    root = _path(hdfs_root)
    src, dst = f"{root}/a.tmp", f"{root}/a"
    w.pipe_file(src, b"payload")
    inode = w.info(src)["fileId"]

    w.mv(src, dst)

    assert not w.exists(src)
    assert w.cat_file(dst) == b"payload"
    assert w.info(dst)["fileId"] == inode  # one RENAME op, not copy + delete

    # QUIRK: WebHDFS RENAME onto an existing file answers {"boolean": false} and
    # fsspec's WebHDFS.mv ignores that: nothing happens and nothing is raised.
    w.pipe_file(src, b"other")
    w.mv(src, dst)
    assert w.cat_file(src) == b"other" and w.cat_file(dst) == b"payload"
    # (And onto an existing *directory* it moves src inside it, POSIX-style.)


# ------------------------------------------------------------------------------ sockets


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_cluster_listens_on_loopback_only(hdfs_cluster):
    pid = hdfs_cluster.pid
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    listening = []
    for table in ("tcp", "tcp6", "udp", "udp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            local, state, inode = cols[1], cols[3], cols[9]
            # TCP LISTEN is state 0A; any bound UDP socket counts as listening.
            if inode in inodes and (table.startswith("udp") or state == "0A"):
                listening.append((table, local))
    assert listening, "found no listening sockets of the JVM; /proc parsing broken?"
    loopback = {"0100007F"}  # 127.0.0.1 in /proc's little-endian hex
    bad = [(t, a) for t, a in listening if a.split(":")[0] not in loopback]
    assert not bad, f"MiniDFSCluster listens outside 127.0.0.1: {bad}"
    ports = {int(a.split(":")[1], 16) for _, a in listening}
    assert {hdfs_cluster.port, hdfs_cluster.http_port} <= ports


# ------------------------------------------------------------------------------ restart
# Keep this last: it restarts the shared session cluster (same ports, so other
# tests' URLs stay valid; hdfs_root also restarts it if a failure left it down).


def test_data_survives_cluster_restart(hdfs_cluster, hdfs_root):
    fs, root = fsspec.url_to_fs(hdfs_root)
    data = os.urandom(256 * 1024)
    fs.pipe_file(f"{root}/before-stop", data)
    fs.mv(f"{root}/before-stop", f"{root}/renamed-before-stop")
    old_pid = hdfs_cluster.pid

    # Graceful: stop the JVM, start a new one on the same dirs/ports without -format.
    hdfs_cluster.stop()
    assert not hdfs_cluster.running
    hdfs_cluster.start()
    assert hdfs_cluster.pid != old_pid

    fresh = hdfs_cluster.hdfs_fs()
    assert fresh.cat_file(f"{root}/renamed-before-stop") == data
    assert not fresh.exists(f"{root}/before-stop")
    assert fs.cat_file(f"{root}/renamed-before-stop") == data  # old client reconnects
    assert hdfs_cluster.webhdfs_fs().cat_file(f"{root}/renamed-before-stop") == data

    # Crash: SIGKILL the JVM, then start again; closed files survive.
    fs.pipe_file(f"{root}/before-kill", b"k" * 1000)
    hdfs_cluster.kill()
    hdfs_cluster.start()
    fresh = hdfs_cluster.hdfs_fs()
    assert fresh.cat_file(f"{root}/before-kill") == b"k" * 1000
    assert fresh.cat_file(f"{root}/renamed-before-stop") == data
    fresh.pipe_file(f"{root}/after-restart", b"ok")  # and it is writable again
    assert fresh.cat_file(f"{root}/after-restart") == b"ok"

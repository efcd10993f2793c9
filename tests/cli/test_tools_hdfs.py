"""The tools on a real HDFS (MiniDFSCluster): hdfs:// through hdfs-native, and webhdfs://."""

import json

import torch
from safetensors.torch import load_file

from oteacheck_lightning import cli
from oteacheck_lightning.tiers import FsspecTier
from tests.cli.test_tools import A, B, write_rank, write_step


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_ls_verify_export_and_gc_on_hdfs(hdfs_cluster, hdfs_root, tmp_path, capsys):
    tier = FsspecTier(hdfs_root)
    for step in (3, 6, 9):
        write_step(tier, step)
    write_rank(tier.checkpoint(12), 12, 0)  # rank 1 still writing

    code, out, err = run(capsys, "ls", hdfs_root, "--json", "--verify")
    assert code == 0, err
    assert [(c["step"], c["committed"], c["verified"]) for c in json.loads(out)] == [
        (3, True, True), (6, True, True), (9, True, True), (12, False, None)]

    webhdfs = hdfs_root.replace(hdfs_cluster.hdfs_url, hdfs_cluster.webhdfs_url)
    code, out, err = run(capsys, "verify", webhdfs, "--step", "6")
    assert code == 0, err
    assert "1 of 1 checkpoints verified" in out

    code, _, err = run(capsys, "export", hdfs_root, str(tmp_path / "w.safetensors"))
    assert code == 0, err
    weights = load_file(str(tmp_path / "w.safetensors"))
    assert torch.equal(weights["a"], A) and torch.equal(weights["b"], B)

    code, out, err = run(capsys, "gc", hdfs_root, "--keep", "1", "--json")
    assert code == 0, err
    assert json.loads(out)["removed"] == [3, 6]
    assert FsspecTier(hdfs_root).steps() == [9, 12]

    code, _, err = run(capsys, "ls", f"{hdfs_cluster.hdfs_url}/no/such/tier")
    assert code == 3 and "does not exist" in err

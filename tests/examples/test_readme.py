"""Tried as a new user would: the README's two set-up commands, run in a fresh copy of the checkout with a fresh
virtual environment.

To stay within CI's time and disk, the fresh environment borrows the already installed third-party packages
(torch, DeepSpeed, ...) through a ``.pth`` file, while the project itself, its console script and every step
of ``scripts/setup.sh`` are installed fresh from the copy. ``OTEACHECK_README_FULL_INSTALL=1`` installs
everything from the package index instead (several GB). ``scripts/test.sh`` is run with ``--collect-only``:
running the whole suite from inside the suite would run it twice.
"""

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.cli.support import ROOT

pytestmark = pytest.mark.multiprocess


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Set up", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.strip()]


def copy_checkout(dest: Path) -> None:
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file() and not name.startswith(("runs/", ".git/")):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)


def fresh_environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin)
    return env


def run(cmd: str, cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", "-c", cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                          start_new_session=True)
    assert proc.returncode == 0, f"`{cmd}` failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def test_the_readme_commands_work_in_a_fresh_checkout_and_environment(tmp_path):
    commands = readme_commands()
    assert commands == ["bash scripts/demo.sh", "bash scripts/test.sh"], "update this test with the README"
    checkout = tmp_path / "checkout"
    copy_checkout(checkout)
    env = fresh_environment()

    if os.environ.get("OTEACHECK_README_FULL_INSTALL") != "1":
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", str(checkout / ".venv")], check=True, timeout=300)
        fresh_site = subprocess.run([str(checkout / ".venv/bin/python"), "-c",
                                     "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                    capture_output=True, text=True, check=True).stdout.strip()
        (Path(fresh_site) / "_borrowed_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
        # what the README's commands do first on a machine without .venv
        run("bash scripts/setup.sh", checkout, env, timeout=900)

    demo = run(commands[0], checkout, env, timeout=900)
    assert "bit-identical to the uninterrupted run" in demo.stdout, demo.stdout[-2000:]
    assert re.search(r'"resumed_from": \{"step": \d+', demo.stdout)

    collected = run(f"{commands[1]} --collect-only", checkout, env, timeout=600)
    assert re.search(r"\d+ tests? collected", collected.stdout), collected.stdout[-2000:]
    assert "test_readme.py::" in collected.stdout

    # the package, its console script and python -m come from the fresh copy
    where = run(".venv/bin/python -c 'import oteacheck_lightning as o; print(o.__file__)'", checkout, env, 120)
    assert where.stdout.strip().startswith(str(checkout / "src"))
    proc = subprocess.run([str(checkout / ".venv/bin/oteacheck"), "ls", str(tmp_path / "nothing")], cwd=checkout,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3 and "oteacheck ls: error:" in proc.stderr

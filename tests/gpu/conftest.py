import shutil
import uuid
from pathlib import Path

import pytest


@pytest.fixture
def shm_dir():
    """A private folder on /dev/shm: CUDA page-locks tmpfs pages, not pages of a file on disk."""
    path = Path("/dev/shm") / f"oteacheck-test-{uuid.uuid4().hex[:12]}"
    path.mkdir(mode=0o700)
    yield path
    shutil.rmtree(path, ignore_errors=True)

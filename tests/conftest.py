"""Test-wide settings: an isolated weights/embedding cache, so tests never read or write ~/.cache."""
import os
import tempfile

import pytest
import torch

# Each pytest process (and each pytest-xdist worker, which inherits the controller's environment) gets
# its own cache: tests assert what a run computes and what it reads from the cache.
if os.environ.get("SIREN_CACHE", "") in ("", os.environ.get("SIREN_TEST_CACHE")):
    os.environ["SIREN_CACHE"] = os.environ["SIREN_TEST_CACHE"] = tempfile.mkdtemp(prefix="siren-test-cache-")


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    """A SIREN_CACHE with no pretrained files in it."""
    monkeypatch.setenv("SIREN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is fastest (several times faster than two on a shared 2-core
    machine), and module-scoped model fixtures are built under it too."""
    torch.set_num_threads(1)

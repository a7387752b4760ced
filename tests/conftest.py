"""Test-wide settings: an isolated weights/embedding cache, so tests never read or write ~/.cache."""
import os
import tempfile

import pytest
import torch

from siren import demo_weights

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


@pytest.fixture(scope="session", autouse=True)
def _kept_networks():
    """A test process builds the same seeded random networks (CLAP, PANNs, VGGish) and loads the
    same demo ones dozens of times: keep one of each and hand out copies, as the warm-start server does
    (siren.demo_weights.keep_loaded; on a 2-core CPU a random CLAP takes ~3.4 s, its copy ~0.3 s). Tests of
    seeding and loading themselves take ``fresh_builds``."""
    demo_weights.keep_loaded()


@pytest.fixture
def fresh_builds(monkeypatch):
    """Nothing kept: every network is built or loaded anew (a test that two builds agree must compare two)."""
    monkeypatch.setattr(demo_weights, "_KEPT", None)


@pytest.fixture(autouse=True)
def _numba_cache_dir_kept():
    """laion_clap sets NUMBA_CACHE_DIR=/tmp/ for the process when its model code is imported, as the peer-parity
    tests import it: put the variable back after each test, so later tests and the processes they start use the
    numba cache of librosa that .ci/setup compiled (siren/clap.py does the same for the harness's own import)."""
    before = os.environ.get("NUMBA_CACHE_DIR")
    yield
    if before is None:
        os.environ.pop("NUMBA_CACHE_DIR", None)
    else:
        os.environ["NUMBA_CACHE_DIR"] = before

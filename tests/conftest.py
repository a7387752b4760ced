"""Test-wide settings: an isolated weights/embedding cache, so tests never read or write ~/.cache."""
import os
import shutil
import tempfile

import pytest
import torch

from siren import demo_weights
from siren.clap import numba_cache_dir_kept

# Each pytest process (and each pytest-xdist worker, which inherits the controller's environment) gets
# its own cache: tests assert what a run computes and what it reads from the cache.
MADE_CACHE = None  # the cache this process made, removed as it ends (each run left up to 21 MB in /tmp)
if os.environ.get("SIREN_CACHE", "") in ("", os.environ.get("SIREN_TEST_CACHE")):
    MADE_CACHE = tempfile.mkdtemp(prefix="siren-test-cache-")
    os.environ["SIREN_CACHE"] = os.environ["SIREN_TEST_CACHE"] = MADE_CACHE


def pytest_unconfigure(config):
    if MADE_CACHE:
        shutil.rmtree(MADE_CACHE, ignore_errors=True)

# pytest-xdist hands out whole files (--dist loadfile) in collection order (--no-loadscope-reorder: by default it
# orders them by their number of tests), so the files that take longest go first and the two workers end
# together. Ordered by the seconds each took on 2 cores (2026-12-04, family 23 model 1: 220 s down to 33 s); the
# rest, each under half a minute, follow in name order. By test count, test_parity.py (3 tests, 60 s) and
# test_demo_codec.py (103 s) came last, and one worker ran alone for the last 53 s of a 10 min 16 s run (this
# order: 10 s of 9 min 36 s).
LONGEST_FIRST = ("test_ablations.py", "test_analysis.py", "test_demo_codec.py", "test_eval.py", "test_parity.py",
                 "test_demo_backbones.py", "test_bad_inputs.py", "test_clap.py", "test_rl.py", "test_data_filter.py",
                 "test_reward.py", "test_model.py", "test_continuous.py", "test_slurm_executors.py",
                 "test_foundation.py", "test_warm.py")


def pytest_collection_modifyitems(items):
    rank = {name: k for k, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's own order is kept


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
    """The peer-parity tests import laion_clap itself, which sets NUMBA_CACHE_DIR=/tmp/ for the process: put the
    variable back after each test, so later tests and the processes they start use the numba cache of librosa
    that .ci/setup compiled (as siren.clap does around the harness's own import)."""
    with numba_cache_dir_kept():
        yield

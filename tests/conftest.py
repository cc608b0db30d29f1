"""Session-wide test settings and shared fixtures."""
import os
import tempfile

import pytest
import torch

# Cost tables calibrated by engines under test (the auto policy) go to a private, throw-away
# cache: tests never read a table measured by an earlier run or by the user.
os.environ.setdefault("SPECRT_CACHE_DIR", tempfile.mkdtemp(prefix="specrt-test-cache-"))
# The tests of proposer mechanics (tree shapes, counters, per-depth histograms at full draft
# depth) run with fixed budgets; tests/test_policy.py runs the auto policy explicitly (greedy
# equal to plain and chi-square for every proposer, random budgets, calibration).
os.environ.setdefault("SPECRT_POLICY", "fixed")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-model tests (as fast, and far faster on a busy
    machine): ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

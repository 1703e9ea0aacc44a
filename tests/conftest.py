import atexit
import os
import shutil
import sys
import tempfile

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(2)
# Compiled decode steps (lmzoo.infer.compiled) are kept in a cache of this run's own: a test that builds
# one really builds it, and nothing is left in the user's ~/.cache.
os.environ["LMZOO_CACHE_DIR"] = tempfile.mkdtemp(prefix="lmzoo-test-cache-")
atexit.register(shutil.rmtree, os.environ["LMZOO_CACHE_DIR"], ignore_errors=True)
# ...and a plain model's generate() decodes eagerly (no step built in the background) except in the
# tests of that default (tests/test_compiled_step.py), which turn it back on.
os.environ["LMZOO_COMPILE"] = "0"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

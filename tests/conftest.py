import importlib
import os

from resmobile_jax.cli import xla_flags_value

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The XLA flags every command sets (cli.run), before anything starts JAX's backend: tests that compare a result
# computed in this process with one from a command (evaluate reproducing a run's metrics bit for bit) need the
# same matmul library on both sides.
if (_xla_flags := xla_flags_value(os.environ)) is not None:
    os.environ["XLA_FLAGS"] = _xla_flags

import numpy as np
import pytest

# torchvision.ops pulls in torch._dynamo and with it triton, whose native library segfaulted on import in an xdist
# worker that had already run JAX programs (`pytest -n 2 tests/data/test_messy_folder.py tests/models/test_blocks.py`:
# 4 of 4 tries on 2026-12-06, the previous session's code too; the same imports in a plain process did not crash).
# Imported here, before any test runs JAX, the same pair passed 2 of 2.
try:
    importlib.import_module("torchvision.ops")
except ImportError:  # torch is a test extra; the tests that need it import it themselves
    pass


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# Files whose tests take minutes (durations of the last full run, in s, on 2 xdist workers). They are handed out
# first, longest first, so the two workers finish together instead of one of them starting a 7-minute file last.
HEAVY_FILES = {
    "tests/test_compare.py": 410, "tests/train/test_resume.py": 500, "tests/test_retrieval.py": 80,
    "tests/train/test_sharding.py": 240, "tests/export/test_export.py": 200, "tests/test_evaluate.py": 240,
    "tests/bench/test_bench.py": 140, "tests/train/test_storage_faults.py": 110, "tests/train/test_nonfinite.py": 100,
}


def pytest_collection_modifyitems(config, items):
    def cost(item):
        return -HEAVY_FILES.get(item.nodeid.split("::")[0], 0)

    items.sort(key=cost)  # stable: the order inside a file and among the light files is kept

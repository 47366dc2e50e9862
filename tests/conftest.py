"""Session settings and the fixtures many test modules use (helpers they share are in ``tests/helpers.py``)."""

import os
from pathlib import Path

# One thread in every process the suite compares: this test process, the gloo ranks it spawns and every
# trainer or tool it launches inherit these. Thread counts change float reduction orders (so results), and
# Accelerate sets its own count in a CPU rank that finds OMP_NUM_THREADS unset. One per test process also
# suits pytest-xdist (a process per core): on a busy 2-core machine extra threads' spin-waits cost up to 100x.
os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")

import pytest  # noqa: E402
import torch  # noqa: E402  (after the thread settings: OpenMP reads them when torch loads)

from tests.helpers import demo_shards  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """The demo images converted into shards (8 train images per class), once per test module."""
    return demo_shards(tmp_path_factory.mktemp("demo"))

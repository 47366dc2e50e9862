"""The benchmark's SimCLR reference (benchmarks/simclr_reference.py): its batches (its NT-Xent is the package's,
tests/method/test_loss.py)."""

from __future__ import annotations

import random
import sys

from tests.helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

from simclr_reference import epoch_batches  # noqa: E402


def test_epoch_batches_draw_without_replacement() -> None:
    batches = epoch_batches(1437, 128, random.Random(0))
    drawn = [i for batch in batches for i in batch]
    assert len(batches) == 11 and all(len(batch) == 128 for batch in batches)
    assert len(set(drawn)) == len(drawn) and set(drawn) <= set(range(1437))  # no image twice in an epoch
    assert epoch_batches(1437, 128, random.Random(0)) == batches != epoch_batches(1437, 128, random.Random(1))

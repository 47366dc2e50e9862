import sys
from pathlib import Path

import torch

# Lets tests import the helpers beside them (tests/gloo.py) under pytest-xdist too.
sys.path.insert(0, str(Path(__file__).parent))

# One intra-op thread per test process: pytest-xdist already runs a process per core, the tensors
# are small, and on a busy 2-core machine the spin-waits of extra threads cost up to 100x.
torch.set_num_threads(1)

import sys
from pathlib import Path

# Lets tests import the helpers beside them (tests/gloo.py) under pytest-xdist too.
sys.path.insert(0, str(Path(__file__).parent))

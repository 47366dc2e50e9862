"""Is this machine ready for a recipe? ``[accelerate launch ...] tools/selfcheck.py RECIPE [dotted.key=value ...]
[--out DIR]``: a few minutes of checks on tiny demo shards with the recipe's backbone and the launch's
precision, world size and DeepSpeed setting; a table, ``DIR/selfcheck.json``, exit code 1 if a check
failed. smog_scale/launch/selfcheck.py lists the checks.
"""

import sys

from smog_scale.launch.selfcheck import main

if __name__ == "__main__":
    sys.exit(main())

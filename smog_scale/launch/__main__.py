"""``python -m smog_scale.launch``: the ``smog-launch`` command (:mod:`smog_scale.launch.supervisor`)."""

import sys

from smog_scale.launch.supervisor import main

sys.exit(main())

"""Training a run: the step, the loop, optimizer, checkpoints, the run folder, the run log, kNN monitor, re-grouping.

May import ``dist``, ``config``, ``data``, ``models``, ``method`` and ``eval``; never ``export`` or ``launch``.
"""

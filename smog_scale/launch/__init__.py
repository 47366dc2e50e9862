"""Running a job on a cluster: the SLURM supervisor (``smog-launch``), the memory estimate and the self-check.

May import every sub-package but ``export`` and ``eval``; only command lines import ``launch``.
"""

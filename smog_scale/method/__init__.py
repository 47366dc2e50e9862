"""The SMoG method as maths on tensors: grouping, the losses, feature caches, k-means, schedules, health signals.

May import ``smog_scale.dist``, ``config`` (the schema it reads) and ``models`` (their outputs); never
data loading, files or checkpoints (no I/O), nor ``training``.
"""

"""Evaluating backbones: features, kNN, linear probe, fine-tuning, group quality, BatchNorm re-estimation, plots.

May import ``dist``, ``data`` and ``method``; never ``training`` (the monitor imports eval, not the reverse).
"""

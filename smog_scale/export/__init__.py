"""Trained networks out of a run: strict checkpoint reading and the timm, torchvision and detectron2 writers.

May import ``config``, ``data``, ``models`` and ``training`` (its checkpoint layout).
"""

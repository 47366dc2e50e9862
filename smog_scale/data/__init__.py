"""Images in: the shard loaders and multi-crop; ``converter/`` writes shards, ``synthetic/`` the built-in sets.

Imports nothing outside ``data`` (no networks, no method, no ``dist``); ``smog_scale.__version__`` only.
"""

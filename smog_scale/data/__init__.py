"""Images in: the shard loaders and multi-crop; ``converter/`` writes shards, ``synthetic/`` the built-in sets.

Imports nothing outside ``data`` (no network, no method); ``smog_scale.__version__`` only.
"""

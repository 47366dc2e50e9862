"""The shard converter (``smog-make-shards``): input layouts, the worker pool and the shard writer.

Imports nothing outside ``data``.
"""

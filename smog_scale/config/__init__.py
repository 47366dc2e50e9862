"""Recipes: the schema, reading recipe files, coercion and validation, derived values and the startup checks.

May import ``data`` (crop records, shard manifests); nothing that trains or evaluates.
"""

"""Built-in labelled image sets, made without a download: the demo set and the 32-px digits.

Imports nothing outside ``data``.
"""

"""Shard lists, the converter's manifests, and the startup check of local shards.

A shard argument is a folder holding ``manifest.json`` (its shards, in listed order) or brace-expanded
URL patterns joined with ``::`` (local paths, ``file:``, ``http(s)://`` or ``pipe:`` commands).
Sample counts come from the manifest beside each local shard; remote shards have none.
"""

from __future__ import annotations

import json
import os
import tarfile
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlparse

from webdataset.shardlists import expand_urls

MANIFEST_NAME = "manifest.json"
_CHECK_THREADS = 16  # header reads in flight: on a network filesystem each one waits a round trip
# First bytes of the compressed streams webdataset reads as tar (gzip, bzip2, xz, zstd).
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")


class ShardError(OSError):
    """A shard that cannot be used; the message names it (``str`` is one line)."""


class ShardCheckError(ShardError, ValueError):
    """Local shards that are missing, empty or not tar files; the message lists them."""


def is_local(url: str) -> bool:
    return urlparse(url).scheme in ("", "file")


def local_path(url: str) -> str:
    """The filesystem path of a local shard URL (plain path or ``file:``)."""
    return urlparse(url).path if url.startswith("file:") else url


def _manifest_path(url: str) -> str:
    """``manifest.json`` beside a local shard."""
    if not is_local(url):
        raise ValueError(f"cannot locate {MANIFEST_NAME} for {url!r}: only local shards have one beside them")
    return os.path.join(os.path.dirname(local_path(url)), MANIFEST_NAME)


def _load_manifest(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {MANIFEST_NAME} at {path} (the converter, tools/make_shards.py, writes one)")
    with open(path) as f:
        return json.load(f)


def shard_urls(urls: str) -> list[str]:
    """The shard list of ``urls``: a folder holding ``manifest.json`` gives the shards it lists;
    anything else is brace-expanded (``::`` joins several patterns)."""
    if os.path.isdir(urls):
        folder = urls
        return [os.path.join(folder, s["name"]) for s in _load_manifest(os.path.join(folder, MANIFEST_NAME))["shards"]]
    return expand_urls(urls)


def _problem(path: str) -> str | None:
    """Why the local shard ``path`` cannot be read as a tar, or None: it exists, is not empty and
    starts with a valid tar header (or a compressed stream's magic number)."""
    try:
        with open(path, "rb") as f:
            head = f.read(tarfile.BLOCKSIZE)
    except FileNotFoundError:
        return "does not exist"
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    if not head:
        return "is empty (0 bytes)"
    if head.startswith(_COMPRESSED_MAGIC):
        return None
    try:
        tarfile.TarInfo.frombuf(head, tarfile.ENCODING, "surrogateescape")
    except tarfile.HeaderError as err:
        return f"is not a tar file ({err or type(err).__name__})"
    return None


def check_shards(urls: str) -> list[str]:
    """The shard list, after checking that every local shard exists, is not empty and starts with a
    tar header (one 512-byte read per shard, in parallel); raises ``ShardCheckError`` listing them."""
    url_list = shard_urls(urls)
    if not url_list:
        raise ShardCheckError(f"no shards in {urls!r}")
    local = [u for u in url_list if is_local(u)]
    with ThreadPoolExecutor(min(_CHECK_THREADS, max(1, len(local)))) as pool:
        problems = [(u, p) for u, p in zip(local, pool.map(_problem, map(local_path, local))) if p]
    if problems:
        shown = "; ".join(f"{u} {p}" for u, p in problems[:5])
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise ShardCheckError(f"{len(problems)} of {len(url_list)} shards of {urls!r} cannot be read: {shown}{more}")
    return url_list


def read_manifest(urls: str) -> dict[str, Any]:
    """The converter's manifest beside the first shard of ``urls`` (local paths only)."""
    return _load_manifest(_manifest_path(shard_urls(urls)[0]))


def sample_counts(url_list: list[str]) -> list[int]:
    """Samples in each shard of ``url_list``, from the manifests beside them."""
    counts, manifests = [], {}
    for url in url_list:
        path = _manifest_path(url)
        if path not in manifests:
            manifests[path] = {s["name"]: s["samples"] for s in _load_manifest(path)["shards"]}
        name = os.path.basename(local_path(url))
        if name not in manifests[path]:
            raise ValueError(f"shard {url!r} is not listed in {path}")
        counts.append(manifests[path][name])
    return counts


def count_samples(urls: str) -> int:
    """Samples in exactly the shards ``urls`` names, from the manifests beside them."""
    return sum(sample_counts(shard_urls(urls)))

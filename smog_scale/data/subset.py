"""The labelled subset of semi-supervised fine-tuning: listed from the shards, chosen, copied into shards of its own.

Semi-supervised fine-tuning (SimCLR's protocol, the paper's Table 4) trains on 1% or 10% of ImageNet's
training images with their labels. The subset is either drawn here, class-balanced with a seed
(:func:`balanced_subset`), or read from a file of image names, one per line, as SimCLR publishes its
1% and 10% lists (``n01440764_10026.JPEG``; :func:`subset_from_names`).

Finding a subset's samples in 1,024 training shards on every epoch would read all of ImageNet per
epoch, so :func:`write_subset_shards` copies the chosen JPEGs once into small shards with the
converter's manifest; the training loader then reads them like any shards. :func:`list_samples`
reads only the tar headers and the small ``.cls`` members of local shards, seeking over the images
(hand-written over ``tarfile``: webdataset's reader streams every image to learn its key).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tarfile
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import webdataset as wds
from tqdm.auto import tqdm

from smog_scale.data.shards import MANIFEST_NAME, check_shards

KEYS_NAME = "keys.txt"
MAX_SHARD_SAMPLES = 1000
_MIN_SHARDS = 64  # a subset of >= 64 samples gets >= 64 shards: enough to split over ranks x loader workers
_KEY_EXT = re.compile(r"((?:.*/|)[^./]+)\.([^/]*)")  # webdataset's sample key and extension of a member name


@dataclass(frozen=True)
class Sample:
    """A labelled training image and where its JPEG bytes lie."""

    key: str  # the shard's __key__, e.g. "n01440764/n01440764_10026"
    label: int
    shard: str  # local path of the tar shard
    offset: int  # of the JPEG bytes in the shard
    size: int


def _list_shard(path: str) -> list[Sample]:
    parts: dict[str, dict[str, Any]] = defaultdict(dict)
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                match = _KEY_EXT.fullmatch(member.name)
                if not member.isfile() or match is None:
                    continue
                key, ext = match.groups()
                if ext == "cls":
                    parts[key]["label"] = int(tar.extractfile(member).read())  # type: ignore[union-attr]
                elif ext == "jpg":
                    parts[key]["at"] = (member.offset_data, member.size)
    except (tarfile.TarError, ValueError, OSError) as err:
        raise ValueError(f"{path}: not a readable shard of labelled JPEGs: {err}") from err
    incomplete = [k for k, p in parts.items() if len(p) != 2]
    if incomplete:
        raise ValueError(f"{path}: sample {incomplete[0]!r} lacks a .jpg or a .cls member")
    return [Sample(key, p["label"], path, *p["at"]) for key, p in parts.items()]


def list_samples(urls: str, workers: int = 8, progress: bool = True) -> list[Sample]:
    """Every sample of the local shards ``urls``, sorted by key; raises naming a missing or unreadable shard
    and a key found twice."""
    paths = check_shards(urls)
    remote = [u for u in paths if urlparse(u).scheme not in ("", "file")]
    if remote:
        raise ValueError(f"{remote[0]}: the fine-tuning subset is copied out of local shards only")
    paths = [urlparse(p).path if p.startswith("file:") else p for p in paths]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        listed = list(tqdm(pool.map(_list_shard, paths), total=len(paths), desc="listing train shards",
                           unit="shard", disable=not progress, dynamic_ncols=True))
    samples = sorted((s for shard in listed for s in shard), key=lambda s: s.key)
    twice = [a.key for a, b in pairwise(samples) if a.key == b.key]
    if twice:
        raise ValueError(f"{urls}: key {twice[0]!r} is in the shards twice")
    return samples


def balanced_subset(samples: Sequence[Sample], fraction: float, classes: Sequence[str], seed: int) -> list[Sample]:
    """round(fraction x n_c) samples of every class c, drawn with ``seed`` (the same for the same shards).

    Raises if a class would get none, naming it and the fraction it needs.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"--fraction {fraction}: must be in (0, 1]")
    by_class: dict[int, list[Sample]] = defaultdict(list)
    for sample in sorted(samples, key=lambda s: s.key):  # the draw does not depend on the shards' order
        by_class[sample.label].append(sample)
    rng = np.random.default_rng(seed)
    chosen: list[Sample] = []
    for label, name in enumerate(classes):
        members = by_class.get(label, [])
        take = math.floor(fraction * len(members) + 0.5)
        if take == 0:
            need = f"; it needs --fraction >= {0.5 / len(members):.3g}" if members else ""
            raise ValueError(f"--fraction {fraction} leaves class {label} {name!r} ({len(members)} training "
                             f"samples) without a sample{need}")
        chosen += [members[i] for i in sorted(rng.choice(len(members), take, replace=False))]
    return chosen


def _stem(name: str) -> str:
    """The file name's stem with the converter's key rules: ``a/n0144_1.JPEG`` -> ``n0144_1``."""
    return os.path.splitext(name.rsplit("/", 1)[-1])[0].replace(".", "_")


def subset_from_names(samples: Sequence[Sample], names: Sequence[str], source: str) -> list[Sample]:
    """The samples named by ``names`` (lines of ``source``): a sample's key, or its file name as SimCLR's lists
    give it (the key's last part; the extension is ignored). Raises naming the first names not found."""
    by_key = {s.key: s for s in samples}
    by_stem: dict[str, list[Sample]] = defaultdict(list)
    for sample in samples:
        by_stem[_stem(sample.key)].append(sample)
    chosen, missing, seen = [], [], set()
    for name in (n.strip() for n in names):
        if not name or name.startswith("#"):
            continue
        found = [by_key[name]] if name in by_key else by_stem.get(_stem(name), [])
        if len(found) > 1:
            raise ValueError(f"{source}: {name!r} matches several samples: {[s.key for s in found[:3]]}")
        if not found:
            missing.append(name)
        elif found[0].key in seen:
            raise ValueError(f"{source}: {name!r} is listed twice")
        else:
            seen.add(found[0].key)
            chosen.append(found[0])
    if missing:
        raise ValueError(f"{source}: {len(missing)} of {len(missing) + len(chosen)} names are not in the training "
                         f"shards: {', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}")
    if not chosen:
        raise ValueError(f"{source}: names no sample")
    return sorted(chosen, key=lambda s: s.key)


def subset_digest(chosen: Sequence[Sample]) -> str:
    """sha256 of the sorted keys: names a subset in checkpoints and results."""
    return hashlib.sha256("\n".join(sorted(s.key for s in chosen)).encode()).hexdigest()


def write_subset_shards(chosen: Sequence[Sample], folder: Path, classes: Sequence[str], seed: int = 0,
                        progress: bool = True) -> dict[str, Any]:
    """Copy the chosen samples, in a seeded random order, into ``folder/subset-NNNNNN.tar`` with a manifest.

    A folder that already holds this subset (same digest) is kept as it is. The shards are written
    into ``folder.tmp`` and renamed, so an interrupted copy is never taken for a complete one.
    Returns the manifest (plus ``subset_sha256``).
    """
    digest = subset_digest(chosen)
    manifest_file = folder / MANIFEST_NAME
    if manifest_file.is_file():
        manifest = json.loads(manifest_file.read_text())
        if manifest.get("subset_sha256") == digest:
            return manifest
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    chosen = sorted(chosen, key=lambda s: s.key)  # the order depends on the subset alone, not on how it was chosen
    order = np.random.default_rng(seed).permutation(len(chosen))
    per_shard = min(MAX_SHARD_SAMPLES, math.ceil(len(chosen) / _MIN_SHARDS))
    entries = []
    bar = tqdm(total=len(chosen), desc="copying the subset", unit="image", disable=not progress, dynamic_ncols=True)
    for number, start in enumerate(range(0, len(chosen), per_shard)):
        name = f"subset-{number:06d}.tar"
        part = [chosen[i] for i in order[start:start + per_shard]]
        with wds.TarWriter(str(tmp / name)) as sink:
            for sample in part:
                with open(sample.shard, "rb") as f:
                    f.seek(sample.offset)
                    sink.write({"__key__": sample.key, "jpg": f.read(sample.size), "cls": sample.label})
                bar.update()
        entries.append({"name": name, "samples": len(part)})
    bar.close()
    (tmp / KEYS_NAME).write_text("".join(f"{s.key}\n" for s in chosen))
    manifest = {"format": 1, "shards": entries, "num_samples": len(chosen), "classes": list(classes),
                "subset_sha256": digest}
    (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return manifest

"""Checkpoints: Accelerate's state plus what SMoG owns, written atomically, loaded strictly.

Layout of ``<output_dir>/checkpoints/step_00001234/``: Accelerate's files (model weights as
safetensors, optimizer, per-rank RNG states), ``smog.safetensors`` (the groups G),
``cache_rank{r}.safetensors`` (each rank's feature cache, and its copy of G for auditing:
Accelerate writes registered objects from the main process only) and ``trainer_state.json`` (step, samples seen, counters, world size).
Everything is written into ``.tmp-step_...`` first and renamed when complete, so a crash during a
save never leaves a directory that looks complete; a write that fails (a full disk) removes the temp
directory and raises ``CheckpointError`` naming the newest complete checkpoint. Nothing is unpickled
on load: safetensors, JSON, and Accelerate's ``weights_only`` loads.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from smog_scale import dist
from smog_scale.feature_cache import FeatureCache
from smog_scale.grouping import GroupBank

PREFIX = "step_"


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temp directories of interrupted saves are ignored)."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def save(
    accelerator: Accelerator, output_dir: str | Path, step: int, bank: GroupBank, cache: FeatureCache,
    trainer_state: dict[str, Any], keep_last: int,
) -> Path:
    """Write checkpoint ``step`` on every rank (a collective: all ranks must call it)."""
    root = checkpoint_dir(output_dir)
    final, tmp = root / f"{PREFIX}{step:08d}", root / f".tmp-{PREFIX}{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        rank_state = {**cache.state_dict(), "groups": bank.groups}  # this rank's G too, to audit their equality
        save_file({k: v.detach().cpu().contiguous() for k, v in rank_state.items()},
                  str(tmp / f"cache_rank{accelerator.process_index}.safetensors"))
        if accelerator.is_main_process:
            save_file({"groups": bank.groups.detach().cpu().contiguous()}, str(tmp / "smog.safetensors"))
            state = dict(trainer_state, world_size=accelerator.num_processes)
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            _fsync_tree(tmp)
    except Exception as err:  # a full disk surfaces as torch's "unexpected pos", safetensors' IoError...
        raise _save_failed(output_dir, tmp, err) from err
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in complete_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


class CheckpointError(OSError):
    """A checkpoint could not be written; the complete checkpoints before it are untouched."""


def _save_failed(output_dir: str | Path, tmp: Path, err: Exception) -> CheckpointError:
    """Remove the partial save (it holds the space a full disk needs) and say what is left."""
    free = shutil.disk_usage(checkpoint_dir(output_dir)).free
    shutil.rmtree(tmp, ignore_errors=True)
    previous = complete_checkpoints(output_dir)
    return CheckpointError(
        f"writing checkpoint {tmp.name.removeprefix('.tmp-')} failed ({type(err).__name__}: {err}); "
        f"{free / 2**20:.2f} MiB were free under {checkpoint_dir(output_dir)}; the partial save was removed; "
        f"newest complete checkpoint: {previous[-1] if previous else 'none'} (untouched, resume from it)")


def _fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())


def resolve(resume: str, output_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: newest complete one for "auto", none for "never", else the path."""
    if resume == "never":
        return None
    if resume == "auto":
        found = complete_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"run.resume={resume!r} is not a complete checkpoint (no trainer_state.json)")
    return path


def load(accelerator: Accelerator, path: Path, bank: GroupBank, cache: FeatureCache) -> dict[str, Any]:
    """Restore everything ``save`` wrote; returns the trainer state. Raises on any mismatch."""
    state = json.loads((path / "trainer_state.json").read_text())
    state.setdefault("data_steps", state["global_step"])  # older checkpoints: every step consumed data and counted
    accelerator.load_state(str(path))
    bank.load_state_dict({k: v.to(bank.groups.device) for k, v in load_file(str(path / "smog.safetensors")).items()})
    _load_cache(path, cache, int(state["world_size"]))
    return state


def _load_cache(path: Path, cache: FeatureCache, saved_world: int) -> None:
    """Same world size: each rank takes its own file. Otherwise the union of all saved caches is
    dealt out round-robin in age order (oldest first, interleaved over the saved ranks), so no
    cached feature is lost or duplicated while the new caches can hold the union (elastic resume).
    When they cannot (fewer ranks, or a smaller ``cache_size``), the oldest rows go first, evenly
    over the saved ranks: ``push`` keeps the newest ``capacity`` rows of what it is dealt."""
    device = cache.feats.device
    if saved_world == dist.world_size():
        tensors = load_file(str(path / f"cache_rank{dist.rank()}.safetensors"))
        tensors.pop("groups")
        cache.load_state_dict({k: v.to(device) for k, v in tensors.items()})
        return
    feats, ids, ages = [], [], []
    for r in range(saved_world):
        tensors = load_file(str(path / f"cache_rank{r}.safetensors"))
        tensors.pop("groups")
        other = FeatureCache(*tensors["feats"].shape)
        other.load_state_dict(tensors)
        f, i = other.contents()
        feats.append(f)
        ids.append(i)
        ages.append(torch.arange(f.shape[0] - 1, -1, -1))  # rows written after it; 0: the newest
    order = torch.argsort(-torch.cat(ages), stable=True)  # oldest first; equal ages in saved-rank order
    mine = order[dist.rank()::dist.world_size()]
    cache.push(torch.cat(feats)[mine].to(device), torch.cat(ids)[mine].to(device))

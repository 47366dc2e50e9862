"""Checkpoints: Accelerate's state plus what SMoG owns, written atomically, checked and loaded strictly.

Layout of ``<output_dir>/checkpoints/step_00001234/``: Accelerate's files (model weights as
safetensors, optimizer, per-rank RNG states), ``smog.safetensors`` (the groups G and their update
counts), ``cache_rank{r}.safetensors`` (each rank's feature cache, and its copy of G for auditing:
Accelerate writes registered objects from the main process only), ``trainer_state.json`` (step,
samples seen, counters, world size) and ``config.yaml`` (the resolved recipe it was trained with).
Everything is written into ``.tmp-step_...`` first, fsynced, renamed when complete and the rename
fsynced, so neither a crash nor a power cut leaves a directory that looks complete; temp directories
of crashed saves are removed by the next save. A write that fails (a full disk) removes the temp
directory and raises ``CheckpointSaveError`` naming the newest complete checkpoint, on every rank: the
ranks learn each other's failures through an all-reduce, never wait at a barrier for a rank that
failed. Pruning keeps the newest ``keep_last`` and never deletes a checkpoint newer than the one
just written. Nothing is unpickled on load: safetensors, JSON, and Accelerate's ``weights_only`` loads.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from smog_scale import dist
from smog_scale.method.feature_cache import FeatureCache
from smog_scale.method.grouping import GroupBank

PREFIX = "step_"
TMP_PREFIX = ".tmp-"
RECIPE = "config.yaml"  # the resolved recipe, in the run folder and in every checkpoint


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temp directories of interrupted saves are ignored)."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def recipe_file(path: Path) -> Path:
    """The recipe checkpoint ``path`` was trained with: its own ``config.yaml``; for checkpoints written
    before they held one, the run folder's (``RUN/config.yaml``, two levels up)."""
    own = path / RECIPE
    return own if own.is_file() else path.parent.parent / RECIPE


def save(
    accelerator: Accelerator, output_dir: str | Path, step: int, bank: GroupBank, cache: FeatureCache,
    trainer_state: dict[str, Any], keep_last: int, recipe: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint ``step`` on every rank (a collective: all ranks must call it); ``recipe`` (the
    resolved config tree) is written beside it as ``config.yaml``."""
    root = checkpoint_dir(output_dir)
    final, tmp = root / f"{PREFIX}{step:08d}", root / f"{TMP_PREFIX}{PREFIX}{step:08d}"
    main = accelerator.is_main_process

    def write() -> None:
        accelerator.save_state(str(tmp))
        rank_state = {**cache.state_dict(), "groups": bank.groups}  # this rank's G too, to audit their equality
        save_file({k: v.detach().cpu().contiguous() for k, v in rank_state.items()},
                  str(tmp / f"cache_rank{accelerator.process_index}.safetensors"))
        if main:
            save_file({k: v.detach().cpu().contiguous() for k, v in bank.state_dict().items()},
                      str(tmp / "smog.safetensors"))
            state = dict(trainer_state, world_size=accelerator.num_processes)
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
            if recipe is not None:
                (tmp / RECIPE).write_text(yaml.safe_dump(recipe, sort_keys=False))

    try:
        _on_all_ranks(accelerator, lambda: _start(root, tmp) if main else None)
        _on_all_ranks(accelerator, write)
        _on_all_ranks(accelerator, lambda: _fsync_tree(tmp) if main else None)
        _on_all_ranks(accelerator, lambda: _publish(tmp, final, keep_last) if main else None)
    except Exception as err:  # a full disk surfaces as torch's "unexpected pos", safetensors' IoError...
        raise _save_failed(output_dir, tmp, err) from err
    return final


def _on_all_ranks(accelerator: Accelerator, action: Callable[[], None]) -> None:
    """Run ``action`` on this rank, then learn through an all-reduce (which also serves as the barrier)
    whether it failed on any rank; every rank raises if one did, so none is left waiting."""
    error = None
    try:
        action()
    except Exception as err:  # noqa: BLE001  (re-raised below, once every rank knows)
        error = err
    failed = int(dist.all_reduce_sum(torch.tensor([float(error is not None)], device=accelerator.device)).item())
    if error is not None:
        raise error
    if failed:
        raise CheckpointSaveError(f"failed on {failed} other rank(s) (their messages name the cause)")


def _start(root: Path, tmp: Path) -> None:
    """Main process: remove temp directories of crashed saves (the run folder's lock rules out a save in
    progress), then create this save's."""
    if root.is_dir():
        for stale in root.glob(f"{TMP_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir(parents=True)


def _publish(tmp: Path, final: Path, keep_last: int) -> None:
    """Main process: rename the complete save into place, make the rename durable, prune older ones."""
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    _fsync_dir(final.parent.parent)  # the run folder, in case checkpoints/ was created by this save
    older = [p for p in complete_checkpoints(final.parent.parent)[:-keep_last] if p.name < final.name]
    for old in older:
        shutil.rmtree(old, ignore_errors=True)


class CheckpointSaveError(OSError):
    """A checkpoint could not be written; the complete checkpoints before it are untouched."""


class UnreadableCheckpoint(ValueError):
    """A checkpoint whose files do not read (truncated, missing); the message names the file."""


def _save_failed(output_dir: str | Path, tmp: Path, err: Exception) -> CheckpointSaveError:
    """Remove the partial save (it holds the space a full disk needs) and say what is left."""
    existing = next(p for p in (checkpoint_dir(output_dir), *checkpoint_dir(output_dir).parents) if p.exists())
    free = shutil.disk_usage(existing).free
    shutil.rmtree(tmp, ignore_errors=True)
    previous = complete_checkpoints(output_dir)
    return CheckpointSaveError(
        f"writing checkpoint {tmp.name.removeprefix(TMP_PREFIX)} failed ({type(err).__name__}: {err}); "
        f"{free / 2**20:.2f} MiB were free under {existing}; the partial save was removed; "
        f"newest complete checkpoint: {previous[-1] if previous else 'none'} (untouched, resume from it)")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    """Files first, then every directory (their entries), deepest first."""
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
    for folder in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        _fsync_dir(folder)
    _fsync_dir(path)


def verify(path: Path) -> int:
    """Check that every file of checkpoint ``path`` reads as far as loading starts (safetensors headers
    against the file size, torch archives' directories, JSON, YAML); returns its step. Cheap: no tensor is
    read. Raises :class:`UnreadableCheckpoint` naming the first file that does not."""
    state_file = path / "trainer_state.json"
    try:
        state = json.loads(state_file.read_text())
        step, world = int(state["global_step"]), int(state["world_size"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UnreadableCheckpoint(f"{state_file}: {type(err).__name__}: {err}") from err
    required = ["smog.safetensors", *(f"cache_rank{r}.safetensors" for r in range(world))]
    if not (path / "pytorch_model").is_dir():  # DeepSpeed's folder replaces model.safetensors
        required.append("model.safetensors")
    missing = [name for name in required if not (path / name).is_file()]
    if missing:
        raise UnreadableCheckpoint(f"{path}: missing {', '.join(missing)}")
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        try:
            if file.suffix == ".safetensors":
                with safe_open(str(file), framework="pt"):
                    pass
            elif file.suffix in (".bin", ".pkl", ".pt"):  # torch.save's zip archives (optimizer, RNG, DeepSpeed)
                zipfile.ZipFile(file).close()
            elif file.suffix == ".yaml":
                yaml.safe_load(file.read_text())
        except (OSError, ValueError, SafetensorError, zipfile.BadZipFile, yaml.YAMLError) as err:
            raise UnreadableCheckpoint(f"{file}: {type(err).__name__}: {err}") from err
    return step


def load(accelerator: Accelerator, path: Path, bank: GroupBank, cache: FeatureCache) -> dict[str, Any]:
    """Restore everything ``save`` wrote; returns the trainer state. Raises on any mismatch."""
    state = json.loads((path / "trainer_state.json").read_text())
    state.setdefault("data_steps", state["global_step"])  # older checkpoints: every step consumed data and counted
    accelerator.load_state(str(path))
    saved = load_file(str(path / "smog.safetensors"))
    saved.setdefault("updates", torch.zeros_like(bank.updates))  # older checkpoints: G alone (no averaging rule then)
    bank.load_state_dict({k: v.to(bank.groups.device) for k, v in saved.items()})
    _load_cache(path, cache, int(state["world_size"]))
    return state


def _load_cache(path: Path, cache: FeatureCache, saved_world: int) -> None:
    """Same world size and cache size: each rank takes its own file. Otherwise the union of all saved
    caches is dealt out round-robin in age order (oldest first, interleaved over the saved ranks), so no
    cached feature is lost or duplicated while the new caches can hold the union (elastic resume).
    When they cannot (fewer ranks, or a smaller ``cache_size``), the oldest rows go first, evenly
    over the saved ranks: ``push`` keeps the newest ``capacity`` rows of what it is dealt."""
    device = cache.feats.device
    if saved_world == dist.world_size():
        tensors = load_file(str(path / f"cache_rank{dist.rank()}.safetensors"))
        tensors.pop("groups")
        if tensors["feats"].shape == cache.feats.shape:
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

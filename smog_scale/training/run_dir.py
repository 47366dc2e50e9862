"""One job per run folder, and a resume that continues the same run.

:func:`open_run` is the start of every launch: on every rank the preflight checks; on the main process
the run folder's lock (:class:`RunLock`), the resume decision (:func:`resume_point`), the compatibility
of the recipe with the checkpoint's, moving newer checkpoints aside (:func:`move_aside`) and
``RUN/config.yaml``. The ranks agree through one all-reduce before any work, so a refusal on any rank
ends every rank with exit 2 and none waits for another.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator

from smog_scale import dist
from smog_scale.config.derived import derive
from smog_scale.config.preflight import check_paths, resume_differences
from smog_scale.config.recipe_file import ConfigError
from smog_scale.config.schema import Config, Derived, dump, resolved
from smog_scale.training import checkpoint

LOCK_NAME = "job.lock"
HEARTBEAT_S = 15.0  # the holder refreshes the lock's mtime this often
STALE_AFTER_S = 120.0  # a lock whose mtime has not moved for this long belongs to a dead job
SUPERSEDED = "superseded-"  # RUN/checkpoints/superseded-<UTC time>/: checkpoints moved aside


class RefusedElsewhere(ConfigError):
    """Another rank refused the launch and printed why; this rank exits 2 quietly."""


class RunLock:
    """Exclusive hold of a run folder by one job, taken by its main process for the job's lifetime.

    The lock is ``RUN/job.lock`` (JSON: host, pid, start time, token), created with ``O_EXCL`` (atomic,
    also on NFS v3+) and removed on release; while held, a thread refreshes its mtime every
    ``heartbeat_s``. Staleness, after a crash that could not remove it: on the holder's own host (and pid
    namespace), a holder whose pid is gone is stale at once; otherwise a lock is stale once its mtime has not moved
    for ``stale_after_s``, measured on the file server's clock (the mtime of a file written now), so
    clock skew between nodes does not matter. A lock neither provably stale nor seen to move is watched
    (at most ``stale_after_s``, never forever): a live holder moves it within ``heartbeat_s``, and the
    newcomer is refused naming it. A stale lock is taken over.
    """

    def __init__(self, folder: Path, heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S):
        self.path, self.heartbeat_s, self.stale_after_s = folder / LOCK_NAME, heartbeat_s, stale_after_s
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex,
                   "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   "pid_namespace": _pid_namespace()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> str | None:
        """Take the lock or raise ConfigError naming the holder; returns a note when a stale lock was taken over."""
        note, watch = None, None
        while not self._create():
            holder, mtime = self._read(self.path)
            if holder is None:  # released meanwhile
                continue
            if watch is None:  # the first mtime seen, and the server's and the monotonic clock then
                watch = (mtime, self._server_now(), time.monotonic())
            verdict, why = self._judge(holder, mtime, watch)
            if verdict == "watch":
                time.sleep(min(1.0, self.heartbeat_s / 4))
            elif verdict == "live":
                raise ConfigError(f"run.output_dir: {self.path.parent} is in use by another job ({_who(holder)}); "
                                  f"one job per run folder. If that job is gone, its lock {self.path} turns stale "
                                  f"{self.stale_after_s:.0f} s after its last heartbeat (or delete it)")
            elif self._take_over(holder):
                note = f"took over the stale lock of a job that is gone ({_who(holder)}): {why}"
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()
        return note

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        holder, _ = self._read(self.path)
        if holder is not None and holder.get("token") == self.me["token"]:
            self.path.unlink(missing_ok=True)

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as handle:
            json.dump(self.me, handle)
        return True

    @staticmethod
    def _read(path: Path) -> tuple[dict[str, Any] | None, float]:
        """The holder (``{}`` while it is being written) and the lock's mtime; None if there is no lock."""
        try:
            mtime, text = path.stat().st_mtime, path.read_text()
        except FileNotFoundError:
            return None, 0.0
        try:
            return json.loads(text), mtime
        except ValueError:
            return {}, mtime

    def _judge(self, holder: dict[str, Any], mtime: float, watch: tuple[float, float, float]) -> tuple[str, str]:
        """("stale", why), ("live", "") or ("watch", ""): undecided until the heartbeat moves or ages out."""
        first_mtime, server_then, then = watch
        age = server_then + time.monotonic() - then - mtime
        if age >= self.stale_after_s:
            return "stale", f"no heartbeat for {age:.0f} s"
        if (holder.get("host"), holder.get("pid_namespace")) == (self.me["host"], self.me["pid_namespace"]):
            alive = _pid_alive(holder.get("pid"))
            return ("live", "") if alive else ("stale", f"pid {holder.get('pid')} is not running on this host")
        return ("live", "") if mtime != first_mtime else ("watch", "")

    def _server_now(self) -> float:
        """Now on the file server's clock: the mtime of a file written in the run folder."""
        probe = self.path.with_name(f".clock-{self.me['token']}")
        probe.write_bytes(b"")
        try:
            return probe.stat().st_mtime
        finally:
            probe.unlink()

    def _take_over(self, holder: dict[str, Any]) -> bool:
        """Move the stale lock aside; if another newcomer replaced it meanwhile, put theirs back."""
        aside = self.path.with_name(f".{LOCK_NAME}.stale-{self.me['token']}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        moved, _ = self._read(aside)
        if moved != holder:
            os.rename(aside, self.path)
            return False
        aside.unlink()
        return True

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            holder, _ = self._read(self.path)
            if holder is None or holder.get("token") != self.me["token"]:
                print(f"smog_scale: warning: lost the lock {self.path} (now {holder}); another job may write here")
                return
            with contextlib.suppress(OSError):  # a hiccup of a network filesystem; the next beat retries
                os.utime(self.path)


def _who(holder: dict[str, Any]) -> str:
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {holder.get('started', '?')}"


def _pid_namespace() -> str | None:
    """Two containers may share a host name but not their pids: pids are compared within one namespace only."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _pid_alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def resume_point(cfg: Config) -> tuple[Path | None, int, list[str]]:
    """The checkpoint this launch continues (None: a fresh start), its step, and notes on skipped ones.

    ``auto``: the newest checkpoint of the run folder whose files read (:func:`checkpoint.verify`); newer
    ones that do not are skipped with the reason. ``never``: none, refused on a folder that holds
    checkpoints unless ``run.overwrite``. A path: that checkpoint, which must read.
    """
    resume, existing = cfg.run.resume, checkpoint.complete_checkpoints(cfg.run.output_dir)
    if resume == "never":
        if existing and not cfg.run.overwrite:
            raise ConfigError(f"run.resume=never: {checkpoint.checkpoint_dir(cfg.run.output_dir)} holds "
                              f"{len(existing)} checkpoint(s), newest {existing[-1].name}; continue them with "
                              "run.resume=auto, or start over with run.overwrite=true (they are moved aside)")
        return None, 0, []
    if resume != "auto":
        try:
            return Path(resume), checkpoint.verify(Path(resume)), []
        except checkpoint.UnreadableCheckpoint as err:
            raise ConfigError(f"run.resume: {resume} is not a checkpoint that loads: {err}") from err
    skipped: list[str] = []
    for path in reversed(existing):
        try:
            return path, checkpoint.verify(path), skipped
        except checkpoint.UnreadableCheckpoint as err:
            skipped.append(f"checkpoint {path.name} skipped, it does not load: {err}")
    if skipped:
        raise ConfigError(f"run.resume=auto: no checkpoint of {cfg.run.output_dir} loads ({'; '.join(skipped)}); "
                          "resume from another with run.resume=PATH, or start over with run.resume=never "
                          "run.overwrite=true")
    return None, 0, []


def move_aside(output_dir: str | Path, step: int) -> str | None:
    """Move the checkpoints newer than ``step`` into ``RUN/checkpoints/superseded-<UTC time>/``, so that
    neither pruning nor a later ``auto`` resume mistakes them for this run's; returns a note if any moved."""
    newer = [p for p in checkpoint.complete_checkpoints(output_dir) if int(p.name[len(checkpoint.PREFIX):]) > step]
    if not newer:
        return None
    dest = checkpoint.checkpoint_dir(output_dir) / f"{SUPERSEDED}{datetime.now(timezone.utc):%Y%m%dT%H%M%S.%fZ}"
    dest.mkdir()
    for path in newer:
        os.replace(path, dest / path.name)
    return (f"moved {len(newer)} checkpoint(s) newer than step {step} ({', '.join(p.name for p in newer)}) to "
            f"{dest}: this run continues from step {step}; delete them when no longer needed")


def check_resume(cfg: Config, derived: Derived, path: Path) -> str | None:
    """Refuse to resume from checkpoint ``path`` with a recipe that differs from its own in a key that
    must not change (``ConfigError`` listing them). Returns a note when the checkpoint has no recipe."""
    source = checkpoint.recipe_file(path)
    if not source.is_file():
        return f"{path} holds no recipe ({source} missing): the resume's compatibility is not checked"
    saved = yaml.safe_load(source.read_text()) or {}
    differ = resume_differences(resolved(cfg, derived), saved)
    if differ:
        raise ConfigError(
            f"run.resume: {path} was trained with another recipe ({source}); these keys differ: "
            f"{'; '.join(differ)}. Resume with its values, or start a new run (another run.output_dir, or "
            f"run.resume=never run.overwrite=true)")
    return None


@dataclass
class Run:
    """What :func:`open_run` decided for this launch; ``close`` releases the run folder's lock."""

    derived: Derived
    resume_from: Path | None  # the same on every rank
    notes: list[str] = field(default_factory=list)  # main process: what to report in the run log
    lock: RunLock | None = None  # main process

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()


def _decide(cfg: Config, derived: Derived) -> tuple[Path | None, int, list[str | None]]:
    """Main process, holding the lock: the resume point and its step, checked against this recipe; newer
    checkpoints moved aside; the recipe written as ``RUN/config.yaml`` (only now: a refused resume keeps
    the run's own)."""
    path, step, skipped = resume_point(cfg)
    notes: list[str | None] = [*skipped]
    if path is not None:
        notes.append(check_resume(cfg, derived, path))
    notes.append(move_aside(cfg.run.output_dir, step))
    dump(cfg, Path(cfg.run.output_dir) / checkpoint.RECIPE, derived)
    return path, step, notes


def open_run(cfg: Config, accelerator: Accelerator) -> Run:
    """Check, lock and decide before any work (a collective); the main process holds the run folder's lock
    until ``Run.close`` (call it however the job ends). Raises ConfigError on every rank if any refused."""
    main = accelerator.is_main_process
    lock = RunLock(Path(cfg.run.output_dir)) if main else None
    error, derived, resume, step, locked = None, None, None, -1, False
    notes: list[str | None] = []
    try:
        derived = derive(cfg, accelerator.num_processes)
        check_paths(cfg)
        if lock is not None:
            notes.append(lock.acquire())
            locked = True
            resume, step, decided = _decide(cfg, derived)
            notes += decided
    except Exception as err:  # noqa: BLE001  (re-raised below, once every rank knows)
        error = err
    flags = [int(main and error is not None), int(not main and error is not None), step + 1 if resume else 0]
    main_failed, others_failed, chosen = dist.all_reduce_sum(
        torch.tensor(flags, dtype=torch.long, device=accelerator.device)).tolist()
    if error is not None or main_failed or others_failed or derived is None:
        if lock is not None and locked:
            lock.release()
        if error is not None and (main or not main_failed):
            raise error
        raise RefusedElsewhere("refused on another rank")
    if not main and chosen:
        resume = Path(cfg.run.resume) if cfg.run.resume != "auto" else \
            checkpoint.checkpoint_dir(cfg.run.output_dir) / f"{checkpoint.PREFIX}{chosen - 1:08d}"
    return Run(derived, resume, [n for n in notes if n], lock if locked else None)

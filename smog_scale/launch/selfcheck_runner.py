"""The self-check's runner: a data-driven list of checks run in order on every rank of a launch.

Each check returns its detail or raises ``Skipped`` / ``Failed``; a check that needs one that did not
pass is skipped; every rank ends with the same rows ``{"check", "ok", "seconds", "detail"}`` (``ok``:
true, false, or null when skipped). ``smog_scale/launch/selfcheck.py`` holds the checks themselves.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from accelerate import PartialState
from accelerate.utils import gather_object


class Skipped(Exception):
    """A check that cannot apply here; the message says why."""


class Failed(Exception):
    """A check whose outcome is wrong; the message says what was found."""


@dataclass(frozen=True)
class Check:
    """A row of the table: ``run`` returns the detail; ``needs``: checks that must pass first;
    ``main_only``: runs on the main process alone (the others take its result)."""

    name: str
    run: Callable[[Any], str]
    needs: tuple[str, ...] = ()
    main_only: bool = False


def _outcome(check: Check, ctx: Any) -> tuple[bool | None, str]:
    try:
        return True, check.run(ctx)
    except Skipped as err:
        return None, f"skipped: {err}"
    except Failed as err:
        return False, str(err)
    except Exception as err:  # noqa: BLE001  (a check that crashes is a failed check, not a traceback)
        lines = str(err).strip().splitlines()
        return False, f"{type(err).__name__}: {lines[-1] if lines else ''}"


def run_checks(ctx: Any, checks: tuple[Check, ...]) -> list[dict[str, Any]]:
    """Run ``checks`` in order on every rank; every rank returns the same rows."""
    rows: list[dict[str, Any]] = []
    passed: set[str] = set()
    for check in checks:
        start = time.perf_counter()
        missing = [name for name in check.needs if name not in passed]
        if missing:
            ok, detail = None, f"skipped: needs {', '.join(missing)}"
        elif check.main_only and not PartialState().is_main_process:
            ok, detail = True, ""
        else:
            ok, detail = _outcome(check, ctx)
        ranks = gather_object([(ok, detail)])  # every rank learns every rank's outcome
        failed = [(rank, text) for rank, (result, text) in enumerate(ranks) if result is False]
        ok, detail = ranks[0]
        if failed and not check.main_only:
            rank, text = failed[0]
            ok, detail = False, text if rank == 0 else f"rank {rank}: {text}"
        rows.append({"check": check.name, "ok": ok, "seconds": round(time.perf_counter() - start, 1),
                     "detail": detail})
        if ok:
            passed.add(check.name)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    marks = {True: "ok", False: "FAIL", None: "skip"}
    width = max(len(row["check"]) for row in rows)
    lines = [f"{'check':<{width}}  ok    seconds  detail"]
    lines += [f"{row['check']:<{width}}  {marks[row['ok']]:<4}  {row['seconds']:>7.1f}  {row['detail']}"
              for row in rows]
    return "\n".join(lines)

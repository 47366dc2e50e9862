"""``smog-launch``: ``accelerate launch`` under a supervisor that turns cluster pre-emption into a checkpoint.

    smog-launch [accelerate launch options] smog_scale/train.py RECIPE [dotted.key=value ...]

takes exactly ``accelerate launch``'s arguments (``python -m smog_scale.launch`` is the same command).
SLURM's warning (``#SBATCH --signal=USR1@300``) and its TERM (time limit, ``scancel``, pre-emption)
reach every process of a job step or only its top process, depending on the cluster's process
tracking. Under plain ``accelerate launch`` neither works: torchrun's agent has no USR1 handler, so it
dies of the signal (exit 138, or orphaned trainers that keep training when only it was signalled), and
on TERM it kills the trainers 30 s after forwarding the signal. Under this supervisor:

- the launcher and torchrun's agent ignore USR1 and TERM: they start with both set to SIG_IGN, which
  survives exec, and torchrun is told to handle only SIGINT, SIGHUP and SIGQUIT
  (``PET_SIGNALS_TO_HANDLE``). The trainer installs its own handlers (``signal.signal`` overrides an
  inherited SIG_IGN); its loader workers ignore both;
- a USR1 or TERM sent to the supervisor is forwarded to every trainer (the launcher's child processes)
  as soon as the trainer has its handler installed;
- the trainers finish their step, save, exit 0, and the supervisor exits with the launcher's code.

So the job saves and exits 0 whichever processes the signal reaches. What bounds a save is then
SLURM alone: the time between the warning and the limit (``--signal=USR1@SECONDS``), or after a TERM
the cluster's ``KillWait`` / pre-emption ``GraceTime`` before SIGKILL. Ctrl-C (SIGINT) is left to the
launcher: the supervisor ignores it and waits.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from types import FrameType

import psutil

PREEMPTION_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
# torchrun's default is SIGTERM,SIGINT,SIGHUP,SIGQUIT: without SIGTERM the agent keeps the inherited SIG_IGN.
TORCHRUN_SIGNALS = "SIGINT,SIGHUP,SIGQUIT"


def catches(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler installed for ``signum`` (Linux: ``SigCgt`` in
    ``/proc/PID/status``). Where that cannot be read, assume it has."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    except OSError:
        pass
    return True


class Supervisor:
    """The launcher process and the trainers a pre-emption signal has been forwarded to."""

    def __init__(self, launcher_args: list[str]) -> None:
        self.received: int | None = None  # the pre-emption signal, once one arrived
        self.forwarded: set[int] = set()
        for signum in PREEMPTION_SIGNALS:  # SIG_IGN while the launcher starts: it inherits that across exec
            signal.signal(signum, signal.SIG_IGN)
        env = dict(os.environ, PET_SIGNALS_TO_HANDLE=TORCHRUN_SIGNALS)
        self.launcher = subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", *launcher_args],
                                         env=env)
        for signum in PREEMPTION_SIGNALS:
            signal.signal(signum, self._on_signal)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the launcher's group; it shuts down

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.received = signum

    def forward(self, signum: int) -> None:
        """Send ``signum`` to each trainer that catches it and has not had it yet."""
        try:
            trainers = psutil.Process(self.launcher.pid).children()
        except psutil.NoSuchProcess:
            return
        sent = [p.pid for p in trainers if p.pid not in self.forwarded and catches(p.pid, signum)]
        for pid in sent:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                continue
            self.forwarded.add(pid)
        if sent:
            print(f"smog-launch: {signal.Signals(signum).name}: forwarded to trainer pid(s) "
                  f"{', '.join(map(str, sent))}; they save at the end of their step and exit", file=sys.stderr)

    def wait(self, poll_s: float = 0.5) -> int:
        """Wait for the launcher, forwarding any pre-emption signal; its exit code (128 + N if killed by N)."""
        while True:
            try:
                code = self.launcher.wait(timeout=poll_s)
                return code if code >= 0 else 128 - code
            except subprocess.TimeoutExpired:
                if self.received is not None:
                    self.forward(self.received)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if args else 2
    return Supervisor(args).wait()


if __name__ == "__main__":
    sys.exit(main())

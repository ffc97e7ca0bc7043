"""The Ray watchdog: no process of an embedded Ray outlives the service that started it.

``ray.init()`` starts Ray's processes (gcs, raylet, dashboard and runtime-env agents, log
monitor, workers) as the service's descendants. When the service is killed (SIGKILL, OOM
killer), some of them notice the loss of their parent and exit, others (the agents) keep
running. The watchdog is a small separate process (``python -m ferrytune.service._watchdog
PID``) that the service starts just before its embedded Ray: it records the service's
descendants started after itself every ``POLL_S`` (from ``/proc``, with their start
times, so a reused pid is never touched), and when its stdin closes without a ``stop``
line (the service died: its end of the pipe closed with it), it sends SIGTERM to every
recorded descendant that is still alive, then SIGKILL after ``GRACE_S``. On a clean stop
the service shuts Ray down itself and writes ``stop``; the watchdog then just exits.

Linux only (``/proc``); elsewhere :func:`start_watchdog` returns None.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["Watchdog", "start_watchdog"]

POLL_S = 0.5
GRACE_S = 2.0


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, start time in clock ticks), from /proc."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) "
        table[int(entry.name)] = (int(fields[1]), int(fields[19]))
    return table


def _descendants(root: int, table: dict[int, tuple[int, int]]) -> dict[int, int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, stack = {}, list(children.get(root, []))
    while stack:
        pid = stack.pop()
        out[pid] = table[pid][1]
        stack.extend(children.get(pid, []))
    return out


def _sweep(recorded: dict[int, int], grace_s: float) -> list[int]:
    """SIGTERM, then SIGKILL, the recorded processes that are still the same processes."""
    def alive() -> list[int]:
        table = _proc_table()
        return [pid for pid, start in recorded.items() if table.get(pid, (0, -1))[1] == start]

    targets = alive()
    for pid in targets:
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and alive():
        time.sleep(0.1)
    for pid in alive():
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return targets


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parent = int(argv[0])
    me = os.getpid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the service's to handle; we wait for it
    recorded: dict[int, int] = {}
    stdin = sys.stdin.buffer
    born = _proc_table().get(me, (0, 0))[1]
    while True:
        table = _proc_table()
        if parent in table:
            recorded.update({pid: start for pid, start in _descendants(parent, table).items()
                             if pid != me and start >= born})  # Ray's, not what the service ran before
        ready, _, _ = select.select([stdin], [], [], POLL_S)
        if ready:
            if stdin.readline():  # "stop": a clean shutdown, Ray already stopped by the service
                return 0
            _sweep(recorded, GRACE_S)  # EOF: the service is gone
            return 0


class Watchdog:
    """The service's handle on its watchdog process."""

    def __init__(self, proc: subprocess.Popen):
        self._proc = proc

    def stop(self, timeout_s: float = 10.0) -> None:
        """Tell it the stop is clean, and wait for it to exit."""
        if self._proc.poll() is None:
            try:
                self._proc.stdin.write(b"stop\n")
                self._proc.stdin.flush()
            except OSError:
                pass
        try:
            self._proc.stdin.close()
        except OSError:
            pass
        try:
            self._proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


def start_watchdog() -> Watchdog | None:
    """Start the watchdog of this process's descendants (Linux); None where there is no /proc."""
    if not Path("/proc/self/stat").exists():
        return None
    proc = subprocess.Popen([sys.executable, "-m", "ferrytune.service._watchdog", str(os.getpid())],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, close_fds=True,
                            start_new_session=True)  # not in our process group: a Ctrl-C is not its own
    return Watchdog(proc)


if __name__ == "__main__":
    sys.exit(main())

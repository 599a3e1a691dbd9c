"""A Ray that chunbot started ends with its driver, kill -9 included.

Ray's GCS and raylet die with their parent, the driver, but nothing then tells the
workers: they go on sending requests whose replies nobody keeps (measured: 1,413 in the
0.3 s after a kill -9), and Ray's agents stay for good. So the driver starts a watchdog
process (`guard`) holding one end of a pipe only the driver has the other end of; the
kernel closes it however the driver ends, and the watchdog (`watch`) then kills every
process of that Ray session that is left (`sweep`). Linux only: it reads /proc. A Ray the
run only joined (`--ray-address`) is not this run's to end: Ray ends a dead driver's
workers there itself.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

WATCH_S = 0.5  # how often the watchdog looks whether the Ray it guards still runs
SWEEP_ROUNDS, SWEEP_S = 40, 0.05  # it ends that Ray's processes within about 2 s


_watchdogs: list[subprocess.Popen] = []  # their pipes, held open while this process lives


def guard(ray: Any) -> None:
    """Start a watchdog (watch()) for the Ray this process has just started: Ray's GCS
    and raylet die with their parent, this process, but nothing then tells the workers —
    they go on sending requests whose replies nobody keeps (measured: 1,413 in the 0.3 s
    after a kill -9) — and its agents stay for good. Linux only (it reads /proc)."""
    node = getattr(ray._private.worker, "_global_node", None)
    raylets = node.all_processes.get("raylet") if node is not None else None
    if not raylets or not sys.platform.startswith("linux"):
        return  # a Ray that was running already (RAY_ADDRESS): not this run's to end
    paths = os.pathsep.join(p for p in sys.path if p)  # chunbot and Ray, as imported here
    watchdog = subprocess.Popen(
        [sys.executable, "-c", "from chunbot_cli.raywatch import watch; watch()",
         node.get_session_dir_path(), str(raylets[0].process.pid), str(os.getpid()),
         os.path.dirname(ray.__file__)],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,  # not stopped by the Ctrl-C meant for this process
        env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": paths})  # and no keys
    _watchdogs.append(watchdog)
    threading.Thread(target=_reap, args=(watchdog,), daemon=True,
                     name="chunbot-ray-watchdog").start()


def _reap(watchdog: subprocess.Popen) -> None:
    """Once the watchdog has ended (its Ray is gone), let it go: no zombie, no pipe left."""
    watchdog.wait()
    _watchdogs.remove(watchdog)
    if watchdog.stdin is not None:
        watchdog.stdin.close()


def watch() -> None:
    """The watchdog process: wait until the driver is gone (its end of the pipe on stdin
    closes, which the kernel does however the driver ends) or its Ray has stopped (the
    run shut it down); then end every process of that Ray that is left."""
    session, raylet, driver, ray_dir = sys.argv[1:5]
    while _runs(int(raylet), session):  # as long as the run's Ray does
        if select.select([sys.stdin], [], [], WATCH_S)[0]:
            break  # nothing is ever written: readable means closed
    sweep(session, ray_dir, spare={os.getpid(), int(driver)})


def _runs(pid: int, session: str) -> bool:
    try:
        return session in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def sweep(session: str, ray_dir: str, spare: set[int]) -> int:
    """SIGKILL every process of the Ray session `session` (a folder) but `spare`, until
    none is left (about 2 s at most); returns how many there were."""
    killed: set[int] = set()
    for round_ in range(SWEEP_ROUNDS):
        found = [pid for pid in session_processes(session, ray_dir) if pid not in spare]
        for pid in found:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        killed.update(found)
        if not found and round_ > 0:  # once more after the last: one being started then
            break
        time.sleep(SWEEP_S)
    return len(killed)


def session_processes(session: str, ray_dir: str) -> Iterator[int]:
    """The live processes of a Ray session: Ray's programs (a `ray::` title, or a file of
    the Ray package `ray_dir` on the command line) with a file open in the session's
    folder — every one of them keeps its logs there; a `tail -f` of them is no Ray's."""
    inside, package = session.rstrip("/") + "/", ray_dir.rstrip("/").encode() + b"/"
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            argv = Path(entry.path, "cmdline").read_bytes().split(b"\0")
            if not (argv[0].startswith(b"ray::") or any(a.startswith(package) for a in argv)):
                continue
            fds = os.listdir(Path(entry.path, "fd"))
        except OSError:  # gone meanwhile, or not ours to look into
            continue
        for fd in fds:
            try:
                if os.readlink(Path(entry.path, "fd", fd)).startswith(inside):
                    yield int(entry.name)
                    break
            except OSError:
                continue

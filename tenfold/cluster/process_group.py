"""Stopping a replica's engine with everything it started: each replica runs its `tenfold serve` in a session (process
group) of its own, so that the group holds the server, its engine core and workers. The server gets SIGTERM first (it
drains and stops its engine); whatever of the group is left after the grace period gets SIGKILL."""

from __future__ import annotations

import os
import signal
import time

import psutil

KILL_WAIT_SECONDS = 10.0  # SIGKILL is not refused: this only bounds how long a stop waits for the kernel


def members(pgid: int) -> list[int]:
    """The live processes of group `pgid` (zombies waiting for their parent to reap them are not running)."""
    alive = []
    for process in psutil.process_iter(["status"]):
        try:
            if os.getpgid(process.pid) == pgid and process.info["status"] != psutil.STATUS_ZOMBIE:
                alive.append(process.pid)
        except (ProcessLookupError, PermissionError):
            continue
    return alive


def stop_group(pgid: int, grace_seconds: float) -> bool:
    """SIGTERM to the group's leader (to the whole group when the leader is gone), SIGKILL to the group after
    `grace_seconds`; True once no process of the group runs."""
    try:
        if pgid in members(pgid):
            os.kill(pgid, signal.SIGTERM)  # the server drains and stops its engine
        else:
            os.killpg(pgid, signal.SIGTERM)
        if _emptied(pgid, grace_seconds):
            return True
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return True
    return _emptied(pgid, KILL_WAIT_SECONDS)


def _emptied(pgid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while members(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True

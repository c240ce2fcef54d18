"""No engine process outlives its parent: a process that vLLM starts (engine core, workers) stops itself when the
process that started it is gone, e.g. a `tenfold serve` killed with SIGKILL.

The plugin's register() calls `install()` in every vLLM process. A multiprocessing child watches its parent: a
spawned child from register() (vLLM loads plugins in the fresh interpreter), a forked child from multiprocessing's
after-fork hook (the fork copies the parent's already-registered plugin, so register() does not run again). A process
started otherwise watches the pid named by TENFOLD_EXIT_WITH_PARENT (a cluster replica starts its `tenfold serve` so);
one without it, e.g. a `tenfold serve` run under nohup, never stops with its parent.

The watch polls the parent pid from a daemon thread rather than using prctl(PR_SET_PDEATHSIG), which fires when the
*thread* that started the child exits, not the process. A child whose parent is gone gets SIGTERM (vLLM shuts down
in order), then SIGKILL if it is still running after STOP_GRACE_SECONDS.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.util
import os
import signal
import sys
import threading
import time

ENV = "TENFOLD_EXIT_WITH_PARENT"  # a parent pid; read once, then removed so that its own children watch their parent
POLL_SECONDS = 1.0
STOP_GRACE_SECONDS = 30.0

_watching_in: int | None = None  # the pid of the process whose watch runs (a fork copies this, not the thread)
_hook_installed = False


def install() -> None:
    """Watch this process's parent where it must not be outlived; hook multiprocessing's forks to do the same."""
    global _hook_installed
    if not _hook_installed:  # fork copies both the flag and the hook into the child
        multiprocessing.util.register_after_fork(_after_fork, _after_fork_in_child)
        _hook_installed = True
    parent = multiprocessing.parent_process()
    named = os.environ.pop(ENV, None)
    if parent is not None:
        exit_with_parent(parent.pid)
    elif named:
        exit_with_parent(int(named))


def exit_with_parent(parent_pid: int) -> None:
    """Stop this process once `parent_pid` is no longer its parent (started at most once per process)."""
    global _watching_in
    if _watching_in == os.getpid():
        return
    _watching_in = os.getpid()
    threading.Thread(target=_watch, args=(parent_pid,), name="tenfold-parent-watch", daemon=True).start()


def _watch(parent_pid: int) -> None:
    while os.getppid() == parent_pid:  # an orphan is re-parented to init or a subreaper: its parent pid changes
        time.sleep(POLL_SECONDS)
    print(f"tenfold: parent process {parent_pid} is gone; stopping process {os.getpid()}", file=sys.stderr,
          flush=True)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(STOP_GRACE_SECONDS)
    os.kill(os.getpid(), signal.SIGKILL)


class _AfterFork:
    """What multiprocessing's after-fork registry holds a weak reference to."""


_after_fork = _AfterFork()


def _after_fork_in_child(_) -> None:
    parent = multiprocessing.parent_process()
    if parent is not None:
        exit_with_parent(parent.pid)

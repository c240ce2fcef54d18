"""Stopping a replica's engine process group (cluster/process_group.py), without Ray: every process of the group
stops, one that ignores SIGTERM by SIGKILL after the grace period, also when the group's leader is already gone
(a `tenfold serve` killed with SIGKILL whose engine is still running)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

pytest.importorskip("psutil")

from serve_process import gone  # noqa: E402
from tenfold.cluster.process_group import members, stop_group  # noqa: E402

# a server that starts an engine child in its group; both ignore SIGTERM (a hung drain)
LEADER = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
engine = subprocess.Popen([sys.executable, "-c",
                           "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
print(engine.pid, flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("leader_alive", [True, False])
def test_stopping_a_group_stops_every_process_in_it(leader_alive):
    leader = subprocess.Popen([sys.executable, "-c", LEADER], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    engine = int(leader.stdout.readline())
    try:
        assert sorted(members(leader.pid)) == sorted([leader.pid, engine])
        if not leader_alive:
            leader.kill()
            leader.wait()
        assert stop_group(leader.pid, grace_seconds=1.0)
        leader.wait(timeout=30)
        assert gone(engine) and members(leader.pid) == []
    finally:
        for pid in (leader.pid, engine):
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)

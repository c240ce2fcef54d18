"""The parent-death guard (engine/parent_watch.py), without vLLM or Ray: a process that vLLM would start stops by itself
when its parent is killed with SIGKILL (forked and spawned multiprocessing children, and a process told its parent's
pid through the environment, as a cluster replica starts `tenfold serve`); a top-level process does not watch its
parent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

psutil = pytest.importorskip("psutil")

from serve_process import gone, wait_gone  # noqa: E402
from tenfold.engine.parent_watch import ENV, POLL_SECONDS, STOP_GRACE_SECONDS  # noqa: E402

EXIT_WAIT_SECONDS = 10 * POLL_SECONDS + STOP_GRACE_SECONDS  # bounds a failure, never a pass

PARENT = """
import multiprocessing, os, subprocess, sys, time
from tenfold.engine import parent_watch

def engine(install):
    if install:  # what register() does when vLLM loads the plugin in a spawned interpreter
        parent_watch.install()
    time.sleep(600)

if __name__ == "__main__":
    how = sys.argv[1]
    parent_watch.install()  # register() in the parent (`tenfold serve`), before it starts its engine
    if how in ("fork", "spawn"):
        child = multiprocessing.get_context(how).Process(target=engine, args=(how == "spawn",))
        child.start()
    else:  # a process started with the parent's pid in the environment, as a replica starts `tenfold serve`
        code = "from tenfold.engine import parent_watch; parent_watch.install(); import time; time.sleep(600)"
        child = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, parent_watch.ENV: str(os.getpid())})
    print(child.pid, flush=True)
    time.sleep(600)
"""


@pytest.mark.parametrize("how", ["fork", "spawn", "environment"])
def test_a_child_stops_when_its_parent_is_killed(tmp_path, how):
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop(ENV, None)
    parent = subprocess.Popen([sys.executable, str(script), how], stdout=subprocess.PIPE, text=True, env=env)
    child = None
    try:
        child = int(parent.stdout.readline())
        assert psutil.Process(child).ppid() == parent.pid
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert not wait_gone([child], EXIT_WAIT_SECONDS), f"the {how} child {child} outlived its parent"
    finally:
        parent.kill()
        parent.wait()
        if child is not None and not gone(child):
            os.kill(child, signal.SIGKILL)


def test_a_top_level_process_does_not_watch_its_parent():
    """`tenfold serve` under nohup must outlive the shell that started it: no watch without a multiprocessing parent
    or the environment variable."""
    code = textwrap.dedent("""
        import json, threading
        from tenfold.engine import parent_watch
        parent_watch.install()
        print(json.dumps([t.name for t in threading.enumerate()]))
    """)
    env = {k: v for k, v in os.environ.items() if k != ENV}
    threads = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                                        check=True).stdout)
    assert threads == ["MainThread"]

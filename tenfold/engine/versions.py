"""Adapter versions in flight: what makes unload, reload, rewrite and eviction safe under traffic.

The rules (README, "Adapter lifecycle under traffic"):
- A request is admitted with the adapter version on disk at that moment. Admission copies that version into an
  immutable snapshot (once per version) and binds it to an engine-side id of its own; the workers only ever read
  snapshots, so a host-cache eviction, a rewrite of the user's files or their deletion cannot change or break the
  weights of a request already admitted.
- A rewritten adapter (new file fingerprint under a loaded name) is a new version with a new engine id; requests
  admitted before the rewrite finish on the old version.
- Unloading a name retires its versions: new requests no longer see the name at once (vLLM forgets it), requests
  already admitted finish on their version, and a retired version's worker slot, host copy and snapshot are freed
  when its last request ends (at once when none is in flight).

Disk: snapshots live under one directory per table (`tenfold-adapter-versions-<pid>-*` in the temporary directory),
removed by `close`, when the table is collected, or when the interpreter exits (a SIGTERM'd `tenfold serve` exits
normally); directories of processes that are gone are removed when the next table starts. A snapshot lives while its
version is the current one of a registered adapter or has requests in flight.

Refusals: a version that failed validation is remembered (`REFUSALS` of them), so a flood of requests for one bad
adapter costs one copy and one check.

Ids: the front end (vLLM's OpenAI server, tenfold serve, or an offline user) names adapters with "user ids"; this
module gives each (user id, version) an engine id from its own range, so versions never share a worker slot.
Thread-safe: admission runs off the event loop (it reads files); the output processor reports request ends.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..adapters.checkpoint import BIN_NAME, CONFIG_NAME, SAFETENSORS_NAME, max_adapter_bytes

ADAPTER_FILES = (CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME)
ENGINE_ID_BASE = 1 << 30  # vLLM's own counter starts at 1: engine ids never collide with user ids
SNAPSHOT_ATTEMPTS = 20  # a copy taken while the files were being rewritten is retried
SNAPSHOT_RETRY_SECONDS = 0.05
ROOT_PREFIX = "tenfold-adapter-versions-"
REFUSALS = 4096  # refused versions remembered per table


@dataclass
class Version:
    engine_id: int
    user_id: int
    fingerprint: str
    snapshot: Path
    users: int = 0  # requests in flight plus admissions not yet handed to the engine
    retired: bool = False
    freed: bool = field(default=False, repr=False)


class AdapterVersions:
    """One per engine client (AsyncLLM / LLMEngine). `on_freeable(versions)` is called (from any thread) with
    retired versions nobody uses any more; the caller removes them from the engine and then calls `discard`."""

    def __init__(self, validate: Callable[[Path], None], on_freeable: Callable[[list[Version]], None]):
        self._validate = validate
        self._on_freeable = on_freeable
        self._lock = threading.Lock()
        self._current: dict[int, Version] = {}  # user id -> its version for new requests
        self._versions: dict[int, Version] = {}  # engine id -> version
        self._requests: dict[str, int] = {}  # engine request id -> engine id
        self._retired_users: set[int] = set()
        self._engine_ids = itertools.count(ENGINE_ID_BASE)
        self._admission_locks: dict[int, threading.Lock] = {}
        self._refused: OrderedDict[tuple[Path, str], Exception] = OrderedDict()  # (source, fingerprint) -> error
        remove_stale_roots()
        self.root = Path(tempfile.mkdtemp(prefix=f"{ROOT_PREFIX}{os.getpid()}-"))
        # removes the snapshots when the table is closed, collected, or the interpreter exits
        self._removal = weakref.finalize(self, shutil.rmtree, str(self.root), True)

    # --- admission -------------------------------------------------------------------------------------------------
    def admit(self, lora_request, reserve: bool = True):
        """The engine-bound LoRARequest for `lora_request` (a user request): its current version's engine id and
        snapshot path. With `reserve`, the version counts one more user until `release()`; raises FileNotFoundError
        or AdapterError (from validation) when the adapter cannot be served."""
        import msgspec
        from vllm.lora.utils import get_adapter_absolute_path

        from ..adapters.checkpoint import fingerprint

        source = Path(get_adapter_absolute_path(lora_request.lora_path)).resolve()
        if not source.is_dir():
            raise FileNotFoundError(f"adapter directory {source} does not exist")
        user_id = lora_request.lora_int_id
        version = self._reuse(user_id, fingerprint(source), reserve)
        if version is not None:
            return _bound(msgspec, lora_request, version)
        with self._user_lock(user_id):  # one snapshot per new version, however many requests arrive at once
            version_now = fingerprint(source)
            self._raise_if_refused(source, version_now)
            version = self._reuse(user_id, version_now, reserve)
            if version is not None:  # bound by the admission this one waited for
                return _bound(msgspec, lora_request, version)
            engine_id = next(self._engine_ids)
            snapshot, version_now = self._snapshot(source, engine_id)
            version = self._reuse(user_id, version_now, reserve)
            if version is not None:  # the files went back to a version already bound
                shutil.rmtree(snapshot, ignore_errors=True)
                return _bound(msgspec, lora_request, version)
            freeable = []
            with self._lock:
                version = Version(engine_id, user_id, version_now, snapshot, users=int(reserve))
                self._versions[engine_id] = version
                current = self._current.get(user_id)
                if current is not None:
                    freeable += self._retire(current)
                # a request resolved just before its name was unloaded is served, then its version is freed
                version.retired = user_id in self._retired_users
                self._current[user_id] = version
        self._notify(freeable)
        return _bound(msgspec, lora_request, version)

    def _reuse(self, user_id: int, version_now: str, reserve: bool) -> Version | None:
        with self._lock:
            current = self._current.get(user_id)
            if current is None or current.fingerprint != version_now or current.freed:
                return None
            current.users += reserve
            return current

    def _user_lock(self, user_id: int) -> threading.Lock:
        with self._lock:
            return self._admission_locks.setdefault(user_id, threading.Lock())

    def _raise_if_refused(self, source: Path, version: str) -> None:
        with self._lock:
            error = self._refused.get((source, version))
        if error is not None:
            raise type(error)(str(error))

    def refusal_of(self, source) -> Exception | None:
        """Why the version now at `source` was refused, if it was (no read of the files)."""
        from ..adapters.checkpoint import fingerprint

        source = Path(source).resolve()
        try:
            version = fingerprint(source)
        except OSError:
            return None
        with self._lock:
            return self._refused.get((source, version))

    def _refuse(self, source: Path, version: str, error: Exception) -> None:
        with self._lock:
            self._refused[(source, version)] = error
            while len(self._refused) > REFUSALS:
                self._refused.popitem(last=False)

    def _snapshot(self, source: Path, engine_id: int) -> tuple[Path, str]:
        """A validated copy of the version now on disk, taken when the files did not change during the copy."""
        from ..adapters import AdapterError
        from ..adapters.checkpoint import fingerprint
        from .loader import note_snapshot

        target = self.root / f"{engine_id}-{source.name}"
        for _ in range(SNAPSHOT_ATTEMPTS):
            before = fingerprint(source)
            staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.root))
            try:
                for name in ADAPTER_FILES:  # what the readers read: not logs or optimizer states beside them
                    item = source / name
                    if item.is_file():
                        if item.stat().st_size > max_adapter_bytes():
                            self._validate(source)  # refuses it (size limit) without copying it first
                        shutil.copy2(item, staging / name)
                unchanged = fingerprint(source) == before
            except FileNotFoundError:  # a file replaced during the copy
                unchanged = False
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            if not unchanged:
                shutil.rmtree(staging, ignore_errors=True)
                time.sleep(SNAPSHOT_RETRY_SECONDS)
                continue
            staging.rename(target)
            note_snapshot(target, source, before)
            try:
                self._validate(target)
            except Exception as e:
                shutil.rmtree(target, ignore_errors=True)
                if fingerprint(source) != before:  # caught between two files of a rewrite: read it again
                    time.sleep(SNAPSHOT_RETRY_SECONDS)
                    continue
                if str(target) in str(e):  # name the user's directory, not the snapshot
                    e = type(e)(str(e).replace(str(target), str(source)))
                if isinstance(e, AdapterError):
                    self._refuse(source, before, e)
                raise e from None
            return target, before
        raise RuntimeError(f"adapter files under {source} kept changing while being read; try again")

    # --- request accounting ----------------------------------------------------------------------------------------
    def release(self, engine_id: int) -> None:
        """Ends one reservation made by `admit(reserve=True)`."""
        self._drop_user(engine_id)

    def started(self, request_id: str, engine_id: int) -> None:
        with self._lock:
            version = self._versions.get(engine_id)
            if version is None or request_id in self._requests:
                return
            version.users += 1
            self._requests[request_id] = engine_id

    def ended(self, request_id: str) -> None:
        with self._lock:
            engine_id = self._requests.pop(request_id, None)
        if engine_id is not None:
            self._drop_user(engine_id)

    def _drop_user(self, engine_id: int) -> None:
        with self._lock:
            version = self._versions.get(engine_id)
            if version is None:
                return
            version.users -= 1
            freeable = self._freeable(version)
        self._notify(freeable)

    # --- retirement ------------------------------------------------------------------------------------------------
    def retire_user(self, user_id: int) -> tuple[bool, list[Version]]:
        """The user id was unloaded: its versions serve only requests already admitted. Returns whether it had
        any, and the versions free now (nobody uses them), which the caller removes from the engine."""
        with self._lock:
            self._retired_users.add(user_id)
            mine = [v for v in self._versions.values() if v.user_id == user_id]
            freeable = []
            for version in mine:
                freeable += self._retire(version)
        return bool(mine), freeable

    def forget_user(self, user_id: int) -> None:
        """A user id that is loaded again (vLLM reuses a name's id for an in-place load): admissions bind anew."""
        with self._lock:
            self._retired_users.discard(user_id)

    def _retire(self, version: Version) -> list[Version]:
        version.retired = True
        return self._freeable(version)

    @staticmethod
    def _freeable(version: Version) -> list[Version]:
        if version.retired and version.users <= 0 and not version.freed:
            version.freed = True
            return [version]
        return []

    def _notify(self, freeable: list[Version]) -> None:
        if freeable:
            self._on_freeable(freeable)

    def discard(self, version: Version) -> None:
        """After the engine removed `version`: forget it and delete its snapshot."""
        from .loader import forget

        with self._lock:
            self._versions.pop(version.engine_id, None)
            if self._current.get(version.user_id) is version:
                del self._current[version.user_id]
        forget(version.snapshot)
        shutil.rmtree(version.snapshot, ignore_errors=True)

    # --- introspection ---------------------------------------------------------------------------------------------
    def engine_ids_of(self, user_id: int) -> list[int]:
        with self._lock:
            return [v.engine_id for v in self._versions.values() if v.user_id == user_id]

    def user_of(self, engine_id: int) -> int | None:
        with self._lock:
            version = self._versions.get(engine_id)
            return version.user_id if version is not None else None

    def live_versions(self) -> int:
        with self._lock:
            return len(self._versions)

    def close(self) -> None:
        self._removal()


def remove_stale_roots() -> None:
    """Remove the snapshot directories of processes that are gone (killed before they could clean up)."""
    for root in Path(tempfile.gettempdir()).glob(f"{ROOT_PREFIX}*"):
        pid = root.name.removeprefix(ROOT_PREFIX).split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)) and root.is_dir() and not root.is_symlink():
            shutil.rmtree(root, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _bound(msgspec, lora_request, version: Version):
    return msgspec.structs.replace(lora_request, lora_int_id=version.engine_id, lora_path=str(version.snapshot),
                                   load_inplace=False)

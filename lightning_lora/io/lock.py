"""One writer per folder: a lock file beside it, ``<folder>.lock``, that names its holder (pid, host, start time).

``FolderLock(folder).acquire()`` creates the lock file atomically (``O_CREAT | O_EXCL``) or refuses with
``FolderInUseError``, whose message names the holder and how to proceed. A lock left by a process that no longer runs
on this host (a run killed with SIGKILL) is stale: it is taken over, and a log line says whose it was. A lock held
on another host cannot be checked from here: it is refused like a live one. ``release()`` removes the file if it is
still this process's. The lock sits beside the folder, not inside it, so a write that swaps the whole folder in
(``io/transaction.py``) leaves it alone.

Example::

    with FolderLock("runs/lora/export"):
        ...  # write runs/lora/export
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

log = logging.getLogger(__name__)


class FolderInUseError(RuntimeError):
    """Another live process holds the folder's lock."""


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host (one we may not signal counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_path(folder: str | os.PathLike) -> Path:
    folder = Path(folder)
    return folder.parent / f"{folder.name}.lock"


class FolderLock:
    """The lock of ``folder`` (see the module docstring); ``purpose`` goes into the holder's record."""

    def __init__(self, folder: str | os.PathLike, purpose: str = "fit"):
        self.folder = Path(folder)
        self.path = lock_path(self.folder)
        self.purpose = purpose
        self.held = False

    def _record(self) -> dict:
        return {"pid": os.getpid(), "host": socket.gethostname(), "purpose": self.purpose,
                "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}  # fmt: skip

    def holder(self) -> dict | None:
        """The lock file's record, or None when there is none (or it cannot be read: an unreadable one is stale)."""
        try:
            record = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(self._record(), fh)
        return True

    def acquire(self) -> FolderLock:
        """Take the lock (a stale one is taken over, with a log line).

        Raises:
            FolderInUseError: a process that still runs (or one on another host) holds it.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a holder may release between our attempts
            if self._create():
                self.held = True
                return self
            record = self.holder()
            if record is None:
                continue
            pid, host = record.get("pid"), record.get("host")
            mine = host == socket.gethostname()
            if mine and pid == os.getpid():  # this process holds it already (another FolderLock of the folder)
                self.held = True
                return self
            if isinstance(pid, int) and (not mine or pid_alive(pid)):
                raise FolderInUseError(
                    f"{self.folder} is in use by another run: pid {pid} on {host}, started {record.get('started')} "
                    f"(lock file {self.path}). Wait for it to finish, choose another export_dir, or delete the lock "
                    "file if that run is gone."
                )
            # stale: its process is gone (or the record is unreadable); take it over, then check that we won
            scratch = self.path.with_name(f"{self.path.name}.{os.getpid()}")
            scratch.write_text(json.dumps(self._record()), encoding="utf-8")
            os.replace(scratch, self.path)
            if (self.holder() or {}).get("pid") == os.getpid():
                log.warning(f"took over the stale lock {self.path} of pid {pid} on {host} (started "
                            f"{record.get('started')}), which no longer runs.")  # fmt: skip
                self.held = True
                return self
        raise FolderInUseError(f"could not take the lock {self.path}: other runs keep taking it. Try again.")

    def release(self) -> None:
        """Remove the lock file if this process holds it (idempotent)."""
        if self.held and (self.holder() or {}).get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


__all__ = ["FolderInUseError", "FolderLock", "lock_path", "pid_alive"]

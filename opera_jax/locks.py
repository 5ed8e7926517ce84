"""One run per working directory: a lock file naming its owner.

    with WorkdirLock("runs/x"):       # a second run on runs/x stops at once, saying who holds it
        train(...)

The lock is a file `<dir>/.opera.lock` created exclusively, holding the owner's pid, host,
start time and command line. It is removed on exit; one left behind by a killed process on
this host is detected (its pid is gone) and taken over with a warning. A lock from another
host cannot be checked: the message says how to remove it if that run is gone. In a
multi-process job only process 0 takes it (the processes share the directory by design).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time

import jax

log = logging.getLogger(__name__)

LOCK_NAME = ".opera.lock"


class WorkdirLocked(RuntimeError):
    """Another run holds the directory."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class WorkdirLock:
    """Exclusive use of `directory` (created) for the duration of a `with` block.

    Args:
      directory: the run's working directory or output directory.
      what: what the directory is, for messages (e.g. "GRPO workdir").
    """

    def __init__(self, directory: str, *, what: str = "workdir"):
        self.directory = os.path.abspath(directory)
        self.path = os.path.join(self.directory, LOCK_NAME)
        self.what = what
        self._held = False

    def _owner(self) -> dict:
        try:
            with open(self.path, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def acquire(self) -> None:
        if jax.process_index() != 0:
            return
        os.makedirs(self.directory, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                pid, host = owner.get("pid"), owner.get("host")
                if host == me["host"] and isinstance(pid, int) and not _alive(pid):
                    log.warning("%s %s: taking over the lock of pid %d, which has exited",
                                self.what, self.directory, pid)
                    os.remove(self.path)
                    continue
                if not owner:  # being written right now, or unreadable: look again
                    time.sleep(0.1)
                    continue
                where = "this host" if host == me["host"] else f"host {host}"
                raise WorkdirLocked(
                    f"{self.what} {self.directory} is in use by pid {pid} on {where} since "
                    f"{owner.get('started')} ({owner.get('command')!r}); wait for that run or "
                    f"use another directory (if it is gone, delete {self.path})") from None
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(me, f)
            self._held = True
            return
        raise WorkdirLocked(f"could not take the lock {self.path}")

    def release(self) -> None:
        if self._held and self._owner().get("pid") == os.getpid():
            os.remove(self.path)
        self._held = False

    def __enter__(self) -> "WorkdirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

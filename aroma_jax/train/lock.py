"""One writer per run directory: an advisory lock file, ``DIR/.aroma-jax.lock``.

`RunLock` is taken by every command that writes a run directory (``train``, ``train --resume``,
``finalize``) and by ``export`` (which reads ``final/`` while it writes its target); it is
released on every exit path, exceptions and Ctrl-C included. The file holds the holder's host,
pid, start time and command as JSON, and the holder keeps an exclusive ``flock`` on it for as
long as it runs, so:

* a second writer on the same host finds the ``flock`` taken and refuses with one line naming
  the holder (`RunLockError`);
* a lock file left by a process that is gone (killed, host rebooted) has no ``flock``: on the
  same host it is taken over with a message on stderr;
* a lock file written on another host (a shared file system, where ``flock`` may not reach) is
  never broken unless the caller passes ``break_lock`` (``--break-lock``).

Commands that only read a run (``eval``, ``analyze``) do not take the lock; `check_free` makes
``eval`` refuse while a live writer holds it. In a multi-process run only process 0 takes the
lock (`is_lock_process`, `hold`): the run directory is one, whatever the number of hosts.

Example:
    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> with RunLock(d, "train"):
    ...     try:
    ...         RunLock(d, "train").acquire()
    ...     except RunLockError as err:
    ...         print("refused")
    refused
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: the pid/host record alone decides
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".aroma-jax.lock"


class RunLockError(RuntimeError):
    """The run directory is held by another writer; the message names it and what to do."""


def is_lock_process() -> bool:
    """Whether this process takes run-directory locks: process 0 of a multi-process run."""
    import jax

    return jax.process_index() == 0


def _host() -> str:
    return socket.gethostname()


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (a process of another user counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(holder: dict[str, Any]) -> str:
    if not holder:  # locked a moment ago, its record not yet written
        return "another process that is just starting"
    host = holder.get("host", "?")
    where = "this host" if host == _host() else f"host {host!r}"
    return (
        f"`aroma-jax {holder.get('command', '?')}` (pid {holder.get('pid', '?')} on {where}, "
        f"since {holder.get('started', '?')})"
    )


def _read(path: Path) -> dict[str, Any]:
    """The holder record of a lock file ({} if absent, empty or unreadable)."""
    try:
        text = path.read_text(encoding="utf-8")
        holder = json.loads(text) if text.strip() else {}
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _live_elsewhere(holder: dict[str, Any]) -> bool:
    """A record of a process that may still run: another host's, or a live pid on this one."""
    if not holder:
        return False
    if holder.get("host") != _host():
        return True
    return _alive(int(holder.get("pid", 0))) and int(holder.get("pid", 0)) != os.getpid()


class RunLock:
    """The advisory write lock of run directory ``run_dir`` (created if missing).

    Args:
      run_dir: the run directory.
      command: what holds it, as the user typed it (``train``, ``export``, ...): shown to a
        second writer.
      break_lock: take a lock left by another host (whose process this host cannot see).
    """

    def __init__(self, run_dir: str | Path, command: str, break_lock: bool = False):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.command = command
        self.break_lock = break_lock
        self._fd: int | None = None

    def _refuse(self, holder: dict[str, Any], extra: str = "") -> RunLockError:
        return RunLockError(
            f"run directory {str(self.run_dir)!r} is in use by {_describe(holder)}; wait for it "
            f"to finish, or use another directory{extra}"
        )

    def acquire(self) -> None:
        """Takes the lock or raises `RunLockError` naming the holder."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(10):  # another process may remove the file between open and flock
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if fcntl is not None:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except OSError as err:
                        if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                            raise
                        raise self._refuse(_read(self.path)) from None
                    try:
                        same = os.path.samestat(os.fstat(fd), os.stat(self.path))
                    except FileNotFoundError:
                        same = False
                    if not same:  # released and removed meanwhile: lock the new file
                        os.close(fd)
                        continue
                self._take(fd, _read(self.path))
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
            return
        raise RunLockError(f"could not lock {str(self.path)!r}: it kept changing; try again")

    def _take(self, fd: int, holder: dict[str, Any]) -> None:
        """Writes this process's record into the locked file, after judging an old record."""
        if holder:
            if holder.get("host") != _host():
                if not self.break_lock:
                    raise self._refuse(
                        holder,
                        "; if that process is gone, pass --break-lock to take the lock over",
                    )
                print(
                    f"aroma-jax: breaking the lock of {str(self.run_dir)!r} held by "
                    f"{_describe(holder)} (--break-lock)",
                    file=sys.stderr,
                )
            elif _live_elsewhere(holder) and fcntl is None:
                raise self._refuse(holder)
            else:  # this host, no flock on the file: its process is gone
                print(
                    f"aroma-jax: taking over the stale lock of {str(self.run_dir)!r} left by "
                    f"{_describe(holder)}, which is no longer running",
                    file=sys.stderr,
                )
        record = {
            "host": _host(),
            "pid": os.getpid(),
            "started": datetime.datetime.now(datetime.timezone.utc).strftime(
                "%Y-%m-%d %H:%M:%S UTC"
            ),
            "command": self.command,
        }
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(record) + "\n").encode())
        os.fsync(fd)

    def release(self) -> None:
        """Removes the lock file (if it still holds this process's record) and unlocks."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if _read(self.path).get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)  # before unlocking: no one can find it empty
        finally:
            os.close(fd)  # closing drops the flock

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


@contextlib.contextmanager
def hold(run_dir: str | Path, command: str, break_lock: bool = False) -> Iterator[None]:
    """`RunLock` of ``run_dir`` for the block, taken by process 0 only (a multi-process run has
    one writer of its run directory).

    In a multi-process run process 0 tells every other process whether it got the lock, and a
    refusal raises the same `RunLockError` on every host: otherwise the others would go on and
    wait in the run's first collective for a process 0 that has already stopped.
    """
    import jax

    if jax.process_count() == 1:
        with RunLock(run_dir, command, break_lock):
            yield
        return
    lock, error = None, None
    if is_lock_process():
        lock = RunLock(run_dir, command, break_lock)
        try:
            lock.acquire()
        except Exception as err:  # told to the others before it is raised here
            error = err
    refusal = _from_process_zero(str(error or ""))
    if error is not None:
        raise error
    if refusal:
        raise RunLockError(f"process 0 could not take the run directory's lock: {refusal}")
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _from_process_zero(message: str, size: int = 2048) -> str:
    """``message`` as process 0 has it, on every process (a collective: all must call it)."""
    import numpy as np
    from jax.experimental import multihost_utils

    buf = np.zeros(size, np.uint8)
    raw = message.encode()[:size]
    buf[: len(raw)] = np.frombuffer(raw, np.uint8)
    out = np.asarray(multihost_utils.broadcast_one_to_all(buf))
    return bytes(out).rstrip(b"\0").decode(errors="replace")


def check_free(run_dir: str | Path) -> None:
    """Raises `RunLockError` if a live writer holds ``run_dir`` (for commands that only read)."""
    path = Path(run_dir) / LOCK_NAME
    holder = _read(path)
    if not _live_elsewhere(holder):
        return
    if fcntl is not None and holder.get("host") == _host():
        # The pid is alive, but it may be a reused one: the flock says whether it holds the lock.
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return
        except OSError:
            pass
        finally:
            os.close(fd)
    raise RunLockError(
        f"run directory {str(run_dir)!r} is being written by {_describe(holder)}; wait for it to "
        "finish"
    )


__all__ = ["LOCK_NAME", "RunLock", "RunLockError", "check_free", "hold", "is_lock_process"]

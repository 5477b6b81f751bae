"""The `.NAME.TAG.partial.ext` temporary files a save writes before it publishes its result.

A killed save must not leave them behind, so:
- each name carries its owner (this host and pid namespace, and the pid), so a later save can tell
  a dead process's leftovers from a live one's work in progress;
- the files of saves in flight are removed at interpreter exit (atexit: a normal exit, or Ctrl+C,
  which Python turns into KeyboardInterrupt) and on SIGTERM/SIGINT where those still have the
  default action (which would end the process without running any cleanup);
- every save first sweeps its folder of leftovers that no live process owns.
"""
from __future__ import annotations

import atexit
import hashlib
import logging
import os
import re
import secrets
import signal
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

log = logging.getLogger(__name__)

STALE_AFTER_S = 3600  # a temp file nobody has written for an hour belongs to no running save
LIVE_OWNER_STALE_AFTER_S = 24 * 3600  # a live pid may be a reused one: even then, not forever
_PID_WIDTH = 10  # the widest pid: Windows' are 32-bit (10 digits); Linux's at most 4194304 (7)
_TOKEN_WIDTH = 8
_TEMP = re.compile(r"^\..+\.partial(\.[^.]+)?$")
_OWNED = re.compile(r"\.(?P<host>[0-9a-f]{6})-(?P<pid>\d+)-[0-9a-f]{8}\.partial(\.[^.]+)?$")

_in_flight: set[Path] = set()
_lock = threading.Lock()  # creating + registering vs sweeping; the signal/exit cleanup never takes it
_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT") if hasattr(signal, name))


def _host_tag() -> str:
    """Hostname and pid namespace: only within both does a pid name the same process."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except (OSError, AttributeError):
        namespace = ""
    return hashlib.sha1(f"{socket.gethostname()}|{namespace}".encode()).hexdigest()[:6]


_HOST = _host_tag()


def temp_name(base: str, suffix: str, *, pid: Optional[int] = None, token: Optional[str] = None) -> str:
    pid = os.getpid() if pid is None else pid
    token = secrets.token_hex(_TOKEN_WIDTH // 2) if token is None else token
    return f".{base}.{_HOST}-{pid}-{token}.partial{suffix}"


def longest_temp_name(base: str, suffix: str) -> str:
    """The longest temp name a save of `base` can create (widest pid), for the name-length rule."""
    return temp_name(base, suffix, pid=10**_PID_WIDTH - 1, token="0" * _TOKEN_WIDTH)


@contextmanager
def temp_file(folder: Path, base: str, suffix: str) -> Iterator[Path]:
    """A new empty 0600 file in `folder`, registered for cleanup until the block ends, then removed."""
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NOINHERIT", 0)
    while True:
        path = folder / temp_name(base, suffix)
        with _lock:  # created and registered at once, so a sweep in another thread never sees it unowned
            try:
                os.close(os.open(path, flags, 0o600))
            except FileExistsError:
                continue
            _in_flight.add(path)
        break
    try:
        yield path
    finally:
        with _lock:
            _in_flight.discard(path)
        path.unlink(missing_ok=True)


def remove_in_flight() -> None:
    """Remove every temp file of a save still running (at exit or on a signal)."""
    for path in list(_in_flight):  # no lock: this may interrupt the thread that holds it
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass


atexit.register(remove_in_flight)
if hasattr(os, "register_at_fork"):  # a forked child inherits the set, but the files are its parent's
    os.register_at_fork(after_in_child=_in_flight.clear)


def _on_signal(signum: int, frame) -> None:
    """Clean up, then die of the same signal with its default action, exactly as without this handler."""
    remove_in_flight()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def install_signal_cleanup() -> bool:
    """Handle SIGTERM/SIGINT where they still have the default action; True if one of them is handled by us.

    Only the main thread may install handlers (ComfyUI runs nodes on a worker thread, so the nodes
    call this when imported); a handler someone else installed is never replaced, and Python's own
    SIGINT handler (KeyboardInterrupt) is kept, since atexit already covers it.
    """
    if threading.current_thread() is threading.main_thread():
        for signum in _SIGNALS:
            try:
                if signal.getsignal(signum) == signal.SIG_DFL:
                    signal.signal(signum, _on_signal)
            except (ValueError, OSError, RuntimeError):  # embedded interpreters may refuse
                log.debug("Cannot handle signal %s; its temp files are swept on the next save instead", signum)
    return any(signal.getsignal(signum) is _on_signal for signum in _SIGNALS)


def _alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) terminates the process on Windows: judge by age there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, owned by someone else
        return True
    return True


def _stale(path: Path, idle_s: float) -> bool:
    owned = _OWNED.search(path.name)
    if owned is None or owned["host"] != _HOST:  # older naming or another machine: by age alone
        return idle_s > STALE_AFTER_S
    pid = int(owned["pid"])
    if pid == os.getpid():  # ours but not in flight: left by an earlier process that had our pid
        return True
    return not _alive(pid) or idle_s > LIVE_OWNER_STALE_AFTER_S


def sweep_stale(folder: Path, *, now: Optional[float] = None) -> list[Path]:
    """Remove temp files in `folder` left by saves that were killed; returns what was removed."""
    now = time.time() if now is None else now
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    with _lock:
        for entry in entries:
            path = Path(entry.path)
            try:
                if not _TEMP.match(entry.name) or path in _in_flight or not entry.is_file(follow_symlinks=False):
                    continue
                if _stale(path, now - entry.stat(follow_symlinks=False).st_mtime):
                    path.unlink()
                    removed.append(path)
            except OSError:  # gone already, or not ours to remove: leave it
                continue
    for path in removed:
        log.info("Removed %s, a temporary file left by an interrupted save.", path)
    return removed

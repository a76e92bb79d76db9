"""The folder of ZMQ ipc sockets where an API server and its engine core meet: one private
folder per server, ``$TMPDIR/fleetserve-ipc-<server pid>-<random>``.

A server killed with SIGKILL cannot remove its folder, so folders do not pile up in two ways:
its engine core removes it when it notices the server is gone, and a server starting up
removes the folders of servers that no longer run (if both were killed at once).
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

PREFIX = "fleetserve-ipc-"


def make_socket_dir() -> str:
    """A new private (0700) folder for this process's sockets, after sweeping stale ones."""
    sweep_stale()
    return tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-")


def sweep_stale(root: str | os.PathLike | None = None) -> list[Path]:
    """Remove the socket folders under `root` (default: the temp folder) whose server process
    is gone. Only this user's folders, never through a symlink. Returns those removed."""
    removed = []
    for path in Path(root or tempfile.gettempdir()).glob(PREFIX + "*"):
        pid = owner_pid(path)
        if pid is None or pid_alive(pid):
            continue
        try:
            st = path.lstat()
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            continue
        shutil.rmtree(path, ignore_errors=True)
        logger.info("removed the socket folder of server %d, which is gone: %s", pid, path)
        removed.append(path)
    return removed


def owner_pid(path: str | os.PathLike) -> int | None:
    """The server pid in a socket folder's name, or None if the name is not one of ours."""
    pid, _, rest = Path(path).name.removeprefix(PREFIX).partition("-")
    return int(pid) if pid.isdigit() and rest else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True

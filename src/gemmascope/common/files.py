"""Files written atomically, and JSON read back with the check of its format and version.

Everything the project writes goes through a temp name and one rename; every manifest and results
file carries `format` and `format_version`, checked by `read_versioned` when it is read back.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_HOST = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())[:32] or "host"
_STALE_SECONDS = 24 * 3600
"""A leftover another machine (a shared disk) or an older version wrote is removed after this long."""


def _tmp_prefix(path: Path) -> str:
    """Temp names carry the writer's host and pid, so a killed writer's leftovers are told apart
    from a live one's."""
    return f".{path.name}.{_HOST}-{os.getpid()}."


def _clear_leftovers(path: Path) -> None:
    """Remove what killed writes to `path` left beside it, which nothing else would remove: a
    `.NAME.HOST-PID.XXXXXXXX.tmp` of this host whose PID is gone, or any other leftover of exactly
    `path`'s name older than a day (another host's, or one from before pids were recorded)."""
    ours = re.compile(rf"\.{re.escape(path.name)}\.(\w+)-(\d+)\.\w{{8}}\.tmp")
    legacy = re.compile(rf"\.{re.escape(path.name)}\.\w{{8}}\.tmp")
    for other in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        m = ours.fullmatch(other.name)
        if m is not None and m.group(1) == _HOST:
            stale = not _alive(int(m.group(2)))
        elif m is not None or legacy.fullmatch(other.name):
            stale = time.time() - other.stat().st_mtime > _STALE_SECONDS
        else:
            continue  # another file's temp (`.NAME.partial.…`), or not ours at all
        if not stale:
            continue
        if other.is_dir():
            shutil.rmtree(other, ignore_errors=True)
        else:
            other.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DiskFullError(OSError):
    """No space left while writing: the message names the folder and the space free there."""


@contextlib.contextmanager
def _disk_full_named(path: Path) -> Iterator[None]:
    try:
        yield
    except Exception as err:
        text = str(err)
        if (
            getattr(err, "errno", None) == errno.ENOSPC
            or "os error 28" in text
            or "No space left" in text
        ):
            free = shutil.disk_usage(path.parent).free if path.parent.exists() else 0
            raise DiskFullError(
                errno.ENOSPC,
                f"{path.parent}: the disk is full ({free / 2**20:,.1f} MB free) while writing "
                f"{path.name}; nothing partial was kept. Free some space, or write somewhere else",
            ) from err
        raise


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is fsynced and renamed onto `path`.

    A crash at any point leaves either the old file or the new one, never half of one; a full disk
    is a `DiskFullError` naming the folder; leftovers of killed writes to `path` are removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clear_leftovers(path)
    fd, tmp_name = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with _disk_full_named(path):
            yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes files private; give them the usual mode
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path` as a whole.

    Its files get the usual mode (some writers, safetensors among them, make them private); a full
    disk is a `DiskFullError` naming the folder; leftovers of killed writes to `path` are removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clear_leftovers(path)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        with _disk_full_named(path):
            yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes folders private; give them the usual mode
        for f in tmp.rglob("*"):
            if f.is_file():
                os.chmod(f, 0o666 & ~_umask())
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (used for every manifest and config)."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_json(path: str | Path) -> dict[str, Any]:
    """A JSON object from `path`, or an error naming the file."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: expected a JSON object, could not read it ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


def read_versioned(path: str | Path, fmt: str, version: int, *, fix: str, missing: str) -> dict:
    """The JSON object at `path`, refused unless its `format` and `format_version` are ours.

    Args:
        path: the file.
        fmt, version: what its `format` and `format_version` must be.
        fix: what to do about a file of another format, e.g. "recreate it with `gemmascope cache`".
        missing: what to say when the file does not exist, e.g. "is X a cache?".
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found; {missing}")
    try:
        obj = read_json(path)
    except ValueError as err:  # damaged: say what to do about it, as for a foreign format
        raise ValueError(f"{err}; {fix}") from None
    if obj.get("format") != fmt or obj.get("format_version") != version:
        raise ValueError(
            f"{path}: format {obj.get('format')!r} version {obj.get('format_version')!r}, "
            f"expected {fmt!r} version {version}; {fix}"
        )
    return obj

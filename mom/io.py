"""Crash-safe files: every file mom writes goes through here, and every file it reads names itself on error.

Writing (a kill at any instant leaves the old content or the new one, never a mix or nothing):

    atomic_file(path)             context -> a temp path in the same folder; on success: fsync, os.replace
    atomic_write_bytes/text/json  the same for bytes, str, a JSON value
    atomic_dir(folder, owned)     context -> a temp folder; on success every file is fsynced, the folder is
                                  renamed to .NAME.new (complete), the old one to .NAME.old, .NAME.new to
                                  NAME, and .NAME.old is deleted. Files of the old folder that the writer
                                  does not own (`owned`) are carried over (hard links).
    append_line(path, line)       one write() + fsync: a kill can tear only the last line (read_jsonl drops it)

Leftovers of an interrupted write have fixed names, so the next writer recognises and cleans them:

    .NAME.tmp-PID[-RAND]          a temp file or folder being written (deleted once PID is no longer running)
    .NAME.new                     a complete folder not yet swapped in   (swapped in if NAME is missing, else deleted)
    .NAME.old                     the previous folder                    (deleted once NAME is there)

so the version a reader sees (`complete_dir`: NAME, else .NAME.new, else .NAME.old) is the one the next writer
keeps. A write is committed when NAME is renamed to .NAME.old.

Readers never modify anything (another process may be writing): `complete_dir` says which folder holds the
last complete version. Reading: read_json_file / read_jsonl / load_safetensors / torch_load raise
FileFormatError (a ValueError) or FileNotFoundError with the path and what is wrong.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import warnings
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional

_TMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)(?:-[0-9a-f]+)?$")
_ACTIVE: set = set()  # temp paths this process is writing right now (never cleaned as stale)


class FileFormatError(ValueError):
    """A file that exists but is not what it should be (empty, torn, wrong format, missing keys)."""


# --- low level --------------------------------------------------------------------------------------------
def _fsync_path(path: str, directory: bool = False):
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        if directory:  # some platforms cannot open a folder; its entries are then as durable as they get
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def _fsync_tree(root: str):
    for here, dirs, files in os.walk(root):
        for f in files:
            _fsync_path(os.path.join(here, f))
        _fsync_path(here, directory=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _remove(path: str):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def stale_temps(folder: str, name: Optional[str] = None) -> List[str]:
    """Temp files/folders in `folder` (of `name` only, if given) left by a write that did not finish."""
    folder = os.path.abspath(folder)
    try:
        entries = os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return []
    out = []
    for e in sorted(entries):
        m = _TMP.match(e)
        if not m or (name is not None and m.group("name") != name):
            continue
        path = os.path.join(folder, e)
        if path in _ACTIVE or (int(m.group("pid")) != os.getpid() and _pid_alive(int(m.group("pid")))):
            continue  # being written right now (by us or by a running process)
        out.append(path)
    return out


def clean_stale_temps(folder: str, name: Optional[str] = None) -> List[str]:
    """Delete what `stale_temps` finds; returns the paths deleted."""
    gone = stale_temps(folder, name)
    for p in gone:
        _remove(p)
    return gone


def _temp_name(path: str, folder: bool = False) -> str:
    d, base = os.path.split(path)
    suffix = f"{os.getpid()}" if folder else f"{os.getpid()}-{secrets.token_hex(4)}"
    return os.path.join(d, f".{base}.tmp-{suffix}")


# --- single files -----------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_file(path: str) -> Iterator[str]:
    """Yield a temp path next to `path`; when the block ends without error the temp file is fsynced and
    renamed over `path` (atomic on POSIX). On error it is deleted and `path` is untouched."""
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path}: is a folder, cannot write a file there")
    clean_stale_temps(folder, os.path.basename(path))
    tmp = _temp_name(path)
    _ACTIVE.add(tmp)
    try:
        yield tmp
        if not os.path.exists(tmp):
            raise FileNotFoundError(f"{tmp}: the writer of {path} wrote nothing")
        _fsync_path(tmp)
        os.replace(tmp, path)
        _fsync_path(folder, directory=True)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    finally:
        _ACTIVE.discard(tmp)


def atomic_write_bytes(path: str, data: bytes):
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()


def atomic_write_text(path: str, text: str):
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str, obj: Any, indent: Optional[int] = 2):
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def append_line(path: str, line: str):
    """Append one line with a single write() and fsync it (a kill can tear only this last line)."""
    data = (line.rstrip("\n") + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


# --- folders ----------------------------------------------------------------------------------------------
def _dir_names(final: str):
    d, base = os.path.split(final)
    return os.path.join(d, f".{base}.new"), os.path.join(d, f".{base}.old")


def _norm(folder: str) -> str:
    folder = os.path.abspath(folder)
    return os.path.realpath(folder) if os.path.islink(folder) else folder


def complete_dir(folder: str) -> Optional[str]:
    """The folder holding the last complete version of `folder` (read-only: nothing is moved): `folder`
    itself, or, after a write interrupted between its renames, .NAME.new / .NAME.old. None if none exists."""
    final = _norm(folder)
    new, old = _dir_names(final)
    for p in (final, new, old):
        if os.path.isdir(p):
            return p
    return None


def recover_dir(folder: str) -> List[str]:
    """Finish or undo whatever an interrupted `atomic_dir(folder)` left, keeping the version `complete_dir`
    shows; returns what it did, in words."""
    final = _norm(folder)
    parent, base = os.path.split(final)
    done = [f"deleted {p}" for p in clean_stale_temps(parent, base)]
    new, old = _dir_names(final)
    if os.path.isdir(new):
        if os.path.lexists(final):  # the swap had not begun: NAME is what readers saw and still see
            _remove(new)
            done.append(f"deleted {new}")
        else:                       # interrupted between the two renames: finish the swap
            os.replace(new, final)
            _fsync_path(parent, directory=True)
            done.append(f"swapped in {new}")
    if os.path.lexists(old):
        if os.path.isdir(final):    # the swap finished: the old version is a leftover
            _remove(old)
            done.append(f"deleted {old}")
        else:                       # interrupted between the two renames: the old version comes back
            os.replace(old, final)
            _fsync_path(parent, directory=True)
            done.append(f"restored {old}")
    return done


def _link_or_copy(src: str, dst: str):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


@contextlib.contextmanager
def atomic_dir(folder: str, owned: Optional[Iterable[str]] = None) -> Iterator[str]:
    """Yield an empty temp folder next to `folder`; when the block ends without error it replaces `folder`
    (see the module docstring). owned=None: the writer owns the whole folder. Otherwise the entries of the
    old folder not named in `owned` (and not written by the block) are carried over into the new one."""
    final = _norm(folder)
    parent, base = os.path.split(final)
    os.makedirs(parent, exist_ok=True)
    if os.path.lexists(final) and not os.path.isdir(final):
        raise NotADirectoryError(f"{final}: exists and is not a folder")
    recover_dir(final)
    tmp = _temp_name(final, folder=True)
    new, old = _dir_names(final)
    _ACTIVE.add(tmp)
    try:
        os.makedirs(tmp)
        yield tmp
        if owned is not None and os.path.isdir(final):
            mine = set(owned) | set(os.listdir(tmp))
            for e in os.listdir(final):
                if e not in mine:
                    src, dst = os.path.join(final, e), os.path.join(tmp, e)
                    if os.path.isdir(src) and not os.path.islink(src):
                        shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
                    else:
                        _link_or_copy(src, dst)
        _fsync_tree(tmp)
        os.replace(tmp, new)                # from here the new version is complete on disk
        _fsync_path(parent, directory=True)
    except BaseException:
        with contextlib.suppress(OSError):
            _remove(tmp)
        raise
    finally:
        _ACTIVE.discard(tmp)
    if os.path.lexists(final):
        os.replace(final, old)              # the commit point: from here readers and recovery see the new one
    os.replace(new, final)
    _fsync_path(parent, directory=True)
    try:
        _remove(old)
    except OSError as e:  # the new version is in place; the next writer deletes the leftover
        warnings.warn(f"{old}: could not delete the previous version ({e}); the next write will", stacklevel=3)


# --- reading ----------------------------------------------------------------------------------------------
def _read_text(path: str, what: str) -> str:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: {what} not found")
    if os.path.isdir(path):
        raise FileFormatError(f"{path}: {what} is a folder, expected a file")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise FileFormatError(f"{path}: cannot read {what} ({e.strerror or e})") from e
    if not raw.strip():
        raise FileFormatError(f"{path}: {what} is empty")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FileFormatError(f"{path}: {what} is not UTF-8 text (byte {e.start})") from e


def read_json_file(path: str, what: str = "JSON file", expect: type = dict) -> Any:
    """json.load(path), with errors that name the path and what is wrong (missing, empty, torn, not `expect`)."""
    text = _read_text(path, what)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise FileFormatError(f"{path}: {what} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}"
                              f"; a torn or hand-edited file?)") from e
    if expect is not None and not isinstance(obj, expect):
        raise FileFormatError(f"{path}: {what} must hold a JSON {'object' if expect is dict else expect.__name__}, "
                              f"got {type(obj).__name__}")
    return obj


def require_keys(d: dict, path: str, spec: Dict[str, Any], what: str = "file"):
    """Each key of spec must be in d with a value of the given type(s) (bool is not an int here)."""
    for key, types in spec.items():
        if key not in d:
            raise FileFormatError(f"{path}: {what} has no {key!r} (keys: {sorted(d)})")
        v = d[key]
        types = types if isinstance(types, tuple) else (types,)
        if (isinstance(v, bool) and bool not in types) or not isinstance(v, types):
            names = " or ".join(t.__name__ for t in types)
            raise FileFormatError(f"{path}: {what} {key!r} must be {names}, got {v!r}")


def read_jsonl(path: str, what: str = "JSON-lines file") -> List[dict]:
    """Rows of a JSON-lines file. A torn last line (a write interrupted by a kill) is dropped with a warning
    naming the file; a bad line anywhere else is an error naming the file and the line."""
    with open(path, "rb") as f:
        raw = f.read()
    lines = raw.split(b"\n")
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        last = all(not rest.strip() for rest in lines[i + 1:])
        try:
            row = json.loads(line.decode("utf-8"))
            if not isinstance(row, dict):
                raise ValueError(f"a JSON {type(row).__name__}, not an object")
        except (ValueError, UnicodeDecodeError) as e:
            if last:
                warnings.warn(f"{path}: dropped a torn last line ({len(line)} bytes, line {i + 1}) left by an "
                              f"interrupted write", stacklevel=2)
                break
            raise FileFormatError(f"{path}: line {i + 1} of the {what} is not a JSON object ({e})") from e
        rows.append(row)
    return rows


def load_safetensors(path: str, what: str = "weights file") -> dict:
    """safetensors.torch.load_file(path) with errors that name the path."""
    from safetensors.torch import load_file

    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: {what} not found")
    size = os.path.getsize(path)
    if size == 0:
        raise FileFormatError(f"{path}: {what} is empty (0 bytes)")
    try:
        return load_file(path)
    except Exception as e:  # SafetensorError (header too small / invalid, truncated data), OSError
        raise FileFormatError(f"{path}: {what} is not a readable safetensors file ({size} bytes; "
                              f"{type(e).__name__}: {e}); truncated or not safetensors?") from e


def torch_load(path: str, what: str = "checkpoint file") -> Any:
    """torch.load(path, map_location="cpu", weights_only=True) with errors that name the path."""
    import torch

    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: {what} not found")
    size = os.path.getsize(path)
    if size == 0:
        raise FileFormatError(f"{path}: {what} is empty (0 bytes)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError (zip central directory missing), EOFError
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise FileFormatError(f"{path}: {what} cannot be read ({size} bytes; {type(e).__name__}: {msg[:200]}); "
                              f"truncated or not a torch.save file?") from e


@contextlib.contextmanager
def scratch_dir(path: str) -> Iterator[str]:
    """A scratch folder .NAME.tmp-PID-RAND next to `path` (for downloads that land in a folder before one
    file is moved to `path`); deleted at the end, and as a stale leftover by the next caller if killed."""
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    clean_stale_temps(folder, os.path.basename(path))
    tmp = _temp_name(path)
    _ACTIVE.add(tmp)
    try:
        os.makedirs(tmp)
        yield tmp
    finally:
        with contextlib.suppress(OSError):
            _remove(tmp)
        _ACTIVE.discard(tmp)


def move_into_place(src: str, path: str):
    """fsync src, then os.replace it onto path (same file system) and fsync the folder."""
    _fsync_path(src)
    os.replace(src, path)
    _fsync_path(os.path.dirname(os.path.abspath(path)), directory=True)


def write_with(path: str, writer: Callable[[str], Any]):
    """writer(temp_path) then the atomic rename: for writers that take a path (safetensors, torch.save)."""
    with atomic_file(path) as tmp:
        writer(tmp)

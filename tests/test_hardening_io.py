"""mom.io: atomic files and folders survive a kill at every file-system step; the next writer recognises and
cleans every leftover; readers name the file and what is wrong with it.

`Faults` (also used by the other test_hardening_* files) kills the "process" at the k-th file-system operation:
that operation raises `Killed` (a BaseException, so no `except Exception` cleanup runs) after leaving a torn
result where it wrote, and every later operation raises too, so no cleanup code can tidy up after the kill -
the disk is left as a real kill would leave it. Running a save once unarmed counts its operations; the tests
then kill it at each one.
"""
import builtins
import contextlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from mom import io as mio


class Killed(BaseException):
    """The process died here."""


_OS_OPS = ("replace", "rename", "fsync", "unlink", "remove", "rmdir", "mkdir", "makedirs", "link")


class Faults:
    def __init__(self):
        self.count, self.kill_at, self.dead, self.log = 0, None, False, []

    def _hit(self, name, torn=None):
        if self.dead:
            raise Killed(f"already dead ({name})")
        self.count += 1
        self.log.append(name)
        if self.kill_at == self.count:
            self.dead = True
            if torn is not None:
                torn()
            raise Killed(f"killed at operation {self.count}: {name}")

    @contextlib.contextmanager
    def armed(self, kill_at=None):
        """Count (kill_at=None) or kill at operation kill_at (1-based) of the block."""
        self.count, self.kill_at, self.dead, self.log = 0, kill_at, False, []
        with pytest.MonkeyPatch.context() as mp:
            for name in _OS_OPS:
                real = getattr(os, name)
                mp.setattr(os, name, self._plain(f"os.{name}", real))
            mp.setattr(os, "write", self._write(os.write))
            mp.setattr(builtins, "open", self._open(builtins.open))
            mp.setattr(torch, "save", self._saver("torch.save", torch.save))
            import safetensors.torch as st
            mp.setattr(st, "save_file", self._saver("save_file", st.save_file))
            yield self

    def _plain(self, name, real):
        def op(*a, **k):
            self._hit(f"{name}{tuple(os.path.basename(str(x)) for x in a[:2])}")
            return real(*a, **k)
        return op

    def _write(self, real):
        def op(fd, data):
            self._hit("os.write", torn=lambda: real(fd, bytes(data)[: len(data) // 2]))
            return real(fd, data)
        return op

    def _open(self, real):
        def op(file, mode="r", *a, **k):
            if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+"):
                self._hit(f"open({os.path.basename(str(file))}, {mode})", torn=lambda: real(file, mode).close())
            return real(file, mode, *a, **k)
        return op

    def _saver(self, name, real):
        def op(obj, path, *a, **k):
            def torn():  # the whole write, then cut in half: a file torn mid-write
                real(obj, path, *a, **k)
                with builtins.open(path, "r+b") as f:
                    f.truncate(os.path.getsize(path) // 2)
            self._hit(f"{name}({os.path.basename(str(path))})", torn=torn)
            return real(obj, path, *a, **k)
        return op

    def count_ops(self, fn) -> int:
        with self.armed():
            fn()
        return self.count

    def kill(self, k, fn):
        with self.armed(k):
            with pytest.raises(Killed):
                fn()


def leftovers(folder) -> list:
    """Names in folder that only an interrupted write leaves (temp files/folders, .new/.old folders)."""
    return sorted(e for e in os.listdir(folder) if ".tmp-" in e or e.endswith((".new", ".old")))


# --- atomic files -----------------------------------------------------------------------------------------------
def test_atomic_write_killed_at_every_step_leaves_old_or_new(tmp_path):
    path = tmp_path / "run.json"
    faults = Faults()
    n = faults.count_ops(lambda: mio.atomic_write_json(str(tmp_path / "probe.json"), {"v": 2}))
    assert n >= 3  # open, fsync, replace at least
    seen = set()
    for k in range(1, n + 1):
        mio.atomic_write_json(str(path), {"v": 1})
        faults.kill(k, lambda: mio.atomic_write_json(str(path), {"v": 2}))
        got = mio.read_json_file(str(path))  # never torn, never missing
        assert got in ({"v": 1}, {"v": 2}), (k, got)
        seen.add(got["v"])
        mio.atomic_write_json(str(path), {"v": 3})            # the next write cleans the leftovers
        assert mio.read_json_file(str(path)) == {"v": 3} and leftovers(tmp_path) == [], (k, faults.log)
    assert seen == {1, 2}


def test_atomic_file_error_keeps_old_and_removes_temp(tmp_path):
    p = tmp_path / "a.bin"
    mio.atomic_write_bytes(str(p), b"old")
    with pytest.raises(RuntimeError, match="writer failed"):
        with mio.atomic_file(str(p)) as tmp:
            open(tmp, "wb").write(b"half")
            raise RuntimeError("writer failed")
    assert p.read_bytes() == b"old" and leftovers(tmp_path) == []
    with pytest.raises(IsADirectoryError, match="is a folder"):
        mio.atomic_write_text(str(tmp_path), "x")


def test_stale_temps_of_dead_processes_only(tmp_path):
    import subprocess
    import sys
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (tmp_path / f".x.json.tmp-{dead}-ab12").write_text("torn")
    (tmp_path / f".x.json.tmp-{os.getppid()}-cd34").write_text("a live writer's")   # parent: alive
    (tmp_path / ".x.json.tmp-notapid").write_text("not ours")
    gone = mio.clean_stale_temps(str(tmp_path))
    assert [os.path.basename(g) for g in gone] == [f".x.json.tmp-{dead}-ab12"]
    assert sorted(os.listdir(tmp_path)) == sorted([f".x.json.tmp-{os.getppid()}-cd34", ".x.json.tmp-notapid"])


def test_append_line_and_torn_last_line(tmp_path):
    p = str(tmp_path / "m.jsonl")
    for i in range(3):
        mio.append_line(p, json.dumps({"step": i}))
    assert [r["step"] for r in mio.read_jsonl(p)] == [0, 1, 2]
    with open(p, "a") as f:
        f.write('{"step": 3, "lo')                             # a kill mid-write
    with pytest.warns(UserWarning, match=r"m\.jsonl: dropped a torn last line"):
        assert [r["step"] for r in mio.read_jsonl(p)] == [0, 1, 2]
    with open(p, "w") as f:
        f.write('{"step": 0}\n{"step": 1, "lo\n{"step": 2}\n')  # damage inside the file: an error, not a guess
    with pytest.raises(mio.FileFormatError, match=r"m\.jsonl: line 2 of the"):
        mio.read_jsonl(p)


# --- atomic folders ---------------------------------------------------------------------------------------------
def _write_version(folder, v):
    with mio.atomic_dir(str(folder), owned=("a.txt", "b.txt")) as tmp:
        for name in ("a.txt", "b.txt"):
            with open(os.path.join(tmp, name), "w") as f:
                f.write(f"{name} v{v}")


def _version(folder):
    got = {Path(os.path.join(folder, n)).read_text() for n in ("a.txt", "b.txt")}
    assert len(got) == 2 and len({g.split()[-1] for g in got}) == 1, f"a mix of versions: {got}"
    return got.pop().split()[-1]


def test_atomic_dir_killed_at_every_step(tmp_path):
    faults = Faults()
    probe = tmp_path / "probe"
    _write_version(probe, 1)
    n = faults.count_ops(lambda: _write_version(probe, 2))
    seen = set()
    for k in range(1, n + 1):
        root = tmp_path / f"k{k}"
        os.makedirs(root)
        folder = root / "ckpt"
        _write_version(folder, 1)
        (folder / "notes.md").write_text("the user's")     # not owned by the writer: must survive
        faults.kill(k, lambda: _write_version(folder, 2))
        done = mio.complete_dir(str(folder))                 # read-only view: the last complete version
        assert done is not None, (k, faults.log, os.listdir(root))
        v = _version(done)
        seen.add(v)
        assert Path(os.path.join(done, "notes.md")).read_text() == "the user's"
        mio.recover_dir(str(folder))                         # the next writer's first step
        assert _version(folder) == v and leftovers(root) == [], (k, faults.log, os.listdir(root))
        _write_version(folder, 3)
        assert _version(folder) == "v3" and leftovers(root) == [] and (folder / "notes.md").exists()
    assert seen == {"v1", "v2"}


def _write_listed_and_unlisted(folder, v):
    """The writer owns a.txt (listed) and also writes c.txt, which it did not list."""
    with mio.atomic_dir(str(folder), owned=("a.txt",)) as tmp:
        for name in ("a.txt", "c.txt"):
            with open(os.path.join(tmp, name), "w") as f:
                f.write(f"{name} v{v}")


def test_atomic_dir_keeps_what_the_block_wrote_listed_or_not_at_every_step(tmp_path):
    """What survives a swap: every file the block wrote, listed in `owned` or not (c.txt is never replaced by
    the old folder's copy), and the old folder's files the block neither owns nor wrote (notes.md). A kill at
    any step leaves all of the old version or all of the new one."""
    faults = Faults()
    probe = tmp_path / "probe"
    _write_listed_and_unlisted(probe, 1)
    n = faults.count_ops(lambda: _write_listed_and_unlisted(probe, 2))
    assert Path(probe / "c.txt").read_text() == "c.txt v2" and Path(probe / "a.txt").read_text() == "a.txt v2"
    seen = set()
    for k in range(1, n + 2):                                    # n + 1: the write runs to its end
        root = tmp_path / f"k{k}"
        os.makedirs(root)
        folder = root / "d"
        _write_listed_and_unlisted(folder, 1)
        (folder / "notes.md").write_text("the user's")
        if k <= n:
            faults.kill(k, lambda: _write_listed_and_unlisted(folder, 2))
        else:
            _write_listed_and_unlisted(folder, 2)
        done = mio.complete_dir(str(folder))
        got = {name: Path(os.path.join(done, name)).read_text() for name in ("a.txt", "c.txt", "notes.md")}
        assert got["notes.md"] == "the user's", (k, faults.log)
        v = got["a.txt"].split()[-1]
        assert got["c.txt"] == f"c.txt {v}", (k, got, faults.log)  # never the new a.txt beside the old c.txt
        seen.add(v)
        mio.recover_dir(str(folder))
        assert sorted(os.listdir(folder)) == ["a.txt", "c.txt", "notes.md"] and leftovers(root) == []
    assert seen == {"v1", "v2"}


def test_atomic_dir_owning_the_whole_folder_keeps_only_what_the_block_wrote(tmp_path):
    """owned=None: the writer owns the folder; files of the old version it did not write are gone."""
    f = tmp_path / "d"
    _write_version(f, 1)
    (f / "notes.md").write_text("old")
    with mio.atomic_dir(str(f)) as tmp:
        open(os.path.join(tmp, "a.txt"), "w").write("a.txt v2")
    assert sorted(os.listdir(f)) == ["a.txt"] and (f / "a.txt").read_text() == "a.txt v2"


def test_recover_dir_states(tmp_path):
    f = tmp_path / "ckpt"
    new, old = tmp_path / ".ckpt.new", tmp_path / ".ckpt.old"
    # killed between the two renames: NAME gone, .new complete, .old complete -> the new one is swapped in
    for d, v in ((new, "v2"), (old, "v1")):
        d.mkdir()
        (d / "a.txt").write_text(f"a {v}")
        (d / "b.txt").write_text(f"b {v}")
    assert mio.complete_dir(str(f)) == str(new)
    mio.recover_dir(str(f))
    assert _version(f) == "v2" and leftovers(tmp_path) == []
    # killed while deleting .old (half gone): NAME is complete, .old is deleted
    old.mkdir()
    (old / "a.txt").write_text("a v1")
    mio.recover_dir(str(f))
    assert _version(f) == "v2" and leftovers(tmp_path) == []
    # only .old (NAME renamed away, .new never made): the old one comes back
    os.replace(f, old)
    mio.recover_dir(str(f))
    assert _version(f) == "v2" and leftovers(tmp_path) == []
    # a file where a folder belongs is refused, not deleted
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="not a folder"):
        with mio.atomic_dir(str(tmp_path / "file")):
            pass
    assert (tmp_path / "file").read_text() == "x"


def test_atomic_dir_error_in_writer_keeps_old(tmp_path):
    f = tmp_path / "d"
    _write_version(f, 1)
    with pytest.raises(ValueError, match="boom"):
        with mio.atomic_dir(str(f)) as tmp:
            open(os.path.join(tmp, "a.txt"), "w").write("a v2")
            raise ValueError("boom")
    assert _version(f) == "v1" and leftovers(tmp_path) == []


# --- readers name the file ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("content,msg", [
    (None, "not found"), (b"", "is empty"), (b"  \n", "is empty"), (b'{"a": 1', "not valid JSON"),
    (b"[1, 2]", "must hold a JSON object, got list"), (b"\xff\xfe{}", "not UTF-8"),
])
def test_read_json_file_errors_name_the_path(tmp_path, content, msg):
    p = tmp_path / "cfg.json"
    if content is not None:
        p.write_bytes(content)
    with pytest.raises((mio.FileFormatError, FileNotFoundError)) as e:
        mio.read_json_file(str(p), "model config")
    assert str(p) in str(e.value) and msg in str(e.value)


def test_require_keys(tmp_path):
    with pytest.raises(mio.FileFormatError, match=r"x\.json: meta has no 'vocab_size'"):
        mio.require_keys({"a": 1}, "x.json", {"vocab_size": int}, "meta")
    with pytest.raises(mio.FileFormatError, match=r"'step' must be int, got True"):
        mio.require_keys({"step": True}, "x.json", {"step": int}, "state")


def test_weight_readers_name_the_path(tmp_path):
    from safetensors.torch import save_file
    good = tmp_path / "w.safetensors"
    save_file({"x": torch.randn(64, 64)}, str(good))
    data = good.read_bytes()
    for name, blob, msg in (("empty.safetensors", b"", "is empty"),
                            ("torn.safetensors", data[: len(data) // 2], "not a readable safetensors"),
                            ("header.safetensors", data[:5], "not a readable safetensors")):
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(mio.FileFormatError, match=msg) as e:
            mio.load_safetensors(str(tmp_path / name))
        assert str(tmp_path / name) in str(e.value)
    torch.save({"a": torch.randn(100)}, str(tmp_path / "o.pt"))
    blob = (tmp_path / "o.pt").read_bytes()
    (tmp_path / "torn.pt").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(mio.FileFormatError, match="torn.pt: checkpoint file cannot be read"):
        mio.torch_load(str(tmp_path / "torn.pt"))
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        mio.torch_load(str(tmp_path / "missing.pt"))
    shutil.rmtree(tmp_path)

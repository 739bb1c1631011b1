"""The native step's build (dnnlab.native.available): one library per machine, source text and torch version, which
every install of dnnlab loads without running ninja again, and which no lock left by a killed build holds up.
Each test builds once, in a subprocess with a cache of its own (a process can load only one such library)."""
from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from dnnlab import native
from tests.conftest import HANG_S

pytestmark = pytest.mark.skipif(native.available() != "", reason=f"native step unavailable: {native.available()}")

PACKAGE = Path(native.__file__).parent
PROBE = ("import logging; logging.basicConfig(level=logging.INFO, format='%(message)s'); "
         "from dnnlab import native; why = native.available(); "
         "print(native.__file__); print(native.build_directory()); print(why or 'ready')")
HOLD = ("import sys, time; from pathlib import Path; from dnnlab import native; "
        "lock = native._build_lock(Path(sys.argv[1])); lock.__enter__(); print('held', flush=True); time.sleep(600)")


def install(where: Path) -> Path:
    """A second copy of dnnlab's source, as another checkout is: the same text at another path."""
    shutil.copytree(PACKAGE, where / "dnnlab", ignore=shutil.ignore_patterns("__pycache__"))
    return where


def probe(root: Path, cache: Path) -> SimpleNamespace:
    """available() in a fresh process importing dnnlab from `root`, with `cache` as torch's extension cache."""
    env = {**os.environ, "PYTHONPATH": str(root), "TORCH_EXTENSIONS_DIR": str(cache)}
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, cwd=root,
                          timeout=HANG_S)
    assert done.returncode == 0, done.stderr
    file, folder, why = done.stdout.splitlines()[-3:]
    assert Path(file).is_relative_to(root), file  # this install's dnnlab, not the editable one
    return SimpleNamespace(folder=Path(folder), why=why, built="building dnnlab's native" in done.stderr)


def identity(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns


def test_installs_at_other_paths_share_one_build_that_none_of_them_redoes(tmp_path):
    """Two checkouts: the first builds; the second, and the first again, load that library as it is (same file,
    same inode: no ninja run replaced it), and no build files were left in the shared folder."""
    cache = tmp_path / "cache"
    a, b = install(tmp_path / "a"), install(tmp_path / "b")
    os.utime(b / "dnnlab" / "csrc" / "mlp_step.cpp")  # a newer source file with the same text: no rebuild either
    first = probe(a, cache)
    assert first.why == "ready" and first.built and first.folder.parent == cache
    library = first.folder / native.LIBRARY
    built = identity(library)
    for root in (b, a):
        again = probe(root, cache)
        assert again.why == "ready" and not again.built and again.folder == first.folder
        assert identity(library) == built
    assert sorted(p.name for p in first.folder.iterdir()) == ["build.lock", native.LIBRARY]
    # a library that cannot be loaded (a disk error, a half-copied cache) is built again, once: the next install
    # loads the new file
    library.write_bytes(b"not a shared library")
    rebuilt = probe(b, cache)
    assert rebuilt.why == "ready" and rebuilt.built and identity(library) != built
    assert probe(a, cache).built is False


def test_a_lock_left_by_a_killed_build_holds_up_no_build(tmp_path, monkeypatch):
    """A build killed with SIGKILL while holding the build lock, leaving its private folder with torch's lock file in
    it (a file that torch's FileBaton would wait on for ever): the next build goes ahead and clears that folder."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(cache))
    folder = native.build_directory()  # this checkout's, under the test's cache
    folder.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(PACKAGE.parent)}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        with open(folder / "build.lock") as f, pytest.raises(BlockingIOError):
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # really held while the holder lives
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=HANG_S)
        holder.stdout.close()
    left = folder / "build-killed"
    left.mkdir()
    (left / "lock").touch()
    (left / "mlp_step.o").write_bytes(b"half an object file")
    done = probe(PACKAGE.parent, cache)
    assert done.why == "ready" and done.built and done.folder == folder
    assert (folder / native.LIBRARY).is_file() and not left.exists()

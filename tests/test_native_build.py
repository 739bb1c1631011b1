"""The native step's build (dnnlab.fast.native.available): one library per machine, source text and torch version, which
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

from dnnlab.fast import native
from tests.conftest import HANG_S

pytestmark = pytest.mark.skipif(native.available() != "", reason=f"native step unavailable: {native.available()}")

PACKAGE = Path(native.__file__).parents[1]
PROBE = ("import logging; logging.basicConfig(level=logging.INFO, format='%(message)s'); "
         "from dnnlab.fast import native; why = native.available(); "
         "print(native.__file__); print(native.build_directory()); print(why or 'ready')")
HOLD = ("import sys, time; from pathlib import Path; from dnnlab.fast import native; "
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


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> SimpleNamespace:
    """Two checkouts (the same text at other paths, the second's source file newer) and one extension cache, in
    which the first has built the library."""
    tmp = tmp_path_factory.mktemp("installs")
    cache, a, b = tmp / "cache", install(tmp / "a"), install(tmp / "b")
    os.utime(b / "dnnlab" / "fast" / "csrc" / "mlp_step.cpp")  # a newer file with the same text: no rebuild either
    first = probe(a, cache)
    return SimpleNamespace(cache=cache, a=a, b=b, first=first, library=first.folder / native.LIBRARY)


def test_installs_at_other_paths_share_one_build_that_none_of_them_redoes(built):
    """The second checkout, and the first again, load that library as it is (same file, same inode: no ninja run
    replaced it), and no build files were left in the shared folder."""
    first = built.first
    assert first.why == "ready" and first.built and first.folder.parent == built.cache
    library = identity(built.library)
    for root in (built.b, built.a):
        again = probe(root, built.cache)
        assert again.why == "ready" and not again.built and again.folder == first.folder
        assert identity(built.library) == library
    assert sorted(p.name for p in first.folder.iterdir()) == ["build.lock", native.LIBRARY]


def test_a_broken_library_is_built_again_once_past_a_lock_left_by_a_killed_build(built):
    """A library that cannot be loaded (a disk error, a half-copied cache) is built again, once, although a build was
    killed with SIGKILL while holding the build lock and left its private folder with torch's lock file in it (a file
    that torch's FileBaton would wait on for ever); the next install loads the new library without building."""
    folder = built.first.folder
    env = {**os.environ, "PYTHONPATH": str(built.a), "TORCH_EXTENSIONS_DIR": str(built.cache)}
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
    before = identity(built.library)
    built.library.write_bytes(b"not a shared library")
    rebuilt = probe(built.b, built.cache)
    assert rebuilt.why == "ready" and rebuilt.built and rebuilt.folder == folder
    assert identity(built.library) != before and not left.exists()
    assert probe(built.a, built.cache).built is False

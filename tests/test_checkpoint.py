"""Checkpoints: atomic writes, safe loading (no code runs from a crafted file), every file that is not one refused
in one line naming it, stale temporary files of killed writers cleaned up."""
import io
import os
import subprocess
import sys
import zipfile

import pytest
import torch

from dnnlab import checkpoint
from dnnlab.errors import DnnlabError
from tests.conftest import HANG_S


class Payload:
    """Unpickling this would create a marker file: proof that loading ran code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mknod, (str(self.marker),))


def test_round_trip_of_tensors_and_plain_data(tmp_path):
    state = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "epoch": 3, "config": "a: 1", "betas": (0.9, 0.99)}
    checkpoint.save(tmp_path / "c.pt", state)
    loaded = checkpoint.load(tmp_path / "c.pt")
    assert torch.equal(loaded["model"]["w"], state["model"]["w"]) and loaded["epoch"] == 3
    assert loaded["format"] == checkpoint.FORMAT
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left behind


def test_a_crafted_checkpoint_is_refused_and_its_code_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"format": checkpoint.FORMAT, "model": Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(DnnlabError, match="refused to load, it asks to import"):
        checkpoint.load(tmp_path / "evil.pt")
    assert not marker.exists()


def test_foreign_and_corrupt_files_are_named(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"\x00\x01junk")
    with pytest.raises(DnnlabError, match="junk.pt: not a readable checkpoint"):
        checkpoint.load(tmp_path / "junk.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")  # a valid torch file, but not dnnlab's
    with pytest.raises(DnnlabError, match="not a dnnlab checkpoint"):
        checkpoint.load(tmp_path / "other.pt")
    with pytest.raises(DnnlabError, match="does not exist"):
        checkpoint.load(tmp_path / "missing.pt")


def test_a_failed_write_leaves_the_previous_version(tmp_path, monkeypatch):
    checkpoint.save(tmp_path / "c.pt", {"epoch": 1, "model": {}, "config": "a: 1"})

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(DnnlabError, match="No space left on device"):
        checkpoint.save(tmp_path / "c.pt", {"epoch": 2, "model": {}, "config": "a: 1"})
    monkeypatch.undo()
    assert checkpoint.load(tmp_path / "c.pt")["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def real_checkpoint(path) -> bytes:
    checkpoint.save(path, {"model": {"w": torch.arange(3000.0)}, "config": "a: 1", "epoch": 1})
    return path.read_bytes()


def junk(tmp_path, kind: str):
    """A path that is not a dnnlab checkpoint, of the given kind; returns it."""
    path = tmp_path / f"{kind}.pt"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("epoch: 3\nthis is a text file\n")
    elif kind == "passwd":  # the file of the bug report: a text that the unpickler read as opcodes (IndexError)
        path.write_bytes(b"root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n")
    elif kind == "random":
        path.write_bytes(os.urandom(4096))
    elif kind == "pickle":  # a plain pickle, as the legacy torch format starts
        path.write_bytes(b"\x80\x02}q\x00.")
    elif kind == "zip":  # a zip archive of another program
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("notes/readme.txt", "hello")
    elif kind == "zip_flat":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("readme.txt", "hello")
    elif kind in ("truncated_half", "truncated_tail", "corrupt_middle"):
        data = bytearray(real_checkpoint(tmp_path / "real.pt"))
        if kind == "truncated_half":
            data = data[: len(data) // 2]
        elif kind == "truncated_tail":
            data = data[:-5]
        else:  # the archive's directory is intact, the pickle and part of the data are not
            data[40:400] = os.urandom(360)
        path.write_bytes(bytes(data))
    elif kind == "list":
        torch.save([1, 2, 3], path)
    elif kind == "tensor":
        torch.save(torch.zeros(3), path)
    elif kind == "dict":
        torch.save({"model": {"w": torch.zeros(2)}, "config": "a: 1"}, path)  # no format marker
    elif kind == "marker_only":
        torch.save({"format": checkpoint.FORMAT, "epoch": 1}, path)  # no weights, no config
    elif kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "dangling":
        path.symlink_to(tmp_path / "gone.pt")
    elif kind == "huge":  # 16 GiB, sparse: nothing may read it whole
        with open(path, "wb") as f:
            f.truncate(16 << 30)
    return path


JUNK = ["empty", "text", "passwd", "random", "pickle", "zip", "zip_flat", "truncated_half", "truncated_tail",
        "corrupt_middle", "list", "tensor", "dict", "marker_only", "directory", "fifo", "dangling", "huge"]


@pytest.mark.parametrize("kind", JUNK)
def test_every_kind_of_junk_is_one_line_naming_the_file(tmp_path, kind):
    path = junk(tmp_path, kind)
    with pytest.raises(DnnlabError) as info:
        checkpoint.load(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message, message
    with pytest.raises(DnnlabError):  # through find() as `dnnlab eval` and transfer.source do
        checkpoint.load(checkpoint.find(path, "transfer.source"))


def test_the_kind_of_file_is_said(tmp_path):
    for kind, said in (("directory", "is a directory"), ("fifo", "is a fifo"), ("dangling", "dangling symlink"),
                       ("empty", "an empty file"), ("list", "a list without"), ("tensor", "a Tensor without"),
                       ("passwd", "not a torch.save archive"), ("zip", "a zip archive that torch cannot read"),
                       ("marker_only", "no model weights or saved config")):
        with pytest.raises(DnnlabError, match=said):
            checkpoint.load(junk(tmp_path, kind))
    with pytest.raises(DnnlabError, match=r"transfer.source=.*this one is a fifo"):
        checkpoint.find(tmp_path / "fifo.pt", "transfer.source")


def test_a_fifo_does_not_hang(tmp_path):
    """In a child process, so that a regression hangs only it (killed by the timeout), not the test run."""
    fifo = junk(tmp_path, "fifo")
    code = ("import sys; from dnnlab import checkpoint; from dnnlab.errors import DnnlabError\n"
            "try: checkpoint.load(sys.argv[1])\nexcept DnnlabError as e: print(e)")
    done = subprocess.run([sys.executable, "-c", code, str(fifo)], capture_output=True, text=True, timeout=HANG_S)
    assert done.returncode == 0 and "is a fifo" in done.stdout, done.stderr


def test_remove_stale_temporaries(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its id belongs to no process now (ids are not reused this soon)
    names = {"stale": f".last.pt.tmp{dead.pid}", "mine": f".best.pt.tmp{os.getpid()}",
             "alive": f".last.pt.tmp{os.getppid()}", "other": ".notes.txt", "kept": "last.pt"}
    for name in names.values():
        (tmp_path / name).write_bytes(b"x")
    removed = checkpoint.remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == sorted([names["stale"], names["mine"]])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([names["alive"], names["other"], names["kept"]])
    assert checkpoint.remove_stale_temporaries(tmp_path / "missing") == []


def test_load_reads_from_an_open_file_the_same(tmp_path):
    """load() reads through its own descriptor (not the path): the same tensors as torch.load of the path."""
    real_checkpoint(tmp_path / "c.pt")
    mine = checkpoint.load(tmp_path / "c.pt")
    theirs = torch.load(io.BytesIO((tmp_path / "c.pt").read_bytes()), weights_only=True)
    assert torch.equal(mine["model"]["w"], theirs["model"]["w"]) and mine["epoch"] == theirs["epoch"]


def test_a_compressed_checkpoint_is_refused_before_it_is_inflated(tmp_path):
    """torch.load reads deflated entries too: 4 MB of zeros would come from a few KB; dnnlab's files are stored."""
    real = tmp_path / "real.pt"
    checkpoint.save(real, {"model": {"w": torch.zeros(1 << 20)}, "config": "a: 1", "epoch": 1})
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(real) as source, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as target:
        for entry in source.infolist():
            target.writestr(entry.filename, source.read(entry))
    assert bomb.stat().st_size < real.stat().st_size / 100
    assert torch.load(bomb, weights_only=True)["epoch"] == 1  # torch itself would inflate it
    with pytest.raises(DnnlabError, match="compressed entries"):
        checkpoint.load(bomb)
    assert checkpoint.load(real)["epoch"] == 1

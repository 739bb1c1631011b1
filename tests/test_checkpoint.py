"""Checkpoints: atomic writes, safe loading (no code runs from a crafted file)."""
import os

import pytest
import torch

from dnnlab import checkpoint
from dnnlab.errors import DnnlabError


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
    checkpoint.save(tmp_path / "c.pt", {"epoch": 1})

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(DnnlabError, match="No space left on device"):
        checkpoint.save(tmp_path / "c.pt", {"epoch": 2})
    monkeypatch.undo()
    assert checkpoint.load(tmp_path / "c.pt")["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]

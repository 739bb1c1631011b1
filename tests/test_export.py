"""`dnnlab export`: a run trained on the tiny fixture data, written as safetensors, TorchScript and ONNX, each file
read back here by its own library and compared with dnnlab's predictions; bad input and a failing check are one
line each, and leave nothing behind."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from dnnlab import CONF_DIR, export
from dnnlab.train import train
from dnnlab.trained import load_trained, logits_of
from tests.conftest import HANG_S

SMALL = ("model.n_hidden=2", "model.n_neurons=32")


@pytest.fixture(scope="module")
def run(data_root, tmp_path_factory) -> Path:
    """One short run on the tiny data (batch norm and dropout: layers whose inference mode an export must keep)."""
    folder = tmp_path_factory.mktemp("run")
    overrides = [f"data.root={data_root}", "data.val_size=100", "trainer.progress=false", "trainer.epochs=2", *SMALL,
                 "norm=batchnorm", "regularizer=dropout", "activation=rrelu"]
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("DNNLAB_DATA", raising=False)
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("train", overrides=overrides)
        assert train(cfg, folder)["status"] == "completed"
    return folder


@pytest.fixture(autouse=True)
def no_data_env(monkeypatch):
    monkeypatch.delenv("DNNLAB_DATA", raising=False)


def reloaded_logits(path: Path, fmt: str, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The file's logits, read independently of dnnlab.export."""
    if fmt == "safetensors":
        from safetensors.torch import load_file

        fresh = copy.deepcopy(model)
        for p in fresh.parameters():
            p.data.zero_()  # nothing of the original weights is left but what the file brings
        fresh.load_state_dict(load_file(str(path)))
        return logits_of(fresh.eval(), x)
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return logits_of(torch.jit.load(str(path)).eval(), x)
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(["logits"], {"input": x.numpy()})[0])


@pytest.mark.parametrize("fmt", list(export.FORMATS))
def test_each_format_is_written_checked_and_reloads_to_the_same_predictions(run, fmt, capsys):
    export.main([str(run), "--format", fmt])
    out = capsys.readouterr()
    path = run / "export" / f"best{export.FORMATS[fmt]}"
    assert path.is_file() and path.stat().st_size > 1000
    lines = out.out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{path}: {fmt}, ") and "KiB" in lines[0], out.out
    assert "check passed: 120 test examples compared, predictions identical, max |logit difference|" in lines[0]
    trained = load_trained(run / "checkpoints" / "best.pt")
    x = trained.data.x_test
    expected = logits_of(trained.model, x)
    got = reloaded_logits(path, fmt, trained.model, x)
    assert torch.equal(got.argmax(1), expected.argmax(1))
    assert (got - expected).abs().max().item() <= 1e-4 * max(1.0, expected.abs().max().item())
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporary left


def test_safetensors_carries_the_runs_config(run, tmp_path):
    from safetensors import safe_open

    path, check = export.export_run(run, "safetensors", tmp_path, quiet=True)
    assert path == tmp_path / "best.safetensors" and check.passed and check.max_diff == 0.0
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "dnnlab-export/1" and json.loads(meta["classes"]) == list(range(10))
    assert "n_neurons: 32" in meta["config"]


def test_checkpoint_last_and_a_checkpoint_file(run, tmp_path):
    path, _ = export.export_run(run, "torchscript", tmp_path, which="last", quiet=True)
    assert path.name == "last.torchscript.pt"
    path, _ = export.export_run(run / "checkpoints" / "final.pt", "safetensors", tmp_path / "w.st", quiet=True)
    assert path == tmp_path / "w.st" and path.is_file()


def one_error_line(capsys, argv: list[str], status: int) -> str:
    with pytest.raises(SystemExit) as exited:
        export.main(argv)
    assert exited.value.code == status
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_bad_input_is_one_line_and_exit_2(run, tmp_path, capsys, monkeypatch):
    line = one_error_line(capsys, [str(run), "--format", "onx"], 2)
    assert line == "error: --format='onx' is not allowed: safetensors, torchscript, onnx; did you mean onnx?"
    line = one_error_line(capsys, [str(tmp_path / "nope"), "--format", "onnx"], 2)
    assert "nope' is not allowed: an existing run directory or checkpoint file (this one does not exist)" in line
    line = one_error_line(capsys, [str(run), "--format", "onnx", "--checkpoint", "lats"], 2)
    assert line.endswith("best or last; did you mean last?")
    line = one_error_line(capsys, [str(run / "checkpoints" / "last.pt"), "--format", "onnx", "--checkpoint", "best"], 2)
    assert "chooses a checkpoint of a run folder" in line
    line = one_error_line(capsys, [str(run), "--format", "onnx", "--out", str(run / "checkpoints" / "best.pt")], 2)
    assert "another file than the checkpoint" in line
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` fails as if not installed
    line = one_error_line(capsys, [str(run), "--format", "onnx"], 2)
    assert line == ("error: --format=onnx needs dnnlab's optional packages 'export' (onnxruntime is not installed): "
                    "pip install 'dnnlab[export]'")
    assert not list(tmp_path.iterdir())


def perturbed_safetensors(run) -> bytes:
    """What a faulty writer would produce: the right format, an output bias off by 0.5."""
    from safetensors.torch import save

    tensors = {k: v.clone() for k, v in run.model.state_dict().items()}
    tensors["output.bias"] += 0.5
    return save(tensors)


@pytest.mark.parametrize("fmt,writer,says", [
    ("safetensors", perturbed_safetensors, "predictions identical, max |logit difference| 5.00e-01"),
    ("onnx", lambda run: b"not an onnx model", "does not load with onnx's reader"),
    ("torchscript", lambda run: b"PK\x03\x04 truncated", "does not load with torchscript's reader"),
])
def test_a_failing_check_is_one_line_exit_1_and_leaves_nothing(run, tmp_path, capsys, monkeypatch, fmt, writer, says):
    monkeypatch.setitem(export.WRITERS, fmt, writer)
    earlier = tmp_path / "model.bin"
    earlier.write_bytes(b"an earlier export")
    line = one_error_line(capsys, [str(run), "--format", fmt, "--out", str(earlier)], 1)
    assert line.startswith("error: ") and says in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin"]
    assert earlier.read_bytes() == b"an earlier export"
    folder = run / "export"
    before = sorted(folder.iterdir()) if folder.exists() else None
    one_error_line(capsys, [str(run), "--format", fmt], 1)
    assert (sorted(folder.iterdir()) if folder.exists() else None) == before  # no file, no new RUN/export folder


def test_the_command_is_registered(run):
    done = subprocess.run([sys.executable, "-m", "dnnlab", "export", str(run), "--format", "safetensor"],
                          capture_output=True, text=True, timeout=HANG_S)
    assert done.returncode == 2
    assert done.stderr.strip().endswith("did you mean safetensors?")
    usage = subprocess.run([sys.executable, "-m", "dnnlab"], capture_output=True, text=True, timeout=HANG_S).stdout
    assert "  export " in usage

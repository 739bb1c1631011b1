"""The trust boundary, attacked: a command line that names callables for Hydra to build, and files dnnlab did not
write (a checkpoint's saved config, a transfer source, a reused run directory, a run folder to report on) that try
to run code, hang the parser or read the environment. Each attack runs the real command line in a subprocess;
a marker file must not appear, the command must end within a time limit (a hang is a failure), with exit 2 and
one line."""
from __future__ import annotations

import os
import pickle
import subprocess
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from dnnlab import CONF_DIR, checkpoint
from dnnlab.model import build_mlp
from tests import forked

# nine levels of nine aliases: 9^9 nodes once expanded
ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefgh", "bcdefghi"))


def dnnlab(*args: str, cwd: Path, data_root: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **({"DNNLAB_DATA": str(data_root)} if data_root else {})}
    env.pop("DNNLAB_ALLOWED_TARGETS", None)
    return forked.dnnlab(*args, cwd=cwd, env=env)


def refused(done: subprocess.CompletedProcess, *expected: str) -> str:
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def crafted(data_root, tmp_path):
    """crafted(edit) -> a checkpoint of a real (untrained) network whose saved config `edit` rewrote."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"data.root={data_root}", "data.val_size=100", "model.n_hidden=1",
                                          "model.n_neurons=8"])
    state = {"model": build_mlp(cfg, 10).state_dict(), "config": OmegaConf.to_yaml(cfg, resolve=True),
             "classes": list(range(10)), "epoch": 1}

    def make(edit, name="crafted.pt") -> Path:
        path = tmp_path / name
        checkpoint.save(path, {**state, "config": edit(state["config"])})
        return path

    return make


# --- the command line: what Hydra builds before the task starts ------------------------------------------------

def test_a_target_in_a_list_on_the_command_line_does_not_run(data_root, tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    done = dnnlab("train", f"+activation._args_=[{{_target_:builtins.open,file:{victim},mode:w}}]", "debug=smoke",
                  cwd=tmp_path, data_root=data_root)
    refused(done, "activation._args_[0]._target_='builtins.open'")
    assert victim.read_text() == "precious"


@pytest.mark.parametrize("args", [
    ["+hydra.callbacks.x._target_=builtins.open", "+hydra.callbacks.x.file={marker}", "+hydra.callbacks.x.mode=w"],
    ["-m", "+hydra.launcher.x={{_target_:builtins.open,file:{marker},mode:w}}", "optimizer=adam,sgd"],
    ["-m", "hydra/sweeper=optuna", "+hydra.sweeper.x={{_target_:builtins.open,file:{marker},mode:w}}"],
    ["-m", "hydra/launcher=joblib", "+hydra.launcher.x=[{{_target_:builtins.open,file:{marker},mode:w}}]",
     "optimizer=adam,sgd"],
    ["+foo={{_target_:builtins.open,file:{marker},mode:w}}", "+hydra.callbacks.x=${{foo}}"],
    ["-m", "+foo={{_target_:builtins.open,file:{marker},mode:w}}", "+hydra.launcher.x=${{foo}}", "optimizer=adam,sgd"],
], ids=["callback", "launcher setting", "sweeper setting", "inside a list", "callback by interpolation",
        "launcher setting by interpolation"])
def test_hydra_parts_that_are_not_known_are_refused_before_hydra_builds_them(data_root, tmp_path, args):
    marker = tmp_path / "marker"
    done = dnnlab("train", *[a.format(marker=marker) for a in args], "debug=smoke", cwd=tmp_path,
                  data_root=data_root)
    refused(done, "_target_='builtins.open' is not allowed")
    assert not marker.exists() and not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("override,expected", [
    ("hydra.job_logging.handlers.console.class=builtins.open", "class='builtins.open'"),
    ("+foo={class:builtins.open} hydra.job_logging.handlers.console=${foo}", "class='builtins.open'"),
    ("hydra.job_logging.handlers.console.stream=ext://os.system", "stream='ext://os.system'"),
])
def test_logging_factories_are_only_the_logging_packages(data_root, tmp_path, override, expected):
    marker = tmp_path / "marker"
    target = [f"+hydra.job_logging.handlers.console.file={marker}", "+hydra.job_logging.handlers.console.mode=w"]
    if "${" in override:  # the whole handler comes from the interpolation
        override, target = override.replace("{class:", f"{{filename:{marker},mode:w,class:"), []
    done = dnnlab("train", *override.split(), *target, "debug=smoke", cwd=tmp_path, data_root=data_root)
    refused(done, expected)
    assert not marker.exists()


class _Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_hydras_pickle_rerun_is_refused(tmp_path):
    marker = tmp_path / "marker"
    (tmp_path / "config.pickle").write_bytes(pickle.dumps(_Payload(marker)))
    refused(dnnlab("train", "--experimental-rerun", str(tmp_path / "config.pickle"), cwd=tmp_path),
            "--experimental-rerun loads a pickle file")
    assert not marker.exists()


# --- files dnnlab did not write: data, never code ---------------------------------------------------------------

def test_a_checkpoint_whose_config_calls_a_function_in_a_list_does_not_run(crafted, tmp_path):
    marker = tmp_path / "marker"
    path = crafted(lambda text: text.replace(
        "_target_: torch.nn.ELU", f"_target_: torch.nn.ELU\n  _args_:\n  - _target_: builtins.open\n"
                                  f"    file: {marker}\n    mode: w"))
    refused(dnnlab("eval", str(path), cwd=tmp_path), "activation._args_[0]._target_='builtins.open'")
    assert not marker.exists()


def test_a_yaml_alias_bomb_in_a_checkpoint_is_refused_at_once(crafted, tmp_path):
    path = crafted(lambda text: text + ALIAS_BOMB)
    refused(dnnlab("eval", str(path), cwd=tmp_path), "a YAML alias", str(path))


def test_interpolations_in_a_saved_config_are_not_resolved(crafted, tmp_path, data_root):
    path = crafted(lambda text: text.replace(f"root: {data_root}", "root: ${oc.env:HOME}"))
    refused(dnnlab("eval", str(path), cwd=tmp_path), "an interpolation at data.root", "${oc.env:HOME}")


def test_a_saved_config_is_checked_with_the_command_lines_rules(crafted, tmp_path):
    path = crafted(lambda text: text.replace("n_neurons: 8", "n_neurons: -8"))
    refused(dnnlab("eval", str(path), cwd=tmp_path), "in its saved config, model.n_neurons=-8 is not allowed")


def test_a_transfer_source_with_an_alias_bomb_is_refused(crafted, tmp_path, data_root):
    path = crafted(lambda text: text + ALIAS_BOMB)
    refused(dnnlab("train", "transfer=reuse", f"transfer.source={path}", "data.val_size=100", "debug=smoke", cwd=tmp_path,
                   data_root=data_root), "a YAML alias")


def test_a_reused_run_directory_whose_checkpoint_has_an_alias_bomb_is_refused(crafted, tmp_path, data_root):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    crafted(lambda text: text + ALIAS_BOMB, name="run/checkpoints/last.pt")
    refused(dnnlab("train", f"hydra.run.dir={run}", "data.val_size=100", "debug=smoke", cwd=tmp_path,
                   data_root=data_root),
            "a YAML alias")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.pt"]


def test_report_reads_a_run_folders_alias_bomb_without_hanging(tmp_path):
    run = tmp_path / "sweep" / "0"
    (run / ".hydra").mkdir(parents=True)
    for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
        (run / ".hydra" / name).write_text(ALIAS_BOMB)
    done = dnnlab("report", str(tmp_path / "sweep"), cwd=tmp_path)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr


@pytest.mark.parametrize("edit,expected", [
    (lambda text: text.replace("n_hidden: 1", "n_hidden: 10000"), "parameters, its weights hold 6,370 numbers"),
    (lambda text: text.replace("n_hidden: 1", "n_hidden: 100000000"), "model.n_hidden=100000000 is not allowed"),
    (lambda text: text.replace("  root: ", "  root: 123 #"), "data.root=123 is not allowed"),
], ids=["a network larger than its weights", "a huge depth", "a number as a path"])
def test_a_saved_config_that_does_not_describe_its_weights_is_one_line(crafted, tmp_path, edit, expected):
    refused(dnnlab("eval", str(crafted(edit)), cwd=tmp_path), expected)


def test_report_does_not_read_this_machines_environment_for_a_run_folder(tmp_path):
    """A run folder's config may hold `${oc.env:...}`: report shows it as text, it never resolves it."""
    for n, lr in ((0, "0.1"), (1, "${oc.env:DNNLAB_TEST_SECRET}")):
        run = tmp_path / "sweep" / str(n)
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "config.yaml").write_text(f"optimizer:\n  lr: {lr}\n")
        (run / ".hydra" / "overrides.yaml").write_text("- optimizer.lr=0.1\n" if n == 0 else "[]\n")
    os.environ["DNNLAB_TEST_SECRET"] = "hunter2"
    try:
        done = dnnlab("report", str(tmp_path / "sweep"), cwd=tmp_path)
    finally:
        del os.environ["DNNLAB_TEST_SECRET"]
    assert done.returncode == 0, done.stderr
    written = "".join(p.read_text() for p in (tmp_path / "sweep").glob("report.*") if p.suffix in (".csv", ".md"))
    assert "hunter2" not in done.stdout + written and "oc.env:DNNLAB_TEST_SECRET" in written


def test_report_reads_a_fifo_or_a_quoted_alias_bomb_without_hanging(tmp_path):
    run = tmp_path / "sweep" / "0"
    (run / ".hydra").mkdir(parents=True)
    os.mkfifo(run / ".hydra" / "hydra.yaml")
    (run / ".hydra" / "config.yaml").write_text('"' + ALIAS_BOMB.replace("\n", "\\n") + '"')  # one quoted string
    (run / ".hydra" / "overrides.yaml").write_text("- optimizer.lr=0.1\n")
    done = dnnlab("report", str(tmp_path / "sweep"), cwd=tmp_path)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr

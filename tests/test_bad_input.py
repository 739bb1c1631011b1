"""The catalogue of bad inputs: each stops before training with one line (the key, the value, what is allowed or
what to do), and leaves what was already in the run directory untouched. Exit codes and the absence of tracebacks
at the command line are checked for a sample through real subprocesses."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from dnnlab.errors import DnnlabError
from dnnlab.train import train
from tests.conftest import HANG_S, write_dataset
from tests.forked import dnnlab
from tests.test_data import damage

CATALOGUE = [  # (overrides, what the line must contain)
    # wrong types
    ("optimizer.lr=abc", "optimizer.lr='abc'"),
    ("trainer.epochs=two", "trainer.epochs='two'"),
    ("trainer.batch_size=1.5", "trainer.batch_size=1.5"),
    ("trainer.deterministic=maybe", "trainer.deterministic"),
    # numbers out of range
    ("optimizer.lr=0", "optimizer.lr=0 is not allowed: a number > 0"),
    ("optimizer.lr=-0.1", "optimizer.lr=-0.1"),
    ("optimizer=momentum optimizer.momentum=1.0", "optimizer.momentum=1.0"),
    ("optimizer.betas=[0.9,1.2]", "optimizer.betas=[0.9, 1.2]"),
    ("trainer.clip_norm=0", "trainer.clip_norm=0"),
    ("regularizer=dropout regularizer.dropout.rate=1.0", "regularizer.dropout.rate=1.0 is not allowed: a rate in [0, 1)"),
    ("regularizer=dropout regularizer.dropout.rate=-0.1", "regularizer.dropout.rate=-0.1"),
    ("regularizer=l2 regularizer.l2=-1", "regularizer.l2=-1"),
    ("regularizer=max_norm regularizer.max_norm=0", "regularizer.max_norm=0"),
    ("trainer.batch_size=0", "trainer.batch_size=0"),
    ("trainer.epochs=0", "trainer.epochs=0"),
    ("trainer.early_stopping.patience=-1", "trainer.early_stopping.patience=-1"),
    ("schedule=1cycle schedule.pct_rise=0.6", "schedule.pct_rise=0.6"),
    ("schedule=performance schedule.factor=1.5", "schedule.factor=1.5"),
    ("schedule.warmup_steps=-5", "schedule.warmup_steps=-5"),
    ("init=normal init.std=-1", "init.std=-1"),
    ("activation=leaky_relu activation.negative_slope=-0.2", "activation.negative_slope=-0.2"),
    ("model.n_neurons=0", "model.n_neurons=0"),
    # classes and sample sizes
    ("data.classes=[0,10]", "data.classes=[0, 10]"),
    ("data.classes=[1,1]", "data.classes=[1, 1]"),
    ("data.classes=[3]", "data.classes=[3]"),
    ("data.n_per_class=0", "data.n_per_class=0"),
    ("data.n_per_class=1000", "data.n_per_class=1000 is not allowed: at most"),
    ("data.val_size=600", "data.val_size=600 is not allowed: an integer from 1 to 599"),
    ("data.val_from=middle", "data.val_from='middle' is not allowed: first or last"),
    ("data.folds=5 data.fold=5", "data.fold=5"),
    # names that are not options
    ("data.standardize=zscore", "data.standardize='zscore'"),
    ("trainer.precision=fp8", "trainer.precision='fp8'"),
    ("trainer.device=tpu", "trainer.device='tpu'"),
    ("trainer.native=maybe", "trainer.native='maybe' is not allowed: auto, true or false"),
    ("norm=batchnorm trainer.native=true", "trainer.native=true is not possible here: BatchNorm1d layers"),
    ("trainer.early_stopping.monitor=accuracy", "trainer.early_stopping.monitor='accuracy'"),
    # contradictory settings
    ("regularizer=[dropout,alpha_dropout]", "choose dropout or alpha_dropout, not both"),
    ("regularizer=dropout regularizer.dropout.top_k=9", "regularizer.dropout.top_k=9 is not allowed: at most"),
    ("model.n_neurons=[300,100]", "model.n_hidden=5 is not allowed: the length of model.n_neurons (2)"),
    ("schedule=piecewise schedule.values=[0.1]", "schedule.values=[0.1]"),
    ("transfer=reuse transfer.source=/nonexistent transfer.reuse_layers=9", "transfer.reuse_layers=9"),
    ("transfer=reuse transfer.source=/nonexistent transfer.unfreeze_top=6", "transfer.unfreeze_top=6"),
    ("transfer=reuse transfer.source=/nonexistent transfer.freeze=false transfer.cache=true", "transfer.cache"),
    # paths
    ("data.root=/no/such/folder", "data.root='/no/such/folder'"),
    ("transfer=reuse transfer.source=/no/such/run", "transfer.source='/no/such/run'"),
    # components that must not be called
    ("optimizer._target_=os.system", "optimizer._target_='os.system'"),
    ("init._target_=subprocess.run", "init._target_='subprocess.run'"),
    # Hydra follows attributes through modules: a dnnlab prefix alone would let these in
    ("activation._target_=dnnlab.train.os.system", "activation._target_='dnnlab.train.os.system'"),
    ("init._target_=dnnlab.checkpoint.atomic_write", "init._target_='dnnlab.checkpoint.atomic_write'"),
]
if not torch.cuda.is_available():
    CATALOGUE.append(("trainer.device=cuda", "trainer.device='cuda' is not allowed: no CUDA device here"))


@pytest.fixture
def run_dir(tmp_path):
    """A run directory that already holds something of value."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "keep.txt").write_text("earlier results")
    return run_dir


def assert_untouched(run_dir):
    assert sorted(p.name for p in run_dir.iterdir()) == ["keep.txt"]
    assert (run_dir / "keep.txt").read_text() == "earlier results"


@pytest.mark.parametrize("overrides,expected", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_bad_input_is_one_line_and_harmless(make_cfg, run_dir, overrides, expected):
    with pytest.raises(DnnlabError) as info:
        train(make_cfg(*overrides.split()), run_dir)
    message = str(info.value)
    assert expected in message and "\n" not in message
    assert_untouched(run_dir)


@pytest.mark.parametrize("stem,how,expected", [
    ("train-images-idx3-ubyte", "truncate", "truncated or corrupt"),
    ("t10k-labels-idx1-ubyte", "magic", "bad magic number"),
    ("t10k-labels-idx1-ubyte", "label", "label 12 outside 0-9"),
    ("train-labels-idx1-ubyte", "count", "labels"),
])
def test_broken_data_files_are_named(make_cfg, run_dir, tmp_path, stem, how, expected):
    folder = write_dataset(tmp_path / "broken" / "FashionMNIST" / "raw")
    path = damage(folder, stem, how)
    with pytest.raises(DnnlabError, match=expected) as info:
        train(make_cfg(f"data.root={tmp_path / 'broken'}"), run_dir)
    assert path.name.split(".")[0] in str(info.value) and "\n" not in str(info.value)
    assert_untouched(run_dir)


def test_missing_data_lists_the_places_tried(make_cfg, run_dir, tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise RuntimeError("no network")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr("dnnlab.data.SYSTEM_COPIES", {"mnist": [], "fashion_mnist": []})
    folder = write_dataset(tmp_path / "partial")
    (folder / "t10k-labels-idx1-ubyte").unlink()  # three of the four files
    with pytest.raises(DnnlabError, match="fashion_mnist not found; tried: .*partial.*no network") as info:
        train(make_cfg(f"data.root={folder}"), run_dir)
    assert "apt-get install dataset-fashion-mnist" in str(info.value)
    assert_untouched(run_dir)


def test_checkpoints_that_are_not_ours_are_refused(make_cfg, run_dir, tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
    with pytest.raises(DnnlabError, match="not a readable checkpoint"):
        train(make_cfg("transfer=reuse", f"transfer.source={tmp_path / 'junk.pt'}"), run_dir)
    assert_untouched(run_dir)


def test_alpha_dropout_without_selu_is_allowed_but_warned(make_cfg, tmp_path, caplog):
    summary = train(make_cfg("regularizer=alpha_dropout", "activation=relu"), tmp_path)
    assert summary["status"] == "completed"
    assert "alpha_dropout keeps SELU's self-normalisation" in caplog.text


def test_other_torch_components_are_allowed_and_more_can_be_allowed_by_name(make_cfg, monkeypatch):
    from dnnlab.validate import check

    check(make_cfg("activation._target_=torch.nn.Hardswish", "init._target_=torch.nn.init.kaiming_uniform_"))
    cfg = make_cfg("activation._target_=collections.OrderedDict")
    with pytest.raises(DnnlabError, match="DNNLAB_ALLOWED_TARGETS"):
        check(cfg)
    monkeypatch.setenv("DNNLAB_ALLOWED_TARGETS", "collections.OrderedDict")
    check(cfg)
    monkeypatch.setenv("DNNLAB_ALLOWED_TARGETS", "collections.")  # a trailing dot: everything under it
    check(cfg)
    # ...defined under it: the importer follows attributes, and logging.os.system is os.system
    monkeypatch.setenv("DNNLAB_ALLOWED_TARGETS", "logging.")
    check(make_cfg("activation._target_=logging.StreamHandler"))
    with pytest.raises(DnnlabError, match="activation._target_='logging.os.system' is not allowed"):
        check(make_cfg("activation._target_=logging.os.system"))


def test_a_target_inside_a_list_is_checked_too(make_cfg, tmp_path):
    """Hydra instantiates a _target_ nested in a list (e.g. in _args_), so the allow-list walks lists as well."""
    from dnnlab.validate import check

    victim = tmp_path / "victim"
    cfg = make_cfg(f"+activation._args_=[{{_target_:builtins.open,file:{victim},mode:w}}]")
    with pytest.raises(DnnlabError, match=r"activation\._args_\[0\]\._target_.*builtins\.open"):
        check(cfg)
    assert not victim.exists()


def test_an_unwritable_run_directory_is_one_line(make_cfg, tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(DnnlabError, match="cannot write to the run directory") as info:
        train(make_cfg(), tmp_path / "file" / "run")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("args,expected", [
    (["optimizer=foo"], "Could not find 'optimizer/foo'"),
    (["optimizer.foo=1"], "'optimizer.foo' is not a setting of torch.optim.Adam"),
    (["trainer.epoch=3"], "unknown key 'trainer.epoch': did you mean trainer.epochs?"),
    (["optimizer.lr=["], "no viable alternative"),
    (["optimizer.lr=-1"], "optimizer.lr=-1 is not allowed"),
    (["data.classes=[0,12]"], "data.classes=[0, 12]"),
    (["hydra.run.dir=/etc/passwd/run"], "/etc/passwd is not a folder"),
])
def test_command_line_errors_exit_2_with_one_line(data_root, tmp_path, args, expected):
    done = dnnlab("train", *args, "trainer.progress=false", cwd=tmp_path,
                  env={**os.environ, "DNNLAB_DATA": str(data_root)})
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_selu_with_batch_norm_is_allowed_but_warned(make_cfg, tmp_path, caplog):
    summary = train(make_cfg("activation=selu", "init=lecun_normal", "norm=batchnorm", "trainer.epochs=1"), tmp_path)
    assert summary["status"] == "completed"
    assert "SELU normalises itself; norm=batch" in caplog.text


def test_a_run_folder_on_a_read_only_file_system_is_one_line_and_untouched(data_root, tmp_path):
    """The run folder holds a finished run; mounted read-only (a bind mount in a user and mount namespace of its
    own, as unshare makes it without privileges) the same command is refused in one line."""
    if not shutil.which("unshare") or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("needs unshare (util-linux) and user namespaces, to mount a folder read-only without root")
    run = tmp_path / "run"
    args = [sys.executable, "-m", "dnnlab", "train", "data.val_size=100", "trainer.epochs=1", "trainer.progress=false",
            f"hydra.run.dir={run}"]
    env = {**os.environ, "DNNLAB_DATA": str(data_root)}
    assert subprocess.run(args, env=env, capture_output=True, timeout=HANG_S).returncode == 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    script = f'mount --bind "{run}" "{run}" && mount -o remount,bind,ro "{run}" && exec "$@"'
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", *args], env=env, capture_output=True,
                          text=True, timeout=HANG_S)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert f"hydra.run.dir='{run}' is not allowed: a folder dnnlab can write to ({run} is read-only here)" in lines[0]
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_memory_estimate_is_a_lower_bound_of_what_training_holds(make_cfg, precision):
    """needed_bytes never exceeds what a real step holds: the weights, their gradients and the tensors autograd
    saves for the backward pass (measured with saved-tensor hooks; bf16 under autocast)."""
    from dnnlab.memory import n_parameters, needed_bytes
    from dnnlab.model import build_mlp

    cfg = make_cfg("model.n_hidden=2", "model.n_neurons=[300,100]", "trainer.batch_size=64",
                   f"trainer.precision={precision}")
    net = build_mlp(cfg, 10)
    params = sum(p.numel() for p in net.parameters())
    assert n_parameters(cfg, 10) == params
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size() if not isinstance(t, torch.nn.Parameter) else 0)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss = net(torch.rand(64, 784)).float().sum()
    loss.backward()
    held = 4 * (params + sum(p.grad.numel() for p in net.parameters())) + sum(saved)
    assert needed_bytes(cfg, 10) <= held


def test_a_stack_that_cannot_fit_is_refused(make_cfg, monkeypatch):
    from dnnlab import memory

    cfg = make_cfg("model.n_neurons=1000")
    need = memory.needed_bytes(cfg, 10)
    monkeypatch.setattr(memory, "available_bytes", lambda device: 3 * need)  # room for 3 copies, not 8
    memory.check_fits(cfg, torch.device("cpu"), copies=3)
    with pytest.raises(DnnlabError, match="model.n_neurons=1000 is not allowed: a size that fits: training 8 of"):
        memory.check_fits(cfg, torch.device("cpu"), copies=8)


def test_an_error_line_keeps_its_brackets(capsys):
    """Messages are text: Hydra's `use key=[value1,value2]` must not be read as rich markup and lose its list."""
    from dnnlab.ui import error

    error("use key=[value1,value2] or [bold]x[/]")
    assert capsys.readouterr().err.strip() == "error: use key=[value1,value2] or [bold]x[/]"


# --- Hydra's messages on one line, and the names a command line may use ----------------------------------------

@pytest.mark.parametrize("message,expected", [
    ("Could not override 'optimzer'.\nTo append to your config use +optimzer=adam",
     "Could not override 'optimzer'. To append to your config use +optimzer=adam"),
    ("Could not append to config. An item is already at 'a.b'.\nEither remove + prefix: 'a.b=1'\n"
     "Or add a second + to add or override 'a.b': '++a.b=1'",
     "Could not append to config. An item is already at 'a.b'. Either remove + prefix: 'a.b=1'. Or add a second + "
     "to add or override 'a.b': '++a.b=1'"),
    ("In 'train': Could not find 'optimizer/foo'\n\nAvailable options in 'optimizer':\n\tadam\n\tsgd\n"
     "Config search path:\n\tprovider=hydra, path=pkg://hydra.conf",
     "In 'train': Could not find 'optimizer/foo'. Available options in 'optimizer': adam, sgd"),
    ("Multiple values for optimizer.\nTo override a value use 'override optimizer: adam'",
     "Multiple values for optimizer. To override a value use 'override optimizer: adam'"),
    ("first clause\nsecond clause", "first clause; second clause"),
])
def test_hydras_lines_are_joined_as_sentences(message, expected):
    from hydra.errors import ConfigCompositionException

    from dnnlab.cli import one_line

    assert one_line(ConfigCompositionException(message)) == expected


@pytest.mark.parametrize("override,expected", [
    ("optimizer.lr=[", "cannot parse 'optimizer.lr=[': no viable alternative at input '['. See https://hydra.cc/"),
    ('a="b', "cannot parse 'a=\"b': unexpected text. See https://hydra.cc/"),
    ("a=b)", "cannot parse 'a=b)': Error parsing override 'a=b)'; extraneous input ')' expecting <EOF>. See https"),
])
def test_an_override_that_does_not_parse_is_named(override, expected):
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    from dnnlab.cli import one_line

    with pytest.raises(OverrideParseException) as info:
        OverridesParser.create().parse_overrides([override])
    assert one_line(info.value).startswith(expected), one_line(info.value)


@pytest.mark.parametrize("argv", [
    ["+regularizer.max_norm=1.0"],  # a key of another option of the group
    ["regularizer=[l2,dropout]", "regularizer.dropout.rate=0.3", "++regularizer.l2=0.1"],
    ["+optimizer.amsgrad=true"],  # a setting torch.optim.Adam takes
    ["optimizer=sgd", "+optimizer.nesterov=true", "+optimizer.dampening=0.1"],
    ["activation._target_=torch.nn.Hardswish", "+activation.inplace=true"],  # the settings of the component named
    ["+activation._args_=[1]"],  # Hydra's settings of a component: the target checks decide
    ["experiment=ed1/ex8"], ["-m", "experiment=ed1/ex8,ed1/l1", "trainer.seed=1,2", "data.seed=${trainer.seed}"],
    ["-m", "hydra/sweeper=optuna", "optimizer.lr=tag(log, interval(1e-4, 1e-1))", "optimizer=choice(adam,nadam)"],
    ["-m", "hydra/launcher=joblib", "++hydra.launcher.pre_dispatch=4", "+hydra.job.env_set.X=1", "optimizer=adam,sgd"],
    ["-m", "optimizer=sgd,no_such_optimizer"],  # a sweep's option: that job fails on its own, the others run
    ["--cfg", "job", "++trainer.epochs=3", "~optimizer.weight_decay"],  # a torch argument (trainer keys: refused)
    # a sweep's components only, not the group's default (Adam) that no job has; glob(...) over the options
    ["-m", "optimizer=sgd,momentum", "+optimizer.dampening=0.1"],
    ["-m", "optimizer=glob(sgd)", "+optimizer.nesterov=true"],
    ["-m", "activation._target_=torch.nn.Hardshrink,torch.nn.Softshrink", "+activation.lambd=0.3"],
    # a key of the option the run takes: on the command line, from a preset, in some job of a sweep
    ["transfer=reuse", "transfer.reuse_layers=2"],
    ["experiment=transfer_5_9", "transfer.source=X", "transfer.reuse_layers=4"],
    ["-m", "diagnostics=none,on", "+diagnostics.every=5"],
    ["-m", "experiment=mnist_0_4,transfer_5_9", "+transfer.reuse_layers=4"],
])
def test_legitimate_additions_pass_the_key_check(argv):
    from dnnlab.hydra_guard import check_command_line

    check_command_line("train", argv)


@pytest.mark.parametrize("argv,expected", [
    (["diagnostics.every=5"],  # Hydra: "To append to your config use +diagnostics.every=5", then ignored
     "diagnostics.every=5 is a setting of diagnostics=on (this run has diagnostics=none): add diagnostics=on"),
    (["+transfer.reuse_layers=2"],
     "transfer.reuse_layers=2 is a setting of transfer=reuse (this run has transfer=none): add transfer=reuse"),
    (["norm=layernorm", "++norm.momentum=0.1"], "norm.momentum=0.1 is a setting of norm=batchnorm or "
                                                "norm=input_batchnorm (this run has norm=layernorm): add norm="),
    (["-m", "experiment=mnist_0_4,transfer_5_9", "transfer=none", "+transfer.freeze=false"],  # the line's pick wins
     "transfer.freeze=false is a setting of transfer=reuse (this run has transfer=none)"),
    (["-m", "diagnostics=none,none", "+diagnostics.every=5"], "(this run has diagnostics=none)"),
    (["-m", "optimizer=glob(*mentum)", "+optimizer.amsgrad=true"],  # momentum: SGD, not the default's Adam
     "'optimizer.amsgrad' is not a setting of torch.optim.SGD"),
])
def test_a_key_no_job_takes_is_refused(argv, expected):
    from dnnlab.hydra_guard import check_command_line

    with pytest.raises(DnnlabError) as info:
        check_command_line("train", argv)
    assert expected in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("argv", [["optimizer.clip_norm=1.0"], ["+optimizer.clip_norm=1.0"],
                                  ["++optimizer.clip_norm=1.0"], ["-m", "optimizer.clip_norm=0.5,1.0"],
                                  ["--cfg", "job", "optimizer.clip_norm=1.0"], ["~optimizer.clip_norm"]])
def test_a_command_line_from_before_clipping_moved_is_told_where_it_is(argv):
    """optimizer.clip_value/clip_norm are trainer.clip_value/clip_norm now: one line saying so, however it is
    written (Hydra would advise a + for one, and add another unread to the optimizer's arguments)."""
    from dnnlab.hydra_guard import check_command_line

    with pytest.raises(DnnlabError) as info:
        check_command_line("train", argv)
    assert str(info.value).startswith("optimizer.clip_norm is now trainer.clip_norm: ") and "\n" not in str(info.value)


def test_a_config_file_from_before_clipping_moved_is_told_where_it_is(make_cfg, run_dir):
    """An optimizer config of the user's own that still sets clip_norm (as dnnlab's did) is refused in one line,
    not handed to torch as an argument."""
    with pytest.raises(DnnlabError, match=r"^optimizer.clip_norm is now trainer.clip_norm$"):
        train(make_cfg("+optimizer.clip_norm=1.0"), run_dir)
    assert_untouched(run_dir)


def test_every_command_line_of_the_readme_and_the_presets_passes_the_key_check():
    """Every `dnnlab train|pretrain|diagnose|lr-find ...` example of README.md, of docs/*.md (the reference moved out
    of the README) and of the configs' comments: its overrides (up to the first word that is not one) pass
    check_command_line."""
    import re
    import shlex

    from dnnlab import CONF_DIR
    from dnnlab.cli import COMMANDS
    from dnnlab.hydra_guard import check_command_line

    root = CONF_DIR.parent
    text = "".join(p.read_text() for p in [root / "README.md", *sorted((root / "docs").glob("*.md")),
                                          *CONF_DIR.rglob("*.yaml")])
    checked = set()
    for command, rest in set(re.findall(r"dnnlab (train|pretrain|diagnose|lr-find)([^\n#`|]*)", text)):
        argv = []
        try:
            words = shlex.split(rest)
        except ValueError:  # prose
            continue
        for word in words:
            if not (word.startswith("-") or "=" in word or argv[-1:] == ["--cfg"]) or word[:1] in "[<" or "<" in word:
                break
            argv.append(word)
        if argv:
            if (command, *argv) not in checked:
                check_command_line(COMMANDS[command][2], argv)
                checked.add((command, *argv))
    assert len(checked) >= 40

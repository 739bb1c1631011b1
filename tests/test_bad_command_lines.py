"""The catalogue of bad command lines, across every command and the sweeper's and launchers' keys: each one is
refused with exit 2 and one line (`error: ...` naming the key or file, the value and what is allowed), without a
traceback, before anything is trained, and leaves every file as it was: no run folder appears and a finished run
given to it is untouched. Each runs the real command line in a process of its own (tests/forked.py)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from tests.forked import dnnlab

HYDRA_COMMANDS = ("train", "pretrain", "diagnose", "lr-find")
# for the Hydra commands, before the case's own overrides (a later override wins): quiet, small, on the tiny data
BASE = ["trainer.progress=false", "data.val_size=100", "trainer.epochs=1"]

CASES = [  # (command line, with {run} a finished run, {text} a text file, {folder} an empty folder, {dangling} a
    #        dangling symlink; what the one line must contain)
    ('train optimizer.lr=abc', "optimizer.lr='abc' is not allowed"),
    ('train trainer.epochs=two', "trainer.epochs='two' is not allowed"),
    ('train trainer.batch_size=1.5', 'trainer.batch_size=1.5 is not allowed'),
    ('train trainer.deterministic=maybe', "trainer.deterministic='maybe' is not allowed"),
    ('train optimizer.lr=0', 'optimizer.lr=0 is not allowed'),
    ('train optimizer.lr=-0.1', 'optimizer.lr=-0.1 is not allowed'),
    ('train optimizer=momentum optimizer.momentum=1.0', 'optimizer.momentum=1.0 is not allowed'),
    ('train optimizer.betas=[0.9,1.2]', 'optimizer.betas=[0.9, 1.2] is not allowed'),
    ('train trainer.clip_norm=0', 'trainer.clip_norm=0 is not allowed'),
    ('train trainer.clip_value=-1', 'trainer.clip_value=-1 is not allowed'),
    # a key that moved: where it is now, not Hydra's advice or the nearest name
    ('train optimizer.clip_norm=1.0', 'optimizer.clip_norm is now trainer.clip_norm: trainer.clip_norm=1.0'),
    ('train ~trainer.early_stopping', '~trainer.early_stopping is not allowed: the keys of trainer are fixed'),
    ('train -m +optimizer.clip_value=0.5,1', 'optimizer.clip_value is now trainer.clip_value: '
                                           'trainer.clip_value=0.5,1'),
    ('train optimizer.weight_decay=-1', 'optimizer.weight_decay=-1 is not allowed'),
    ('train optimizer=rmsprop optimizer.alpha=1.5', 'optimizer.alpha=1.5 is not allowed'),
    ('train optimizer.eps=0', 'optimizer.eps=0 is not allowed'),
    ('train regularizer=dropout regularizer.dropout.rate=1.0', 'regularizer.dropout.rate=1.0 is not allowed'),
    ('train regularizer=dropout regularizer.dropout.top_k=0', 'regularizer.dropout.top_k=0 is not allowed'),
    ('train regularizer=l2 regularizer.l2=-1', 'regularizer.l2=-1 is not allowed'),
    ('train regularizer=l1 regularizer.l1=-1', 'regularizer.l1=-1 is not allowed'),
    ('train regularizer=max_norm regularizer.max_norm=0', 'regularizer.max_norm=0 is not allowed'),
    ('train trainer.batch_size=0', 'trainer.batch_size=0 is not allowed'),
    ('train trainer.batch_size=100000000', 'trainer.batch_size=100000000 is not allowed'),
    ('train trainer.batch_size=1000', 'trainer.batch_size=1000 is not allowed: an integer from 1 to 500'),
    ('train trainer.epochs=0', 'trainer.epochs=0 is not allowed'),
    ('train trainer.epochs=99999999999999999999', 'trainer.epochs=99999999999999999999 is not allowed'),
    ('train trainer.early_stopping.patience=-1', 'trainer.early_stopping.patience=-1 is not allowed'),
    ('train trainer.early_stopping.monitor=accuracy', "trainer.early_stopping.monitor='accuracy' is not allowed"),
    ('train trainer.checkpoint_every=-1', 'trainer.checkpoint_every=-1 is not allowed'),
    ('train trainer.keep_checkpoints=0', 'trainer.keep_checkpoints=0 is not allowed'),
    ('train trainer.limit_batches=0', 'trainer.limit_batches=0 is not allowed'),
    ('train trainer.overfit_batches=-2', 'trainer.overfit_batches=-2 is not allowed'),
    ('train trainer.threads=0', 'trainer.threads=0 is not allowed'),
    ('train trainer.seed=1.5', 'trainer.seed=1.5 is not allowed'),
    ('train trainer.precision=fp8', "trainer.precision='fp8' is not allowed"),
    ('train trainer.device=tpu', "trainer.device='tpu' is not allowed"),
    ('train trainer.native=maybe', "trainer.native='maybe' is not allowed"),
    ('train trainer.resume=perhaps', "trainer.resume='perhaps' is not allowed"),
    ('train schedule=1cycle schedule.pct_rise=0.6', 'schedule.pct_rise=0.6 is not allowed'),
    ('train schedule=1cycle schedule.base_momentum=0.99', 'schedule.base_momentum=0.99 is not allowed'),
    ('train schedule=1cycle schedule.div_factor=0.5', 'schedule.div_factor=0.5 is not allowed'),
    ('train schedule=cosine schedule.min_lr=1.0', 'schedule.min_lr=1.0 is not allowed'),
    ('train schedule=cosine schedule.min_lr=-1', 'schedule.min_lr=-1 is not allowed'),
    ('train schedule=performance schedule.factor=1.5', 'schedule.factor=1.5 is not allowed'),
    ('train schedule=performance schedule.patience=-1', 'schedule.patience=-1 is not allowed'),
    ('train schedule=piecewise schedule.values=[0.1]', 'schedule.values=[0.1] is not allowed'),
    ('train schedule=piecewise schedule.boundaries=[5,2]', 'schedule.boundaries=[5, 2] is not allowed'),
    ('train schedule=exponential schedule.s=0', 'schedule.s=0 is not allowed'),
    ('train schedule=exponential schedule.unit=month', "schedule.unit='month' is not allowed"),
    ('train schedule.warmup_steps=-5', 'schedule.warmup_steps=-5 is not allowed'),
    ('train init=normal init.std=-1', 'init.std=-1 is not allowed'),
    ('train init.mode=fan_sideways', "init.mode='fan_sideways' is not allowed"),
    ('train init.distribution=cauchy', "init.distribution='cauchy' is not allowed"),
    ('train activation=leaky_relu activation.negative_slope=-0.2', 'activation.negative_slope=-0.2 is not allowed'),
    ('train activation=elu activation.alpha=0', 'activation.alpha=0 is not allowed'),
    ('train model.n_neurons=0', 'model.n_neurons=0 is not allowed'),
    ('train model.n_hidden=-1', 'model.n_hidden=-1 is not allowed'),
    ('train model.n_neurons=[300,100]', 'model.n_hidden=5 is not allowed'),
    ('train model.n_neurons=100000000', 'model.n_neurons=100000000 is not allowed'),
    ('train norm=batchnorm norm.momentum=0', 'norm.momentum=0 is not allowed'),
    ('train norm=batchnorm norm.position=inside', "norm.position='inside' is not allowed"),
    ('train data.classes=[0,10]', 'data.classes=[0, 10] is not allowed'),
    ('train data.classes=[1,1]', 'data.classes=[1, 1] is not allowed'),
    ('train data.classes=[3]', 'data.classes=[3] is not allowed'),
    ('train data.n_per_class=0', 'data.n_per_class=0 is not allowed'),
    ('train data.val_size=0', 'data.val_size=0 is not allowed'),
    ('train data.val_size=70000', 'data.val_size=70000 is not allowed'),
    ('train data.val_from=middle', "data.val_from='middle' is not allowed"),
    ('train data.folds=1', 'data.folds=1 is not allowed'),
    ('train data.folds=5 data.fold=5', 'data.fold=5 is not allowed'),
    ('train data.standardize=zscore', "data.standardize='zscore' is not allowed"),
    ('train data.name=cifar10', "data.name='cifar10' is not allowed"),
    ('train data.root=/no/such/folder', "data.root='/no/such/folder' is not allowed"),
    ('train data.draw=best', "data.draw='best' is not allowed"),
    ('train transfer=reuse transfer.source=/no/such/run', "transfer.source='/no/such/run' is not allowed"),
    ('train transfer=reuse transfer.source=/etc/passwd', '/etc/passwd: not a readable checkpoint (not a torch.save arc'),
    ('train transfer=reuse transfer.source={text}', '{text}: not a readable checkpoint (not a torch.sav'),
    ('train transfer=reuse transfer.source={folder}', "transfer.source='{folder}' is not allowed"),
    ('train transfer=reuse transfer.source={dangling}', "transfer.source='{dangling}' is not allowed"),
    ('train transfer=reuse transfer.source={run} transfer.reuse_layers=9', 'transfer.reuse_layers=9 is not allowed'),
    ('train transfer=reuse transfer.source={run} transfer.unfreeze_lr_factor=0', 'transfer.unfreeze_lr_factor=0 is not allowed'),
    ('train optimizer=foo', "Could not find 'optimizer/foo'"),
    ('train optimzer=adam', "unknown group or key 'optimzer': did you mean optimizer?"),
    ('train optimizer.foo=1', "'optimizer.foo' is not a setting of torch.optim.Adam"),
    ('train optimizer.lr=[', "cannot parse 'optimizer.lr=[': no viable alternative at input '['. See https://hydra"),
    ('train a="b', "cannot parse 'a=\"b': unexpected text. See https://hydra"),
    ('train +trainer.epochs=3', "An item is already at 'trainer.epochs'. Either remove + prefix"),
    # a misspelt group, option or key gets the nearest name; a key no config has is refused even with + or ++
    ('train trainer.epoch=3', "unknown key 'trainer.epoch': did you mean trainer.epochs?"),
    ('train +trainer.epoch=3', "unknown key 'trainer.epoch': did you mean trainer.epochs?"),
    ('train ++trainer.epoch=3', "unknown key 'trainer.epoch': did you mean trainer.epochs?"),
    ('train ~trainer.epoch', "unknown key 'trainer.epoch': did you mean trainer.epochs?"),
    ('train -m trainer.epoch=1,2', "unknown key 'trainer.epoch': did you mean trainer.epochs?"),
    ('train +trainer.early_stoping.patience=3', "did you mean trainer.early_stopping.patience?"),
    ('train +optimzer.lr=0.1', "unknown key 'optimzer.lr': did you mean optimizer.lr?"),
    ('train +foo=1', "unknown group or key 'foo'"),
    ('train optimizer=nadm', "Could not find 'optimizer/nadm': did you mean optimizer=nadam? Available options in"),
    ("train regularizer=[l2,dropot]", "Could not find 'regularizer/dropot': did you mean regularizer=dropout?"),
    ('train experiment=ed1/ex88', "did you mean experiment=ed1/ex8?"),
    ('train pretrain=autoencoder', "unknown group or key 'pretrain': a group of `dnnlab pretrain`"),
    ('train +optimizer.amsgrd=true',
     "'optimizer.amsgrd' is not a setting of torch.optim.Adam: did you mean optimizer.amsgrad?"),
    ('train optimizer=sgd +optimizer.amsgrad=true', "'optimizer.amsgrad' is not a setting of torch.optim.SGD"),
    ('train optimizer.nesterov=true', "'optimizer.nesterov' is not a setting of torch.optim.Adam"),
    ('train -m optimizer=sgd,adam +optimizer.amsgrad=true',
     "'optimizer.amsgrad' is not a setting of torch.optim.SGD ("),
    ('train activation._target_=torch.nn.Hardswish +activation.negative_slope=1',
     "'activation.negative_slope' is not a setting of torch.nn.Hardswish"),
    # a key only an option the run does not take has: Hydra would advise its +, and the run would ignore it
    ('train diagnostics.every=5',
     "diagnostics.every=5 is a setting of diagnostics=on (this run has diagnostics=none): add diagnostics=on"),
    ('train +transfer.reuse_layers=2',
     "transfer.reuse_layers=2 is a setting of transfer=reuse (this run has transfer=none): add transfer=reuse"),
    ('pretrain +pretrain.head_units=5', "pretrain.head_units=5 is a setting of pretrain=same_digit (this run has "
                                        "pretrain=autoencoder): add pretrain=same_digit"),
    ('train +lr_find.max_lr=1', "unknown key 'lr_find.max_lr'"),
    ('train -m --cfg job', "only one of --run, --multirun, --cfg, --info and --shell-completion at a time"),
    ('train --cfg job +trainer.epoch=3', "unknown key 'trainer.epoch': did you mean trainer.epochs?"),
    ('pretrain pretrain=same_digt', "Could not find 'pretrain/same_digt': did you mean pretrain=same_digit?"),
    ('pretrain +pretrain.epoch=2', "unknown key 'pretrain.epoch': did you mean pretrain.epochs?"),
    ('diagnose +diagnose.step=3', "unknown key 'diagnose.step': did you mean diagnose.steps?"),
    ('lr-find lr_find.max_l=1', "unknown key 'lr_find.max_l': did you mean lr_find.max_lr?"),
    ('train optimizer._target_=os.system', "optimizer._target_='os.system' is not allowed"),
    ('train init._target_=subprocess.run', "init._target_='subprocess.run' is not allowed"),
    ('train activation._target_=dnnlab.train.os.system', "activation._target_='dnnlab.train.os.system' is not allowed"),
    ('train +hydra.callbacks.x._target_=pathlib.Path.touch', "hydra.callbacks.x._target_='pathlib.Path.touch' is not allowed"),
    ('train hydra.run.dir=/proc/self', "hydra.run.dir='/proc/self' is not allowed"),
    ('train hydra.run.dir=/etc/passwd/run', "hydra.run.dir='/etc/passwd/run' is not allowed"),
    ('train --experimental-rerun {text}', '--experimental-rerun loads a pickle file, which can run any '),
    ('train -m hydra/launcher=joblib hydra.launcher.n_jobs=0 optimizer=adam,sgd', 'hydra.launcher.n_jobs=0 is not allowed'),
    ('train -m hydra/launcher=stacked hydra.launcher.max_group=0 optimizer=adam,sgd', 'hydra.launcher.max_group=0 is not allowed'),
    ('train -m hydra/launcher=stacked hydra.launcher.min_group=-1 optimizer=adam,sgd', 'hydra.launcher.min_group=-1 is not allowed'),
    ('train -m hydra/launcher=stacked hydra.launcher.cpu=stak optimizer=adam,sgd', "hydra.launcher.cpu='stak' is not allowed"),
    ('train -m hydra/launcher=slurm hydra.launcher.timeout_min=0 optimizer=adam,sgd', 'hydra.launcher.timeout_min=0 is not allowed'),
    ('train -m hydra/launcher=slurm hydra.launcher.nodes=0 optimizer=adam,sgd', 'hydra.launcher.nodes=0 is not allowed'),
    ('train -m hydra/launcher=slurm hydra.launcher.mem_gb=-4 optimizer=adam,sgd', 'hydra.launcher.mem_gb=-4 is not allowed'),
    ('train -m hydra/launcher=slurm hydra.launcher.cpus_per_task=0 optimizer=adam,sgd', 'cpus_per_task=0 is not allowed'),
    ('train -m hydra/launcher=slurm hydra.launcher.gpus_per_node=-1 optimizer=adam,sgd', 'gpus_per_node=-1 is not allowed'),
    ('train -m hydra/launcher=slurm hydra.launcher.tasks_per_node=0 optimizer=adam,sgd', 'tasks_per_node=0 is not allowed'),
    ('train -m hydra/launcher=slurm hydra.launcher.array_parallelism=0 optimizer=adam,sgd',
     'array_parallelism=0 is not allowed'),
    ('train -m hydra/launcher=submitit_local hydra.launcher.timeout_min=0 optimizer=adam,sgd',
     'timeout_min=0 is not allowed'),
    ('train -m hydra/sweeper=optuna hydra.sweeper.pruner=median hydra.sweeper.median.n_warmup_steps=-1',
     'hydra.sweeper.median.n_warmup_steps=-1 is not allowed'),
    ('train -m hydra/sweeper=optuna hydra.sweeper.pruner=median hydra.sweeper.median.interval_steps=0',
     'hydra.sweeper.median.interval_steps=0 is not allowed'),
    ('train -m hydra/sweeper=optuna hydra.sweeper.tpe.n_startup_trials=-1', 'tpe.n_startup_trials=-1 is not allowed'),
    ('train -m hydra/sweeper=optuna hydra.sweeper.pruner=hyperband hydra.sweeper.hyperband.min_resource=0',
     'hydra.sweeper.hyperband.min_resource=0 is not allowed'),
    ('train -m hydra/sweeper=optuna hydra.sweeper.pruner=hyperband hydra.sweeper.hyperband.max_resource=1',
     'hydra.sweeper.hyperband.max_resource=1 is not allowed'),
    ('train -m hydra/sweeper=optuna hydra.sweeper.grace_period=30', 'hydra.sweeper.grace_period=30 is not allowed'),
    ('train -m hydra/sweeper=optuna hydra.sweeper.n_trials=0', 'hydra.sweeper.n_trials=0 is not allowed'),
    ('train -m hydra/sweeper=optuna hydra.sweeper.n_trials=-3', 'hydra.sweeper.n_trials=-3 is not allowed'),
    ('train -m hydra/sweeper=optuna hydra.sweeper.n_jobs=0', 'hydra.sweeper.n_jobs=0 is not allowed'),
    ('train -m hydra/sweeper=optuna hydra.sweeper.pruner=hyperband hydra.sweeper.hyperband.reduction_factor=1', 'hydra.sweeper.hyperband.reduction_factor=1 is not allowed'),
    ('train -m hydra/sweeper=optuna hydra.sweeper.sampler=cmaes', "hydra.sweeper.sampler='cmaes' is not allowed"),
    ('train -m hydra/sweeper=optuna hydra.sweeper.pruner=asha', "hydra.sweeper.pruner='asha' is not allowed"),
    ('train -m hydra/sweeper=optuna hydra.sweeper.direction=up', "hydra.sweeper.direction='up' is not allowed"),
    ('train -m hydra.sweep.dir=/proc/self optimizer=adam,sgd', "hydra.sweep.dir='/proc/self' is not allowed"),
    ('pretrain pretrain.kind=magic', "pretrain.kind='magic' is not allowed"),
    ('pretrain pretrain.epochs=0', 'pretrain.epochs=0 is not allowed'),
    ('pretrain pretrain.noise=-1', 'pretrain.noise=-1 is not allowed'),
    ('pretrain optimizer.lr=-1', 'optimizer.lr=-1 is not allowed'),
    ('diagnose optimizer.lr=-1', 'optimizer.lr=-1 is not allowed'),
    ('diagnose diagnostics=on diagnostics.every=0', 'diagnostics.every=0 is not allowed'),
    ('diagnose diagnostics=on diagnostics.saturation_margin=0.7', 'diagnostics.saturation_margin=0.7 is not allowed'),
    ('lr-find optimizer.lr=-1', 'optimizer.lr=-1 is not allowed'),
    ('lr-find trainer.batch_size=0', 'trainer.batch_size=0 is not allowed'),
    ('eval /no/such/run', "run='/no/such/run' is not allowed"),
    ('eval /etc/passwd', '/etc/passwd: not a readable checkpoint (not a torch.save arc'),
    ('eval {text}', '{text}: not a readable checkpoint (not a torch.sav'),
    ('eval {folder}', "run='{folder}' is not allowed"),
    ('eval {dangling}', "run='{dangling}' is not allowed"),
    ('eval {run} --mc-samples -1', '--mc-samples=-1 is not allowed'),
    ('eval {run} --split holdout', "argument --split: invalid choice: 'holdout'"),
    ('eval {run} --top 0', '--top=0 is not allowed'),
    ('eval {run} --device tpu', "--device='tpu' is not allowed"),
    ('eval {run} --data-root /no/such/folder', "--data-root='/no/such/folder' is not allowed"),
    ('eval', 'the following arguments are required: run (dnnlab eval --help)'),
    ('prune /no/such/run', "run='/no/such/run' is not allowed"),
    ('prune {text}', '{text}: not a readable checkpoint (not a torch.sav'),
    ('prune {run} --threshold -1', '--threshold=-1.0 is not allowed'),
    ('prune {run} --levels 0.5,1.5', '--levels=0.5,1.5 is not allowed'),
    ('prune {run} --levels abc', 'argument --levels: not a comma-separated list'),
    ('prune {run} --scope everything', "argument --scope: invalid choice: 'everything'"),
    ('prune {run} --save 2', '--save=2.0 is not allowed'),
    ('latency /no/such/run', "run='/no/such/run' is not allowed"),
    ('latency {text}', '{text}: not a readable checkpoint (not a torch.sav'),
    ('latency {run} --batch-size 0', '--batch-size=0 is not allowed'),
    ('latency {run} --min-time 0', '--min-time=0.0 is not allowed'),
    ('latency {run} --min-time inf', '--min-time=inf is not allowed'),
    ('latency {run} --precisions fp64', '--precisions=fp64 is not allowed'),
    ('latency {run} --threads 0', '--threads=0 is not allowed'),
    ('report /no/such/folder', '/no/such/folder does not exist'),
    ('report {text}', '{text} is not a directory (give a run or a sweep d'),
    ('report {run} --metric accuracy', "argument --metric: invalid choice: 'accuracy'"),
    ('reproduce --only ed9', "--only='ed9' is not allowed"),
    ('reproduce --seeds 0', "--seeds='0' is not allowed"),
    ('reproduce --seeds abc', "--seeds='abc' is not allowed"),
    ('reproduce --seeds 1,1', "--seeds='1,1' is not allowed"),
    ('bench --epochs 0', '--epochs=0 is not allowed'),
    ('bench --rounds 0', '--rounds=0 is not allowed'),
    ('bench --jobs 0', '--jobs=0 is not allowed'),
    ('bench --val-size -1', '--val-size=-1 is not allowed'),
    ('bench --skip everything', "argument --skip: invalid choice: 'everything'"),
    ('bench --data-root /no/such/folder', '--data-root=/no/such/folder holds no Fashion-MNIST IDX files'),
    ('bench --keras-python /no/such/python', "--keras-python='/no/such/python' is not allowed"),
    ('data cifar10', "data.name='cifar10' is not allowed"),
    ('data mnist fashion', "data.name='fashion' is not allowed"),
    ('completion tcsh', "dnnlab completion SHELL: one of bash, zsh, fish"),
    ('train -sc install=tcsh', "--shell-completion takes one of install=SHELL, uninstall=SHELL, query=SHELL"),
    ('frobnicate', "unknown command 'frobnicate'"),
    ('trian optimizer.lr=0.1', 'did you mean train?'),
]


def snapshot(*folders: Path) -> dict:
    """Every file under `folders` with its size and modification time, and every folder (a folder's own time
    changes when Hydra's run folder was made and removed in it)."""
    found = {}
    for folder in folders:
        for path in [folder, *folder.rglob("*")]:
            info = path.lstat()
            found[str(path)] = "folder" if path.is_dir() else (info.st_size, info.st_mtime_ns)
    return found


@pytest.fixture(scope="module")
def finished_run(data_root, tmp_path_factory) -> Path:
    """A run that finished (checkpoints, summary), to give eval, prune, latency, report and transfer."""
    run = tmp_path_factory.mktemp("finished") / "run"
    done = dnnlab("train", *BASE, "model.n_hidden=2", "model.n_neurons=8", f"hydra.run.dir={run}",
                  cwd=run.parent, env={**os.environ, "DNNLAB_DATA": str(data_root)})
    assert done.returncode == 0, done.stderr
    return run


@pytest.fixture
def places(tmp_path, finished_run) -> dict[str, str]:
    given = tmp_path / "given"
    given.mkdir()
    (given / "notes.pt").write_text("epoch: 3\nnot a checkpoint\n")
    (given / "empty").mkdir()
    (given / "gone.pt").symlink_to(given / "nowhere.pt")
    return {"run": str(finished_run), "text": str(given / "notes.pt"), "folder": str(given / "empty"),
            "dangling": str(given / "gone.pt")}


@pytest.mark.parametrize("line,expected", CASES, ids=[c[0] for c in CASES])
def test_a_bad_command_line_is_one_line_and_changes_nothing(data_root, tmp_path, places, line, expected):
    args = line.format(**places).split()
    if args[0] in HYDRA_COMMANDS:
        args = [args[0], *BASE, *args[1:]]
    workdir = tmp_path / "work"
    workdir.mkdir()
    watched = workdir, tmp_path / "given", Path(places["run"])
    before = snapshot(*watched)
    done = dnnlab(*args, cwd=workdir, env={**os.environ, "DNNLAB_DATA": str(data_root)})
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-2000:]
    assert expected.format(**places) in lines[0]
    assert "Traceback" not in done.stdout + done.stderr
    assert snapshot(*watched) == before  # no run folder, no file touched


def test_the_catalogue_covers_every_command():
    assert len(CASES) >= 100
    commands = {line.split()[0] for line, _ in CASES}
    assert {"train", "pretrain", "diagnose", "lr-find", "eval", "prune", "latency", "report", "reproduce", "bench",
            "data"} <= commands
    hydra_keys = " ".join(line for line, _ in CASES)
    for part in ("hydra.sweeper.", "hydra/launcher=joblib", "hydra/launcher=stacked", "hydra/launcher=slurm",
                 "hydra.callbacks", "hydra.run.dir", "hydra.sweep.dir"):
        assert part in hydra_keys, part

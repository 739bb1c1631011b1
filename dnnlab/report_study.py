"""`dnnlab report`: the figures of the Optuna study a sweep ran (optuna_history.png, optuna_importances.png),
read from the storage that DIR/optuna_study.json names without changing it."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

from dnnlab.errors import DnnlabError
from dnnlab.record import pyplot, save_figure
from dnnlab.report_plots import short

STUDY_FILE = "optuna_study.json"


def open_storage(storage: str, base: Path, scratch: Path):
    """The study's storage, opened as the sweeper opens it (dnnlab.trial.open_storage): a database URL, or a journal
    file (a relative path is looked up beside optuna_study.json, then in the working directory). Nothing is
    created: a missing file is an error, and a read-only journal is read from a copy."""
    from dnnlab import trial

    def locate(text: str) -> Path:
        path = Path(text).expanduser()
        for candidate in ([path] if path.is_absolute() else [base / path, Path.cwd() / path]):
            if candidate.is_file():
                return candidate
        raise DnnlabError(f"the study's storage {text} is not there")

    if trial.is_url(storage):
        if storage.startswith("sqlite:///"):  # SQLAlchemy would create an empty database file
            storage = f"sqlite:///{locate(storage[len('sqlite:///'):])}"
        return trial.open_storage(storage)
    path = locate(storage)
    if not os.access(path, os.W_OK) or not os.access(path.parent, os.W_OK):  # the backend opens it for appending
        path = Path(shutil.copy(path, scratch / path.name))
    return trial.open_storage(str(path))


def optuna_figures(study, trials, target, target_name: str, out: Path, notes: list[str]) -> list[Path]:
    """The optimisation history (`target`: None, or the objective to show), and the parameter importances when
    there is something to compare."""
    from optuna.study import StudyDirection
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as ovm

    plt = pyplot()
    written = []
    path = out / "optuna_history.png"
    try:
        ax = ovm.plot_optimization_history(study, target=target, target_name=target_name)
        save_figure(ax.figure, path, bbox_inches="tight")
        written.append(path)
    except (ValueError, RuntimeError) as e:
        plt.close("all")
        notes.append(f"optuna_history.png skipped: {e}")
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    varying = [p for p in dict.fromkeys(k for t in complete for k in t.params)
               if len({repr(t.params.get(p)) for t in complete}) > 1]
    if len(complete) < 2 or not varying:
        notes.append(f"optuna_importances.png skipped: it needs at least 2 completed trials whose parameters "
                     f"vary (the study has {len(complete)} completed"
                     f"{', all with the same parameters' if len(complete) >= 2 else ''})")
        return written
    path = out / "optuna_importances.png"
    try:
        importance_target = None
        if target is not None:  # PED-ANOVA takes a custom target as lower-is-better: flip a maximised objective
            sign = -1.0 if study.directions[0] == StudyDirection.MAXIMIZE else 1.0
            importance_target = lambda t: sign * t.values[0]  # noqa: E731
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*importances of params to achieve low")
            ax = ovm.plot_param_importances(study, target=importance_target, target_name=target_name)
        save_figure(ax.figure, path, bbox_inches="tight")
        written.append(path)
    except (ValueError, RuntimeError, ZeroDivisionError) as e:
        plt.close("all")
        notes.append(f"optuna_importances.png skipped: {e}")
    return written


def plot_study(root: Path, out: Path, notes: list[str]) -> list[Path]:
    """optuna_history.png and optuna_importances.png of the study that DIR/optuna_study.json names."""
    spec_path = root / STUDY_FILE
    if not spec_path.is_file():
        return []
    try:
        import optuna
    except ImportError:
        notes.append("no Optuna plots: they need dnnlab's optional packages 'optuna' "
                     "(pip install 'dnnlab[optuna]')")
        return []

    plt = pyplot()  # the Agg backend before optuna imports pyplot
    written = []
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with tempfile.TemporaryDirectory() as scratch, warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            try:
                spec = json.loads(spec_path.read_text())
                storage = open_storage(str(spec["storage"]), root, Path(scratch))
                names = optuna.get_all_study_names(storage)
                if spec["study_name"] not in names:
                    raise DnnlabError(f"no study {spec['study_name']!r} in {spec['storage']} (it holds "
                                      f"{', '.join(map(repr, names)) or 'none'})")
                study = optuna.load_study(study_name=spec["study_name"], storage=storage)
                trials = study.get_trials(deepcopy=False)
            except DnnlabError as e:
                notes.append(f"no Optuna plots: {e}")
                return []
            except Exception as e:  # corrupt JSON, unknown study, unreachable database, ...
                notes.append(f"no Optuna plots: cannot open the study of {STUDY_FILE} "
                             f"({type(e).__name__}: {short(str(e).splitlines()[0] if str(e) else '', 120)})")
                return []
            if not trials:
                notes.append(f"no Optuna plots: study {spec['study_name']!r} has no trials yet")
                return []
            target = None if len(study.directions) == 1 else (lambda t: t.values[0])  # multi-objective: the first
            target_name = str(spec.get("metric") or spec.get("objective") or "objective value")
            with plt.rc_context():  # optuna's plots switch to the ggplot style: keep that out of later figures
                written += optuna_figures(study, trials, target, target_name, out, notes)
    finally:
        optuna.logging.set_verbosity(verbosity)
    return written

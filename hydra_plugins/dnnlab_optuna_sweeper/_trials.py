"""A trial's state as the sweeper reads and writes it: whether it has a result or another sweeper may still run it,
and what a finished job tells the study (from its JobReturn and <run_dir>/summary.json)."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Mapping

import optuna
from hydra.core.utils import JobReturn
from optuna.trial import FrozenTrial, TrialState

from dnnlab.trial import owner_alive

from . import _space

log = logging.getLogger(__name__)

NO_RESULT = ("interrupted", "killed")  # statuses of trials that ended without a result: the study makes them up


def status_of(trial: FrozenTrial) -> str | None:
    """The status the sweeper told; a FAIL without one was failed by Optuna's heartbeat check: killed."""
    status = trial.user_attrs.get("status")
    return "killed" if status is None and trial.state == TrialState.FAIL else status


def has_result(trial: FrozenTrial) -> bool:
    """COMPLETE, PRUNED, or FAIL from the run itself: what its hyperparameters did."""
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return trial.state == TrialState.FAIL and status_of(trial) not in NO_RESULT


def running_elsewhere(trial: FrozenTrial) -> bool:
    """RUNNING under an owner that may still run it (another worker); a trial with no owner record was left by
    something else, and is not counted."""
    owner = trial.user_attrs.get("owner")
    return trial.state == TrialState.RUNNING and isinstance(owner, dict) and owner_alive(owner) is not False


def told(study: optuna.Study, trial: optuna.trial.Trial | int, value: float | None, state: TrialState,
         skip_if_finished: bool = False) -> None:
    try:
        study.tell(trial, value, state=state, skip_if_finished=skip_if_finished)
    except RuntimeError as e:
        # the grid sampler calls study.stop() once its grid is done, which only works inside optimize(); the
        # trial's result is stored before that
        if "stop" not in str(e):
            raise


def params_text(params: Mapping[str, Any]) -> str:
    text = " ".join(f"{k}={_space.value_text(v)}" for k, v in params.items())
    return f" [{text}]" if text else ""


def outcome(ret: JobReturn | None, run_dir: Path | None, metric: str,
            use_return: bool) -> tuple[TrialState, float | None, str, str | None]:
    """(state, value, status, reason) of a finished job, from its JobReturn (None: the launcher gave none)
    and <run_dir>/summary.json."""
    returned = None
    if ret is not None:
        try:
            returned = ret.return_value
        except Exception as e:  # the task raised: Hydra keeps the exception in the JobReturn
            return TrialState.FAIL, None, "failed", f"{type(e).__name__}: {e}"
        if ret.hydra_cfg is not None:
            run_dir = Path(ret.hydra_cfg.hydra.runtime.output_dir)
    if run_dir is None:
        return TrialState.FAIL, None, "failed", "no result from the launcher"
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError) as e:
        return TrialState.FAIL, None, "failed", f"no readable summary.json in {run_dir}: {e}"
    status, reason = summary.get("status"), summary.get("reason")
    if status == "pruned":
        return TrialState.PRUNED, None, status, reason
    if status != "completed":
        return TrialState.FAIL, None, str(status), reason
    if use_return and ret is not None:
        value = returned
    elif metric in summary:  # also the task value when there is no JobReturn: it is summary[monitor]
        value = summary[metric]
    else:
        return TrialState.FAIL, None, "failed", f"summary.json has no {metric!r} (keys: {', '.join(summary)})"
    try:
        value = float(value)
    except (TypeError, ValueError):
        return TrialState.FAIL, None, "failed", f"{metric} is {value!r}, not a number"
    if not math.isfinite(value):
        return TrialState.FAIL, None, "failed", f"{metric} is {value}"
    return TrialState.COMPLETE, value, status, reason


def tell(study: optuna.Study, trial: optuna.trial.Trial, state: TrialState, value: float | None,
         status: str, reason: str | None) -> None:
    """Record the trial's status (and reason) and tell the study its result; log one line."""
    try:
        trial.set_user_attr("status", status)
        if reason:
            trial.set_user_attr("reason", str(reason))
        told(study, trial, value if state == TrialState.COMPLETE else None, state)
    except optuna.exceptions.UpdateFinishedTrialError:  # another sweeper took this one for dead: its result
        log.warning(f"trial {trial.number} was failed by another sweeper meanwhile; its result ({status}) is "
                    "not recorded")
        return
    params = params_text(trial.params)
    if state == TrialState.COMPLETE:
        best = study.best_trial
        log.info(f"trial {trial.number}: {value:.6g}{params}; best: trial {best.number}, {best.value:.6g}")
    elif state == TrialState.PRUNED:
        log.info(f"trial {trial.number} pruned: {reason}{params}")
    else:
        log.warning(f"trial {trial.number} failed ({status}): {reason}{params}")

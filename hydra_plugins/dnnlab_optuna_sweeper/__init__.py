"""dnnlab's Optuna sweeper for Hydra: `dnnlab train -m hydra/sweeper=optuna ...` (see config.py for every key).

Hydra imports every public module of the `hydra_plugins` namespace package when any Hydra app starts, so the
modules it scans (this one, config.py, optuna_sweeper.py) import nothing heavy; Optuna is imported by _sweep.py
and the private modules beside it (_study.py, _trials.py, _space.py), which Hydra does not scan (leading
underscore), only when a sweep runs.
"""

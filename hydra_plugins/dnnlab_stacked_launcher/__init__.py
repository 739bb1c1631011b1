"""dnnlab's stacked launcher for Hydra: `dnnlab train -m hydra/launcher=stacked ...` trains the jobs of a sweep that
share the network's shape together, as one batched network (see dnnlab/stacked.py).

Hydra imports every public module of the `hydra_plugins` namespace package when any Hydra app starts, so these
modules import nothing heavy: torch and dnnlab.stacked are imported only when a sweep is launched.
"""

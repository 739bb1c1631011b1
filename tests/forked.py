"""`dnnlab ARGS` in a process of its own, forked from a server that imported dnnlab, torch, Hydra and matplotlib
once (multiprocessing's forkserver): the code `python -m dnnlab ARGS` runs, with its own working directory,
environment, stdout, stderr and exit status, without paying the interpreter's imports (about 3 s) per command.

Tests about the interpreter itself (the console script, signals, kills, thread environment variables read when
torch is imported) start a real `python -m dnnlab` instead.
"""
from __future__ import annotations

import atexit
import functools
import multiprocessing
import multiprocessing.forkserver
import os
import subprocess
import sys
import tempfile
import threading
import traceback
from pathlib import Path

from tests.conftest import HANG_S

# what every command imports anyway; a module missing here is imported by the command as usual
PRELOAD = ["torch", "hydra", "dnnlab.cli", "dnnlab.train", "dnnlab.trainer", "dnnlab.hydra_guard", "dnnlab.keys",
           "dnnlab.record", "matplotlib.pyplot", "torch.utils.tensorboard"]
TERMINAL = ("COLUMNS", "LINES")


def _command(args: list[str], cwd: str, env: dict, out: str, err: str) -> None:
    """In the forked process: `dnnlab ARGS` in `cwd` with exactly `env`, stdout and stderr into files."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, out), (2, err)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)
    sys.stdin = open(os.devnull)
    sys.argv = ["dnnlab", *args]
    code = 0
    try:
        from dnnlab.cli import main

        main()
    except SystemExit as e:  # as the interpreter treats it at exit
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        code = e.code if isinstance(e.code, int) else (e.code is not None)
    except BaseException:
        traceback.print_exc()
        code = 1
    # as the interpreter exits: join the threads (and run what they registered, e.g. joblib's workers' shutdown),
    # then the exit handlers (logging's, dnnlab's)
    threading._shutdown()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@functools.cache
def _server() -> multiprocessing.context.ForkServerContext:
    """The forkserver, started with the modules imported. Some read the environment as they are imported (rich the
    terminal's COLUMNS and LINES, which readline puts into the C environment once pytest imports it): the server
    starts without those two, and each command is given its own environment."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    saved = {key: os.environ.pop(key) for key in TERMINAL if key in os.environ}
    for key in TERMINAL:
        os.unsetenv(key)
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        os.environ.update(saved)
    return context


def dnnlab(*args: str, cwd: Path | str, env: dict | None = None, timeout: float = HANG_S
           ) -> subprocess.CompletedProcess:
    """Like subprocess.run([python, -m, dnnlab, *args], cwd=cwd, env=env, capture_output=True, text=True)."""
    with tempfile.TemporaryDirectory(prefix="dnnlab-forked-") as folder:
        out, err = Path(folder, "stdout"), Path(folder, "stderr")
        env = dict(os.environ if env is None else env)
        process = _server().Process(target=_command, args=(list(args), str(cwd), env, str(out), str(err)))
        process.start()
        process.join(timeout)
        if process.is_alive():
            process.kill()
            process.join()
            raise subprocess.TimeoutExpired(["dnnlab", *args], timeout, out.read_text(), err.read_text())
        return subprocess.CompletedProcess(["dnnlab", *args], process.exitcode, out.read_text(), err.read_text())

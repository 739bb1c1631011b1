"""The set-up scripts (scripts/install.sh, scripts/quickstart.sh) say what they do: run in a copy of the project
whose .venv and apt-get are stand-ins that record their calls, so nothing is installed or downloaded."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

from tests.conftest import HANG_S

ROOT = Path(__file__).resolve().parents[1]
# what `dnnlab data fashion_mnist` prints when nothing is on disk and the download fails (dnnlab.data.locate)
NOT_FOUND = ("error: fashion_mnist not found; tried: /home/u/.cache/dnnlab/FashionMNIST/raw, /home/u/.cache/dnnlab, "
             "/usr/share/datasets/fashion-mnist, torchvision download into /home/u/.cache/dnnlab (urlopen error "
             "[Errno -2] Name or service not known); set data.root or $DNNLAB_DATA to a folder with the four IDX "
             "files (on Debian/Ubuntu: apt-get install dataset-fashion-mnist)")


def stub(path: Path, body: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def project(tmp_path: Path, installed: str) -> tuple[Path, dict]:
    """A copy of scripts/ with a stand-in .venv (python whose `pip list` shows `installed`; dnnlab whose `data`
    fails until apt-get has run) and apt-get on PATH. Every call is appended to calls.log."""
    copy = tmp_path / "dnnlab"
    shutil.copytree(ROOT / "scripts", copy / "scripts")
    log = tmp_path / "calls.log"
    stub(copy / ".venv" / "bin" / "python", f"""echo "python $*" >> {log}
if [ "$*" = "-m pip list --format=freeze" ]; then printf '{installed}'; fi
""")
    stub(copy / ".venv" / "bin" / "dnnlab", f"""echo "dnnlab $*" >> {log}
if [ "$1" = data ]; then
  if [ -e {tmp_path}/apt-done ]; then echo "fashion_mnist: /usr/share/datasets/fashion-mnist"; exit 0; fi
  echo '{NOT_FOUND}' >&2; exit 2
fi
""")
    stub(tmp_path / "bin" / "apt-get", f'echo "apt-get $*" >> {log}; touch {tmp_path}/apt-done\n')
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
    env.pop("TORCH_INDEX_URL", None)
    return copy, env


def run(copy: Path, env: dict, script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", f"scripts/{script}", *args], cwd=copy, env=env, capture_output=True, text=True,
                          timeout=HANG_S)


def test_quickstart_says_what_it_does_when_the_download_fails(tmp_path):
    copy, env = project(tmp_path, "")
    done = run(copy, env, "quickstart.sh", "optimizer=nadam")
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout.splitlines()
    assert "install: torch==2.14.1 torchvision==0.29.1 (the first time, a download of up to 3 GB)" in out
    assert ("quickstart: Fashion-MNIST is not on this machine, and the torchvision download into "
            "/home/u/.cache/dnnlab (urlopen error [Errno -2] Name or service not known) did not work") in out
    assert "quickstart: installing Debian's dataset-fashion-mnist with apt-get instead" in out
    assert "error:" not in done.stdout + done.stderr  # not an error: the fallback is what happens next
    calls = (tmp_path / "calls.log").read_text().splitlines()
    # pip's progress is shown (no -q) for the large download; the run gets the user's arguments
    assert "python -m pip install --progress-bar on torch==2.14.1 torchvision==0.29.1" in calls
    assert any(c.startswith("apt-get") and c.endswith("install -y -qq dataset-fashion-mnist") for c in calls)
    assert calls[-1] == "dnnlab train trainer.epochs=5 optimizer=nadam"


def test_installed_torch_is_not_fetched_again_and_a_cpu_index_is_passed_on(tmp_path):
    copy, env = project(tmp_path, "numpy==2.0.0\ntorch==2.14.1\ntorchvision==0.29.1\n")
    done = run(copy, env, "install.sh", "all")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "install: torch==2.14.1 torchvision==0.29.1 already installed" in done.stdout.splitlines()
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert not any("torch==" in c for c in calls if "pip install" in c)
    assert "python -m pip install -q -e .[all]" in calls

    (tmp_path / "calls.log").unlink()
    copy, env = project(tmp_path / "cpu", "")
    env["TORCH_INDEX_URL"] = "https://example.invalid/whl/cpu"
    assert run(copy, env, "install.sh").returncode == 0
    calls = (tmp_path / "cpu" / "calls.log").read_text().splitlines()
    assert ("python -m pip install --progress-bar on --index-url https://example.invalid/whl/cpu torch==2.14.1 "
            "torchvision==0.29.1") in calls

"""Tab completion: the scripts `dnnlab completion SHELL` prints, driven as each shell drives them, the query they
ask (`dnnlab -sc query=SHELL`), and the install lines the help texts give.

The shells run with the venv's bin first on PATH (the dnnlab console script). zsh and fish are driven when they are
installed here (apt-get install zsh fish); a test that needs one is skipped, saying so, where it is missing.
"""
from __future__ import annotations

import os
import pty
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dnnlab.completion import candidates, hydra_candidates
from tests.conftest import HANG_S

BIN = Path(sys.executable).parent  # the venv's bin, holding the dnnlab console script
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "TERM": "dumb"}
HYDRA_COMMANDS = ("train", "pretrain", "diagnose", "lr-find")


def needs(shell: str):
    return pytest.mark.skipif(shutil.which(shell) is None,
                              reason=f"{shell} is not installed here (apt-get install {shell}): not tested")


def dnnlab(*args: str, **env: str) -> subprocess.CompletedProcess:
    done = subprocess.run([str(BIN / "dnnlab"), *args], env={**ENV, **env}, capture_output=True, text=True,
                          timeout=HANG_S)
    assert done.returncode == 0, done.stderr
    return done


# --- the query the scripts ask ---------------------------------------------------------------------------------

@pytest.mark.parametrize("line,expected", [
    ("dnnlab tr", ["train"]),
    ("dnnlab ", ["train", "pretrain", "diagnose", "lr-find", "eval", "completion"]),
    ("dnnlab completion ", ["bash", "zsh", "fish"]),
    ("dnnlab train optimizer=", ["optimizer=nadam", "optimizer=sgd"]),
    ("dnnlab train trainer.ep", ["trainer.epochs="]),
    ("dnnlab train -m optimizer=ada", ["optimizer=adam", "optimizer=adamw"]),
    ("dnnlab pretrain pretrain=", ["pretrain=autoencoder", "pretrain=same_digit"]),
    ("dnnlab pretrain pretrain.ep", ["pretrain.epochs="]),
    ("dnnlab diagnose diagnose.st", ["diagnose.steps="]),
    ("dnnlab lr-find lr_find.max", ["lr_find.max_lr="]),
    ("dnnlab lr-find optimizer=na", ["optimizer=nadam"]),
    ("dnnlab train --hydra-h", ["--hydra-help"]),
])
def test_the_query_completes_commands_groups_options_and_keys(line, expected):
    found = candidates(line)
    assert set(expected) <= set(found), found
    assert all(c.startswith(line.split()[-1]) for c in found) or line.endswith(" ")


def test_each_command_offers_only_its_own_groups():
    assert "pretrain=" in candidates("dnnlab pretrain pre")
    for command in ("train", "diagnose", "lr-find"):
        found = candidates(f"dnnlab {command} ")
        assert "optimizer=" in found and "trainer." in found
        assert not any(c.startswith("pretrain") for c in found), (command, found)
    assert "diagnose." in candidates("dnnlab diagnose di") and "diagnose." not in candidates("dnnlab train di")


def test_a_list_value_is_one_argument_and_list_items_are_not_offered():
    assert not any(re.search(r"=\d+=$", c) for c in hydra_candidates("train", "optimizer.betas="))
    assert hydra_candidates("train", "model.n_neurons") == ["model.n_neurons="]


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_the_query_the_scripts_call_answers_one_candidate_a_line(shell):
    found = dnnlab("-sc", f"query={shell}", COMP_LINE="dnnlab train optimizer=na").stdout.splitlines()
    assert found == ["optimizer=nadam"]
    # Hydra's query convention for an app (its first word is the app): what `dnnlab train -sc query=...` answers
    found = dnnlab("train", "-sc", f"query={shell}", COMP_LINE="dnnlab trainer.ep").stdout.splitlines()
    assert found == ["trainer.epochs="]
    # up to the cursor: COMP_POINT inside the line
    line = "dnnlab pretrain pretrain=s trainer.epochs=3"
    found = dnnlab("-sc", f"query={shell}", COMP_LINE=line, COMP_POINT=str(line.index(" trainer"))).stdout
    assert found.split() == ["pretrain=same_digit"]


# --- bash: the installed function, called as bash calls it -----------------------------------------------------

BASH_DRIVER = r"""
eval "$(dnnlab completion bash)"
complete -p dnnlab
ask() {  # $1: the line, $2: the cursor (default: its end); prints the replies between markers
    COMP_LINE=$1; COMP_POINT=${2:-${#1}}
    read -ra COMP_WORDS <<< "${COMP_LINE:0:COMP_POINT}"
    COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 )); [[ ${COMP_LINE:0:COMP_POINT} == *" " ]] && COMP_CWORD=${#COMP_WORDS[@]}
    _dnnlab_complete dnnlab "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"
    printf '### %s\n' "$1"; printf '%s\n' "${COMPREPLY[@]}"
}
"""


def bash_replies(lines: list[tuple[str, int | None]], equals_breaks: bool = True) -> dict[str, list[str]]:
    script = BASH_DRIVER + ("" if equals_breaks else "COMP_WORDBREAKS=${COMP_WORDBREAKS//=}\n")
    script += "".join(f"ask '{line}' {'' if point is None else point}\n" for line, point in lines)
    done = subprocess.run(["bash", "--norc", "--noprofile", "-c", script], env=ENV, capture_output=True, text=True,
                          timeout=HANG_S)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("complete -o default -F _dnnlab_complete dnnlab"), done.stdout
    replies, current = {}, None
    for out in done.stdout.splitlines()[1:]:
        if out.startswith("### "):
            current = replies.setdefault(out[4:], [])
        elif out:
            current.append(out)
    return replies


def test_bash_completes_commands_groups_options_and_keys():
    """Bash splits `optimizer=n` at the = (COMP_WORDBREAKS): the replies are what follows it."""
    mid = "dnnlab train optimizer=n trainer.epochs=3"
    got = bash_replies([("dnnlab tr", None), ("dnnlab train optimizer=", None), ("dnnlab train trainer.ep", None),
                        ("dnnlab pretrain pretrain=", None), ("dnnlab train pre", None),
                        ("dnnlab diagnose diagnose.st", None), ("dnnlab lr-find lr_find.max", None),
                        ("dnnlab completion ", None), (mid, mid.index(" trainer"))])
    assert got["dnnlab tr"] == ["train"]
    assert {"nadam", "adam", "sgd"} <= set(got["dnnlab train optimizer="])
    assert got["dnnlab train trainer.ep"] == ["trainer.epochs="]
    assert got["dnnlab pretrain pretrain="] == ["autoencoder", "same_digit"]
    assert got["dnnlab train pre"] == []  # train takes no pretrain group
    assert got["dnnlab diagnose diagnose.st"] == ["diagnose.steps="]
    assert got["dnnlab lr-find lr_find.max"] == ["lr_find.max_lr="]
    assert got["dnnlab completion "] == ["bash", "zsh", "fish"]
    assert got[mid] == ["nadam", "nesterov"]  # the word at the cursor, not the line's last


def test_bash_without_the_equals_sign_as_word_break():
    """Where = is not a word break (Hydra's own script removes it), the replies are whole arguments."""
    got = bash_replies([("dnnlab train optimizer=", None), ("dnnlab pretrain pretrain=s", None)],
                       equals_breaks=False)
    assert "optimizer=nadam" in got["dnnlab train optimizer="]
    assert got["dnnlab pretrain pretrain=s"] == ["pretrain=same_digit"]


# --- every shell, interactively: what the line becomes after a TAB ---------------------------------------------

def interactive(argv: list[str], setup: list[str], cases: list[tuple[str, str]],
                limit: float = HANG_S) -> list[str]:
    """Type each case's text (ending in a TAB) into one interactive shell on a terminal, clearing the line after
    each; the output of each once its expected text shows (or the time is up)."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: the shell
        os.execvpe(argv[0], argv, ENV)
    output = b""

    def read_until(text: bytes | None, seconds: float) -> None:
        nonlocal output
        end = time.monotonic() + seconds
        while time.monotonic() < end and (text is None or text not in output):
            if select.select([fd], [], [], 0.1)[0]:
                try:
                    output += os.read(fd, 65536)
                except OSError:
                    return

    outputs = []
    try:
        read_until(None, 1)
        for line in setup:
            os.write(fd, line.encode() + b"\n")
            read_until(None, 1)
        for typed, expected in cases:
            output = b""
            os.write(fd, typed.encode())
            read_until(expected.encode(), limit)
            outputs.append(output.decode(errors="replace"))
            os.write(fd, b"\x15")  # Ctrl-U: an empty line for the next case
            read_until(None, 0.3)
        return outputs
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        os.close(fd)


SESSIONS = {
    "bash": (["bash", "--norc", "--noprofile", "-i"], ['eval "$(dnnlab completion bash)"']),
    "zsh": (["zsh", "-f", "-i"], ['eval "$(dnnlab completion zsh)"']),
    # what --hydra-help tells zsh users: Hydra's bash line, whose script hands zsh the zsh one
    "zsh, Hydra's line": (["zsh", "-f", "-i"], ['eval "$(dnnlab -sc install=bash)"']),
    "fish": (["fish", "--no-config", "-i"], ["dnnlab completion fish | source"]),
}
TABS = [("dnnlab tr\t", "dnnlab train "),
        ("dnnlab train optimizer=na\t", "dnnlab train optimizer=nadam "),
        ("dnnlab train trainer.ep\t", "dnnlab train trainer.epochs="),
        ("dnnlab pretrain pretrain=s\t", "pretrain=same_digit ")]


@pytest.mark.parametrize("session", [pytest.param(s, marks=needs(s.split(",")[0])) for s in SESSIONS])
def test_a_tab_in_each_shell_completes_the_word(session):
    argv, setup = SESSIONS[session]
    for (typed, expected), output in zip(TABS, interactive(argv, setup, TABS)):
        assert expected in output, (typed, output[-2000:])


@needs("fish")
def test_fish_offers_the_candidates():
    script = ("dnnlab completion fish | source; complete -C 'dnnlab train optimizer=n'; echo ---; "
              "complete -C 'dnnlab tr'; echo ---; complete -C 'dnnlab pretrain pretrain='")
    done = subprocess.run(["fish", "--no-config", "-c", script], env=ENV, capture_output=True, text=True,
                          timeout=HANG_S)
    assert done.returncode == 0, done.stderr
    options, commands, pretrain = [p.split() for p in done.stdout.split("---")]
    assert options == ["optimizer=nadam", "optimizer=nesterov"] and commands == ["train"]
    assert pretrain == ["pretrain=autoencoder", "pretrain=same_digit"]


# --- the install lines of the help texts -----------------------------------------------------------------------

def test_hydras_flag_prints_dnnlabs_script_for_every_command():
    for shell in ("bash", "zsh", "fish"):
        script = dnnlab("completion", shell).stdout
        assert "dnnlab" in script and "-sc query=" in script
        assert dnnlab("-sc", f"install={shell}").stdout == script
        for command in HYDRA_COMMANDS:
            assert dnnlab(command, "--shell-completion", f"install={shell}").stdout == script, command
    assert "complete -r dnnlab" in dnnlab("train", "-sc", "uninstall=bash").stdout


def test_every_install_line_the_help_gives_prints_the_working_script():
    lines = re.findall(r'eval "\$\((.+?)\)"|^\s*(.+?) \| source$', dnnlab("train", "--hydra-help").stdout, re.M)
    lines += re.findall(r'eval "\$\((.+?)\)"', dnnlab("train", "--help").stdout)
    commands = {c for pair in lines for c in (pair if isinstance(pair, tuple) else (pair,)) if c}
    assert "dnnlab completion bash" in commands and "dnnlab -sc install=bash" in commands, commands
    for command in commands:
        script = dnnlab(*command.split()[1:]).stdout
        if "install" in command or "completion" in command:
            assert "_dnnlab_complete" in script or "__dnnlab_complete" in script, command

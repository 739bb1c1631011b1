"""Tab completion: the scripts `dnnlab completion SHELL` prints, driven as each shell drives them, the query they
ask (`dnnlab -sc query=SHELL`), and the install lines the help texts give.

The shells run with the venv's bin first on PATH (the dnnlab console script), and a home of their own (zsh's
.zcompdump, fish's ~/.config/fish, ~/.local/share/fish go there, not into the user's). zsh and fish are driven when
they are installed here (apt-get install zsh fish); a test that needs one is skipped, saying so, where it is missing.
"""
from __future__ import annotations

import os
import pty
import re
import select
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dnnlab.completion import candidates, hydra_candidates, override_text
from tests.conftest import HANG_S

BIN = Path(sys.executable).parent  # the venv's bin, holding the dnnlab console script
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "TERM": "dumb"}
HYDRA_COMMANDS = ("train", "pretrain", "diagnose", "lr-find")


def home_env(home: Path) -> dict[str, str]:
    """ENV with `home` for the shells' home, where they write their state."""
    return {**ENV, "HOME": str(home), "ZDOTDIR": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
            "XDG_DATA_HOME": str(home / ".local" / "share"), "XDG_CACHE_HOME": str(home / ".cache")}


@pytest.fixture(scope="module")
def shell_env(tmp_path_factory) -> dict[str, str]:
    return home_env(tmp_path_factory.mktemp("home"))


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


def test_a_list_key_completes_to_its_whole_value_as_one_argument():
    """Hydra offers a list's items (optimizer.betas=0=), which are no override: the value of the config the line
    composes so far, written without spaces."""
    assert hydra_candidates("train", "optimizer.betas=") == ["optimizer.betas=[0.9,0.999]"]
    assert hydra_candidates("train", "experiment=ed3/bn_after model.n_neurons=") == ["model.n_neurons=[300,100]"]
    assert hydra_candidates("train", "optimizer=sgd optimizer.betas=") == []  # sgd has no betas
    assert hydra_candidates("train", "model.n_neurons=") == ["model.n_neurons=100"]
    assert hydra_candidates("train", "model.n_neurons") == ["model.n_neurons="]


def test_a_value_is_written_as_hydra_reads_it_back():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    value = {"a": [1, 0.5, "x y", None, True, "1", "it's", "plain/path.x"], "b": {}}
    text = override_text(value)
    assert " " not in text.replace("x y", "")
    assert OverridesParser.create().parse_override(f"k={text}").value() == value


def test_the_config_dir_and_flags_on_the_line(tmp_path):
    (tmp_path / "optimizer").mkdir()
    (tmp_path / "optimizer" / "mine.yaml").write_text("lr: 0.5\n")
    assert hydra_candidates("train", f"--config-dir {tmp_path} optimizer=mi") == ["optimizer=mine"]
    assert hydra_candidates("train", f"-cd {tmp_path} optimizer=mine optimizer.l") == ["optimizer.lr="]
    assert hydra_candidates("train", "optimizer=mi") == []
    # a flag's value: its choices, or nothing (the shell's file completion takes over)
    assert hydra_candidates("train", "--cfg ") == ["job", "hydra", "all"]
    assert hydra_candidates("train", "--config-dir ") == [] and hydra_candidates("train", "-cd con") == []


def test_the_query_takes_quotes_out():
    """The help's form for a list, 'regularizer=[l2,dropout]', and a word in an unclosed quote."""
    for line, expected in [("dnnlab train 'optimizer=na", ["optimizer=nadam"]),
                           ('dnnlab train "trainer.ep', ["trainer.epochs="]),
                           ("dnnlab train optimizer='na", ["optimizer=nadam"]),
                           ("dnnlab train 'regularizer=[l2,dropout]' optimizer=na", ["optimizer=nadam"])]:
        assert dnnlab("-sc", "query=bash", COMP_LINE=line).stdout.splitlines() == expected, line


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


def bash_replies(env: dict[str, str], lines: list[tuple[str, int | None]],
                 equals_breaks: bool = True) -> dict[str, list[str]]:
    script = BASH_DRIVER + ("" if equals_breaks else "COMP_WORDBREAKS=${COMP_WORDBREAKS//=}\n")
    script += "".join(f"ask {shlex.quote(line)} {'' if point is None else point}\n" for line, point in lines)
    done = subprocess.run(["bash", "--norc", "--noprofile", "-c", script], env=env, capture_output=True, text=True,
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


def test_bash_completes_commands_groups_options_and_keys(shell_env):
    """Bash splits `optimizer=n` at the = (COMP_WORDBREAKS): the replies are what follows it."""
    mid = "dnnlab train optimizer=n trainer.epochs=3"
    got = bash_replies(shell_env, [("dnnlab tr", None), ("dnnlab train optimizer=", None),
                                   ("dnnlab train trainer.ep", None), ("dnnlab pretrain pretrain=", None),
                                   ("dnnlab train pre", None), ("dnnlab diagnose diagnose.st", None),
                                   ("dnnlab lr-find lr_find.max", None), ("dnnlab completion ", None),
                                   (mid, mid.index(" trainer"))])
    assert got["dnnlab tr"] == ["train"]
    assert {"nadam", "adam", "sgd"} <= set(got["dnnlab train optimizer="])
    assert got["dnnlab train trainer.ep"] == ["trainer.epochs="]
    assert got["dnnlab pretrain pretrain="] == ["autoencoder", "same_digit"]
    assert got["dnnlab train pre"] == []  # train takes no pretrain group
    assert got["dnnlab diagnose diagnose.st"] == ["diagnose.steps="]
    assert got["dnnlab lr-find lr_find.max"] == ["lr_find.max_lr="]
    assert got["dnnlab completion "] == ["bash", "zsh", "fish"]
    assert got[mid] == ["nadam", "nesterov"]  # the word at the cursor, not the line's last


def test_bash_without_the_equals_sign_as_word_break(shell_env):
    """Where = is not a word break (Hydra's own script removes it), the replies are whole arguments."""
    got = bash_replies(shell_env, [("dnnlab train optimizer=", None), ("dnnlab pretrain pretrain=s", None),
                                   ("dnnlab train optimizer.betas=", None)], equals_breaks=False)
    assert "optimizer=nadam" in got["dnnlab train optimizer="]
    assert got["dnnlab pretrain pretrain=s"] == ["pretrain=same_digit"]
    assert got["dnnlab train optimizer.betas="] == ["'optimizer.betas=[0.9,0.999]'"]


def test_bash_completes_in_a_quote_and_quotes_a_list(shell_env):
    """In an unclosed quote readline completes what follows the quote (and closes it): whole arguments, unquoted.
    Elsewhere a list value comes quoted, which bash would glob (and a dict brace-expand)."""
    lines = ["dnnlab train 'optimizer=n", 'dnnlab train "trainer.ep', "dnnlab train optimizer='n",
             "dnnlab train 'optimizer.betas=", "dnnlab train optimizer.betas=", "dnnlab train 'optimizer'=na",
             "dnnlab train 'regularizer=[l2,dropout]' optimizer=na"]
    got = bash_replies(shell_env, [(line, None) for line in lines])
    assert got["dnnlab train 'optimizer=n"] == ["optimizer=nadam", "optimizer=nesterov"]
    assert got['dnnlab train "trainer.ep'] == ["trainer.epochs="]
    assert got["dnnlab train optimizer='n"] == ["nadam", "nesterov"]  # the quote follows the word break
    assert got["dnnlab train 'optimizer.betas="] == ["optimizer.betas=[0.9,0.999]"]
    assert got["dnnlab train optimizer.betas="] == ["'[0.9,0.999]'"]
    assert got["dnnlab train 'optimizer'=na"] == ["nadam"]
    assert got["dnnlab train 'regularizer=[l2,dropout]' optimizer=na"] == ["nadam"]


# --- every shell, interactively: what the line becomes after a TAB ---------------------------------------------

PROMPT = b"@@@> "  # the prompt the sessions set, typed as @@''@: only the shell's prompt shows it


def interactive(argv: list[str], setup: list[str], typed: list[str], env: dict[str, str]) -> list[str]:
    """Type the setup lines into one interactive shell on a terminal, then each text (ending in a TAB) followed by
    a mark, MARK<n>, clearing the line after it; the line as the terminal shows it just before each mark. The
    shell reads what is typed in order, so the mark shows once the TAB's completion is done, however slow: no
    time limit but the hang guard. The first text is typed once the prompt shows, when the shell edits the line
    (before, the terminal would echo it as typed, mark included)."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: the shell
        os.execvpe(argv[0], argv, env)
    output, deadline = b"", time.monotonic() + HANG_S

    def read_until(text: bytes) -> None:
        nonlocal output
        while text not in output:
            assert time.monotonic() < deadline, f"hung: {text!r} never came: {output[-2000:]!r}"
            try:
                output += os.read(fd, 65536) if select.select([fd], [], [], 1)[0] else b""
            except OSError:  # the shell is gone
                pytest.fail(f"the shell ended before {text!r}: {output[-2000:]!r}")

    lines = []
    try:
        os.write(fd, "".join(line + "\n" for line in setup).encode())
        read_until(PROMPT)
        for n, text in enumerate(typed):
            mark, output = f"MARK{n}".encode(), b""
            os.write(fd, text.encode() + mark)
            read_until(mark)
            lines.append(screen_line(output.split(mark)[0].decode(errors="replace")))
            os.write(fd, b"\x15")  # Ctrl-U: an empty line for the next text
        return lines
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        os.close(fd)


def screen_line(output: str) -> str:
    """What a terminal shows left of the cursor on its last line after `output` (zsh and readline move back over
    what they rewrite with \\b and \\r)."""
    line, cursor = [], 0
    for char in re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", output):
        if char in "\r\n":
            line, cursor = ([] if char == "\n" else line), 0
        elif char == "\b":
            cursor = max(cursor - 1, 0)
        elif char.isprintable():
            line[cursor:cursor + 1] = [char]
            cursor += 1
    return "".join(line[:cursor])


SET_PROMPT = "PS1=@@''@'> '"
COMPINIT = "autoload -Uz compinit && compinit"  # the user's to run, before dnnlab's script
SESSIONS = {
    "bash": (["bash", "--norc", "--noprofile", "-i"], ['eval "$(dnnlab completion bash)"', SET_PROMPT]),
    "zsh": (["zsh", "-f", "-i"], [COMPINIT, 'eval "$(dnnlab completion zsh)"', SET_PROMPT]),
    # what --hydra-help tells zsh users: Hydra's bash line, whose script hands zsh the zsh one
    "zsh, Hydra's line": (["zsh", "-f", "-i"], [COMPINIT, 'eval "$(dnnlab -sc install=bash)"', SET_PROMPT]),
    "fish": (["fish", "--no-config", "-i"], ["dnnlab completion fish | source",
                                             "function fish_prompt; echo -n @@''@'> '; end"]),
}
TABS = [("dnnlab tr\t", "dnnlab train "),
        ("dnnlab train optimizer=na\t", "dnnlab train optimizer=nadam "),
        ("dnnlab train trainer.ep\t", "dnnlab train trainer.epochs="),
        ("dnnlab pretrain pretrain=s\t", "dnnlab pretrain pretrain=same_digit "),
        # the help's quoted form: each shell closes the quote
        ("dnnlab train 'optimizer=na\t", "dnnlab train 'optimizer=nadam' "),
        ("dnnlab train 'optimizer.betas=\t", "dnnlab train 'optimizer.betas=[0.9,0.999]' ")]


@pytest.mark.parametrize("session", [pytest.param(s, marks=needs(s.split(",")[0])) for s in SESSIONS])
def test_a_tab_in_each_shell_completes_the_word(session, shell_env):
    argv, setup = SESSIONS[session]
    lines = interactive(argv, setup, [typed for typed, _ in TABS], shell_env)
    for (typed, expected), line in zip(TABS, lines):
        assert line.endswith(expected), (typed, line)


@needs("zsh")
def test_zsh_leaves_compinit_to_the_user(tmp_path):
    """Without compinit, the script says to run it, and neither runs it nor writes ~/.zcompdump."""
    script = 'eval "$(dnnlab completion zsh)"; print -r -- ${+functions[compinit]}'
    done = subprocess.run(["zsh", "-f", "-c", script], env=home_env(tmp_path), capture_output=True, text=True,
                          timeout=HANG_S)
    assert done.returncode == 0 and done.stdout == "0\n", (done.stdout, done.stderr)
    assert done.stderr.startswith("dnnlab completion: run `autoload -Uz compinit && compinit` first"), done.stderr
    assert not list(tmp_path.glob(".zcompdump*"))


@needs("fish")
def test_fish_offers_the_candidates(shell_env):
    script = ("dnnlab completion fish | source; complete -C 'dnnlab train optimizer=n'; echo ---; "
              "complete -C 'dnnlab tr'; echo ---; complete -C 'dnnlab pretrain pretrain='")
    done = subprocess.run(["fish", "--no-config", "-c", script], env=shell_env, capture_output=True, text=True,
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

"""Tab completion in bash, zsh and fish: `eval "$(dnnlab completion bash)"` (zsh), `dnnlab completion fish | source`.

The script hands the command line up to the cursor to `dnnlab -sc query=SHELL`, which completes the command word
itself and, for a Hydra command (train, pretrain, diagnose, lr-find), asks Hydra's completion for that command's
config with the command word taken out: Hydra's query drops the first word as the app's name, so the stock script
Hydra installs (`dnnlab train -sc install=bash`) asked for `dnnlab -sc query=bash` and got the command list. Hydra's
flag (`dnnlab [COMMAND] -sc install=SHELL`, the line --hydra-help gives) prints dnnlab's script too. A query imports
Hydra but not torch: a TAB costs about half a second.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import shlex

from dnnlab.errors import DnnlabError

SHELLS = ("bash", "zsh", "fish")
SCRIPTS = {
    "bash": r"""# dnnlab tab completion for bash (and zsh, which takes the zsh one): eval "$(dnnlab completion bash)"
if [ -n "${ZSH_VERSION-}" ]; then
    eval "$(command dnnlab completion zsh)"
else
_dnnlab_complete() {
    local line=${COMP_LINE:0:COMP_POINT} exe=$1 keep="" quoted="" choice i
    local word=${line##*[[:space:]]}
    if [[ $word =~ ^([^\'\"]*)([\'\"])(.*)$ && ${BASH_REMATCH[3]} != *"${BASH_REMATCH[2]}"* ]]; then
        # an unclosed quote ('optimizer=n): readline completes what follows it, and closes it
        keep=${BASH_REMATCH[1]} quoted=1
    else
        # readline replaces only what follows the last word-break character (= and : by default): keep the rest
        for ((i = ${#word} - 1; i >= 0; i--)); do
            if [[ $COMP_WORDBREAKS == *"${word:i:1}"* ]]; then keep=${word:0:i+1}; break; fi
        done
    fi
    keep=${keep//[\'\"]} word=${word//[\'\"]}  # the query answers the words the shell will pass: unquoted
    [[ $exe == */* && -x $exe ]] || exe=dnnlab
    COMPREPLY=()
    while IFS= read -r choice; do
        [[ $choice == "$word"* ]] || continue
        choice=${choice#"$keep"}
        # a list value ([0.9,0.999]) is quoted, as the shell would otherwise glob or brace-expand it
        if [[ -z $quoted && $choice == *[^[:alnum:]_.,:=/+@%-]* ]]; then choice="'${choice//\'/\'\\\'\'}'"; fi
        COMPREPLY+=("$choice")
    done < <(COMP_LINE=$line COMP_POINT=${#line} "$exe" -sc query=bash 2>/dev/null)
    # a key (trainer.epochs=) or a section (trainer.): what follows it comes without a space
    if [[ ${#COMPREPLY[@]} -eq 1 && ${COMPREPLY[0]} == *[=./] ]]; then compopt -o nospace 2>/dev/null; fi
    return 0
}
complete -o default -F _dnnlab_complete dnnlab
fi
""",
    "zsh": r"""# dnnlab tab completion for zsh: eval "$(dnnlab completion zsh)", e.g. in ~/.zshrc
_dnnlab_complete() {
    local exe=${words[1]} line="${(j: :)${(@)words[1,CURRENT-1]}} $PREFIX"
    local -a found keys others
    [[ $exe == */* && -x $exe ]] || exe=dnnlab
    found=("${(@f)$(COMP_LINE=$line COMP_POINT=${#line} $exe -sc query=zsh 2>/dev/null)}")
    found=(${found:#})
    keys=(${(M)found:#*[=./]})  # a key or a section: what follows it comes without a space
    others=(${found:#*[=./]})
    compadd -S '' -a keys
    compadd -a others
    (( compstate[nmatches] )) || _files
}
# compinit is the user's to run (it checks fpath's folders and writes ~/.zcompdump), as every zsh framework does
if (( $+functions[compdef] )); then
    compdef _dnnlab_complete dnnlab
else
    print -ru2 -- 'dnnlab completion: run `autoload -Uz compinit && compinit` first (e.g. earlier in ~/.zshrc)'
fi
""",
    "fish": r"""# dnnlab tab completion for fish: dnnlab completion fish | source, e.g. in ~/.config/fish/config.fish
function __dnnlab_complete
    set -l exe (commandline -opc)[1]
    string match -q -- '*/*' $exe; and test -x $exe; or set exe dnnlab
    set -lx COMP_LINE (commandline -cp)
    $exe -sc query=fish 2>/dev/null
end
complete -c dnnlab -f -a '(__dnnlab_complete)'
complete -c dnnlab -n '__fish_seen_subcommand_from {path_commands}' -F
""",
}
UNINSTALL = {
    "bash": 'if [ -n "${ZSH_VERSION-}" ]; then compdef -d dnnlab; unfunction _dnnlab_complete; '
            'else complete -r dnnlab; unset -f _dnnlab_complete; fi',
    "zsh": "compdef -d dnnlab; unfunction _dnnlab_complete",
    "fish": "complete -c dnnlab -e; functions -e __dnnlab_complete",
}
USAGE = ('usage: dnnlab completion bash|zsh|fish   tab completion of commands, groups, options and keys:\n'
         '  bash, zsh: eval "$(dnnlab completion bash)"   (or zsh; e.g. in ~/.bashrc, ~/.zshrc, after compinit)\n'
         '  fish:      dnnlab completion fish | source   (e.g. in ~/.config/fish/config.fish)')


def script(shell: str) -> str:
    from dnnlab.cli import COMMANDS

    paths = " ".join(name for name, (_, _, app, _) in COMMANDS.items() if app is None and name != "completion")
    return SCRIPTS[shell].replace("{path_commands}", paths)


def main(args: list[str]) -> None:
    """`dnnlab completion SHELL`: the script."""
    if args in (["-h"], ["--help"]):
        print(USAGE)
        return
    if len(args) != 1 or args[0] not in SHELLS:
        raise DnnlabError(f"dnnlab completion SHELL: one of {', '.join(SHELLS)}, e.g. "
                          f'eval "$(dnnlab completion bash)" (dnnlab completion --help)')
    print(script(args[0]), end="")


def shell_completion(args: list[str], app: str | None) -> None:
    """Hydra's flag, `dnnlab [COMMAND] -sc install=SHELL|uninstall=SHELL|query=SHELL`: dnnlab's script, the lines
    that remove it, or the candidates for $COMP_LINE (up to $COMP_POINT). For a Hydra command the line is Hydra's:
    its first word is the app, the rest are that command's arguments; without one, it is the whole command line."""
    request = dict(a.split("=", 1) for a in args if "=" in a and not a.startswith("-"))
    actions = [a for a in ("install", "uninstall", "query") if a in request]
    if len(actions) != 1 or request[actions[0]] not in SHELLS:
        raise DnnlabError(f"--shell-completion takes one of install=SHELL, uninstall=SHELL, query=SHELL with SHELL "
                          f"{', '.join(SHELLS)}; e.g. eval \"$(dnnlab completion bash)\"")
    action, shell = actions[0], request[actions[0]]
    if action == "install":
        print(script(shell), end="")
    elif action == "uninstall":
        print(UNINSTALL[shell])
    else:
        line = os.environ.get("COMP_LINE", "")
        point = os.environ.get("COMP_POINT", "")
        line = unquoted(line[:int(point)] if point.isdigit() else line)
        found = hydra_candidates(app, re.sub(r"^\s*\S*", "", line, count=1)) if app else candidates(line)
        print("\n".join(found))


def candidates(line: str) -> list[str]:
    """What may follow `line`, the command line up to the cursor (`dnnlab train optimizer=n`), in its last word."""
    from dnnlab.cli import COMMANDS

    words = line.split()
    word = "" if not line or line[-1].isspace() else words.pop()
    if len(words) <= 1:
        return [name for name in COMMANDS if name.startswith(word)]
    command = words[1]
    if command == "completion":
        return [shell for shell in SHELLS if shell.startswith(word)] if len(words) == 2 else []
    app = COMMANDS[command][2] if command in COMMANDS else None
    if app is None:
        return []
    return hydra_candidates(app, re.sub(r"^\s*\S+\s+\S+", "", line, count=1))


def unquoted(line: str) -> str:
    """`line` as the words the shell will pass, without their quotes, joined by spaces: the help's form for a list,
    `'regularizer=[l2,dropout]'`, is one override for Hydra. An unclosed quote in the last word (`'optimizer=n`)
    is closed: the shell completes what follows it."""
    for close in ("", "'", '"') if not line.endswith("\\") else ():  # a trailing backslash: left as it is
        try:
            words = shlex.split(line + close)
        except ValueError:  # not this quote
            continue
        new_word = line[-1:].isspace() and not close  # a space inside an unclosed quote is the word's
        return " ".join(words) + (" " if new_word else "")
    return line


def hydra_candidates(config_name: str, args: str) -> list[str]:
    """Hydra's completion of the last word of `args`, the arguments of the app whose config is `config_name`
    (--config-name, --config-path and --config-dir among them change it): groups, options and keys (plus Hydra's
    flags), one per line; nothing where Hydra fails (a completion prints candidates or nothing, never an error in
    the middle of the line being typed)."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.core_plugins.bash_completion import BashCompletion
    from hydra._internal.utils import get_args_parser

    from dnnlab.conf_dirs import search_path  # also the resolver of pretrain_app's searchpath

    words = args.split()
    word = "" if not args or args[-1].isspace() else words.pop()
    parser = get_args_parser()
    if word.startswith("-"):
        return sorted(f for action in parser._actions for f in action.option_strings if f.startswith(word))
    flag = next((a for a in parser._actions if words and words[-1] in a.option_strings and a.nargs != 0), None)
    if flag is not None:  # a flag's value: its choices (--cfg job), else the shell's files (--config-dir DIR)
        return [c for c in flag.choices or () if c.startswith(word)]
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # argparse's complaint about an unfinished flag
            parsed = parser.parse_args(words)
            loader = ConfigLoaderImpl(config_search_path=search_path(parsed))
            name = parsed.config_name or config_name
            found = BashCompletion(loader)._query(config_name=name, line=args)
            # a list or dict key: Hydra offers its items (key=0=, key=1=), which are no override
            if word.endswith("=") and all(re.fullmatch(re.escape(word) + r"[^=]+[=.]", c) for c in found):
                found = container_value(loader, name, parsed, word)
    except (Exception, SystemExit):  # any failure: no candidates
        return []
    return found


def container_value(loader, config_name: str, parsed, word: str) -> list[str]:
    """[`key=VALUE`] for the word `key=` where the composed config's key is a list or a dict, its value written as
    one override without spaces (optimizer.betas=[0.9,0.999]); [] for any other key."""
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    mode = RunMode.MULTIRUN if parsed.multirun else RunMode.RUN
    config = loader.load_configuration(config_name=config_name, overrides=parsed.overrides, run_mode=mode)
    node = OmegaConf.select(config, word[:-1], default=None)
    return [word + override_text(OmegaConf.to_container(node))] if OmegaConf.is_config(node) else []


def override_text(value) -> str:
    """`value` in Hydra's override grammar, without spaces; a string quoted unless it reads as a string bare."""
    if isinstance(value, list):
        return "[" + ",".join(map(override_text, value)) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{override_text(v)}" for k, v in value.items()) + "}"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and not (re.fullmatch(r"[A-Za-z_][\w./-]*", value)
                                       and value.lower() not in ("true", "false", "null", "nan", "inf")):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return str(value)

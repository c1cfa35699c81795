"""What ``slp --help``, ``slp task=<name> --help``, ``slp --version`` and
``slp --completion bash`` print, and the "did you mean" of an unknown key.

All of it is read from the packaged configs (keys, defaults and the comment beside
each in ``conf/config.yaml`` and the group files) and from the task table, so help
cannot drift from what the config holds.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass

from . import __version__

CONF_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conf")
GROUPS = ("backend", "engine", "pipeline")
DEFAULT_CHOICE = {"backend": "local", "engine": "managed"}
_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w]*):(?P<value>[^#]*?)\s*(#\s?(?P<doc>.*))?$")


@dataclass(frozen=True)
class KeyDoc:
    key: str  # dotted
    default: str  # as written in the YAML ("" for a section)
    doc: str


def yaml_keys(path: str, prefix: str = "") -> list[KeyDoc]:
    """Dotted keys of a YAML file with the value and the comment written beside each
    (a comment continued on the lines below, indented past the key, is joined)."""
    out: list[KeyDoc] = []
    stack: list[tuple[int, str]] = []
    skip_indent = None
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("#") and out and out[-1].doc and len(line) - len(line.lstrip()) > 8:
            last = out[-1]
            out[-1] = KeyDoc(last.key, last.default, f"{last.doc} {stripped.lstrip('#').strip()}")
            continue
        m = _LINE.match(line)
        if not m:
            continue
        indent, key = len(m["indent"]), m["key"]
        if skip_indent is not None and indent > skip_indent:
            continue
        skip_indent = None
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if not stack and key in ("defaults", "hydra"):  # Hydra's own, not the user's keys
            skip_indent = indent
            continue
        dotted = ".".join([p for _, p in stack] + [key])
        value = m["value"].strip()
        if value == "":
            stack.append((indent, key))
        out.append(KeyDoc(f"{prefix}{dotted}", value, (m["doc"] or "").strip()))
    return out


def group_choices(group: str, conf_dir: str = CONF_DIR) -> list[str]:
    folder = os.path.join(conf_dir, group)
    return sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".yaml")) if os.path.isdir(folder) else []


def chosen(argv: list[str], group: str) -> str | None:
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+~") == group:
            return value
    return DEFAULT_CHOICE.get(group)


def all_keys(argv: list[str]) -> list[KeyDoc]:
    """The keys of the config this command line composes: the top level, and the
    chosen backend's and engine's."""
    keys = yaml_keys(os.path.join(CONF_DIR, "config.yaml"))
    for group in ("backend", "engine"):
        choice = chosen(argv, group)
        path = os.path.join(CONF_DIR, group, f"{choice}.yaml")
        if choice and os.path.exists(path):
            keys += [k for k in yaml_keys(path, f"{group}.") if not k.key.endswith("._target_")]
    return keys


def suggest_key(key: str, argv: list[str]) -> str:
    """``unknown key 'runner.forc' (did you mean runner.force?)``."""
    leaf = key.rsplit(".", 1)[-1]

    def score(name: str) -> float:  # the whole key, or its last part alone (force=true for runner.force)
        whole = difflib.SequenceMatcher(None, key, name).ratio()
        last = difflib.SequenceMatcher(None, leaf, name.rsplit(".", 1)[-1]).ratio()
        return max(whole, last * 0.95)

    scored = sorted(((score(k.key), k.key) for k in all_keys(argv) if k.default != ""), reverse=True)
    close = [name for s, name in scored if s >= 0.7][:3]
    hint = f"did you mean {' or '.join(close)}?" if close else "slp --help lists the keys"
    return f"unknown key {key!r} ({hint}; +{key}=... adds a new one)"


# -- help ---------------------------------------------------------------------


def _keys_of(task_keys: tuple[str, ...], argv: list[str]) -> list[KeyDoc]:
    docs = all_keys(argv)
    picked: list[KeyDoc] = []
    for want in task_keys:
        for d in docs:
            inside = d.key == want or d.key.startswith(want + ".")
            if inside and d.default != "" and d not in picked:  # leaves only
                picked.append(d)
    return picked


def main_help() -> str:
    from .tasks import TASKS

    width = max(map(len, TASKS))
    tasks = "\n".join(f"  {name:<{width}}  {t.summary}" for name, t in TASKS.items())
    backends = ", ".join(group_choices("backend"))
    return f"""slp-runner {__version__}: move, version and benchmark the artifacts around LLM inference

usage:
  slp task=<task> [key=value ...]       run one task
  slp pipeline=<name> [key=value ...]   run a declared pipeline into runs/<run_id>/
  slp -m pipeline=<name> key=a,b ...    a sweep: one run per combination, then a summary
  slp task=<task> --help                the keys a task reads, with their defaults
  slp pipeline=<name> --help            a pipeline's stages

tasks:
{tasks}

pipelines: {", ".join(group_choices("pipeline"))}
backends:  {backends} (backend=<name>; default local)
engines:   {", ".join(group_choices("engine"))} (engine=<name>)

references: hash= takes a full BLAKE3 hash, a unique prefix of 8+ hex digits, or name[:tag]
output:     format=json prints one JSON document on stdout (put, get, show, verify, ls, tag, runs, ...)

other:  slp --version | slp --completion bash | slp --hydra-help (Hydra's flags) | slp ... -c job (the composed config)
server: commands run in a resident slp process of yours, started by the first (SLP_SERVER=off: each in its own);
        slp --start-server | slp --stop-server
errors: one line on stderr, `slp: error: ...`, exit 1 (2 when the command line cannot be composed: an unknown
        key, group or a value of the wrong type); SLP_TRACE=1 shows the traceback
"""


def task_help(task: str, argv: list[str]) -> str:
    from .tasks import TASKS

    if task not in TASKS:
        close = difflib.get_close_matches(task, TASKS, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise KeyError(f"unknown task {task!r} ({hint}choose from {', '.join(TASKS)})")
    spec = TASKS[task]
    lines = [f"slp task={task}: {spec.summary}", ""]
    keys = _keys_of(spec.keys, argv)
    if keys:
        width = min(34, max(len(f"{k.key}={k.default}") for k in keys))
        lines.append("keys (key=default):")
        for k in keys:
            setting = f"{k.key}={k.default}"
            if len(setting) > width and k.doc:  # a long default: its words on the next line
                lines += [f"  {setting}", f"  {'':<{width}}  {k.doc}"]
            else:
                lines.append(f"  {setting:<{width}}  {k.doc}".rstrip())
    if "backend" in spec.keys:
        lines += ["", f"backend=<{'|'.join(group_choices('backend'))}> picks the store; "
                      f"slp task={task} backend=s3 --help shows its keys"]
    if spec.json:
        lines.append("format=json prints the result as one JSON document on stdout")
    return "\n".join(lines) + "\n"


def pipeline_help(name: str, conf_dirs: list[str] = [CONF_DIR]) -> str:
    found = [os.path.join(d, "pipeline", f"{name}.yaml") for d in conf_dirs]
    found = [p for p in found if os.path.exists(p)]
    if not found:
        names = sorted({c for d in conf_dirs for c in group_choices("pipeline", d)})
        raise KeyError(f"unknown pipeline {name!r} (choose from {', '.join(names)})")
    path = found[-1]  # as Hydra's search path: a user's folder wins over the packaged one
    import yaml

    with open(path, encoding="utf-8") as f:
        text = f.read()
    about = [ln[1:].strip() for ln in text.splitlines() if ln.startswith("#")]
    stages = (yaml.safe_load(text) or {}).get("stages") or {}
    lines = [f"slp pipeline={name}", *(f"  {a}" for a in about), "", "stages:"]
    for stage, spec in stages.items():
        inputs = ", ".join(f"{k}={v}" for k, v in (spec.get("inputs") or {}).items())
        lines.append(f"  {stage}: {spec.get('_target_')}" + (f" ({inputs})" if inputs else ""))
    lines += ["", "run options: runner.force=true (ignore the stage cache), runner.workers=N, runner.upload=false"]
    return "\n".join(lines) + "\n"


def version_line() -> str:
    import platform

    return f"slp-runner {__version__} (Python {platform.python_version()})"


# -- completion ---------------------------------------------------------------

_BASH = r"""# bash completion for slp (slp-runner {version}); zsh: autoload bashcompinit && bashcompinit first.
#   eval "$(slp --completion bash)"     or save it: slp --completion bash > ~/.local/share/bash-completion/completions/slp
_slp_complete() {{
    local line="${{COMP_LINE:0:COMP_POINT}}"
    local cur="${{line##* }}"
    local words
    case "$cur" in
        task=*) words="{tasks}" ;;
        pipeline=*) words="{pipelines}" ;;
        backend=*) words="{backends}" ;;
        engine=*) words="{engines}" ;;
        kind=*) words="kind=model kind=prompts kind=results kind=blob" ;;
        format=*) words="format=text format=json" ;;
        op=*) words="op=finalize op=clean" ;;
        *path=*|out=*|cache_dir=*|runner.runs_dir=*)
            local IFS=$'\n'
            COMPREPLY=($(compgen -f -- "${{cur#*=}}")); compopt -o filenames 2>/dev/null; return 0 ;;
        *=*) return 0 ;;
        -*) words="--help --version --completion --hydra-help -m --multirun -c --start-server --stop-server" ;;
        *) words="{keys}"; compopt -o nospace 2>/dev/null ;;
    esac
    COMPREPLY=($(compgen -W "$words" -- "$cur"))
    # bash splits words at '=' and ':': hand back only the part after what it already has.
    local done="${{cur%"${{cur##*[=:]}}"}}"
    if [[ -n "$done" ]]; then COMPREPLY=("${{COMPREPLY[@]#"$done"}}"); fi
}}
complete -F _slp_complete slp
"""


def completion_script(shell: str) -> str:
    from .tasks import TASKS

    if shell not in ("bash", "zsh"):
        raise KeyError(f"no completion for {shell!r}: bash (zsh runs it through bashcompinit)")
    keys = {f"{k.key}=" for k in yaml_keys(os.path.join(CONF_DIR, "config.yaml")) if k.default != ""}
    for group in ("backend", "engine"):  # every choice's keys: backend.root=, engine.threads=, ...
        for choice in group_choices(group):
            keys |= {f"{k.key}=" for k in yaml_keys(os.path.join(CONF_DIR, group, f"{choice}.yaml"), f"{group}.")
                     if k.default != "" and not k.key.endswith("._target_")}
    keys = sorted(keys | {f"{g}=" for g in GROUPS} | {"+provenance."})

    def choices(key: str, values) -> str:
        return " ".join(f"{key}={v}" for v in values)

    return _BASH.format(version=__version__, tasks=choices("task", TASKS),
                        pipelines=choices("pipeline", group_choices("pipeline")),
                        backends=choices("backend", group_choices("backend")),
                        engines=choices("engine", group_choices("engine")), keys=" ".join(keys))

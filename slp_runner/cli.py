"""The ``slp`` command: Hydra at the edge, plain functions behind it.

    slp task=put_model model.path=gemma.gguf model.name=gemma3-270m
    slp task=get_model hash=<blake3> out=model.gguf backend=seaweedfs
    slp task=put_prompts prompts.path=prompts.jsonl backend=s3
    slp pipeline=put_get_model backend=seaweedfs     # a declared pipeline (slp_runner/conf/pipeline/)
    slp task=reproduce run=<run_id>                  # re-run it, compare output hashes
    slp task=verify_run run=<run_id>                 # re-hash every artifact it references
    slp task=runs                                    # recent runs

Errors a user can cause print one line, ``slp: error: ...``, and exit 1.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys

from .errors import ConfigError, SlpError

# The configs ship inside the package; users add their own folders with hydra.searchpath.
CONF_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conf")


def __getattr__(name: str):
    """``build_store``, ``run_task`` and ``TASKS`` for scripts and tests: they need the
    Hydra side (:mod:`.app`), which ``slp --version`` and ``--help`` do without."""
    if name in ("build_store", "run_task", "TASKS"):
        from . import app, tasks  # noqa: F401  (app registers the resolvers and the schema)

        return getattr(tasks, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _exit_interrupted(exc: KeyboardInterrupt):
    """``slp: interrupted (SIGTERM)``, exit 128 + the signal (130 for Ctrl-C)."""
    import contextlib
    import signal

    signum = getattr(exc, "signum", signal.SIGINT)
    with contextlib.suppress(Exception):  # a terminal that hung up, a stdout that fails
        print(f"slp: interrupted ({signal.Signals(signum).name})", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
    # Stage threads may still be inside a long call; the run folder is already
    # written and marked interrupted, so exit without waiting for them.
    os._exit(128 + signum)


def _stop_on_signals() -> None:
    """SIGTERM (SLURM, Kubernetes, systemd) and SIGHUP (a closed terminal) stop slp as
    Ctrl-C does: the first is raised in the main thread as Interrupted, so a run is
    marked interrupted, its engine stopped, its folder finalized and published. A
    second signal meanwhile is only noted, lest it cut that short; a third exits at
    once (the staging folder is then abandoned: ``slp task=runs op=finalize``). A
    signal ignored when slp started (nohup) stays ignored."""
    import signal

    from .errors import Interrupted

    received: list[int] = []

    def on_signal(signum, frame):
        received.append(signum)
        if len(received) == 1:
            raise Interrupted(signum)
        if len(received) == 2:
            os.write(2, f"slp: {signal.Signals(signum).name} while stopping: finishing the run folder "
                        f"(a third signal exits at once)\n".encode())
            return
        os._exit(128 + received[0])

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, on_signal)


def user_error_line(exc: BaseException) -> str:
    """One line for any error out of a task: an SlpError says it already; a config value
    resolved late fails as an OmegaConf error (the SlpError behind it, or its first
    line); an OSError names its file; anything else its type and first line."""
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(exc, SlpError):
        return str(exc)
    if isinstance(exc, OmegaConfBaseException):
        return str(exc.__cause__) if isinstance(exc.__cause__, SlpError) else hydra_error_line(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _search_dirs(argv: list[str]) -> list[str]:
    dirs = [CONF_DIR]
    for arg in argv:
        if arg.startswith("hydra.searchpath="):
            dirs += [p.strip()[len("file://"):] for p in arg.split("=", 1)[1].strip("[]").split(",")
                     if p.strip().startswith("file://")]
    return dirs


def check_group_choices(argv: list[str]) -> None:
    """Name an unknown config choice (``backend=nope``) in one line, before Hydra's page of text."""
    dirs = _search_dirs(argv)
    for arg in argv:
        key, sep, value = arg.partition("=")
        key = key.lstrip("+~")
        if sep and not key.strip():
            raise ConfigError(f"malformed override {arg!r}: no key before '='")
        if not sep or "." in key or "/" in key or "," in value:
            continue
        groups = [os.path.join(d, key) for d in dirs if os.path.isdir(os.path.join(d, key))]
        if groups and not any(os.path.exists(os.path.join(g, f"{value}.yaml")) for g in groups):
            choices = sorted({f[:-5] for g in groups for f in os.listdir(g) if f.endswith(".yaml")})
            what = f"{key} {value!r}" if value else f"override {arg!r}: no {key}"
            raise ConfigError(f"unknown {what} (choose from {', '.join(choices)})")


_TRACE = False  # SLP_TRACE=1 or HYDRA_FULL_ERROR=1: errors show their traceback

# Keys whose values are always strings, however they look: a BLAKE3 hash such as
# 1e22...  would otherwise reach the code as the float inf, and 0123... as an int.
STRING_KEYS = {"hash", "model.hash", "prompts.hash", "run", "other", "path", "model.path", "prompts.path", "out",
               "name", "tag", "model.tag", "prompts.tag",
               "model.name", "prompts.name", "cache_dir", "backend.root", "backend.bucket", "backend.key",
               "backend.secret", "backend.filer_url", "backend.endpoint_url"}


# A value that Hydra's grammar reads as a string whatever it is: a letter, ``_`` or
# ``/`` first, then word characters, ``-``, ``.``, ``/``, ``@``. Any other value of a
# STRING_KEYS key is quoted (quoting a string changes nothing), so no parser is needed.
_PLAIN_STRING = re.compile(r"[A-Za-z_/][\w\-./@]*")
_NOT_STRINGS = {"true", "false", "inf", "nan", "null", "none"}
_SPECIAL = "'\"\\[]{}()$ :"


def string_value(arg: str) -> tuple[str, str, bool] | None:
    """``(key, value, quoted)`` when ``arg`` sets a STRING_KEYS key to a plain value that
    :func:`quote_string_values` may quote (``quoted``: it does); else None."""
    key, sep, value = arg.partition("=")
    if not sep or key.lstrip("+~") not in STRING_KEYS or not value or any(c in value for c in _SPECIAL):
        return None
    if value.lower() in ("null", "none") or "," in value:
        return None
    return key, value, not (_PLAIN_STRING.fullmatch(value) and value.lower() not in _NOT_STRINGS)


def quote_string_values(argv: list[str]) -> list[str]:
    """Quote ``key=value`` overrides of STRING_KEYS whose value Hydra might read as a
    number or bool (``hash=1e22...`` is the float inf), so they reach the code as typed."""
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and "," in value and key.lstrip("+~") in STRING_KEYS and not any(c in value for c in _SPECIAL):
            parts = [string_value(f"{key}={v}") for v in value.split(",")]  # a sweep quotes each value
            arg = f"{key}=" + ",".join(f"'{v}'" if p and p[2] else v for v, p in zip(value.split(","), parts))
        else:
            found = string_value(arg)
            if found and found[2]:
                arg = f"{found[0]}='{found[1]}'"
        out.append(arg)
    return out


def hydra_error_line(exc: BaseException) -> str:
    """One line out of a Hydra or OmegaConf error (their messages span several)."""
    from hydra.errors import OverrideParseException

    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    line = lines[0] if lines else type(exc).__name__
    if line.endswith(":") and len(lines) > 1:  # "Error loading 'x.y':" / the reason on the next line
        line = f"{line} {lines[1]}"
    if isinstance(exc, OverrideParseException):
        reason = line.split(": ", 1)[0] if line.startswith("LexerNoViableAltException") else line
        if reason.startswith("Error parsing override"):
            reason = lines[1] if len(lines) > 1 else "cannot be parsed"
        return f"malformed override {exc.override!r}: {reason}"
    cause = exc.__cause__
    if cause is not None and str(cause).strip():
        cause_lines = [ln.strip() for ln in str(cause).strip().splitlines() if ln.strip()]
        first = " ".join(cause_lines[:2]) if cause_lines[0].endswith(":") else cause_lines[0]
        if first and first not in line:
            line = f"{line.rstrip('.')}: {first}"
    return line


def answer_without_hydra(argv: list[str]) -> str | None:
    """``--version``, ``--help`` (of slp, a task or a pipeline) and ``--completion``:
    the text to print, or None when Hydra is to run. ``--hydra-help`` is Hydra's."""
    if not any(a in ("--version", "-V", "--completion", "--help", "-h") for a in argv):
        return None
    from . import cli_help

    if "--version" in argv or "-V" in argv:
        return cli_help.version_line() + "\n"
    if "--completion" in argv:
        at = argv.index("--completion")
        shell = argv[at + 1] if at + 1 < len(argv) else "bash"
        return cli_help.completion_script(shell)
    if "--help" in argv or "-h" in argv:
        task, pipeline = cli_help.chosen(argv, "task"), cli_help.chosen(argv, "pipeline")
        if task:
            return cli_help.task_help(task, argv)
        if pipeline:
            return cli_help.pipeline_help(pipeline, _search_dirs(argv))
        return cli_help.main_help()
    return None


def composition_error_line(exc: BaseException, argv: list[str]) -> str:
    """Hydra's error as one line; a misspelt key names the closest valid ones."""
    import re

    unknown = re.search(r"Could not override '([^']+)'", str(exc))
    if unknown and re.search(r"not in (struct|')", f"{exc} {exc.__cause__}"):
        deleted = _deleted_above(unknown.group(1), argv)
        if deleted:
            typed, gone = deleted
            return (f"{typed} sets a key inside {gone!r}, which ~{gone} deleted "
                    f"(drop ~{gone}, or write +{typed} to add it back)")
        from .cli_help import suggest_key

        return suggest_key(unknown.group(1), argv)
    typed = re.search(r"Error merging override ([^=\s]+)=.*?Value '(.*)' of type '\w+' could not be converted to "
                      r"(Integer|Boolean|Float)", f"{exc} {exc.__cause__}", re.S)
    typed = typed or re.search(r"Error merging override ([^=\s]+)=.*?Value '(.*)' is not a valid (bool)",
                               f"{exc} {exc.__cause__}", re.S)
    if typed:
        key, value, wanted = typed.groups()
        wanted = "Boolean" if wanted == "bool" else wanted
        what = {"Integer": "a whole number", "Boolean": "true or false (yes/no, on/off)", "Float": "a number"}[wanted]
        return f"{key} must be {what}, got {value!r}"
    return hydra_error_line(exc)


def _deleted_above(key: str, argv: list[str]) -> tuple[str, str] | None:
    """``(override, deleted)`` when a ``~deleted`` on the command line removed ``key``
    or a node above it, so that setting ``key`` could not work."""
    for arg in argv:
        if arg.startswith("~"):
            gone = arg[1:].partition("=")[0]
            if key == gone or key.startswith(gone + "."):
                typed = next((a.lstrip("+") for a in argv if a.lstrip("+").partition("=")[0] == key), key)
                return typed, gone
    return None


def run_reporting_errors(cfg) -> None:
    """Run the task ``cfg`` names; its error is one line (exit 1), or, for one job of a
    sweep, recorded in the job's folder while the other jobs go on."""
    from .tasks import multirun_job_dir, run_task

    from .stdout import StdoutError

    try:
        run_task(cfg)
    except StdoutError:
        raise  # main says it (or, for a reader that left, nothing)
    except Exception as exc:
        if _TRACE:  # a developer's view: the whole traceback
            raise
        from .pipeline import from_config

        message = from_config.redactor(cfg).text(user_error_line(exc))
        print(f"slp: error: {message}", file=sys.stderr)
        job_dir = multirun_job_dir()
        if job_dir:  # one failed job of a sweep: record it, let the others run
            from .bench import sweep
            from .tasks import job_overrides

            sweep.write_job_result(job_dir, {"status": "failed", "error": message, "overrides": job_overrides()},
                                   from_config.redactor(cfg))
            return
        raise SystemExit(1) from None
    except KeyboardInterrupt as exc:
        _exit_interrupted(exc)


def main() -> None:
    from . import stdout

    stdout.guard()
    try:
        try:
            _main()
        finally:  # here, not at exit: a write error is reported like any other
            sys.stdout.flush()
    except stdout.StdoutError as exc:
        raise stdout.ended(exc) from None


def _main() -> None:
    argv = sys.argv[1:]
    try:
        text = answer_without_hydra(argv)
        if text is None:
            check_group_choices(argv)
    except (SlpError, KeyError) as exc:
        print(f"slp: error: {exc.args[0] if isinstance(exc, KeyError) else exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if text is not None:
        sys.stdout.write(text)
        return

    # Hydra prints its own errors over several lines, then exits; told to raise them
    # instead, they are reported here in one. A user who set the variable gets the trace.
    global _TRACE
    wants_trace = _TRACE = "HYDRA_FULL_ERROR" in os.environ or bool(os.environ.get("SLP_TRACE"))
    os.environ["HYDRA_FULL_ERROR"] = "1"
    _stop_on_signals()
    from . import compose

    try:
        if compose.is_single_run(argv):  # composed once (or read back), without Hydra's main
            from . import tasks

            composed = compose.compose_single(argv)
            tasks.single_run_overrides = composed.overrides
            run_reporting_errors(composed.config)
        else:  # a sweep, or Hydra's own flags
            sys.argv[1:] = quote_string_values(argv)
            from .app import hydra_main

            with _masked_output(argv):
                hydra_main()
    except KeyboardInterrupt as exc:  # a signal while the config is composed
        _exit_interrupted(exc)
    except Exception as exc:
        if wants_trace:
            raise
        if _is_config_error(exc):
            print(f"slp: error: {_mask_argv_secrets(composition_error_line(exc, argv), argv)}", file=sys.stderr)
            raise SystemExit(2) from None
        if isinstance(exc, OSError):  # this machine's files: a full disk, a folder that cannot be made
            print(f"slp: error: {_mask_argv_secrets(user_error_line(exc), argv)}", file=sys.stderr)
            raise SystemExit(1) from None
        raise


def _is_config_error(exc: BaseException) -> bool:
    """A Hydra or OmegaConf error (composition, an override), without importing Hydra
    when it never ran."""
    hydra_errors = sys.modules.get("hydra.errors")
    omegaconf_errors = sys.modules.get("omegaconf.errors")
    return bool((hydra_errors and isinstance(exc, hydra_errors.HydraException))
                or (omegaconf_errors and isinstance(exc, omegaconf_errors.OmegaConfBaseException)))


# Hydra's flags that print the composed config (credentials included) or its overrides.
_PRINTS_CONFIG = ("--cfg", "-c", "--info", "-i")


@contextlib.contextmanager
def _masked_output(argv: list[str]):
    """Standard output and error masked line by line while Hydra prints a config
    (``--cfg``, ``--info``): a secret given on the command line, in the environment or
    under a secret-looking key shows as ``***``, as in a run's files."""
    if not any(arg in _PRINTS_CONFIG or arg.startswith(("--cfg=", "--info=")) for arg in argv):
        yield
        return
    from .redaction import MaskingStream, Redactor, url_passwords

    redactor = Redactor(extra=[value for _, value in _argv_secrets(argv) if value] + url_passwords(argv))
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = MaskingStream(sys.stdout, redactor), MaskingStream(sys.stderr, redactor)
    try:
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        sys.stdout, sys.stderr = saved


def _argv_secrets(argv: list[str]) -> list[tuple[str, str]]:
    """``(argument, value)`` of each override that gives a secret-named key a value
    (quotes stripped: the value may be empty)."""
    from .redaction import mask_override

    return [(arg, arg.partition("=")[2].strip("'\"")) for arg in argv if mask_override(arg) != arg]


def _mask_argv_secrets(message: str, argv: list[str]) -> str:
    """An error about the command line may quote it: mask what a secret-named key was given."""
    from .redaction import Redactor, mask_override, strip_url_password

    for arg, value in _argv_secrets(argv):
        message = message.replace(arg, mask_override(arg))
        if value:
            message = message.replace(value, "***")
    return Redactor().text(strip_url_password(message))


if __name__ == "__main__":
    main()

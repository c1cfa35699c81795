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

import os
import sys
from typing import Any, Callable

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from . import commands
from .artifacts import MODEL, PROMPTS, RESULTS, KINDS, kind_named
from .backends import Backend
from .cache import LocalCache
from .errors import ConfigError, SlpError
from .examples import register_resolvers
from .bench import sweep
from .pipeline import from_config
from .pipeline.history import list_runs, load_manifest, verify_run
from .store import ArtifactStore

register_resolvers()

# The configs ship inside the package; users add their own folders with hydra.searchpath.
CONF_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conf")


def build_backend(cfg: DictConfig) -> Backend:
    if "_target_" not in cfg.backend:
        raise ConfigError("backend config has no _target_")
    from hydra.errors import InstantiationException

    try:
        return instantiate(cfg.backend, _convert_="all")
    except InstantiationException as exc:
        if isinstance(exc.__cause__, SlpError):  # the factory's own one-line error (a missing extra, ...)
            raise exc.__cause__ from None
        # Hydra's message spans several lines (and may hold the config): keep its first,
        # which names the target and the error.
        cause = exc.__cause__
        reason = f"{type(cause).__name__}: {cause}" if cause else str(exc).strip().splitlines()[0]
        raise ConfigError(f"backend._target_ {cfg.backend._target_!r}: {reason.splitlines()[0]}") from None


def build_store(cfg: DictConfig) -> ArtifactStore:
    return ArtifactStore(build_backend(cfg), verify_upload=cfg.verify_upload, verify_existing=cfg.verify_existing)


def _provenance(cfg: DictConfig) -> dict[str, Any]:
    prov = cfg.get("provenance") or {}
    return OmegaConf.to_container(prov, resolve=True) if isinstance(prov, DictConfig) else dict(prov)


def _need(value: Any, what: str) -> Any:
    if value in (None, ""):
        raise ConfigError(f"missing {what}")
    return value


def _put(kind_cfg_key: str | None, kind_fixed=None) -> Callable[[DictConfig], Any]:
    def run(cfg: DictConfig):
        store = build_store(cfg)
        if kind_fixed is not None:
            section = cfg[kind_cfg_key]
            path = _need(section.path, f"{kind_cfg_key}.path=<file>")
            return commands.put(store, kind_fixed, path, name=section.get("name"), source=section.get("source"),
                                provenance=_provenance(cfg), sha256=cfg.sha256, progress=cfg.progress)
        kind = kind_named(_need(cfg.kind, "kind=<" + "|".join(KINDS) + ">"))
        path = _need(cfg.path, "path=<file>")
        return commands.put(store, kind, path, provenance=_provenance(cfg), sha256=cfg.sha256, progress=cfg.progress)

    return run


def _get(kind_fixed=None) -> Callable[[DictConfig], Any]:
    def run(cfg: DictConfig):
        oid = _need(cfg.hash, "hash=<blake3>")
        kind = kind_fixed or (kind_named(cfg.kind) if cfg.kind else None)
        return commands.get(build_store(cfg), LocalCache(cfg.cache_dir), kind, str(oid), dest=cfg.out,
                            full_verify=cfg.full_verify, progress=cfg.progress)

    return run


def _repair(cfg: DictConfig):
    kind = kind_named(cfg.kind) if cfg.kind else None
    return commands.repair(build_store(cfg), kind, str(_need(cfg.hash, "hash=<blake3>")),
                           _need(cfg.path, "path=<local file with the right bytes>"), progress=cfg.progress)


def _fsck(cfg: DictConfig):
    from . import fsck

    findings = fsck.fsck(build_store(cfg), LocalCache(cfg.cache_dir), cfg.runner.runs_dir, fix=bool(cfg.fix),
                         grace=fsck.parse_grace(cfg.grace), sample=float(cfg.sample))
    if fsck.damage_remains(findings):
        raise SystemExit(1)
    return findings


def _show(cfg: DictConfig):
    kind = kind_named(cfg.kind) if cfg.kind else None
    return commands.show(build_store(cfg), kind, str(_need(cfg.hash, "hash=<blake3>")))


def _verify(cfg: DictConfig):
    kind = kind_named(cfg.kind) if cfg.kind else None
    if not commands.verify(build_store(cfg), kind, str(_need(cfg.hash, "hash=<blake3>"))):
        raise SystemExit(1)


def _ls(cfg: DictConfig):
    kinds = [kind_named(cfg.kind)] if cfg.kind else [MODEL, PROMPTS, RESULTS]
    return commands.list_artifacts(build_store(cfg), kinds)


def _overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:  # composed without Hydra's main (tests)
        return []


def _multirun_job_dir() -> str | None:
    """This job's folder when running under ``-m`` (a sweep), else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        hc = HydraConfig.get()
    except ValueError:
        return None
    return hc.runtime.output_dir if hc.mode == RunMode.MULTIRUN else None


def _run(cfg: DictConfig):
    job_dir = _multirun_job_dir()
    if job_dir and cfg.resume:
        done = sweep.completed_result(job_dir)
        if done:
            print(f"job {os.path.basename(job_dir)} already completed (run {done.get('run_id')}): skipped")
            return done
    store = build_store(cfg)
    result = from_config.run_pipeline(cfg, store, LocalCache(cfg.cache_dir), _overrides())
    if job_dir:
        sweep.write_job_result(job_dir, {"status": result.status, "run_id": result.run_id, "folder": result.folder,
                                         "overrides": _overrides(), "stages": result.manifest["stages"]},
                                 from_config.redactor(cfg, store))
    return result


def _reproduce(cfg: DictConfig):
    run_id = str(_need(cfg.run, "run=<run_id>"))
    _, comparison = from_config.reproduce(cfg, build_store(cfg), LocalCache(cfg.cache_dir), run_id)
    if not all(comparison.values()):
        raise SystemExit(1)
    return comparison


def _verify_run(cfg: DictConfig):
    store = build_store(cfg)
    manifest = load_manifest(str(_need(cfg.run, "run=<run_id>")), cfg.runner.runs_dir, store)
    problems = verify_run(manifest, store, LocalCache(cfg.cache_dir))
    if problems:
        raise SystemExit(1)
    return problems


def _runs(cfg: DictConfig):
    """List runs; op=finalize | clean settles the abandoned ones (all, or run=<id>)."""
    op = cfg.get("op")
    if not op:
        return list_runs(cfg.runner.runs_dir)
    from .pipeline.abandoned import settle_abandoned

    run_id = str(cfg.run) if cfg.get("run") else None
    return settle_abandoned(cfg.runner.runs_dir, str(op), run_id, redactor=from_config.redactor(cfg))


TASKS: dict[str, Callable[[DictConfig], Any]] = {
    "run": _run,
    "reproduce": _reproduce,
    "verify_run": _verify_run,
    "runs": _runs,
    "put_model": _put("model", MODEL),
    "get_model": _get(MODEL),
    "put_prompts": _put("prompts", PROMPTS),
    "get_prompts": _get(PROMPTS),
    "put": _put(None),
    "get": _get(),
    "show": _show,
    "verify": _verify,
    "repair": _repair,
    "fsck": _fsck,
    "ls": _ls,
}


def run_task(cfg: DictConfig) -> Any:
    """Run the task a composed config names (callable from tests without Hydra's main)."""
    task = cfg.get("task") or ("run" if cfg.get("pipeline") else None)
    if not task:
        raise ConfigError(f"no task given: add task=<{'|'.join(TASKS)}>")
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r} (choose from {', '.join(TASKS)})")
    return TASKS[task](cfg)


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    from omegaconf.errors import OmegaConfBaseException

    try:
        run_task(cfg)
    except Exception as exc:
        if _TRACE:  # a developer's view: the whole traceback
            raise
        message = from_config.redactor(cfg).text(user_error_line(exc))
        print(f"slp: error: {message}", file=sys.stderr)
        job_dir = _multirun_job_dir()
        if job_dir:  # one failed job of a sweep: record it, let the others run
            sweep.write_job_result(job_dir, {"status": "failed", "error": message, "overrides": _overrides()},
                                   from_config.redactor(cfg))
            return
        raise SystemExit(1) from None
    except KeyboardInterrupt as exc:
        _exit_interrupted(exc)


def _exit_interrupted(exc: KeyboardInterrupt):
    """``slp: interrupted (SIGTERM)``, exit 128 + the signal (130 for Ctrl-C)."""
    import contextlib
    import signal

    signum = getattr(exc, "signum", signal.SIGINT)
    with contextlib.suppress(OSError):  # a terminal that hung up
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
STRING_KEYS = {"hash", "model.hash", "prompts.hash", "run", "path", "model.path", "prompts.path", "out",
               "model.name", "prompts.name", "cache_dir", "backend.root", "backend.bucket", "backend.key",
               "backend.secret", "backend.filer_url", "backend.endpoint_url"}


def quote_string_values(argv: list[str]) -> list[str]:
    """Quote ``key=value`` overrides of STRING_KEYS whose value Hydra would read as a
    number or bool, so they reach the code as typed."""
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+~") in STRING_KEYS and value and not any(c in value for c in "'\"\\[]{}()$ :"):
            # a sweep (hash=a,b) quotes each of its values
            values = [v if v.lower() in ("null", "none") or _reads_as_string(f"{key}={v}") else f"'{v}'"
                      for v in value.split(",")]
            arg = f"{key}={','.join(values)}"
        out.append(arg)
    return out


def _reads_as_string(arg: str) -> bool:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        (override,) = OverridesParser.create().parse_overrides([arg])
    except Exception:  # malformed: Hydra reports it, in one line, when it composes
        return True
    return isinstance(override.value(), str)


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


def main() -> None:
    argv = sys.argv[1:]
    try:
        check_group_choices(argv)
    except SlpError as exc:
        print(f"slp: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    sys.argv[1:] = quote_string_values(argv)
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    # Hydra prints its own errors over several lines, then exits; told to raise them
    # instead, they are reported here in one. A user who set the variable gets the trace.
    global _TRACE
    wants_trace = _TRACE = "HYDRA_FULL_ERROR" in os.environ or bool(os.environ.get("SLP_TRACE"))
    os.environ["HYDRA_FULL_ERROR"] = "1"
    _stop_on_signals()
    try:
        _hydra_main()
    except (HydraException, OmegaConfBaseException) as exc:
        if wants_trace:
            raise
        print(f"slp: error: {_mask_argv_secrets(hydra_error_line(exc), argv)}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as exc:  # this machine's files: a full disk, a folder that cannot be made
        if wants_trace:
            raise
        print(f"slp: error: {_mask_argv_secrets(user_error_line(exc), argv)}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt as exc:  # a signal while Hydra composes the config
        _exit_interrupted(exc)


def _mask_argv_secrets(message: str, argv: list[str]) -> str:
    """An error about the command line may quote it: mask what a secret-named key was given."""
    from .redaction import Redactor, mask_override, strip_url_password

    for arg in argv:
        masked = mask_override(arg)
        if masked != arg:
            message = message.replace(arg, masked)
            value = arg.partition("=")[2].strip("'\"")
            if value:
                message = message.replace(value, "***")
    return Redactor().text(strip_url_password(message))


if __name__ == "__main__":
    main()

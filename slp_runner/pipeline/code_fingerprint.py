"""What code a stage runs, as a small fingerprint that goes into its cache key.

Without it, a user who edits a stage function and runs the pipeline again is served
the old outputs from the stage cache. The fingerprint covers:

- the module that defines the stage's function (after unwrapping decorators and
  ``functools.partial``): the BLAKE3 of its source file when it is the user's own
  file or this repository installed in editable mode; the distribution name and
  version when it comes from an installed package under site-packages (a package
  changes by being upgraded, and hashing its files would only cost time);
- the slp-runner version, since the runner decides how stages are called.

It does not cover the helper modules the stage imports, data files the stage reads
without naming them in its parameters, or the Python interpreter. Only the defining
module counts, so editing an unrelated module leaves the stage's key alone. When a
change slips through these, ``runner.force=true`` runs every stage again.

The file is hashed as it is on disk when the pipeline is built; in a long-lived
process that imported an older version of the module, the two may differ.
"""

from __future__ import annotations

import functools
import importlib.metadata
import inspect
import os
import site
import sys
import sysconfig
from typing import Any, Callable

import blake3

# (path, size, mtime_ns) -> BLAKE3: a 100-stage pipeline over one module hashes it once.
_file_hashes: dict[tuple[str, int, int], str] = {}


def code_fingerprint(fn: Callable[..., Any], named_module: str | None = None) -> dict[str, Any]:
    """A JSON-ready fingerprint of the code ``fn`` runs (see the module docstring).

    named_module: the module the ``_target_`` names, when it is not the one defining
    ``fn`` (``go = make_stage(1)`` there, the factory elsewhere): it is fingerprinted
    too, since the arguments it binds are code the stage runs.
    """
    target = _unwrap(fn)
    module_name = getattr(target, "__module__", None) or "<unknown>"
    code = _module_print(target, module_name)
    if named_module and named_module != module_name and named_module in sys.modules:
        code["target_module"] = _module_print(sys.modules[named_module], named_module)
    code["slp_runner"] = _slp_runner_version()
    return code


def _module_print(target: Any, module_name: str) -> dict[str, Any]:
    path = _defining_file(target, module_name)
    dist = None
    if path is None or _in_site_packages(path):
        dist = _distribution(module_name)
    if dist is not None:
        code: dict[str, Any] = {"distribution": dist[0], "version": dist[1]}
    elif path is not None:
        code = {"module": module_name, "blake3": _hash_file(path)}
    else:
        code = {"module": module_name, "unknown": True}
    return code


def _unwrap(fn: Any) -> Any:
    # Decorators made with functools.wraps expose __wrapped__; partials expose .func.
    while True:
        fn = inspect.unwrap(fn)
        if isinstance(fn, functools.partial):
            fn = fn.func
        else:
            return fn


def _defining_file(target: Any, module_name: str) -> str | None:
    """The source file of the module defining ``target``; None for builtins and C code."""
    module = sys.modules.get(module_name)
    for obj in (module, target):
        if obj is None:
            continue
        try:
            path = inspect.getsourcefile(obj)
        except TypeError:  # built-in module, class or function
            continue
        if path and os.path.isfile(path):
            return os.path.realpath(path)
    return None


@functools.cache
def _site_dirs() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    dirs = {paths.get("purelib"), paths.get("platlib"), *getattr(site, "getsitepackages", list)()}
    return tuple(os.path.realpath(d) for d in dirs if d)


def _in_site_packages(path: str) -> bool:
    if any(path.startswith(d + os.sep) for d in _site_dirs()):
        return True
    # Another environment's packages (on PYTHONPATH, say) are installed packages too.
    return any(part in ("site-packages", "dist-packages") for part in path.split(os.sep))


@functools.cache
def _packages_distributions() -> dict[str, list[str]]:
    # Reads every installed distribution's file list: slow, so once per process.
    return importlib.metadata.packages_distributions()


def _distribution(module_name: str) -> tuple[str, str] | None:
    """(name, version) of the installed distribution providing ``module_name``: the one
    named like the module when its file list holds it (one lookup), else found in the
    map of every distribution's files (a few tenths of a second to build)."""
    top = module_name.split(".", 1)[0]
    same_name = _named_like(top)
    if same_name is not None:
        return same_name
    for name in _packages_distributions().get(top, []):
        try:
            return name, importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


@functools.cache
def _named_like(top: str) -> tuple[str, str] | None:
    try:
        dist = importlib.metadata.distribution(top)  # names compare normalized: slp_runner is slp-runner
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None
    holds = any(f.parts and f.parts[0] in (top, f"{top}.py") for f in dist.files or [])
    return (dist.metadata["Name"], dist.version) if holds else None


def _hash_file(path: str) -> str:
    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime_ns)
    digest = _file_hashes.get(key)
    if digest is None:
        with open(path, "rb") as f:
            digest = blake3.blake3(f.read()).hexdigest()  # source files are small
        _file_hashes[key] = digest
    return digest


@functools.cache
def _slp_runner_version() -> str:
    try:
        return importlib.metadata.version("slp-runner")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"

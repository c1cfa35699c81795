"""The config of a single run, composed once and remembered.

Hydra's ``@hydra.main`` composes a config twice (once to learn the run mode, once to
run) and ``import hydra`` alone costs about a third of a second: most of what a user
felt of ``slp task=get`` on a warm cache. So a single run (no ``-m``, no ``--flag``,
no ``hydra.*`` override) is composed here with Hydra's Compose API, once, and the
composed config is kept in a small file; the same command line next time loads that
file with OmegaConf and never imports Hydra.

What the composed config depends on is the key of its file: the command line (its
shape: plain values of string-typed keys such as ``hash=`` and ``path=`` stand as
placeholders, so one file serves every hash, and none is written down), this package's
version and Python's, the content of every config file, the modules that shape
composition (their sizes and modification times), and Hydra's and OmegaConf's
installed modules. The digest of an entry covers its key, and an entry is read only
from a folder of this user that nobody else can write to. Interpolations
(``${oc.env:...}``, the example resolvers) are kept unresolved, so the environment and
the working folder are read when the run reads them, as under Hydra. A file whose
digest does not match its content (edited, truncated) is composed again and replaced.
A command line or a config that may hold a secret (a secret-named key, a URL with an
``@``, an interpolation typed on the command line) is never written down: it is
composed each time (:func:`keepable`). ``SLP_COMPOSE_CACHE=off`` turns the files off;
a folder path moves them (default ``$XDG_CACHE_HOME/slp-runner/compose``).
"""

from __future__ import annotations

import base64
import contextlib
import math
import os
import pickle
import re
import stat
import sys
from dataclasses import dataclass
from typing import Any

import orjson

from . import __version__

FORMAT = 2  # 2: the DictConfig itself kept too (pickled), and where its placeholders are
KEEP = 256  # entries; the oldest go first
# key=value, +key=value, ++key=value, ~key[=value]: what a single run may be given
_OVERRIDE = re.compile(r"^(\+{1,2}|~)?(?P<key>[A-Za-z_][\w.\-@/]*)(=.*)?$", re.S)
_PACKAGE = os.path.dirname(os.path.abspath(__file__))
CONF_DIR = os.path.join(_PACKAGE, "conf")
# Modules whose code decides what a command line composes to.
_SHAPING = [os.path.join(_PACKAGE, f) for f in ("schema.py", "cli.py", "compose.py")]


@dataclass
class Composed:
    config: Any  # DictConfig
    overrides: list[str]  # the overrides as Hydra recorded them (hydra.overrides.task)
    cached: bool  # loaded from a file, Hydra not imported


def is_single_run(argv: list[str]) -> bool:
    """Only overrides, none of Hydra's own: the Compose API composes exactly what
    ``@hydra.main`` would for it."""
    for arg in argv:
        m = _OVERRIDE.match(arg)
        if not m or m.group("key").split(".")[0].split("/")[0] == "hydra":
            return False
    return True


def cache_dir() -> str | None:
    setting = os.environ.get("SLP_COMPOSE_CACHE", "")
    if setting.lower() in ("off", "0", "false", "no"):
        return None
    if setting:
        return os.path.abspath(os.path.expanduser(setting))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "slp-runner", "compose")


def _stat(path: str | None) -> list:
    if not path:
        return [None]
    try:
        st = os.stat(path)
    except OSError:
        return [path, None]
    return [path, st.st_size, st.st_mtime_ns]


def _module_file(name: str) -> str | None:
    from importlib.util import find_spec

    with contextlib.suppress(ImportError, ValueError):
        spec = find_spec(name)
        return spec.origin if spec else None
    return None


def _tree(root: str) -> list:
    """Every config file's path and content (a few KB in all): an edit that keeps the
    size and the modification time (``cp -p``, ``rsync -t``) still changes the key."""
    out = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            if name.endswith((".yaml", ".yml")):
                path = os.path.join(folder, name)
                try:
                    with open(path, "rb") as f:
                        out.append([path, f.read().decode("utf-8", "replace")])
                except OSError:
                    out.append([path, None])
    return out


def key_of(argv: list[str], conf_dir: str = CONF_DIR) -> str:
    from blake3 import blake3

    parts = [FORMAT, __version__, sys.version, sys.executable, argv, _tree(conf_dir),
             [_stat(p) for p in _SHAPING], _stat(_module_file("hydra")), _stat(_module_file("omegaconf"))]
    return blake3(orjson.dumps(parts)).hexdigest()


def _digest(path: str, config: Any, overrides: Any, built: str = "") -> str:
    """Over the entry's own key (its file name) too: an entry copied under another
    command's name does not check."""
    from blake3 import blake3

    body = orjson.dumps([os.path.basename(path), config, overrides, built], option=orjson.OPT_SORT_KEYS)
    return blake3(body).hexdigest()


def _slots(value: Any, at: tuple = ()) -> list[list]:
    """``[path, text]`` of every string holding a placeholder, in a config's container."""
    if isinstance(value, dict):
        return [slot for k, v in value.items() for slot in _slots(v, (*at, k))]
    if isinstance(value, list):
        return [slot for i, v in enumerate(value) for slot in _slots(v, (*at, i))]
    return [[list(at), value]] if isinstance(value, str) and "__slp_value_" in value else []


def _built(container: dict) -> str:
    """The config as OmegaConf builds it from ``container``, pickled (base64): building
    it takes ~10 ms, unpickling it ~0.6 (``OmegaConf.create`` checks every node)."""
    from omegaconf import OmegaConf

    return base64.b64encode(pickle.dumps(OmegaConf.create(container), protocol=pickle.HIGHEST_PROTOCOL)).decode()


def _rebuilt(built: str, slots: list, values: list[str]):
    """The kept DictConfig with the command's values in its placeholders' strings.
    Unpickled only from a private folder (see ``private_folder``), like the JSON beside it."""
    cfg = pickle.loads(base64.b64decode(built))
    for path, text in slots:
        node = cfg
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = _fill(text, values)
    return cfg


def private_folder(folder: str) -> bool:
    """Only a folder of this user that nobody else may write to: a config read back is
    code that runs (its backend ``_target_`` is called), as ``ssh`` treats its keys."""
    try:
        st = os.stat(folder)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o022


def load(path: str) -> tuple[dict, list[str], str, list] | None:
    """The config and overrides a cache file holds, with the built config (pickled) and
    its placeholders' places, or None (absent, damaged, stale format, not a regular
    file, kept under another key)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a fifo put there must not block
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            doc = orjson.loads(f.read())
        if doc.get("format") != FORMAT or doc.get("digest") != _digest(path, doc["config"], doc["overrides"],
                                                                       doc["built"]):
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # the newest used is pruned last
        return doc["config"], list(doc["overrides"]), doc["built"], _slots(doc["config"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def keepable(container: Any, overrides: list[str], argv: list[str] | None = None) -> bool:
    """May this composition be written down? Not when it may hold a secret, and not
    when JSON cannot hold it exactly. Erring on the side of composing again:
    - an interpolation on the command line (Hydra records ``${oc.env:X}`` in the
      overrides already resolved: an environment secret, and a value that would be stale);
    - a value under a secret-looking name that is not an interpolation, of any type;
    - anything like a URL with an ``@`` (``scheme://[user][:password]@host``);
    - a secret-named override, whatever its value;
    - a number JSON cannot carry (inf, nan, an integer beyond 64 bits)."""
    from .redaction import is_secret_name, mask_override

    if any("${" in o or ("://" in o and "@" in o) or mask_override(o) != o for o in [*overrides, *(argv or [])]):
        return False

    def sound(value: Any, secret: bool) -> bool:
        if isinstance(value, dict):
            return all(sound(v, secret or is_secret_name(k)) for k, v in value.items())
        if isinstance(value, list):
            return all(sound(v, secret) for v in value)
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if isinstance(value, int) and not isinstance(value, bool) and not -2**63 <= value < 2**64:
            return False
        if isinstance(value, str):
            return not (secret and "${" not in value) and not ("://" in value and "@" in value)
        return not secret or value is None

    return sound(container, False)


def save(path: str, container: dict, overrides: list[str]) -> None:
    """Write the entry atomically; a cache that cannot be written is only skipped."""
    from .local_output import keep_newest, temp_name

    folder = os.path.dirname(path)
    tmp = None
    try:
        built = _built(container)
        doc = orjson.dumps({"format": FORMAT, "digest": _digest(path, container, overrides, built),
                            "config": container, "overrides": overrides, "built": built})
        os.makedirs(folder, mode=0o700, exist_ok=True)
        if not private_folder(folder):
            return
        tmp = temp_name(folder, ".compose-")
        with open(tmp, "xb") as f:
            f.write(doc)
        os.replace(tmp, path)
        tmp = None
        keep_newest(folder, _ENTRY, _TEMP, KEEP)
    except (OSError, TypeError, ValueError, AttributeError, pickle.PicklingError):  # what cannot be written
        pass
    finally:
        if tmp:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


_ENTRY = re.compile(r"[0-9a-f]{64}\.json")
_TEMP = re.compile(r"\.compose-.*")


def _as_config(container):
    """A DictConfig in struct mode from a container (or a DictConfig already built)."""
    from omegaconf import DictConfig, OmegaConf

    from .examples import register_resolvers

    register_resolvers()
    cfg = container if isinstance(container, DictConfig) else OmegaConf.create(container)
    OmegaConf.set_struct(cfg, True)  # a misspelt key read by the code fails, as under Hydra
    return cfg


def compose_with_hydra(overrides: list[str]) -> tuple[dict, list[str]]:
    """One composition through Hydra's Compose API: the config (interpolations kept) and
    the overrides as Hydra records them."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from .examples import register_resolvers
    from .schema import register as register_schema

    register_resolvers()
    register_schema()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3", job_name="slp"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
        recorded = [str(o) for o in cfg.hydra.overrides.task]
        with _open_struct(cfg):
            del cfg["hydra"]
    return OmegaConf.to_container(cfg, resolve=False), recorded


@contextlib.contextmanager
def _open_struct(cfg):
    from omegaconf import open_dict

    with open_dict(cfg):
        yield


# What stands for a plain string value in a kept config (see :func:`shape_of`).
PLACEHOLDER = "__slp_value_{}__"


def shape_of(argv: list[str]) -> tuple[list[str], list[str]]:
    """The overrides Hydra is given, with every plain value of a string-typed key (``hash=``,
    ``path=``, ``out=``, names and tags) replaced by a quoted placeholder (recorded as
    ``hash='<value>'``), and the values taken out. Such a value only ever lands, as a
    string, at its own key: so one kept config serves ``slp task=get hash=<any
    hash>``, and no hash, path or name is written down. Secret-named keys are never
    abstracted (a secret is never kept)."""
    from .cli import quote_string_values, string_value
    from .redaction import mask_override

    shape, values = [], []
    for arg in argv:
        found = string_value(arg)
        if found is None or found[0] != found[0].lstrip("+~") or mask_override(arg) != arg:
            shape += quote_string_values([arg])
            continue
        key, value, _ = found
        # Always quoted: a quoted string is a string, so a hash that starts with a digit
        # (which Hydra might read as a number) and one that starts with a letter share it.
        shape.append(f"{key}='{PLACEHOLDER.format(len(values))}'")
        values.append(value)
    return shape, values


def _fill(value: Any, values: list[str]) -> Any:
    if isinstance(value, dict):
        return {k: _fill(v, values) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, values) for v in value]
    if isinstance(value, str) and "__slp_value_" in value:
        for i, real in enumerate(values):
            value = value.replace(PLACEHOLDER.format(i), real)
    return value


def compose_single(argv: list[str]) -> Composed:
    """The config of ``slp <argv>`` for a single run: from its kept file when there is a
    sound one, else composed by Hydra once and kept unless it holds a secret."""
    shape, values = shape_of(argv)
    folder = cache_dir()
    if any("__slp_value_" in a for a in argv):  # the placeholders' own text, typed: compose as given
        from .cli import quote_string_values

        shape, values, folder = quote_string_values(argv), [], None
    if folder and os.path.isdir(folder) and not private_folder(folder):
        folder = None  # another user could have written it: never read back
    path = os.path.join(folder, key_of(shape) + ".json") if folder else None
    found = load(path) if path and os.path.exists(path) else None
    if found is not None:
        container, overrides, built, slots = found
        try:
            config = _rebuilt(built, slots, values)
        except Exception:  # noqa: BLE001 - a pickle that does not load: built from the JSON instead
            config = None
        return Composed(_as_config(config if config is not None else _fill(container, values)),
                        _fill(overrides, values), True)
    try:
        container, overrides = compose_with_hydra(shape)
    except Exception:
        if not values:
            raise
        # The error names the user's values, not placeholders: compose those to report it.
        container, overrides = compose_with_hydra(_fill(shape, values))
        return Composed(_as_config(container), overrides, False)
    real, real_overrides = _fill(container, values), _fill(overrides, values)
    if path and keepable(real, real_overrides, argv):
        save(path, container, overrides)
    return Composed(_as_config(real), real_overrides, False)

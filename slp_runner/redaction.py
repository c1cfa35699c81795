"""Keep this process's secrets out of every file a run writes or publishes.

Two nets, because neither is enough alone:

- by name: a value under a secret-looking key (``backend.secret``, ``api_key``,
  ``key``, ...) in a config tree, and the value of a secret-looking override
  (``backend.secret=...``, ``+x.token=...``), become ``***`` whatever they are;
- by value: every secret this process knows (values under secret-looking config
  keys, secret-looking environment variables, and, on S3, the credentials
  botocore finds in ``~/.aws``) is replaced by ``***`` wherever it appears: a log
  line, an error message, a file a stage wrote.

Values shorter than :data:`MIN_SECRET_LEN` characters are masked by name only:
replacing every ``s`` or ``1234`` in every file would destroy the files and hide
nothing worth hiding.
"""

from __future__ import annotations

import functools
import json
import os
import re
import tempfile
from typing import Any, Iterable, Mapping

# ``token(?!s)``: ``max_tokens`` counts tokens; masking it would make reproduce take
# today's value instead of the saved one.
SECRET_NAME_RE = re.compile(
    r"(secret|password|passwd|token(?!s)|credential|api_?key|access_?key|private_?key|^key$"
    r"|authori[sz]ation|auth_?header|^auth$|bearer|cookie|^pass$)", re.I)
# user:password@ in a URL (a filer or endpoint URL given with credentials).
URL_PASSWORD_RE = re.compile(r"(?<=://)([^/\s:@]+):([^/\s@]+)@")
# Variables that say where a secret is, not what it is (AWS_SHARED_CREDENTIALS_FILE):
# masking a path would mangle every file that names it.
NOT_A_SECRET_RE = re.compile(r"(_FILE|_PATH|_DIR|_HOME)$", re.I)
REDACTED = "***"
MIN_SECRET_LEN = 6
CHUNK = 1024 * 1024
# Where botocore looks without leaving this machine. Not the instance metadata
# service, SSO or assume-role: a network probe would cost every run off EC2 a second
# or more, for short-lived credentials that only the S3 client ever holds.
AWS_LOCAL_PROVIDERS = {"env", "shared-credentials-file", "config-file", "ec2-credentials-file", "boto-config"}

_OVERRIDE_RE = re.compile(r"^(?P<key>[~+]{0,2}[^=~+][^=]*)=(?P<value>.*)$", re.S)


def is_secret_name(name: Any) -> bool:
    return bool(SECRET_NAME_RE.search(str(name)))


def mask_names(value: Any) -> Any:
    """A copy of a config tree with the values of secret-looking keys replaced by ``***``."""
    if isinstance(value, dict):
        return {k: (REDACTED if is_secret_name(k) and v not in (None, "") and not isinstance(v, dict)
                    else mask_names(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [mask_names(v) for v in value]
    return value


def mask_override(override: str) -> str:
    """``backend.secret=VALUE`` (or ``+``/``++``-prefixed, ``key@pkg=``) -> ``backend.secret=***``."""
    m = _OVERRIDE_RE.match(override)
    if not m or not m.group("value"):
        return override
    last = re.split(r"[./]", m.group("key").split("@", 1)[0].lstrip("+~"))[-1]
    return f"{m.group('key')}={REDACTED}" if is_secret_name(last) else override


def values_under_secret_names(value: Any, secret: bool = False) -> list[str]:
    """Every leaf value below a secret-looking key (ints too: ``secret=12345678``)."""
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in values_under_secret_names(v, secret or is_secret_name(k))]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in values_under_secret_names(v, secret)]
    if secret and isinstance(value, (str, int)) and not isinstance(value, bool):
        return [str(value)]
    return []


def url_passwords(value: Any) -> list[str]:
    """The password of every ``scheme://user:password@host`` in a tree of strings."""
    if isinstance(value, dict):
        return [s for v in value.values() for s in url_passwords(v)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in url_passwords(v)]
    if isinstance(value, str) and "@" in value:
        return [m.group(2) for m in URL_PASSWORD_RE.finditer(value)]
    return []


def strip_url_password(url: str) -> str:
    """``http://user:pass@host`` -> ``http://user:***@host``: for locations in messages."""
    return URL_PASSWORD_RE.sub(lambda m: f"{m.group(1)}:{REDACTED}@", url)


def environ_secrets(environ: Mapping[str, str]) -> list[str]:
    """Values of secret-looking variables (AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, ...)."""
    return [v for k, v in environ.items() if is_secret_name(k) and not NOT_A_SECRET_RE.search(k)]


def aws_credentials() -> list[str]:
    """Access key, secret and token botocore resolves here (honours AWS_PROFILE,
    AWS_SHARED_CREDENTIALS_FILE, ~/.aws); nothing when botocore is missing."""
    try:
        import botocore.session
        from botocore.credentials import create_credential_resolver
    except ImportError:
        return []
    try:
        resolver = create_credential_resolver(botocore.session.Session())
        resolver.providers = [p for p in resolver.providers if p.METHOD in AWS_LOCAL_PROVIDERS]
        creds = resolver.load_credentials()
        frozen = creds.get_frozen_credentials() if creds is not None else None
    except Exception:  # a broken profile is s3fs's error to report, not the redactor's
        return []
    return [v for v in (frozen.access_key, frozen.secret_key, frozen.token) if v] if frozen else []


class Redactor:
    """The secrets of this process, and the means to scrub them from text, trees and files.

    config: the composed config as plain data; its secret-named values are secrets.
    fs: the backend's fsspec filesystem; its secret-named storage options are secrets.
    Passwords in URLs (``http://user:password@host``) anywhere in the config, the
    environment or the storage options are secrets, and so are the AWS credentials
    botocore resolves on this machine (when botocore is installed), whatever the backend.
    environ: the environment to take secret-looking variables from (default: this process's).
    extra: further secret values.

    Secrets are gathered on first use, so a run that never writes pays nothing.
    """

    def __init__(self, *, config: Any = None, fs: Any = None, environ: Mapping[str, str] | None = None,
                 extra: Iterable[str] = ()):
        self._config = config
        self._fs = fs
        self._environ = os.environ if environ is None else environ
        self._extra = list(extra)

    @functools.cached_property
    def secrets(self) -> frozenset[str]:
        found = [*self._extra, *values_under_secret_names(self._config), *environ_secrets(self._environ),
                 *url_passwords(self._config), *url_passwords(dict(self._environ))]
        if self._fs is not None:
            options = getattr(self._fs, "storage_options", None) or {}
            found += values_under_secret_names(options) + url_passwords(options)
        # Whatever the backend: a stage may reach S3 on its own, and print what it used.
        # Asked only where botocore could find any (importing it costs ~0.3 s).
        if any(k.startswith("AWS_") for k in self._environ) or os.path.exists(os.path.expanduser("~/.aws")):
            found += aws_credentials()
        out = {s for s in found if len(s) >= MIN_SECRET_LEN and s != REDACTED}
        # As a JSON string holds it, should a secret contain a quote or a backslash.
        out |= {j for j in (json.dumps(s)[1:-1] for s in out) if len(j) >= MIN_SECRET_LEN}
        return frozenset(out)

    @functools.cached_property
    def _text_re(self) -> re.Pattern[str] | None:
        # Longest first: a secret that extends another is masked whole.
        ordered = sorted(self.secrets, key=len, reverse=True)
        return re.compile("|".join(map(re.escape, ordered))) if ordered else None

    @functools.cached_property
    def _bytes_re(self) -> re.Pattern[bytes] | None:
        ordered = sorted((s.encode() for s in self.secrets), key=len, reverse=True)
        return re.compile(b"|".join(map(re.escape, ordered))) if ordered else None

    def text(self, s: str) -> str:
        return self._text_re.sub(REDACTED, s) if self._text_re is not None else s

    def bytes(self, b: bytes) -> bytes:
        return self._bytes_re.sub(REDACTED.encode(), b) if self._bytes_re is not None else b

    def tree(self, value: Any, names: bool = True) -> Any:
        """A copy of a JSON-like tree scrubbed by value, and by key name unless
        ``names=False`` (a manifest, whose ``key`` fields are stage cache keys)."""
        if names:
            value = mask_names(value)
        if isinstance(value, dict):
            return {self.text(k) if isinstance(k, str) else k: self.tree(v, False) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.tree(v, False) for v in value]
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, int) and not isinstance(value, bool) and str(value) in self.secrets:
            return REDACTED
        return value

    def overrides(self, overrides: Iterable[str]) -> list[str]:
        return [self.text(mask_override(o)) for o in overrides]

    def scrub_folder(self, folder: str) -> int:
        """Scrub every file under ``folder`` in place (symlinks left alone); return how
        many changed. Streams in chunks, so memory does not grow with file size."""
        pattern = self._bytes_re
        if pattern is None:
            return 0
        overlap = max(len(s.encode()) for s in self.secrets) - 1
        changed = 0
        for root, _, files in os.walk(folder):
            for name in files:
                path = os.path.join(root, name)
                if not os.path.islink(path) and _scrub_file(path, pattern, overlap):
                    changed += 1
        return changed


def _scrub_stream(src, dst, pattern: re.Pattern[bytes], overlap: int) -> bool:
    """Copy ``src`` to ``dst`` (None: only look) with every match masked; True if any.

    A match starting before the last ``overlap`` bytes of what is buffered lies wholly
    inside it (no secret is longer than ``overlap + 1``); later bytes wait for the next
    chunk, so a secret split across two reads is still found.
    """
    tail, found = b"", False
    while True:
        block = src.read(CHUNK)
        data = tail + block
        cut = len(data) - overlap if block else len(data)
        pos, out = 0, []
        for m in pattern.finditer(data):
            if m.start() >= cut:
                break
            found = True
            out += [data[pos:m.start()], REDACTED.encode()]
            pos = m.end()
        cut = max(cut, pos)
        if dst is not None:
            dst.write(b"".join(out) + data[pos:cut])
        tail = data[cut:]
        if not block:
            return found


def _scrub_file(path: str, pattern: re.Pattern[bytes], overlap: int) -> bool:
    with open(path, "rb") as src:  # most files hold no secret: look before writing a copy
        if not _scrub_stream(src, None, pattern, overlap):
            return False
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".scrub-")
    try:
        with open(path, "rb") as src, os.fdopen(fd, "wb") as dst:
            _scrub_stream(src, dst, pattern, overlap)
        os.chmod(tmp, os.stat(path).st_mode & 0o7777)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return True


# ``  secret: value`` / ``- key: value`` in a YAML dump of a config (what Hydra's --cfg
# and --info print), and ``name=value`` overrides inside a line.
_YAML_ITEM_RE = re.compile(r"^(?P<lead>\s*(?:-\s+)?)(?P<key>[^\s:#][^:]*?):(?P<sep>\s+)(?P<value>\S.*)$")
_OVERRIDE_IN_LINE_RE = re.compile(r"[~+]{0,2}[\w.@/-]+=[^\s,\]'\"]+")


def mask_config_line(line: str, redactor: Redactor) -> str:
    """One line of printed config with every secret masked: by value (``redactor``), a
    URL's password, a YAML item under a secret-looking key, and a secret-looking
    override in it."""
    line = _OVERRIDE_IN_LINE_RE.sub(lambda m: mask_override(m.group(0)), strip_url_password(redactor.text(line)))
    m = _YAML_ITEM_RE.match(line)
    if m and is_secret_name(m.group("key").strip("'\"")) and m.group("value") not in ("null", "''", '""', "'***'"):
        line = f"{m.group('lead')}{m.group('key')}:{m.group('sep')}'{REDACTED}'"
    return line


class MaskingStream:
    """A text stream that masks secrets line by line (:func:`mask_config_line`) before
    they reach ``inner``: what Hydra prints for ``--cfg`` and ``--info`` is the composed
    config itself, credentials included."""

    def __init__(self, inner, redactor: Redactor):
        self._inner, self._redactor, self._pending = inner, redactor, ""

    def write(self, s: str) -> int:
        self._pending += s
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            self._inner.write(mask_config_line(line, self._redactor) + "\n")
        return len(s)

    def flush(self) -> None:
        if self._pending:
            self._inner.write(mask_config_line(self._pending, self._redactor))
            self._pending = ""
        self._inner.flush()

    def __getattr__(self, name: str):  # encoding, isatty, fileno, ...
        return getattr(self._inner, name)

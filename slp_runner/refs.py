"""Names and tags for stored artifacts, and what a user may type to mean one.

A reference is one of:

- a full BLAKE3 hash (64 hex digits): used as it is, with no backend request;
- a unique prefix of at least 8 hex digits, as git takes one;
- ``name:tag``, or ``name`` alone: the tag of that name put or tagged most recently
  (``name:latest`` too, unless a tag is literally called ``latest``).

Names live in the backend beside the objects, one small JSON document per tag::

    refs/<name>/<tag>.json    {"name", "tag", "kind", "hash", "size", "created_at"}

Each is published whole (a rename, or one PUT where the backend's PUT is atomic),
and there is no shared index: a put tagging ``gemma:q8`` can never lose a concurrent
put's ``gemma:q4``, and two puts of the same tag leave one of them whole, the last to
publish, as ``docker tag`` or ``git tag -f`` would. A put with a name and no tag tags
it with the first 12 hex digits of its hash, so every version keeps its name.
"""

from __future__ import annotations

import difflib
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from .artifacts import KINDS, ArtifactKind, kind_named
from .errors import ArtifactNotFound, InputError, IntegrityError
from .hashing import validate_oid

if TYPE_CHECKING:
    from .store import ArtifactStore


def backend_errors(backend, what: str):
    """The store's translation of backend failures, imported only when a ref is read or written."""
    from .store import backend_errors as translate

    return translate(backend, what)

REFS = "refs"
MIN_PREFIX = 8
_SEGMENT = r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}"
NAME_RE = re.compile(rf"{_SEGMENT}(/{_SEGMENT}){{0,3}}")  # org/name, as on the Hugging Face hub
TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")  # docker's tag grammar
_FULL = re.compile(r"[0-9a-fA-F]{64}")
_HEX = re.compile(r"[0-9a-fA-F]+")
LATEST = "latest"


@dataclass(frozen=True)
class Resolved:
    """What a reference named: the full hash, its kind when known, and how it was given."""

    oid: str
    kind: ArtifactKind | None
    given: str  # the text the user typed
    via: str  # "hash" | "prefix" | "name"

    def as_dict(self) -> dict[str, Any]:
        return {"reference": self.given, "hash": self.oid, "kind": self.kind.name if self.kind else None,
                "resolved_by": self.via}


def parse_name(text: str) -> tuple[str, str | None]:
    """``name[:tag]`` -> (name, tag or None), each checked against its grammar."""
    name, sep, tag = str(text).strip().partition(":")
    if not NAME_RE.fullmatch(name) or ".." in name:
        raise InputError(f"invalid name {name!r}: letters, digits, '.', '_', '-', each part starting with a "
                         "letter or digit, at most 100 characters, and at most 4 parts joined by '/'")
    if any(part.lower().endswith(".json") for part in name.split("/")):
        raise InputError(f"invalid name {name!r}: a part may not end in .json (tags are stored as <tag>.json)")
    if _HEX.fullmatch(name) and len(name) >= MIN_PREFIX:
        raise InputError(f"invalid name {name!r}: 8 or more hex digits read as a hash prefix; add a letter g-z")
    if sep and not TAG_RE.fullmatch(tag):
        raise InputError(f"invalid tag {tag!r} in {text!r}: letters, digits, '.', '_', '-', at most 128")
    return name, (tag if sep else None)


def default_tag(oid: str) -> str:
    return validate_oid(oid)[:12]


def ref_path(store: ArtifactStore, name: str, tag: str) -> str:
    return store.backend.path(REFS, name, f"{tag}.json")


def write_ref(store: ArtifactStore, name: str, tag: str | None, kind: ArtifactKind, oid: str,
              size: int | None = None) -> dict[str, Any]:
    """Point ``name:tag`` (default tag: the hash's first 12 digits) at a stored object."""
    name, parsed_tag = parse_name(f"{name}:{tag}" if tag else name)
    tag = parsed_tag or default_tag(oid)
    record = {"name": name, "tag": tag, "kind": kind.name, "hash": validate_oid(oid), "size": size,
              "created_at": time.time_ns()}
    store.put_bytes(orjson.dumps(record, option=orjson.OPT_INDENT_2) + b"\n", f"{REFS}/{name}/{tag}.json")
    return record


def remove_ref(store: ArtifactStore, text: str) -> dict[str, Any]:
    """Delete ``name:tag`` (the tag must be given: a bare name would be a guess)."""
    name, tag = parse_name(text)
    if tag is None:
        raise InputError(f"untag needs name:tag, not {text!r} (tags of {name}: {_tag_list(store, name)})")
    record = read_ref(store, name, tag)
    if record is None:
        raise ArtifactNotFound(f"no tag {name}:{tag} in {_where(store)} (tags of {name}: {_tag_list(store, name)})")
    path = ref_path(store, name, tag)
    with backend_errors(store.backend, f"removing {path}"):
        store.fs.rm(path)
    return record


def read_ref(store: ArtifactStore, name: str, tag: str) -> dict[str, Any] | None:
    path = ref_path(store, name, tag)
    with backend_errors(store.backend, f"reading {path}"):
        try:
            data = store.fs.cat_file(path)
        except FileNotFoundError:
            return None
    return load_ref(data, path)


def load_ref(data: bytes, path: str) -> dict[str, Any]:
    """A ref's record, checked: a hash, a kind, a time, and the name and tag its path says."""
    try:
        record = orjson.loads(data)
        validate_oid(record["hash"])
        kind_named(record["kind"])
        int(record["created_at"])
        where = f"{REFS}/{record['name']}/{record['tag']}.json"
    except Exception:
        raise IntegrityError(f"ref {path} is damaged: put or tag the name again") from None
    if not str(path).endswith(where):
        raise IntegrityError(f"ref {path} is damaged (it says {record['name']}:{record['tag']}): "
                             "put or tag the name again")
    return record


def tags_of(store: ArtifactStore, name: str) -> list[dict[str, Any]]:
    """Every tag of ``name``, newest first."""
    folder = store.backend.path(REFS, name)
    with backend_errors(store.backend, f"listing {folder}"):
        try:
            entries = store.fs.ls(folder, detail=True)
        except FileNotFoundError:
            return []
        paths = [e["name"] for e in entries if e.get("type") == "file" and e["name"].endswith(".json")]
        blobs = store.fs.cat(paths, on_error="omit") if paths else {}  # untagged meanwhile: gone
    records = [load_ref(data, path) for path, data in blobs.items()]
    return sorted(records, key=lambda r: (r["created_at"], r["tag"]), reverse=True)


def all_refs(store: ArtifactStore, damaged: list[str] | None = None) -> list[dict[str, Any]]:
    """Every ref in the backend, by name and tag; damaged ones are skipped (``fsck``
    reports them) and their paths appended to ``damaged`` if given."""
    root = store.backend.path(REFS)
    with backend_errors(store.backend, f"listing {root}"):
        try:
            paths = [p for p in store.fs.find(root) if p.endswith(".json")]
        except FileNotFoundError:
            return []
        blobs = store.fs.cat(paths, on_error="omit") if paths else {}
    records = []
    for path, data in blobs.items():
        try:
            records.append(load_ref(data, path))
        except IntegrityError:
            if damaged is not None:
                damaged.append(path)
    return sorted(records, key=lambda r: (r["name"], -r["created_at"]))


def resolve(store: ArtifactStore, text: Any, kind: ArtifactKind | None = None) -> Resolved:
    """The full hash a reference names; one error line if it names none or several."""
    given = str(text).strip()
    if _FULL.fullmatch(given):
        return Resolved(given.lower(), kind, given, "hash")
    if _HEX.fullmatch(given) and len(given) >= MIN_PREFIX:
        matches = _prefix_matches(store, given.lower(), kind)
        if len(matches) == 1:
            (found_kind, oid), = matches
            return Resolved(oid, found_kind, given, "prefix")
        if len(matches) > 1 and len({oid for _, oid in matches}) == 1:
            kinds = "|".join(k.name for k, _ in matches)
            raise InputError(f"{given} is stored as {' and as '.join(k.name for k, _ in matches)} "
                             f"(the same bytes): give kind=<{kinds}>")
        if len(matches) > 1:
            listed = ", ".join(f"{oid[:16]}… ({k.name})" for k, oid in matches[:10])
            more = f" and {len(matches) - 10} more" if len(matches) > 10 else ""
            raise InputError(f"hash prefix {given} is ambiguous: {listed}{more}; give more digits")
        # Names of 8+ hex digits are refused (parse_name), so no name can mean this either.
        raise ArtifactNotFound(f"no artifact whose hash starts with {given} in {_where(store)}")
    try:
        name, tag = parse_name(given)
    except InputError:
        raise InputError(f"invalid reference {given!r}: give a BLAKE3 hash, a prefix of at least "
                         f"{MIN_PREFIX} hex digits, or name[:tag]") from None
    return _resolve_name(store, given, name, tag, kind)


def _resolve_name(store, given, name, tag, kind) -> Resolved:
    if tag is not None and not (tag == LATEST and read_ref(store, name, tag) is None):
        record = read_ref(store, name, tag)
        if record is None:
            raise ArtifactNotFound(f"no artifact named {given} in {_where(store)}{_known_tags(store, name)}")
        return _checked_kind(record, given, kind)
    records = tags_of(store, name)
    if not records:
        if _HEX.fullmatch(given):
            what = f"named {given} (a hash prefix needs at least {MIN_PREFIX} hex digits)"
        else:
            what = f"named {name}"
        raise ArtifactNotFound(f"no artifact {what} in {_where(store)}{_close_names(store, name)}")
    if kind is not None:
        same_kind = [r for r in records if r["kind"] == kind.name]
        records = same_kind or records  # none of that kind: the error below names the kind it is
    return _checked_kind(records[0], given, kind)


def _checked_kind(record, given, kind) -> Resolved:
    found = kind_named(record["kind"])
    if kind is not None and found is not kind:
        raise InputError(f"{given} is a {found.name} artifact ({record['hash'][:16]}…), not a {kind.name}")
    return Resolved(record["hash"], found, given, "name")


def _prefix_matches(store: ArtifactStore, prefix: str, kind: ArtifactKind | None) -> list[tuple[ArtifactKind, str]]:
    kinds = [kind] if kind is not None else list(KINDS.values())
    return [(k, obj["oid"]) for k in kinds for obj in store.list(k) if obj["oid"].startswith(prefix)]


def _where(store: ArtifactStore) -> str:
    return f"{store.backend.name} backend at {store.backend.location}"


def _tag_list(store, name) -> str:
    tags = [r["tag"] for r in tags_of(store, name)]
    return ", ".join(tags[:10]) + (f" and {len(tags) - 10} more" if len(tags) > 10 else "") if tags else "none"


def _known_tags(store, name) -> str:
    tags = _tag_list(store, name)
    return f" (tags of {name}: {tags})" if tags != "none" else _close_names(store, name)


def _close_names(store, name) -> str:
    names = sorted({r["name"] for r in all_refs(store)})
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(close)}?" if close else ""

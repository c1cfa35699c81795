"""The seed's store tools as plain functions: put a file, get by hash, inspect, verify.

They take a store, a cache and plain values (never a DictConfig) and print what
happened the way slp_put_model and slp_get_model did: hash, size, uploaded or
deduplicated, MiB/s, verification. The last line of each is machine-readable.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, TextIO

from .artifacts import KINDS, ArtifactKind
from .cache import CacheGet, LocalCache
from .errors import ArtifactNotFound, InputError
from .hashing import validate_oid
from .local_output import create_temp_at, ensure_room, human, local_write, temp_name

if TYPE_CHECKING:  # a cache hit never imports the store, its backends or fsspec
    from fsspec.callbacks import Callback

    from .store import ArtifactStore, ObjectCheck, PutResult

MiB = 1024 * 1024
PROGRESS_MIN_BYTES = 16 * MiB


def progress_callback(enabled: bool | str, total: int | None, desc: str) -> Callback | None:
    """A tqdm progress bar on stderr for large transfers (``auto``: only on a terminal);
    None when there is to be none."""
    if enabled == "auto":
        enabled = sys.stderr.isatty()
    if not enabled or (total is not None and total < PROGRESS_MIN_BYTES):
        return None
    from fsspec.callbacks import TqdmCallback

    return TqdmCallback(tqdm_kwargs={"desc": desc, "unit": "B", "unit_scale": True, "unit_divisor": 1024,
                                     "file": sys.stderr, "leave": False})


def put(
    store: ArtifactStore,
    kind: ArtifactKind,
    path: str,
    *,
    name: str | None = None,
    source: str | None = None,
    provenance: dict[str, Any] | None = None,
    sha256: bool = False,
    progress: bool | str = "auto",
    verify_existing: str | None = None,
    expect_oid: str | None = None,
    tag: str | None = None,
    out: TextIO = sys.stdout,
) -> PutResult:
    """Store ``path``; with a ``name``, also point ``name:tag`` at it (see :mod:`.refs`).
    The last line says what happened, machine-readably."""
    say: Callable[[str], None] = lambda line: print(line, file=out, flush=True)
    from .store import check_local_file  # loaded with the store already

    check_local_file(os.fspath(path))  # before a line says it is being uploaded
    size = os.path.getsize(path)
    say(f"Uploading {kind.name}: {os.path.basename(path)}")
    say(f"Size: {size / MiB:.1f} MiB ({size} bytes)")
    from fsspec.callbacks import DEFAULT_CALLBACK  # loaded with the store already

    cb = progress_callback(progress, size, f"put {kind.name}")
    with cb or contextlib.nullcontext():
        result = store.put(path, kind, name=name, source=source, provenance=provenance, sha256=sha256,
                           tool=f"slp put_{kind.name}", callback=cb or DEFAULT_CALLBACK,
                           verify_existing=verify_existing, expect_oid=expect_oid)
    say(f"Hash (BLAKE3): {result.oid} "
        f"({f'{result.hash_seconds:.2f} s' if result.hash_seconds else 'of the bytes as they were sent'})")
    if result.sha256:
        say(f"SHA256: {result.sha256}")
    label = name or os.path.basename(path)
    if name:
        from .refs import write_ref

        ref = write_ref(store, name, tag, result.kind, result.oid, result.size)
        result.ref = label = f"{ref['name']}:{ref['tag']}"
    # result.size is the stored object's size too: a put only deduplicates against
    # an object whose size (or hash) it has just checked.
    if not result.uploaded:
        say(f"Artifact already exists (hash={result.oid}), checked by {verify_existing or store.verify_existing}")
        say("Upload dropped (deduplication): the file was sent before its hash was found stored" if result.sent_anyway
            else "Skipped upload (deduplication)")
        if result.manifest_rewritten:
            say(f"Manifest was missing or damaged: rewritten at {store.manifest_path(kind, result.oid)}")
        say(f"deduplicated {kind.name} {label} hash={result.oid} size={result.size} backend={store.backend.name}")
        return result
    if result.repaired:
        say(f"Stored object was damaged ({result.repaired}): replaced")
    say(f"Upload complete: {result.seconds:.2f} s ({result.mib_per_s:.1f} MiB/s)")
    say(f"Manifest: {store.manifest_path(kind, result.oid)}")
    say(f"Verification: OK ({result.verification})")
    verb = "repaired" if result.repaired else "uploaded"
    say(f"{verb} {kind.name} {label} hash={result.oid} size={result.size} backend={store.backend.name}")
    return result


def repair(store: ArtifactStore, kind: ArtifactKind | None, oid: str, path: str, *, progress: bool | str = "auto",
           out: TextIO = sys.stdout) -> PutResult:
    """Re-hash the stored object ``oid``; if it is damaged or missing, replace it with
    the local file at ``path``, which must hash to ``oid``."""
    validate_oid(oid)
    try:
        stored_as = store.find_kind(oid)
    except ArtifactNotFound as exc:
        if kind is None:
            raise ArtifactNotFound(f"{exc}; give kind=<{'|'.join(KINDS)}> to store it from {path}") from None
        stored_as = kind
    if kind is not None and kind is not stored_as:
        raise InputError(f"{oid} is stored as {stored_as.name}, not {kind.name}: repair it with kind={stored_as.name}")
    result = put(store, stored_as, path, progress=progress, verify_existing="hash", expect_oid=oid, out=out)
    if not result.uploaded:
        note = "; its manifest was rewritten" if result.manifest_rewritten else ", nothing to repair"
        print(f"sound {stored_as.name} hash={oid}: the stored bytes hash right{note}", file=out, flush=True)
    return result


@dataclass(frozen=True)
class Fetched:
    """What a get gave: the cache's answer, the kind, and where the bytes are for the user."""

    kind: ArtifactKind
    cached: CacheGet
    path: str  # ``dest`` when one was given, else the cache entry

    @property
    def size(self) -> int:
        return self.cached.size


def get(
    store: ArtifactStore,
    cache: LocalCache,
    kind: ArtifactKind | None,
    oid: str,
    *,
    dest: str | None = None,
    full_verify: bool = False,
    progress: bool | str = "auto",
    out: TextIO = sys.stdout,
    name: str | None = None,
) -> Fetched:
    """Fetch ``oid`` through the verified cache; copy it to ``dest`` if given."""
    say: Callable[[str], None] = lambda line: print(line, file=out, flush=True)
    validate_oid(oid)
    kind = kind or store.find_kind(oid)
    cb = progress_callback(progress, None, f"get {kind.name}")
    with cb or contextlib.nullcontext():
        got = cache.get(store, kind, oid, full_verify=full_verify, callback=cb, name=name)
    if got.repaired:
        say(f"Cache entry for {oid} was corrupt: removed and fetched again")
    if got.resumed_from or got.reconnects:
        kept = f"from {got.resumed_from} bytes kept by an interrupted get" if got.resumed_from else ""
        cuts = f"after {got.reconnects} dropped connection(s)" if got.reconnects else ""
        say(f"Resumed {' and '.join(p for p in (kept, cuts) if p)}, with ranged reads")
    if got.cache_hit:
        say(f"Local cache hit: {got.path} ({got.seconds * 1000:.1f} ms, validated by {got.validation})")
    else:
        say(f"Downloaded {got.fetched / MiB:.1f} MiB in {got.seconds:.2f} s ({got.mib_per_s:.1f} MiB/s)")
        say("Hash verified: OK (BLAKE3)")
    path = got.path
    if dest:
        path = materialize(got.path, dest)
        say(f"Wrote {path}")
    say(f"{'cached' if got.cache_hit else 'fetched'} {kind.name} hash={oid} size={got.size} path={path}")
    return Fetched(kind, got, path)


def materialize(cached: str, dest: str) -> str:
    """Copy a cache entry to ``dest`` atomically (a folder gets the cache file name)."""
    if os.path.isdir(dest):
        dest = os.path.join(dest, os.path.basename(cached))
    elif dest.endswith(os.sep):
        raise InputError(f"out={dest}: output folder does not exist")
    parent = os.path.dirname(os.path.abspath(dest))
    if not os.path.isdir(parent):
        raise InputError(f"{parent}: output folder does not exist")
    if os.path.lexists(dest):
        if os.path.islink(dest) or not os.path.isfile(dest):  # a device, a fifo, a link to /dev/stdout
            raise InputError(f"out={dest} exists and is not a regular file: give a new path or a folder")
        if os.path.samefile(dest, cached):
            return dest  # already the verified cache entry: copying it over itself would unprotect it
    size = os.path.getsize(cached)
    ensure_room(parent, size, f"out={dest}")
    tmp = None
    try:
        with local_write(dest, size, os.path.basename(cached)):
            tmp = temp_name(parent, ".slp-")  # named first: a signal cannot leave it unnamed
            fd = create_temp_at(tmp)
            os.close(fd)
            shutil.copyfile(cached, tmp)  # copy_file_range / sendfile on Linux
            os.chmod(tmp, 0o644)
            os.replace(tmp, dest)
    except BaseException:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise
    return dest


def show(store: ArtifactStore, kind: ArtifactKind | None, oid: str, out: TextIO = sys.stdout) -> dict:
    from .manifest import dumps

    validate_oid(oid)
    kind = kind or store.find_kind(oid)
    manifest = store.read_manifest(kind, oid)
    out.write(dumps(manifest).decode())
    return manifest


def verify(store: ArtifactStore, kind: ArtifactKind | None, oid: str, out: TextIO = sys.stdout) -> ObjectCheck:
    validate_oid(oid)
    kind = kind or store.find_kind(oid)
    check = store.verify(kind, oid)
    print(f"{'OK' if check.ok else 'FAILED'} {kind.name} {oid} {check.detail}", file=out)
    return check


def list_artifacts(store: ArtifactStore, kinds: list[ArtifactKind], *, name: str | None = None,
                   out: TextIO = sys.stdout) -> dict[str, Any]:
    """Every stored object of ``kinds``, newest first, with its names (``name:tag``);
    ``name`` keeps only the objects carrying that name. One listing per kind, one of
    ``refs/``, and one small read per ref: no manifest is read."""
    from .refs import all_refs, parse_name

    tag = None
    if name is not None:
        name, tag = parse_name(name)
    names: dict[tuple[str, str], list[str]] = {}
    damaged: list[str] = []
    for ref in all_refs(store, damaged):
        if name is None or (ref["name"] == name and tag in (None, ref["tag"])):
            names.setdefault((ref["kind"], ref["hash"]), []).append(f"{ref['name']}:{ref['tag']}")
    if damaged:
        print(f"slp: warning: {len(damaged)} damaged ref(s), e.g. {damaged[0]}: task=fsck lists them",
              file=sys.stderr)
    rows = []
    for kind in kinds:
        for obj in store.list(kind):
            tagged = names.get((kind.name, obj["oid"]), [])
            if name is None or tagged:
                rows.append({"kind": kind.name, "hash": obj["oid"], "size": obj["size"],
                             "modified": obj["modified"], "names": tagged})
    rows.sort(key=lambda r: (r["modified"] or "", r["hash"]), reverse=True)
    total = sum(r["size"] for r in rows)
    if rows:
        width = max(4, *(len(", ".join(r["names"])) for r in rows))
        print(f"{'KIND':8} {'HASH':12}  {'NAME':{width}}  {'SIZE':>10}  MODIFIED (UTC)", file=out)
        for r in rows:
            when = (r["modified"] or "-").replace("T", " ")[:16]
            print(f"{r['kind']:8} {r['hash'][:12]}  {', '.join(r['names']) or '-':{width}}  "
                  f"{human(r['size']):>10}  {when}", file=out)
    what = f"named {name}{':' + tag if tag else ''}" if name else "in " + ", ".join(k.folder for k in kinds)
    print(f"{len(rows)} artifact{'s' if len(rows) != 1 else ''} {what}, {human(total)} "
          f"({store.backend.name} backend at {store.backend.location})", file=out)
    return {"artifacts": rows, "count": len(rows), "total_size": total, "backend": store.backend.name}


def print_cache(listing, pruned, op: str, root: str, out: TextIO = sys.stdout) -> None:
    """``slp task=cache``: the entries, most recently used first, and what a prune did."""
    from datetime import datetime, timezone

    if listing:
        width = max(4, *(len(e.name or "-") for e in listing))
        print(f"{'KIND':8} {'HASH':12}  {'NAME':{width}}  {'SIZE':>10}  {'LAST USE (UTC)':16}  KEPT", file=out)
        for e in reversed(listing):
            used = datetime.fromtimestamp(e.last_used, timezone.utc).strftime("%Y-%m-%d %H:%M")
            print(f"{e.kind:8} {e.oid[:12]}  {e.name or '-':{width}}  {human(e.size):>10}  {used:16}  "
                  f"{e.pinned or ''}".rstrip(), file=out)
    total = sum(e.size for e in listing)
    cap = f", cap {human(pruned.cap)}" if pruned.cap is not None else ", no cap (cache.max_size)"
    print(f"{len(listing)} entries, {human(total)}{cap} ({root})", file=out)
    if op != "list":
        verb = "would evict" if pruned.dry_run else "evicted"
        freed = sum(e.size for e in pruned.evicted)
        tail = " (dry run: apply=true evicts them)" if pruned.dry_run else ""
        print(f"{op}: {verb} {len(pruned.evicted)} entries, {human(freed)}; "
              f"{human(pruned.kept_pinned)} pinned or in use{tail}", file=out)

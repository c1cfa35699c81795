"""The JSON manifest sidecar written next to every artifact."""

from __future__ import annotations

import getpass
import socket
from datetime import datetime, timezone
from typing import Any

import orjson

from . import __version__
from .artifacts import ArtifactKind
from .hashing import FileDigest


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def build_manifest(
    kind: ArtifactKind,
    digest: FileDigest,
    *,
    file_name: str,
    source: str,
    tool: str,
    verification: str,
    verified_at: str,
    metadata: dict[str, Any] | None = None,
    provenance: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble a manifest; ``provenance`` holds the fields a user added on the command line."""
    prov = {
        "source": source,
        "tool": tool,
        "uploaded_by": f"slp-runner {__version__}",
        "uploader_host": socket.gethostname(),
        "uploader_user": _user(),
    }
    prov.update({k: v for k, v in (provenance or {}).items() if v is not None})
    manifest = {
        "artifact_type": kind.name,
        "file_name": file_name,
        "blake3": digest.blake3,
        "size_bytes": digest.size,
        "upload_timestamp": utc_now(),
        "provenance": prov,
        "integrity": {
            "algorithm": "BLAKE3",
            "verified": True,
            "verification_timestamp": verified_at,
            "verification_method": verification,
        },
    }
    if digest.sha256:
        manifest["sha256"] = digest.sha256
    if metadata:
        manifest["metadata"] = metadata
    return manifest


def dumps(manifest: dict) -> bytes:
    return orjson.dumps(manifest, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"


def loads(data: bytes) -> dict:
    return orjson.loads(data)


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"

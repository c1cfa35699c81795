"""Artifact kinds and the content-addressed layout they share.

Every kind lives in its own folder of the backend, named by BLAKE3 hash, with a
JSON manifest beside it, as the seed laid it out::

    models/<hash>.gguf      models/<hash>.manifest.json
    prompts/<hash>.jsonl    prompts/<hash>.manifest.json
    results/<hash>.jsonl    results/<hash>.manifest.json
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError
from .hashing import validate_oid


@dataclass(frozen=True)
class ArtifactKind:
    name: str  # the manifest's artifact_type
    folder: str
    suffix: str

    def object_name(self, oid: str) -> str:
        return f"{self.folder}/{validate_oid(oid)}{self.suffix}"

    def manifest_name(self, oid: str) -> str:
        return f"{self.folder}/{validate_oid(oid)}.manifest.json"


MODEL = ArtifactKind("model", "models", ".gguf")
PROMPTS = ArtifactKind("prompts", "prompts", ".jsonl")
RESULTS = ArtifactKind("results", "results", ".jsonl")
BLOB = ArtifactKind("blob", "blobs", ".bin")

KINDS = {k.name: k for k in (MODEL, PROMPTS, RESULTS, BLOB)}


def kind_named(name: str) -> ArtifactKind:
    try:
        return KINDS[name]
    except KeyError:
        raise ConfigError(f"unknown artifact kind {name!r} (choose from {', '.join(KINDS)})") from None

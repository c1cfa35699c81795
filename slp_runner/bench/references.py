"""The raw tools every slp figure is compared with, measured in the same run against
the same server: curl on the filer, boto3's transfer manager on S3, plain copy on
local disk, ``b3sum`` for hashing. Each function times one operation in seconds."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid

from ..backends import Backend
from ..errors import ConfigError


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _require(tool: str) -> str:
    path = shutil.which(tool)
    if not path:
        raise ConfigError(f"reference tool {tool!r} not found (apt-get install {tool})")
    return path


class Reference:
    """Upload/download one file the plainest way the backend allows."""

    name = "none"

    def upload(self, local: str) -> float:
        raise NotImplementedError

    def download(self, dest: str) -> float:
        raise NotImplementedError

    def cleanup(self) -> None:
        pass


class CurlFiler(Reference):
    name = "curl (single stream)"

    def __init__(self, backend: Backend):
        self.url = f"{backend.fs.filer_url}/{backend.path('bench-reference', uuid.uuid4().hex)}"
        self.curl = _require("curl")
        self.backend = backend

    def upload(self, local: str) -> float:
        return _timed(lambda: subprocess.run([self.curl, "-sS", "-f", "-o", "/dev/null", "-T", local, self.url],
                                             check=True))

    def download(self, dest: str) -> float:
        return _timed(lambda: subprocess.run([self.curl, "-sS", "-f", "-o", dest, self.url], check=True))

    def cleanup(self) -> None:
        subprocess.run([self.curl, "-sS", "-X", "DELETE", self.url], capture_output=True)


class Boto3S3(Reference):
    name = "boto3 transfer manager"

    def __init__(self, backend: Backend):
        try:
            import boto3
        except ImportError:
            raise ConfigError("the S3 reference needs boto3: pip install 'slp-runner[bench]'") from None

        fs = backend.fs
        self.bucket, _, prefix = backend.root.partition("/")
        self.key = "/".join(p for p in (prefix, "bench-reference", uuid.uuid4().hex) if p)
        self.client = boto3.client("s3", endpoint_url=fs.client_kwargs.get("endpoint_url"),
                                   region_name=fs.client_kwargs.get("region_name"),
                                   aws_access_key_id=fs.key, aws_secret_access_key=fs.secret)

    def upload(self, local: str) -> float:
        return _timed(lambda: self.client.upload_file(local, self.bucket, self.key))

    def download(self, dest: str) -> float:
        return _timed(lambda: self.client.download_file(self.bucket, self.key, dest))

    def cleanup(self) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.key)


class LocalCopy(Reference):
    name = "plain copy"

    def __init__(self, backend: Backend):
        self.path = os.path.join(backend.root, "bench-reference", uuid.uuid4().hex)

    def upload(self, local: str) -> float:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        return _timed(lambda: shutil.copyfile(local, self.path))

    def download(self, dest: str) -> float:
        return _timed(lambda: shutil.copyfile(self.path, dest))

    def cleanup(self) -> None:
        if os.path.exists(self.path):
            os.unlink(self.path)


def reference_for(backend: Backend) -> Reference:
    return {"seaweedfs": CurlFiler, "s3": Boto3S3, "local": LocalCopy}[backend.name](backend)


def b3sum_seconds(path: str) -> float:
    b3sum = _require("b3sum")
    return _timed(lambda: subprocess.run([b3sum, "--no-names", path], check=True, capture_output=True))

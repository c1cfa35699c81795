"""The raw tools every slp figure is compared with, measured in the same run against
the same server: curl on the filer, boto3's transfer manager on S3, plain copy on
local disk, ``b3sum`` for hashing. Each function times one operation in seconds.

The whole-process benchmarks (:mod:`.cli_ops`) run each reference as a command
instead: ``upload_command`` / ``download_command`` give its argv, named by
``upload_tool`` / ``download_tool``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
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
    upload_tool = download_tool = "none"  # the commands, as the summary names them

    def upload(self, local: str) -> float:
        raise NotImplementedError

    def download(self, dest: str) -> float:
        raise NotImplementedError

    def upload_command(self, local: str) -> list[str]:
        """The argv that uploads ``local`` as a process of its own."""
        raise NotImplementedError

    def download_command(self, dest: str) -> list[str]:
        raise NotImplementedError

    def cleanup(self) -> None:
        pass


class CurlFiler(Reference):
    name = "curl (single stream)"
    upload_tool, download_tool = "curl -T (process)", "curl -o (process)"

    def __init__(self, backend: Backend):
        self.url = f"{backend.fs.filer_url}/{backend.path('bench-reference', uuid.uuid4().hex)}"
        self.curl = _require("curl")
        self.backend = backend

    def upload(self, local: str) -> float:
        return _timed(lambda: subprocess.run(self.upload_command(local), check=True))

    def download(self, dest: str) -> float:
        return _timed(lambda: subprocess.run(self.download_command(dest), check=True))

    def upload_command(self, local: str) -> list[str]:
        return [self.curl, "-sS", "-f", "-o", "/dev/null", "-T", local, self.url]

    def download_command(self, dest: str) -> list[str]:
        return [self.curl, "-sS", "-f", "-o", dest, self.url]

    def cleanup(self) -> None:
        subprocess.run([self.curl, "-sS", "-X", "DELETE", self.url], capture_output=True)


# boto3's transfer manager in a Python process of its own, as a user's script would
# run it: interpreter start, boto3 import, client, transfer. Credentials from the
# environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), as slp's own process gets them.
BOTO3_SCRIPT = """import sys, boto3
op, endpoint, region, bucket, key, path = sys.argv[1:]
s3 = boto3.client("s3", endpoint_url=endpoint or None, region_name=region or None)
s3.upload_file(path, bucket, key) if op == "upload" else s3.download_file(bucket, key, path)
"""


class Boto3S3(Reference):
    name = "boto3 transfer manager"
    upload_tool = "boto3 upload_file (python -c process)"
    download_tool = "boto3 download_file (python -c process)"

    def __init__(self, backend: Backend):
        try:
            import boto3
        except ImportError:
            raise ConfigError("the S3 reference needs boto3: pip install 'slp-runner[bench]'") from None

        fs = backend.fs
        self.bucket, _, prefix = backend.root.partition("/")
        self.key = "/".join(p for p in (prefix, "bench-reference", uuid.uuid4().hex) if p)
        self.endpoint = fs.client_kwargs.get("endpoint_url") or ""
        self.region = fs.client_kwargs.get("region_name") or ""
        self.client = boto3.client("s3", endpoint_url=self.endpoint or None, region_name=self.region or None,
                                   aws_access_key_id=fs.key, aws_secret_access_key=fs.secret)

    def upload(self, local: str) -> float:
        return _timed(lambda: self.client.upload_file(local, self.bucket, self.key))

    def download(self, dest: str) -> float:
        return _timed(lambda: self.client.download_file(self.bucket, self.key, dest))

    def _command(self, op: str, path: str) -> list[str]:
        return [sys.executable, "-c", BOTO3_SCRIPT, op, self.endpoint, self.region, self.bucket, self.key, path]

    def upload_command(self, local: str) -> list[str]:
        return self._command("upload", local)

    def download_command(self, dest: str) -> list[str]:
        return self._command("download", dest)

    def cleanup(self) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.key)


class LocalCopy(Reference):
    name = "plain copy"
    upload_tool = download_tool = "cp (process)"

    def __init__(self, backend: Backend):
        self.path = os.path.join(backend.root, "bench-reference", uuid.uuid4().hex)
        self.cp = _require("cp")

    def upload(self, local: str) -> float:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        return _timed(lambda: shutil.copyfile(local, self.path))

    def download(self, dest: str) -> float:
        return _timed(lambda: shutil.copyfile(self.path, dest))

    def upload_command(self, local: str) -> list[str]:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)  # before the timer starts
        return [self.cp, local, self.path]

    def download_command(self, dest: str) -> list[str]:
        return [self.cp, self.path, dest]

    def cleanup(self) -> None:
        if os.path.exists(self.path):
            os.unlink(self.path)


def reference_for(backend: Backend) -> Reference:
    return {"seaweedfs": CurlFiler, "s3": Boto3S3, "local": LocalCopy}[backend.name](backend)


def b3sum_seconds(path: str) -> float:
    b3sum = _require("b3sum")
    return _timed(lambda: subprocess.run([b3sum, "--no-names", path], check=True, capture_output=True))

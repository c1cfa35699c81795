"""In-progress S3 multipart uploads under a prefix: list them (with their parts'
size) and abort them. A put killed between CreateMultipartUpload and Complete or
Abort leaves one behind: its parts take storage that no listing of objects shows."""

from __future__ import annotations

from typing import Iterator


def uploads_in_progress(fs, root: str) -> Iterator[dict]:
    """Every multipart upload under ``root`` (``bucket/prefix``), with ``parts`` and ``bytes``."""
    bucket, _, prefix = root.partition("/")
    kwargs = {"Bucket": bucket, "Prefix": f"{prefix}/" if prefix else ""}
    while True:
        try:
            page = fs.call_s3("list_multipart_uploads", **kwargs)
        except FileNotFoundError:  # no bucket yet: nothing in flight either
            return
        for upload in page.get("Uploads") or []:
            parts = fs.call_s3("list_parts", Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
            sizes = [p.get("Size", 0) for p in parts.get("Parts") or []]
            yield {"Bucket": bucket, "Key": upload["Key"], "UploadId": upload["UploadId"],
                   "Initiated": upload["Initiated"], "parts": len(sizes), "bytes": sum(sizes)}
        if not page.get("IsTruncated"):
            return
        kwargs.update(KeyMarker=page.get("NextKeyMarker", ""), UploadIdMarker=page.get("NextUploadIdMarker", ""))


def abort_upload(fs, upload: dict) -> None:
    fs.call_s3("abort_multipart_upload", Bucket=upload["Bucket"], Key=upload["Key"], UploadId=upload["UploadId"])

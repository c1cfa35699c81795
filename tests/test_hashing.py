import hashlib
import os

import blake3
import pytest

from slp_runner.errors import InvalidHash
from slp_runner.hashing import StreamHasher, hash_file, validate_oid

GOOD = "ab" * 32


@pytest.mark.parametrize(
    "bad",
    ["", "abc", GOOD.upper(), GOOD[:-1], GOOD + "0", "../" + GOOD[3:], "..%2f" + GOOD[5:],
     GOOD[:-2] + "/x", "g" * 64, None, 123],
)
def test_validate_oid_rejects(bad):
    with pytest.raises(InvalidHash, match="invalid hash"):
        validate_oid(bad)


def test_validate_oid_accepts_lowercase_hex():
    assert validate_oid(GOOD) == GOOD


@pytest.mark.parametrize("size", [0, 1, 1024, 9 * 1024 * 1024 + 3])
def test_hash_file_matches_reference(tmp_path, size):
    data = os.urandom(size)
    path = tmp_path / "f"
    path.write_bytes(data)
    digest = hash_file(path, sha256=True)
    assert digest.blake3 == blake3.blake3(data).hexdigest()
    assert digest.sha256 == hashlib.sha256(data).hexdigest()
    assert digest.size == size
    assert hash_file(path).sha256 is None


def test_stream_hasher_equals_file_hash(tmp_path):
    data = os.urandom(5 * 1024 * 1024 + 1)
    path = tmp_path / "f"
    path.write_bytes(data)
    h = StreamHasher(sha256=True)
    for i in range(0, len(data), 65536):
        h.update(data[i : i + 65536])
    assert h.digest() == hash_file(path, sha256=True)

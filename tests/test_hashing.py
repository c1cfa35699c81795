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


def test_hash_file_stops_between_windows_when_told(tmp_path):
    from slp_runner.hashing import WINDOW, HashingStopped

    path = tmp_path / "f"
    path.write_bytes(os.urandom(WINDOW + 5))  # two windows
    asked = []

    def stop_after_the_first_window():
        asked.append(True)
        return len(asked) > 1

    with pytest.raises(HashingStopped, match=f"stopped at byte {WINDOW}"):
        hash_file(path, stop=stop_after_the_first_window)
    assert hash_file(path, stop=lambda: False).blake3 == blake3.blake3(path.read_bytes()).hexdigest()


def test_single_thread_stream_hasher_equals_the_default(tmp_path):
    data = os.urandom(3 * 1024 * 1024 + 1)
    one, auto = StreamHasher(threads=1), StreamHasher()
    for h in (one, auto):
        for i in range(0, len(data), 1 << 20):
            h.update(data[i:i + (1 << 20)])
    assert one.digest() == auto.digest() == hash_file_digest(tmp_path, data)


def hash_file_digest(tmp_path, data):
    path = tmp_path / "g"
    path.write_bytes(data)
    return hash_file(path)

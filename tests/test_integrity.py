"""No wrong bytes served silently: damaged stored objects, edited cache entries,
full disks and malformed input, on the real backends."""

import os
import resource
import signal
import subprocess
import uuid

import blake3
import pytest

from conftest import make_backend
from slp_runner.artifacts import BLOB, PROMPTS
from slp_runner.errors import InputError, IntegrityError, OutputError
from slp_runner.store import ArtifactStore
from test_cli import SLP, files_under, hash_of, slp


def damage(store, kind, oid, data):
    store.fs.pipe_file(store.object_path(kind, oid), data)


# -- put over a damaged stored object --------------------------------------------------


def test_put_replaces_a_truncated_object(store, small_file):
    first = store.put(str(small_file), BLOB)
    damage(store, BLOB, first.oid, small_file.read_bytes()[:1000])
    again = store.put(str(small_file), BLOB)
    assert again.uploaded and again.repaired == f"stored size 1000 != {small_file.stat().st_size} bytes"
    assert store.verify(BLOB, first.oid).ok
    integrity = store.read_manifest(BLOB, first.oid)["integrity"]
    assert integrity["repair_reason"].startswith("stored size 1000") and integrity["repaired_at"]


def test_verify_existing_hash_catches_same_size_damage(store, small_file):
    first = store.put(str(small_file), BLOB)
    flipped = bytearray(small_file.read_bytes())
    flipped[12345] ^= 0x5A
    damage(store, BLOB, first.oid, bytes(flipped))
    assert not store.verify(BLOB, first.oid).ok
    again = store.put(str(small_file), BLOB, verify_existing="hash")
    assert again.uploaded and again.repaired.startswith("stored bytes hash to ")
    assert store.verify(BLOB, first.oid).ok
    # and a sound object is deduplicated by the same check
    assert not store.put(str(small_file), BLOB, verify_existing="hash").uploaded


def test_damaged_manifest_is_rewritten_on_put_and_reported_by_show(store, small_file):
    from slp_runner import commands

    first = store.put(str(small_file), BLOB)
    store.fs.pipe_file(store.manifest_path(BLOB, first.oid), b"{not json")
    with pytest.raises(IntegrityError, match="not JSON"):
        commands.show(store, BLOB, first.oid, out=open(os.devnull, "w"))
    again = store.put(str(small_file), BLOB)
    assert not again.uploaded
    assert store.read_manifest(BLOB, first.oid)["blake3"] == first.oid


@pytest.fixture
def env(tmp_path):
    e = dict(os.environ)
    e.update(SLP_STORE_ROOT=str(tmp_path / "store"), SLP_CACHE_DIR=str(tmp_path / "cache"))
    return e


def cli_backend(name, seaweed, env):
    root = f"cli-{uuid.uuid4().hex[:10]}"
    if name == "seaweedfs":
        return ["backend=seaweedfs", f"backend.filer_url={seaweed.filer_url}", f"backend.root={root}"]
    env.update(AWS_ACCESS_KEY_ID=seaweed.access_key, AWS_SECRET_ACCESS_KEY=seaweed.secret_key)
    return ["backend=s3", f"backend.endpoint_url={seaweed.s3_url}", "backend.bucket=integrity", f"backend.root={root}"]


def cli_store(args, seaweed, tmp_path):
    """The same backend the CLI arguments name, opened in this process."""
    name = args[0].split("=")[1]
    root = [a.split("=", 1)[1] for a in args if a.startswith("backend.root=")][0]
    if name == "seaweedfs":
        from slp_runner.backends import seaweedfs_backend
        return ArtifactStore(seaweedfs_backend(seaweed.filer_url, root=root))
    from slp_runner.backends import s3_backend
    return ArtifactStore(s3_backend(seaweed.s3_url, "integrity", root=root, key=seaweed.access_key,
                                    secret=seaweed.secret_key))


@pytest.mark.parametrize("name", ["seaweedfs", "s3"])
def test_cli_put_over_damaged_object_says_repaired(name, env, tmp_path, seaweed, small_file):
    args = cli_backend(name, seaweed, env)
    put = slp(env, "task=put", "kind=blob", f"path={small_file}", *args)
    assert put.returncode == 0, put.stderr
    oid = hash_of(put.stdout)
    store = cli_store(args, seaweed, tmp_path)
    damage(store, BLOB, oid, b"overwritten by a careless script")
    bad = slp(env, "task=verify", f"hash={oid}", *args)
    assert bad.returncode == 1 and bad.stdout.startswith("FAILED blob")
    again = slp(env, "task=put", "kind=blob", f"path={small_file}", *args)
    assert again.returncode == 0, again.stderr
    assert "Skipped upload" not in again.stdout
    assert f"Stored object was damaged (stored size 32 != {small_file.stat().st_size} bytes): replaced" in again.stdout
    last = again.stdout.strip().splitlines()[-1]
    assert last.startswith("repaired blob") and f"size={small_file.stat().st_size}" in last
    assert slp(env, "task=verify", f"hash={oid}", *args).stdout.startswith("OK blob")


@pytest.mark.parametrize("name", ["local", "seaweedfs", "s3"])
def test_cli_repair(name, env, tmp_path, seaweed, small_file):
    args = cli_backend(name, seaweed, env) if name != "local" else []
    oid = hash_of(slp(env, "task=put", "kind=blob", f"path={small_file}", *args).stdout)
    store = cli_store(args, seaweed, tmp_path) if name != "local" else ArtifactStore(make_backend("local", None, tmp_path))
    sound = slp(env, "task=repair", f"hash={oid}", f"path={small_file}", *args)
    assert sound.returncode == 0, sound.stderr
    assert "nothing to repair" in sound.stdout.strip().splitlines()[-1]

    flipped = bytearray(small_file.read_bytes())
    flipped[-1] ^= 1  # same size: only a re-hash sees it
    damage(store, BLOB, oid, bytes(flipped))
    wrong = tmp_path / "wrong.bin"
    wrong.write_bytes(b"not the bytes of that hash")
    refused = slp(env, "task=repair", f"hash={oid}", f"path={wrong}", *args)
    assert refused.returncode == 1
    assert refused.stderr.strip() == f"slp: error: {wrong} hashes to {blake3.blake3(wrong.read_bytes()).hexdigest()}, " \
                                     f"not {oid}: it cannot stand for that object"
    assert not store.verify(BLOB, oid).ok  # untouched

    fixed = slp(env, "task=repair", f"hash={oid}", f"path={small_file}", *args)
    assert fixed.returncode == 0, fixed.stderr
    assert fixed.stdout.strip().splitlines()[-1].startswith("repaired blob")
    assert slp(env, "task=verify", f"hash={oid}", *args).returncode == 0


# -- cache entries edited behind the cache's back --------------------------------------


def test_edited_cache_entry_with_mtime_restored_is_caught(store, cache, small_file):
    oid = store.put(str(small_file), BLOB).oid
    path = cache.get(store, BLOB, oid).path
    st = os.stat(path)
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(100)
        f.write(b"\xff\xfe")
    os.chmod(path, 0o444)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # size, mtime and inode as recorded
    again = cache.get(store, BLOB, oid)
    assert again.repaired and again.validation == "download"
    assert open(path, "rb").read() == small_file.read_bytes()


def test_cli_get_never_serves_an_edited_entry(env, tmp_path, small_file):
    oid = hash_of(slp(env, "task=put", "kind=blob", f"path={small_file}").stdout)
    first = slp(env, "task=get", f"hash={oid}")
    entry = first.stdout.strip().split("path=")[1]
    mtime = subprocess.run(["stat", "-c", "%y", entry], capture_output=True, text=True).stdout.strip()
    os.chmod(entry, 0o644)
    with open(entry, "r+b") as f:
        f.write(b"EVIL")
    subprocess.run(["touch", "-d", mtime, entry], check=True)
    out = tmp_path / "out.bin"
    got = slp(env, "task=get", f"hash={oid}", f"out={out}")
    assert got.returncode == 0, got.stderr
    assert "validated by stat" not in got.stdout
    assert "was corrupt: removed and fetched again" in got.stdout
    assert out.read_bytes() == small_file.read_bytes()


# -- a full disk is named as such, and leaves nothing behind ---------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A real 2 MiB filesystem (tmpfs; the suite runs as root in CI)."""
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("name", ["local", "seaweedfs"])
def test_full_cache_disk_is_one_line_naming_path_and_bytes(name, env, tmp_path, seaweed, small_file, small_disk):
    args = cli_backend(name, seaweed, env) if name != "local" else []
    oid = hash_of(slp(env, "task=put", "kind=blob", f"path={small_file}", *args).stdout)
    env["SLP_CACHE_DIR"] = str(small_disk / "cache")
    got = slp(env, "task=get", f"hash={oid}", *args)
    assert got.returncode == 1
    size = small_file.stat().st_size
    assert got.stderr.strip().splitlines() == [
        f"slp: error: no space left for blob {oid} under {small_disk / 'cache'}: it needs {size} bytes (3.0 MiB), "
        + got.stderr.split("MiB), ", 1)[1].strip()]
    assert "backend" not in got.stderr
    assert [f for f in files_under(small_disk) if not f.endswith(".lock")] == []


def test_full_output_disk_for_out(env, tmp_path, small_file, small_disk):
    oid = hash_of(slp(env, "task=put", "kind=blob", f"path={small_file}").stdout)
    dest = small_disk / "copy.bin"
    got = slp(env, "task=get", f"hash={oid}", f"out={dest}")
    assert got.returncode == 1
    assert len(got.stderr.strip().splitlines()) == 1
    assert f"no space left for out={dest} under {small_disk}: it needs {small_file.stat().st_size} bytes" in got.stderr
    assert files_under(small_disk) == []


def _limit_file_size(limit):
    def apply():
        # A real write failure part-way through: the kernel refuses bytes past the limit
        # (EFBIG) once the download has started, after the free-space check passed.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.parametrize("name", ["local", "seaweedfs"])
def test_write_failing_mid_download_leaves_nothing(name, env, tmp_path, seaweed, small_file):
    args = cli_backend(name, seaweed, env) if name != "local" else []
    oid = hash_of(slp(env, "task=put", "kind=blob", f"path={small_file}", *args).stdout)
    proc = subprocess.run([SLP, "task=get", f"hash={oid}", *args], env=env, capture_output=True, text=True,
                          timeout=120, preexec_fn=_limit_file_size(1024 * 1024))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("slp: error: no space left writing blob")
    assert f"it needs {small_file.stat().st_size} bytes" in lines[0] and "backend" not in lines[0]
    cache_files = [f for f in files_under(tmp_path / "cache") if not f.endswith(".lock")]
    assert cache_files == []


def test_in_process_full_disk_raises_output_error(tmp_path, small_file, small_disk):
    from slp_runner.cache import LocalCache

    store = ArtifactStore(make_backend("local", None, tmp_path))
    oid = store.put(str(small_file), BLOB).oid
    with pytest.raises(OutputError, match=f"needs {small_file.stat().st_size} bytes"):
        LocalCache(str(small_disk)).get(store, BLOB, oid)


# -- malformed input on the command line -----------------------------------------------

FLOATY_HASH = "1e" + "2" * 62  # 64 hex digits that Hydra would read as the float inf

MALFORMED = [
    (["task=ls", "backend="], "backend"),
    (["task=get", "hash=[1,2"], "hash=[1,2"),
    (["task=ls", "+=x"], "malformed override '+=x'"),
    (["task=ls", "backend._target_=nope.missing_backend"], "backend._target_ 'nope.missing_backend'"),
    (["task=get", f"hash={FLOATY_HASH}"], f"no artifact with hash {FLOATY_HASH}"),
    (["task=get", "hash=" + "0" * 63 + "1", "kind=blob"], "no blob with hash " + "0" * 63 + "1"),
    (["task=get", "hash=12345678"], "no artifact whose hash starts with 12345678"),  # a prefix, not the int
]


@pytest.mark.parametrize("args, message", MALFORMED, ids=[" ".join(a)[:40] for a, _ in MALFORMED])
def test_malformed_override_is_one_line_naming_it(env, tmp_path, args, message):
    before = files_under(tmp_path)
    proc = slp(env, *args)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("slp: error: ") and message in lines[0], lines[0]
    assert "inf" not in lines[0]
    assert files_under(tmp_path) == before


def test_put_refuses_file_not_matching_expected_hash(store, prompts_file):
    with pytest.raises(InputError, match="hashes to"):
        store.put(str(prompts_file), PROMPTS, expect_oid="0" * 64)


def test_import_error_inside_a_user_stage_module_names_it(env, tmp_path):
    (tmp_path / "mystages.py").write_text("import not_installed_anywhere\n\ndef step(ctx):\n    return {}\n")
    conf = tmp_path / "conf" / "pipeline"
    conf.mkdir(parents=True)
    (conf / "mine.yaml").write_text("name: mine\nstages:\n  step:\n    _target_: mystages.step\n")
    (conf / "gone.yaml").write_text("name: gone\nstages:\n  step:\n    _target_: no_such_module.step\n")
    env["PYTHONPATH"] = str(tmp_path)
    common = [f"hydra.searchpath=[file://{tmp_path / 'conf'}]", f"runner.runs_dir={tmp_path / 'runs'}"]
    broken = slp(env, "pipeline=mine", *common)
    assert broken.returncode == 1
    assert broken.stderr.strip() == ("slp: error: stage 'step': target 'mystages.step': importing mystages failed: "
                                     "ModuleNotFoundError: No module named 'not_installed_anywhere'")
    missing = slp(env, "pipeline=gone", *common)
    assert missing.stderr.strip() == "slp: error: stage 'step': unknown target 'no_such_module.step'"
    assert not (tmp_path / "runs").exists()


# -- found by probing as a user ----------------------------------------------------------


def test_a_directory_at_an_object_path_is_refused_not_written_into(tmp_path, small_file):
    store = ArtifactStore(make_backend("local", None, tmp_path))
    oid = blake3.blake3(small_file.read_bytes()).hexdigest()
    os.makedirs(store.object_path(BLOB, oid) + "/sub")
    with pytest.raises(IntegrityError, match="is a directory"):
        store.put(str(small_file), BLOB)
    assert os.listdir(store.object_path(BLOB, oid)) == ["sub"]


def test_verify_reports_a_damaged_manifest(env, tmp_path, small_file):
    oid = hash_of(slp(env, "task=put", "kind=blob", f"path={small_file}").stdout)
    manifest = tmp_path / "store" / "blobs" / f"{oid}.manifest.json"
    manifest.write_text("{broken")
    bad = slp(env, "task=verify", f"hash={oid}")
    assert bad.returncode == 1 and "manifest" in bad.stdout and "not JSON" in bad.stdout
    fixed = slp(env, "task=repair", f"hash={oid}", f"path={small_file}")
    assert "its manifest was rewritten" in fixed.stdout
    assert slp(env, "task=verify", f"hash={oid}").returncode == 0


def test_repair_of_a_lost_object_keeps_its_manifest(env, tmp_path, prompts_file):
    put = slp(env, "task=put_prompts", f"prompts.path={prompts_file}", "prompts.name=mine", "+provenance.license=apache")
    oid = hash_of(put.stdout)
    os.unlink(tmp_path / "store" / "prompts" / f"{oid}.jsonl")
    fixed = slp(env, "task=repair", f"hash={oid}", f"path={prompts_file}")  # no kind: the manifest names it
    assert fixed.returncode == 0, fixed.stderr
    assert "the object was missing, its manifest was not" in fixed.stdout
    assert fixed.stdout.strip().splitlines()[-1].startswith("repaired prompts")
    shown = slp(env, "task=show", f"hash={oid}").stdout
    assert '"license": "apache"' in shown and '"name": "mine"' in shown and '"repaired_at"' in shown


def test_repair_refuses_another_kind(env, tmp_path, prompts_file):
    oid = hash_of(slp(env, "task=put_prompts", f"prompts.path={prompts_file}").stdout)
    wrong = slp(env, "task=repair", f"hash={oid}", f"path={prompts_file}", "kind=results")
    assert wrong.stderr.strip() == f"slp: error: {oid} is stored as prompts, not results: repair it with kind=prompts"
    assert not (tmp_path / "store" / "results").exists()


def test_credential_named_provenance_is_masked_in_the_artifact_manifest(store, small_file):
    result = store.put(str(small_file), BLOB, provenance={"token": "tok-1234567890", "license": "mit"})
    prov = store.read_manifest(BLOB, result.oid)["provenance"]
    assert prov["token"] == "***" and prov["license"] == "mit"


def test_out_never_replaces_special_files_or_links(env, tmp_path, small_file):
    oid = hash_of(slp(env, "task=put", "kind=blob", f"path={small_file}").stdout)
    fifo, link = tmp_path / "fifo", tmp_path / "link"
    os.mkfifo(fifo)
    os.symlink("/dev/null", link)
    for dest in (fifo, link):
        got = slp(env, "task=get", f"hash={oid}", f"out={dest}")
        assert one_line(got) == f"slp: error: out={dest} exists and is not a regular file: give a new path or a folder"
    assert os.path.islink(link) and os.readlink(link) == "/dev/null"
    missing = slp(env, "task=get", f"hash={oid}", f"out={tmp_path / 'nowhere'}/")
    assert one_line(missing) == f"slp: error: out={tmp_path / 'nowhere'}/: output folder does not exist"
    entry = slp(env, "task=get", f"hash={oid}").stdout.strip().split("path=")[1]
    onto_itself = slp(env, "task=get", f"hash={oid}", f"out={entry}")
    assert onto_itself.returncode == 0 and os.stat(entry).st_mode & 0o222 == 0


def one_line(proc):
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_more_user_errors_are_one_line(env, tmp_path, small_file):
    bad_workers = slp(env, "pipeline=store_prompts", "runner.workers=abc", f"runner.runs_dir={tmp_path / 'runs'}")
    assert one_line(bad_workers) == "slp: error: runner.workers must be a whole number, got 'abc'"
    assert not (tmp_path / "runs").exists()
    oid = hash_of(slp(env, "task=put", "kind=blob", f"path={small_file}").stdout)
    assert "Not a directory" in one_line(slp(env, "task=get", f"hash={oid}", f"cache_dir={small_file}"))
    secret = "hunter2-secret-value"
    unset = slp(env, "task=get", f"hash={oid}", f"+backend.secret={secret}", "cache_dir=${oc.env:SLP_NOPE_UNSET}")
    assert "SLP_NOPE_UNSET" in one_line(unset) and secret not in unset.stderr + unset.stdout
    quoted = slp(env, "task=ls", f"+backend.secret=Super'{secret}")
    assert "malformed override" in one_line(quoted) and secret not in quoted.stderr


def test_a_sweep_keeps_each_hash_a_string(env, tmp_path, small_file):
    oid = hash_of(slp(env, "task=put", "kind=blob", f"path={small_file}").stdout)
    swept = slp(env, "-m", "task=get", f"hash={FLOATY_HASH},{oid}", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert f"no artifact with hash {FLOATY_HASH}" in swept.stderr and "'inf'" not in swept.stderr
    assert f"cached blob hash={oid}" in swept.stdout or f"fetched blob hash={oid}" in swept.stdout


def test_get_of_an_object_removed_after_it_was_found_says_so_and_keeps_nothing(store, small_file, tmp_path):
    # A get by hash alone finds the kind (and the size) first; a gc or a user's rm then
    # takes the object before the download starts. One line naming the hash, no partial.
    from slp_runner.cache import LocalCache
    from slp_runner.errors import ArtifactNotFound

    oid = store.put(small_file, BLOB).oid
    found = ArtifactStore(store.backend)  # a new command's
    kind = found.find_kind(oid)
    store.fs.rm(store.object_path(BLOB, oid))
    cache = LocalCache(str(tmp_path / "cache"))
    with pytest.raises(ArtifactNotFound) as err:
        cache.get(found, kind, oid)
    message = str(err.value)
    assert "\n" not in message and oid in message and "removed while it was being fetched" in message, message
    left = [f for f in files_under(tmp_path / "cache") if not f.endswith(".lock")]
    assert left == [], left

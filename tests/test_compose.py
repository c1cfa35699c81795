"""A single run's config is composed once and read back next time without Hydra: the
same answers either way, and a stale, damaged or secret-bearing entry is never used."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from slp_runner import compose

SLP = os.path.join(os.path.dirname(sys.executable), "slp")


@pytest.fixture
def env(tmp_path):
    e = dict(os.environ)
    e.update(SLP_STORE_ROOT=str(tmp_path / "store"), SLP_CACHE_DIR=str(tmp_path / "cache"),
             SLP_COMPOSE_CACHE=str(tmp_path / "compose"))
    e.pop("SLP_TRACE", None)
    return e


def slp(env, *args, importtime=False):
    cmd = [sys.executable, *(["-X", "importtime"] if importtime else []), SLP, *args]
    if importtime:  # what this process imports itself, not what a server has loaded
        env = {**env, "SLP_SERVER": "off"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


def imported(result) -> set[str]:
    """The modules a ``python -X importtime`` run imported."""
    return {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")
            and "|" in line}


def entries(env) -> list[str]:
    folder = env["SLP_COMPOSE_CACHE"]
    return sorted(os.path.join(folder, f) for f in os.listdir(folder)) if os.path.isdir(folder) else []


def test_second_run_skips_hydra_and_answers_the_same(env, tmp_path):
    (tmp_path / "f.bin").write_bytes(os.urandom(4096))
    put = slp(env, "task=put", "kind=blob", f"path={tmp_path / 'f.bin'}", "format=json")
    assert put.returncode == 0, put.stderr
    oid = json.loads(put.stdout)["hash"]
    first = slp(env, "task=get", f"hash={oid}", "format=json", importtime=True)
    assert first.returncode == 0, first.stderr
    assert "hydra" in imported(first)  # composed by Hydra, once
    second = slp(env, "task=get", f"hash={oid}", "format=json", importtime=True)
    assert second.returncode == 0, second.stderr
    mods = imported(second)
    # read back: no Hydra; a cache hit: no backend library either
    assert not {"hydra", "fsspec", "requests", "s3fs", "gguf", "numpy", "slp_runner.store"} & mods
    a, b = json.loads(first.stdout), json.loads(second.stdout)
    assert b["cache_hit"] and b["hash"] == a["hash"] == oid and b["path"] == a["path"]


def test_one_entry_serves_every_hash_and_keeps_none(env, tmp_path):
    oids = []
    for i in range(2):
        (tmp_path / f"f{i}.bin").write_bytes(os.urandom(4096))
        put = slp(env, "task=put", "kind=blob", f"path={tmp_path / f'f{i}.bin'}", "format=json")
        assert put.returncode == 0, put.stderr
        oids.append(json.loads(put.stdout)["hash"])
    kept = set(entries(env))
    assert len(kept) == 1  # two paths, one shape
    oids.append("0" * 64)  # absent: a digit first, where the two above may start with a letter
    oids.append("a" * 64)
    got = [slp(env, "task=get", f"hash={oid}", "format=json", importtime=True) for oid in oids]
    assert [json.loads(g.stdout)["hash"] for g in got[:2]] == oids[:2]
    assert [g.returncode for g in got] == [0, 0, 1, 1] and all("no " in g.stderr for g in got[2:])
    assert "hydra" in imported(got[0])
    assert not any("hydra" in imported(g) for g in got[1:])  # any other hash: read back
    assert len(set(entries(env)) - kept) == 1
    for path in entries(env):
        text = open(path).read()
        assert not any(oid in text for oid in oids) and str(tmp_path) not in text


def test_values_hydra_would_misread_stay_strings(env):
    """A hash of digits and one 'e' is a float to Hydra (1e22... is inf); quoted, read back
    or not, it stays the string that was typed."""
    floaty = "1e" + "2" * 62
    for _ in range(2):
        got = slp(env, "task=get", f"hash={floaty}", "kind=blob")
        assert got.returncode == 1
        assert got.stderr.strip().splitlines() == [got.stderr.strip()] and floaty in got.stderr


def test_an_error_names_the_value_typed(env):
    for _ in range(2):
        got = slp(env, "task=ls", "backend.bucket=my-bucket")  # the local backend has no bucket
        assert got.returncode == 2
        assert "backend.bucket" in got.stderr and "__slp_value" not in got.stderr


def test_typed_values_survive_the_round_trip(env):
    """runner.force=no is False from Hydra's schema; read back it must still be False."""
    for _ in range(2):
        got = slp(env, "task=runs", "runner.force=no", "runner.workers=3", "--cfg", "job")  # Hydra's own view
        assert got.returncode == 0, got.stderr
    config, overrides = compose.compose_with_hydra(["task=runs", "runner.force=no", "runner.workers=3"])
    assert config["runner"]["force"] is False and config["runner"]["workers"] == 3
    assert overrides == ["task=runs", "runner.force=no", "runner.workers=3"]
    path = os.path.join(env["SLP_COMPOSE_CACHE"], "x.json")
    compose.save(path, config, overrides)
    kept, kept_overrides, built, slots = compose.load(path)
    assert (kept, kept_overrides, slots) == (config, overrides, [])
    rebuilt = compose._rebuilt(built, slots, [])  # the DictConfig kept beside the JSON
    assert rebuilt.runner.force is False and rebuilt.runner.workers == 3


def test_a_kept_config_takes_the_values_of_each_command_line(env, tmp_path):
    """One entry serves every hash and path: the values land in the kept DictConfig's
    placeholders, and a damaged pickle is built from the JSON instead."""
    for name in ("a-b.bin", "c.bin"):
        (tmp_path / f"file-{name}").write_bytes(os.urandom(1000))
        put = slp(env, "task=put", "kind=blob", f"path={tmp_path / f'file-{name}'}", f"name={name}", "format=json")
        assert put.returncode == 0, put.stderr
        assert json.loads(put.stdout)["name"] == name
    assert len(entries(env)) == 1, [open(e).read()[:300] for e in entries(env)]
    (entry,) = entries(env)
    doc = json.loads(open(entry).read())
    assert sorted(path for path, _ in compose._slots(doc["config"])) == [["name"], ["path"]], doc["config"]
    doc["built"] = "AAAA" + doc["built"][4:]  # a pickle that does not load, under a matching digest
    doc["digest"] = compose._digest(entry, doc["config"], doc["overrides"], doc["built"])
    open(entry, "w").write(json.dumps(doc))
    (tmp_path / "d.bin").write_bytes(os.urandom(1000))
    put = slp(env, "task=put", "kind=blob", f"path={tmp_path / 'd.bin'}", "name=d", "format=json")
    assert put.returncode == 0, put.stderr
    assert json.loads(put.stdout)["name"] == "d"


def test_edited_entry_is_composed_again(env, tmp_path):
    (tmp_path / "f.bin").write_bytes(os.urandom(4096))
    env_put = dict(env, SLP_COMPOSE_CACHE="off")
    assert slp(env_put, "task=put", "kind=blob", f"path={tmp_path / 'f.bin'}").returncode == 0
    ls = slp(env, "task=ls", "format=json")
    assert ls.returncode == 0, ls.stderr
    assert json.loads(ls.stdout)["count"] == 1
    (entry,) = entries(env)
    doc = json.loads(open(entry).read())
    doc["config"]["backend"]["root"] = str(tmp_path / "elsewhere")  # valid JSON, wrong content
    with open(entry, "w") as f:
        json.dump(doc, f)
    again = slp(env, "task=ls", "format=json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == json.loads(ls.stdout)  # the store in SLP_STORE_ROOT, not "elsewhere"
    assert not (tmp_path / "elsewhere").exists()
    assert compose.load(entry) is not None  # rewritten whole

    with open(entry, "r+b") as f:  # truncated
        f.truncate(40)
    third = slp(env, "task=ls", "format=json")
    assert third.returncode == 0 and json.loads(third.stdout) == json.loads(again.stdout)


def test_config_change_invalidates(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(compose.CONF_DIR, conf)
    before = compose.key_of(["task=ls"], str(conf))
    assert compose.key_of(["task=ls"], str(conf)) == before
    assert compose.key_of(["task=ls", "format=json"], str(conf)) != before
    yaml = conf / "backend" / "local.yaml"
    yaml.write_text(yaml.read_text() + "\n# edited\n")
    assert compose.key_of(["task=ls"], str(conf)) != before


def test_secrets_are_never_written_down(env, tmp_path):
    secret = "s3cr3t-Value-0042"
    got = slp(env, "task=ls", f"+backend.secret={secret}")
    # the local backend takes no secret: the error is the point only in that it ran
    assert secret not in got.stdout + got.stderr
    got = slp(env, "task=ls", f"+provenance.api_token={secret}")
    assert got.returncode == 0, got.stderr
    got = slp(env, "task=ls", f"backend.root=http://user:{secret}@host/x")
    for path in entries(env):
        assert secret not in open(path).read()
    assert entries(env) == []  # none of the three was kept
    got = slp(env, "task=ls", "backend.key=AKIA-not-a-real-key-0042")  # a secret-named string key
    assert "AKIA-not-a-real-key-0042" not in got.stdout + got.stderr
    assert entries(env) == []


def test_sweeps_and_hydra_flags_go_through_hydra():
    assert compose.is_single_run(["task=get", "hash=abc", "+provenance.x=1", "~other", "backend=s3"])
    for argv in (["-m", "task=ls"], ["task=ls", "--cfg", "job"], ["task=ls", "hydra.searchpath=[file:///x]"],
                 ["--info"], ["task=ls", "hydra/job_logging=default"]):
        assert not compose.is_single_run(argv), argv


def test_unwritable_cache_still_runs(env, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    env["SLP_COMPOSE_CACHE"] = str(blocker / "compose")
    got = slp(env, "task=ls")
    assert got.returncode == 0, got.stderr
    env["SLP_COMPOSE_CACHE"] = "off"
    got = slp(env, "task=ls", importtime=True)
    assert got.returncode == 0 and "hydra" in imported(got)


def test_pipeline_run_records_its_overrides_on_both_paths(env, tmp_path):
    """A run composed by slp records the overrides Hydra would have (reproduce needs them)."""
    runs = tmp_path / "runs"
    args = ["pipeline=store_prompts", f"runner.runs_dir={runs}", "runner.force=true", "prompts.name=batch"]
    for tag in ("v1", "0042"):  # a tag Hydra would read as an int stays the string typed
        got = slp(env, *args, f"prompts.tag={tag}")
        assert got.returncode == 0, got.stderr
    manifests = sorted(runs.glob("*/manifest.json"), key=lambda m: json.loads(m.read_text())["start_time"])
    recorded = [*args[:3], "prompts.name='batch'"]  # string values: quoted, so they stay strings on replay
    assert [json.loads(m.read_text())["overrides"] for m in manifests] == [
        [*recorded, "prompts.tag='v1'"], [*recorded, "prompts.tag='0042'"]]


# -- what a probe as a new user found: none of it may be kept, or served wrong ----------


@pytest.mark.parametrize("override", [
    "+provenance.note='${oc.env:SLP_TEST_TOKEN}'",  # Hydra records it resolved
    "+provenance.big=123456789012345678901234567890",  # beyond JSON's 64 bits
    "+provenance.score=inf",  # JSON has no inf: it would come back as null
    "+provenance.url=http://:SEKRIT-empty-user@host",
    "+provenance.url=http://u:SEKRIT/slash@host",
    "+provenance={secret:1234567.5}",
])
def test_what_json_or_secrecy_cannot_keep_is_composed_each_time(env, override):
    env["SLP_TEST_TOKEN"] = "SEKRIT-from-the-environment"
    for _ in range(2):
        got = slp(env, "task=ls", override, "format=json")
        assert got.returncode == 0, got.stderr
    assert entries(env) == []


def test_interpolated_override_is_recorded_as_of_each_run(env, tmp_path):
    runs = tmp_path / "runs"
    for value in ("one", "two"):
        env["SLP_TEST_NOTE"] = value
        got = slp(env, "pipeline=store_prompts", f"runner.runs_dir={runs}",
                  "+provenance.note='${oc.env:SLP_TEST_NOTE}'")
        assert got.returncode == 0, got.stderr
    notes = sorted(o for m in runs.glob("*/manifest.json") for o in json.loads(m.read_text())["overrides"]
                   if o.startswith("+provenance"))
    assert notes == ["+provenance.note='one'", "+provenance.note='two'"]


def test_an_entry_under_another_commands_name_is_not_served(env):
    ls = slp(env, "task=ls", "format=json")
    (a,) = entries(env)
    runs = slp(env, "task=runs", "format=json")
    (b,) = set(entries(env)) - {a}
    shutil.copyfile(b, a)  # a whole, well-formed entry, of the other command
    again = slp(env, "task=ls", "format=json")
    assert again.returncode == 0 and json.loads(again.stdout) == json.loads(ls.stdout) != json.loads(runs.stdout)


def test_a_folder_others_can_write_is_never_read(env):
    folder = env["SLP_COMPOSE_CACHE"]
    os.makedirs(folder)
    os.chmod(folder, 0o777)
    for _ in range(2):
        got = slp(env, "task=ls", importtime=True)
        assert got.returncode == 0 and "hydra" in imported(got)
    assert entries(env) == []


def test_a_fifo_in_place_of_an_entry_does_not_block(env):
    assert slp(env, "task=ls").returncode == 0
    (entry,) = entries(env)
    os.unlink(entry)
    os.mkfifo(entry)
    got = subprocess.run([SLP, "task=ls"], env=env, capture_output=True, text=True, timeout=60)
    assert got.returncode == 0, got.stderr


def test_prune_touches_only_entries(tmp_path):
    from slp_runner.local_output import keep_newest

    for i in range(5):
        (tmp_path / f"{i:064x}.json").write_text("{}")
        os.utime(tmp_path / f"{i:064x}.json", (1000 + i, 1000 + i))
    (tmp_path / "mydata.json").write_text("{}")
    os.utime(tmp_path / "mydata.json", (1, 1))
    (tmp_path / ".compose-killed.part").write_text("{")  # a write killed two hours ago
    os.utime(tmp_path / ".compose-killed.part", (time.time() - 7200,) * 2)
    (tmp_path / ".compose-writing.part").write_text("{")  # one being written now
    keep_newest(str(tmp_path), compose._ENTRY, compose._TEMP, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [".compose-writing.part", "mydata.json"] + [f"{i:064x}.json" for i in (2, 3, 4)])
    for i in range(5, 16):  # past the bound: down to an eighth less, not one at a time
        (tmp_path / f"{i:064x}.json").write_text("{}")
        os.utime(tmp_path / f"{i:064x}.json", (1000 + i, 1000 + i))
    keep_newest(str(tmp_path), compose._ENTRY, compose._TEMP, 8)
    assert sorted(p.name for p in tmp_path.glob("0*.json")) == [f"{i:064x}.json" for i in range(9, 16)]
    keep_newest(str(tmp_path), compose._ENTRY, compose._TEMP, 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".compose-writing.part", "mydata.json"]


def test_placeholder_text_typed_is_taken_as_typed(env):
    off = slp(dict(env, SLP_COMPOSE_CACHE="off"), "task=ls", "name=__slp_value_1__", "tag=xx")
    on = slp(env, "task=ls", "name=__slp_value_1__", "tag=xx")
    assert (on.returncode, on.stdout, on.stderr) == (off.returncode, off.stdout, off.stderr)

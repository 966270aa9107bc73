"""Fault matrix, rows on mlflow-molecule (SQLite and local artifacts): one fault injected into one
operation each, and the end state asserted: which configuration serves, the data logged before it
read back with MLflow's client, and what the play printed. The README's "Fault matrix" lists them.

Runs after test_default.py, before test_operations.py, on the same host.
"""

import hashlib
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import time
import uuid

import pytest
from mlflow_testlib import READ_BACK, ROOT, client_script, journal, run_playbook, run_python, var

NAME = "mlflow-molecule"
testinfra_hosts = [f"ansible://{NAME}"]
PORT = var(NAME, "mlflow_port")
URL = f"http://127.0.0.1:{PORT}"
DATA_DIR = var(NAME, "mlflow_data_dir")
CONFIG_DIR = var(NAME, "mlflow_config_dir")
BACKUP_DIR = var(NAME, "mlflow_db_backup_dir")
ENV_FILE = f"{CONFIG_DIR}/mlflow.env"
UNIT = "/etc/systemd/system/mlflow.service"


def main_pid(host):
    return host.run("systemctl show mlflow -p MainPID --value").stdout.strip()


def served_env(host):
    """The environment of the server that runs now (what it was started with, not what is on disk)."""
    environ = host.run(f"tr '\\0' '\\n' < /proc/{main_pid(host)}/environ").stdout
    return dict(line.split("=", 1) for line in environ.splitlines() if "=" in line)


def config(host):
    return {p: host.file(p).sha256sum for p in (ENV_FILE, UNIT)}


@pytest.fixture(scope="module")
def logged(host):
    """A run, a metric history, an artifact and a model version, logged before any fault."""
    out = run_python(host, client_script(), URL, f"faults-{uuid.uuid4().hex[:8]}")
    assert out.rc == 0, out.stdout + out.stderr + journal(host)
    return json.loads(out.stdout.strip().splitlines()[-1])


def assert_data_intact(host, logged):
    out = run_python(host, READ_BACK, URL, logged["run_id"])
    assert out.rc == 0, out.stdout + out.stderr + journal(host)
    run = json.loads(out.stdout.strip().splitlines()[-1])[logged["run_id"]]
    assert run["params"] == {"alpha": "0.5"} and run["metrics"] == {"rmse": 0.125}, run
    assert run["artifact"] == logged["expected_artifact_content"], run
    model = host.run(f"curl -sS '{URL}/api/2.0/mlflow/model-versions/get?name={logged['model_name']}&version=1'")
    assert json.loads(model.stdout)["model_version"]["run_id"] == logged["run_id"], model.stdout


def assert_serving(host):
    assert host.run(f"curl -sS {URL}/health").stdout.strip() == "OK", journal(host)


def test_a_change_that_crash_loops_is_rolled_back_and_reported_as_serving(host, logged):
    """The server exits at start on the new configuration; systemd restarts it several times. The
    restarts of that failed start must not count against the configuration put back."""
    before = config(host)
    result = run_playbook("site.yml", NAME, {"mlflow_env_extra": {"MLFLOW_SQLALCHEMYSTORE_ECHO": "maybe"}})
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    message = output[output.index("The change was not applied"):]
    assert "exited at start" in message, message[:3000]
    assert "is back in place and MLflow answers OK on /health again" in message, message[:3000]
    assert "did not come up either" not in output
    # The same env on the same databases, verified when the server last started: a change that
    # restarts it does not import MLflow again to read the schema.
    read = [block for block in output.split("TASK [")[1:] if block.startswith("mlflow : Read the schema revision")]
    assert len(read) == 1 and f"skipping: [{NAME}]" in read[0], read
    assert config(host) == before
    assert "MLFLOW_SQLALCHEMYSTORE_ECHO" not in served_env(host)
    assert_serving(host)
    assert_data_intact(host, logged)


def test_a_server_killed_during_the_health_wait_comes_back_with_the_change(host, logged):
    """kill -9 of the new server while the play waits for /health: systemd restarts it, and the play
    ends with the new configuration serving."""
    mark = uuid.uuid4().hex[:12]
    old_pid = main_pid(host)
    play = start_playbook({"mlflow_env_extra": {"MLFLOW_FAULT_MARK": mark}})
    killed = None
    deadline = time.monotonic() + 240
    while play.poll() is None and time.monotonic() < deadline:
        pid = main_pid(host)
        if killed is None and pid not in ("0", old_pid):
            assert host.run(f"kill -9 {pid}").rc == 0
            killed = pid
        time.sleep(0.2)
    output, _ = play.communicate(timeout=300)
    assert killed, "the play never restarted the server"
    assert play.returncode == 0, output[-3000:]
    assert main_pid(host) != killed
    assert served_env(host).get("MLFLOW_FAULT_MARK") == mark
    assert_serving(host)
    assert_data_intact(host, logged)


def test_a_run_interrupted_between_writing_and_restarting_is_completed_by_the_next_run(host, logged):
    """SIGINT (Ctrl-C) as soon as mlflow.env changes on disk, before the restart: the next run finds
    nothing to write, yet restarts the server, because what is on disk is not what served last."""
    mark = uuid.uuid4().hex[:12]
    settings = {"mlflow_env_extra": {"MLFLOW_FAULT_MARK": mark}}
    written = host.file(ENV_FILE).sha256sum
    pid = main_pid(host)
    play = start_playbook(settings)
    deadline = time.monotonic() + 180
    while play.poll() is None and time.monotonic() < deadline and host.file(ENV_FILE).sha256sum == written:
        time.sleep(0.05)
    if play.poll() is None:
        os.killpg(play.pid, signal.SIGINT)
    output, _ = play.communicate(timeout=120)
    assert host.file(ENV_FILE).sha256sum != written, output[-3000:]
    interrupted_before_restart = main_pid(host) == pid

    again = run_playbook("site.yml", NAME, settings)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert served_env(host).get("MLFLOW_FAULT_MARK") == mark, (interrupted_before_restart, again.stdout[-3000:])
    assert_serving(host)
    assert_data_intact(host, logged)


def test_a_downgrade_across_schemas_is_refused_before_anything_stops(host, logged):
    """An older release than the one that migrated the schema cannot serve it: the play says to restore
    instead, and the server that runs is never stopped (before, the migrator stopped it first)."""
    older = var(NAME, "test_other_mlflow_version")
    env = f"{var(NAME, 'mlflow_conda_prefix')}/envs/{var(NAME, 'mlflow_conda_env_name')}"
    pid, serving_env = main_pid(host), host.file(env).linked_to
    result = run_playbook("site.yml", NAME, {"mlflow_version": older,
                                             "mlflow_pip_lock_dir": str(ROOT / "molecule" / "shared" / "locks")})
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    message = output[output.index("The change was not applied"):]
    assert f"MLflow {older} cannot serve" in message and "A downgrade across schemas is a restore" in message, \
        message[:3000]
    assert "MLflow kept running with it" in message, message[:3000]
    assert main_pid(host) == pid and host.file(env).linked_to == serving_env
    assert_serving(host)
    assert_data_intact(host, logged)


def test_a_link_planted_in_the_data_directory_stops_before_anything_changes(host):
    """The service user replaces its artifact directory with a link to a directory of root's: the
    role must not follow it (it would chown the target)."""
    victim = "/srv/fault-victim"
    artifacts = f"{DATA_DIR}/artifacts"
    assert host.run(f"mkdir -p {victim} && mv {artifacts} {artifacts}.real && ln -s {victim} {artifacts}").rc == 0
    try:
        before, pid = config(host), main_pid(host)
        result = run_playbook("site.yml", NAME, {})
        output = result.stdout + result.stderr
        assert result.returncode != 0, output[-3000:]
        assert f"A symbolic link is on the way to {artifacts}" in output, output[-3000:]
        assert re.search(rf"{NAME}\s*:.*changed=0", output), output[-3000:]
        assert host.file(victim).user == "root", "the role followed the link"
        assert config(host) == before and main_pid(host) == pid
    finally:
        host.run(f"rm {artifacts} && mv {artifacts}.real {artifacts} && rmdir {victim}")
    assert_serving(host)


def test_a_full_backup_disk_fails_the_backup_cleanly_and_the_server_serves(host, logged):
    """The backup directory has no room: the backup fails with the reason and leaves no partial copy;
    the backups made before stay, and the server never stopped."""
    assert host.run("systemctl start mlflow-backup.service").rc == 0
    earlier = host.run(f"ls -1 {BACKUP_DIR}").stdout.split()
    pid = main_pid(host)
    # A 64 KiB file system mounted over the backup directory.
    assert host.run(f"mount -t tmpfs -o size=64k,mode=0750 tmpfs {BACKUP_DIR} && chown mlflow:mlflow {BACKUP_DIR}").rc == 0
    try:
        failed = host.run("systemctl start mlflow-backup.service")
        log = host.run("journalctl -u mlflow-backup --no-pager -o cat -n 20").stdout
        assert failed.rc != 0, log
        assert "the backup failed, and what it had written is removed" in log, log
        assert re.search("No space left|disk is full", log), log
        assert host.run(f"ls -1 {BACKUP_DIR}").stdout.split() == [], "a partial backup was left"
    finally:
        host.run(f"umount {BACKUP_DIR}")
        host.run("systemctl reset-failed mlflow-backup.service")
    assert host.run(f"ls -1 {BACKUP_DIR}").stdout.split() == earlier
    assert main_pid(host) == pid
    assert_serving(host)
    assert_data_intact(host, logged)


@pytest.fixture(scope="module")
def backup_copy(host, logged):
    """A fresh backup of the host, copied to the controller (as from a lost host)."""
    assert host.run("systemctl start mlflow-backup.service").rc == 0
    newest = host.run(f"ls -1 {BACKUP_DIR}").stdout.split()[-1]
    saved = tempfile.mkdtemp(prefix="mlflow-fault-backup-")
    copy = subprocess.run(["docker", "cp", f"{NAME}:{BACKUP_DIR}/{newest}", saved], capture_output=True, text=True)
    assert copy.returncode == 0, copy.stderr
    yield f"{saved}/{newest}"
    shutil.rmtree(saved)


def tampered(source, change):
    """A copy of the backup, changed by change(directory, manifest) and its manifest rewritten."""
    copy = tempfile.mkdtemp(prefix="mlflow-tampered-") + "/" + os.path.basename(source)
    shutil.copytree(source, copy)
    manifest = json.loads(open(f"{copy}/manifest.json").read())
    change(copy, manifest)
    with open(f"{copy}/manifest.json", "w") as f:
        json.dump(manifest, f)
    return copy


def newer_schema(directory, manifest):
    manifest["stores"][0]["revision"] = "f00dfeedbeef"  # no release of MLflow knows it


def damaged_database(directory, manifest):
    """Cut short (a copy that ran out of room), with a checksum that matches what is left."""
    path = f"{directory}/{manifest['stores'][0]['file']}"
    os.truncate(path, os.path.getsize(path) * 6 // 10)
    manifest["stores"][0]["sha256"] = hashlib.sha256(open(path, "rb").read()).hexdigest()


def unknown_schema_without_a_revision(directory, manifest):
    """A backup of a helper that recorded no schema revision, of a database a later release made:
    every check before the swap passes; the migration after it fails."""
    path = f"{directory}/{manifest['stores'][0]['file']}"
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("update alembic_version set version_num = 'f00dfeedbeef'")
    conn.close()
    del manifest["stores"][0]["revision"]
    manifest["stores"][0]["sha256"] = hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.mark.parametrize("change,reason,end", [
    (newer_schema, "which MLflow {version} does not know", "Nothing was changed"),
    (damaged_database, "is not an intact SQLite database", "Nothing was changed"),
    (unknown_schema_without_a_revision, "is newer than MLflow {version} knows",
     "The SQLite databases it had replaced are back"),
])
def test_a_restore_that_cannot_succeed_leaves_the_server_serving_its_data(
        host, logged, backup_copy, change, reason, end):
    source = tampered(backup_copy, change)
    database = host.file(f"{DATA_DIR}/mlflow.db").sha256sum
    try:
        result = run_playbook("playbooks/restore.yml", NAME, {"mlflow_restore_src": source})
    finally:
        shutil.rmtree(os.path.dirname(source))
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    message = output[output.index("The restore was not applied"):]
    assert reason.format(version=var(NAME, "mlflow_version")) in message, message[:3000]
    assert f"{end}, and MLflow answers OK on /health again" in message, message[:3000]
    if end == "Nothing was changed":
        assert host.file(f"{DATA_DIR}/mlflow.db").sha256sum == database
    assert_serving(host)
    assert_data_intact(host, logged)


def start_playbook(extra_vars):
    """site.yml for this host in the background, in a process group of its own (for SIGINT)."""
    path = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False).name
    with open(path, "w") as f:
        json.dump(extra_vars, f)
    env = {**os.environ, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_ROLES_PATH": str(ROOT / "roles")}
    return subprocess.Popen(
        ["ansible-playbook", "-i", os.environ["MOLECULE_INVENTORY_FILE"], "site.yml", "--limit", NAME, "-e", f"@{path}"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)

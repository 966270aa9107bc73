"""Day-2 operations on the embedded default (mlflow-molecule): metrics, gc and backups by their
timers' services, then an uninstall that keeps the data, one that purges it, and a restore of a
backup (copied off first, as from a lost host) onto the host the uninstall left bare.

Runs after test_default.py on the same host and leaves it serving the restored data.
"""

import json
import re
import shutil
import subprocess
import tempfile
import time
import uuid

import pytest
from mlflow_testlib import READ_BACK, client_script, journal, run_playbook, run_python, var

NAME = "mlflow-molecule"
testinfra_hosts = [f"ansible://{NAME}"]
PORT = var(NAME, "mlflow_port")
URL = f"http://127.0.0.1:{PORT}"
DATA_DIR = var(NAME, "mlflow_data_dir")
CONFIG_DIR = var(NAME, "mlflow_config_dir")
BACKUP_DIR = var(NAME, "mlflow_db_backup_dir")
PREFIX = var(NAME, "mlflow_conda_prefix")
VERSION = var(NAME, "mlflow_version")

LOG_RUNS = """
import json, os, sys, tempfile
import mlflow
from mlflow.tracking import MlflowClient
mlflow.set_tracking_uri(sys.argv[1])
client = MlflowClient(sys.argv[1])
experiment_id = client.create_experiment("gc-" + sys.argv[2])
ids = []
for name in ("deleted", "live"):
    with mlflow.start_run(experiment_id=experiment_id, run_name=name) as run:
        mlflow.log_param("alpha", "0.5")
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "notes.txt")
            open(path, "w").write(name)
            mlflow.log_artifact(path, artifact_path="docs")
    ids.append(run.info.run_id)
client.delete_run(ids[0])
print(json.dumps({"experiment_id": experiment_id, "deleted": ids[0], "live": ids[1]}))
"""


def last_json(result, host):
    assert result.rc == 0, result.stdout + result.stderr + journal(host)
    return json.loads(result.stdout.strip().splitlines()[-1])


def age_seconds(age):
    parts = re.fullmatch(r"((?P<d>[\d.]+)d)?((?P<h>[\d.]+)h)?((?P<m>[\d.]+)m)?((?P<s>[\d.]+)s)?", age).groupdict()
    scale = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    return sum(float(v) * scale[k] for k, v in parts.items() if v)


def start(host, unit):
    """Run a timer's service now, as the timer would, and wait for it to finish."""
    result = host.run(f"systemctl start {unit}.service")
    assert result.rc == 0, result.stderr + host.run(f"journalctl -u {unit} --no-pager -n 40").stdout
    return host.run(f"journalctl -u {unit} --no-pager -n 40 -o cat").stdout


def backups(host):
    return sorted(host.run(f"ls -1 {BACKUP_DIR}").stdout.split())


def test_metrics_count_the_requests(host, running_service):
    assert var(NAME, "mlflow_metrics_enabled") is True

    def served():
        text = host.run(f"curl -sS {URL}/metrics").stdout
        return sum(float(m) for m in re.findall(r'^mlflow_http_request_total\{[^}]*method="GET"[^}]*status="200"[^}]*\} '
                                                r'([0-9.e+]+)$', text, re.M)), text

    before, _ = served()
    for _ in range(5):
        assert host.run(f"curl -sS -o /dev/null {URL}/api/2.0/mlflow/experiments/search?max_results=1").rc == 0
    after, text = served()
    assert after - before >= 5, text[:2000]
    assert f'mlflow_version="{VERSION}"' in text, text[:2000]
    # The workers' files live in the unit's runtime directory, the service user's.
    assert host.file("/run/mlflow/metrics").user == var(NAME, "mlflow_user")


def test_gc_removes_a_deleted_run_and_its_artifacts_and_keeps_a_live_one(host, running_service):
    timer = host.run("systemctl show mlflow-gc.timer -p ActiveState -p Unit --value").stdout.split()
    assert timer == ["mlflow-gc.service", "active"], timer
    ids = last_json(run_python(host, LOG_RUNS, URL, uuid.uuid4().hex[:8]), host)
    artifacts = f"{DATA_DIR}/artifacts/{ids['experiment_id']}"
    assert host.file(f"{artifacts}/{ids['deleted']}/artifacts/docs/notes.txt").exists
    time.sleep(age_seconds(var(NAME, "mlflow_gc_older_than")) + 1)

    log = start(host, "mlflow-gc")

    assert f"Run with ID {ids['deleted']} has been permanently deleted" in log, log
    runs = last_json(run_python(host, READ_BACK, URL, f"{ids['deleted']},{ids['live']}"), host)
    assert runs[ids["deleted"]] == {"error": "RESOURCE_DOES_NOT_EXIST"}, runs
    assert runs[ids["live"]]["artifact"] == "live" and runs[ids["live"]]["stage"] == "active", runs
    # The run's artifact location (<run>/artifacts) is gone, the live run's is there.
    assert not host.file(f"{artifacts}/{ids['deleted']}/artifacts").exists
    assert host.file(f"{artifacts}/{ids['live']}/artifacts/docs/notes.txt").exists


def test_backups_hold_the_database_and_the_artifacts_and_the_newest_are_kept(host, running_service):
    timer = host.run("systemctl show mlflow-backup.timer -p ActiveState -p Unit --value").stdout.split()
    assert timer == ["mlflow-backup.service", "active"], timer
    keep = var(NAME, "mlflow_backup_keep")
    logged = last_json(run_python(host, client_script(), URL, uuid.uuid4().hex[:8]), host)
    before = backups(host)

    for _ in range(keep + 1):
        start(host, "mlflow-backup")

    made = [b for b in backups(host) if b not in before]
    assert len(backups(host)) == keep and len(made) == keep, (before, backups(host))
    newest = f"{BACKUP_DIR}/{made[-1]}"
    manifest = json.loads(host.file(f"{newest}/manifest.json").content_string)
    assert manifest["mlflow"] == VERSION
    assert [(s["role"], s["engine"]) for s in manifest["stores"]] == [("backend", "sqlite")]
    for item in manifest["stores"] + [manifest["artifacts"]]:
        assert host.file(f"{newest}/{item['file']}").sha256sum == item["sha256"], item
    # A consistent copy: the run logged before is in the copied database, its artifact in the archive.
    query = host.run(f"{PREFIX}/envs/mlflow/bin/python -c \"import sqlite3,sys; print(sqlite3.connect(sys.argv[1])"
                     f".execute('select status from runs where run_uuid=?', (sys.argv[2],)).fetchone()[0])\" "
                     f"{newest}/backend.sqlite {logged['run_id']}")
    assert query.stdout.strip() == "FINISHED", query.stdout + query.stderr
    listing = host.run(f"tar -tzf {newest}/artifacts.tar.gz").stdout
    assert f"./{logged['experiment_id']}/{logged['run_id']}/artifacts/docs/notes.txt" in listing.split()
    # Only the service user and its group read them.
    for path in (newest, f"{newest}/backend.sqlite", f"{newest}/artifacts.tar.gz"):
        f = host.file(path)
        assert f.user == var(NAME, "mlflow_user") and f.mode & 0o007 == 0, (path, oct(f.mode))


def test_uninstall_keeps_the_data_purge_deletes_it_and_a_backup_restores_onto_the_bare_host(host, running_service):
    logged = last_json(run_python(host, client_script(), URL, uuid.uuid4().hex[:8]), host)
    start(host, "mlflow-backup")
    newest = backups(host)[-1]
    # The backup leaves the host, as it would before the host is lost.
    saved = tempfile.mkdtemp(prefix="mlflow-backup-")
    try:
        copy = subprocess.run(["docker", "cp", f"{NAME}:{BACKUP_DIR}/{newest}", saved], capture_output=True, text=True)
        assert copy.returncode == 0, copy.stderr

        removed = run_playbook("site.yml", NAME, {"mlflow_state": "absent"})
        assert removed.returncode == 0, (removed.stdout + removed.stderr)[-3000:]
        for unit in ("mlflow.service", "mlflow-backup.timer", "mlflow-gc.timer"):
            assert host.run(f"systemctl cat {unit}").rc != 0, unit
        assert host.run("getent passwd mlflow").rc == 2
        for path in (PREFIX, CONFIG_DIR, "/usr/local/libexec/mlflow"):
            assert not host.file(path).exists, path
        assert not host.socket(f"tcp://0.0.0.0:{PORT}").is_listening
        # The data stays, and so do the backups.
        assert host.file(f"{DATA_DIR}/mlflow.db").exists
        assert host.file(f"{DATA_DIR}/artifacts/{logged['experiment_id']}/{logged['run_id']}").is_directory
        assert newest in backups(host)

        purged = run_playbook("site.yml", NAME, {"mlflow_state": "absent", "mlflow_purge_data": True})
        assert purged.returncode == 0, (purged.stdout + purged.stderr)[-3000:]
        assert not host.file(DATA_DIR).exists
        again = run_playbook("site.yml", NAME, {"mlflow_state": "absent", "mlflow_purge_data": True})
        assert again.returncode == 0 and re.search(rf"{NAME}\s*:.*changed=0", again.stdout), again.stdout[-3000:]

        # Nothing of MLflow is left on the host, not even the backups.
        assert host.run(f"rm -rf {BACKUP_DIR}").rc == 0
        restored = run_playbook("playbooks/restore.yml", NAME, {"mlflow_restore_src": f"{saved}/{newest}"})
        output = restored.stdout + restored.stderr
        assert restored.returncode == 0, output[-4000:]
    finally:
        shutil.rmtree(saved)

    # What the play reports it restored (in JSON or YAML, as the callback prints it).
    for role in ("backend", "artifacts"):
        assert re.search(rf"""['"]?role['"]?: ['"]?{role}\b""", output), (role, output[-3000:])
    runs = last_json(run_python(host, READ_BACK, URL, logged["run_id"]), host)
    assert runs[logged["run_id"]]["params"] == {"alpha": "0.5"}, runs
    assert runs[logged["run_id"]]["metrics"] == {"rmse": 0.125}, runs
    assert runs[logged["run_id"]]["artifact"] == logged["expected_artifact_content"], runs
    model = host.run(f"curl -sS '{URL}/api/2.0/mlflow/model-versions/get?name={logged['model_name']}&version=1'")
    assert json.loads(model.stdout)["model_version"]["run_id"] == logged["run_id"], model.stdout
    assert host.run("systemctl is-active mlflow.service mlflow-backup.timer mlflow-gc.timer").stdout.split() == [
        "active"] * 3


@pytest.mark.parametrize("bad", [{"mlflow_restore_src": "/nonexistent/mlflow-backup"}])
def test_a_restore_without_a_backup_stops_before_anything_changes(host, running_service, bad):
    pid = host.run("systemctl show mlflow -p MainPID --value").stdout.strip()
    result = run_playbook("playbooks/restore.yml", NAME, bad)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert "mlflow_restore_src must name a backup directory on the controller" in output, output[-3000:]
    assert host.run("systemctl show mlflow -p MainPID --value").stdout.strip() == pid

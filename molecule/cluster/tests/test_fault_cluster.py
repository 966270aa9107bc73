"""Fault matrix, the cluster's last rows (after test_3_sso.py): a balancer certificate that does not
match its key, and a PostgreSQL restore whose dump fails halfway, on mlflow-app-direct (its own
tracking and users databases). Each ends with what served before still serving, and no data lost.
"""

import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import tempfile
import uuid

from mlflow_testlib import READ_BACK, client_script, journal, other_host, run_playbook, run_python, var

testinfra_hosts = ["ansible://mlflow-lb"]

LB, DIRECT = "mlflow-lb", "mlflow-app-direct"
TLS = pathlib.Path(var(LB, "test_tls_dir"))
ADMIN = {"MLFLOW_TRACKING_USERNAME": var(DIRECT, "mlflow_auth_admin_username"),
         "MLFLOW_TRACKING_PASSWORD": var(DIRECT, "mlflow_auth_admin_password")}
# The client writes its artifacts to the bucket itself on this server (mlflow_serve_artifacts: false).
CLIENT = {**ADMIN, "MLFLOW_S3_ENDPOINT_URL": var(DIRECT, "mlflow_s3_endpoint_url"),
          "AWS_ACCESS_KEY_ID": var(DIRECT, "mlflow_s3_access_key_id"), "AWS_SECRET_ACCESS_KEY": "client-side-key",
          "AWS_DEFAULT_REGION": var(DIRECT, "mlflow_s3_region")}
LOCAL = f"http://127.0.0.1:{var(DIRECT, 'mlflow_port')}"
BACKUP_DIR = var(DIRECT, "mlflow_db_backup_dir")


def test_a_balancer_key_that_does_not_match_its_certificate_stops_before_anything_changes(host):
    pem = host.run("ls /etc/haproxy/tls/*.pem").stdout.split()
    assert pem, "the balancer has no certificate"
    before = {p: host.file(p).sha256sum for p in pem + ["/etc/haproxy/haproxy.cfg"]}
    pid = host.run("systemctl show haproxy -p MainPID --value").stdout.strip()
    result = run_playbook("site.yml", LB, {"mlflow_lb_tls_cert_src": str(TLS / "ca.crt")})
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert f"does not match mlflow_lb_tls_cert_src {TLS / 'ca.crt'}" in output, output[-3000:]
    assert re.search(rf"{LB}\s*:.*changed=0", output), output[-3000:]
    assert {p: host.file(p).sha256sum for p in before} == before
    assert host.run("systemctl show haproxy -p MainPID --value").stdout.strip() == pid
    assert host.run("curl -sS -o /dev/null -w '%{http_code}' -k -H 'Host: localhost' https://127.0.0.1/health").stdout == "200"


def log_run(direct, label):
    out = run_python(direct, client_script(), LOCAL, f"{label}-{uuid.uuid4().hex[:8]}", env=CLIENT)
    assert out.rc == 0, out.stderr + journal(direct)
    return json.loads(out.stdout.strip().splitlines()[-1])["run_id"]


def read_runs(direct, *run_ids):
    out = run_python(direct, READ_BACK, LOCAL, ",".join(run_ids), env=CLIENT)
    assert out.rc == 0, out.stderr + journal(direct)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_restore_whose_dump_fails_halfway_rolls_back_every_database_and_a_good_one_restores():
    direct = other_host(DIRECT)
    before = log_run(direct, "before-the-backup")
    assert direct.run("systemctl start mlflow-backup.service").rc == 0, journal(direct)
    newest = sorted(d for d in direct.run(f"ls -1 {BACKUP_DIR}").stdout.split() if "-before-" not in d)[-1]
    # Logged after the backup: a restore that replaced the tracking database would lose it.
    after = log_run(direct, "after-the-backup")

    saved = tempfile.mkdtemp(prefix="mlflow-fault-pg-")
    try:
        copy = subprocess.run(["docker", "cp", f"{DIRECT}:{BACKUP_DIR}/{newest}", saved], capture_output=True, text=True)
        assert copy.returncode == 0, copy.stderr
        good = f"{saved}/{newest}"
        bad = f"{saved}/damaged/{newest}"
        shutil.copytree(good, bad)
        manifest = json.loads(open(f"{bad}/manifest.json").read())
        assert [s["role"] for s in manifest["stores"]] == ["backend", "auth"], manifest
        # The users database, restored second, loses the end of its last table's data: its table of
        # contents reads, and pg_restore fails halfway through the data.
        last = manifest["stores"][-1]
        path = f"{bad}/{last['file']}"
        os.truncate(path, os.path.getsize(path) - 20)
        last["sha256"] = hashlib.sha256(open(path, "rb").read()).hexdigest()
        open(f"{bad}/manifest.json", "w").write(json.dumps(manifest))

        failed = run_playbook("playbooks/restore.yml", DIRECT, {"mlflow_restore_src": bad})
        output = failed.stdout + failed.stderr
        assert failed.returncode != 0, output[-3000:]
        message = output[output.index("The restore was not applied"):]
        assert "rolled back in every database" in message, message[:3000]
        assert "Nothing was changed, and MLflow answers OK on /health again" in message, message[:3000]
        # Both databases as they were: both runs, read as the admin (whom the users database knows).
        runs = read_runs(direct, before, after)
        assert runs[before]["params"] == runs[after]["params"] == {"alpha": "0.5"}, runs

        restored = run_playbook("playbooks/restore.yml", DIRECT, {"mlflow_restore_src": good})
        assert restored.returncode == 0, (restored.stdout + restored.stderr)[-3000:]
    finally:
        shutil.rmtree(saved)
    # The backup's content: the run logged before it, not the one logged after.
    runs = read_runs(direct, before, after)
    assert runs[before]["params"] == {"alpha": "0.5"}, runs
    assert runs[after].get("error") == "RESOURCE_DOES_NOT_EXIST", runs
    assert direct.run(f"curl -sS {LOCAL}/health").stdout.strip() == "OK"

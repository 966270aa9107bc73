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

from mlflow_testlib import READ_BACK, client_script, journal, other_host, run_playbook, run_python, var

testinfra_hosts = ["ansible://mlflow-lb"]

LB, DIRECT = "mlflow-lb", "mlflow-app-direct"
TLS = pathlib.Path(var(LB, "test_tls_dir"))
ADMIN = {"MLFLOW_TRACKING_USERNAME": var(DIRECT, "mlflow_auth_admin_username"),
         "MLFLOW_TRACKING_PASSWORD": var(DIRECT, "mlflow_auth_admin_password")}
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


def test_a_restore_whose_dump_fails_halfway_rolls_back_every_database():
    direct = other_host(DIRECT)
    assert direct.run("systemctl start mlflow-backup.service").rc == 0, journal(direct)
    newest = sorted(d for d in direct.run(f"ls -1 {BACKUP_DIR}").stdout.split() if "-before-" not in d)[-1]
    # Logged after the backup: a restore that replaced the tracking database would lose it.
    logged = run_python(direct, client_script(), LOCAL, "after-the-backup", env=ADMIN)
    assert logged.rc == 0, logged.stderr + journal(direct)
    run_id = json.loads(logged.stdout.strip().splitlines()[-1])["run_id"]

    saved = tempfile.mkdtemp(prefix="mlflow-fault-pg-")
    try:
        copy = subprocess.run(["docker", "cp", f"{DIRECT}:{BACKUP_DIR}/{newest}", saved], capture_output=True, text=True)
        assert copy.returncode == 0, copy.stderr
        source = f"{saved}/{newest}"
        manifest = json.loads(open(f"{source}/manifest.json").read())
        assert [s["role"] for s in manifest["stores"]] == ["backend", "auth"], manifest
        # The users database, restored second, loses the end of its last table's data: its table of
        # contents reads, and pg_restore fails halfway through the data.
        last = manifest["stores"][-1]
        path = f"{source}/{last['file']}"
        os.truncate(path, os.path.getsize(path) - 20)
        last["sha256"] = hashlib.sha256(open(path, "rb").read()).hexdigest()
        open(f"{source}/manifest.json", "w").write(json.dumps(manifest))
        result = run_playbook("playbooks/restore.yml", DIRECT, {"mlflow_restore_src": source})
    finally:
        shutil.rmtree(saved)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    message = output[output.index("The restore was not applied"):]
    assert "rolled back in every database" in message, message[:3000]
    assert "Nothing was changed, and MLflow answers OK on /health again" in message, message[:3000]

    # Both databases as they were: the run logged after the backup, read as the admin (users database).
    out = run_python(direct, READ_BACK, LOCAL, run_id, env=ADMIN)
    assert out.rc == 0, out.stderr + journal(direct)
    assert json.loads(out.stdout.strip().splitlines()[-1])[run_id]["params"] == {"alpha": "0.5"}
    assert direct.run(f"curl -sS {LOCAL}/health").stdout.strip() == "OK"

"""mlflow-airgap, hardened: authentication, TLS, exposure controls and hardening, checked with real clients
(tests/test_airgap.py checks the air-gapped install of the same host)."""

import json
import pathlib
import re
import uuid

import pytest
from mlflow_testlib import client_script, install_test_ca, journal, require_running, run_playbook, run_python, var

NAME = "mlflow-airgap"
testinfra_hosts = [f"ansible://{NAME}"]
ADMIN_USER = var(NAME, "mlflow_auth_admin_username")
ADMIN_PASSWORD = var(NAME, "mlflow_auth_admin_password")
SECRET_KEY = var(NAME, "mlflow_auth_secret_key")
PORT = var(NAME, "mlflow_port")
URL = f"https://{NAME}:{PORT}"
CA = "/root/molecule-ca.crt"
ADMIN = {"MLFLOW_TRACKING_USERNAME": ADMIN_USER, "MLFLOW_TRACKING_PASSWORD": ADMIN_PASSWORD,
         "MLFLOW_TRACKING_SERVER_CERT_PATH": CA}


@pytest.fixture(scope="module", autouse=True)
def ca_on_host(host):
    """The test CA, so that clients on the host verify the server's certificate."""
    install_test_ca(host, CA)
    require_running(host)


def http(host, method, path, user=None, password=None, body=None, headers=None, verify=CA):
    """One request with the env's `requests`; returns (status, text)."""
    script = f"""
import json, requests, sys
auth = ({user!r}, {password!r}) if {user!r} else None
r = requests.request({method!r}, {URL!r} + {path!r}, auth=auth, json={body!r}, headers={headers or {}!r},
                     verify={verify!r}, timeout=30)
print(json.dumps([r.status_code, r.text]))
"""
    out = run_python(host, script)
    assert out.rc == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


CACHE_PROBE = """
import json, os, sys, time
import requests, werkzeug.security as ws

def server_cpu():
    # CPU seconds of the service user's processes (the server's), from /proc/<pid>/stat (utime + stime).
    total = 0
    for pid in os.popen("pgrep -u mlflow").read().split():
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")

# What one check of a password costs here: werkzeug's default hash, as MLflow's basic-auth app stores it.
stored = ws.generate_password_hash("a-password")
t0 = time.process_time()
for _ in range(3):
    ws.check_password_hash(stored, "a-password")
check = (time.process_time() - t0) / 3

url, user, password, ca, n = sys.argv[1], sys.argv[2], os.environ["PROBE_PASSWORD"], sys.argv[3], int(sys.argv[4])
session = requests.Session()
session.auth, session.verify = (user, password), ca
# One keep-alive connection, so one worker; its first request checks the password (and fills its cache).
session.get(url, timeout=30).raise_for_status()
before = server_cpu()
for _ in range(n):
    session.get(url, timeout=30).raise_for_status()
print(json.dumps({"check_s": check, "server_cpu_s": server_cpu() - before, "requests": n}))
"""


def test_a_checked_password_is_trusted_for_the_cache_ttl(host):
    """mlflow_auth_cache_ttl reaches the basic-auth app: with it, a worker checks a password's scrypt hash
    once per TTL; without it (0), on every request. Measured as the CPU the server's processes spend on
    authenticated requests, against the cost of one hash check on the same host."""
    ttl = var(NAME, "mlflow_auth_cache_ttl")
    assert f"auth_cache_ttl_seconds = {ttl}" in host.file("/etc/mlflow/basic_auth.ini").content_string
    requests_ = 40
    out = run_python(host, CACHE_PROBE, f"{URL}/api/2.0/mlflow/experiments/get?experiment_id=0", ADMIN_USER, CA,
                     str(requests_), env={"PROBE_PASSWORD": ADMIN_PASSWORD})
    assert out.rc == 0, out.stderr + journal(host)
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{requests_} authenticated requests: {probe['server_cpu_s']:.2f} s of the server's CPU; "
          f"one password check: {probe['check_s'] * 1000:.0f} ms")
    every_request = requests_ * probe["check_s"]
    if ttl > 0:
        assert probe["server_cpu_s"] < every_request / 2, probe
    else:
        assert probe["server_cpu_s"] > every_request / 2, probe


def test_https_health_verifies_against_the_ca(host):
    out = host.run(f"curl -sS --cacert {CA} {URL}/health")
    assert out.rc == 0, out.stderr + journal(host)
    assert out.stdout.strip() == "OK"


def test_plain_http_is_refused(host):
    out = host.run(f"curl -sS --max-time 10 http://127.0.0.1:{PORT}/health")
    assert out.stdout.strip() != "OK"
    assert out.rc != 0


def test_an_untrusted_client_rejects_the_certificate(host):
    out = host.run(f"curl -sS --max-time 10 {URL}/health")
    assert out.rc == 60, out.stderr  # curl: peer certificate cannot be authenticated


def test_anonymous_requests_get_401(host):
    status, _ = http(host, "GET", "/api/2.0/mlflow/experiments/search?max_results=1")
    assert status == 401


def test_wrong_password_gets_401(host):
    status, _ = http(host, "GET", "/api/2.0/mlflow/experiments/search?max_results=1",
                     ADMIN_USER, "not-the-password")
    assert status == 401


def test_unlisted_host_header_gets_403(host):
    status, _ = http(host, "GET", "/api/2.0/mlflow/experiments/search?max_results=1",
                     ADMIN_USER, ADMIN_PASSWORD, headers={"Host": "attacker.example"})
    assert status == 403


def test_admin_round_trip_over_https(host):
    suffix = uuid.uuid4().hex[:8]
    out = run_python(host, client_script(), URL, suffix, env=ADMIN)
    assert out.rc == 0, out.stdout + out.stderr + journal(host)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["params"] == {"alpha": "0.5"}
    assert result["artifact_content"] == result["expected_artifact_content"]
    assert result["model_status"] == "READY"


def test_a_read_only_user_reads_but_cannot_write(host):
    name = f"exp-{uuid.uuid4().hex[:8]}"
    status, text = http(host, "POST", "/api/2.0/mlflow/experiments/create", ADMIN_USER, ADMIN_PASSWORD,
                        {"name": name})
    assert status == 200, text
    experiment_id = json.loads(text)["experiment_id"]

    reader, reader_password = f"reader-{uuid.uuid4().hex[:6]}", "Reader-Password-4711"
    status, text = http(host, "POST", "/api/2.0/mlflow/users/create", ADMIN_USER, ADMIN_PASSWORD,
                        {"username": reader, "password": reader_password})
    assert status == 200, text

    status, text = http(host, "GET", f"/api/2.0/mlflow/experiments/get?experiment_id={experiment_id}",
                        reader, reader_password)
    assert status == 200, text
    assert json.loads(text)["experiment"]["name"] == name

    status, text = http(host, "POST", "/api/2.0/mlflow/runs/create", reader, reader_password,
                        {"experiment_id": experiment_id})
    assert status == 403, text
    status, text = http(host, "POST", "/api/2.0/mlflow/experiments/update", reader, reader_password,
                        {"experiment_id": experiment_id, "new_name": name + "-renamed"})
    assert status == 403, text


def test_auth_and_tls_files_are_readable_by_the_service_group_only(host):
    for path in ("/etc/mlflow/basic_auth.ini", "/etc/mlflow/mlflow.env", "/etc/mlflow/tls/server.key"):
        f = host.file(path)
        assert (f.user, f.group, f.mode) == ("root", "mlflow", 0o640), path
    assert host.file("/etc/mlflow/tls").mode == 0o750
    ini = host.file("/etc/mlflow/basic_auth.ini").content_string
    assert f"default_permission = {var(NAME, 'mlflow_auth_default_permission')}" in ini
    assert "database_uri = sqlite:////var/lib/mlflow/basic_auth.db" in ini
    assert ADMIN_PASSWORD not in ini


def test_no_secret_is_world_readable(host):
    readable = host.run("find /etc/mlflow /var/lib/mlflow -type f -perm -o+r").stdout.split()
    assert set(readable) <= {"/etc/mlflow/ca-bundle.pem"}, readable
    assert host.run("find /etc/mlflow /var/lib/mlflow /opt/miniconda3 -xdev -perm -o+w ! -type l").stdout == ""


def test_secrets_are_in_the_environment_file_only(host):
    env = host.run("cat /etc/mlflow/mlflow.env").stdout
    assert f'MLFLOW_AUTH_ADMIN_PASSWORD="{ADMIN_PASSWORD}"' in env
    assert f'MLFLOW_FLASK_SERVER_SECRET_KEY="{SECRET_KEY}"' in env
    unit = host.file("/etc/systemd/system/mlflow.service").content_string
    assert "--app-name basic-auth" in unit
    assert ADMIN_PASSWORD not in unit and SECRET_KEY not in unit
    journal_text = host.run("journalctl --no-pager -o cat").stdout
    assert ADMIN_PASSWORD not in journal_text and SECRET_KEY not in journal_text


def test_systemd_sandbox_exposure_is_at_most_1_5(host):
    out = host.run("systemd-analyze security mlflow.service --no-pager")
    match = re.search(r"Overall exposure level for mlflow.service: ([0-9.]+)", out.stdout)
    assert match, out.stdout + out.stderr
    exposure = float(match.group(1))
    print(f"systemd-analyze security mlflow.service: exposure {exposure}")
    assert exposure <= 1.5, out.stdout


def test_user_namespacing_is_switched_by_facts(host):
    unit = host.file("/etc/systemd/system/mlflow.service").content_string
    # This host is a container: PrivateUsers= cannot work here and must be absent.
    assert host.run("systemd-detect-virt --container").rc == 0
    assert "PrivateUsers=" not in unit
    for option in ("ProtectSystem=strict", "NoNewPrivileges=yes", "CapabilityBoundingSet=",
                   "SystemCallFilter=@system-service", "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6"):
        assert option in unit


def test_a_key_that_does_not_match_its_certificate_stops_before_anything_changes(host):
    """Found in preflight, on the controller, not by a restart that crash-loops (fault matrix)."""
    tls = pathlib.Path(var(NAME, "test_tls_dir"))
    before = {p: host.file(p).sha256sum for p in ("/etc/mlflow/mlflow.env", "/etc/mlflow/tls/server.crt",
                                                 "/etc/mlflow/tls/server.key", "/etc/systemd/system/mlflow.service")}
    pid = host.run("systemctl show mlflow -p MainPID --value").stdout.strip()
    # The CA's certificate with the server's key: a pair that does not match.
    result = run_playbook("site.yml", NAME, {"mlflow_tls_cert_src": str(tls / "ca.crt")})
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert "TASK [mlflow : Assert that the TLS certificate and its key make a pair that can serve]" in output
    assert f"does not match mlflow_tls_cert_src {tls / 'ca.crt'}" in output, output[-3000:]
    assert re.search(rf"{NAME}\s*:.*changed=0", output), output[-3000:]
    assert {p: host.file(p).sha256sum for p in before} == before
    assert host.run("systemctl show mlflow -p MainPID --value").stdout.strip() == pid
    assert host.run(f"curl -sS --cacert {CA} {URL}/health").stdout.strip() == "OK"

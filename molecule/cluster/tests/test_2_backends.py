"""PostgreSQL backend, S3 artifacts (proxied and direct), the schema upgrade, and secrets.

Runs after test_1_changes_under_load.py has taken every server to the role's release, against
mlflow-app-1; the other instances are reached with other_host().
"""

import base64
import json
import os
import pathlib
import re
import time
import urllib.parse
import uuid

import pytest
from mlflow_testlib import (client_script, env_python, group_hosts, journal, other_host, require_running, role_defaults,
                            run_playbook, run_python, var)

testinfra_hosts = ["ansible://mlflow-app-1"]

APP, DIRECT = "mlflow-app-1", "mlflow-app-direct"
DB_PASSWORD = var(APP, "mlflow_db_password")
S3_SECRET = var(APP, "mlflow_s3_secret_access_key")
ADMIN_PASSWORD = var(APP, "mlflow_auth_admin_password")
SECRET_KEY = var(APP, "mlflow_auth_secret_key")
SECRETS = [DB_PASSWORD, S3_SECRET, ADMIN_PASSWORD, SECRET_KEY]
ADMIN = {"MLFLOW_TRACKING_USERNAME": var(APP, "mlflow_auth_admin_username"), "MLFLOW_TRACKING_PASSWORD": ADMIN_PASSWORD}
BUCKET = var(APP, "mlflow_s3_bucket")
S3_KEY_ID = var(APP, "mlflow_s3_access_key_id")
OLD_VERSION = var(APP, "mlflow_version")  # what converge deployed
SCHEMA_VERSION = var(APP, "test_new_schema_mlflow_version")  # the release that migrated the schema
NEW_VERSION = role_defaults("mlflow")["mlflow_version"]  # where the tests left the servers behind the balancer
DB_HOST = var(APP, "mlflow_db_host")
LOCAL = f"http://127.0.0.1:{var(APP, 'mlflow_port')}"


@pytest.fixture(scope="module")
def db():
    return other_host("mlflow-db")


@pytest.fixture(scope="module")
def s3():
    return other_host("mlflow-s3")


@pytest.fixture(scope="module")
def direct():
    return other_host(DIRECT)


@pytest.fixture(scope="module")
def second():
    return other_host("mlflow-app-2")


def psql_db(db, database, sql):
    out = db.run(f"runuser -u postgres -- psql -d {database} -tAc \"{sql}\"")
    assert out.rc == 0, out.stderr
    return out.stdout.strip()


def psql(db, sql):
    return psql_db(db, "mlflow", sql)


def s3_object(s3, key):
    script = (
        "import boto3,sys; c=boto3.client('s3', endpoint_url='http://127.0.0.1:9000', region_name='us-east-1',"
        " aws_access_key_id='k', aws_secret_access_key='s');"
        f" sys.stdout.write(c.get_object(Bucket='{BUCKET}', Key='{key}')['Body'].read().decode())"
    )
    return s3.run(f"/opt/s3-test-endpoint/bin/python -c \"{script}\"")


def round_trip(host, env=None):
    suffix = uuid.uuid4().hex[:8]
    out = run_python(host, client_script(), LOCAL, suffix, env={**ADMIN, **(env or {})})
    assert out.rc == 0, out.stdout + out.stderr + journal(host)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_secrets_are_literal_and_distinct():
    """The leak checks below are only as good as their inputs."""
    assert len(set(SECRETS)) == len(SECRETS) and all(len(s) >= 12 for s in SECRETS)


def test_every_server_runs_the_new_mlflow(host, second, direct):
    assert NEW_VERSION != OLD_VERSION
    # The direct server, outside the balancer and with databases of its own, was left alone.
    for h, expected in ((host, NEW_VERSION), (second, NEW_VERSION), (direct, OLD_VERSION)):
        require_running(h)
        assert h.run(f"curl -sS {LOCAL}/health").stdout.strip() == "OK", journal(h)
        version = h.run(f"{env_python(APP)} -m pip show mlflow").stdout
        assert f"Version: {expected}" in version


def test_the_env_of_the_previous_release_is_kept_for_a_rollback(host):
    prefix = f"{var(APP, 'mlflow_conda_prefix')}/envs/{var(APP, 'mlflow_conda_env_name')}"
    kept = host.file(f"{prefix}.previous")
    assert kept.is_symlink and kept.linked_to.startswith(f"{prefix}-{SCHEMA_VERSION}-"), kept.linked_to
    assert host.file(f"{kept.linked_to}/bin/mlflow").exists
    assert host.file(prefix).linked_to.startswith(f"{prefix}-{NEW_VERSION}-")
    # The env of the first release (two upgrades ago) is deleted, in the background: nothing else
    # is left in envs/ once that is done.
    envs = pathlib.PurePath(prefix).parent
    expected = sorted(pathlib.PurePath(p).name for p in (prefix, f"{prefix}.previous", kept.linked_to,
                                                         host.file(prefix).linked_to))
    deadline = time.monotonic() + 120
    while (listing := sorted(host.run(f"ls -A {envs}").stdout.split())) != expected and time.monotonic() < deadline:
        time.sleep(2)
    assert listing == expected


def test_backend_uri_has_no_password_and_the_password_is_in_pgpassword(host):
    env = host.file("/etc/mlflow/mlflow.env")
    assert env.mode == 0o640 and env.group == "mlflow"
    content = host.run("cat /etc/mlflow/mlflow.env").stdout
    uri = [line for line in content.splitlines() if line.startswith("MLFLOW_BACKEND_STORE_URI=")][0]
    assert uri == f'MLFLOW_BACKEND_STORE_URI="postgresql+psycopg2://mlflow@{DB_HOST}:5432/mlflow?sslmode=prefer"'
    assert f'PGPASSWORD="{DB_PASSWORD}"' in content
    # Each worker's pool is its share of the connection budget; it admits one request fewer.
    workers = int(re.search(r'^MLFLOW_WORKERS="(\d+)"', content, re.M).group(1))
    share = (var(APP, "mlflow_db_connection_budget") - 3) // workers
    pool = min(var(APP, "mlflow_db_pool_size"), share - 1)
    assert f'MLFLOW_SQLALCHEMYSTORE_POOL_SIZE="{pool}"' in content
    assert f'MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW="{share - pool}"' in content
    assert f'MLFLOW_SQLALCHEMYSTORE_POOL_RECYCLE="{var(APP, "mlflow_db_pool_recycle")}"' in content
    assert f"--limit-concurrency={share - 1}" in content


def test_postgresql_accepts_the_connection_budget_of_every_server(db):
    """The database admits what every MLflow server of its clients group may hold at once, plus room for
    backups, migrations and administration."""
    servers = ["mlflow-app-1", "mlflow-app-2", DIRECT]
    assert set(servers) == set(group_hosts("mlflow"))
    wanted = max(100, 30 + sum(var(s, "mlflow_db_connection_budget") for s in servers))
    assert psql(db, "show max_connections") == str(wanted)


def test_artifact_modes_are_configured(host, direct):
    proxied = host.run("cat /etc/mlflow/mlflow.env").stdout
    assert 'MLFLOW_SERVE_ARTIFACTS="true"' in proxied
    assert f'MLFLOW_ARTIFACTS_DESTINATION="s3://{BUCKET}/proxied"' in proxied
    assert f'MLFLOW_S3_ENDPOINT_URL="{var(APP, "mlflow_s3_endpoint_url")}"' in proxied
    direct_env = direct.run("cat /etc/mlflow/mlflow.env").stdout
    assert 'MLFLOW_SERVE_ARTIFACTS="false"' in direct_env
    assert f'MLFLOW_DEFAULT_ARTIFACT_ROOT="s3://{BUCKET}/direct"' in direct_env
    assert "MLFLOW_ARTIFACTS_DESTINATION" not in direct_env


def test_proxied_round_trip_lands_in_postgresql_and_the_bucket(host, db, s3):
    result = round_trip(host)
    assert result["params"] == {"alpha": "0.5"}
    assert result["metric_history"] == [[0, 0.25], [1, 0.125]]
    assert result["artifact_uri"].startswith("mlflow-artifacts:")
    assert result["artifact_content"] == result["expected_artifact_content"]
    assert result["model_status"] == "READY"

    assert psql(db, f"select count(*) from runs where run_uuid = '{result['run_id']}'") == "1"
    assert psql(db, f"select value from params where run_uuid = '{result['run_id']}' and key = 'alpha'") == "0.5"
    assert psql(db, f"select count(*) from model_versions where run_id = '{result['run_id']}'") == "1"

    key = f"proxied/{result['experiment_id']}/{result['run_id']}/artifacts/docs/notes.txt"
    obj = s3_object(s3, key)
    assert obj.rc == 0, obj.stderr
    assert obj.stdout == result["expected_artifact_content"]
    # Nothing was written to the local disk of the server instead.
    assert not host.file(f"/var/lib/mlflow/artifacts/{result['experiment_id']}").exists


def test_direct_round_trip_writes_to_the_bucket_from_the_client(direct, db, s3):
    client_env = {
        "MLFLOW_S3_ENDPOINT_URL": var(APP, "mlflow_s3_endpoint_url"),
        "AWS_ACCESS_KEY_ID": S3_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": "client-side-key",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    result = round_trip(direct, env=client_env)
    assert result["artifact_uri"].startswith(f"s3://{BUCKET}/direct/")
    assert result["artifact_content"] == result["expected_artifact_content"]
    database = urllib.parse.urlsplit(var(DIRECT, "mlflow_backend_store_uri")).path.strip("/")
    assert psql_db(db, database, f"select count(*) from runs where run_uuid = '{result['run_id']}'") == "1"
    key = f"direct/{result['experiment_id']}/{result['run_id']}/artifacts/docs/notes.txt"
    obj = s3_object(s3, key)
    assert obj.rc == 0, obj.stderr
    assert obj.stdout == result["expected_artifact_content"]


def test_uris_without_a_driver_get_the_one_the_env_installs(direct):
    """postgresql:// would make SQLAlchemy 2.1 load psycopg 3, which the env does not have: the
    server would not start. The role names psycopg2, the driver MLflow's images ship."""
    env = direct.file("/etc/mlflow/mlflow.env").content_string
    ini = direct.file("/etc/mlflow/basic_auth.ini").content_string
    for key, written in (("mlflow_backend_store_uri", env), ("mlflow_auth_database_uri", ini)):
        given = var(DIRECT, key)
        assert given.startswith("postgresql://")
        assert given.replace("postgresql://", "postgresql+psycopg2://", 1) in written, key
    assert direct.run(f"curl -s http://127.0.0.1:{var(DIRECT, 'mlflow_port')}/health").stdout == "OK"


def test_a_wrong_database_password_is_rolled_back_to_the_configuration_that_served(direct):
    """Only the running server finds a wrong password out: it exits at start; the play puts the last
    configuration that served back, restarts it, and fails naming the cause. Nothing logged is lost."""
    local = f"http://127.0.0.1:{var(DIRECT, 'mlflow_port')}"
    # Runs and metrics (the direct host's artifacts go to S3 from the client, which needs S3 keys).
    logged = run_python(direct, f"""
from mlflow.tracking import MlflowClient
c = MlflowClient("{local}")
run = c.create_run(c.create_experiment("before-a-bad-password-{uuid.uuid4().hex[:8]}"))
c.log_param(run.info.run_id, "alpha", "0.5")
c.log_metric(run.info.run_id, "loss", 0.25)
print(run.info.run_id)
""", env=ADMIN)
    assert logged.rc == 0, logged.stderr[-3000:]
    run_id = logged.stdout.strip().splitlines()[-1]
    files = ("/etc/mlflow/mlflow.env", "/etc/mlflow/basic_auth.ini", "/etc/systemd/system/mlflow.service")
    before = {p: direct.file(p).sha256sum for p in files}
    wrong = f"Wrong-Pg-Password-{uuid.uuid4().hex[:8]}"

    result = run_playbook("site.yml", DIRECT, {"mlflow_db_password": wrong})
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert wrong not in output, "the password given reached the play's output"
    assert "TASK [mlflow : Go back to the last configuration that served]" in output, output[-3000:]
    message = output[output.index("The change was not applied"):]
    # Found out at once (MLflow retries a refused login for minutes), not after mlflow_health_timeout.
    assert "cannot connect to its database" in message and "answers OK on /health again" in message, message[:3000]
    assert "password authentication failed" in message, message[:3000]

    # On disk and running: the configuration that served before.
    assert {p: direct.file(p).sha256sum for p in files} == before
    assert direct.run(f"curl -s {local}/health").stdout == "OK"
    same = direct.run("python3 -c \"import os, subprocess; "
                      "pid = subprocess.run(['systemctl', 'show', 'mlflow', '-p', 'MainPID', '--value'], "
                      "capture_output=True, text=True).stdout.strip(); "
                      "running = [l for l in open(f'/proc/{pid}/environ').read().split(chr(0)) if l.startswith('PGPASSWORD=')]; "
                      "written = [l.replace(chr(34), '') for l in open('/etc/mlflow/mlflow.env').read().splitlines() "
                      "if l.startswith('PGPASSWORD=')]; print(running == written and len(running) == 1)\"")
    assert same.stdout.strip() == "True", same.stdout + same.stderr
    read = f"""
from mlflow.tracking import MlflowClient
print(MlflowClient("{local}").get_run("{run_id}").data.params)
"""
    out = run_python(direct, read, env=ADMIN)
    assert out.rc == 0 and "alpha" in out.stdout, out.stderr


def test_the_schema_was_migrated_once_for_the_shared_database(host, direct, db):
    logs = [h.run("cat /var/lib/mlflow/db-migrations.log").stdout
            for h in (host, other_host("mlflow-app-2"), direct)]
    everything = [line for log in logs for line in log.splitlines() if line.strip()]
    # Every store was migrated at most once, whichever host did it.
    stores = [line.split(" store ")[1].split(" from ")[0] for line in everything]
    assert len(stores) == len(set(stores)), everything
    lines = [line for line in everything if " tracking store " in line]
    assert len(lines) == 1, everything
    assert f"with mlflow {SCHEMA_VERSION}" in lines[0]
    assert f"mlflow@{DB_HOST}:5432/mlflow" in lines[0]
    assert DB_PASSWORD not in lines[0]
    status = host.run(
        "systemd-run --quiet --pipe --wait --collect --uid=mlflow --gid=mlflow"
        " --property=EnvironmentFile=/etc/mlflow/mlflow.env --working-directory=/var/lib/mlflow"
        f" {env_python(APP)} /usr/local/libexec/mlflow/mlflow_db.py status"
    )
    assert status.rc == 0, status.stderr
    store = json.loads(status.stdout)["stores"][0]
    assert store["state"] == "current"
    assert lines[0].rstrip().split(" to ")[1].startswith(store["latest"])
    assert psql(db, "select version_num from alembic_version") == store["latest"]


def test_a_backup_was_taken_before_the_migration(host, direct):
    """Every database of the server (tracking and users), by the backup helper: no password on a
    command line (test_1 samples them), a manifest with each dump's schema revision."""
    made = [
        (h, f.strip())
        for h in (host, other_host("mlflow-app-2"), direct)
        for f in h.run("ls /var/backups/mlflow/ 2>/dev/null").stdout.splitlines()
        if f.strip().endswith(f"-before-mlflow-{SCHEMA_VERSION}")
    ]
    # One host took them (the migrator), once per attempt (test_0 failed one on purpose): the newest.
    assert made and len({h for h, _ in made}) == 1, made
    h, name = sorted(made, key=lambda m: m[1])[-1]
    manifest = json.loads(h.file(f"/var/backups/mlflow/{name}/manifest.json").content_string)
    assert sorted(store["role"] for store in manifest["stores"]) == ["auth", "backend"], manifest
    for store in manifest["stores"]:
        assert store["engine"] == "postgresql" and store["revision"], store
        listing = h.run(f"pg_restore --list /var/backups/mlflow/{name}/{store['file']}")
        assert listing.rc == 0, listing.stderr
        assert ("TABLE public runs" if store["role"] == "backend" else "TABLE public users") in listing.stdout
        f = h.file(f"/var/backups/mlflow/{name}/{store['file']}")
        assert f.user == "mlflow" and f.mode & 0o007 == 0


def test_the_shared_database_is_backed_up_by_one_of_its_servers(host, second, direct):
    """mlflow-app-1 is the first server of the shared database in the group mlflow; mlflow-app-direct
    has databases of its own. The dumps restore (pg_restore reads them), S3 artifacts are named, not copied."""
    assert host.run("systemctl is-enabled mlflow-backup.timer").stdout.strip() == "enabled"
    assert second.run("systemctl cat mlflow-backup.timer").rc != 0
    assert direct.run("systemctl is-enabled mlflow-backup.timer").stdout.strip() == "enabled"
    started = host.run("systemctl start mlflow-backup.service")
    log = host.run("journalctl -u mlflow-backup --no-pager -o cat").stdout
    assert started.rc == 0, started.stderr + log[-3000:]
    for secret in SECRETS:
        assert secret not in log
    backup_dir = var(APP, "mlflow_db_backup_dir")
    newest = sorted(d for d in host.run(f"ls -1 {backup_dir}").stdout.split() if "-before-" not in d)[-1]
    manifest = json.loads(host.file(f"{backup_dir}/{newest}/manifest.json").content_string)
    assert [(s["role"], s["engine"]) for s in manifest["stores"]] == [("backend", "postgresql"), ("auth", "postgresql")]
    assert manifest["artifacts"] == {"destination": f"s3://{BUCKET}/{var(APP, 'mlflow_s3_prefix')}", "file": None}
    assert DB_PASSWORD not in host.file(f"{backup_dir}/{newest}/manifest.json").content_string
    for store, table in zip(manifest["stores"], ("runs", "users")):
        path = f"{backup_dir}/{newest}/{store['file']}"
        assert host.file(path).sha256sum == store["sha256"]
        listing = host.run(f"pg_restore --list {path}")
        assert listing.rc == 0 and f"TABLE public {table} " in listing.stdout, listing.stdout[-2000:] + listing.stderr


def test_data_logged_before_the_upgrade_reads_back(host, s3):
    before = json.loads(host.file("/root/before-upgrade.json").content_string)
    reader = f"""
import json, sys, tempfile
from mlflow.tracking import MlflowClient
c = MlflowClient("{LOCAL}")
run = c.get_run("{before['run_id']}")
with tempfile.TemporaryDirectory() as tmp:
    content = open(c.download_artifacts(run.info.run_id, "docs/notes.txt", tmp)).read()
mv = c.get_model_version("{before['model_name']}", "{before['model_version']}")
exp = c.get_experiment("{before['experiment_id']}")
print(json.dumps({{"params": run.data.params, "metrics": run.data.metrics,
    "history": [[m.step, m.value] for m in sorted(c.get_metric_history(run.info.run_id, "rmse"), key=lambda m: m.step)],
    "content": content, "model_run_id": mv.run_id, "experiment": exp.name}}))
"""
    out = run_python(host, reader, env=ADMIN)
    assert out.rc == 0, out.stderr + journal(host)
    after = json.loads(out.stdout.strip().splitlines()[-1])
    assert after["params"] == before["params"]
    assert after["metrics"] == before["metrics"]
    assert after["history"] == before["metric_history"]
    assert after["content"] == before["expected_artifact_content"]
    assert after["model_run_id"] == before["run_id"]
    assert after["experiment"] == before["experiment_name"]


# The secrets reach the scanner base64-encoded, so that its own command line does not carry them.
CMDLINE_SCAN = """
import base64, glob, json, sys
secrets = base64.b64decode(sys.argv[1]).decode().split()
hits, scanned = [], 0
for path in glob.glob("/proc/[0-9]*/cmdline"):
    try:
        cmd = open(path, "rb").read().replace(b"\\0", b" ").decode(errors="replace")
    except OSError:
        continue
    scanned += 1
    hits += [cmd for s in secrets if s in cmd]
print(json.dumps({"scanned": scanned, "hits": hits}))
"""


HOSTS = ["mlflow-app-1", "mlflow-app-2", "mlflow-app-direct", "mlflow-db", "mlflow-lb"]


@pytest.mark.parametrize("name", HOSTS)
def test_no_secret_in_any_process_command_line(name):
    h = other_host(name)
    encoded = base64.b64encode(" ".join(SECRETS).encode()).decode()
    out = h.run(f"python3 -c '{CMDLINE_SCAN}' {encoded}")
    assert out.rc == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["scanned"] > 5
    assert result["hits"] == []


@pytest.mark.parametrize("name", HOSTS)
def test_no_secret_in_the_journal(name):
    h = other_host(name)
    text = h.run("journalctl --no-pager -o cat").stdout
    assert "mlflow" in text.lower() or name in ("mlflow-db", "mlflow-lb")
    for secret in SECRETS:
        assert secret not in text


def test_no_secret_in_the_ansible_output():
    """Every play that ran (prepare, converge, and the tests' own), with --diff, is in the log.

    testinfra's own inventory dumps land there too (it lists the inventory, test secrets
    included): only the records of a process from a `PLAY [` to its `PLAY RECAP` are searched. Not
    every record of a pid that once ran a play: over a run this long the kernel hands the same
    pid (pid_max 32768 here) to a later inventory dump.
    """
    log_path = os.path.join(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"], "ansible.log")
    records, playing = [], {}
    with open(log_path) as f:
        for line in f:
            match = re.match(r"^\d{4}-\d\d-\d\d [\d:,]+ p=(\d+) ", line)
            if match:
                pid = match.group(1)
                if "PLAY [" in line:
                    playing[pid] = True
                records.append([playing.get(pid, False), line])
                if "PLAY RECAP" in line:
                    playing[pid] = False
            elif records:
                records[-1][1] += line
    text = "".join(body for in_play, body in records if in_play)
    assert "PLAY RECAP" in text and "Migrate the database schema" in text, "the converge output was logged"
    for secret in SECRETS:
        assert secret not in text


def test_users_live_in_their_own_postgresql_database(host, db):
    auth_db = var(APP, "mlflow_auth_db_name")
    admin = ADMIN["MLFLOW_TRACKING_USERNAME"]
    assert psql_db(db, auth_db, f"select is_admin from users where username = '{admin}'") == "t"
    assert psql_db(db, auth_db, "select count(*) from alembic_version_auth") == "1"
    ini = host.file("/etc/mlflow/basic_auth.ini")
    assert ini.mode == 0o640 and ini.user == "root" and ini.group == "mlflow"
    assert f"database_uri = postgresql+psycopg2://mlflow@{DB_HOST}:5432/{var(APP, 'mlflow_auth_db_name')}" in ini.content_string


def test_anonymous_requests_are_refused(host):
    code = host.run("curl -s -o /dev/null -w '%{http_code}' "
                    f"'{LOCAL}/api/2.0/mlflow/experiments/search?max_results=1'")
    assert code.stdout == "401"

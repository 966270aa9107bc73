"""Fault matrix, the cluster's first row: a schema migration that fails on the shared database.

Runs before test_1_changes_under_load.py, while the servers behind the balancer still run the release
converge deployed, and leaves them so. The migrator stops every server of the database before it
migrates; when the migration fails, every one of them must come back on the release that serves the
schema actually in the database (the migration ran in one transaction, so the old one).
"""

import json
import uuid

from mlflow_testlib import READ_BACK, client_script, journal, other_host, run_playbook, run_python, var

testinfra_hosts = ["ansible://mlflow-app-1"]

APPS = ["mlflow-app-1", "mlflow-app-2"]
START, NEW_SCHEMA = var(APPS[0], "mlflow_version"), var(APPS[0], "test_new_schema_mlflow_version")
ADMIN = {"MLFLOW_TRACKING_USERNAME": var(APPS[0], "mlflow_auth_admin_username"),
         "MLFLOW_TRACKING_PASSWORD": var(APPS[0], "mlflow_auth_admin_password")}
LOCAL = f"http://127.0.0.1:{var(APPS[0], 'mlflow_port')}"
# A table the new release's migration creates: made beforehand, it makes that migration fail.
OBSTACLE = "scheduler_leases"


def psql(sql):
    out = other_host("mlflow-db").run(f"runuser -u postgres -- psql -d {var(APPS[0], 'mlflow_db_name')} -tAc \"{sql}\"")
    assert out.rc == 0, out.stderr
    return out.stdout.strip()


def version(name):
    return other_host(name).run(f"{var(name, 'mlflow_conda_prefix')}/envs/mlflow/bin/python -c "
                                "'import mlflow; print(mlflow.__version__)'").stdout.strip()


def test_a_failed_migration_brings_every_stopped_server_back_on_the_release_of_the_schema(host):
    logged = run_python(host, client_script(), LOCAL, f"before-failed-migration-{uuid.uuid4().hex[:8]}", env=ADMIN)
    assert logged.rc == 0, logged.stderr + journal(host)
    run_id = json.loads(logged.stdout.strip().splitlines()[-1])["run_id"]
    revision = psql("select version_num from alembic_version")
    assert psql(f"select to_regclass('public.{OBSTACLE}')") == "", f"{START} already has {OBSTACLE}"
    # The MLflow user's own, so that the backup before the migration dumps it like the rest.
    psql(f"set role {var(APPS[0], 'mlflow_db_user')}; create table public.{OBSTACLE} (obstacle int)")
    try:
        result = run_playbook("site.yml", "mlflow_lb,mlflow_lb_backends", {"mlflow_version": NEW_SCHEMA}, timeout=1800)
    finally:
        psql(f"drop table public.{OBSTACLE}")
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    message = output[output.index("The change was not applied"):]
    assert "Migrate the database schema" in message and OBSTACLE in message, message[:3000]
    assert f"(MLflow {START}) is back in place and MLflow answers OK on /health again" in message, message[:3000]
    assert "The servers stopped for the migration serve again: mlflow-app-2" in message, message[:3000]

    assert psql("select version_num from alembic_version") == revision
    for name in APPS:
        h = other_host(name)
        assert version(name) == START, name
        assert h.run("systemctl is-active mlflow").stdout.strip() == "active", name
        assert h.run(f"curl -sS {LOCAL}/health").stdout.strip() == "OK", name + journal(h)
        out = run_python(h, READ_BACK, LOCAL, run_id, env=ADMIN)
        assert out.rc == 0, out.stderr
        assert json.loads(out.stdout.strip().splitlines()[-1])[run_id]["params"] == {"alpha": "0.5"}, name

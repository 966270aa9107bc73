"""The embedded default: SQLite and local artifacts under /var/lib/mlflow, port 5000."""

import json
import uuid

import pytest
from mlflow_testlib import ENV_PYTHON, client_script, journal, run_python, running_service  # noqa: F401

DATA_DIR = "/var/lib/mlflow"
ENV_FILE = "/etc/mlflow/mlflow.env"
UNIT = "/etc/systemd/system/mlflow.service"


def test_service_user_is_a_nologin_system_user(host):
    user = host.user("mlflow")
    assert user.exists
    assert user.shell in ("/usr/sbin/nologin", "/sbin/nologin")
    assert user.group == "mlflow"
    assert user.uid < 1000, "a system user"
    assert not host.file("/home/mlflow").exists, "no login home"


@pytest.mark.parametrize(
    "path,user,group,mode",
    [
        (DATA_DIR, "mlflow", "mlflow", 0o750),
        (f"{DATA_DIR}/artifacts", "mlflow", "mlflow", 0o750),
        ("/etc/mlflow", "root", "mlflow", 0o750),
        (ENV_FILE, "root", "mlflow", 0o640),
        (UNIT, "root", "root", 0o644),
        ("/opt/miniconda3", "root", "root", 0o755),
        ("/opt/miniconda3/.mlflow-installer.sha256", "root", "root", 0o644),
        ("/opt/miniconda3/envs/mlflow", "root", "root", 0o755),
        ("/usr/local/libexec/mlflow", "root", "root", 0o755),
        ("/usr/local/libexec/mlflow/mlflow_db.py", "root", "root", 0o755),
    ],
)
def test_files_written_by_the_role(host, path, user, group, mode):
    f = host.file(path)
    assert f.exists, path
    assert f.user == user
    assert f.group == group
    assert f.mode == mode, f"{path}: {oct(f.mode)}"


def test_nothing_the_role_wrote_is_world_writable(host):
    found = host.run(
        "find /etc/mlflow /etc/systemd/system/mlflow.service /var/lib/mlflow /opt/miniconda3 /usr/local/libexec/mlflow "
        "-xdev -perm -o+w ! -type l -print"
    )
    assert found.rc == 0
    assert found.stdout.strip() == ""


def test_service_user_cannot_write_its_code_or_configuration(host):
    for path in ("/opt/miniconda3/envs/mlflow/bin", "/opt/miniconda3/envs/mlflow/lib", "/etc/mlflow", ENV_FILE):
        probe = host.run(f"setpriv --reuid=mlflow --regid=mlflow --clear-groups test -w {path}")
        assert probe.rc != 0, f"mlflow can write {path}"


def test_no_installer_left_on_the_host(host):
    assert host.run("ls /root/Miniconda3-*.sh").rc != 0


def test_conda_env_has_the_pinned_packages(host):
    out = host.run(f"{ENV_PYTHON} -m pip freeze")
    assert out.rc == 0, out.stderr
    frozen = {line.split("==")[0].lower(): line.split("==")[1] for line in out.stdout.splitlines() if "==" in line}
    assert frozen["mlflow"] == "3.17.2"
    assert frozen["psycopg2-binary"] == "2.9.13"
    assert frozen["boto3"] == "1.44.8"
    version = host.run(f"{ENV_PYTHON} -c 'import sys; print(\"%d.%d\" % sys.version_info[:2])'")
    assert version.stdout.strip() == "3.11"


def test_environment_file_configures_the_server(host):
    content = host.file(ENV_FILE).content_string
    assert f'MLFLOW_BACKEND_STORE_URI="sqlite:///{DATA_DIR}/mlflow.db"' in content
    assert f'MLFLOW_ARTIFACTS_DESTINATION="{DATA_DIR}/artifacts"' in content
    assert 'MLFLOW_SERVE_ARTIFACTS="true"' in content
    assert 'MLFLOW_HOST="0.0.0.0"' in content
    assert 'MLFLOW_PORT="5000"' in content
    assert "MLFLOW_SERVER_ALLOWED_HOSTS=" in content


def test_unit_runs_the_env_mlflow_as_the_service_user(host):
    show = host.run(
        "systemctl show mlflow -p User -p Group -p ExecStart -p EnvironmentFiles -p WorkingDirectory -p Restart"
        " -p NoNewPrivileges -p ProtectSystem"
    ).stdout
    assert "User=mlflow" in show
    assert "Group=mlflow" in show
    assert "/opt/miniconda3/envs/mlflow/bin/mlflow" in show
    assert "EnvironmentFiles=/etc/mlflow/mlflow.env" in show
    assert f"WorkingDirectory={DATA_DIR}" in show
    assert "Restart=on-failure" in show
    assert "NoNewPrivileges=yes" in show
    assert "ProtectSystem=strict" in show
    assert "activate" not in host.file(UNIT).content_string


def test_service_is_enabled_and_running(host, running_service):
    assert running_service.is_enabled


def test_systemctl_status_exits_zero(host, running_service):
    status = host.run("systemctl status mlflow --no-pager")
    assert status.rc == 0, status.stdout + journal(host)


def test_server_processes_run_as_the_service_user(host, running_service):
    pid = host.run("systemctl show mlflow -p MainPID --value").stdout.strip()
    users = host.run(f"ps -o user= --pid {pid} --ppid {pid}").stdout.split()
    assert users, journal(host)
    assert set(users) == {"mlflow"}, users


def test_port_5000_is_listening_on_all_interfaces(host, running_service):
    assert host.socket("tcp://0.0.0.0:5000").is_listening, journal(host)


def test_health_answers_ok(host, running_service):
    out = host.run("curl -sS --max-time 10 http://127.0.0.1:5000/health")
    assert out.stdout.strip() == "OK", out.stdout + out.stderr + journal(host)


def test_ui_page_loads(host, running_service):
    out = host.run("curl -sS --max-time 10 -H 'Host: localhost:5000' http://127.0.0.1:5000/")
    assert out.rc == 0
    assert "<title>MLflow</title>" in out.stdout or "MLflow" in out.stdout


def test_unlisted_host_header_is_refused(host, running_service):
    code = host.run("curl -s -o /dev/null -w '%{http_code}' -H 'Host: evil.example' "
                    "http://127.0.0.1:5000/api/2.0/mlflow/experiments/search?max_results=1")
    assert code.stdout == "403"


def test_own_hostname_is_an_allowed_host(host, running_service):
    name = host.run("hostname").stdout.strip()
    code = host.run(f"curl -s -o /dev/null -w '%{{http_code}}' -H 'Host: {name}:5000' "
                    "http://127.0.0.1:5000/api/2.0/mlflow/experiments/search?max_results=1")
    assert code.stdout == "200"


def test_client_round_trip(host, running_service):
    suffix = uuid.uuid4().hex[:8]
    out = run_python(host, client_script(), "http://127.0.0.1:5000", suffix)
    assert out.rc == 0, out.stdout + out.stderr + journal(host)
    result = json.loads(out.stdout.strip().splitlines()[-1])

    assert result["experiment_name"] == f"roundtrip-{suffix}"
    assert result["params"] == {"alpha": "0.5"}
    assert result["metrics"] == {"rmse": 0.125}
    assert result["metric_history"] == [[0, 0.25], [1, 0.125]]
    assert result["artifact_uri"].startswith("mlflow-artifacts:")
    assert result["artifact_content"] == result["expected_artifact_content"]
    assert result["model_name"] == f"roundtrip-model-{suffix}"
    assert result["model_run_id"] == result["run_id"]
    assert result["model_status"] == "READY"

    # The artifact went through the server into the data directory, owned by the service user.
    stored = host.file(
        f"{DATA_DIR}/artifacts/{result['experiment_id']}/{result['run_id']}/artifacts/docs/notes.txt"
    )
    assert stored.exists
    assert stored.user == "mlflow"
    assert stored.content_string == result["expected_artifact_content"]
    # And the run is in the SQLite database under the data directory.
    db = host.file(f"{DATA_DIR}/mlflow.db")
    assert db.exists and db.user == "mlflow"

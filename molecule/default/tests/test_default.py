"""The embedded default: SQLite and local artifacts under /var/lib/mlflow, port 5000."""

import json
import re
import uuid

import pytest
from mlflow_testlib import ROOT, client_script, env_prefix, env_python, journal, port_held, run_playbook, run_python, var

NAME = "mlflow-molecule"
testinfra_hosts = [f"ansible://{NAME}"]
DATA_DIR = var(NAME, "mlflow_data_dir")
CONFIG_DIR = var(NAME, "mlflow_config_dir")
PREFIX = var(NAME, "mlflow_conda_prefix")
ENV = env_prefix(NAME)
ENV_PYTHON = env_python(NAME)
ENV_FILE = f"{CONFIG_DIR}/mlflow.env"
UNIT = "/etc/systemd/system/mlflow.service"
PORT = var(NAME, "mlflow_port")


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
        (CONFIG_DIR, "root", "mlflow", 0o750),
        (ENV_FILE, "root", "mlflow", 0o640),
        (UNIT, "root", "root", 0o644),
        (PREFIX, "root", "root", 0o755),
        (f"{PREFIX}/.mlflow-installer.sha256", "root", "root", 0o644),
        ("/usr/local/libexec/mlflow", "root", "root", 0o755),
        ("/usr/local/libexec/mlflow/mlflow_db.py", "root", "root", 0o755),
        ("/usr/local/libexec/mlflow/mlflow_health.py", "root", "root", 0o755),
        ("/usr/local/libexec/mlflow/mlflow_ops.py", "root", "root", 0o755),
        # The timers of backups and gc; the backups are the service user's.
        ("/etc/systemd/system/mlflow-backup.service", "root", "root", 0o644),
        ("/etc/systemd/system/mlflow-backup.timer", "root", "root", 0o644),
        ("/etc/systemd/system/mlflow-gc.service", "root", "root", 0o644),
        ("/etc/systemd/system/mlflow-gc.timer", "root", "root", 0o644),
        (var(NAME, "mlflow_db_backup_dir"), "mlflow", "mlflow", 0o750),
        # The last configuration that served, for a rollback: root only (mlflow.env holds secrets).
        (f"{CONFIG_DIR}/last-good", "root", "root", 0o700),
        (f"{CONFIG_DIR}/last-good/mlflow.env", "root", "root", 0o600),
    ],
)
def test_files_written_by_the_role(host, path, user, group, mode):
    f = host.file(path)
    assert f.exists, path
    assert f.user == user
    assert f.group == group
    assert f.mode == mode, f"{path}: {oct(f.mode)}"


def lock_lines(host):
    """name -> version of every package of the lock the role installs by default on this host."""
    version, python = var(NAME, "mlflow_version"), var(NAME, "mlflow_python_version")
    lock = ROOT / "roles" / "mlflow" / "files" / "locks" / f"mlflow-{version}-py{python}-{host.system_info.arch}.txt"
    return dict(re.findall(r"^([a-z0-9._-]+)==(\S+) --hash=sha256:", lock.read_text(), re.M))


def test_the_env_is_a_versioned_directory_that_the_service_link_points_to(host):
    link = host.file(ENV)
    assert link.is_symlink, f"{ENV} is not a link"
    target = host.file(link.linked_to)
    assert re.fullmatch(rf"{ENV}-{re.escape(var(NAME, 'mlflow_version'))}-[0-9a-f]{{12}}", link.linked_to)
    assert (target.user, target.group, target.mode) == ("root", "root", 0o755)
    marker = json.loads(host.file(f"{link.linked_to}/.mlflow-env.json").content_string)
    assert f"mlflow[auth]=={var(NAME, 'mlflow_version')}" in marker["requires"]


def test_nothing_the_role_wrote_is_world_writable(host):
    found = host.run(
        f"find {CONFIG_DIR} {UNIT} {DATA_DIR} {PREFIX} /usr/local/libexec/mlflow -xdev -perm -o+w ! -type l -print"
    )
    assert found.rc == 0
    assert found.stdout.strip() == ""


def test_service_user_cannot_write_its_code_or_configuration(host):
    for path in (f"{ENV}/bin", f"{ENV}/lib", CONFIG_DIR, ENV_FILE):
        probe = host.run(f"setpriv --reuid=mlflow --regid=mlflow --clear-groups test -w {path}")
        assert probe.rc != 0, f"mlflow can write {path}"


def test_no_installer_or_wheelhouse_left_on_the_host(host):
    assert host.run("ls /root/Miniconda3-*.sh").rc != 0
    assert host.run(f"ls -d {PREFIX}/.install-*").rc != 0


def test_conda_env_holds_exactly_the_locked_packages(host):
    out = host.run(f"{ENV_PYTHON} -m pip list --format=json")
    assert out.rc == 0, out.stderr
    installed = {p["name"].lower().replace("_", "-"): p["version"] for p in json.loads(out.stdout)}
    locked = lock_lines(host)
    assert len(locked) > 50, "the lock lists the whole dependency tree"
    wrong = {name: (version, installed.get(name)) for name, version in locked.items() if installed.get(name) != version}
    assert wrong == {}, "locked (version, installed)"
    # Besides the lock: only what conda put there to run pip.
    assert set(installed) - set(locked) <= {"pip", "setuptools", "wheel"}, set(installed) - set(locked)
    version = host.run(f"{ENV_PYTHON} -c 'import sys; print(\"%d.%d\" % sys.version_info[:2])'")
    assert version.stdout.strip() == var(NAME, "mlflow_python_version")


def test_bytecode_was_compiled_at_install_time(host):
    """ProtectSystem=strict keeps the service from writing __pycache__: it must be there already."""
    out = host.run(f"{ENV_PYTHON} -c 'import mlflow.server, sys; print(mlflow.server.__cached__)'")
    assert out.rc == 0, out.stderr
    assert host.file(out.stdout.strip()).exists, out.stdout
    # Every package's modules, imported at start or later (botocore for S3), but not the packages'
    # own test suites, which no server imports.
    site = out.stdout.strip().split("/mlflow/server/")[0]
    for module in ("botocore/__init__.py", "sqlalchemy/__init__.py", "pandas/__init__.py"):
        pyc = host.run(f"ls {site}/{module.rsplit('/', 1)[0]}/__pycache__/")
        assert "__init__.cpython-" in pyc.stdout, (module, pyc.stdout + pyc.stderr)
    assert host.file(f"{site}/pandas/tests/__init__.py").exists
    assert not host.file(f"{site}/pandas/tests/__pycache__").exists


def test_environment_file_configures_the_server(host):
    content = host.file(ENV_FILE).content_string
    assert f'MLFLOW_BACKEND_STORE_URI="sqlite:///{DATA_DIR}/mlflow.db"' in content
    assert f'MLFLOW_ARTIFACTS_DESTINATION="{DATA_DIR}/artifacts"' in content
    assert 'MLFLOW_SERVE_ARTIFACTS="true"' in content
    assert f'MLFLOW_HOST="{var(NAME, "mlflow_host")}"' in content
    assert f'MLFLOW_PORT="{PORT}"' in content
    assert "MLFLOW_SERVER_ALLOWED_HOSTS=" in content


def test_workers_follow_the_vcpus_and_the_job_runner_is_off(host, running_service):
    """mlflow_workers 0 (the default): one per vCPU, 2 to 8; no job runner unless asked for."""
    assert var(NAME, "mlflow_workers") == 0 and var(NAME, "mlflow_job_execution") is False
    vcpus = host.ansible("ansible.builtin.setup", "filter=ansible_processor_vcpus")["ansible_facts"][
        "ansible_processor_vcpus"]
    content = host.file(ENV_FILE).content_string
    assert f'MLFLOW_WORKERS="{min(max(vcpus, 2), 8)}"' in content
    assert 'MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"' in content
    procs = host.run("systemctl show mlflow -p ControlGroup --value").stdout.strip()
    cmdlines = host.run(f"cat /sys/fs/cgroup{procs}/cgroup.procs | xargs -I{{}} cat /proc/{{}}/cmdline | tr '\\0' ' '")
    assert "huey" not in cmdlines.stdout and "job" not in cmdlines.stdout.lower(), cmdlines.stdout


def test_unit_runs_the_env_mlflow_as_the_service_user(host):
    show = host.run(
        "systemctl show mlflow -p User -p Group -p ExecStart -p EnvironmentFiles -p WorkingDirectory -p Restart"
        " -p NoNewPrivileges -p ProtectSystem"
    ).stdout
    assert "User=mlflow" in show
    assert "Group=mlflow" in show
    assert f"{ENV}/bin/mlflow" in show
    assert f"EnvironmentFiles={ENV_FILE}" in show
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


def test_the_port_is_listening_on_all_interfaces(host, running_service):
    assert host.socket(f"tcp://0.0.0.0:{PORT}").is_listening, journal(host)


def test_health_answers_ok(host, running_service):
    out = host.run(f"curl -sS --max-time 10 http://127.0.0.1:{PORT}/health")
    assert out.stdout.strip() == "OK", out.stdout + out.stderr + journal(host)


def test_ui_page_loads(host, running_service):
    out = host.run(f"curl -sS --max-time 10 -H 'Host: localhost:{PORT}' http://127.0.0.1:{PORT}/")
    assert out.rc == 0
    assert "<title>MLflow</title>" in out.stdout or "MLflow" in out.stdout


def test_unlisted_host_header_is_refused(host, running_service):
    code = host.run("curl -s -o /dev/null -w '%{http_code}' -H 'Host: evil.example' "
                    f"http://127.0.0.1:{PORT}/api/2.0/mlflow/experiments/search?max_results=1")
    assert code.stdout == "403"


def test_ipv6_addresses_are_allowed_host_headers(host, running_service):
    """Each IPv6 address of the host is accepted as [address] and [address]:port."""
    addresses = host.ansible("ansible.builtin.setup", "filter=ansible_all_ipv6_addresses")["ansible_facts"][
        "ansible_all_ipv6_addresses"]
    assert addresses, "the test container has no IPv6 address (sysctls in molecule.yml)"
    allowed = next(line for line in host.file(ENV_FILE).content_string.splitlines()
                   if line.startswith("MLFLOW_SERVER_ALLOWED_HOSTS="))
    patterns = allowed.split("=", 1)[1].strip('"').split(",")
    for address in addresses:
        assert f"[{address}]" in patterns, (address, patterns)
    assert not any("\\" in p for p in patterns), patterns


def test_own_hostname_is_an_allowed_host(host, running_service):
    name = host.run("hostname").stdout.strip()
    code = host.run(f"curl -s -o /dev/null -w '%{{http_code}}' -H 'Host: {name}:{PORT}' "
                    f"http://127.0.0.1:{PORT}/api/2.0/mlflow/experiments/search?max_results=1")
    assert code.stdout == "200"


def test_client_round_trip(host, running_service):
    suffix = uuid.uuid4().hex[:8]
    out = run_python(host, client_script(), f"http://127.0.0.1:{PORT}", suffix)
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


def test_the_last_configuration_that_served_is_kept(host, running_service):
    manifest = json.loads(host.file(f"{CONFIG_DIR}/last-good/manifest.json").content_string)
    assert {f["path"] for f in manifest["files"]} == {ENV_FILE, UNIT}
    for f in manifest["files"]:
        assert host.file(f"{CONFIG_DIR}/last-good/{f['name']}").sha256sum == host.file(f["path"]).sha256sum
    assert manifest["env"] == host.file(ENV).linked_to
    assert manifest["health_url"] == f"http://127.0.0.1:{PORT}/health"
    assert manifest["version"] == var(NAME, "mlflow_version")


def test_a_change_to_a_port_another_process_holds_stops_before_anything_changes(host, running_service):
    other = PORT + 1
    files = {p: host.file(p).sha256sum for p in (ENV_FILE, UNIT)}
    pid = host.run("systemctl show mlflow -p MainPID --value").stdout.strip()
    with port_held(host, other) as unit:
        result = run_playbook("site.yml", NAME, {"mlflow_port": other})
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert f"Port {other} of {NAME} is held by python3" in output and unit in output, output[-3000:]
    assert "changed=0" in output, output[-3000:]
    assert {p: host.file(p).sha256sum for p in files} == files
    assert host.run("systemctl show mlflow -p MainPID --value").stdout.strip() == pid
    assert host.run(f"curl -sS http://127.0.0.1:{PORT}/health").stdout.strip() == "OK"


def test_a_change_that_fails_before_the_restart_is_taken_back_and_the_server_keeps_running(host, running_service):
    """A database MLflow cannot open fails the schema step, after mlflow.env was written and before
    any restart: the file is put back, so what is on disk is again what runs. On a host that an
    earlier release of the role set up (no last-good/ yet), what runs is kept before anything changes."""
    files = {p: host.file(p).sha256sum for p in (ENV_FILE, UNIT)}
    assert host.run(f"rm -r {CONFIG_DIR}/last-good").rc == 0
    pid = host.run("systemctl show mlflow -p MainPID --value").stdout.strip()
    result = run_playbook("site.yml", NAME, {"mlflow_backend_store_uri": "sqlite:////nonexistent/mlflow.db"})
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert "TASK [mlflow : Go back to the last configuration that served]" in output, output[-3000:]
    message = output[output.index("The change was not applied"):]
    assert "Read the schema revision" in message and "MLflow kept running with it" in message, message[:3000]
    assert {p: host.file(p).sha256sum for p in files} == files
    assert host.run("systemctl show mlflow -p MainPID --value").stdout.strip() == pid
    assert host.run(f"curl -sS http://127.0.0.1:{PORT}/health").stdout.strip() == "OK"
    # What was kept before the change: the files that ran, and where the server that ran listens.
    kept = json.loads(host.file(f"{CONFIG_DIR}/last-good/manifest.json").content_string)
    assert {f["path"] for f in kept["files"]} == set(files)
    assert kept["health_url"] == f"http://127.0.0.1:{PORT}/health"

"""mlflow-airgap: an air-gapped host, deployed from a carried wheelhouse and the Miniconda installer alone
(with authentication and TLS on, which tests/test_secure.py checks)."""

import io
import json
import pathlib
import re
import subprocess
import tarfile
import uuid

import pytest
from mlflow_testlib import (ROOT, client_script, env_prefix, install_test_ca, journal, require_running, run_playbook,
                            run_python, var)

NAME = "mlflow-airgap"
testinfra_hosts = [f"ansible://{NAME}"]
PORT = var(NAME, "mlflow_port")
URL = f"https://{NAME}:{PORT}"
CA = "/root/molecule-ca.crt"
CLIENT = {"MLFLOW_TRACKING_USERNAME": var(NAME, "mlflow_auth_admin_username"),
          "MLFLOW_TRACKING_PASSWORD": var(NAME, "mlflow_auth_admin_password"), "MLFLOW_TRACKING_SERVER_CERT_PATH": CA}
CARRIED = pathlib.Path(var(NAME, "test_carried_dir"))
LOCK_DIR = pathlib.Path(var(NAME, "mlflow_pip_lock_dir"))


@pytest.fixture(autouse=True, scope="module")
def _served(host):
    """The test CA on the host, for its clients; the server running."""
    install_test_ca(host, CA)
    require_running(host)


def health(host):
    return host.run(f"curl -sS --cacert {CA} {URL}/health").stdout.strip()


def lock_of(version, arch):
    name = f"mlflow-{version}-py{var(NAME, 'mlflow_python_version')}-{arch}.txt"
    path = next(p for p in (LOCK_DIR / name, ROOT / "roles" / "mlflow" / "files" / "locks" / name) if p.exists())
    return dict(re.findall(r"^# (\S+\.whl)\n\S+ --hash=sha256:([0-9a-f]{64})$", path.read_text(), re.M))


def test_the_host_is_only_on_a_network_with_no_route_out(host):
    """Docker's view (no traffic is sent anywhere to find out): one network, internal."""
    networks = json.loads(subprocess.run(["docker", "inspect", NAME, "--format", "{{json .NetworkSettings.Networks}}"],
                                         capture_output=True, text=True, check=True).stdout)
    assert len(networks) == 1, networks
    (network,) = networks
    internal = subprocess.run(["docker", "network", "inspect", network, "--format", "{{.Internal}}"],
                              capture_output=True, text=True, check=True).stdout.strip()
    assert internal == "true", f"{network} is not an internal network"
    # The container's own resolver (on its loopback) cannot resolve outside names either.
    assert host.run("getent hosts pypi.org").rc != 0


def test_mlflow_serves_a_client_round_trip(host):
    require_running(host)
    suffix = uuid.uuid4().hex[:8]
    out = run_python(host, client_script(), URL, suffix, env=CLIENT)
    assert out.rc == 0, out.stdout + out.stderr + journal(host)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["artifact_content"] == result["expected_artifact_content"]
    assert result["model_status"] == "READY"


def test_the_conda_env_was_created_offline(host):
    history = host.file(f"{host.file(env_prefix(NAME)).linked_to}/conda-meta/history").content_string
    assert "offline=1" in history, history  # the test double records what the role asked conda for


def test_the_wheels_came_from_the_carried_archive_only(host):
    """The offline controller's cache holds exactly the lock's wheels, each with the lock's hash."""
    wanted = lock_of(var(NAME, "mlflow_version"), host.system_info.arch)
    cache = pathlib.Path(var(NAME, "mlflow_local_cache_path")) / "wheels"
    assert sorted(p.name for p in cache.iterdir()) == sorted(wanted)
    carried = next(CARRIED.glob("mlflow-wheelhouse-*.tar"))
    with tarfile.open(carried) as tar:
        assert sorted(m.name for m in tar.getmembers()) == sorted(wanted)


def test_a_wheel_changed_by_one_byte_is_refused_and_the_host_keeps_its_env(host, tmp_path):
    """A release whose carried wheelhouse was tampered with: the play stops naming the file, nothing changes."""
    other = var(NAME, "test_other_mlflow_version")
    built = run_playbook("playbooks/wheelhouse.yml", None, {
        "mlflow_version": other, "mlflow_wheelhouse_dest": str(tmp_path), "mlflow_pip_lock_dir": str(LOCK_DIR),
        "mlflow_local_cache_path": str(ROOT / ".cache" / "controller")})
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-2000:]
    original = next(tmp_path.glob("mlflow-wheelhouse-*.tar"))
    victim = next(name for name in lock_of(other, host.system_info.arch) if name.startswith("mlflow-"))
    tampered = tmp_path / "tampered.tar"
    with tarfile.open(original) as src, tarfile.open(tampered, "w") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read()
            if member.name == victim:
                data = data[:1000] + bytes([data[1000] ^ 1]) + data[1001:]
            dst.addfile(member, io.BytesIO(data))

    link = host.file(env_prefix(NAME)).linked_to
    pid = host.run("systemctl show mlflow -p MainPID --value").stdout.strip()
    result = run_playbook("site.yml", NAME, {"mlflow_version": other, "mlflow_wheelhouse_src": str(tampered)})
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert f"{victim} from {tampered}" in output and "refused" in output, output[-3000:]
    assert "changed=0" in output, output[-3000:]

    assert host.file(env_prefix(NAME)).linked_to == link
    assert host.run("systemctl show mlflow -p MainPID --value").stdout.strip() == pid, "MLflow was restarted"
    assert host.run(f"ls -d {env_prefix(NAME)}-{other}-*").rc != 0, "an env of the refused release was left"
    assert health(host) == "OK"

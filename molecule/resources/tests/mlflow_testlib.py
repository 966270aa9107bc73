"""Helpers shared by the testinfra suites of every scenario."""

import os
import pathlib

import pytest
import testinfra

SERVICE = "mlflow"
ENV_PYTHON = "/opt/miniconda3/envs/mlflow/bin/python"
RESOURCES = pathlib.Path(__file__).parent


def journal(host, lines=200):
    """The service's recent journal, for failure messages."""
    return host.run(f"journalctl -u {SERVICE} --no-pager -n {lines}").stdout


def require_running(host):
    """Fail with `systemctl status` and the journal when the service is not running."""
    service = host.service(SERVICE)
    if not service.is_running:
        status = host.run(f"systemctl status {SERVICE} --no-pager").stdout
        pytest.fail(f"{SERVICE} is not running.\n{status}\n--- journalctl -u {SERVICE} ---\n{journal(host)}")
    return service


@pytest.fixture()
def running_service(host):
    return require_running(host)


def run_python(host, script, *args, env=None):
    """Run a Python script (text) with the conda env's Python on the host."""
    quoted = " ".join(f"'{a}'" for a in args)
    prefix = " ".join(f"{k}='{v}'" for k, v in (env or {}).items())
    return host.run(f"{prefix} {ENV_PYTHON} - {quoted} <<'PYEOF'\n{script}\nPYEOF")


def client_script():
    return (RESOURCES / "client_roundtrip.py").read_text()


def other_host(name):
    """A testinfra host for another instance of the scenario."""
    inventory = os.environ["MOLECULE_INVENTORY_FILE"]
    return testinfra.get_host(f"ansible://{name}?ansible_inventory={inventory}")

"""Shared helpers for the testinfra suites."""

import pathlib

import pytest

SERVICE = "mlflow"
ENV_PYTHON = "/opt/miniconda3/envs/mlflow/bin/python"
HERE = pathlib.Path(__file__).parent


def journal(host, lines=200):
    """The service's recent journal, for failure messages."""
    return host.run(f"journalctl -u {SERVICE} --no-pager -n {lines}").stdout


@pytest.fixture()
def running_service(host):
    """The mlflow service; fails with its journal when it is not running."""
    service = host.service(SERVICE)
    if not service.is_running:
        status = host.run(f"systemctl status {SERVICE} --no-pager").stdout
        pytest.fail(f"{SERVICE} is not running.\n{status}\n--- journalctl -u {SERVICE} ---\n{journal(host)}")
    return service


def run_python(host, script, *args):
    """Run a Python script (text) with the conda env's Python on the host."""
    quoted = " ".join(f"'{a}'" for a in args)
    return host.run(f"{ENV_PYTHON} - {quoted} <<'PYEOF'\n{script}\nPYEOF")

"""Helpers and fixtures shared by the testinfra suites of every scenario.

Loaded as a pytest plugin (PYTEST_ADDOPTS=-p mlflow_testlib, set in .config/molecule/config.yml).
Tests take their inputs (secrets, versions, counts) from the scenario's inventory and the roles'
defaults through `hostvars()`, never from copies: if an input changes, the tests follow it.
"""

import contextlib
import functools
import json
import os
import pathlib
import subprocess
import tempfile
import time

import pytest
import testinfra
import yaml
from testinfra.utils.ansible_runner import AnsibleRunner

ROOT = pathlib.Path(__file__).resolve().parents[3]
SERVICE = "mlflow"
RESOURCES = pathlib.Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    """With pytest-xdist (`-n 2 --dist loadgroup`, as the default scenario runs its suites), the tests
    of one host run in one worker, in the order they were collected; the hosts run side by side.
    LoadGroupScheduling groups tests by the `@group` suffix of their ids. pytest-xdist 3.8 under
    pytest 9 no longer adds it for `xdist_group` marks (one host's tests ran in both workers at
    once, and raced), so it is added here."""
    # xdist's workers see loadgroup, its controller dist.
    if not (getattr(config.option, "loadgroup", False) or getattr(config.option, "dist", None) == "loadgroup"):
        return
    for item in items:
        hosts = getattr(item.module, "testinfra_hosts", None) or ["controller"]
        if "@" not in item.nodeid:
            with_group = f"{item.nodeid}@{','.join(hosts).replace('@', '_')}"
            if hasattr(item, "_id"):  # pytest 9 keeps the id structured
                from _pytest.nodeid import coerce_node_id

                item._id = coerce_node_id(with_group)
            else:
                item._nodeid = with_group


@functools.cache
def role_defaults(role):
    return yaml.safe_load((ROOT / "roles" / role / "defaults" / "main.yml").read_text()) or {}


@functools.cache
def role_vars(role):
    return yaml.safe_load((ROOT / "roles" / role / "vars" / "main.yml").read_text()) or {}


@functools.cache
def _runner():
    return AnsibleRunner(os.environ["MOLECULE_INVENTORY_FILE"])


def hostvars(name):
    """The roles' defaults overlaid with the scenario inventory's variables of host `name`."""
    merged = {}
    for role in sorted(p.name for p in (ROOT / "roles").iterdir() if (p / "defaults" / "main.yml").exists()):
        merged.update(role_defaults(role))
    merged.update(_runner().get_variables(name))
    return merged


def group_hosts(group):
    """The hosts of an inventory group of the scenario."""
    return _runner().get_hosts(group)


def var(name, key):
    """One input of a test, which must be a literal value (not a template) in the inventory."""
    value = hostvars(name)[key]
    if isinstance(value, str) and "{{" in value:
        raise AssertionError(f"{key} of {name} is a template ({value}); tests need literal inventory values")
    return value


def env_prefix(name):
    v = hostvars(name)
    return f"{v['mlflow_conda_prefix']}/envs/{v['mlflow_conda_env_name']}"


def env_python(name):
    return f"{env_prefix(name)}/bin/python"


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


def install_test_ca(host, path):
    """The scenario's test CA (made on the controller by molecule/shared/test-ca.yml) at `path` on the
    host, for the clients that run there."""
    ca = pathlib.Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"], "tls", "ca.crt").read_text()
    host.run(f"cat > {path} <<'EOF'\n{ca}EOF")


def run_python(host, script, *args, env=None):
    """Run a Python script (text) with the conda env's Python on the host."""
    quoted = " ".join(f"'{a}'" for a in args)
    prefix = " ".join(f"{k}='{v}'" for k, v in (env or {}).items())
    python = env_python(host.backend.get_hostname())
    return host.run(f"{prefix} {python} - {quoted} <<'PYEOF'\n{script}\nPYEOF")


# Reads runs back with MLflow's client: argv[1] the tracking URI, argv[2] run ids separated by commas.
READ_BACK = """
import json, sys, tempfile
from mlflow.tracking import MlflowClient
client = MlflowClient(sys.argv[1])
out = {}
for run_id in sys.argv[2].split(","):
    try:
        run = client.get_run(run_id)
    except Exception as error:
        out[run_id] = {"error": getattr(error, "error_code", str(error))}
        continue
    entry = {"params": run.data.params, "metrics": run.data.metrics, "stage": run.info.lifecycle_stage}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            entry["artifact"] = open(client.download_artifacts(run_id, "docs/notes.txt", tmp)).read()
    except Exception as error:
        entry["artifact_error"] = str(error)[:200]
    out[run_id] = entry
print(json.dumps(out))
"""


def client_script():
    return (RESOURCES / "client_roundtrip.py").read_text()


def other_host(name):
    """A testinfra host for another instance of the scenario."""
    inventory = os.environ["MOLECULE_INVENTORY_FILE"]
    return testinfra.get_host(f"ansible://{name}?ansible_inventory={inventory}")


def run_playbook(playbook, limit, extra_vars, extra_env=None, timeout=900, args=()):
    """Run a playbook of the project (site.yml, ...) against the scenario's inventory, as a user would."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(extra_vars, f)
    env = {**os.environ, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0", "ANSIBLE_ROLES_PATH": str(ROOT / "roles"),
           **(extra_env or {})}
    try:
        return subprocess.run(
            ["ansible-playbook", "-i", os.environ["MOLECULE_INVENTORY_FILE"], playbook,
             *(["--limit", limit] if limit else []), "-e", f"@{f.name}", *args],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
        )
    finally:
        os.unlink(f.name)


@contextlib.contextmanager
def port_held(host, port, unit="another-web-app.service"):
    """Another program (python3's http.server, as the systemd unit `unit`) listens on the port."""
    assert host.run(f"systemd-run --unit={unit} python3 -m http.server {port}").rc == 0
    try:
        probe = f"python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", {port}))'"
        for _ in range(50):
            if host.run(probe).rc == 0:
                break
            time.sleep(0.2)
        yield unit
    finally:
        host.run(f"systemctl stop {unit}")

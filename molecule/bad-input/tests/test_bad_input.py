"""Each invalid configuration stops in preflight with a message that names the variable and
the fix, and leaves the host as it was: no user, no files, no service.

The cases run as a user's inventory runs: one real `ansible-playbook site.yml` for all of them, each
case a host of its own (an inventory name for the same container, its settings as host variables).
So one play validates hosts that differ, and each host must fail on its own fault alone, with
changed=0; the container is checked untouched after all of them. The host's facts are gathered
once and cached for every name (the cases only read the host).
"""

import pathlib
import re
import shutil
import tempfile

import pytest
import yaml
from mlflow_testlib import ROOT, other_host, port_held, role_defaults, role_vars, run_playbook

DOUBLE = ROOT / "files" / "test-doubles" / "Miniconda3-offline-test-double.sh"


def tls_pair_of_two_keys():
    """A self-signed certificate and the key of another pair, on the controller."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    directory = pathlib.Path(tempfile.mkdtemp(prefix="bad-input-tls-"))
    key, other = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "mlflow-bad")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    (directory / "server.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "other.key").write_bytes(other.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return str(directory / "server.crt"), str(directory / "other.key")


TLS_CERT, TLS_OTHER_KEY = tls_pair_of_two_keys()
testinfra_hosts = ["ansible://mlflow-bad"]
FACT_CACHE = tempfile.mkdtemp(prefix="bad-input-facts-")

# (id, settings, texts the failure message must contain; {host}: the case's inventory name)
CASES = [
    ("port-out-of-range", {"mlflow_port": 70000}, ["mlflow_port", "between 1 and 65535"]),
    ("port-not-a-number", {"mlflow_port": "http"}, ["mlflow_port", "int"]),
    ("negative-workers", {"mlflow_workers": -1}, ["mlflow_workers", "at least 1, or 0 for one per vCPU"]),
    ("bind-address-not-an-address", {"mlflow_host": "not-an-ip"},
     ["mlflow_host 'not-an-ip'", "neither a wildcard", "nor an address of {host}"]),
    ("bind-address-of-another-host", {"mlflow_host": "192.0.2.10"},
     ["mlflow_host '192.0.2.10'", "nor an address of {host}"]),
    ("unknown-backend-scheme", {"mlflow_backend_store_uri": "mongodb://db.example.com/mlflow"},
     ["mlflow_backend_store_uri", "postgresql"]),
    ("unknown-db-type", {"mlflow_db_type": "oracle"}, ["mlflow_db_type", "sqlite, postgresql"]),
    ("db-driver-not-in-the-env", {"mlflow_backend_store_uri": "mysql://mlflow@db.example.com/mlflow",
                                  "mlflow_backup_enabled": False},
     ["mlflow_backend_store_uri", "mysqlclient", "mlflow_pip_extra_packages"]),
    ("backup-of-an-engine-without-a-method", {"mlflow_backend_store_uri": "mysql://mlflow@db.example.com/mlflow"},
     ["mlflow_backup_enabled backs up PostgreSQL (pg_dump) and SQLite", "databases are mysql", "mlflow_backup_enabled: false"]),
    ("gc-age-not-an-age", {"mlflow_gc_older_than": "30 days"}, ["mlflow_gc_older_than", "#d#h#m#s", "'30 days'"]),
    ("backup-calendar-not-a-calendar", {"mlflow_backup_on_calendar": "every night"},
     ["mlflow_backup_on_calendar ('every night') is not a calendar expression", "systemd-analyze calendar"]),
    ("backup-keep-none", {"mlflow_backup_keep": 0}, ["mlflow_backup_keep must be 1 or more"]),
    ("state-unknown", {"mlflow_state": "removed"}, ["mlflow_state", "present, absent", "removed"]),
    ("db-driver-unknown", {"mlflow_backend_store_uri": "postgresql+nodriver://mlflow@db.example.com/mlflow"},
     ["mlflow_backend_store_uri", "postgresql+nodriver", "not one the role knows"]),
    ("postgresql-without-password", {"mlflow_db_type": "postgresql", "mlflow_db_host": "db.example.com"},
     ["mlflow_db_password", "EMPTY", "vault"]),
    ("postgresql-without-host", {"mlflow_db_type": "postgresql", "mlflow_db_password": "a-long-password-1"},
     ["mlflow_db_host", "got ''"]),
    ("verify-full-without-ca", {"mlflow_db_type": "postgresql", "mlflow_db_host": "db", "mlflow_db_password": "x" * 16,
                                "mlflow_db_sslmode": "verify-full"}, ["mlflow_db_sslrootcert_src"]),
    ("s3-without-credentials", {"mlflow_s3_bucket": "mlflow-artifacts"},
     ["mlflow_s3_access_key_id", "mlflow_s3_secret_access_key"]),
    ("s3-invalid-bucket", {"mlflow_s3_bucket": "Bad_Bucket", "mlflow_s3_access_key_id": "a",
                           "mlflow_s3_secret_access_key": "b"}, ["mlflow_s3_bucket", "Bad_Bucket"]),
    ("direct-artifacts-nowhere", {"mlflow_serve_artifacts": False}, ["mlflow_serve_artifacts", "mlflow_s3_bucket"]),
    ("auth-short-password", {"mlflow_auth_enabled": True, "mlflow_auth_admin_password": "short",
                             "mlflow_auth_secret_key": "k" * 40}, ["mlflow_auth_admin_password", "12 or more"]),
    ("auth-old-default-password", {"mlflow_auth_enabled": True, "mlflow_auth_admin_password": "password1234",
                                   "mlflow_auth_secret_key": "k" * 40}, ["mlflow_auth_admin_password", "old default"]),
    ("auth-without-secret-key", {"mlflow_auth_enabled": True, "mlflow_auth_admin_password": "a-good-password-99"},
     ["mlflow_auth_secret_key", "32 or more"]),
    ("auth-bad-default-permission", {"mlflow_auth_default_permission": "ALL"}, ["mlflow_auth_default_permission"]),
    ("tls-missing-key", {"mlflow_tls_enabled": True, "mlflow_tls_cert_src": "/etc/hostname",
                         "mlflow_tls_key_src": "/nonexistent/server.key"}, ["mlflow_tls_key_src", "/nonexistent/server.key"]),
    ("tls-key-of-another-pair", {"mlflow_tls_enabled": True, "mlflow_tls_cert_src": TLS_CERT,
                                 "mlflow_tls_key_src": TLS_OTHER_KEY},
     [f"the key {TLS_OTHER_KEY} does not match mlflow_tls_cert_src {TLS_CERT}"]),
    ("workers-beyond-the-connection-budget", {"mlflow_workers": 64},
     ["Each of the 64 workers would admit", "at least 4 are needed", "mlflow_db_connection_budget"]),
    ("env-key-with-a-line-break", {"mlflow_env_extra": {"NOTE\nMLFLOW_PORT": "1"}},
     ["mlflow_env_extra", "is not a variable name"]),
    ("env-value-with-a-line-break", {"mlflow_env_extra": {"NOTE": "a\nMLFLOW_PORT=1"}},
     ["mlflow_env_extra", "the value of 'NOTE' holds a line break"]),
    ("env-name-the-role-writes", {"mlflow_env_extra": {"MLFLOW_UVICORN_OPTS": "--workers=9"}},
     ["mlflow_env_extra", "MLFLOW_UVICORN_OPTS is written by the role"]),
    ("allowed-hosts-any", {"mlflow_allowed_hosts": ["*"]}, ["mlflow_allowed_hosts", "matches any Host header"]),
    ("backup-dir-is-a-system-dir", {"mlflow_db_backup_dir": "/var/backups"},
     ["mlflow_db_backup_dir must be an absolute path of its own, not the system directory '/var/backups'"]),
    ("data-dir-under-etc", {"mlflow_data_dir": "/etc/mlflow-data"},
     ["mlflow_data_dir ('/etc/mlflow-data') is inside /etc", "service user"]),
    ("data-dir-not-normalized", {"mlflow_data_dir": "/var/lib/../lib/mlflow"}, ["mlflow_data_dir", "normalized"]),
    ("purge-of-a-system-dir", {"mlflow_state": "absent", "mlflow_purge_data": True, "mlflow_data_dir": "/srv"},
     ["mlflow_data_dir must be an absolute path of its own, not the system directory '/srv'"]),
    ("wrong-installer-checksum", {"mlflow_miniconda_installer_local_path": str(DOUBLE),
                                  "mlflow_miniconda_installer_sha256": "0" * 64},
     ["mlflow_miniconda_installer_sha256", "expected " + "0" * 64]),
    # In one play beside hosts whose installer exists: each host's own file is checked.
    ("installer-missing", {"mlflow_miniconda_installer_local_path": "/nonexistent/Miniconda3-Linux-x86_64.sh"},
     ["mlflow_miniconda_installer_local_path /nonexistent/Miniconda3-Linux-x86_64.sh does not exist on the controller"]),
    ("malformed-checksum", {"mlflow_miniconda_installer_sha256": "not-a-checksum"},
     ["mlflow_miniconda_installer_sha256", "64 lowercase hex"]),
    ("anaconda-channels-without-tos", {"mlflow_conda_channels": ["defaults"]},
     ["mlflow_conda_accept_anaconda_tos", "Terms of Service"]),
    ("no-channels", {"mlflow_conda_channels": []}, ["mlflow_conda_channels", "conda-forge"]),
    ("bad-python-version", {"mlflow_python_version": "python3"}, ["mlflow_python_version", "3.11"]),
    ("root-user", {"mlflow_user": "root"}, ["mlflow_user", "never runs as root"]),
    ("relative-data-dir", {"mlflow_data_dir": "var/lib/mlflow"}, ["mlflow_data_dir", "absolute path"]),
    ("data-dir-is-a-system-dir", {"mlflow_data_dir": "/var/lib"}, ["mlflow_data_dir", "absolute path of its own"]),
    ("frame-options", {"mlflow_x_frame_options": "ALLOWALL"}, ["mlflow_x_frame_options", "SAMEORIGIN"]),
    ("cors-with-path", {"mlflow_cors_allowed_origins": ["https://app.example.com/path"]},
     ["mlflow_cors_allowed_origins", "without a"]),
    ("disable-security-middleware", {"mlflow_env_extra": {"MLFLOW_SERVER_DISABLE_SECURITY_MIDDLEWARE": "true"}},
     ["MLFLOW_SERVER_DISABLE_SECURITY_MIDDLEWARE", "mlflow_allowed_hosts"]),
    ("auth-on-an-old-mlflow", {"mlflow_auth_enabled": True, "mlflow_auth_admin_password": "a-good-password-99",
                               "mlflow_auth_secret_key": "k" * 40, "mlflow_version": "3.16.0"},
     ["mlflow_auth_enabled needs mlflow_version 3.16.1 or newer", "3.16.0"]),
    ("auth-type-unknown", {"mlflow_auth_enabled": True, "mlflow_auth_type": "ldap"}, ["mlflow_auth_type", "basic, oidc"]),
    ("oidc-without-provider", {"mlflow_auth_enabled": True, "mlflow_auth_type": "oidc", "mlflow_auth_secret_key": "k" * 40},
     ["mlflow_oidc_discovery_url", "mlflow_oidc_client_id", "mlflow_oidc_client_secret (0"]),
    ("oidc-provider-unreachable", {"mlflow_auth_enabled": True, "mlflow_auth_type": "oidc", "mlflow_auth_secret_key": "k" * 40,
                                   "mlflow_oidc_discovery_url": "http://127.0.0.1:9/.well-known/openid-configuration",
                                   "mlflow_oidc_client_id": "mlflow", "mlflow_oidc_client_secret": "a-client-secret"},
     ["asked the identity provider for http://127.0.0.1:9/.well-known/openid-configuration", "mlflow_oidc_preflight: false"]),
    ("version-latest", {"mlflow_version": "latest"}, ["mlflow_version", "exact version", "latest"]),
    ("version-range", {"mlflow_boto3_version": ">=1.40"}, ["mlflow_boto3_version", "exact version"]),
    ("no-lock-for-version", {"mlflow_version": "9.9.9"},
     ["There is no lock mlflow-9.9.9-py3.11-", "files/tools/lock.py generate --mlflow 9.9.9", "mlflow_pip_lock_dir"]),
    ("lock-without-the-extra-package", {"mlflow_pip_extra_packages": ["requests-toolbelt==1.0.0"]},
     ["was made for", "requests-toolbelt==1.0.0", "--extra requests-toolbelt==1.0.0"]),
    ("extra-package-unpinned", {"mlflow_pip_extra_packages": ["requests-toolbelt"]},
     ["mlflow_pip_extra_packages", "pinned with =="]),
    ("install-source", {"mlflow_install_source": "internet"}, ["mlflow_install_source", "wheelhouse, index"]),
    ("wheelhouse-missing", {"mlflow_wheelhouse_src": "/nonexistent/wheelhouse.tar"},
     ["mlflow_wheelhouse_src", "/nonexistent/wheelhouse.tar", "playbooks/wheelhouse.yml"]),
    ("offline-env-other-python", {"mlflow_conda_offline": True, "mlflow_python_version": "3.12"},
     ["mlflow_conda_offline", "ships Python 3.11", "mlflow_python_version"]),
]


def run_site(limit, extra_vars, args=()):
    return run_playbook("site.yml", limit, extra_vars, args=args, extra_env={
        "ANSIBLE_GATHERING": "smart", "ANSIBLE_CACHE_PLUGIN": "ansible.builtin.jsonfile",
        "ANSIBLE_CACHE_PLUGIN_CONNECTION": FACT_CACHE})


def case_host(case_id):
    return f"case-{case_id}"


def per_host(output):
    """Each host's first failure in the default callback's output: (the task, the message block)."""
    failures, task = {}, None
    lines = output.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(("TASK [", "RUNNING HANDLER [")):
            task = line.split("[", 1)[1].rsplit("]", 1)[0]
        elif m := re.match(r"(?:fatal|failed): \[([^\]]+)\]", line):
            block = [line]
            for following in lines[i + 1:]:
                if following and not following.startswith(" "):
                    break
                block.append(following)
            failures.setdefault(m.group(1).split(" -> ")[0], (task, "\n".join(block)))
    return failures


def assert_untouched(h):
    assert h.run("getent passwd mlflow").rc == 2, "the service user was created"
    assert h.run("getent group mlflow").rc == 2, "the service group was created"
    for path in ("/etc/mlflow", "/var/lib/mlflow", "/opt/miniconda3", "/etc/systemd/system/mlflow.service",
                 "/usr/local/libexec/mlflow"):
        assert not h.file(path).exists, f"{path} was created"
    assert h.run("ls /root/Miniconda3-*.sh").rc != 0, "an installer was copied"
    assert h.run("systemctl cat mlflow.service").rc != 0, "a unit was installed"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """One run of site.yml for every case, after one run of the first case that caches the facts."""
    run_site("mlflow-bad", CASES[0][1])
    # The cache's file of a host is its name after a prefix of the cache's format (s1_ here).
    (cached,) = pathlib.Path(FACT_CACHE).glob("*mlflow-bad")
    prefix = cached.name.removesuffix("mlflow-bad")
    cases = {}
    for case_id, extra_vars, _ in CASES:
        shutil.copy(cached, cached.with_name(prefix + case_host(case_id)))
        cases[case_host(case_id)] = {"ansible_connection": "community.docker.docker", "ansible_host": "mlflow-bad",
                                     **extra_vars}
    inventory = tmp_path_factory.mktemp("cases") / "cases.yml"
    inventory.write_text(yaml.safe_dump({"mlflow": {"hosts": cases}, "bad_input_cases": {"hosts": dict.fromkeys(cases)}}))
    result = run_site("bad_input_cases", {}, args=("-i", str(inventory), "--forks", "10"))
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    recap = dict(re.findall(r"^(case-\S+)\s+: (ok=.*)$", output, re.M))
    return per_host(output), recap, output


@pytest.mark.parametrize("case_id,extra_vars,expected", CASES, ids=[c[0] for c in CASES])
def test_invalid_configuration_stops_in_preflight(host, results, case_id, extra_vars, expected):
    failures, recap, output = results
    name = case_host(case_id)
    assert name in failures, f"{case_id} was accepted:\n{recap.get(name)}\n{output[-3000:]}"
    assert re.search(r"changed=0 .*failed=1 ", recap[name]), recap[name]
    # The failing task is the argument spec validation or an assertion of preflight.
    failed_task, message = failures[name]
    assert failed_task.startswith(("mlflow : Validating arguments", "mlflow : Assert")), (failed_task, message)
    for text in (t.format(host=name) for t in expected):
        assert text in message, f"{case_id}: '{text}' not in the message:\n{message[:3000]}"


def test_no_case_touched_the_host(host, results):
    assert_untouched(host)


def test_unsupported_operating_system_stops_in_preflight():
    h = other_host("mlflow-unsupported")
    result = run_site("mlflow-unsupported", {})
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert "is not supported" in output
    for system, releases in role_vars("mlflow")["_mlflow_supported_platforms"].items():
        for release in releases:
            assert f"{system} {release}" in output.split("Supported:")[1], (system, release)
    assert_untouched(h)


def test_a_foreign_miniconda_prefix_is_neither_used_nor_removed(host):
    host.run("mkdir -p /opt/miniconda3/envs/team && echo keep > /opt/miniconda3/envs/team/data.txt")
    try:
        result = run_site("mlflow-bad", {})
        output = result.stdout + result.stderr
        assert result.returncode != 0, output[-3000:]
        assert "/opt/miniconda3 exists but was not installed by this role" in output
        assert "mlflow_conda_prefix" in output
        assert host.file("/opt/miniconda3/envs/team/data.txt").content_string == "keep\n"
    finally:
        host.run("rm -rf /opt/miniconda3")
    assert_untouched(host)


def test_preflight_runs_whatever_tags_are_given(host):
    """--tags mlflow_configure (only the configuration step) still validates first."""
    result = run_playbook("site.yml", "mlflow-bad", {"mlflow_port": 70000}, args=("--tags", "mlflow_configure"))
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert "mlflow_port must be between 1 and 65535" in output, output[-3000:]
    assert_untouched(host)


def test_a_port_held_by_another_process_stops_in_preflight(host):
    port = role_defaults("mlflow")["mlflow_port"]
    with port_held(host, port) as unit:
        result = run_site("mlflow-bad", {})
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert "TASK [mlflow : Assert that no other process holds MLflow's port]" in output
    for text in (f"Port {port} of mlflow-bad is held by", "python3", unit, "set mlflow_port to a free port"):
        assert text in output, (text, output[-3000:])
    assert_untouched(host)

"""The preflight checks of roles/mlflow_common/filter_plugins/mlflow_checks.py."""
import datetime

import mlflow_checks as checks
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec


@pytest.mark.parametrize("path,owned,problem", [
    ("/var/lib/mlflow", True, ""),
    ("/srv/mlflow/backups", True, ""),
    ("/etc/mlflow", False, ""),
    ("var/lib/mlflow", False, "absolute path, normalized"),
    ("/var/lib/../lib/mlflow", True, "normalized"),
    ("/var/lib/mlflow/", True, "normalized"),
    ("/data/ml flow", True, "without spaces"),
    ("/var/backups", True, "not the system directory '/var/backups'"),
    ("/opt", False, "not the system directory '/opt'"),
    ("/etc/mlflow-data", True, "is inside /etc"),
    ("/usr/local/mlflow", True, "is inside /usr"),
])
def test_path_problem(path, owned, problem):
    found = checks.mlflow_path_problem(path, "mlflow_data_dir", owned)
    assert (problem in found and found) if problem else found == "", found


def test_env_problems():
    managed = ["MLFLOW_UVICORN_OPTS", "MLFLOW_PORT"]
    assert checks.mlflow_env_problems({"MLFLOW_ENABLE_X": "1", "_OK": "a b"}, managed) == []
    problems = checks.mlflow_env_problems(
        {"A\nB": "1", "1ABC": "x", "MLFLOW_PORT": "80", "NOTE": "a\nMLFLOW_PORT=1", "NUL": "a\0"}, managed)
    assert len(problems) == 5, problems
    assert "'A\\nB' is not a variable name" in problems[0]
    assert "MLFLOW_PORT is written by the role" in problems[2]
    assert "'NOTE' holds a line break" in problems[3]


def test_cidr_problems():
    assert checks.mlflow_cidr_problems(["10.0.4.0/24", "192.0.2.7/32", "2001:db8::/64"]) == []
    assert [p.split(":")[0] for p in checks.mlflow_cidr_problems(["10.0.0.0/33", "nonsense"])] == [
        "10.0.0.0/33", "nonsense"]


def pem_pair(tmp_path, name, days=1):
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=2))
            .not_valid_after(now + datetime.timedelta(days=days)).sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def test_tls_pair_problem(tmp_path):
    cert, key = pem_pair(tmp_path, "a")
    other_cert, other_key = pem_pair(tmp_path, "b")
    expired_cert, expired_key = pem_pair(tmp_path, "c", days=-1)
    assert checks.mlflow_tls_pair_problem(cert, key) == ""
    assert "does not match" in checks.mlflow_tls_pair_problem(cert, other_key)
    assert "expired on" in checks.mlflow_tls_pair_problem(expired_cert, expired_key)
    assert "is not a PEM certificate" in checks.mlflow_tls_pair_problem(key, key)
    assert "not an unencrypted PEM private key" in checks.mlflow_tls_pair_problem(cert, cert)
    assert "is not a PEM certificate" in checks.mlflow_tls_pair_problem(str(tmp_path / "missing.crt"), key)

"""Preflight checks of the mlflow roles: each returns what is wrong, in words, or nothing.

They run on the controller before anything on a host changes, so that a value that cannot
serve is refused instead of being found by a restart.
"""

import datetime
import posixpath
import re

DOCUMENTATION = """
  name: mlflow_checks
  short_description: Preflight checks of the mlflow roles (paths, env keys, TLS pairs, networks)
  description:
    - mlflow_path_problem(path, name, owned) -> why a path cannot be the role's, or ''.
    - mlflow_env_problems(env, managed) -> what is wrong with mlflow_env_extra, as a list.
    - mlflow_tls_pair_problem(cert_path, key_path, name) -> why a certificate and key cannot serve, or ''.
    - mlflow_cidr_problems(cidrs) -> the entries that are not networks, as a list.
"""

# Directories of the system itself: never a path of the role's own.
SYSTEM_DIRS = frozenset({
    "/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/media", "/mnt", "/opt",
    "/proc", "/root", "/run", "/sbin", "/srv", "/sys", "/tmp", "/usr", "/usr/bin", "/usr/lib", "/usr/local",
    "/usr/local/bin", "/usr/local/lib", "/usr/sbin", "/usr/share", "/var", "/var/backups", "/var/cache",
    "/var/lib", "/var/local", "/var/log", "/var/mail", "/var/opt", "/var/spool", "/var/tmp", "/var/www",
})
# Trees whose files belong to root: the service user is given nothing in them.
ROOT_TREES = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/proc", "/root", "/run", "/sbin",
              "/sys", "/usr")
ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def mlflow_path_problem(path, name, owned=False):
    """owned: the role hands the path to the service user (chown), so no system tree may hold it."""
    path = str(path)
    if not re.fullmatch(r"/[^\s]*", path) or posixpath.normpath(path) != path or path.startswith("//"):
        return f"{name} must be an absolute path, normalized and without spaces (got '{path}')"
    if path in SYSTEM_DIRS:
        return f"{name} must be an absolute path of its own, not the system directory '{path}'"
    tree = next((t for t in ROOT_TREES if path == t or path.startswith(t + "/")), None)
    if owned and tree:
        return (f"{name} ('{path}') is inside {tree}, whose files belong to root: the role would give "
                f"it to the service user")
    return ""


def mlflow_env_problems(env, managed):
    """Keys that are not variable names, values that would add lines, names the role writes itself."""
    problems = []
    for key, value in (env or {}).items():
        if not ENV_KEY.match(str(key)):
            problems.append(f"{key!r} is not a variable name ([A-Za-z_][A-Za-z0-9_]*)")
        elif key in managed:
            problems.append(f"{key} is written by the role from its own settings")
        if any(c in str(value) for c in "\n\r\0"):
            problems.append(f"the value of {str(key)!r} holds a line break or NUL")
    return problems


def _load(path):
    with open(path, "rb") as f:
        return f.read()


def mlflow_tls_pair_problem(cert_path, key_path, name="the certificate"):
    """The certificate parses, is valid now, and its public key is the key's."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        cert = x509.load_pem_x509_certificate(_load(cert_path))
    except (OSError, ValueError) as error:
        return f"{name} {cert_path} is not a PEM certificate: {error}"
    try:
        key = serialization.load_pem_private_key(_load(key_path), password=None)
    except (OSError, ValueError, TypeError) as error:
        return f"the key {key_path} is not an unencrypted PEM private key: {error}"
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if (cert.public_key().public_bytes(serialization.Encoding.PEM, public)
            != key.public_key().public_bytes(serialization.Encoding.PEM, public)):
        return f"the key {key_path} does not match {name} {cert_path} (another key pair)"
    now = datetime.datetime.now(datetime.timezone.utc)
    if cert.not_valid_after_utc < now:
        return f"{name} {cert_path} expired on {cert.not_valid_after_utc:%Y-%m-%d}"
    return ""


def mlflow_cidr_problems(cidrs):
    import ipaddress

    problems = []
    for cidr in cidrs or []:
        try:
            ipaddress.ip_network(str(cidr), strict=False)
        except ValueError as error:
            problems.append(f"{cidr}: {error}")
    return problems


class FilterModule:
    def filters(self):
        return {"mlflow_path_problem": mlflow_path_problem, "mlflow_env_problems": mlflow_env_problems,
                "mlflow_tls_pair_problem": mlflow_tls_pair_problem, "mlflow_cidr_problems": mlflow_cidr_problems}

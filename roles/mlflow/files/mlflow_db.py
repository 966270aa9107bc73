"""Inspect and migrate the schema of MLflow's databases.

Installed by the Ansible role `mlflow`, run with the conda env's Python as the service
user, with the service's own environment (systemd-run -p EnvironmentFile=...), so that no
database password is ever on a command line:

    mlflow_db.py status    JSON: each store's URI (without password), revision, latest revision, state
    mlflow_db.py upgrade   migrate the stores whose schema is out of date, one at a time

The stores are MLFLOW_BACKEND_STORE_URI, MLFLOW_REGISTRY_STORE_URI when set, the users
database of the basic-auth app when MLFLOW_AUTH_CONFIG_PATH is set, and that of the single
sign-on app (mlflow-oidc-auth) when OIDC_USERS_DB_URI is set. An empty single sign-on database
is migrated too (`fresh`: no server uses it yet; the app would otherwise create it from every
worker at once, racing). An upgrade
holds a lock for the whole migration (a PostgreSQL advisory lock, or a file lock beside a
SQLite database) and checks the revision again once it has the lock, so two runs never
migrate one database at the same time, and the second finds nothing to do. Each migration
is appended to MLFLOW_DB_MIGRATION_LOG (default: ./db-migrations.log).
"""

import configparser
import contextlib
import datetime
import fcntl
import importlib.metadata
import importlib.util
import json
import os
import pathlib
import sys

import sqlalchemy
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

# `status` reads MLflow's migration scripts from its package without importing MLflow (seconds of
# CPU on every run of the role); `upgrade` imports it to migrate.
MLFLOW_DIR = pathlib.Path(importlib.util.find_spec("mlflow").submodule_search_locations[0])
MIGRATIONS = {"tracking": (MLFLOW_DIR / "store" / "db_migrations", "alembic_version"),
              "auth": (MLFLOW_DIR / "server" / "auth" / "db" / "migrations", "alembic_version_auth")}
# The single sign-on app keeps its schema in a database of its own, with Alembic's default table.
OIDC_SPEC = importlib.util.find_spec("mlflow_oidc_auth")
if OIDC_SPEC is not None:
    MIGRATIONS["oidc"] = (pathlib.Path(OIDC_SPEC.submodule_search_locations[0]) / "db" / "migrations",
                          os.environ.get("OIDC_ALEMBIC_VERSION_TABLE", "alembic_version"))

# An arbitrary constant that names "MLflow schema migration" among advisory locks.
ADVISORY_LOCK_KEY = 0x4D4C464C4F57  # "MLFLOW"


def database_uris():
    """(role, uri) of every database: the backend, the registry when it is another database, and
    the users database of the basic-auth app (also read by mlflow_ops.py)."""
    found = [("backend", os.environ["MLFLOW_BACKEND_STORE_URI"])]
    registry = os.environ.get("MLFLOW_REGISTRY_STORE_URI", "")
    if registry and registry != found[0][1]:
        found.append(("registry", registry))
    auth_config = os.environ.get("MLFLOW_AUTH_CONFIG_PATH", "")
    if auth_config:
        # No interpolation: a URL-encoded password holds '%'.
        parser = configparser.ConfigParser(interpolation=None)
        parser.read(auth_config)
        found.append(("auth", parser["mlflow"]["database_uri"]))
    if os.environ.get("OIDC_USERS_DB_URI"):
        found.append(("oidc", os.environ["OIDC_USERS_DB_URI"]))
    return found


def stores():
    """(kind, uri) of every database: 'tracking' (with the registry), 'auth' or 'oidc'."""
    return [(role if role in ("auth", "oidc") else "tracking", uri) for role, uri in database_uris()]


def safe(uri):
    """The URI with any password masked, for output and logs."""
    return sqlalchemy.engine.make_url(uri).render_as_string(hide_password=True)


def inspect(kind, uri):
    """The store's revision against the newest one of this env's MLflow: empty (no MLflow tables
    yet), outdated, current, or newer (a revision this MLflow does not know: a later release made
    it). A users database made before MLflow versioned it counts as outdated."""
    scripts, version_table = MIGRATIONS[kind]
    directory = ScriptDirectory(str(scripts))
    head = directory.get_current_head()
    engine = sqlalchemy.create_engine(uri, poolclass=sqlalchemy.pool.NullPool)
    try:
        tables = sqlalchemy.inspect(engine).get_table_names()
        marker = "users" if kind in ("auth", "oidc") else version_table
        if marker not in tables:
            current, state = None, "empty"
        elif version_table not in tables:
            current, state = None, "outdated"
        else:
            with engine.connect() as conn:
                current = MigrationContext.configure(conn, opts={"version_table": version_table}).get_current_revision()
            state = "current" if current == head else "outdated" if known(directory, current) else "newer"
        return {"kind": kind, "uri": safe(uri), "revision": current, "latest": head, "state": state}
    finally:
        engine.dispose()


def known(directory, revision):
    try:
        return revision is None or directory.get_revision(revision) is not None
    except Exception:  # alembic raises its own errors for a revision it has no script of
        return False


@contextlib.contextmanager
def migration_lock(uri, engine):
    url = sqlalchemy.engine.make_url(uri)
    if url.get_backend_name() == "postgresql":
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": ADVISORY_LOCK_KEY})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": ADVISORY_LOCK_KEY})
    elif url.get_backend_name() == "sqlite" and url.database:
        with open(url.database + ".migration.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield
    else:
        yield


def upgrade(kind, uri, log_path):
    import mlflow
    from mlflow.store.db import utils

    engine = utils.create_sqlalchemy_engine(uri)
    try:
        with migration_lock(uri, engine):
            before = inspect(kind, uri)
            if before["state"] == "newer":
                raise SystemExit(f"the schema of {before['uri']} ({before['revision']}) is newer than MLflow "
                                 f"{importlib.metadata.version('mlflow')} knows: a later release migrated it")
            if before["state"] != "outdated" and not (kind == "oidc" and before["state"] == "empty"):
                return {**before, "migrated": False}
            if kind == "auth":
                from mlflow.server.auth.db import utils as auth_utils

                auth_utils.migrate(engine, "head")
            elif kind == "oidc":
                from mlflow_oidc_auth.db import utils as oidc_utils

                oidc_utils.migrate(engine, "head")
            else:
                utils._upgrade_db(engine)
            after = inspect(kind, uri)
    finally:
        engine.dispose()
    if after["state"] != "current":
        raise SystemExit(f"migration of {safe(uri)} ended at {after['revision']}, not {after['latest']}")
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    with open(log_path, "a") as log:
        log.write(
            f"{stamp} migrated {kind} store {after['uri']} from {before['revision']} to {after['revision']}"
            f" with mlflow {importlib.metadata.version('mlflow')}\n"
        )
    return {**after, "previous": before["revision"], "migrated": True}


def main(argv):
    if len(argv) != 2 or argv[1] not in ("status", "upgrade"):
        print(__doc__, file=sys.stderr)
        return 2
    if argv[1] == "status":
        result = [inspect(kind, uri) for kind, uri in stores()]
    else:
        log_path = os.environ.get("MLFLOW_DB_MIGRATION_LOG", "db-migrations.log")
        result = [upgrade(kind, uri, log_path) for kind, uri in stores()]
    print(json.dumps({"mlflow": importlib.metadata.version("mlflow"), "stores": result}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

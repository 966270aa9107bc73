"""Back up, restore and garbage-collect an MLflow tracking server.

Installed by the Ansible role `mlflow`, run with the conda env's Python as the service user, with
the service's environment file (mlflow-backup.service, mlflow-gc.service, or systemd-run
-p EnvironmentFile=...), so that passwords reach it only through the environment:

    mlflow_ops.py backup --dir DIR --keep N [--no-artifacts]
        A consistent copy of every database of the server (PostgreSQL: pg_dump; SQLite: its online
        backup API), then of the local artifacts, in DIR/mlflow-<UTC time>/ with a manifest.json
        (what each file holds, its size and sha256). Keeps the N newest such backups.
    mlflow_ops.py restore --from DIR
        Puts a backup made by `backup` into the stores this server is configured with: run it with
        MLflow stopped; migrate the schema afterwards (mlflow_db.py upgrade).
    mlflow_ops.py gc --older-than AGE --tracking-uri URL
        `mlflow gc`: runs deleted more than AGE ago are removed for good, with their artifacts
        (proxied artifacts through the server at URL, as its admin when basic auth is on, or under single
        sign-on with the token in MLFLOW_OPS_TRACKING_PASSWORD).

The databases are those mlflow_db.py migrates (MLFLOW_BACKEND_STORE_URI, MLFLOW_REGISTRY_STORE_URI
when it differs, the users database of the basic-auth app when MLFLOW_AUTH_CONFIG_PATH is set);
local artifacts are MLFLOW_ARTIFACTS_DESTINATION when it is a directory.
"""

import argparse
import contextlib
import datetime
import fcntl
import hashlib
import importlib.metadata
import json
import os
import pathlib
import shutil
import socket
import sqlite3
import subprocess
import sys
import tarfile

import sqlalchemy

# The role installs its helpers side by side: the databases are those the schema helper migrates.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mlflow_db import database_uris  # noqa: E402

FORMAT = 1
PREFIX = "mlflow-"


def local_artifacts():
    """The directory of proxied artifacts, or None when they live elsewhere (S3, or not proxied)."""
    if os.environ.get("MLFLOW_SERVE_ARTIFACTS", "false").lower() != "true":
        return None
    destination = os.environ.get("MLFLOW_ARTIFACTS_DESTINATION", "")
    if destination.startswith("file://"):
        destination = destination[len("file://"):]
    return pathlib.Path(destination) if destination.startswith("/") else None


def engine_of(uri):
    return sqlalchemy.engine.make_url(uri).get_backend_name()


def safe(uri):
    return sqlalchemy.engine.make_url(uri).render_as_string(hide_password=True)


def libpq(uri):
    """(libpq URI without password, environment with PGPASSWORD) for pg_dump and pg_restore."""
    url = sqlalchemy.engine.make_url(uri)
    env = dict(os.environ)
    if url.password:
        env["PGPASSWORD"] = url.password
    return url.set(drivername="postgresql", password=None).render_as_string(hide_password=False), env


def sha256_of(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def run(argv, env=None):
    result = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{argv[0]} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")


@contextlib.contextmanager
def exclusive(directory):
    """One backup or restore at a time in a directory."""
    with open(directory / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"another backup or restore holds {directory / '.lock'}") from None
        yield


def dump(uri, out):
    engine = engine_of(uri)
    if engine == "sqlite":
        path = sqlalchemy.engine.make_url(uri).database
        source = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        target = sqlite3.connect(out)
        try:
            with target:
                source.backup(target)
        finally:
            source.close()
            target.close()
    elif engine == "postgresql":
        dbname, env = libpq(uri)
        run(["pg_dump", "--format=custom", "--no-password", f"--file={out}", f"--dbname={dbname}"], env)
    else:
        raise SystemExit(f"no backup method for {engine} ({safe(uri)}): back it up with the database's own tools")


def backup(args):
    directory = pathlib.Path(args.dir)
    with exclusive(directory):
        for stale in directory.glob(".partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        partial = directory / f".partial-{stamp}"
        partial.mkdir()
        manifest = {"format": FORMAT, "created": stamp, "host": socket.getfqdn(),
                    "mlflow": importlib.metadata.version("mlflow"), "stores": [], "artifacts": None}
        # The databases first, then the artifacts: every artifact a backed-up run names is in the copy.
        for role, uri in database_uris():
            engine = engine_of(uri)
            name = f"{role}.{'sqlite' if engine == 'sqlite' else 'dump'}"
            dump(uri, partial / name)
            manifest["stores"].append({"role": role, "engine": engine, "uri": safe(uri), "file": name,
                                       "bytes": (partial / name).stat().st_size, "sha256": sha256_of(partial / name)})
        artifacts = local_artifacts()
        if artifacts is not None and args.artifacts:
            with tarfile.open(partial / "artifacts.tar.gz", "w:gz", compresslevel=1) as tar:
                tar.add(artifacts, arcname=".")
            manifest["artifacts"] = {"destination": str(artifacts), "file": "artifacts.tar.gz",
                                     "bytes": (partial / "artifacts.tar.gz").stat().st_size,
                                     "sha256": sha256_of(partial / "artifacts.tar.gz")}
        elif os.environ.get("MLFLOW_ARTIFACTS_DESTINATION") or os.environ.get("MLFLOW_DEFAULT_ARTIFACT_ROOT"):
            manifest["artifacts"] = {"destination": os.environ.get("MLFLOW_ARTIFACTS_DESTINATION")
                                     or os.environ.get("MLFLOW_DEFAULT_ARTIFACT_ROOT"), "file": None}
        (partial / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        final, n = directory / f"{PREFIX}{stamp}", 0
        while final.exists():  # two backups in one second
            n += 1
            final = directory / f"{PREFIX}{stamp}-{n}"
        partial.rename(final)
        kept = sorted(p for p in directory.glob(f"{PREFIX}*") if (p / "manifest.json").is_file())
        removed = kept[:-args.keep] if args.keep > 0 else []
        for old in removed:
            shutil.rmtree(old)
    print(json.dumps({"backup": str(final), "removed": [str(p) for p in removed], **manifest}))


def plain_members(tar, destination):
    """The archive's files and directories, refusing anything that would land outside destination."""
    root = os.path.realpath(destination)
    for member in tar.getmembers():
        target = os.path.realpath(os.path.join(root, member.name))
        if not (member.isfile() or member.isdir()) or os.path.commonpath([root, target]) != root:
            raise SystemExit(f"the artifact archive holds {member.name!r}, which is not a plain file inside it")
        member.mode &= 0o750
        yield member


def restore(args):
    source = pathlib.Path(args.source)
    manifest = json.loads((source / "manifest.json").read_text())
    if manifest.get("format") != FORMAT:
        raise SystemExit(f"{source}: backup format {manifest.get('format')}, this helper reads {FORMAT}")
    files = list(manifest["stores"]) + ([manifest["artifacts"]] if (manifest["artifacts"] or {}).get("file") else [])
    for item in files:
        if sha256_of(source / item["file"]) != item["sha256"]:
            raise SystemExit(f"{source / item['file']}: its checksum differs from the manifest's; nothing restored")
    targets = dict(database_uris())
    for item in manifest["stores"]:
        if item["role"] not in targets:
            raise SystemExit(f"the backup has a {item['role']} database, which this server is not configured with")
        if engine_of(targets[item["role"]]) != item["engine"]:
            raise SystemExit(f"the backup's {item['role']} database is {item['engine']}, this server's is "
                             f"{engine_of(targets[item['role']])}: nothing restored")
    artifacts = local_artifacts()
    if (manifest["artifacts"] or {}).get("file") and artifacts is None:
        raise SystemExit("the backup has local artifacts, this server keeps none locally: nothing restored")
    restored = []
    for item in manifest["stores"]:
        uri, path = targets[item["role"]], source / item["file"]
        if item["engine"] == "sqlite":
            database = pathlib.Path(sqlalchemy.engine.make_url(uri).database)
            incoming = database.with_name(database.name + ".restoring")
            shutil.copyfile(path, incoming)
            for leftover in ("-journal", "-wal", "-shm"):
                database.with_name(database.name + leftover).unlink(missing_ok=True)
            os.replace(incoming, database)
        else:
            dbname, env = libpq(uri)
            # Everything MLflow made in that database goes, then the dump comes back in one transaction.
            engine = sqlalchemy.create_engine(uri, poolclass=sqlalchemy.pool.NullPool)
            try:
                with engine.begin() as conn:
                    conn.execute(sqlalchemy.text("DROP OWNED BY CURRENT_USER"))
                    conn.execute(sqlalchemy.text("CREATE SCHEMA IF NOT EXISTS public"))
            finally:
                engine.dispose()
            run(["pg_restore", "--no-owner", "--no-privileges", "--single-transaction", "--exit-on-error",
                 "--no-password", f"--dbname={dbname}", str(path)], env)
        restored.append({"role": item["role"], "uri": safe(uri)})
    if (manifest["artifacts"] or {}).get("file"):
        artifacts.mkdir(parents=True, exist_ok=True)
        with tarfile.open(source / manifest["artifacts"]["file"]) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(artifacts, filter="data")
            else:  # Python before 3.11.4: the same refusals, by hand
                tar.extractall(artifacts, members=plain_members(tar, artifacts))
        restored.append({"role": "artifacts", "destination": str(artifacts)})
    print(json.dumps({"restored": restored, "from": str(source), "created": manifest["created"],
                      "mlflow": manifest["mlflow"]}))


def gc(args):
    # Proxied artifacts (mlflow-artifacts:/) are deleted through the server, as its admin.
    os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri
    if os.environ.get("MLFLOW_AUTH_ADMIN_USERNAME"):
        os.environ["MLFLOW_TRACKING_USERNAME"] = os.environ["MLFLOW_AUTH_ADMIN_USERNAME"]
        os.environ["MLFLOW_TRACKING_PASSWORD"] = os.environ["MLFLOW_AUTH_ADMIN_PASSWORD"]
    elif os.environ.get("MLFLOW_OPS_TRACKING_PASSWORD"):  # single sign-on: a service account's token
        os.environ["MLFLOW_TRACKING_USERNAME"] = os.environ["MLFLOW_OPS_TRACKING_USERNAME"]
        os.environ["MLFLOW_TRACKING_PASSWORD"] = os.environ["MLFLOW_OPS_TRACKING_PASSWORD"]
    if args.tracking_uri.startswith("https://"):
        # The server's own certificate, on loopback, need not name 127.0.0.1.
        os.environ["MLFLOW_TRACKING_INSECURE_TLS"] = "true"
    from mlflow.cli import cli

    # In-process, so that the backend's URI stays off the command line.
    cli.main(args=["gc", "--older-than", args.older_than,
                   "--backend-store-uri", os.environ["MLFLOW_BACKEND_STORE_URI"]], prog_name="mlflow")


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("backup")
    b.add_argument("--dir", required=True)
    b.add_argument("--keep", type=int, default=7)
    b.add_argument("--no-artifacts", dest="artifacts", action="store_false")
    r = sub.add_parser("restore")
    r.add_argument("--from", dest="source", required=True)
    g = sub.add_parser("gc")
    g.add_argument("--older-than", required=True)
    g.add_argument("--tracking-uri", required=True)
    args = parser.parse_args(argv)
    {"backup": backup, "restore": restore, "gc": gc}[args.command](args)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

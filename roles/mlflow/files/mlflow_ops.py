"""Back up, restore and garbage-collect an MLflow tracking server.

Installed by the Ansible role `mlflow`, run with the conda env's Python as the service user, with
the service's environment file (mlflow-backup.service, mlflow-gc.service, or systemd-run
-p EnvironmentFile=...), so that passwords reach it only through the environment:

    mlflow_ops.py backup --dir DIR --keep N [--no-artifacts] [--label LABEL]
        A consistent copy of every database of the server (PostgreSQL: pg_dump; SQLite: its online
        backup API), then of the local artifacts, in DIR/mlflow-<UTC time>[-LABEL]/ with a
        manifest.json (what each file holds, its size, sha256 and schema revision). Keeps the N
        newest unlabelled backups this host made (0: all); labelled ones are never pruned.
    mlflow_ops.py restore --from DIR
        Puts a backup made by `backup` into the stores this server is configured with: run it with
        MLflow stopped; migrate the schema afterwards (mlflow_db.py upgrade). Everything is checked
        before anything changes (checksums, that this MLflow knows the backup's schema, that
        pg_restore reads each dump). The PostgreSQL databases are replaced in transactions that commit
        only once every dump was read in full, so a failure rolls all of them back; a SQLite file is
        kept beside the restored one as <name>.before-restore.
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
import re

import sqlalchemy

# The role installs its helpers side by side: the databases are those the schema helper migrates.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mlflow_db import MIGRATIONS, database_uris, inspect, known, stores  # noqa: E402

FORMAT = 1
PREFIX = "mlflow-"
# Backups of the timer, which `--keep` prunes: mlflow-<UTC time>, -N for a second one that second.
# What psql echoes once it has run a whole dump (PostgresRestore).
READY = "mlflow-restore-ready"
PRUNABLE = re.compile(r"^mlflow-[0-9]{8}T[0-9]{6}Z(-[0-9]+)?$")


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


def write_backup(partial, stamp, args):
    """The databases first, then the artifacts: every artifact a backed-up run names is in the copy."""
    manifest = {"format": FORMAT, "created": stamp, "host": socket.getfqdn(),
                "mlflow": importlib.metadata.version("mlflow"), "stores": [], "artifacts": None}
    revisions = {uri: inspect(kind, uri)["revision"] for kind, uri in stores()}
    for role, uri in database_uris():
        engine = engine_of(uri)
        name = f"{role}.{'sqlite' if engine == 'sqlite' else 'dump'}"
        dump(uri, partial / name)
        manifest["stores"].append({"role": role, "engine": engine, "uri": safe(uri), "file": name,
                                   "revision": revisions.get(uri),
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
    return manifest


def backup(args):
    directory = pathlib.Path(args.dir)
    with exclusive(directory):
        for stale in directory.glob(".partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        partial = directory / f".partial-{stamp}"
        try:
            partial.mkdir()
            manifest = write_backup(partial, stamp, args)
        except (OSError, sqlite3.Error, tarfile.TarError, SystemExit) as error:
            # A full disk, or a database that cannot be read: no half backup is left to take space.
            shutil.rmtree(partial, ignore_errors=True)
            raise SystemExit(f"the backup failed, and what it had written is removed: {error}") from None
        suffix = f"-{args.label}" if args.label else ""
        final, n = directory / f"{PREFIX}{stamp}{suffix}", 0
        while final.exists():  # two backups in one second
            n += 1
            final = directory / f"{PREFIX}{stamp}-{n}{suffix}"
        partial.rename(final)
        # Only this host's: servers that share a backup mount keep each other's backups.
        kept = sorted(p for p in directory.glob(f"{PREFIX}*") if PRUNABLE.match(p.name)
                      and (p / "manifest.json").is_file() and made_here(p, manifest["host"]))
        removed = kept[:-args.keep] if args.keep > 0 else []
        for old in removed:
            shutil.rmtree(old)
    print(json.dumps({"backup": str(final), "removed": [str(p) for p in removed], **manifest}))


def made_here(backup, host):
    try:
        return json.loads((backup / "manifest.json").read_text()).get("host") == host
    except (OSError, ValueError):
        return False


def plain_members(tar, destination):
    """The archive's files and directories, refusing anything that would land outside destination."""
    root = os.path.realpath(destination)
    for member in tar.getmembers():
        target = os.path.realpath(os.path.join(root, member.name))
        if not (member.isfile() or member.isdir()) or os.path.commonpath([root, target]) != root:
            raise SystemExit(f"the artifact archive holds {member.name!r}, which is not a plain file inside it")
        member.mode &= 0o750
        yield member


def check_schema(item, kind):
    """Refuse a backup whose schema this MLflow does not know (a later release made it)."""
    revision = item.get("revision")
    if revision is None:
        return
    from alembic.script import ScriptDirectory

    if not known(ScriptDirectory(str(MIGRATIONS[kind][0])), revision):
        raise SystemExit(f"the backup's {item['role']} database has schema revision {revision}, which MLflow "
                         f"{importlib.metadata.version('mlflow')} does not know (the backup was made with a later "
                         f"release): install that release to restore it; nothing restored")


def check_sqlite(path):
    """The file is an intact SQLite database (checked on a copy, before the live one is touched)."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            result = conn.execute("PRAGMA integrity_check").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.DatabaseError as error:
        result = str(error)
    if result != "ok":
        raise SystemExit(f"{path} is not an intact SQLite database ({result}); nothing restored")


class PostgresRestore:
    """Replaces what MLflow made in one database with a dump, in one transaction left open: pg_restore
    writes SQL that psql runs after the drop. finish() commits only when every database of the
    backup was read in full (restore() calls it for all of them), and rolls back otherwise."""

    def __init__(self, uri, dump_path):
        self.uri = uri
        dbname, env = libpq(uri)
        reader = subprocess.Popen(["pg_restore", "--no-owner", "--no-privileges", "--file=-", str(dump_path)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        self.writer = subprocess.Popen(["psql", "--no-password", "--quiet", "--no-psqlrc", "--set=ON_ERROR_STOP=1",
                                        f"--dbname={dbname}"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, env=env)
        try:
            # Query output goes nowhere; only the marker below reaches psql's standard output.
            self.writer.stdin.write(b"\\o /dev/null\nSET client_min_messages = warning;\nBEGIN;\nDROP OWNED BY CURRENT_USER;\n"
                                    b"CREATE SCHEMA IF NOT EXISTS public;\n")
            shutil.copyfileobj(reader.stdout, self.writer.stdin)
        except BrokenPipeError:  # psql stopped at an error (ON_ERROR_STOP): its transaction is gone
            reader.kill()
        read_all = reader.wait() == 0
        self.errors = reader.stderr.read().decode(errors="replace")
        self.read_ok = False
        if read_all:
            # psql has run every statement without an error once it echoes the marker (else it exits).
            try:
                self.writer.stdin.write(f"\n\\echo {READY}\n".encode())
                self.writer.stdin.flush()
                self.read_ok = self.writer.stdout.readline().decode().strip() == READY
            except BrokenPipeError:
                pass

    def finish(self, commit):
        """COMMIT or ROLLBACK; True when the dump is in."""
        try:
            self.writer.stdin.write(b"COMMIT;\n" if commit and self.read_ok else b"ROLLBACK;\n")
            self.writer.stdin.close()
        except BrokenPipeError:
            pass
        ok = self.writer.wait() == 0 and commit and self.read_ok
        self.errors += self.writer.stderr.read().decode(errors="replace")
        return ok


def restore_sqlite(uri, path):
    """Swap the backup in; the database it replaces stays beside it as <name>.before-restore."""
    database = pathlib.Path(sqlalchemy.engine.make_url(uri).database)
    incoming = database.with_name(database.name + ".restoring")
    shutil.copyfile(path, incoming)
    check_sqlite(incoming)
    kept = database.with_name(database.name + ".before-restore")
    if database.exists():
        kept.unlink(missing_ok=True)
        try:  # the online backup API: the copy includes what is still in the write-ahead log
            dump(uri, kept)
        except sqlite3.DatabaseError:  # a damaged database, kept as it is
            shutil.copyfile(database, kept)
    for leftover in ("-journal", "-wal", "-shm"):
        database.with_name(database.name + leftover).unlink(missing_ok=True)
    os.replace(incoming, database)
    return str(kept) if kept.exists() else None


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
    kinds = {uri: kind for kind, uri in stores()}
    for item in manifest["stores"]:
        if item["role"] not in targets:
            raise SystemExit(f"the backup has a {item['role']} database, which this server is not configured with")
        if engine_of(targets[item["role"]]) != item["engine"]:
            raise SystemExit(f"the backup's {item['role']} database is {item['engine']}, this server's is "
                             f"{engine_of(targets[item['role']])}: nothing restored")
        check_schema(item, kinds[targets[item["role"]]])
        if item["engine"] == "sqlite":
            check_sqlite(source / item["file"])
        else:  # a dump of a later pg_dump, or a damaged one, fails here
            run(["pg_restore", "--list", str(source / item["file"])])
    artifacts = local_artifacts()
    if (manifest["artifacts"] or {}).get("file") and artifacts is None:
        raise SystemExit("the backup has local artifacts, this server keeps none locally: nothing restored")
    restored = []
    # PostgreSQL: every database's transaction stays open until all of them have read their dump.
    pending = [PostgresRestore(targets[item["role"]], source / item["file"])
               for item in manifest["stores"] if item["engine"] == "postgresql"]
    complete = all(p.read_ok for p in pending)
    if not all([p.finish(complete) for p in pending]):
        for p in pending:
            if p.errors.strip():
                print(f"{safe(p.uri)}: {p.errors.strip()[-1500:]}", file=sys.stderr)
        raise SystemExit("the restore failed and was rolled back in every database, which are as they were "
                         "(the errors are above)")
    restored += [{"role": item["role"], "uri": safe(targets[item["role"]])}
                 for item in manifest["stores"] if item["engine"] == "postgresql"]
    for item in manifest["stores"]:
        if item["engine"] == "sqlite":
            uri = targets[item["role"]]
            restored.append({"role": item["role"], "uri": safe(uri),
                             "kept": restore_sqlite(uri, source / item["file"])})
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


def label(text):
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", text):
        raise argparse.ArgumentTypeError(f"{text!r}: letters, digits, '.', '_' and '-' only")
    return text


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("backup")
    b.add_argument("--dir", required=True)
    b.add_argument("--keep", type=int, default=7)
    b.add_argument("--no-artifacts", dest="artifacts", action="store_false")
    b.add_argument("--label", type=label)
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

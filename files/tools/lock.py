"""Hash-locked Python packages for the MLflow conda env: one wheel per package, per Python and architecture.

    lock.py generate [--mlflow V] [--psycopg2 V] [--boto3 V] [--uv V] [--prometheus-flask-exporter V]
                     [--oidc-auth V]
                     [--python 3.11 ...] [--arch x86_64 ...] [--out-dir DIR] [--extra PKG==V ...] [--upgrade]
    lock.py bump V      set mlflow_version in the role's defaults and specs, lock it, drop the old default locks
    lock.py check       offline lint: the role's locks match its pinned versions, every lock is well formed

`generate` resolves the top-level requirements with `uv pip compile` for CPython X.Y on manylinux
(glibc 2.35, the oldest supported OS: Ubuntu 22.04), then asks the package index (PEP 691 JSON;
PIP_INDEX_URL or PyPI) for the files of each pinned version and keeps exactly one: the wheel a host
of that platform prefers, by the same tag priority pip and uv use. Each lock line carries that
file's sha256, and the comment above it the file's name, so a wheelhouse is reproducible to the
byte and a changed file is refused. Locks are written as
`<out-dir>/mlflow-<version>-py<X.Y>-<arch>.txt`; their header names the top-level requirements,
which the role compares with its variables before it uses a lock. A lock that is made again keeps
the versions of the one it replaces wherever the requirements allow (a new requirement adds its
own packages and changes only the pins it conflicts with), unless --upgrade is given.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request

import yaml
from packaging import tags
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename

ROOT = pathlib.Path(__file__).resolve().parents[2]
ROLE = ROOT / "roles" / "mlflow"
ROLE_LOCKS = ROLE / "files" / "locks"
DEFAULTS = ROLE / "defaults" / "main.yml"
SPECS = ROLE / "meta" / "argument_specs.yml"
sys.path.insert(0, str(ROLE / "library"))
from mlflow_wheelhouse import read_lock  # noqa: E402  (the role's parser of locks)

PYTHONS = ["3.11", "3.12"]
ARCHS = ["x86_64", "aarch64"]
GLIBC_MINOR = 35  # Ubuntu 22.04; Debian 12 has 2.36, Ubuntu 24.04 2.39


def requires(pins: dict) -> list[str]:
    """The top-level requirements of the env, as the role states them (see _mlflow_requires)."""
    return ([f"mlflow[auth]=={pins['mlflow_version']}", f"psycopg2-binary=={pins['mlflow_psycopg2_version']}",
             f"boto3=={pins['mlflow_boto3_version']}", f"uv=={pins['mlflow_uv_version']}"]
            + [f"prometheus-flask-exporter=={pins['mlflow_prometheus_flask_exporter_version']}",
               f"mlflow-oidc-auth=={pins['mlflow_oidc_auth_version']}"]
            + list(pins.get("mlflow_pip_extra_packages") or []))


def lock_name(version: str, python: str, arch: str) -> str:
    return f"mlflow-{version}-py{python}-{arch}.txt"


def platform_tags(arch: str) -> list[str]:
    """manylinux tags a glibc-2.35 host accepts, most specific first (as packaging/pip order them)."""
    out = []
    for minor in range(GLIBC_MINOR, 4, -1):
        out.append(f"manylinux_2_{minor}_{arch}")
        legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}.get(minor)
        if legacy:
            out.append(f"{legacy}_{arch}")
    return out + [f"linux_{arch}"]


def supported_tags(python: str, arch: str) -> list[tags.Tag]:
    version = tuple(int(p) for p in python.split("."))
    plats = platform_tags(arch)
    interpreter = f"cp{version[0]}{version[1]}"
    return list(tags.cpython_tags(version, platforms=plats)) + list(tags.compatible_tags(version, interpreter, plats))


@functools.cache
def index_files(project: str) -> list[dict]:
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    request = urllib.request.Request(f"{index}/{canonicalize_name(project)}/",
                                     headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)["files"]


def best_wheel(name: str, version: str, allowed: set[str], ranking: dict[tags.Tag, int]) -> dict:
    candidates = []
    for f in index_files(name):
        if not f["filename"].endswith(".whl") or f.get("yanked"):
            continue
        try:
            wheel_name, wheel_version, _, wheel_tags = parse_wheel_filename(f["filename"])
        except InvalidWheelFilename:  # ancient releases
            continue
        if canonicalize_name(wheel_name) != canonicalize_name(name) or str(wheel_version) != version:
            continue
        rank = min((ranking[t] for t in wheel_tags if t in ranking), default=None)
        sha256 = f["hashes"].get("sha256")
        if rank is not None and sha256 in allowed:
            candidates.append((rank, f["filename"], sha256))
    if not candidates:
        raise SystemExit(f"{name}=={version}: no wheel for this platform on the index (sdist only?)")
    _, filename, sha256 = min(candidates)
    return {"name": name, "version": version, "filename": filename, "sha256": sha256}


def resolve(reqs: list[str], python: str, arch: str, keep: dict[str, str] | None = None) -> list[dict]:
    """Pins and wheels for reqs; `keep` (name -> version, from the lock being replaced) is what uv
    prefers for every package that is not itself a top-level requirement: a pin stays unless the
    requirements now exclude it (a new top-level package may need an older or newer dependency)."""
    uv = shutil.which("uv") or str(pathlib.Path(sys.executable).with_name("uv"))
    top = {canonicalize_name(r.split("==")[0].split("[")[0]) for r in reqs}
    with tempfile.TemporaryDirectory() as tmp:
        source, output = pathlib.Path(tmp, "requirements.in"), pathlib.Path(tmp, "requirements.txt")
        source.write_text("\n".join(reqs) + "\n")
        # uv pip compile takes the pins of an existing output file as preferences.
        output.write_text("".join(f"{name}=={version}\n" for name, version in sorted((keep or {}).items())
                                  if name not in top))
        subprocess.run([uv, "pip", "compile", "--quiet", "--generate-hashes", "--no-header", "--no-annotate",
                        "--python-version", python, "--python-platform", f"{arch}-manylinux_2_{GLIBC_MINOR}",
                        "--output-file", str(output), str(source)], check=True)
        text = output.read_text().replace("\\\n", " ")
    ranking = {t: i for i, t in enumerate(supported_tags(python, arch))}
    wanted = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        spec, *hashes = line.split()
        name, version = spec.split("==")
        allowed = {h.split(":", 1)[1] for h in hashes if h.startswith("--hash=sha256:")}
        wanted.append((name.split("[")[0], version, allowed))
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda w: best_wheel(*w, ranking), wanted))


def write_lock(path: pathlib.Path, reqs: list[str], python: str, arch: str, pinned: list[dict]) -> None:
    lines = [
        f"# {path.name}: the Python packages of the MLflow conda env, one wheel each,",
        f"# for CPython {python} on Linux {arch} (manylinux, glibc 2.{GLIBC_MINOR} or newer).",
        "# Generated by `make lock` (files/tools/lock.py); do not edit. Installed with hashes required.",
        "# requires: " + " ".join(reqs),
    ]
    for p in sorted(pinned, key=lambda p: canonicalize_name(p["name"])):
        lines += [f"# {p['filename']}", f"{canonicalize_name(p['name'])}=={p['version']} --hash=sha256:{p['sha256']}"]
    path.write_text("\n".join(lines) + "\n")


def generate(pins_given: dict, pythons: list[str], archs: list[str], out_dir: pathlib.Path,
             extra: list[str], upgrade: bool = False) -> list[pathlib.Path]:
    pins = yaml.safe_load(DEFAULTS.read_text())
    pins.update({k: v for k, v in pins_given.items() if v})
    pins["mlflow_pip_extra_packages"] = extra or pins.get("mlflow_pip_extra_packages") or []
    reqs = requires(pins)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for python in pythons:
        for arch in archs:
            path = out_dir / lock_name(pins["mlflow_version"], python, arch)
            keep = {} if upgrade or not path.exists() else {
                canonicalize_name(p["name"]): p["version"] for p in read_lock(path)["packages"]}
            write_lock(path, reqs, python, arch, resolve(reqs, python, arch, keep))
            print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
            written.append(path)
    return written


def bump(version: str) -> None:
    if not re.fullmatch(r"\d+\.\d+\.\d+", version):
        raise SystemExit(f"bump: '{version}' is not an exact version such as 3.17.2")
    old = yaml.safe_load(DEFAULTS.read_text())["mlflow_version"]
    written = generate({"mlflow_version": version}, PYTHONS, ARCHS, ROLE_LOCKS, [])
    for path, pattern in ((DEFAULTS, r'^(mlflow_version: )"[^"]*"'), (SPECS, None)):
        text = path.read_text()
        if pattern:
            text = re.sub(pattern, rf'\g<1>"{version}"', text, count=1, flags=re.M)
        else:
            text = re.sub(r'(\n      mlflow_version:\n        type: str\n        default: )"[^"]*"',
                          rf'\g<1>"{version}"', text, count=1)
        path.write_text(text)
    for stale in ROLE_LOCKS.glob(f"mlflow-{old}-py*.txt"):
        if stale not in written:
            stale.unlink()
            print(f"removed {stale.relative_to(ROOT)}")


def check() -> int:
    pins = yaml.safe_load(DEFAULTS.read_text())
    problems = []
    expected = requires(pins)
    for python in PYTHONS:
        for arch in ARCHS:
            path = ROLE_LOCKS / lock_name(pins["mlflow_version"], python, arch)
            if not path.exists():
                problems.append(f"missing {path.relative_to(ROOT)}: run `make lock`")
    for path in sorted(ROOT.glob("**/locks/mlflow-*-py*.txt")):
        if ".venv" in path.parts or ".cache" in path.parts:
            continue
        rel = path.relative_to(ROOT)
        try:
            lock = read_lock(path)
        except ValueError as error:
            problems.append(str(error))
            continue
        version = re.match(r"mlflow-(.+)-py\d+\.\d+-(x86_64|aarch64)\.txt$", path.name)
        if not version or f"mlflow[auth]=={version.group(1)}" not in lock["requires"]:
            problems.append(f"{rel}: its header does not require the MLflow its name says: {lock['requires']}")
        if path.parent == ROLE_LOCKS and lock["requires"] != expected and version.group(1) == pins["mlflow_version"]:
            problems.append(f"{rel}: requires {lock['requires']}, the role's defaults pin {expected}: run `make lock`")
        names = {canonicalize_name(r.split("==")[0].split("[")[0]) for r in lock["requires"]}
        locked = {canonicalize_name(p["name"]): p["version"] for p in lock["packages"]}
        for req in lock["requires"]:
            name, _, want = req.partition("==")
            have = locked.get(canonicalize_name(name.split("[")[0]))
            if have is None or (want and have != want):
                problems.append(f"{rel}: {req} is not what the lock pins ({have})")
        if not names <= set(locked):
            problems.append(f"{rel}: top-level packages missing from the lock: {sorted(names - set(locked))}")
    print("\n".join(problems) or "every lock matches its pins")
    return 1 if problems else 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate")
    gen.add_argument("--mlflow", help="default: the role's mlflow_version")
    gen.add_argument("--psycopg2", help="default: the role's mlflow_psycopg2_version")
    gen.add_argument("--boto3", help="default: the role's mlflow_boto3_version")
    gen.add_argument("--uv", help="default: the role's mlflow_uv_version")
    gen.add_argument("--prometheus-flask-exporter", help="default: the role's mlflow_prometheus_flask_exporter_version")
    gen.add_argument("--oidc-auth", help="default: the role's mlflow_oidc_auth_version")
    gen.add_argument("--upgrade", action="store_true", help="newest versions, not those of the lock replaced")
    gen.add_argument("--python", nargs="+", default=PYTHONS)
    gen.add_argument("--arch", nargs="+", default=ARCHS, choices=ARCHS)
    gen.add_argument("--out-dir", type=pathlib.Path, default=ROLE_LOCKS)
    gen.add_argument("--extra", nargs="*", default=[])
    sub.add_parser("bump").add_argument("version")
    sub.add_parser("check")
    args = parser.parse_args(argv)
    if args.command == "generate":
        pins = {"mlflow_version": args.mlflow, "mlflow_psycopg2_version": args.psycopg2,
                "mlflow_boto3_version": args.boto3, "mlflow_uv_version": args.uv,
                "mlflow_prometheus_flask_exporter_version": args.prometheus_flask_exporter,
                "mlflow_oidc_auth_version": args.oidc_auth}
        generate(pins, args.python, args.arch, args.out_dir.resolve(), args.extra, args.upgrade)
    elif args.command == "bump":
        bump(args.version)
    else:
        return check()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""`make bench`: the MLflow server as the role deploys it, against the container it replaces, side by side.

One run, on this machine, with the project's own systemd containers (molecule/shared/create.yml):

1. Deploy timings: a cold converge of one host (SQLite), of three hosts in one play (the benchmark host
   with PostgreSQL, and two SQLite hosts), an idempotent re-run of the three (--compare-pipelining: also
   without pipelining), and --check on a converged host; role defaults.
2. The benchmark host: PostgreSQL (roles/postgresql) and MLflow (roles/mlflow) on one container, deployed
   with site.yml and the role's defaults (by the three-host play of step 1). Two servers are compared on it, the same MLflow env, the same
   PostgreSQL database, one at a time:
     seed  `mlflow server --backend-store-uri <pg> --default-artifact-root <dir> --host 0.0.0.0 --port 5000`,
           every other setting MLflow's default (what the tracking server container runs);
     role  mlflow.service exactly as the role's defaults wrote it for this host.
   The data the operations read (--seed-runs runs, a 1,000-step metric, the files to download) is
   written once, through the server the deploy started, before the phases and outside them.
   Configurations alternate, each repeated --reps times (default 3); each phase starts the server (time to
   a healthy /health), runs every operation of bench/loadgen.py at fixed concurrency for a bounded time,
   and samples the unit's memory (systemd's MemoryCurrent, every second) and processes, and
   PostgreSQL's connections.
3. Ceilings on the same host: PostgreSQL's raw insert rate of the same metric rows, and the disk and
   host-to-container copy rates of the artifact file.
4. bench/results/<date>.md with the machine, the versions, the tables and PNG charts.

    python bench/bench.py [--reps 3] [--duration 3] [--configs seed,role] [--skip-deploy-timings]
                          [--compare-pipelining] [--keep]

Traffic goes only to the containers this script starts (loadgen's allow_hosts) and to loopback.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import loadgen  # noqa: E402

BENCH_HOST = "mlflow-bench"
DEPLOY_HOSTS = ["mlflow-deploy-1", "mlflow-deploy-2", "mlflow-deploy-3"]
NETWORK = "mlflow-bench"
OPS = ["health", "log-batch", "log-batch-1000", "search-runs", "get-run", "get-metric-history", "create-run",
       "create-model-version", "artifact-upload-1mb", "artifact-download-1mb", "artifact-upload-200mb",
       "artifact-download-200mb", "mixed", "log-batch x2"]
# "x2": the same operation at twice the benchmark's concurrency (graceful degradation, not a stall).
DOUBLE = {"log-batch x2": "log-batch"}
BIG = {"artifact-upload-200mb", "artifact-download-200mb"}
# Every operation's data, the 200 MB file to download included (not in loadgen.seed()'s default set).
SEEDED = [op for op in loadgen.OPERATIONS if op != "mixed"]
ENV = "/opt/miniconda3/envs/mlflow/bin"
# Variants of the role's server for the tuning report: mlflow.service with an extra environment file
# that overrides the role's. "previous": the role's defaults before the benchmark tuned them.
VARIANTS = {
    "role-previous": 'MLFLOW_WORKERS="4"\nMLFLOW_SERVER_ENABLE_JOB_EXECUTION="true"\n'
                     'MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW="10"\nMLFLOW_UVICORN_OPTS=""\n',
    "role-uvloop": None,  # the role's options plus --loop uvloop --http httptools (set at run time)
}
SEED_UNIT = """[Unit]
Description=MLflow as the tracking server container runs it (benchmark only)
[Service]
User=mlflow
Group=mlflow
WorkingDirectory=/var/lib/mlflow-seed
EnvironmentFile=/etc/mlflow-seed.env
# Accounting only (systemd's default on most hosts; said here so MemoryCurrent is there to read).
MemoryAccounting=yes
ExecStart={env}/mlflow server --backend-store-uri postgresql+psycopg2://mlflow@127.0.0.1:5432/mlflow \
--default-artifact-root /var/lib/mlflow-seed/artifacts --host 0.0.0.0 --port 5000
"""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def sh(*argv: str, check: bool = True, capture: bool = True, env: dict | None = None, timeout: int = 3600):
    result = subprocess.run(argv, capture_output=capture, text=True, env={**os.environ, **(env or {})},
                            timeout=timeout, cwd=ROOT)
    if check and result.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:6])} ... failed ({result.returncode}):\n"
                         f"{(result.stdout or '')[-4000:]}\n{(result.stderr or '')[-2000:]}")
    return result


def dexec(*argv: str, check: bool = True, stdin: str | None = None) -> str:
    result = subprocess.run(["docker", "exec", "-i", BENCH_HOST, *argv], input=stdin, capture_output=True,
                            text=True, timeout=600)
    if check and result.returncode != 0:
        raise SystemExit(f"docker exec {' '.join(argv)} failed: {result.stderr[-2000:]}")
    return result.stdout


# --- containers and deploys --------------------------------------------------------------------------

def harness(playbook: str, names: list[str], workdir: pathlib.Path) -> None:
    """molecule/shared/{create,destroy}.yml, the project's systemd containers, outside Molecule."""
    platforms = [{"name": n, "networks": [{"name": NETWORK}], "docker_networks": [{"name": NETWORK}]} for n in names]
    spec = workdir / f"{playbook}-platforms.json"
    spec.write_text(json.dumps({"molecule_yml": {"platforms": platforms}}))
    sh("ansible-playbook", str(ROOT / "molecule" / "shared" / f"{playbook}.yml"), "-e", f"@{spec}",
       env={"MOLECULE_PROJECT_DIRECTORY": str(ROOT), "ANSIBLE_STDOUT_CALLBACK": "default"})


def inventory(workdir: pathlib.Path, db_password: str) -> pathlib.Path:
    """The benchmark host in mlflow and mlflow_db; the deploy hosts in mlflow; role defaults otherwise."""
    common = {
        "mlflow_miniconda_installer_local_path": os.environ.get("MLFLOW_TEST_MINICONDA_INSTALLER", ""),
        "mlflow_miniconda_installer_sha256": os.environ.get("MLFLOW_TEST_MINICONDA_SHA256", ""),
        "mlflow_ca_bundle_src": os.environ.get("MLFLOW_CA_BUNDLE", ""),
        "mlflow_local_cache_path": str(ROOT / ".cache" / "controller"),
    }
    # The database's only client is the benchmark host itself (site.yml gathers the addresses of a
    # database's clients even outside --limit, and the deploy hosts come and go).
    bench = {"mlflow_db_type": "postgresql", "mlflow_db_host": "127.0.0.1", "mlflow_db_password": db_password,
             "postgresql_mlflow_password": db_password, "postgresql_mlflow_clients_group": "mlflow_bench"}
    data = {"all": {"vars": {"ansible_connection": "community.docker.docker", **common}, "children": {
        "mlflow": {"hosts": {BENCH_HOST: bench, **{h: {} for h in DEPLOY_HOSTS}}},
        "mlflow_bench": {"hosts": {BENCH_HOST: {}}},
        "mlflow_db": {"hosts": {BENCH_HOST: {}}}}}}
    path = workdir / "inventory.json"
    path.write_text(json.dumps(data))
    path.chmod(0o600)
    return path


def play(inv: pathlib.Path, limit: str, *extra: str, env: dict | None = None) -> tuple[float, str]:
    start = time.monotonic()
    result = sh("ansible-playbook", "-i", str(inv), "site.yml", "--limit", limit, *extra, env=env)
    recap = [line for line in result.stdout.splitlines() if " : ok=" in line]
    return time.monotonic() - start, "; ".join(" ".join(line.split()) for line in recap)


def deploy_timings(inv: pathlib.Path, compare_pipelining: bool) -> list[dict]:
    """The three hosts of one play are the benchmark host (PostgreSQL and MLflow) and two SQLite hosts:
    deploying the benchmark host is itself measured, not paid for twice."""
    rows = []
    three = ",".join([BENCH_HOST] + DEPLOY_HOSTS[1:])
    runs = [
        ("cold converge, 1 host (SQLite)", DEPLOY_HOSTS[0], [], {}),
        ("cold converge, 3 hosts in one play (one with PostgreSQL)", three, [], {}),
        ("idempotent re-run, the same 3 hosts (pipelining on)", three, [], {}),
    ] + ([("idempotent re-run, the same 3 hosts (pipelining off)", three, [], {"ANSIBLE_PIPELINING": "0"})]
         if compare_pipelining else []) + [
        ("--check on a converged host (SQLite)", DEPLOY_HOSTS[0], ["--check"], {}),
    ]
    for label, limit, extra, env in runs:
        log(f"deploy timing: {label}")
        seconds, recap = play(inv, limit, *extra, env={"ANSIBLE_PIPELINING": "1", **env})
        rows.append({"what": label, "seconds": round(seconds, 1), "recap": recap})
    return rows


# --- measurements on the benchmark host ----------------------------------------------------------------

def container_ip(name: str) -> str:
    return sh("docker", "inspect", name, "--format", f"{{{{(index .NetworkSettings.Networks \"{NETWORK}\").IPAddress}}}}"
              ).stdout.strip()


def unit_sample(unit: str) -> tuple[int, int]:
    """(memory in bytes, processes) of the unit: systemd's MemoryCurrent (its cgroup's memory, on cgroup
    v1 and v2 alike) and the processes whose cgroup is the unit's."""
    out = dexec("bash", "-c", f"systemctl show {unit} -p MemoryCurrent --value; "
                f"grep -l '/{unit}$' /proc/[0-9]*/cgroup 2>/dev/null | wc -l").split()
    return int(out[0]), int(out[1])


def db_connections() -> int:
    out = dexec("runuser", "-u", "postgres", "--", "psql", "-tAc",
                "select count(*) from pg_stat_activity where usename = 'mlflow'", check=False)
    return int(out.strip() or 0)


def wait_healthy(url: str, timeout: float = 240) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200 and response.read().strip() == b"OK":
                    return time.monotonic() - start
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url}/health did not answer OK within {timeout} s")


class Sampler(threading.Thread):
    """Samples the unit's memory, its process count and PostgreSQL's connections every second."""

    def __init__(self, unit: str):
        super().__init__(daemon=True)
        self.unit, self.stop, self.memory, self.procs, self.connections = unit, threading.Event(), [], [], []

    def run(self) -> None:
        while not self.stop.wait(1.0):
            try:
                memory, procs = unit_sample(self.unit)
                connections = db_connections()
            except (subprocess.CalledProcessError, ValueError, IndexError):
                continue
            self.memory.append(memory)
            self.procs.append(procs)
            self.connections.append(connections)


def summarize(report: loadgen.Report, op: str) -> dict:
    """requests/s, p50/p99 (ms) and errors of one operation; for `mixed`, over all its requests."""
    d = report.as_dict()
    if op != "mixed":
        s = d["ops"].get(op, {})
        return {"requests_per_s": s.get("rps", 0), "p50_ms": s.get("p50_ms"), "p99_ms": s.get("p99_ms"),
                "errors": s.get("errors", {}), "mb_per_s": s.get("mb_per_s"), "error_samples": s.get("error_samples")}
    latencies = sorted(x for s in report.ops.values() for x in s.latencies_ms)
    errors: dict[str, int] = {}
    for s in report.ops.values():
        for kind, n in s.errors.items():
            errors[kind] = errors.get(kind, 0) + n
    pick = (lambda q: latencies[max(0, -(-len(latencies) * q // 100) - 1)] if latencies else None)
    return {"requests_per_s": d["total_rps"], "p50_ms": pick(50), "p99_ms": pick(99), "errors": errors,
            "mb_per_s": None}


def unit_of(config: str) -> str:
    return {"role": "mlflow.service", "seed": "mlflow-seed.service"}.get(config, f"mlflow-{config}.service")


def install_variant(config: str) -> None:
    """mlflow-<config>.service: the role's unit reading one more environment file, after the role's."""
    overrides = VARIANTS[config]
    if config == "role-uvloop":
        dexec("bash", "-c", f"PIP_CERT=/etc/mlflow/ca-bundle.pem {ENV}/python -m pip install -q uvloop==0.23.0 "
              "httptools==0.7.1 2>&1 | tail -2")
        opts = dexec("sed", "-n", 's/^MLFLOW_UVICORN_OPTS="\\(.*\\)"$/\\1/p', "/etc/mlflow/mlflow.env").strip()
        overrides = f'MLFLOW_UVICORN_OPTS="{opts} --loop uvloop --http httptools"\n'
    dexec("bash", "-c", f"install -m 0640 -o root -g mlflow /dev/stdin /etc/mlflow/{config}.env", stdin=overrides)
    dexec("bash", "-c", f"sed 's#^EnvironmentFile=.*#&\\nEnvironmentFile=/etc/mlflow/{config}.env#' "
          f"/etc/systemd/system/mlflow.service > /etc/systemd/system/{unit_of(config)} && systemctl daemon-reload")


def phase(config: str, url: str, ip: str, args: argparse.Namespace) -> dict:
    unit, began = unit_of(config), time.monotonic()
    dexec("systemctl", "start", unit)
    healthy = wait_healthy(url)
    idle_memory, _ = unit_sample(unit)
    sampler = Sampler(unit)
    sampler.start()
    # The data was seeded before the phases (main()); this finds it, and would make what is missing.
    loadgen.seed(url, ops=SEEDED, allow_hosts=[ip], seed_runs=args.seed_runs, timeout=120)
    ops, seeded = {}, time.monotonic()
    for op in OPS:
        op_began = time.monotonic()
        concurrency = args.big_concurrency if op in BIG else 32 if op in DOUBLE else 16
        # A 200 MB transfer outlasts the warm-up and the measured time: one started in the warm-up
        # would end after it, and none would be counted. Those are measured from their first request.
        report = loadgen.run_workload(url, DOUBLE.get(op, op), allow_hosts=[ip], concurrency=concurrency,
                                      duration=args.duration, warmup=0 if op in BIG else args.warmup,
                                      max_requests=100000, timeout=120 if op in BIG else 60)
        ops[op] = summarize(report, DOUBLE.get(op, op))
        ops[op]["elapsed_s"] = round(time.monotonic() - op_began, 1)
    sampler.stop.set()
    sampler.join()
    peak = max(sampler.memory)
    result = {"config": config, "time_to_healthy_s": round(healthy, 2), "memory_idle_mb": idle_memory / 2**20,
              "memory_peak_mb": peak / 2**20, "memory_mean_mb": statistics.fmean(sampler.memory) / 2**20,
              "processes": max(sampler.procs), "db_connections_max": max(sampler.connections), "ops": ops,
              "seed_s": round(seeded - began - healthy, 1)}
    dexec("systemctl", "stop", unit)
    result["elapsed_s"] = round(time.monotonic() - began, 1)
    log(f"  {config}: {result['elapsed_s']} s (healthy {healthy:.1f} s, seed data {result['seed_s']} s; slowest: "
        + ", ".join(f"{op} {ops[op]['elapsed_s']} s" for op in sorted(ops, key=lambda o: -ops[o]['elapsed_s'])[:4]) + ")")
    return result


def ceilings(url: str) -> dict:
    """What the machine gives without MLflow in the way."""
    script = r"""
import os, threading, time, uuid, psycopg2
conn = psycopg2.connect(host="127.0.0.1", dbname="mlflow", user="mlflow")
cur = conn.cursor()
cur.execute("select run_uuid from runs limit 1"); run = cur.fetchone()[0]; conn.close()
count, stop = [0], time.monotonic() + float(os.environ["SECONDS_"])
def worker(n):
    c = psycopg2.connect(host="127.0.0.1", dbname="mlflow", user="mlflow"); cur = c.cursor(); step = 0
    key = f"ceiling-{uuid.uuid4().hex[:8]}"
    while time.monotonic() < stop:
        step += 1; ts = int(time.time() * 1000)
        cur.executemany("insert into metrics (key, value, timestamp, run_uuid, step, is_nan) values (%s, %s, %s, %s, %s, false)",
                        [(f"{key}-{i}", 0.5, ts, run, step) for i in range(10)])
        c.commit(); count[0] += 1
    c.close()
threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
[t.start() for t in threads]; [t.join() for t in threads]
print(count[0])
"""
    password = dexec("sed", "-n", "s/^PGPASSWORD=\"\\(.*\\)\"$/\\1/p", "/etc/mlflow/mlflow.env").strip()
    seconds = 5
    batches = int(dexec("env", f"PGPASSWORD={password}", f"SECONDS_={seconds}", f"{ENV}/python", "-", stdin=script))
    dd = dexec("bash", "-c", "head -c 209715200 /dev/urandom > /var/lib/mlflow/ceiling.bin && sync && "
               "s=$(date +%s.%N) && cp /var/lib/mlflow/ceiling.bin /var/lib/mlflow/ceiling.copy && sync && "
               "e=$(date +%s.%N) && rm -f /var/lib/mlflow/ceiling.copy && echo $s $e")
    start, end = (float(x) for x in dd.split())
    # Host to container over the Docker bridge: the path of the benchmark's artifact requests.
    port = 5999
    receiver = subprocess.Popen(["docker", "exec", BENCH_HOST, "python3", "-c",
                                 "import socket,sys;s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);"
                                 f"s.bind(('0.0.0.0',{port}));s.listen(1);c,_=s.accept();n=0\n"
                                 "while True:\n b=c.recv(1<<20)\n if not b: break\n n+=len(b)\nprint(n)"],
                                stdout=subprocess.PIPE, text=True)
    time.sleep(1.5)
    import socket
    with socket.create_connection((url.split("//")[1].split(":")[0], port), timeout=30) as s:
        block, sent, t0 = os.urandom(1 << 20), 0, time.monotonic()
        while sent < 200 << 20:
            s.sendall(block)
            sent += len(block)
    received = int(receiver.communicate(timeout=60)[0])
    t1 = time.monotonic()
    dexec("rm", "-f", "/var/lib/mlflow/ceiling.bin")
    return {"pg_metric_rows_per_s": batches * 10 / seconds, "pg_log_batch_equivalents_per_s": batches / seconds,
            "disk_copy_mb_per_s": 200 / (end - start), "host_to_container_mb_per_s": received / 2**20 / (t1 - t0)}


# --- report --------------------------------------------------------------------------------------------

def spread(values: list[float], fmt: str = "{:.0f}") -> str:
    if not values:
        return "-"
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def charts(phases: list[dict], configs: list[str], out: pathlib.Path, stem: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for metric, label, name in (("requests_per_s", "requests/s (median of reps)", "throughput"),
                                ("p99_ms", "p99 latency, ms (median of reps)", "p99")):
        fig, ax = plt.subplots(figsize=(12, 4.5))
        width = 0.8 / len(configs)
        for i, config in enumerate(configs):
            values = []
            for op in OPS:
                samples = [p["ops"][op][metric] for p in phases if p["config"] == config and p["ops"][op].get(metric)]
                values.append(statistics.median(samples) if samples else 0)
            ax.bar([x + i * width for x in range(len(OPS))], values, width, label=config)
        ax.set_xticks([x + width * (len(configs) - 1) / 2 for x in range(len(OPS))], OPS, rotation=35, ha="right")
        ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.legend()
        fig.tight_layout()
        path = out / f"{stem}-{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path.name)
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, key in enumerate(("memory_idle_mb", "memory_peak_mb")):
        ax.bar([x + i * 0.4 for x in range(len(configs))],
               [statistics.median([p[key] for p in phases if p["config"] == c]) for c in configs], 0.4,
               label=key.replace("memory_", "").replace("_mb", ""))
    ax.set_xticks([x + 0.2 for x in range(len(configs))], configs)
    ax.set_ylabel("MB (unit cgroup, median of reps)")
    ax.legend()
    fig.tight_layout()
    path = out / f"{stem}-memory.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return files + [path.name]


def op_metric(phases: list[dict], config: str, op: str, key: str) -> list[float]:
    return [p["ops"][op][key] for p in phases if p["config"] == config and p["ops"][op].get(key) is not None]


def report(data: dict, out: pathlib.Path, stem: str) -> pathlib.Path:
    configs, phases = data["configs"], data["phases"]
    lines = [f"# Benchmark {data['date']}", "", f"Machine: {data['machine']}. Versions: {data['versions']}.", "",
             f"Method: `make bench` ({data['command']}), {data['reps']} alternated repetitions per configuration, "
             f"{data['duration']} s measured per operation after {data['warmup']} s of warm-up, 16 concurrent "
             f"clients ({data['big_concurrency']} for the 200 MB transfers, with no warm-up: a transfer"
             " started in it could end after the measured time), the load generator on the same 2 cores "
             "(aiohttp, bench/results/client-cpu.md). The data the operations read was written once before the "
             f"phases, through the deployed server ({data.get('seeding_s', '?')} s, not measured). "
             f"Cells: median (min-max) over the repetitions. The whole run took {data['total_s']} s.", "",
             "## Throughput and latency per operation", "",
             "| operation | " + " | ".join(f"{c} req/s | {c} p99 ms | {c} errors" for c in configs) + " |",
             "|---|" + "---:|---:|---|" * len(configs)]
    for op in OPS:
        cells = []
        for c in configs:
            errors = sum(sum((p["ops"][op].get("errors") or {}).values()) for p in phases if p["config"] == c)
            rate = op_metric(phases, c, op, "mb_per_s") if op.startswith("artifact") else []
            rps = spread(op_metric(phases, c, op, "requests_per_s"), "{:.1f}")
            cells += [rps + (f", {spread(rate, '{:.0f}')} MB/s" if rate else ""),
                      spread(op_metric(phases, c, op, "p99_ms")), str(errors)]
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    lines += ["", "## The service", "", "| | " + " | ".join(configs) + " |", "|---|" + "---:|" * len(configs)]
    for key, label, fmt in (("time_to_healthy_s", "start to healthy /health, s", "{:.1f}"),
                            ("memory_idle_mb", "memory after start, MB (unit cgroup)", "{:.0f}"),
                            ("memory_peak_mb", "memory peak under load, MB (1 s samples)", "{:.0f}"),
                            ("processes", "processes", "{:.0f}"),
                            ("db_connections_max", "PostgreSQL connections (max sampled)", "{:.0f}")):
        lines.append(f"| {label} | " + " | ".join(spread([p[key] for p in phases if p["config"] == c], fmt)
                                                 for c in configs) + " |")
    ce = data["ceilings"]
    lines += ["", "## Ceilings of the machine", "",
              f"- PostgreSQL, raw inserts of the same metric rows (10 per transaction, 16 threads): "
              f"{ce['pg_metric_rows_per_s']:.0f} rows/s = {ce['pg_log_batch_equivalents_per_s']:.0f} log-batch "
              "equivalents/s.",
              f"- Disk copy of the 200 MB artifact file: {ce['disk_copy_mb_per_s']:.0f} MB/s; host to container over "
              f"the Docker bridge: {ce['host_to_container_mb_per_s']:.0f} MB/s.",
              "- `/health` requests/s (the row above) is the floor cost of a request in each server."]
    if data.get("deploy"):
        lines += ["", "## Deploy timings (role defaults, the Miniconda test double)", "",
                  "| run | seconds | recap |", "|---|---:|---|"]
        lines += [f"| {r['what']} | {r['seconds']:.0f} | {r['recap']} |" for r in data["deploy"]]
    lines += ["", "## Charts", ""] + [f"![{f}]({f})" for f in data["charts"]]
    path = out / f"{stem}.md"
    path.write_text("\n".join(lines) + "\n")
    (out / f"{stem}.json").write_text(json.dumps(data, indent=1))
    return path


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    mem = int(next(line.split()[1] for line in open("/proc/meminfo") if line.startswith("MemTotal"))) / 2**20
    return f"{platform.node() or 'host'}: {os.cpu_count()} vCPU {cpu}, {mem:.0f} GiB, Linux {platform.release()}"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=0.25)
    parser.add_argument("--big-concurrency", type=int, default=4)
    parser.add_argument("--seed-runs", type=int, default=1000)
    parser.add_argument("--configs", default="seed,role")
    parser.add_argument("--skip-deploy-timings", action="store_true")
    parser.add_argument("--compare-pipelining", action="store_true",
                        help="also time the idempotent re-run without pipelining")
    parser.add_argument("--keep", action="store_true", help="leave the containers running")
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "bench" / "results")
    parser.add_argument("--name", default="", help="report name (default: the date)")
    args = parser.parse_args(argv)
    configs = args.configs.split(",")
    started = time.monotonic()
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="mlflow-bench-"))
    names = [BENCH_HOST] + ([] if args.skip_deploy_timings else DEPLOY_HOSTS)
    inv = inventory(workdir, secrets.token_urlsafe(24))
    try:
        log(f"starting {len(names)} containers")
        harness("destroy", names, workdir)
        harness("create", names, workdir)
        deploy = []
        if not args.skip_deploy_timings:
            deploy = deploy_timings(inv, args.compare_pipelining)
            # Only the containers: the harness's destroy would also remove the network the benchmark host is on.
            sh("docker", "rm", "-f", *DEPLOY_HOSTS)
        else:
            log("deploying the benchmark host (PostgreSQL + MLflow, role defaults)")
            seconds, recap = play(inv, BENCH_HOST)
            deploy.append({"what": "cold converge of the benchmark host (PostgreSQL + MLflow)",
                           "seconds": round(seconds, 1), "recap": recap})
        password = dexec("sed", "-n", "s/^PGPASSWORD=\"\\(.*\\)\"$/\\1/p", "/etc/mlflow/mlflow.env").strip()
        dexec("bash", "-c", "install -d -o mlflow -g mlflow -m 0750 /var/lib/mlflow-seed && "
              "install -m 0640 -o root -g mlflow /dev/stdin /etc/mlflow-seed.env", stdin=f'PGPASSWORD="{password}"\n')
        dexec("bash", "-c", "cat > /etc/systemd/system/mlflow-seed.service && systemctl daemon-reload",
              stdin=SEED_UNIT.format(env=ENV))
        for config in configs:
            if config in VARIANTS:
                install_variant(config)
        ip = container_ip(BENCH_HOST)
        url = f"http://{ip}:5000"
        loadgen.check_target(url, allow_hosts=[ip])
        # The data every operation reads (1,000+ runs, the 1,000-step metric, the files to download),
        # written once, before and outside the measured phases, by the server the deploy started.
        log(f"seeding the benchmark data ({args.seed_runs} runs, ...) through the deployed server")
        seeding = time.monotonic()
        wait_healthy(url)
        loadgen.seed(url, ops=SEEDED, allow_hosts=[ip], seed_runs=args.seed_runs, timeout=120, concurrency=32)
        seeding = round(time.monotonic() - seeding, 1)
        dexec("systemctl", "stop", "mlflow.service")
        phases = []
        for rep in range(args.reps):
            order = configs if rep % 2 == 0 else list(reversed(configs))
            for config in order:
                log(f"repetition {rep + 1}/{args.reps}: {config}")
                phases.append(phase(config, url, ip, args))
        dexec("systemctl", "start", "mlflow.service")
        wait_healthy(url)
        log("ceilings")
        ceiling = ceilings(url)
        versions = dexec(f"{ENV}/python", "-c", "import mlflow, sys; print(f'MLflow {mlflow.__version__}, "
                                                 "Python {sys.version.split()[0]}')").strip()
        versions += ", " + dexec("bash", "-c", "psql --version").strip()
        stem = args.name or datetime.date.today().isoformat()
        args.out.mkdir(parents=True, exist_ok=True)
        data = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(), "versions": versions,
                "command": "python bench/bench.py " + " ".join(argv), "reps": args.reps, "duration": args.duration,
                "warmup": args.warmup, "big_concurrency": args.big_concurrency, "configs": configs, "phases": phases,
                "ceilings": ceiling, "deploy": deploy, "seeding_s": seeding, "total_s": round(time.monotonic() - started)}
        data["charts"] = charts(phases, configs, args.out, stem)
        path = report(data, args.out, stem)
        log(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} in {data['total_s']} s")
        print(path.read_text())
    finally:
        if not args.keep:
            harness("destroy", names, workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

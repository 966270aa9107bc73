"""Changes and failures of the servers behind the balancer, under load (bench/loadgen.py).

The steps run in order and leave the cluster on the role's release for test_2_backends.py:
1. kill -9 of a server's main process, and a stop of a server's container: the requests in flight
   at that instant may fail at the HTTP level (counted); MLflow's own client (with its retries) sees
   no failure; then a restart of PostgreSQL under the same load;
2. a schema-changing upgrade, with a configuration change: a training loop with MLflow's client runs
   across it; the balancer answers 503 with Retry-After while no server is up (the window is measured);
3. an upgrade between two releases of the same schema (to the role's default) with another
   configuration change and a reload of the balancer, rolling: no failed request;
4. a dry run of the servers and of the database, each run without its peers (--limit): nothing to
   change, and nothing read from outside the run is lost (the balancer's address, the servers').
After each step everything the load generator wrote is read back; at the end, all of it.
"""

import base64
import gzip
import json
import pathlib
import re
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
from mlflow_testlib import ROOT, client_script, journal, other_host, role_defaults, run_playbook, run_python, var

sys.path.insert(0, str(ROOT / "bench"))
import loadgen  # noqa: E402

testinfra_hosts = ["ansible://mlflow-app-1"]

APPS = ["mlflow-app-1", "mlflow-app-2"]
LB, DIRECT = "mlflow-lb", "mlflow-app-direct"
URL = var(APPS[0], "test_lb_url")
CA = str(pathlib.Path(var(APPS[0], "test_tls_dir")) / "ca.crt")
USER, PASSWORD = var(APPS[0], "mlflow_auth_admin_username"), var(APPS[0], "mlflow_auth_admin_password")
START, NEW_SCHEMA = var(APPS[0], "mlflow_version"), var(APPS[0], "test_new_schema_mlflow_version")
FINAL = role_defaults("mlflow")["mlflow_version"]
# Four clients that pause 2 s after each request, like training jobs that log as they go: about 2
# requests/s, so that requests are in flight at every restart while the plays keep the CPU they
# need on a 2-core CI machine (with basic auth on, MLflow checks the password's scrypt hash on every
# request: 0.1-0.15 s of CPU here).
CONCURRENCY = 4
LOAD = {"username": USER, "password": PASSWORD, "ca_file": CA, "concurrency": CONCURRENCY, "think": 2.0, "duration": 900,
        "max_requests": 10**6, "warmup": 1, "timeout": 60, "seed_runs": 25, "record_writes": True}
BEHIND_LB = "mlflow_lb,mlflow_lb_backends"
# What every step converges with besides its own change (so that no step undoes another).
STEP_VARS = {"mlflow_env_extra": {"MLFLOW_TEST_ROLLING_STEP": "configuration-changed"}}
# The last step changes the servers' configuration again (a restart, besides the upgrade) and the
# balancer's; the dry run after it gives the same.
FINAL_VARS = {"mlflow_version": FINAL, "mlflow_lb_maxconn": int(var(LB, "mlflow_lb_maxconn")) + 100,
              "mlflow_env_extra": {"MLFLOW_TEST_ROLLING_STEP": "upgraded-and-reconfigured"}}
RECORD = loadgen.WriteRecord()
CLIENT_ENV = {"MLFLOW_TRACKING_URI": "https://mlflow-lb", "MLFLOW_TRACKING_SERVER_CERT_PATH": "/root/test-ca.crt",
              "MLFLOW_TRACKING_USERNAME": USER, "MLFLOW_TRACKING_PASSWORD": PASSWORD}


def main_pids():
    return {name: other_host(name).run("systemctl show mlflow -p MainPID --value").stdout.strip() for name in APPS}


def versions():
    return {name: other_host(name).run(f"{var(name, 'mlflow_conda_prefix')}/envs/mlflow/bin/python -c "
                                       "'import mlflow; print(mlflow.__version__)'").stdout.strip() for name in APPS}


def lb_address():
    """The balancer's address on its default route, which the servers trust for X-Forwarded-*."""
    return re.search(r"src (\S+)", other_host(LB).run("ip -4 -o route get 1.1.1.1").stdout).group(1)


def haproxy_info():
    """The current HAProxy worker's account of itself (`show info` through the master's CLI, @1: after
    a reload, the workers of earlier configurations answer on the stats socket too): pid, maxconn, ..."""
    script = ("import socket; s = socket.socket(socket.AF_UNIX); s.connect('/run/haproxy-master.sock'); "
              "s.sendall(b'@1 show info\\n'); s.shutdown(socket.SHUT_WR); print(s.makefile().read())")
    out = other_host(LB).run(f'python3 -c "{script}"').stdout
    return dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)


def haproxy_master():
    return other_host(LB).run("systemctl show haproxy -p MainPID --value").stdout.strip()


def converge(extra, limit=BEHIND_LB):
    result = run_playbook("site.yml", limit, {**STEP_VARS, **extra}, timeout=1800)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
    return result.stdout


def lb_status(server):
    """The server's status at the balancer (UP, DOWN, DRAIN, MAINT ...), from HAProxy's CSV statistics."""
    csv = other_host(LB).run("curl -s 'http://127.0.0.1:8404/stats;csv'").stdout
    for line in csv.splitlines():
        fields = line.split(",")
        if len(fields) > 17 and fields[0] == "mlflow" and fields[1] == server:
            return fields[17]
    return None


def wait_until(predicate, timeout, what):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(1)
    pytest.fail(f"{what} did not happen within {timeout} s")


def task_outcomes(output, task):
    """{host: [ok|changed|skipping|failed, ...]} of a task in a play's output, over every batch."""
    outcomes, inside = {}, False
    for line in output.splitlines():
        if line.startswith("TASK ["):
            inside = f" : {task}" in line
        elif inside and (m := re.match(r"(ok|changed|skipping|failed|fatal): \[([^\]]+)\]", line)):
            outcomes.setdefault(m.group(2).split(" -> ")[0], []).append(m.group(1))
    return outcomes


SCHEMA_READ = "Read the schema revision of each database"


def settle(report, what):
    """Print the load's figures and fold its writes into RECORD."""
    d = report.as_dict()
    print(f"\n{what}: {d['total_requests']} requests ({d['total_rps']}/s), {d['total_errors']} failed at the HTTP level: "
          + json.dumps({op: s["errors"] for op, s in d["ops"].items() if s["errors"]}))
    return d


def client_loop(script, *args):
    """MLflow's own client (its retries on), on a server host, through the balancer's name. Its
    credentials go through an env file, not a command line."""
    env_file = pathlib.Path(tempfile.mkstemp(prefix="client-env-")[1])
    env_file.write_text("".join(f"{k}={v}\n" for k, v in CLIENT_ENV.items()))
    process = subprocess.Popen(["docker", "exec", "-i", "--env-file", str(env_file), DIRECT,
                                f"{var(DIRECT, 'mlflow_conda_prefix')}/envs/mlflow/bin/python", "-", *args],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process.stdin.write(script)
    process.stdin.close()
    time.sleep(1)
    env_file.unlink()
    return process


def finish(process, timeout=900):
    process.wait(timeout)
    return process.stdout.read(), process.stderr.read()


CLIENT_OPS = """
import json, os, sys, time
import mlflow
from mlflow.tracking import MlflowClient
c, done, t0 = MlflowClient(), 0, time.monotonic()
exp = c.get_experiment_by_name("client-loop") or c.get_experiment(c.create_experiment("client-loop"))
while time.monotonic() - t0 < float(sys.argv[1]):
    run = c.create_run(exp.experiment_id)
    c.log_param(run.info.run_id, "i", str(done))
    c.log_metric(run.info.run_id, "loss", 1.0 / (done + 1), step=done)
    assert c.get_run(run.info.run_id).data.params["i"] == str(done)
    c.set_terminated(run.info.run_id)
    done += 1
print(json.dumps({"operations": done * 5}))
"""

TRAINING = """
import json, os, sys, tempfile, time
import mlflow
mlflow.set_experiment("training-loop")
steps = 0
with mlflow.start_run() as run:
    t0 = time.monotonic()
    while not os.path.exists("/tmp/stop-training") and time.monotonic() - t0 < 900:
        mlflow.log_metric("loss", 1.0 / (steps + 1), step=steps)
        steps += 1
        time.sleep(0.1)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.txt")
        with open(path, "w") as f:
            f.write(f"trained for {steps} steps\\n")
        mlflow.log_artifact(path)
print(json.dumps({"run_id": run.info.run_id, "steps": steps}))
"""


@pytest.fixture(scope="module", autouse=True)
def seeded():
    """The balancer serves, the client hosts trust the test CA, and the load generator has its data."""
    wait_until(lambda: all(lb_status(a) == "UP" for a in APPS), 120, "both servers UP at the balancer")
    other_host(DIRECT).run(f"cat > /root/test-ca.crt <<'EOF'\n{pathlib.Path(CA).read_text()}EOF")
    loadgen.seed(URL, ops=list(loadgen.DEFAULT_MIX), **{k: v for k, v in LOAD.items() if k != "record_writes"})


def test_step_1_a_crash_or_a_stopped_container_costs_at_most_the_requests_in_flight():
    app1, app2 = (other_host(a) for a in APPS)
    client = client_loop(CLIENT_OPS, "60")
    with loadgen.background_load(URL, "mixed", **LOAD) as load:
        time.sleep(5)
        pid = app1.run("systemctl show mlflow -p MainPID --value").stdout.strip()
        assert app1.run(f"kill -9 {pid}").rc == 0
        wait_until(lambda: app1.run("systemctl show mlflow -p MainPID --value").stdout.strip() not in ("0", pid)
                   and lb_status(APPS[0]) == "UP", 180, "the killed server serving again")
        subprocess.run(["docker", "stop", "--time", "20", APPS[1]], check=True, capture_output=True)
        time.sleep(5)
        subprocess.run(["docker", "start", APPS[1]], check=True, capture_output=True)
        wait_until(lambda: lb_status(APPS[1]) == "UP", 240, "the restarted container serving again")
        time.sleep(3)
    d = settle(load.report, "kill -9 of a server, then a stop of a server's container")
    RECORD.extend(load.record)
    out, err = finish(client)
    assert client.returncode == 0, out + err
    operations = json.loads(out.strip().splitlines()[-1])["operations"]
    print(f"MLflow's client: {operations} operations across the same faults, 0 failed")
    assert operations > 0
    # Only what was in flight on the failed server may have failed (2 events, CONCURRENCY clients).
    assert d["total_errors"] <= 2 * CONCURRENCY, d["ops"]
    missing = loadgen.verify_writes(URL, load.record, username=USER, password=PASSWORD, ca_file=CA)
    assert missing.ok, missing.as_dict()


class HealthWatch(threading.Thread):
    """Polls /health through the balancer; records when it was not 200 and a 503's Retry-After."""

    def __init__(self):
        super().__init__(daemon=True)
        self.stop, self.down, self.retry_after, self.context = threading.Event(), [], None, ssl.create_default_context(cafile=CA)

    def run(self):
        while not self.stop.is_set():
            status = 0
            try:
                with urllib.request.urlopen(f"{URL}/health", timeout=5, context=self.context) as r:
                    status = r.status
            except urllib.error.HTTPError as error:
                status = error.code
                if error.code == 503:
                    self.retry_after = error.headers.get("Retry-After")
            except OSError:
                status = -1
            if status != 200:
                self.down.append(time.monotonic())
            time.sleep(0.25)

    def window(self):
        return (self.down[-1] - self.down[0] + 0.25) if self.down else 0.0


class ApiWatch(HealthWatch):
    """Polls a request that needs the database (search-experiments) through the balancer, as the admin."""

    def run(self):
        token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        request = urllib.request.Request(f"{URL}/api/2.0/mlflow/experiments/search?max_results=1",
                                         headers={"Authorization": f"Basic {token}"})
        while not self.stop.is_set():
            try:
                with urllib.request.urlopen(request, timeout=5, context=self.context) as r:
                    ok = r.status == 200
            except OSError:
                ok = False
            if not ok:
                self.down.append(time.monotonic())
            time.sleep(0.25)


def test_step_1b_a_restart_of_postgresql_costs_seconds_and_no_restart_of_mlflow():
    """MLflow's pool checks a connection before it uses it (pool_pre_ping): the requests that meet the
    restart fail, the next ones reconnect, and no server restarts."""
    db = other_host("mlflow-db")
    pids = main_pids()
    watch = ApiWatch()
    with loadgen.background_load(URL, "mixed", **LOAD) as load:
        watch.start()
        time.sleep(5)
        began = time.monotonic()
        assert db.run("systemctl restart postgresql").rc == 0
        took = time.monotonic() - began
        time.sleep(10)
        watch.stop.set()
        watch.join()
    d = settle(load.report, f"a restart of PostgreSQL (systemctl restart: {took:.1f} s)")
    RECORD.extend(load.record)
    failed_for = watch.window()
    print(f"requests that need the database failed for {failed_for:.1f} s; MLflow was not restarted")
    assert main_pids() == pids
    # Failures only while PostgreSQL restarted, none once it was back.
    assert all(t <= began + took + 5 for t in watch.down), [round(t - began, 1) for t in watch.down]
    assert d["total_requests"] > d["total_errors"]
    missing = loadgen.verify_writes(URL, load.record, username=USER, password=PASSWORD, ca_file=CA)
    assert missing.ok, missing.as_dict()


def test_step_2_a_training_loop_runs_across_a_schema_changing_upgrade(host):
    # Data logged with the old release, read back by test_2_backends.py after the upgrade.
    out = run_python(host, client_script(), "http://127.0.0.1:5000", "before-upgrade",
                     env={"MLFLOW_TRACKING_USERNAME": USER, "MLFLOW_TRACKING_PASSWORD": PASSWORD})
    assert out.rc == 0, out.stderr + journal(host)
    host.run(f"cat > /root/before-upgrade.json <<'EOF'\n{out.stdout.strip().splitlines()[-1]}\nEOF")

    other_host(DIRECT).run("rm -f /tmp/stop-training")
    training = client_loop(TRAINING)
    watch = HealthWatch()
    time.sleep(5)
    watch.start()
    started = time.monotonic()
    output = converge({"mlflow_version": NEW_SCHEMA})
    took = time.monotonic() - started
    time.sleep(3)
    watch.stop.set()
    other_host(DIRECT).run("touch /tmp/stop-training")
    out, err = finish(training)
    assert training.returncode == 0, out + err
    result = json.loads(out.strip().splitlines()[-1])
    print(f"\nschema-changing upgrade {START} -> {NEW_SCHEMA}: the play took {took:.0f} s; no server answered for "
          f"{watch.window():.1f} s (503, Retry-After: {watch.retry_after}); the training loop logged "
          f"{result['steps']} steps across it without an exception")
    assert versions() == {a: NEW_SCHEMA for a in APPS}
    assert task_outcomes(output, SCHEMA_READ) == {a: ["ok"] for a in APPS}, output[-3000:]
    assert watch.down, "the balancer never answered without a server: the servers were not all stopped"
    assert watch.retry_after == str(var(LB, "mlflow_lb_retry_after"))

    # Every step the loop logged, and its artifact, are there.
    reader = f"""
import json
from mlflow.tracking import MlflowClient
c = MlflowClient()
history = c.get_metric_history("{result['run_id']}", "loss")
files = [f.path for f in c.list_artifacts("{result['run_id']}")]
print(json.dumps({{"steps": sorted(m.step for m in history), "files": files}}))
"""
    check = client_loop(reader)
    out, err = finish(check)
    assert check.returncode == 0, out + err
    logged = json.loads(out.strip().splitlines()[-1])
    assert logged["steps"] == list(range(result["steps"])), "steps lost or repeated"
    assert logged["files"] == ["model.txt"]


def test_step_3_an_upgrade_of_the_same_schema_rolls_without_a_failed_request():
    assert versions() == {a: NEW_SCHEMA for a in APPS}
    # The balancer's configuration changes in the same run: HAProxy reloads (a new worker takes the
    # listening sockets over) under the same load.
    maxconn = FINAL_VARS["mlflow_lb_maxconn"]
    master, haproxy_before, pids = haproxy_master(), haproxy_info(), main_pids()
    with loadgen.background_load(URL, "mixed", **LOAD) as load:
        time.sleep(3)
        output = converge(FINAL_VARS)
        time.sleep(2)
    d = settle(load.report, f"upgrade {NEW_SCHEMA} -> {FINAL} (same schema) with a configuration change, "
                            "and a reload of the balancer")
    RECORD.extend(load.record)
    assert versions() == {a: FINAL for a in APPS}
    assert all(main_pids()[a] != pids[a] for a in APPS), (pids, main_pids())
    assert all("MLFLOW_TEST_ROLLING_STEP=\"upgraded-and-reconfigured\"" in other_host(a).file("/etc/mlflow/mlflow.env").content_string
               for a in APPS)
    haproxy_after = haproxy_info()
    assert haproxy_after["Maxconn"] == str(maxconn), haproxy_after
    # A reload: the same master process, a new worker.
    assert haproxy_master() == master and haproxy_after["Pid"] != haproxy_before["Pid"], (haproxy_before, haproxy_after)
    # Both new envs were installed, at once, before the first server was drained (site.yml stages
    # a rolling change), so each server is out of the balancer only for its restart.
    staged = task_outcomes(output[:output.index("Drain this server at every balancer")],
                           "Install the locked packages with uv")
    assert staged == {a: ["changed"] for a in APPS}, staged
    assert d["total_requests"] > 100 and d["total_errors"] == 0, d["ops"]
    missing = loadgen.verify_writes(URL, load.record, username=USER, password=PASSWORD, ca_file=CA)
    assert missing.ok, missing.as_dict()



def test_step_4_a_dry_run_of_the_servers_and_the_database_without_their_peers_changes_nothing():
    """Each host's configuration names peers that --limit leaves out of the run (the servers trust the
    balancer's address in uvicorn's --forwarded-allow-ips; pg_hba.conf admits the servers, the direct
    one included): their facts are gathered anyway, so a dry run of the converged hosts has nothing to
    change."""
    result = run_playbook("site.yml", "mlflow_db,mlflow_lb_backends", {**STEP_VARS, **FINAL_VARS}, args=["--check", "--diff"])
    assert result.returncode == 0, result.stdout[-3000:]
    for name in ["mlflow-db", *APPS]:
        recap = re.search(rf"^{name}\s+: ok=\d+\s+changed=(\d+)", result.stdout, re.M)
        assert recap and recap.group(1) == "0", (name, result.stdout[-3000:])
    trusted = f"--forwarded-allow-ips={lb_address()}"
    assert all(trusted in other_host(a).file("/etc/mlflow/mlflow.env").content_string for a in APPS), trusted


def test_everything_the_load_wrote_in_every_step_is_still_there():
    counts = RECORD.counts()
    missing = loadgen.verify_writes(URL, RECORD, username=USER, password=PASSWORD, ca_file=CA)
    print(f"\nall steps: checked {counts}, missing {missing.total}")
    assert sum(counts.values()) > 0
    assert missing.ok, missing.as_dict()


def test_the_ui_loads_through_the_balancer_compressed_and_its_bundle_cached():
    context = ssl.create_default_context(cafile=CA)
    auth = {"Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}
    request = urllib.request.Request(f"{URL}/", headers={"Accept-Encoding": "gzip", **auth})
    with urllib.request.urlopen(request, context=context, timeout=30) as r:
        assert r.headers.get("Content-Encoding") == "gzip"
        index = gzip.decompress(r.read()).decode()
    bundle = re.search(r'"([^"]*/main\.[0-9a-f]+\.js)"', index).group(1)
    bundle_url = urllib.parse.urljoin(URL + "/", bundle)
    request = urllib.request.Request(bundle_url, headers={"Accept-Encoding": "gzip", **auth})
    with urllib.request.urlopen(request, context=context, timeout=60) as r:
        body = r.read()
        assert r.headers.get("Content-Encoding") == "gzip", dict(r.headers)
        assert "immutable" in r.headers.get("Cache-Control", "")
    with urllib.request.urlopen(urllib.request.Request(bundle_url, headers=auth), context=context, timeout=60) as r:
        plain = len(r.read())
    print(f"\nUI bundle {bundle}: {plain / 2**20:.1f} MB, {len(body) / 2**20:.1f} MB gzipped through the balancer")
    assert len(body) < plain / 2


def test_statistics_and_metrics_answer_on_the_balancers_loopback_only():
    lb = other_host(LB)
    metrics = lb.run("curl -s http://127.0.0.1:8404/metrics").stdout
    # HAProxy's own exporter: per-server series of the balancer's backend, labelled by server.
    assert all(f'proxy="mlflow",server="{a}"' in metrics for a in APPS), metrics[:2000]
    assert other_host(DIRECT).run("curl -s --max-time 5 http://mlflow-lb:8404/metrics").rc != 0
    # The servers' own metrics are scraped from each server, never served to clients through the balancer.
    app_metrics = f"http://127.0.0.1:{var(APPS[0], 'mlflow_port')}/metrics"
    # (401 there: basic auth guards it as it guards the API.)
    assert other_host(APPS[0]).run(f"curl -s -o /dev/null -w '%{{http_code}}' {app_metrics}").stdout in ("200", "401")
    for path in ("/metrics", "/metrics/", "/%6Detrics", "/%6detrics/"):
        code = other_host(DIRECT).run(f"curl -s -k -o /dev/null -w '%{{http_code}}' https://mlflow-lb{path}").stdout
        assert code == "404", (path, code)


def test_plain_http_is_redirected_to_https():
    out = other_host(DIRECT).run("curl -s -o /dev/null -w '%{http_code} %{redirect_url}' http://mlflow-lb/health")
    code, location = out.stdout.split(" ", 1)
    assert code == "301" and location.startswith("https://"), out.stdout


def test_the_balancer_is_sandboxed():
    out = other_host(LB).run("systemd-analyze security haproxy.service --no-pager")
    line = [x for x in out.stdout.splitlines() if "Overall exposure level" in x]
    print(f"\nsystemd-analyze security haproxy.service: {line}")
    assert line and float(line[0].split(":")[1].split()[0]) < 5.0, out.stdout

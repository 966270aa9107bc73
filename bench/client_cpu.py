"""Client CPU cost per request of candidate HTTP clients against an MLflow server.

Compares, at the same concurrency and the same fixed request count:

* ``aiohttp``        asyncio + aiohttp (default asyncio event loop)
* ``aiohttp-uvloop`` the same on uvloop (only when uvloop is installed)
* ``httpx``          asyncio + httpx.AsyncClient (HTTP/1.1)
* ``locust``         ``locust --headless`` with ``FastHttpUser`` (geventhttpclient)

against ``GET /health`` (cheap) and ``POST /api/2.0/mlflow/runs/log-batch`` (10 metrics + 3 tags,
a real write). Every (client, endpoint) pair runs in a fresh Python process. Two CPU figures are
taken for each:

* ``test``  CPU seconds (user + system, ``time.process_time``) the client process spent from just
  before its first request to just after its last one; for Locust, from its ``test_start`` event to
  the moment the request count was reached (measured inside the Locust process by a listener).
* ``whole`` CPU seconds of the whole child process, start-up and imports included
  (``resource.getrusage(RUSAGE_CHILDREN)`` around it in the parent).

Usage (loopback only; every run is bounded by the request count and a 20 s deadline)::

    python bench/client_cpu.py --url http://127.0.0.1:5055 [-n 2000] [--concurrency 16]

Prints a Markdown table. Needs aiohttp, httpx and locust in the running interpreter's environment.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any

DEADLINE_S = 20.0
LOG_BATCH = "/api/2.0/mlflow/runs/log-batch"


def _body(run_id: str) -> bytes:
    """The log-batch body every client sends: 10 metrics and 3 tags (same bytes for all clients)."""
    now = int(time.time() * 1000)
    return json.dumps({
        "run_id": run_id,
        "metrics": [{"key": f"cpu_m{i}", "value": i * 0.5, "timestamp": now, "step": 0} for i in range(10)],
        "tags": [{"key": f"cpu_t{i}", "value": "x"} for i in range(3)],
    }).encode()


def _request_spec(args: argparse.Namespace) -> tuple[str, str, bytes | None]:
    if args.endpoint == "health":
        return "GET", "/health", None
    return "POST", LOG_BATCH, _body(args.run_id)


# ---------------------------------------------------------------- asyncio clients (child process)
async def _run_async(args: argparse.Namespace) -> dict[str, Any]:
    method, path, body = _request_spec(args)
    url = args.url.rstrip("/") + path
    headers = {"Content-Type": "application/json"}
    remaining = args.n
    ok = errors = 0
    deadline = time.monotonic() + DEADLINE_S

    if args.client.startswith("aiohttp"):
        import aiohttp

        session: Any = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=args.concurrency))

        async def one() -> int:
            async with session.request(method, url, data=body, headers=headers) as resp:
                await resp.read()
                return resp.status
    else:
        import httpx

        lim = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
        session = httpx.AsyncClient(limits=lim, timeout=30.0)

        async def one() -> int:
            resp = await session.request(method, url, content=body, headers=headers)
            return resp.status_code

    async def worker() -> None:
        nonlocal remaining, ok, errors
        while remaining > 0 and time.monotonic() < deadline:
            remaining -= 1
            try:
                status = await one()
                ok, errors = (ok + 1, errors) if status == 200 else (ok, errors + 1)
            except Exception:  # noqa: BLE001 - counted, the comparison goes on
                errors += 1

    cpu0, t0 = time.process_time(), time.monotonic()
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    cpu1, t1 = time.process_time(), time.monotonic()
    await session.close() if args.client.startswith("aiohttp") else await session.aclose()
    return {"ok": ok, "errors": errors, "cpu": cpu1 - cpu0, "wall": t1 - t0}


def _child_async(args: argparse.Namespace) -> None:
    if args.client == "aiohttp-uvloop":
        import uvloop

        result = uvloop.run(_run_async(args))
    else:
        result = asyncio.run(_run_async(args))
    print(json.dumps(result))


# ---------------------------------------------------------------- Locust (child process)
LOCUSTFILE = r'''
import json, os, time
import gevent
from locust import FastHttpUser, task, constant, events

N = int(os.environ["CPU_N"]); METHOD = os.environ["CPU_METHOD"]; PATH = os.environ["CPU_PATH"]
BODY = open(os.environ["CPU_BODY"], "rb").read() if os.environ.get("CPU_BODY") else None
OUT = os.environ["CPU_OUT"]
state = {"done": 0, "ok": 0, "errors": 0, "cpu0": None, "t0": None, "written": False}

def finish(environment):
    if state["written"]:
        return
    state["written"] = True
    cpu, wall = time.process_time() - state["cpu0"], time.monotonic() - state["t0"]
    with open(OUT, "w") as fh:
        json.dump({"ok": state["ok"], "errors": state["errors"], "cpu": cpu, "wall": wall}, fh)
    gevent.spawn(environment.runner.quit)

@events.test_start.add_listener
def _start(environment, **kw):
    state["cpu0"], state["t0"] = time.process_time(), time.monotonic()

@events.request.add_listener
def _req(exception=None, response=None, **kw):
    state["done"] += 1
    if exception is None and response is not None and response.status_code == 200:
        state["ok"] += 1
    else:
        state["errors"] += 1

@events.test_stop.add_listener
def _stop(environment, **kw):
    if state["cpu0"] is not None:
        finish(environment)

class Client(FastHttpUser):
    wait_time = constant(0)

    @task
    def one(self):
        if state["done"] >= N:
            finish(self.environment)
            gevent.sleep(1)
            return
        with self.client.request(METHOD, PATH, data=BODY, headers={"Content-Type": "application/json"},
                                 catch_response=True) as resp:
            resp.success() if resp.status_code == 200 else resp.failure(str(resp.status_code))
'''


def _run_locust(args: argparse.Namespace, tmp: str) -> dict[str, Any]:
    method, path, body = _request_spec(args)
    lf = os.path.join(tmp, "locustfile.py")
    with open(lf, "w") as fh:
        fh.write(LOCUSTFILE)
    env = dict(os.environ, CPU_N=str(args.n), CPU_METHOD=method, CPU_PATH=path, CPU_OUT=os.path.join(tmp, "out.json"))
    if body is not None:
        with open(os.path.join(tmp, "body.json"), "wb") as fh:
            fh.write(body)
        env["CPU_BODY"] = os.path.join(tmp, "body.json")
    locust = os.path.join(os.path.dirname(sys.executable), "locust")
    cmd = [locust, "-f", lf, "--headless", "-H", args.url, "-u", str(args.concurrency), "-r", "1000",
           "-t", f"{int(DEADLINE_S)}s", "--only-summary", "--loglevel", "ERROR", "--stop-timeout", "2"]
    subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=DEADLINE_S + 30, check=False)
    with open(env["CPU_OUT"]) as fh:
        return json.load(fh)


# ---------------------------------------------------------------- parent
def _create_run(url: str) -> str:
    """Create (or reuse) the experiment ``client-cpu`` and a fresh run in it, with urllib."""
    def call(path: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        data = json.dumps(payload).encode() if payload is not None else None
        req = urllib.request.Request(url.rstrip("/") + path, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.load(resp)

    try:
        exp = call("/api/2.0/mlflow/experiments/get-by-name?experiment_name=client-cpu")["experiment"]["experiment_id"]
    except urllib.error.HTTPError:
        exp = call("/api/2.0/mlflow/experiments/create", {"name": "client-cpu"})["experiment_id"]
    return call("/api/2.0/mlflow/runs/create", {"experiment_id": exp})["run"]["info"]["run_id"]


def _measure(args: argparse.Namespace, client: str, endpoint: str, run_id: str) -> dict[str, Any]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", client, "--endpoint", endpoint, "--url", args.url,
           "-n", str(args.n), "--concurrency", str(args.concurrency), "--run-id", run_id]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=DEADLINE_S + 60, check=True).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = json.loads(out.strip().splitlines()[-1])
    result["whole"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:5055")
    p.add_argument("-n", type=int, default=2000, help="requests per (client, endpoint) pair")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--clients", default="aiohttp,aiohttp-uvloop,httpx,locust")
    p.add_argument("--endpoints", default="health,log-batch")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--endpoint", help=argparse.SUPPRESS)
    p.add_argument("--run-id", help=argparse.SUPPRESS)
    args = p.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from loadgen import UnsafeTargetError, check_target  # the same loopback-only rule as the load generator

    try:
        check_target(args.url)
    except UnsafeTargetError as exc:
        sys.exit(str(exc))
    if args.child:
        args.client = args.child
        if args.child == "locust":
            with tempfile.TemporaryDirectory() as tmp:
                print(json.dumps(_run_locust(args, tmp)))
        else:
            _child_async(args)
        return

    clients = args.clients.split(",")
    if importlib.util.find_spec("uvloop") is None:
        clients = [c for c in clients if c != "aiohttp-uvloop"]
    run_id = _create_run(args.url)
    rows = []
    for endpoint in args.endpoints.split(","):
        for client in clients:
            r = _measure(args, client, endpoint, run_id)
            done = r["ok"] + r["errors"]
            rows.append((endpoint, client, done, r["errors"], r["wall"], done / r["wall"], r["cpu"],
                         1e6 * r["cpu"] / max(done, 1), r["whole"]))
            print(f"# {endpoint} {client}: {r}", file=sys.stderr)
    print("| endpoint | client | requests | errors | wall s | req/s | client CPU s (test) | CPU µs/request | CPU s (whole process) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for e, c, done, err, wall, rps, cpu, us, whole in rows:
        print(f"| {e} | {c} | {done} | {err} | {wall:.2f} | {rps:.0f} | {cpu:.2f} | {us:.0f} | {whole:.2f} |")


if __name__ == "__main__":
    main()

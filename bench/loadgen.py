"""Load generator for the REST API of an MLflow 3.x tracking server (asyncio + aiohttp, uvloop if present).

Used by ``make bench`` through its command line and, imported, by pytest suites through synchronous
wrappers. Importing it prints nothing and configures no logging.

    python bench/loadgen.py --url http://127.0.0.1:5000 --op mixed --concurrency 16 --duration 20 \\
        --max-requests 50000 [--seed] [--json out.json] [--user U --password-env VAR] [--allow-host mlflow-lb]

Python API (keyword ``**options`` are the fields of :class:`Options`)::

    seed(base_url, ops=None, **options) -> None
    run_workload(base_url, op="mixed", **options) -> Report             # Report.record with record_writes=True
    with background_load(base_url, op="mixed", **options) as load: ...   # then load.report, load.record
    verify_writes(base_url, record, concurrency=8, **options) -> Missing
    check_target(base_url, allow_hosts=()) -> list[str]
    format_report(report) -> str;  print_report(report);  await run_async(Options(...)) -> Report

Safety: nothing is sent unless every address of the target host is loopback or the host is named in
``allow_hosts``; later name resolutions are checked the same way and redirects are never followed.
Every run is bounded by a duration and a request count and stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import ipaddress
import itertools
import json
import math
import os
import random
import socket
import ssl
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field, fields
from typing import Any, AsyncIterator, Callable, Iterator, Sequence
from urllib.parse import urlsplit

import aiohttp

__all__ = ["OPERATIONS", "DEFAULT_MIX", "Options", "Report", "OpStats", "WriteRecord", "Missing", "BackgroundLoad",
           "UnsafeTargetError", "LoadgenError", "check_target", "seed", "run_workload", "run_async", "background_load",
           "verify_writes", "format_report", "print_report", "main"]

API = "/api/2.0/mlflow"
ARTIFACTS = "/api/2.0/mlflow-artifacts/artifacts"
MIB = 1 << 20
OPERATIONS = ("health", "log-batch", "log-batch-1000", "search-runs", "get-run", "get-metric-history", "create-run",
              "create-model-version", "artifact-upload-1mb", "artifact-download-1mb", "artifact-upload-200mb",
              "artifact-download-200mb", "mixed")
DEFAULT_MIX: dict[str, float] = {"log-batch": 60, "search-runs": 15, "get-metric-history": 15, "get-run": 10}
ARTIFACT_BYTES = {"artifact-upload-1mb": MIB, "artifact-download-1mb": MIB,
                  "artifact-upload-200mb": 200 * MIB, "artifact-download-200mb": 200 * MIB}
SEED_DIR = "loadgen/seed"
HISTORY_STEPS = 1000
_KEYS10 = tuple(f"m{i}" for i in range(10))     # log-batch: 10 metrics (one step) + 3 tags
_KEYS100 = tuple(f"b{i}" for i in range(100))   # log-batch-1000: 100 metrics x 10 steps


class UnsafeTargetError(RuntimeError):
    """The target is neither loopback nor explicitly allowed: nothing was sent."""


class LoadgenError(RuntimeError):
    """The server lacks what an operation needs (not seeded) or a setup request failed."""


@dataclass
class Options:
    """Everything that defines a run; the keyword arguments of the public functions.

    ``duration`` (s) and ``max_requests`` bound the measured phase, whichever comes first, after an
    uncounted ``warmup`` (s). ``timeout``: per-request timeout in s (for 200 MB transfers it bounds
    connecting and each read). ``verify=False`` skips TLS verification, ``ca_file`` is a PEM bundle to
    trust, ``host_header`` overrides Host (and the TLS server name). ``allow_hosts``: non-loopback hosts
    that may be targeted (the project's own test containers). ``seed=True`` lets a run create missing
    seed data. ``mix``: operation -> weight for ``op="mixed"``. ``think``: seconds each client pauses
    after each request (0: closed loop at full speed; > 0 paces clients like training jobs). Requests still in flight when the
    duration ends may finish (and are counted), so a run lasts at most setup + warmup + duration + timeout.
    """

    base_url: str
    op: str = "mixed"
    concurrency: int = 16
    duration: float = 20.0
    max_requests: int = 50_000
    warmup: float = 3.0
    timeout: float = 30.0
    mix: dict[str, float] | None = None
    username: str | None = None
    password: str | None = None
    verify: bool = True
    ca_file: str | None = None
    host_header: str | None = None
    allow_hosts: Sequence[str] = ()
    experiment: str = "loadgen"
    seed_runs: int = 1000
    seed: bool = False
    record_writes: bool = False
    use_uvloop: bool = True
    rng_seed: int | None = None
    think: float = 0.0

    def weights(self) -> dict[str, float]:
        """Operation -> weight of this run (a single operation has weight 1)."""
        return dict(self.mix or DEFAULT_MIX) if self.op == "mixed" else {self.op: 1.0}

    def validate(self) -> None:
        """Raise ValueError for an unknown operation, a bad mix or a bound that is not positive."""
        if self.op not in OPERATIONS:
            raise ValueError(f"unknown operation {self.op!r}; one of {', '.join(OPERATIONS)}")
        w = self.weights()
        if any(k not in OPERATIONS or k == "mixed" or v < 0 for k, v in w.items()) or not any(w.values()):
            raise ValueError(f"bad mix {self.mix!r}")
        if min(self.concurrency, self.duration, self.max_requests, self.timeout) <= 0 \
                or min(self.warmup, self.think) < 0:
            raise ValueError("concurrency, duration, max_requests and timeout must be > 0, warmup and think >= 0")


def _options(base_url: str, **kw: Any) -> Options:
    unknown = sorted(set(kw) - {f.name for f in fields(Options)})
    if unknown:
        raise TypeError(f"unknown option(s): {', '.join(unknown)}")
    return Options(base_url=base_url, **kw)


# ------------------------------------------------------------------------------------------------ safety
def _is_loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(addr.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def check_target(base_url: str, allow_hosts: Sequence[str] = ()) -> list[str]:
    """Resolve the host of ``base_url`` and return its addresses; raise UnsafeTargetError unless every
    address is loopback or the host name/address is in ``allow_hosts``. Sends nothing to the target."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UnsafeTargetError(f"not an http(s) URL with a host: {base_url!r}")
    host, allowed = parts.hostname.lower(), {h.lower().strip("[]") for h in allow_hosts}
    try:
        addrs = sorted({i[4][0] for i in socket.getaddrinfo(host, parts.port or 80, proto=socket.IPPROTO_TCP)})
    except socket.gaierror as exc:
        if host in allowed:
            return []
        raise UnsafeTargetError(f"cannot resolve {host!r}: {exc}") from None
    if host in allowed or (addrs and all(_is_loopback(a) or a.lower() in allowed for a in addrs)):
        return addrs
    raise UnsafeTargetError(f"refusing {host!r} ({', '.join(addrs)}): not loopback and not in allow_hosts")


class _GuardedResolver(aiohttp.ThreadedResolver):
    """Checks every name resolution aiohttp makes (DNS may change after check_target)."""

    def __init__(self, allow_hosts: Sequence[str]) -> None:
        super().__init__()
        self._allowed = {h.lower() for h in allow_hosts}

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[Any]:
        results = await super().resolve(host, port, family)
        if host.lower() not in self._allowed and not all(_is_loopback(r["host"]) for r in results):
            raise OSError(f"loadgen refuses {host}: it resolves to a non-loopback address")
        return results


# ------------------------------------------------------------------------------------------------ client
class _Fail(Exception):
    """A failed request; ``kind`` is the HTTP status, or conn / timeout / short-body / bad-body."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind} {detail}".strip())
        self.kind = kind


_BLOCK: list[bytes] = []


async def _stream(size: int) -> AsyncIterator[bytes]:
    """Yield ``size`` bytes in 1 MiB pieces of one fixed random block: nothing bigger is ever held."""
    if not _BLOCK:
        _BLOCK.append(random.Random(42).randbytes(MIB))
    left = size
    while left > 0:
        piece = _BLOCK[0][:min(left, MIB)]
        left -= len(piece)
        yield piece


class _Client:
    """An aiohttp session bound to one server: base URL (with prefix), auth, TLS and Host header."""

    def __init__(self, o: Options, limit: int = 100) -> None:
        self.base = o.base_url.rstrip("/")
        sslarg: ssl.SSLContext | bool = (ssl.create_default_context(cafile=o.ca_file) if o.ca_file else True) if o.verify else False
        self._sni = urlsplit("//" + o.host_header).hostname if o.host_header and self.base.startswith("https") else None
        headers = {"Host": o.host_header} if o.host_header else {}
        if o.username is not None:
            headers["Authorization"] = "Basic " + base64.b64encode(f"{o.username}:{o.password or ''}".encode()).decode()
        connector = aiohttp.TCPConnector(limit=max(limit, o.concurrency), ssl=sslarg,
                                         resolver=_GuardedResolver(o.allow_hosts), ttl_dns_cache=10)
        self.session = aiohttp.ClientSession(connector=connector, headers=headers)
        self.timeout = aiohttp.ClientTimeout(total=o.timeout)
        self.stream_timeout = aiohttp.ClientTimeout(total=None, sock_connect=o.timeout, sock_read=o.timeout)

    async def close(self) -> None:
        await self.session.close()

    @contextlib.asynccontextmanager
    async def _req(self, method: str, path: str, stream: bool = False, **kw: Any) -> AsyncIterator[aiohttp.ClientResponse]:
        try:
            async with self.session.request(method, self.base + path, allow_redirects=False, server_hostname=self._sni,
                                            timeout=self.stream_timeout if stream else self.timeout, **kw) as resp:
                if resp.status != 200:
                    raise _Fail(str(resp.status), (await resp.read())[:300].decode(errors="replace"))
                yield resp
        except TimeoutError:
            raise _Fail("timeout") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise _Fail("conn", repr(exc)) from None

    async def call(self, method: str, path: str, body: Any = None, params: dict[str, Any] | None = None,
                   parse: bool = True) -> Any:
        """One JSON API call; returns the parsed body (None when ``parse`` is False); raises _Fail."""
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else None
        async with self._req(method, path, data=data, params=params, headers=headers) as resp:
            raw = await resp.read()
        try:
            return json.loads(raw) if parse and raw else None
        except ValueError:
            raise _Fail("bad-body", raw[:100].decode(errors="replace")) from None

    async def upload(self, path: str, size: int) -> int:
        """PUT ``size`` bytes to the artifact proxy, streamed with a Content-Length; returns bytes sent."""
        headers = {"Content-Length": str(size), "Content-Type": "application/octet-stream"}
        async with self._req("PUT", f"{ARTIFACTS}/{path}", stream=True, data=_stream(size), headers=headers) as resp:
            await resp.read()
        return size

    async def download(self, path: str, expect: int) -> int:
        """GET an artifact through the proxy, read in 1 MiB chunks; returns the bytes received."""
        n = 0
        async with self._req("GET", f"{ARTIFACTS}/{path}", stream=True) as resp:
            async for chunk in resp.content.iter_chunked(MIB):
                n += len(chunk)
        if n != expect:
            raise _Fail("short-body", f"{n} of {expect} bytes")
        return n


async def _retry(fn: Callable[[], Any], attempts: int = 5, delay: float = 0.5) -> Any:
    """For setup and verification: retry transient failures (conn, timeout, 429, 5xx)."""
    for i in itertools.count():
        try:
            return await fn()
        except _Fail as f:
            if i >= attempts - 1 or not (f.kind in ("conn", "timeout", "429") or f.kind.startswith("5")):
                raise
            await asyncio.sleep(delay * (i + 1))


async def _bounded(jobs: Sequence[Callable[[], Any]], limit: int) -> list[Any]:
    """Run the coroutine functions, at most ``limit`` at once; results or exceptions, in order."""
    sem = asyncio.Semaphore(limit)

    async def one(fn: Callable[[], Any]) -> Any:
        async with sem:
            return await fn()
    return await asyncio.gather(*(one(f) for f in jobs), return_exceptions=True)


# ---------------------------------------------------------------------------------------- seed and state
@dataclass
class _State:
    session: str
    seed_exp: str = ""
    writes_exp: str = ""
    run_ids: list[str] = field(default_factory=list)
    history_run: str = ""


async def _experiment(c: _Client, name: str, create: bool) -> str | None:
    """The id of experiment ``name``; made if missing and ``create``; else None if missing."""
    async def get() -> str | None:
        try:
            return (await c.call("GET", f"{API}/experiments/get-by-name", params={"experiment_name": name}))["experiment"]["experiment_id"]
        except _Fail as f:
            if f.kind == "404":
                return None
            raise
    exp = await _retry(get)
    if exp is None and create:
        try:
            exp = (await c.call("POST", f"{API}/experiments/create", {"name": name}))["experiment_id"]
        except _Fail:  # created meanwhile by another load generator
            exp = await _retry(get)
    return exp


async def _search_ids(c: _Client, exp: str, role: str, want: int) -> list[str]:
    """Ids of up to ``want`` active runs of ``exp`` tagged loadgen_role=``role`` (paged by 1,000)."""
    ids: list[str] = []
    token = None
    while len(ids) < want:
        body = {"experiment_ids": [exp], "filter": f"tags.loadgen_role = '{role}'", "max_results": min(1000, want - len(ids)),
                **({"page_token": token} if token else {})}
        page = await _retry(lambda: c.call("POST", f"{API}/runs/search", body))
        ids += [r["info"]["run_id"] for r in page.get("runs", [])]
        if not (token := page.get("next_page_token")):
            break
    return ids


async def _new_run(c: _Client, exp: str, name: str, tags: dict[str, str]) -> str:
    body = {"experiment_id": exp, "start_time": int(time.time() * 1000), "run_name": name,
            "tags": [{"key": k, "value": v} for k, v in tags.items()]}
    return (await _retry(lambda: c.call("POST", f"{API}/runs/create", body)))["run"]["info"]["run_id"]


async def _seed_run(c: _Client, exp: str, i: int) -> None:
    """One seed run: 5 params, 5 metrics, then role 'seed' (it is 'seed-pending' until complete)."""
    rid, now = await _new_run(c, exp, f"seed-{i}", {"loadgen_role": "seed-pending"}), int(time.time() * 1000)
    await _retry(lambda: c.call("POST", f"{API}/runs/log-batch", {
        "run_id": rid, "params": [{"key": f"p{k}", "value": str(i * k)} for k in range(5)],
        "metrics": [{"key": f"s{k}", "value": i / (k + 1), "timestamp": now, "step": 0} for k in range(5)],
        "tags": [{"key": "loadgen_role", "value": "seed"}]}, parse=False))


async def _prepare(c: _Client, o: Options, ops: Sequence[str], create: bool) -> _State:
    """Find what ``ops`` need on the server and, with ``create``, make what is missing (only that)."""
    st, need = _State(session=uuid.uuid4().hex[:12]), set(ops)

    def missing(what: str) -> LoadgenError:
        return LoadgenError(f"{what} is missing on {o.base_url}: seed first (seed() or --seed)")

    if need & {"search-runs", "get-run", "get-metric-history"}:
        if (exp := await _experiment(c, o.experiment, create)) is None:
            raise missing(f"experiment {o.experiment!r}")
        st.seed_exp = exp
    if need & {"search-runs", "get-run"}:
        st.run_ids = await _search_ids(c, st.seed_exp, "seed", o.seed_runs)
        short = o.seed_runs - len(st.run_ids)
        if (short > 0 and "search-runs" in need) or not st.run_ids:
            if not create:
                raise missing(f"{o.seed_runs} seed runs in {o.experiment!r} (found {len(st.run_ids)})")
            done = len(st.run_ids)
            errors = [r for r in await _bounded([lambda i=i: _seed_run(c, st.seed_exp, done + i) for i in range(short)],
                                                o.concurrency) if isinstance(r, Exception)]
            if errors:
                raise LoadgenError(f"{len(errors)} seed runs failed, e.g. {errors[0]}")
            st.run_ids = await _search_ids(c, st.seed_exp, "seed", o.seed_runs)
    if "get-metric-history" in need:
        found = await _search_ids(c, st.seed_exp, "history", 1)
        if not found:
            if not create:
                raise missing(f"the {HISTORY_STEPS}-step metric in {o.experiment!r}")
            rid, now = await _new_run(c, st.seed_exp, "history", {"loadgen_role": "history-pending"}), int(time.time() * 1000)
            # A batch holds at most 1,000 metrics + params + tags, so the role tag follows in its own call.
            await _retry(lambda: c.call("POST", f"{API}/runs/log-batch", {"run_id": rid, "metrics": [
                {"key": "history", "value": s / 1000, "timestamp": now + s, "step": s} for s in range(HISTORY_STEPS)]}, parse=False))
            await _retry(lambda: c.call("POST", f"{API}/runs/set-tag", {"run_id": rid, "key": "loadgen_role", "value": "history"}))
            found = [rid]
        st.history_run = found[0]
    if need & {"log-batch", "log-batch-1000", "create-run", "create-model-version"}:
        st.writes_exp = await _experiment(c, o.experiment + "-writes", True) or ""
    for op in ("artifact-download-1mb", "artifact-download-200mb"):
        if op in need:
            size, name = ARTIFACT_BYTES[op], f"{ARTIFACT_BYTES[op] // MIB}mb.bin"
            listing = await _retry(lambda: c.call("GET", ARTIFACTS, params={"path": SEED_DIR}))
            if {f["path"]: int(f.get("file_size", -1)) for f in listing.get("files", [])}.get(name) != size:
                if not create:
                    raise missing(f"artifact {SEED_DIR}/{name}")
                await _retry(lambda: c.upload(f"{SEED_DIR}/{name}", size), attempts=3)
    return st


# ------------------------------------------------------------------------------------------------ records
@dataclass
class WriteRecord:
    """Every write the server acknowledged with HTTP 200 (warm-up included): ``metrics`` holds
    (run_id, metric keys, steps) per log-batch call, ``runs`` the ids from create-run,
    ``model_versions`` (name, version) pairs, ``artifacts`` (path, size) per upload."""

    metrics: list[tuple[str, tuple[str, ...], range]] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)
    model_versions: list[tuple[str, str]] = field(default_factory=list)
    artifacts: list[tuple[str, int]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """How many acknowledged writes of each kind."""
        return {"metric_values": sum(len(k) * len(s) for _, k, s in self.metrics), "runs": len(self.runs),
                "model_versions": len(self.model_versions), "artifacts": len(self.artifacts)}

    def extend(self, other: WriteRecord) -> None:
        """Add the writes of ``other`` (to verify several runs at once)."""
        for f in fields(self):
            getattr(self, f.name).extend(getattr(other, f.name))


@dataclass
class Missing:
    """What verify_writes did not find (artifacts: path, expected size, size found or None);
    ``errors`` lists checks that could not be made at all; ``checked`` counts what was checked."""

    metrics: list[tuple[str, str, int]] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)
    model_versions: list[tuple[str, str]] = field(default_factory=list)
    artifacts: list[tuple[str, int, int | None]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    checked: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """Number of missing writes."""
        return len(self.metrics) + len(self.runs) + len(self.model_versions) + len(self.artifacts)

    @property
    def ok(self) -> bool:
        """Nothing missing and every check made."""
        return self.total == 0 and not self.errors

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "total": self.total, **{f.name: getattr(self, f.name) for f in fields(self)}}


# ------------------------------------------------------------------------------------------------ report
@dataclass
class OpStats:
    """Measured-phase figures of one operation; latencies are of successful requests only;
    ``error_samples`` keeps the first message seen for each error kind."""

    requests: int = 0
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    nbytes: int = 0
    error_samples: dict[str, str] = field(default_factory=dict)

    def add(self, seconds: float, error: _Fail | None, nbytes: int) -> None:
        self.requests += 1
        if error is None:
            self.ok += 1
            self.latencies_ms.append(seconds * 1000)
            self.nbytes += nbytes
        else:
            self.errors[error.kind] += 1
            self.error_samples.setdefault(error.kind, str(error)[:300])

    def percentiles(self, *ps: float) -> list[float | None]:
        """Nearest-rank percentiles of the successful latencies, in ms (None without any)."""
        s = sorted(self.latencies_ms)
        return [s[min(len(s) - 1, max(0, math.ceil(p / 100 * len(s)) - 1))] if s else None for p in ps]


@dataclass
class Report:
    """Result of one run; ``duration_s`` is the measured phase (warm-up excluded, in-flight requests
    at the end included); ``stopped_by`` is duration, max_requests, stop or cancelled."""

    base_url: str
    op: str
    concurrency: int
    warmup_s: float
    duration_s: float = 0.0
    stopped_by: str = ""
    started_at: str = ""
    event_loop: str = ""
    ops: dict[str, OpStats] = field(default_factory=dict)
    record: WriteRecord | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-able figures; per operation: requests, ok, rps, p50/p95/p99 ms, errors, MB/s (artifacts)."""
        d, ops = max(self.duration_s, 1e-9), {}
        for name, s in self.ops.items():
            p = [None if v is None else round(v, 2) for v in s.percentiles(50, 95, 99)]
            ops[name] = {"requests": s.requests, "ok": s.ok, "rps": round(s.requests / d, 2), "p50_ms": p[0],
                         "p95_ms": p[1], "p99_ms": p[2], "errors": dict(s.errors), "error_samples": s.error_samples,
                         "mb_per_s": round(s.nbytes / MIB / d, 2) if name in ARTIFACT_BYTES else None}
        total = sum(s.requests for s in self.ops.values())
        return {"base_url": self.base_url, "op": self.op, "concurrency": self.concurrency, "warmup_s": self.warmup_s,
                "duration_s": round(self.duration_s, 3), "stopped_by": self.stopped_by, "started_at": self.started_at,
                "event_loop": self.event_loop, "total_requests": total, "total_rps": round(total / d, 2),
                "total_errors": sum(sum(s.errors.values()) for s in self.ops.values()), "ops": ops,
                "writes": self.record.counts() if self.record else None}


def format_report(report: Report) -> str:
    """The report as a heading line and a Markdown table, one row per operation (MB = 2^20 bytes)."""
    d = report.as_dict()
    lines = [f"**{d['op']}** @ {d['base_url']}: concurrency {d['concurrency']}, {d['duration_s']} s measured after "
             f"{d['warmup_s']} s warm-up, stopped by {d['stopped_by']}, {d['total_requests']} requests "
             f"({d['total_rps']}/s), {d['total_errors']} errors, {d['event_loop']}", "",
             "| operation | requests | req/s | p50 ms | p95 ms | p99 ms | errors | MB/s |",
             "|---|---:|---:|---:|---:|---:|---|---:|"]
    for name, s in d["ops"].items():
        cells = ["-" if v is None else f"{v:.1f}" for v in (s["rps"], s["p50_ms"], s["p95_ms"], s["p99_ms"], s["mb_per_s"])]
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(s["errors"].items())) or "0"
        lines.append(f"| {name} | {s['requests']} | {' | '.join(cells[:4])} | {errors} | {cells[4]} |")
    return "\n".join(lines)


def print_report(report: Report, file: Any = None) -> None:
    """Print format_report(report), to stdout by default."""
    print(format_report(report), file=file or sys.stdout)


# ------------------------------------------------------------------------------------------------ workers
class _Worker:
    """One of the ``concurrency`` request loops, with its own run, registered model and counters."""

    def __init__(self, idx: int, c: _Client, o: Options, st: _State, record: WriteRecord | None) -> None:
        self.idx, self.c, self.st, self.record = idx, c, st, record
        self.rng = random.Random(None if o.rng_seed is None else o.rng_seed + idx)
        weights = o.weights()
        self.names, self.cum = list(weights), list(itertools.accumulate(weights.values()))
        self.step = self.n = 0
        self.run_id = self.model = ""

    async def setup(self) -> None:
        """Create this worker's run (log-batch, model versions) and its registered model."""
        if set(self.names) & {"log-batch", "log-batch-1000", "create-model-version"}:
            self.run_id = await _new_run(self.c, self.st.writes_exp, f"{self.st.session}-w{self.idx}",
                                         {"loadgen_session": self.st.session})
        if "create-model-version" in self.names:
            self.model = f"loadgen-{self.st.session}-w{self.idx}"
            await _retry(lambda: self.c.call("POST", f"{API}/registered-models/create", {"name": self.model}, parse=False))

    def pick(self) -> str:
        return self.names[0] if len(self.names) == 1 else self.rng.choices(self.names, cum_weights=self.cum)[0]

    async def do(self, op: str) -> int:
        """Perform one ``op``; return the bytes moved (artifact operations) or 0; raise _Fail on failure."""
        c, st, rec = self.c, self.st, self.record
        if op == "health":
            await c.call("GET", "/health", parse=False)
        elif op in ("log-batch", "log-batch-1000"):
            keys, nsteps = (_KEYS10, 1) if op == "log-batch" else (_KEYS100, 10)
            steps, now = range(self.step, self.step + nsteps), int(time.time() * 1000)
            self.step += nsteps
            body: dict[str, Any] = {"run_id": self.run_id, "metrics": [
                {"key": k, "value": s + i / 100, "timestamp": now, "step": s} for s in steps for i, k in enumerate(keys)]}
            if op == "log-batch":
                body["tags"] = [{"key": f"t{i}", "value": str(steps[0])} for i in range(3)]
            await c.call("POST", f"{API}/runs/log-batch", body, parse=False)
            if rec is not None:
                rec.metrics.append((self.run_id, keys, steps))
        elif op == "search-runs":
            await c.call("POST", f"{API}/runs/search", {"experiment_ids": [st.seed_exp], "max_results": 100}, parse=False)
        elif op == "get-run":
            await c.call("GET", f"{API}/runs/get", params={"run_id": self.rng.choice(st.run_ids)}, parse=False)
        elif op == "get-metric-history":
            await c.call("GET", f"{API}/metrics/get-history", parse=False,
                         params={"run_id": st.history_run, "metric_key": "history", "max_results": HISTORY_STEPS})
        elif op == "create-run":
            run = await c.call("POST", f"{API}/runs/create", {"experiment_id": st.writes_exp, "start_time": int(time.time() * 1000),
                                                               "tags": [{"key": "loadgen_session", "value": st.session}]})
            if rec is not None:
                rec.runs.append(run["run"]["info"]["run_id"])
        elif op == "create-model-version":
            mv = await c.call("POST", f"{API}/model-versions/create",
                              {"name": self.model, "source": f"runs:/{self.run_id}/model", "run_id": self.run_id})
            if rec is not None:
                rec.model_versions.append((self.model, mv["model_version"]["version"]))
        elif op.startswith("artifact-upload"):
            size = ARTIFACT_BYTES[op]
            self.n += 1  # each worker overwrites one 200 MB file, so a long run cannot fill the server's disk
            path = f"loadgen/uploads/{st.session}/w{self.idx}-" + (f"{self.n}-1mb.bin" if size == MIB else "200mb.bin")
            await c.upload(path, size)
            if rec is not None:
                rec.artifacts.append((path, size))
            return size
        elif op.startswith("artifact-download"):
            size = ARTIFACT_BYTES[op]
            return await c.download(f"{SEED_DIR}/{size // MIB}mb.bin", expect=size)
        else:
            raise ValueError(op)
        return 0


# ------------------------------------------------------------------------------------------------ runs
async def run_async(o: Options, stop: asyncio.Event | None = None, ready: Callable[[], None] | None = None,
                    record: WriteRecord | None = None) -> Report:
    """Run one workload in the running event loop and return its Report.

    ``stop`` ends it early (in-flight requests get ``o.timeout`` to finish); ``ready`` is called when
    seed data and per-worker setup are done, as the warm-up starts. Acknowledged writes go to
    ``record`` (a new WriteRecord when None and ``o.record_writes``), also ``Report.record``.
    """
    o.validate()
    check_target(o.base_url, o.allow_hosts)
    stop = stop or asyncio.Event()
    record = record if record is not None else (WriteRecord() if o.record_writes else None)
    report = Report(o.base_url, o.op, o.concurrency, o.warmup, started_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    event_loop=type(asyncio.get_running_loop()).__module__.split(".")[0], record=record)
    c = _Client(o)
    try:
        try:
            st = await _prepare(c, o, list(o.weights()), create=o.seed)
        except _Fail as f:
            raise LoadgenError(f"a setup request failed: {f}") from None
        workers = [_Worker(i, c, o, st, record) for i in range(o.concurrency)]
        if errors := [r for r in await _bounded([w.setup for w in workers], 4) if isinstance(r, Exception)]:
            raise LoadgenError(f"{len(errors)} of {o.concurrency} worker setups failed, e.g. {errors[0]}")
        if ready:
            ready()
        report.ops = {name: OpStats() for name in o.weights()}
        warm_end = time.monotonic() + o.warmup
        end, issued = warm_end + o.duration, 0

        async def loop(w: _Worker) -> None:
            nonlocal issued
            while not stop.is_set() and (now := time.monotonic()) < end:
                if counted := now >= warm_end:
                    if issued >= o.max_requests:
                        return
                    issued += 1
                op, t0, error, n = w.pick(), time.perf_counter(), None, 0
                try:
                    n = await w.do(op)
                except _Fail as f:
                    error = f
                if counted:
                    report.ops[op].add(time.perf_counter() - t0, error, n)
                if o.think:
                    await asyncio.sleep(o.think)

        tasks = [asyncio.create_task(loop(w)) for w in workers]
        waiter, stopper = asyncio.gather(*tasks), asyncio.create_task(stop.wait())
        await asyncio.wait([waiter, stopper], timeout=max(0.0, end + o.timeout - time.monotonic()),
                           return_when=asyncio.FIRST_COMPLETED)
        if not waiter.done() and stop.is_set():
            await asyncio.wait([waiter], timeout=o.timeout)
        stopper.cancel()
        if not waiter.done():
            report.stopped_by = "cancelled"
            for t in tasks:
                t.cancel()
            await asyncio.gather(waiter, return_exceptions=True)
        else:
            waiter.result()  # a bug in a worker surfaces here
        report.duration_s = max(0.0, time.monotonic() - warm_end)
        report.stopped_by = report.stopped_by or (
            "stop" if stop.is_set() else "max_requests" if issued >= o.max_requests else "duration")
    finally:
        await c.close()
    return report


def _runner(o: Options) -> asyncio.Runner:
    """An asyncio.Runner on uvloop when it is installed and wanted (it costs less CPU), else asyncio's loop."""
    if o.use_uvloop:
        with contextlib.suppress(ImportError):
            import uvloop
            return asyncio.Runner(loop_factory=uvloop.new_event_loop)
    return asyncio.Runner()


async def _with_client(o: Options, fn: Callable[[_Client], Any], limit: int = 100) -> Any:
    c = _Client(o, limit)
    try:
        return await fn(c)
    finally:
        await c.close()


def seed(base_url: str, ops: Sequence[str] | None = None, **options: Any) -> None:
    """Create what ``ops`` need, where missing (default: every operation but artifact-download-200mb):
    experiment ``experiment`` with ``seed_runs`` runs, the 1,000-step metric, files to download."""
    o = _options(base_url, **options)
    check_target(o.base_url, o.allow_hosts)
    wanted = list(ops) if ops else [op for op in OPERATIONS if op not in ("mixed", "artifact-download-200mb")]
    with _runner(o) as r:
        try:
            r.run(_with_client(o, lambda c: _prepare(c, o, wanted, create=True)))
        except _Fail as f:
            raise LoadgenError(f"a seed request failed: {f}") from None


def run_workload(base_url: str, op: str = "mixed", **options: Any) -> Report:
    """Run a workload to its bounds from synchronous code and return the Report."""
    o = _options(base_url, op=op, **options)
    with _runner(o) as r:
        return r.run(run_async(o))


class BackgroundLoad:
    """A workload running in its own thread and event loop (see background_load()). ``record`` fills
    as writes are acknowledged; ``report`` is set once the workload has ended."""

    def __init__(self, o: Options) -> None:
        self.options = o
        self.report: Report | None = None
        self.record: WriteRecord | None = WriteRecord() if o.record_writes else None
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="loadgen", daemon=True)

    def _main(self) -> None:
        async def go() -> None:
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            self.report = await run_async(self.options, self._stop, self._ready.set, self.record)
        try:
            with _runner(self.options) as r:
                r.run(go())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller by start() or stop()
            self.error = exc
        finally:
            self._ready.set()

    def start(self, setup_timeout: float = 300.0) -> BackgroundLoad:
        """Start; return once setup is done and the warm-up has begun. Raises what setup raised."""
        check_target(self.options.base_url, self.options.allow_hosts)
        self._thread.start()
        if not self._ready.wait(setup_timeout):
            self.stop(raise_error=False)
            raise LoadgenError(f"setup took longer than {setup_timeout} s")
        if self.error:
            raise self.error
        return self

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self, raise_error: bool = True) -> Report | None:
        """End the workload if still running, wait for its thread, return the Report."""
        if self._thread.is_alive() and self._loop and self._stop:
            with contextlib.suppress(RuntimeError):  # the loop may have closed meanwhile
                self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread.ident is not None:
            self._thread.join(2 * self.options.timeout + 10)
        if raise_error and self.error:
            raise self.error
        return self.report


@contextlib.contextmanager
def background_load(base_url: str, op: str = "mixed", **options: Any) -> Iterator[BackgroundLoad]:
    """Run a workload in a background thread while the ``with`` body runs. It ends when the body exits or
    at its own bounds (``duration``, ``max_requests``), whichever is first; then ``.report`` and
    ``.record`` hold the results. An error of the workload is raised on exit (unless the body raised)."""
    bg = BackgroundLoad(_options(base_url, op=op, **options)).start()
    ok = False
    try:
        yield bg
        ok = True
    finally:
        bg.stop(raise_error=ok)


# ------------------------------------------------------------------------------------------------ verify
async def _verify(c: _Client, record: WriteRecord, limit: int) -> Missing:
    miss, want, dirs = Missing(), {}, {}
    for run_id, keys, steps in record.metrics:
        for k in keys:
            want.setdefault((run_id, k), set()).update(steps)
    for path, size in record.artifacts:
        d, _, name = path.rpartition("/")
        dirs.setdefault(d, {})[name] = size  # the last upload to a path wins

    async def metric(run_id: str, key: str) -> None:
        got, token = set(), None
        while True:
            params = {"run_id": run_id, "metric_key": key, "max_results": 25000, **({"page_token": token} if token else {})}
            page = await _retry(lambda: c.call("GET", f"{API}/metrics/get-history", params=params), attempts=3)
            got.update(int(m.get("step", 0)) for m in page.get("metrics", []))
            if not (token := page.get("next_page_token")):
                break
        miss.metrics.extend((run_id, key, s) for s in want[(run_id, key)] - got)

    async def exists(path: str, params: dict[str, str], missing: list[Any], item: Any) -> None:
        try:
            await _retry(lambda: c.call("GET", path, params=params, parse=False), attempts=3)
        except _Fail as f:
            if f.kind != "404":
                raise
            missing.append(item)

    async def listing(d: str) -> None:
        page = await _retry(lambda: c.call("GET", ARTIFACTS, params={"path": d}), attempts=3)
        got = {f["path"].rpartition("/")[2]: int(f.get("file_size", -1)) for f in page.get("files", [])}
        miss.artifacts.extend((f"{d}/{n}", s, got.get(n)) for n, s in dirs[d].items() if got.get(n) != s)

    jobs = ([lambda k=k: metric(*k) for k in want]
            + [lambda r=r: exists(f"{API}/runs/get", {"run_id": r}, miss.runs, r) for r in dict.fromkeys(record.runs)]
            + [lambda m=m: exists(f"{API}/model-versions/get", {"name": m[0], "version": m[1]}, miss.model_versions, m)
               for m in dict.fromkeys(record.model_versions)]
            + [lambda d=d: listing(d) for d in dirs])
    miss.errors = [str(r) for r in await _bounded(jobs, limit) if isinstance(r, Exception)]
    miss.checked = {"metric_values": sum(map(len, want.values())), "runs": len(set(record.runs)),
                    "model_versions": len(set(record.model_versions)), "artifacts": sum(map(len, dirs.values()))}
    for found in (miss.metrics, miss.runs, miss.model_versions, miss.artifacts):
        found.sort()
    return miss


def verify_writes(base_url: str, record: WriteRecord, concurrency: int = 8, **options: Any) -> Missing:
    """Read every write of ``record`` back through the REST API, at most ``concurrency`` requests in
    flight (each retried on transient errors), and return what is missing. ``options``: the connection
    fields of Options (username, password, verify, ca_file, host_header, allow_hosts, timeout)."""
    o = _options(base_url, concurrency=concurrency, **options)
    check_target(o.base_url, o.allow_hosts)
    with _runner(o) as r:
        return r.run(_with_client(o, lambda c: _verify(c, record, concurrency), limit=concurrency))


# ------------------------------------------------------------------------------------------------ CLI
def _parse_mix(text: str) -> dict[str, float]:
    """``log-batch=60,search-runs=15`` -> {"log-batch": 60.0, "search-runs": 15.0}."""
    return {name.strip(): float(w or 1) for name, _, w in (p.partition("=") for p in text.split(",") if p)}


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: run one workload, print its Markdown table, optionally write JSON. Exit 2 when
    refused or not seeded, 1 when --verify-writes finds a write missing."""
    p = argparse.ArgumentParser(description="Load generator for MLflow's REST API (loopback or --allow-host only).")
    p.add_argument("--url", required=True, help="base URL, may include a path prefix")
    p.add_argument("--op", default="mixed", choices=OPERATIONS)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--duration", type=float, default=20.0, help="measured seconds (upper bound)")
    p.add_argument("--max-requests", type=int, default=50_000, help="measured requests (upper bound)")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of uncounted warm-up")
    p.add_argument("--timeout", type=float, default=30.0, help="per-request timeout, seconds")
    p.add_argument("--mix", type=_parse_mix, help="weights for mixed, e.g. log-batch=60,search-runs=15,get-run=25")
    p.add_argument("--seed", action="store_true", help="create missing seed data first")
    p.add_argument("--seed-runs", type=int, default=1000)
    p.add_argument("--experiment", default="loadgen")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    p.add_argument("--user")
    p.add_argument("--password-env", metavar="VAR", help="environment variable holding the password")
    p.add_argument("--insecure", action="store_true", help="do not verify TLS certificates")
    p.add_argument("--ca-file", help="PEM bundle to trust")
    p.add_argument("--host-header")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME", help="non-loopback host to allow")
    p.add_argument("--verify-writes", action="store_true", help="record acknowledged writes, read them back after")
    p.add_argument("--no-uvloop", action="store_true")
    p.add_argument("--think", type=float, default=0.0, help="seconds each client pauses after each request")
    a = p.parse_args(argv)
    password = os.environ.get(a.password_env) if a.password_env else None
    if a.password_env and password is None:
        p.error(f"environment variable {a.password_env} is not set")
    conn = dict(username=a.user, password=password, verify=not a.insecure, ca_file=a.ca_file, host_header=a.host_header,
                allow_hosts=tuple(a.allow_host), timeout=a.timeout, use_uvloop=not a.no_uvloop)
    try:
        report = run_workload(a.url, a.op, concurrency=a.concurrency, duration=a.duration, max_requests=a.max_requests,
                              warmup=a.warmup, mix=a.mix, seed=a.seed, seed_runs=a.seed_runs, experiment=a.experiment,
                              record_writes=a.verify_writes, think=a.think, **conn)
    except (UnsafeTargetError, LoadgenError, ValueError) as exc:
        print(f"loadgen: {exc}", file=sys.stderr)
        return 2
    print_report(report)
    out = report.as_dict()
    if a.verify_writes and report.record is not None:
        missing = verify_writes(a.url, report.record, **conn)
        print(f"\nverify_writes: checked {missing.checked}, missing {missing.total}, unverifiable {len(missing.errors)}")
        out["missing"] = missing.as_dict()
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(out, fh, indent=2)
    return 1 if a.verify_writes and not out["missing"]["ok"] else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Wait until the MLflow service answers OK on /health, or say why it will not.

    mlflow_health.py --url https://127.0.0.1:5000/health --unit mlflow.service --timeout 180

Polls /health once a second. Gives up early when the server cannot come up, since waiting out the
timeout would only prolong the outage: when systemd has restarted the unit more than
--max-restarts times since this helper started (the server exits at start: a wrong password, an
unreachable database), when the unit has failed for good, or when more than --max-restarts
tracebacks were logged by this start of the unit (uvicorn's supervisor restarts workers that die
at start, such as on a key that does not match its certificate, without ever exiting itself), or
when MLflow failed to connect to its database more than --max-restarts + 1 times (a wrong
password: MLflow retries for minutes with a growing back-off).
Prints one line of JSON: {"healthy": bool, "seconds": float, "reason": str, "state": {...}};
exits 0 when healthy, 1 otherwise. Standard library only; runs with the host's Python.
"""
import argparse
import json
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request


def unit_state(unit):
    out = subprocess.run(["systemctl", "show", unit, "-p", "ActiveState", "-p", "SubState", "-p", "NRestarts",
                          "-p", "Result", "-p", "ExecMainStatus", "-p", "MainPID", "-p", "InvocationID"],
                         capture_output=True, text=True, check=False).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


# MLflow logs this, and retries with a growing back-off for minutes, when its database refuses it.
DB_REFUSED = "SQLAlchemy engine could not be created"


def journal_errors(invocation):
    """(tracebacks, failed database connections) logged by the processes of this start of the unit."""
    if not invocation:
        return 0, 0
    out = subprocess.run(["journalctl", f"_SYSTEMD_INVOCATION_ID={invocation}", "--output=cat", "--no-pager"],
                         capture_output=True, text=True, check=False).stdout.splitlines()
    return (sum(1 for line in out if line.startswith("Traceback (most recent call last)")),
            sum(1 for line in out if DB_REFUSED in line))


def healthy_body(body):
    """MLflow answers `OK`; the single sign-on app (mlflow-oidc-auth) answers {"status": "ok"}."""
    if body.strip() == "OK":
        return True
    try:
        return json.loads(body).get("status") == "ok"
    except (ValueError, AttributeError):
        return False


def probe(url, context):
    try:
        with urllib.request.urlopen(url, timeout=5, context=context) as response:
            return response.status == 200 and healthy_body(response.read().decode()), f"HTTP {response.status}"
    except urllib.error.HTTPError as error:
        return False, f"HTTP {error.code}"
    except (OSError, ValueError) as error:
        return False, str(getattr(error, "reason", error))


def verdict(args, state, baseline, errors_of, elapsed, answer):
    """Why the unit will not become healthy, or "" to keep waiting. errors_of() reads the journal."""
    restarts = int(state.get("NRestarts") or 0) - baseline
    if state.get("ActiveState") == "failed":
        return (f"{args.unit} failed ({state.get('Result')}, exit status {state.get('ExecMainStatus')}) "
                f"and systemd gave up restarting it")
    if restarts > args.max_restarts:
        return (f"{args.unit} exited at start {restarts} times (last exit status "
                f"{state.get('ExecMainStatus')}): it will not become healthy")
    tracebacks, refusals = errors_of()
    if tracebacks > args.max_restarts:
        return (f"{args.unit}'s server processes keep exiting at start ({tracebacks} tracebacks in the journal "
                f"of this start): it will not become healthy")
    if refusals > args.max_restarts + 1:
        return (f"{args.unit} cannot connect to its database ({refusals} attempts failed at start, see the "
                f"journal): it will not become healthy")
    if elapsed >= args.timeout:
        return f"{args.url} did not answer OK within {args.timeout:.0f} s (last answer: {answer})"
    return ""


def parse_args(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--unit", default="mlflow.service")
    parser.add_argument("--timeout", type=float, default=180)
    parser.add_argument("--max-restarts", type=int, default=2)
    return parser.parse_args(argv)


def main():
    args = parse_args()
    # The host's own loopback address is not a name on its certificate.
    context = ssl._create_unverified_context()  # noqa: S323
    start = time.monotonic()
    # systemd keeps counting NRestarts across a manual restart: those of a failed change that was
    # just rolled back are not this start's.
    baseline = int(unit_state(args.unit).get("NRestarts") or 0)
    while True:
        healthy, answer = probe(args.url, context)
        elapsed = round(time.monotonic() - start, 1)
        state = unit_state(args.unit)
        if healthy:
            print(json.dumps({"healthy": True, "seconds": elapsed, "reason": "", "state": state}))
            return 0
        reason = verdict(args, state, baseline, lambda: journal_errors(state.get("InvocationID")), elapsed, answer)
        if reason:
            print(json.dumps({"healthy": False, "seconds": elapsed, "reason": reason, "state": state}))
            return 1
        time.sleep(1)


if __name__ == "__main__":
    sys.exit(main())

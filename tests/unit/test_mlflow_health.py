"""mlflow_health.py's verdict: when waiting for /health is given up, and why."""
import mlflow_health
import pytest

ARGS = mlflow_health.parse_args(["--url", "http://127.0.0.1:5000/health", "--timeout", "180"])


def verdict(state, baseline=0, errors=(0, 0), elapsed=1.0):
    return mlflow_health.verdict(ARGS, {"ActiveState": "activating", **state}, baseline, lambda: errors,
                                 elapsed, "connection refused")


def test_restarts_of_an_earlier_start_do_not_count():
    # A failed change crash-looped 3 times; the rollback's restart must not inherit them.
    assert verdict({"NRestarts": "3"}, baseline=3) == ""
    assert verdict({"NRestarts": str(3 + ARGS.max_restarts)}, baseline=3) == ""


def test_restarts_since_the_wait_began_give_up():
    reason = verdict({"NRestarts": str(4 + ARGS.max_restarts), "ExecMainStatus": "1"}, baseline=3)
    assert f"exited at start {ARGS.max_restarts + 1} times" in reason


def test_a_failed_unit_gives_up_at_once():
    assert "systemd gave up" in verdict({"ActiveState": "failed", "Result": "exit-code"})


@pytest.mark.parametrize("errors,text", [((ARGS.max_restarts + 1, 0), "tracebacks"),
                                         ((0, ARGS.max_restarts + 2), "cannot connect to its database")])
def test_the_journal_of_this_start_gives_up(errors, text):
    assert text in verdict({}, errors=errors)
    assert verdict({}, errors=(ARGS.max_restarts, ARGS.max_restarts + 1)) == ""


def test_the_timeout_names_the_last_answer():
    assert "within 180 s (last answer: connection refused)" in verdict({}, elapsed=180.0)
    assert verdict({}, elapsed=179.0) == ""


@pytest.mark.parametrize("body,ok", [("OK", True), ('{"status": "ok"}', True), ("", False), ('{"status": "down"}', False)])
def test_healthy_bodies(body, ok):
    assert mlflow_health.healthy_body(body) is ok

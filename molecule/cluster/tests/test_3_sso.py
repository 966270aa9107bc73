"""Single sign-on: the servers behind the balancer switch from basic auth to OIDC, against a real provider.

Runs last: test_1 and test_2 leave the servers behind the balancer on the role's release with basic
auth. The switch is a converge of the servers behind the balancer with mlflow_auth_type: oidc and
nothing else changed (the inventory holds the provider's settings, molecule.yml). The provider is
npm's certified oidc-provider on mlflow-idp (molecule/shared/oidc-test-provider.yml), with the users
of test_oidc_users; sso_flows.py plays their browsers and an MLflow client on mlflow-app-direct,
inside the test network, where the provider and the balancer have the names the servers know.
"""

import base64
import json
import pathlib
import uuid

import pytest
from mlflow_testlib import install_test_ca, other_host, run_python, var
from test_1_changes_under_load import APPS, DIRECT, FINAL_VARS, LB, HealthWatch, converge, task_outcomes
from test_2_backends import CMDLINE_SCAN, SECRETS, psql_db

testinfra_hosts = ["ansible://mlflow-app-1"]

CLIENT_SECRET = var(APPS[0], "mlflow_oidc_client_secret")
USERS = {u["login"]: u for u in var(APPS[0], "test_oidc_users")}
MEMBER_GROUPS, ADMIN_GROUPS = var(APPS[0], "mlflow_oidc_user_groups"), var(APPS[0], "mlflow_oidc_admin_groups")


def user_in(groups, excluded=()):
    """A user of the provider who is in one of `groups` and in none of `excluded`."""
    return next(u for u in USERS.values() if set(u["groups"]) & set(groups) and not set(u["groups"]) & set(excluded))


MEMBER = user_in(MEMBER_GROUPS, ADMIN_GROUPS)
ADMIN = user_in(ADMIN_GROUPS)
OUTSIDER = next(u for u in USERS.values() if not set(u["groups"]) & set(MEMBER_GROUPS + ADMIN_GROUPS))
PORT = var(APPS[0], "mlflow_port")
CA_PATH = "/root/test-ca.crt"


@pytest.fixture(scope="module")
def switch():
    """The switch (with /health polled through the balancer meanwhile), then the users' flows: what the
    play printed, the seconds the balancer had no healthy server, and what the flows saw."""
    watch = HealthWatch()
    watch.start()
    try:
        # The servers only: the balancer's configuration does not depend on how users log in.
        output = converge({**FINAL_VARS, "mlflow_auth_type": "oidc"}, limit="mlflow_lb_backends")
    finally:
        watch.stop.set()
        watch.join()
    print(f"\nswitch to single sign-on: the balancer had no healthy server for {watch.window():.2f} s")
    client = other_host(DIRECT)
    install_test_ca(client, CA_PATH)
    config = {"lb": "https://" + LB, "ca": CA_PATH, "suffix": uuid.uuid4().hex[:8],
              "servers": [f"http://{name}:{PORT}" for name in APPS],
              "member": MEMBER, "admin": ADMIN, "outsider": OUTSIDER}
    script = "import json\nCONFIG = json.loads(" + repr(json.dumps(config)) + ")\n"
    script += (pathlib.Path(__file__).parent / "sso_flows.py").read_text()
    out = run_python(client, script)
    assert out.rc == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return output, watch.window(), json.loads(out.stdout.strip().splitlines()[-1])


def test_the_switch_rolls_with_a_server_always_up_and_makes_the_users_database_once(switch):
    output, down, _ = switch
    assert down == 0.0, f"the balancer answered /health with an error for {down:.2f} s during the switch"
    restarts = task_outcomes(output, "Restart MLflow")
    assert all(outcomes.count("changed") == 1 for outcomes in restarts.values()) and len(restarts) == len(APPS), restarts
    migrated = task_outcomes(output, "Migrate the database schema, once per database")
    assert sorted(o for outcomes in migrated.values() for o in outcomes if o != "skipping") == ["changed"], migrated


def test_every_server_runs_the_single_sign_on_app(switch):
    for name in APPS:
        h = other_host(name)
        assert "--app-name oidc-auth" in h.file("/etc/systemd/system/mlflow.service").content_string
        env = h.file("/etc/mlflow/mlflow.env")
        assert env.mode == 0o640 and env.user == "root" and env.group == "mlflow"
        assert f'OIDC_REDIRECT_URI="https://{LB}/callback"' in env.content_string
        assert h.service("mlflow").is_running


def test_its_users_live_in_a_postgresql_database_of_their_own(switch):
    db = other_host("mlflow-db")
    oidc_db = var(APPS[0], "mlflow_oidc_db_name")
    names = psql_db(db, oidc_db, "select username from users order by username").split()
    assert MEMBER["email"] in names and ADMIN["email"] in names and OUTSIDER["email"] not in names
    assert psql_db(db, oidc_db, f"select is_admin from users where username = '{ADMIN['email']}'") == "t"
    assert int(psql_db(db, oidc_db, "select count(*) from auth_sessions")) >= 2


def test_anonymous_requests_get_401_and_no_ui(switch):
    *_, report = switch
    assert report["anonymous"]["api"] == 401
    assert report["anonymous"]["ui"] in (302, 303, 307, 401), report["anonymous"]


def test_a_member_logs_in_through_the_provider_and_sees_the_ui(switch):
    *_, report = switch
    login = report["member_login"]
    assert login["steps"][:1] == ["login"], login
    assert any(hop.endswith("/callback") for hop in login["hops"]), login
    assert login["auth_status"]["authenticated"] and login["auth_status"]["username"] == MEMBER["email"], login
    assert report["member_ui"]["status"] == 200 and report["member_ui"]["mlflow_ui"], report["member_ui"]


def test_a_login_through_the_balancer_holds_on_every_server_behind_it(switch):
    *_, report = switch
    assert sorted(report["servers"]) == sorted(f"http://{name}:{PORT}" for name in APPS)
    for server, seen in report["servers"].items():
        assert seen == {"username": MEMBER["email"], "api": 200}, (server, seen)


def test_a_user_outside_the_groups_is_refused(switch):
    *_, report = switch
    login = report["outsider_login"]
    assert login["steps"][:1] == ["login"] and any(hop.endswith("/callback") for hop in login["hops"]), login
    assert login["auth_status_code"] == 401 and not login["auth_status"].get("authenticated"), login


def test_an_admin_manages_permissions_and_a_member_does_not(switch):
    *_, report = switch
    assert report["admin_login"]["auth_status"]["authenticated"], report["admin_login"]
    permissions = report["permissions"]
    assert permissions["member_runs_in_withheld"] == 403 and permissions["member_grants_herself"] == 403, permissions
    # The grant answers 200 (mlflow-oidc-auth 10.x) or 201 (11.x); then the member may run there.
    assert permissions["admin_grants_member"] in (200, 201) and permissions["member_runs_in_granted"] == 200, permissions


def test_a_client_with_a_token_logs_a_run_and_an_artifact_and_without_one_gets_401(switch):
    *_, report = switch
    assert report["token"] == {"status": 201, "prefix": "mlf_"}, report["token"]
    assert report["client"] == {"loss": 0.5, "artifact_matches": True}, report["client"]
    assert report["client_without_token"] == 401 and report["client_wrong_token"] == 401, report


@pytest.mark.parametrize("name", APPS + [LB])
def test_the_client_secret_is_in_no_command_line_journal_or_play_output(switch, name):
    output, *_ = switch
    assert CLIENT_SECRET not in output
    h = other_host(name)
    encoded = base64.b64encode(" ".join(SECRETS + [CLIENT_SECRET]).encode()).decode()
    scan = json.loads(h.run(f"python3 -c '{CMDLINE_SCAN}' {encoded}").stdout)
    assert scan["scanned"] > 5 and scan["hits"] == []
    assert CLIENT_SECRET not in h.run("journalctl --no-pager -o cat").stdout

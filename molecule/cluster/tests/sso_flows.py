"""Single sign-on as its users meet it, run with the conda env's Python on a host of the test network.

What a browser does is driven with requests: GET /login on the balancer, which sends the browser to
the OpenID provider; its login form is posted; the provider sends the browser back to the redirect
URI with a code, which MLflow redeems (the authorization-code flow with PKCE). Then, with the
session cookie: the UI, the same session on each server directly, an admin's grants, a personal
access token, and an MLflow client that logs a run and an artifact with it.

The test (test_3_sso.py) prepends CONFIG = {...}; this prints one JSON report, and asserts nothing.
"""

import datetime
import json
import os
import re
import tempfile
import urllib.parse

import requests

LB, CA, TIMEOUT = CONFIG["lb"], CONFIG["ca"], 60  # noqa: F821 (prepended)
API = "/api/2.0/mlflow"


def login(user):
    """A browser's login as `user` at the provider; returns the session and where it ended."""
    s = requests.Session()
    s.verify = CA
    r = s.get(LB + "/login", timeout=TIMEOUT)
    steps = []
    for _ in range(4):  # the provider's login form; its consent form if it asks
        form = re.search(r'<form[^>]*action="([^"]+)"', r.text)
        prompt = re.search(r'name="prompt" value="(\w+)"', r.text)
        if not form or not prompt:
            break
        data = {"prompt": prompt.group(1)}
        if data["prompt"] == "login":
            data.update(login=user["login"], password="not-checked-by-the-test-provider")
        steps.append(data["prompt"])
        r = s.post(urllib.parse.urljoin(r.url, form.group(1)), data=data, timeout=TIMEOUT)
    hops = [h.url.split("?")[0] for h in r.history] + [r.url.split("?")[0]]
    status = s.get(LB + "/auth/status", timeout=TIMEOUT)
    return s, {"status": r.status_code, "hops": hops, "steps": steps, "auth_status_code": status.status_code,
               "auth_status": status.json()}


def cookie_header(s):
    return "; ".join(f"{c.name}={c.value}" for c in s.cookies)


def main():
    report = {}
    anonymous = requests.get(LB + API + "/experiments/search?max_results=1", verify=CA, timeout=TIMEOUT)
    ui = requests.get(LB + "/", verify=CA, timeout=TIMEOUT, allow_redirects=False)
    report["anonymous"] = {"api": anonymous.status_code, "ui": ui.status_code, "ui_location": ui.headers.get("location")}

    member, admin, outsider = CONFIG["member"], CONFIG["admin"], CONFIG["outsider"]
    s, report["member_login"] = login(member)
    page = s.get(LB + "/", timeout=TIMEOUT)
    report["member_ui"] = {"status": page.status_code, "type": page.headers.get("content-type", ""),
                           "mlflow_ui": '<div id="root"' in page.text and "MLflow" in page.text}

    # The login was made through the balancer; the cookie, sent to each server directly.
    report["servers"] = {}
    for server in CONFIG["servers"]:
        status = requests.get(server + "/auth/status", headers={"Cookie": cookie_header(s)}, timeout=TIMEOUT)
        search = requests.get(server + API + "/experiments/search?max_results=1",
                              headers={"Cookie": cookie_header(s)}, timeout=TIMEOUT)
        report["servers"][server] = {"username": status.json().get("username"), "api": search.status_code}

    _, report["outsider_login"] = login(outsider)

    a, report["admin_login"] = login(admin)
    suffix = CONFIG["suffix"]
    granted = a.post(LB + API + "/experiments/create", json={"name": f"sso-granted-{suffix}"}, timeout=TIMEOUT)
    withheld = a.post(LB + API + "/experiments/create", json={"name": f"sso-withheld-{suffix}"}, timeout=TIMEOUT)
    granted_id, withheld_id = granted.json()["experiment_id"], withheld.json()["experiment_id"]
    who = report["member_login"]["auth_status"]["username"]

    def new_run(session, experiment_id):
        return session.post(LB + API + "/runs/create", json={"experiment_id": experiment_id}, timeout=TIMEOUT).status_code

    def grant(session, experiment_id):
        return session.post(f"{LB}{API}/permissions/users/{who}/experiments/{experiment_id}",
                            json={"permission": "EDIT"}, timeout=TIMEOUT).status_code

    report["permissions"] = {
        "member_runs_in_withheld": new_run(s, withheld_id),
        "member_grants_herself": grant(s, withheld_id),
        "admin_grants_member": grant(a, granted_id),
        "member_runs_in_granted": new_run(s, granted_id),
    }

    expiration = (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=1)).isoformat()
    created = s.post(LB + API + "/users/current/tokens", json={"name": f"ci-{suffix}", "expiration": expiration},
                     timeout=TIMEOUT)
    token = created.json().get("token", "")
    report["token"] = {"status": created.status_code, "prefix": token[:4]}

    # A training job: MLflow's client with the token as the password of the user's name.
    os.environ.update({"MLFLOW_TRACKING_USERNAME": who, "MLFLOW_TRACKING_PASSWORD": token,
                       "MLFLOW_TRACKING_SERVER_CERT_PATH": CA, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(LB)
    payload = f"logged with a token {suffix}\n"
    experiment_id = MlflowClient().create_experiment(f"sso-token-{suffix}")
    with mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.log_metric("loss", 0.5)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "notes.txt")
            with open(path, "w") as f:
                f.write(payload)
            mlflow.log_artifact(path)
    reader = MlflowClient()
    with tempfile.TemporaryDirectory() as tmp:
        with open(reader.download_artifacts(run.info.run_id, "notes.txt", tmp)) as f:
            downloaded = f.read()
    report["client"] = {"loss": reader.get_run(run.info.run_id).data.metrics.get("loss"),
                        "artifact_matches": downloaded == payload}
    report["client_without_token"] = requests.get(LB + API + f"/runs/get?run_id={run.info.run_id}", verify=CA,
                                                  timeout=TIMEOUT).status_code
    report["client_wrong_token"] = requests.get(LB + API + f"/runs/get?run_id={run.info.run_id}", verify=CA,
                                                auth=(who, token[:-4] + "xxxx"), timeout=TIMEOUT).status_code
    print(json.dumps(report))


main()

"""A real MLflow client round trip against the server, run with the conda env's own Python.

Prints one JSON document with what it read back; the testinfra tests assert on it.
Usage: python client_roundtrip.py http://127.0.0.1:5000 <unique-suffix>
"""

import json
import os
import sys
import tempfile

import mlflow
from mlflow.tracking import MlflowClient

uri, suffix = sys.argv[1], sys.argv[2]
mlflow.set_tracking_uri(uri)
client = MlflowClient(uri)

experiment_name = f"roundtrip-{suffix}"
model_name = f"roundtrip-model-{suffix}"
payload = f"artifact payload {suffix}\n"

experiment_id = client.create_experiment(experiment_name)
with mlflow.start_run(experiment_id=experiment_id) as run:
    mlflow.log_param("alpha", "0.5")
    mlflow.log_metric("rmse", 0.25, step=0)
    mlflow.log_metric("rmse", 0.125, step=1)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "notes.txt")
        with open(path, "w") as f:
            f.write(payload)
        mlflow.log_artifact(path, artifact_path="docs")
run_id = run.info.run_id

client.create_registered_model(model_name)
version = client.create_model_version(model_name, source=f"runs:/{run_id}/docs", run_id=run_id)

# Read everything back through a fresh client.
reader = MlflowClient(uri)
experiment = reader.get_experiment_by_name(experiment_name)
fetched = reader.get_run(run_id)
history = reader.get_metric_history(run_id, "rmse")
with tempfile.TemporaryDirectory() as tmp:
    local = reader.download_artifacts(run_id, "docs/notes.txt", tmp)
    with open(local) as f:
        downloaded = f.read()
model_version = reader.get_model_version(model_name, version.version)

print(json.dumps({
    "experiment_id": experiment.experiment_id if experiment else None,
    "experiment_name": experiment.name if experiment else None,
    "run_id": run_id,
    "artifact_uri": fetched.info.artifact_uri,
    "params": fetched.data.params,
    "metrics": fetched.data.metrics,
    "metric_history": [[m.step, m.value] for m in sorted(history, key=lambda m: m.step)],
    "artifact_content": downloaded,
    "expected_artifact_content": payload,
    "model_name": model_version.name,
    "model_version": model_version.version,
    "model_run_id": model_version.run_id,
    "model_status": model_version.status,
}))

"""The role's helpers and filter plugins, importable by the unit tests."""
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
for path in ("roles/mlflow/files", "roles/mlflow/filter_plugins", "roles/mlflow_common/filter_plugins"):
    sys.path.insert(0, str(ROOT / path))

"""Lint: every role variable is a documented default, and the README's tables list it.

For each role with a meta/argument_specs.yml: the keys of defaults/main.yml and the options
of the specs must be the same (an option without default must be required), and the README
must name every option as `name`. Exits 1 with a list of what is missing.
"""

import pathlib
import sys

import yaml

root = pathlib.Path(__file__).resolve().parents[2]
readme = (root / "README.md").read_text()
problems = []
for role in sorted((root / "roles").iterdir()):
    specs_file = role / "meta" / "argument_specs.yml"
    if not specs_file.exists():
        continue
    defaults_file = role / "defaults" / "main.yml"
    defaults = yaml.safe_load(defaults_file.read_text()) if defaults_file.exists() else {}
    options = {}
    for entry in (yaml.safe_load(specs_file.read_text())["argument_specs"] or {}).values():
        options.update(entry.get("options") or {})
    for name in sorted(set(defaults) - set(options)):
        problems.append(f"{role.name}: default {name} is not in meta/argument_specs.yml")
    for name, spec in sorted(options.items()):
        if name not in defaults and not spec.get("required"):
            problems.append(f"{role.name}: option {name} has no default and is not required")
        if name in defaults and spec.get("default") != defaults[name]:
            problems.append(f"{role.name}: {name} defaults to {defaults[name]!r}, the specs say {spec.get('default')!r}")
        if f"`{name}`" not in readme:
            problems.append(f"{role.name}: README.md does not document {name}")
print("\n".join(problems) or f"documentation covers every role variable")
sys.exit(1 if problems else 0)

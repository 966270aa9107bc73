"""Generate the README's role variable tables from roles/*/meta/argument_specs.yml, and lint them.

Usage:
    python files/tools/role_docs.py           rewrite the generated tables in README.md
    python files/tools/role_docs.py --check   rewrite nothing; exit 1 with a diff when README.md is stale

The argument specs are the single source of truth. For every role under roles/ with a
meta/argument_specs.yml, README.md holds a block

    <!-- BEGIN GENERATED: roles/<role> variables (files/tools/role_docs.py) -->
    <!-- END GENERATED: roles/<role> variables -->

and everything between the two lines is the table of the options of the role's `main`
entry point, in the order of the specs. Edit the specs, never the table, then run this tool.

Both modes also check the specs and exit 1 listing every problem: each key of
defaults/main.yml is an option with the same default, an option without default is
required, every option has a description, and secret-looking str options (a name with
`password`, `secret` or `_key`, other than `_key_id` and `_key_src`) have `no_log: true`.
Needs only the standard library and PyYAML.
"""

import argparse
import difflib
import json
import pathlib
import re
import sys

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
TOOL = "files/tools/role_docs.py"
BEGIN = "<!-- BEGIN GENERATED: roles/{role} variables (" + TOOL + ") -->"
END = "<!-- END GENERATED: roles/{role} variables -->"
ROLE = re.escape("{role}")
BEGIN_RE = re.compile(re.escape(BEGIN).replace(ROLE, r"(?P<role>[^\s/]+)"))
BLOCK_RE = re.compile(BEGIN_RE.pattern + r"\n.*?" + re.escape(END).replace(ROLE, "(?P=role)"), re.S)
SECRET_NAME = re.compile(r"password|secret|_key(?!_id|_src)")
MAX_DEFAULT = 60  # characters; longer lists and dicts are abbreviated

# Ansible documentation markup -> Markdown. The argument runs to the first ")".
MARKUP = [
    (re.compile(r"\b(?:O|C|V|E|RV|M)\(([^)]*)\)"), r"`\1`"),
    (re.compile(r"\bI\(([^)]*)\)"), r"*\1*"),
    (re.compile(r"\bB\(([^)]*)\)"), r"**\1**"),
    (re.compile(r"\bU\(([^)]*)\)"), r"\1"),
    (re.compile(r"\bL\(([^),]*),\s*([^)]*)\)"), r"[\1](\2)"),
]


def load_roles():
    """{role name: (options of main, options of every entry point, defaults)} for roles with specs."""
    roles = {}
    for role in sorted(p for p in (ROOT / "roles").iterdir() if p.is_dir()):
        specs_file = role / "meta" / "argument_specs.yml"
        if not specs_file.exists():
            continue
        entries = (yaml.safe_load(specs_file.read_text()) or {}).get("argument_specs") or {}
        every = {}
        for entry in entries.values():
            every.update((entry or {}).get("options") or {})
        main = (entries.get("main") or {}).get("options")
        defaults_file = role / "defaults" / "main.yml"
        defaults = (yaml.safe_load(defaults_file.read_text()) if defaults_file.exists() else None) or {}
        roles[role.name] = (main, every, defaults)
    return roles


def lint(name, main, options, defaults, readme):
    """Problems of one role's specs, as messages."""
    problems = [] if main is not None else [f"{name}: meta/argument_specs.yml has no options for entry point main"]
    for var in sorted(set(defaults) - set(options)):
        problems.append(f"{name}: default {var} is not in meta/argument_specs.yml")
    for var, spec in sorted(options.items()):
        spec = spec or {}
        if var not in defaults and not spec.get("required"):
            problems.append(f"{name}: option {var} has no default in defaults/main.yml and is not required")
        if var in defaults and spec.get("default") != defaults[var]:
            problems.append(f"{name}: defaults/main.yml sets {var} to {defaults[var]!r}, "
                            f"the specs say {spec.get('default')!r}")
        if not description(spec):
            problems.append(f"{name}: option {var} has no description")
        if SECRET_NAME.search(var) and spec.get("type", "str") == "str" and not spec.get("no_log"):
            problems.append(f"{name}: option {var} looks like a secret but has no 'no_log: true'")
        if var not in (main or {}) and f"`{var}`" not in readme:
            problems.append(f"{name}: README.md does not document {var} (not in the main entry point's table)")
    return problems


def code(text):
    """A Markdown code span, also when the text holds backticks."""
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def flow(value, short=False):
    """Compact YAML flow style; with short, string values (not keys) over 8 characters are cut to 4."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{flow(k)}: {flow(v, short)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(flow(v, short) for v in value) + "]"
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if not isinstance(value, str):
        return str(value)
    if short and len(value) > 8:
        return value[:4] + "…"
    if value == "" or value != value.strip() or re.search(r"[,\[\]{}]|: | #|^[-?:!&*|>'\"%@`#]", value):
        return json.dumps(value, ensure_ascii=False)
    return value


def render_default(spec):
    if "default" not in spec:
        return "—"
    value = spec["default"]
    if spec.get("no_log"):
        return code('""') if value in ("", None) else "(secret)"
    if isinstance(value, (dict, list)):
        for text in (flow(value), flow(value, short=True)):
            if len(text) <= MAX_DEFAULT:
                return code(text)
        return "see " + code("defaults/main.yml")
    return code(flow(value))


def render_type(spec):
    text = spec.get("type", "str")
    if text == "list" and spec.get("elements"):
        text += f" of {spec['elements']}"
    if spec.get("required"):
        text += ", required"
    if spec.get("choices"):
        text += ": " + " ".join(code(flow(c)) for c in spec["choices"])
    return text


def description(spec):
    text = spec.get("description") or ""
    text = " ".join(str(t).strip() for t in text) if isinstance(text, list) else str(text).strip()
    for pattern, replacement in MARKUP:
        text = pattern.sub(replacement, text)
    return " ".join(text.split())


def table(options):
    rows = ["| variable | type | default | description |", "|---|---|---|---|"]
    for var, spec in options.items():
        spec = spec or {}
        cells = [code(var), render_type(spec), render_default(spec), description(spec)]
        rows.append("| " + " | ".join(c.replace("|", r"\|") for c in cells) + " |")
    return "\n".join(rows)


def regenerate(readme, roles):
    """README text with every block rewritten, and problems with the blocks."""
    problems = []
    found = [m["role"] for m in BLOCK_RE.finditer(readme)]
    if len(found) != len(BEGIN_RE.findall(readme)):
        problems.append("README.md: a BEGIN GENERATED line has no matching END GENERATED line")
    for role in sorted(set(found)):
        if found.count(role) > 1:
            problems.append(f"README.md: more than one generated block for roles/{role}")
        if role not in roles:
            problems.append(f"README.md: a generated block names roles/{role}, "
                            "which does not exist or has no meta/argument_specs.yml")
    for role in roles:
        if role not in found:
            problems.append(f"README.md: no generated block for roles/{role}; add the two lines\n"
                            f"    {BEGIN.format(role=role)}\n    {END.format(role=role)}")

    def fill(match):
        role = match["role"]
        if role not in roles or roles[role][0] is None:
            return match[0]
        body = "\n" + table(roles[role][0]) + "\n\n"
        return BEGIN.format(role=role) + "\n" + body + END.format(role=role)

    return BLOCK_RE.sub(fill, readme), problems


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="rewrite nothing; exit 1 when README.md is stale")
    args = parser.parse_args()
    roles = load_roles()
    readme = README.read_text()
    problems = [p for name, spec in roles.items() for p in lint(name, *spec, readme)]
    new, block_problems = regenerate(readme, roles)
    problems += block_problems
    if new != readme and args.check:
        sys.stdout.writelines(difflib.unified_diff(
            readme.splitlines(keepends=True), new.splitlines(keepends=True), "README.md", "README.md (generated)"))
        problems.append(f"README.md: the variable tables are stale; run python {TOOL}")
    elif new != readme:
        README.write_text(new)
        print(f"README.md: variable tables rewritten from {len(roles)} role(s)' argument specs")
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 1
    print("README.md's variable tables match the argument specs, and the specs are complete")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Importing the project's modules changes nothing in the environment: no module (but a package's `__main__`)
sets `os.environ` (or calls `putenv`) as it is imported; what needs a variable sets it in the function that needs it (e.g. the evaluator's
`hub_offline`) or in a command's `main()`.

Third-party packages may set variables of their own as they are imported (transformers' Trainer sets
`TORCHINDUCTOR_CACHE_DIR` through torch); those are not the project's doing, so the environment is compared
after the third-party imports the modules make at module level have run, in a fresh interpreter.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("workbench", "workbench_eval", "workbench_cli")

PROBE = r"""
import ast, importlib, json, os, sys
from pathlib import Path

root, packages = Path(sys.argv[1]), sys.argv[2:]
modules, third_party = [], []
for package in packages:
    for path in sorted((root / package).rglob("*.py")):
        if path.name == "__main__.py":  # `python -m package`: runs the command when imported, by design
            continue
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules.append(".".join(parts))
        for node in ast.parse(path.read_text()).body:  # the module-level third-party imports
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module != "__future__":
                names = [node.module]
            else:
                continue
            if all(name.partition(".")[0] not in packages for name in names):
                third_party.append(ast.unparse(node))
failed = {}
for statement in dict.fromkeys(third_party):
    try:
        exec(statement, {})
    except Exception as err:  # an optional dependency that is not installed: its importers are reported below
        failed[statement] = f"{type(err).__name__}: {err}"
changed, errors = {}, {}
for name in modules:
    before = dict(os.environ)
    try:
        importlib.import_module(name)
    except Exception as err:
        errors[name] = f"{type(err).__name__}: {err}"
    after = dict(os.environ)
    diff = {k: [before.get(k), after.get(k)] for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)}
    if diff:
        changed[name] = diff
print(json.dumps({"modules": len(modules), "changed": changed, "errors": errors, "third_party_failed": failed}))
"""


def test_importing_every_module_leaves_the_environment_unchanged():
    packages = [p for p in PACKAGES if (REPO / p / "__init__.py").is_file()]
    result = subprocess.run([sys.executable, "-c", PROBE, str(REPO), *packages], capture_output=True, text=True,
                            cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["modules"] > 50
    assert not report["errors"], f"modules that failed to import: {report['errors']}"
    assert not report["changed"], (
        "modules that change os.environ when imported (set it in the function that needs it instead):\n"
        + "\n".join(f"  {name}: {diff}" for name, diff in report["changed"].items()))


def _is_environ(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "environ") or (isinstance(node, ast.Name)
                                                                             and node.id == "environ")


def _is_main_guard(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "__name__" in ast.unparse(node.test) and "__main__" in ast.unparse(node.test)


def _environment_writes(node: ast.AST):
    """(line, code) of each write to os.environ or call of putenv/unsetenv that runs when the module is imported:
    outside functions and a `if __name__ == "__main__":` block (class bodies run on import, so they count)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) or _is_main_guard(child):
            continue
        targets = child.targets if isinstance(child, (ast.Assign, ast.Delete)) else \
            [child.target] if isinstance(child, (ast.AugAssign, ast.AnnAssign)) else []
        writes = any(isinstance(t, ast.Subscript) and _is_environ(t.value) for t in targets)
        if isinstance(child, ast.Call) and isinstance(child.func, (ast.Attribute, ast.Name)):
            name = child.func.attr if isinstance(child.func, ast.Attribute) else child.func.id
            owner = child.func.value if isinstance(child.func, ast.Attribute) else None
            writes = writes or name in ("putenv", "unsetenv") or (
                owner is not None and _is_environ(owner) and name in ("setdefault", "update", "pop", "popitem", "clear"))
        if writes:
            yield child.lineno, ast.unparse(child).splitlines()[0]
        yield from _environment_writes(child)


def test_no_module_writes_the_environment_at_module_level():
    """The same rule read from the source (fast, and it names the line)."""
    found = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")) if (REPO / package).is_dir() else []:
            for line, text in _environment_writes(ast.parse(path.read_text())):
                found.append(f"{path.relative_to(REPO)}:{line}: {text}")
    assert not found, "module-level writes to the environment:\n" + "\n".join(found)

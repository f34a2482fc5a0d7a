"""The README and docs describe only what exists: their links resolve inside the repository, they never
point outside it, every YAML example parses and names only methods that exist, and every study config in
workbench/configs/studies/ passes the study checks."""

from __future__ import annotations

import re

import pytest
import yaml
from conftest import REPO

from workbench.methods import BUILTIN

DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
YAML_BLOCK = re.compile(r"```yaml\n(.*?)```", re.S)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_links_resolve_inside_the_repository(doc):
    for target in LINK.findall(doc.read_text()):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path = (doc.parent / target).resolve()
        assert path.is_relative_to(REPO), f"{doc.name} links outside the repository: {target}"
        assert path.exists(), f"{doc.name} links to a missing file: {target}"
    assert "../shared" not in doc.read_text(), f"{doc.name} points at ../shared (not part of the repository)"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_yaml_examples_parse_and_name_existing_methods(doc):
    text = doc.read_text()
    defined_here = set(re.findall(r"@register\(\"([^\"]+)\"\)", text))  # a method the page itself writes
    for block in YAML_BLOCK.findall(text):
        parsed = yaml.safe_load(block)
        methods = (parsed or {}).get("methods") if isinstance(parsed, dict) else None
        for name in methods or {}:
            assert name in BUILTIN or name in defined_here or ":" in name, f"{doc.name} shows method '{name}', which does not exist"


@pytest.mark.parametrize("study", sorted((REPO / "workbench" / "configs" / "studies").glob("*.yaml")), ids=lambda p: p.name)
def test_every_study_config_passes_the_study_checks(study, monkeypatch):
    from workbench.study import load_study, plan

    monkeypatch.chdir(REPO)
    assert len(plan(load_study(study))) >= 2


def test_every_module_is_in_the_architecture_table():
    """A reader finds every module of the three packages by its path in docs/architecture.md."""
    text = (REPO / "docs" / "architecture.md").read_text()
    modules = [path.relative_to(REPO).as_posix() for package in ("workbench", "workbench_eval", "workbench_cli")
               for path in sorted((REPO / package).rglob("*.py"))]
    assert [module for module in modules if f"`{module}`" not in text] == []


def test_no_file_cites_a_path_outside_the_repository():
    """Code and docs cite only files inside the repository (no `shared/...`, no `../` out of it)."""
    cited = []
    for path in sorted(REPO.rglob("*")):
        parts = path.relative_to(REPO).parts
        if not path.is_file() or path.suffix not in (".py", ".md", ".yaml", ".json", ".toml") or \
                parts[0] in (".venv", ".git", "runs", "build") or "egg-info" in parts[0]:
            continue
        for number, line in enumerate(path.read_text(errors="ignore").splitlines(), 1):
            if re.search(r"(?<![\w./-])shared/(methods|seeds|design)", line):
                cited.append(f"{path.relative_to(REPO)}:{number}")
    assert cited == []

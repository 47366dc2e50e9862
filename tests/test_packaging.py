"""The install: ``pyproject.toml``'s dependencies and the install commands the README and the Makefile give can
never put two faiss distributions (faiss-cpu and faiss-gpu-*, which own one ``faiss`` package) into one install."""

from __future__ import annotations

import re

import tomllib

from tests.helpers import ROOT

FAISS = re.compile(r"^faiss[-_]", re.IGNORECASE)


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _faiss(requirements: list[str]) -> list[str]:
    return [r for r in requirements if FAISS.match(r)]


def _documented_installs() -> list[str]:
    """The extras of every ``pip install ... .[extras]`` in the README and the Makefile."""
    text = (ROOT / "README.md").read_text() + (ROOT / "Makefile").read_text()
    return re.findall(r"pip install[^\n]*?\.\[([a-z0-9_,-]+)\]", text)


def test_no_install_holds_two_faiss_distributions():
    project = _project()
    assert _faiss(project["dependencies"]) == [], "faiss belongs to one extra, never to the base dependencies"
    extras = project["optional-dependencies"]
    with_faiss = {name: _faiss(reqs) for name, reqs in extras.items() if _faiss(reqs)}
    assert all(len(found) == 1 for found in with_faiss.values()), with_faiss
    assert set(with_faiss) == {"cpu", "gpu"}, with_faiss  # the test and deepspeed extras bring none
    installs = _documented_installs()
    assert any("gpu" in i.split(",") for i in installs) and any("cpu" in i.split(",") for i in installs), installs
    for extras_named in installs:
        assert len(set(extras_named.split(",")) & set(with_faiss)) <= 1, extras_named

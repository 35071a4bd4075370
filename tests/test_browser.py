"""The student edition in a real browser: JupyterLab (started by `make lab`) in headless Chromium.

For each notebook: open it, Run > Run All Cells, wait until every cell has run, then read the page:
the student edition shows "not attempted yet" for each graded exercise and no traceback; the
instructor edition shows no error at all. The notebooks are saved from the browser and the saved
outputs are checked too (no output of type "error").

Needs Debian's ``chromium`` (``.ci/run`` installs it as root) and Playwright from PyPI, which drives
that executable (Playwright's own browser download cannot work here); otherwise it skips, saying why.
The student edition of every notebook with graded exercises runs (00, 01, 05), and the instructor
edition of the two fastest (00, 01); nbval runs every instructor notebook outside the browser.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from ppu_lab.exercises import CHECKS, book, edition
from ppu_lab.procs import kill_tree

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run"]
NOTEBOOKS = sorted(CHECKS)                   # the notebooks with graded exercises
INSTRUCTOR = ["00_setup", "01_serial_sgd_ridge"]   # the fast ones; nbval runs every instructor notebook anyway
RUN_DEADLINE = 240                           # seconds for Run All of one notebook


def _skip_reason() -> str | None:
    if not Path(CHROMIUM).exists():
        return ("Debian's chromium is not installed (`apt-get install -y chromium` as root; .ci/run does it "
                "in CI)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright is not installed (pip install -e '.[test]')"
    if not (ROOT / ".venv" / "bin" / "jupyter").exists():
        return "`make lab` serves from the lab's .venv, which this run does not use (make venv first)"
    return None


pytestmark = [pytest.mark.browser, pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """`make lab` on a folder holding student/ and instructor/ copies; yields (base url, token, folder)."""
    root = tmp_path_factory.mktemp("lab")
    (root / "instructor").mkdir()
    for name in NOTEBOOKS:
        nb = json.loads((ROOT / "notebooks" / f"{name}.ipynb").read_text())
        edition.write_notebook(edition.student_notebook(nb, name), root / "student" / f"{name}.ipynb")
        shutil.copy(ROOT / "notebooks" / f"{name}.ipynb", root / "instructor" / f"{name}.ipynb")
    settings = root / ".settings" / "@jupyterlab" / "notebook-extension"
    settings.mkdir(parents=True)
    (settings / "tracker.jupyterlab-settings").write_text('{"windowingMode": "none"}')  # every cell in the DOM
    port, token = _free_port(), uuid.uuid4().hex
    opts = (f"--no-browser --ServerApp.ip=127.0.0.1 --ServerApp.port={port} --IdentityProvider.token={token} "
            f"--LabApp.news_url=none --LabApp.workspaces_dir={root / '.workspaces'}")
    env = {**os.environ, "PPU_LAB_QUICK": "1", "MPLBACKEND": "Agg", "JUPYTERLAB_SETTINGS_DIR": str(root / ".settings")}
    server = subprocess.Popen(["make", "--no-print-directory", "lab", f"LAB_DIR={root}", f"LAB_OPTS={opts}"],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"`make lab` did not serve {base} within 90 s (exit code {server.poll()})")
                time.sleep(0.5)
        yield base, token, root
    finally:
        kill_tree([server.pid])              # the server, its kernels and their MPI engines


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM, headless=True,
            args=FLAGS, viewport={"width": 1400, "height": 1000})
        yield context
        context.close()


PROMPTS = "els => els.map(e => e.textContent.trim())"
PANEL = ".jp-NotebookPanel:not(.lm-mod-hidden)"     # the notebook in front (earlier ones stay open in tabs)


def _run_all(page, url) -> None:
    page.goto(url)
    page.wait_for_selector(f"{PANEL} .jp-Cell", timeout=60_000)
    page.get_by_text("(ipykernel) | Idle").first.wait_for(timeout=60_000)      # the kernel is up
    dialogs = page.locator(".jp-Dialog")
    if dialogs.count():  # nothing should ask anything on opening a notebook: say what did
        pytest.fail(f"JupyterLab opened {url.split('?')[0]} with a dialog: {dialogs.first.inner_text()[:500]!r}")
    deadline = time.monotonic() + RUN_DEADLINE
    for _ in range(3):                                   # a click can land before the menu is ready
        page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
        page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
        started = time.monotonic() + 10
        while time.monotonic() < started:
            prompts = page.eval_on_selector_all(f"{PANEL} .jp-CodeCell .jp-InputPrompt", PROMPTS)
            if any(p != "[ ]:" for p in prompts):
                break
            page.wait_for_timeout(500)
        else:
            continue
        break
    while True:
        prompts = page.eval_on_selector_all(f"{PANEL} .jp-CodeCell .jp-InputPrompt", PROMPTS)
        if prompts and all(p not in ("[*]:", "[ ]:", "") for p in prompts):
            break
        if time.monotonic() > deadline:
            pytest.fail(f"Run All did not finish within {RUN_DEADLINE} s: prompts {prompts}")
        time.sleep(1)
    page.keyboard.press("Control+s")
    page.wait_for_timeout(1_500)


def _shutdown_kernels(base, token) -> None:
    """Stop the notebook's kernel (and so its MPI engines) before the next notebook runs."""
    with urllib.request.urlopen(f"{base}/api/sessions?token={token}", timeout=10) as r:
        sessions = json.load(r)
    for s in sessions:
        req = urllib.request.Request(f"{base}/api/sessions/{s['id']}?token={token}", method="DELETE")
        urllib.request.urlopen(req, timeout=30).close()


def _saved_errors(path: Path) -> list:
    nb = json.loads(path.read_text())
    return [f"{o['ename']}: {o['evalue']}" for c in nb["cells"] for o in c.get("outputs", [])
            if o.get("output_type") == "error"]


def _run_in_browser(lab, browser, folder, name) -> tuple[str, list]:
    """Run All in JupyterLab; return (the text of every output on the page, the saved error outputs)."""
    base, token, root = lab
    page = browser.new_page()
    # a workspace of its own: JupyterLab would otherwise reopen the notebooks run before, whose kernels
    # were shut down, beside this one
    _run_all(page, f"{base}/lab/workspaces/{folder}-{name}/tree/{folder}/{name}.ipynb?token={token}")
    text = "\n".join(page.eval_on_selector_all(f"{PANEL} .jp-OutputArea-output", "els => els.map(e => e.innerText)"))
    page.close()
    _shutdown_kernels(base, token)
    return text, _saved_errors(root / folder / f"{name}.ipynb")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_student_edition_in_jupyterlab_says_not_attempted_and_shows_no_traceback(lab, browser, name):
    text, errors = _run_in_browser(lab, browser, "student", name)
    assert "Traceback" not in text and errors == []
    assert text.count("not attempted yet") >= len(book(name).exercises), text[-2000:]


@pytest.mark.parametrize("name", INSTRUCTOR)
def test_instructor_edition_in_jupyterlab_shows_no_error(lab, browser, name):
    text, errors = _run_in_browser(lab, browser, "instructor", name)
    assert "Traceback" not in text and "not attempted yet" not in text and errors == []
    assert text.count("passed") >= len(book(name).exercises), text[-2000:]

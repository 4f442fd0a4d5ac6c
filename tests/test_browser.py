"""The notebooks as a researcher uses them: `make lab`'s JupyterLab, each notebook opened in
headless Chromium and run with JupyterLab's own "Run All Cells", then saved.

Each notebook gets its parameters the way papermill injects them (a cell after its
`parameters` cell, not executed here), pointing at a tiny data set in tmp_path; the copies
are committed in a git repository in tmp_path with this checkout's nbstripout filter, which
JupyterLab serves, so the tracked notebooks are never opened for writing.
Needs Debian's chromium and chromium-driver (`make browser-deps`); CI installs them, and
a machine without them skips these tests with that message.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import nbformat
import numpy as np
import pytest
import skimage.data
from PIL import Image

from dfutils.jupyter import KERNEL, staged_text
from dfutils.paths import REPO_ROOT
from dfutils.progress import TEXT_ONLY

pytestmark = pytest.mark.browser

CHROMIUM, DRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
NOTEBOOKS = ("00-faces", "01-split", "02-train", "03-gradcam", "04-evaluate")


def _missing() -> str:
    absent = [str(p) for p in (CHROMIUM, DRIVER) if not p.exists()]
    if not absent:
        return ""
    return (f"{', '.join(absent)} not found: the browser tests need Debian's chromium and "
            "chromium-driver packages (`make browser-deps`, as root)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _digest(paths) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def face_photo(k: int, fake: bool) -> np.ndarray:
    """A photo around the astronaut's face, moved by k; fakes get a different tint."""
    photo = skimage.data.astronaut()
    top, left = 30 + 4 * k, 110 + 3 * k
    crop = photo[top:top + 240, left:left + 240].astype(int)
    crop = crop + (np.array([25, -10, -20]) if fake else 0) + 3 * k
    return cv2.resize(np.clip(crop, 0, 255).astype(np.uint8), (320, 320))


@dataclass
class Lab:
    url: str
    token: str
    root: Path  # what JupyterLab serves: the parameterized copies
    data: Path  # the tiny data set and the run
    driver: object
    log: Path


@contextlib.contextmanager
def running_lab(base: Path, server_config: dict | None = None) -> Iterator[Lab]:
    """`make lab` on base/notebooks, with a token and a free port, and a headless Chromium;
    settings, workspaces and runtime files in `base` (none of the user's)."""
    problem = _missing()
    if problem:
        if os.environ.get("CI"):
            pytest.fail(problem + "; CI must run the browser tests")
        pytest.skip(problem)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    root, data, config = base / "notebooks", base / "data", base / "config"
    for folder in (root, data, config, base / "settings" / "@jupyterlab" / "notebook-extension"):
        folder.mkdir(parents=True, exist_ok=True)
    port, token = _free_port(), hashlib.sha256(os.urandom(16)).hexdigest()[:32]
    (config / "jupyter_server_config.json").write_text(json.dumps({
        "ServerApp": {"port": port, "port_retries": 0, "open_browser": False},
        "IdentityProvider": {"token": token}, **(server_config or {})}))
    # The page exposes the app (window.jupyterapp) so the test can run JupyterLab's commands.
    (config / "jupyter_lab_config.json").write_text(json.dumps(
        {"LabApp": {"expose_app_in_browser": True}}))
    # Render every cell (no windowing), so each output is in the page to be checked; no
    # news pop-up over the notebook in the screenshots.
    settings = base / "settings" / "@jupyterlab"
    (settings / "notebook-extension" / "tracker.jupyterlab-settings").write_text(
        json.dumps({"windowingMode": "none"}))
    (settings / "apputils-extension").mkdir()
    (settings / "apputils-extension" / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(config),
           "JUPYTER_RUNTIME_DIR": str(base / "runtime"),
           "JUPYTERLAB_SETTINGS_DIR": str(base / "settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(base / "workspaces")}
    env.pop(TEXT_ONLY, None)  # a researcher's kernel: widget progress bars
    log = base / "lab.log"
    server = subprocess.Popen(["make", "-s", "lab", f"LAB_DIR={root}"], cwd=REPO_ROOT, env=env,
                              stdout=log.open("w"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    driver = None
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=1)
                break
            except OSError:
                if server.poll() is not None:
                    pytest.fail(f"make lab exited: {log.read_text()[-2000:]}")
                time.sleep(0.5)
        else:
            pytest.fail(f"JupyterLab did not start: {log.read_text()[-2000:]}")
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                         "--window-size=1400,1000", f"--user-data-dir={base / 'chromium'}"):
            options.add_argument(argument)
        driver = webdriver.Chrome(service=Service(executable_path=str(DRIVER)),
                                  options=options)
        yield Lab(url, token, root, data, driver, log)
    finally:
        if driver is not None:
            driver.quit()
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True,
                          text=True).stdout


def as_committed(notebook: Path) -> bytes:
    """A notebook of this checkout as git would commit it: the working file may carry the
    outputs and kernel details of a run in JupyterLab, which the filter strips."""
    return staged_text(notebook)[0]


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Iterator[Lab]:
    """JupyterLab on a git repository of notebook copies, with this checkout's nbstripout
    filter (as `make setup` configures it)."""
    base = tmp_path_factory.mktemp("lab")
    repo = base / "notebooks"
    repo.mkdir()
    _git(repo, "init", "-q")
    for name in (".gitattributes", ".gitignore"):  # .gitignore: JupyterLab's checkpoints
        shutil.copy(REPO_ROOT / name, repo)
    for key in ("clean", "smudge", "extrakeys"):
        value = _git(REPO_ROOT, "config", "--get", f"filter.nbstripout.{key}").strip()
        _git(repo, "config", f"filter.nbstripout.{key}", value)
    _git(repo, "config", "user.name", "test")
    _git(repo, "config", "user.email", "test@example.org")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "attributes")
    with running_lab(base) as running:
        yield running


@pytest.fixture(scope="module")
def parameters(lab) -> dict[str, dict]:
    """What papermill would inject into each notebook: a tiny chain in lab.data."""
    raw, faces, split, run = (lab.data / n for n in ("raw", "faces", "split", "run"))
    for label in ("real", "fake"):
        (raw / label).mkdir(parents=True)
        for k in range(6):
            Image.fromarray(face_photo(k, label == "fake")).save(raw / label / f"{k}.png")
    return {
        "00-faces": {"raw_dir": str(raw), "faces_dir": str(faces), "face_size": 64},
        "01-split": {"raw_dir": str(faces), "data_dir": str(split), "val_fraction": 0.34},
        "02-train": {"data_dir": str(split), "run_dir": str(run), "weights": None,
                     "trainable": "all", "image_size": 32, "batch_size": 4, "max_epochs": 2,
                     "num_workers": 0},
        "03-gradcam": {"run_dir": str(run), "data_dir": str(split), "n_images": 4,
                       "n_eval": 8},
        # photos, cropped the way the training images were
        "04-evaluate": {"run_dir": str(run), "eval_dir": str(raw), "num_workers": 0},
    }


JS_STATE = """
if (!window.jupyterapp) { return null; }
const panel = window.jupyterapp.shell.currentWidget;
if (!panel || !panel.content || !panel.sessionContext) { return null; }
const session = panel.sessionContext.session;
return {
  path: panel.context.path,
  kernel: session && session.kernel ? session.kernel.name : null,
  status: session && session.kernel ? session.kernel.status : null,
  displayName: panel.sessionContext.kernelDisplayName,
  dirty: panel.context.model.dirty,
  cells: panel.content.widgets.map(c => ({
    type: c.model.type,
    source: c.model.sharedModel.getSource(),
    count: c.model.type === 'code' ? c.model.executionCount : null,
    outputs: c.model.type === 'code' ? c.model.outputs.toJSON() : [],
    images: c.node.querySelectorAll('.jp-OutputArea-output img').length,
    stderr: Array.from(c.node.querySelectorAll(
        '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'))
        .map(e => e.textContent),
  })),
};
"""


def _wait(condition, timeout: float, what: str, lab: Lab):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    lab.driver.save_screenshot(str(lab.data.parent / "timeout.png"))
    pytest.fail(f"timed out waiting for {what}; JupyterLab log: {lab.log.read_text()[-1500:]}")


def _state(lab: Lab) -> dict | None:
    return lab.driver.execute_script(JS_STATE)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_each_notebook_runs_in_jupyterlab(lab, parameters, name, tmp_path_factory):
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    tracked = sorted((REPO_ROOT / "notebooks").glob("*.ipynb"))
    before = _digest(tracked)
    committed = lab.root.parent / f"{name}.committed.ipynb"
    committed.write_bytes(as_committed(REPO_ROOT / "notebooks" / f"{name}.ipynb"))
    nb = load_notebook_node(str(committed))
    copy = lab.root / f"{name}.ipynb"
    nbformat.write(parameterize_notebook(nb, parameters[name]), copy)
    _git(lab.root, "add", copy.name)
    _git(lab.root, "commit", "-q", "-m", name)

    driver = lab.driver
    driver.get(f"{lab.url}/lab/tree/{name}.ipynb?token={lab.token}")
    state = _wait(lambda: (s := _state(lab)) and s["path"] == f"{name}.ipynb"
                  and s["status"] == "idle" and s, 120, f"{name} to open with an idle kernel",
                  lab)
    assert state["kernel"] == KERNEL["name"], state["kernel"]
    assert state["displayName"] == KERNEL["display_name"]

    driver.execute_script("window.jupyterapp.commands.execute('runmenu:run-all')")

    def finished():  # every cell ran, or one failed (JupyterLab then runs no more)
        s = _state(lab)
        counts = [c["count"] for c in s["cells"] if c["type"] == "code"]
        failed = any(o["output_type"] == "error" for c in s["cells"] for o in c["outputs"])
        return s if s["status"] == "idle" and (failed or all(counts)) else None

    state = _wait(finished, 300, f"{name} to run all its cells", lab)
    time.sleep(1)  # the last outputs' rendering
    state = _state(lab)
    driver.save_screenshot(str(tmp_path_factory.getbasetemp() / f"browser-{name}.png"))

    cells = state["cells"]
    errors = [(i, o.get("ename"), o.get("evalue")) for i, c in enumerate(cells)
              for o in c["outputs"] if o["output_type"] == "error"]
    assert not errors, errors
    # No progress bar printed as text: in JupyterLab they are widgets.
    bars = [t for c in cells for t in c["stderr"] if "%|" in t or not t.strip()]
    assert not bars, bars
    # Every section's output is under its heading: each heading is followed by a code cell
    # that shows something.
    for i, cell in enumerate(cells):
        if cell["type"] == "markdown" and cell["source"].startswith("## "):
            shown = cells[i + 1]["outputs"] if i + 1 < len(cells) else []
            assert cells[i + 1]["type"] == "code" and shown, f"nothing under {cell['source']!r}"
    # Each figure once, as an <img> in the page.
    figures = [o["data"]["image/png"] for c in cells for o in c["outputs"]
               if "image/png" in o.get("data", {})]
    assert figures, f"{name} shows no figure"
    assert len(set(figures)) == len(figures), f"{name} shows a figure twice"
    assert sum(c["images"] for c in cells) == len(figures)
    tables = sum("text/markdown" in o.get("data", {}) for c in cells for o in c["outputs"])
    assert tables or name == "02-train" or name == "03-gradcam"

    # Saving (as autosave does) writes the outputs to the file; git would stage nothing
    # new (the filter strips them), and make lab's post-save hook keeps `git status` clean.
    driver.execute_script("window.jupyterapp.commands.execute('docmanager:save')")
    _wait(lambda: not _state(lab)["dirty"], 30, f"{name} to be saved", lab)
    _wait(lambda: not _git(lab.root, "status", "--porcelain"), 10, "a clean git status", lab)
    assert b'"output_type"' in copy.read_bytes()
    assert _digest(tracked) == before


def test_a_jupyter_without_the_projects_kernel_asks_for_one(tmp_path):
    """Opened where no kernel named dfutils exists, a notebook must not start another
    kernel silently (which fails at the first import): JupyterLab asks which to use."""
    only_python3 = {"KernelSpecManager": {"allowed_kernelspecs": ["python3"]}}
    with running_lab(tmp_path, only_python3) as other:
        (other.root / "01-split.ipynb").write_bytes(
            as_committed(REPO_ROOT / "notebooks" / "01-split.ipynb"))
        other.driver.get(f"{other.url}/lab/tree/01-split.ipynb?token={other.token}")
        dialog = _wait(lambda: other.driver.execute_script(
            "const d = document.querySelector('.jp-Dialog'); return d && d.textContent;"),
            60, "a dialog", other)
        other.driver.save_screenshot(str(tmp_path / "browser-no-kernel.png"))
        assert "Select Kernel" in dialog, dialog
        state = _state(other)
        assert state is None or state["kernel"] is None

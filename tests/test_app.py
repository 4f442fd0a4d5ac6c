"""Issue 40: the web page (`make app`) driven in headless Chromium: a photo and a clip made
here are dropped on it, and the P(fake) it shows is predict's for the same file; the faces
come with their Grad-CAM overlays, a clip with its per-frame plot; a corrupt file is one
message on the page; nothing dropped is kept after the answer.

Needs Debian's chromium and chromium-driver (`make browser-deps`), as test_browser does.
With DFUTILS_APP_SCREENSHOT=<png> the test's screenshot of the page is copied there
(docs/app.png is one).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from conftest import frame_of, write_clip
from PIL import Image
from test_browser import CHROMIUM, DRIVER, _free_port, _missing

from dfutils import faces, paths
from dfutils.model import build_model, save_checkpoint
from dfutils.params import AppParams, FacesParams, PredictParams
from dfutils.predict import predict_run


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """The page of a (random, 32 px) face-crop detector, served from this process, and a
    browser on it."""
    if _missing():
        pytest.skip(_missing())
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    from dfutils.app import serve

    root = tmp_path_factory.mktemp("app")
    os.environ["GRADIO_TEMP_DIR"] = str(root / "gradio")  # where its uploads land
    torch.manual_seed(0)
    run = root / "run"
    recorded = faces.recorded(FacesParams(raw_dir=str(root), frames_per_video=3,
                                          face_size=48), root)
    save_checkpoint(run / paths.MODEL, build_model("resnet18", None, "all").eval(),
                    params={"image_size": 32, "trainable": "all", "weights": None},
                    threshold=0.5, threshold_rule="0.5", metrics={}, epoch=1, faces=recorded)
    inputs = root / "inputs"
    inputs.mkdir()
    Image.fromarray(frame_of(2)[0]).save(inputs / "photo.png")
    write_clip(inputs / "clip.mp4", 6)
    (inputs / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all")
    served, url = serve(AppParams(run_dir=str(run), port=_free_port()))
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--window-size=1400,1300", f"--user-data-dir={root / 'chromium'}"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=str(DRIVER)), options=options)
    try:
        driver.get(url)
        yield driver, run, inputs, root
    finally:
        driver.quit()
        served.close()
        os.environ.pop("GRADIO_TEMP_DIR", None)


def drop(driver, path: Path, timeout: float = 240) -> str:
    """Drop `path` on the page, press Score and wait for its answer: the verdict's text."""
    from selenium.webdriver.common.by import By

    deadline = time.time() + 60  # the page draws itself after it loads
    while not driver.find_elements(By.CSS_SELECTOR, "#upload input[type=file]"):
        clear = driver.find_elements(By.CSS_SELECTOR, "#upload button[aria-label='Clear']")
        if clear:  # a file is shown from before: clear it
            clear[0].click()
        assert time.time() < deadline, "the page shows no upload field"
        time.sleep(0.3)
    driver.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(str(path))
    deadline = time.time() + 60
    while path.stem not in driver.find_element(By.ID, "upload").text:
        assert time.time() < deadline, "the upload never showed"
        time.sleep(0.3)
    driver.find_element(By.ID, "score").click()
    deadline = time.time() + timeout
    while True:
        text = driver.find_element(By.ID, "verdict").text
        if path.name in text:
            return text
        assert time.time() < deadline, f"no answer for {path.name}: {text!r}"
        time.sleep(0.5)


def predicted(run: Path, path: Path) -> str:
    """predict's P(fake) of the file, as its CSV writes it."""
    (row,) = predict_run(PredictParams(run_dir=str(run), paths=[str(path)],
                                       num_workers=0)).rows
    assert row["status"] == "ok", row
    return row["p_fake"]


@pytest.mark.browser
def test_the_page_gives_predicts_scores_with_overlays_and_keeps_nothing(page):
    from selenium.webdriver.common.by import By

    driver, run, inputs, root = page
    for name in ("photo.png", "clip.mp4"):
        text = drop(driver, inputs / name)
        assert f"P(fake) = {predicted(run, inputs / name)}" in text, text
        assert "threshold: P(fake) >= 0.5000" in text
        shown = driver.find_elements(By.CSS_SELECTOR, "#faces img")
        assert shown and all(img.get_attribute("src") for img in shown)
        # the page's copy of the dropped file is gone once the answer is shown
        assert not list((root / "gradio").rglob(name))
    assert "3 faces in 3 frames" in text  # the clip: frames_per_video faces
    assert driver.find_elements(By.CSS_SELECTOR, "#frames canvas, #frames img, #frames svg")
    driver.save_screenshot(str(root / "app.png"))
    if os.environ.get("DFUTILS_APP_SCREENSHOT"):
        shutil.copy(root / "app.png", os.environ["DFUTILS_APP_SCREENSHOT"])
    assert (inputs / "photo.png").is_file() and (inputs / "clip.mp4").is_file()  # only read


@pytest.mark.browser
def test_a_corrupt_file_is_one_message_on_the_page(page):
    driver, _, inputs, _ = page
    text = drop(driver, inputs / "broken.jpg")
    assert text.startswith("Cannot score broken.jpg:") and "Traceback" not in text
    assert len(text.splitlines()) == 1


def test_an_answer_is_predicts_and_is_saved_only_where_asked(tmp_path):
    """The page's answer without the page: a demo-like image run scores a file as predict
    does, and `keep` copies it and its answer into a new folder of save_dir."""
    from dfutils.app import answer, keep
    from dfutils.detector import load_model

    torch.manual_seed(0)
    run = tmp_path / "run"
    save_checkpoint(run / paths.MODEL, build_model("resnet18", None, "all").eval(),
                    params={"image_size": 32, "trainable": "all", "weights": None},
                    threshold=0.5, threshold_rule="0.5", metrics={}, epoch=1)
    photo = tmp_path / "photo.png"
    Image.fromarray(frame_of(1)[0]).save(photo)
    params = AppParams(run_dir=str(run), save_dir=str(tmp_path / "saved"))
    (tmp_path / "work").mkdir()
    found = answer(params, load_model(run), photo, tmp_path / "work")
    assert f"P(fake) = {predicted(run, photo)}" in found.verdict
    assert len(found.faces) == 1 and found.faces[0][0].ndim == 3 and found.frames is None
    folder = keep(params, photo, found)
    assert folder.parent == tmp_path / "saved" and (folder / "photo.png").read_bytes() == (
        photo.read_bytes())
    assert json.loads((folder / "answer.json").read_text())["row"] == found.row

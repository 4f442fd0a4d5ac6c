"""The web page (`make app RUN=<run>` or `MODEL=<folder>`): drop an image or a clip and see
each face found with its P(fake) and Grad-CAM overlay, a clip's score per frame and by the
video rule, the decision at the threshold, and the detector's model card.

Gradio serves it on 127.0.0.1 only. Each answer is `predict`'s own (`predict_run` on the
dropped file, with its overlays and, for a face-crop detector, its per-frame rows), so the
page's P(fake) is the command line's for the same file. The dropped file and everything
made from it are deleted once the answer is shown, unless the user asks to save them
(into `save_dir`, when the page was started with one).
"""

from __future__ import annotations

import csv
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from dfutils import paths
from dfutils.atomic import write_json
from dfutils.detector import load_model
from dfutils.export import card, config_of, read_record
from dfutils.images import load_image
from dfutils.model import Checkpoint, threshold_text
from dfutils.params import AppParams, PredictParams
from dfutils.paths import resolve
from dfutils.predict import cam_name, predict_run
from dfutils.runs import now, read_run

TITLE = "dfutils: is this face real or fake?"


@dataclass
class Answer:
    """What the page shows for one file."""

    verdict: str  # Markdown: the file's P(fake) and decision, or why it could not be scored
    faces: list[tuple[np.ndarray, str]] = field(default_factory=list)  # overlay, caption
    frames: Figure | None = None  # a clip's P(fake) per frame
    row: dict = field(default_factory=dict)  # predict's row of the file


def model_card(params: AppParams, checkpoint: Checkpoint) -> str:
    """The detector's card: an exported folder's README.md, or the card `export` would
    write for the run (its `checkpoint`), from its records."""
    if params.model_dir:
        return (resolve(params.model_dir) / paths.DETECTOR_CARD).read_text()
    run_dir = resolve(params.run_dir)
    config = config_of(checkpoint, read_record(run_dir, paths.METRICS) or checkpoint.metrics,
                       {}, None)
    return card(run_dir, config, read_run(run_dir), read_record(run_dir, paths.BENCHMARK_JSON))


def frames_figure(rows: list[dict], threshold: float, p_fake: float) -> Figure:
    """A clip's P(fake) per frame scored, with the threshold and the clip's score."""
    fig = Figure(figsize=(7, 2.6), layout="constrained")
    ax = fig.add_subplot()
    frames = [int(r["frame"]) for r in rows]
    ax.plot(frames, [float(r["p_fake"]) for r in rows], "o-", label="a face's P(fake)")
    ax.axhline(threshold, color="grey", linestyle="--", label=f"threshold {threshold:.2f}")
    ax.axhline(p_fake, color="tab:red", label=f"the clip: {p_fake:.3f}")
    ax.set(xlabel="frame", ylabel="P(fake)", ylim=(0, 1), title="P(fake) per frame")
    ax.legend(loc="best", fontsize=8)
    return fig


def answer(params: AppParams, checkpoint: Checkpoint, upload: str | os.PathLike,
           work: Path) -> Answer:
    """predict's answer for one file, its overlays and frame rows made in `work`
    (`checkpoint`: the detector params names, already read, for its threshold and whether
    it crops faces)."""
    faces = checkpoint.faces is not None
    cams, frames_csv = work / "cams", work / "frames.csv"
    result = predict_run(PredictParams(
        run_dir=params.run_dir, model_dir=params.model_dir, paths=[str(upload)],
        out=str(work / "scores.csv"), cam_dir=str(cams),
        frames_out=str(frames_csv) if faces else "", num_workers=0,
        batch_size=params.batch_size))
    row = result.rows[0]
    name = Path(upload).name
    if row["status"] != "ok":
        return Answer(f"**Cannot score {name}**: {row['status'][len('error: '):]}", row=row)
    p, threshold = float(row["p_fake"]), checkpoint.threshold
    decision = "**fake**" if row["label"] == "fake" else "**real**"
    lines = [f"### {name}: {decision}, P(fake) = {p:.6f}",
             f"{threshold_text(threshold, checkpoint.threshold_rule)}."]
    if not faces:
        overlay = np.asarray(load_image(cams / cam_name(name)))
        return Answer("\n\n".join(lines), [(overlay, f"P(fake) {p:.3f}")], row=row)
    with open(frames_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    lines.append(f"{row['n_faces']} faces in {row['n_frames']} frames read; the file's "
                 "P(fake) is the mean over its faces (the video rule of predict).")
    shown = []
    for r, overlay in zip(rows, sorted(cams.glob("*.cam.png")), strict=True):
        shown.append((np.asarray(load_image(overlay)),
                      f"frame {r['frame']}: P(fake) {float(r['p_fake']):.3f}"))
    return Answer("\n\n".join(lines), shown,
                  frames_figure(rows, threshold, p) if len(rows) > 1 else None, row)


def keep(params: AppParams, upload: Path, found: Answer) -> Path:
    """The dropped file and its answer, saved into a new folder of save_dir."""
    folder = resolve(params.save_dir) / f"{now().replace(':', '')}-{upload.name}"
    folder.mkdir(parents=True)
    shutil.copy2(upload, folder / upload.name)
    write_json(folder / "answer.json", {"row": found.row, "verdict": found.verdict})
    return folder


def build(params: AppParams) -> Any:
    """The page (a gradio.Blocks; Gradio is imported here, as it takes seconds to import
    and no other command needs it)."""
    import gradio as gr

    checkpoint = load_model(params.run_dir, params.model_dir)
    text = model_card(params, checkpoint)

    # Gradio's progress of an answer follows the bars of predict's loops (tqdm).
    def handle(upload: str | None, save: bool,
               progress=gr.Progress(track_tqdm=True)):  # noqa: B008 (Gradio's way)
        if not upload:
            return "Drop an image or a clip above first.", [], None
        work = Path(tempfile.mkdtemp(prefix="dfutils-app-"))
        try:
            found = answer(params, checkpoint, upload, work)
            if save and params.save_dir:
                found.verdict += f"\n\nSaved in {keep(params, Path(upload), found)}."
        except (ValueError, OSError) as error:  # the same one line as the command line's
            found = Answer(f"**Cannot score {Path(upload).name}**: {error}")
        finally:
            shutil.rmtree(work, ignore_errors=True)
            Path(upload).unlink(missing_ok=True)  # the page's copy of what was dropped
        return found.verdict, found.faces, found.frames

    with gr.Blocks(title=TITLE, delete_cache=(60, 60)) as page:
        gr.Markdown(f"# {TITLE}\nDrop an image or a video clip. Each face found is scored "
                    "and explained with Grad-CAM; nothing you drop is kept after the answer"
                    + (" unless you tick *save*." if params.save_dir else "."))
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label="image or clip", type="filepath", elem_id="upload")
                save = gr.Checkbox(label=f"save the file and its answer in {params.save_dir}",
                                   value=False, visible=bool(params.save_dir))
                run = gr.Button("Score", variant="primary", elem_id="score")
            with gr.Column(scale=2):
                verdict = gr.Markdown(elem_id="verdict")
                gallery = gr.Gallery(label="faces, with where the model looked", columns=4,
                                     height=320, object_fit="contain", elem_id="faces")
                plot = gr.Plot(label="P(fake) per frame", elem_id="frames")
        with gr.Accordion("the detector: its model card", open=False):
            gr.Markdown(text, elem_id="card")
        run.click(handle, [upload, save], [verdict, gallery, plot])
    return page


def serve(params: AppParams) -> tuple[Any, str]:
    """Start the page on 127.0.0.1 (this machine only), in a thread: the page and its URL
    (`page.block_thread()` waits on it, `page.close()` stops it)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves the machine
    page = build(params)
    _, url, _ = page.launch(server_name="127.0.0.1", server_port=params.port,
                            max_file_size=f"{params.max_file_mb}mb", share=False,
                            prevent_thread_lock=True, quiet=True)
    return page, url


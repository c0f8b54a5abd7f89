"""`ferray demo`: the pipeline end to end on synthetic faces, every artifact under one folder.

Stages so far: synthesize a FER2013-style CSV -> prepare it with Ray Data -> train the debug
Model A with Ray Train -> evaluate it -> train the debug SRGAN -> upscale the data 48 -> 96 with a
Ray Data actor pool -> evaluate the SR -> a 2-trial Tune search -> train the debug Model B on the
SR faces -> evaluate it -> fuse A and B into the serving bundle DIR/bundle -> evaluate the
ensemble -> serve the bundle with Ray Serve and send it a few faces over HTTP -> the paper's report
(Table 1, Figures 2-5) from those runs plus two small VGG baselines, in DIR/report.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from ferray.data.contract import DataError
from ferray.resources import recipe
from ferray.tasks import SR

log = logging.getLogger(__name__)

MARKER = ".ferray-demo"
DEFAULT_OUT = Path("ferray-demo")


def claim_folder(out: Path) -> None:
    """Use `out` for the demo; a folder from an earlier demo is replaced, anything else is refused."""
    if out.exists():
        if not (out / MARKER).exists():
            raise DataError(f"{out} exists and is not a ferray demo folder; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("made by `ferray demo`; rerunning the demo replaces this folder\n")


def run_demo(out: Path | None, n: int = 1400, seed: int = 0) -> dict:
    from ferray.bundle import build_bundle, evaluate_bundle
    from ferray.config import load_config
    from ferray.data.describe import format_manifest
    from ferray.data.synth import SynthSpec, synthesize
    from ferray.distributed.prepare import prepare
    from ferray.distributed.report import run_report
    from ferray.distributed.train import run_training
    from ferray.distributed.tune import load_search, run_search
    from ferray.distributed.upscale import upscale
    from ferray.evaluate import evaluate_checkpoint
    from ferray.report.plan import load_plan
    from ferray.sr.evaluation import evaluate_generator

    if out is None:
        out = DEFAULT_OUT
        log.info(f"demo: no --out given, writing to {out.absolute()}")
    out = Path(out)
    claim_folder(out)
    t0 = time.perf_counter()
    data, runs, done = out / "data", out / "runs", {"out": out}

    def search(name: str, samples: int):
        spec = load_search(recipe(f"{name}.yaml"), [f"data.path={data}", f"train.seed={seed}"])
        spec.samples = samples
        return spec

    def experiment(name: str, **values):
        sets = [f"data.path={values.get('data', data)}", f"train.seed={seed}", *values.get("sets", [])]
        return load_config(recipe(f"{name}.yaml"), sets)

    steps = [
        (
            "synth: synthetic faces as a Kaggle-style fer2013.csv",
            lambda: synthesize(out / "source", SynthSpec(n=n, seed=seed), fmt="csv"),
        ),
        (
            "prepare: fer2013.csv -> Parquet + manifest (Ray Data)",
            lambda: (
                done.update(manifest=prepare(out / "source" / "fer2013.csv", data))
                or print(format_manifest(done["manifest"], data))
            ),
        ),
        (
            "train: experiments/debug_a.yaml (Model A layout at 1/8 width, Ray Train)",
            lambda: done.update(model_a=run_training(experiment("debug_a"), runs)),
        ),
        (
            "evaluate: Model A's best checkpoint on PublicTest with ten-crop TTA",
            lambda: done.update(
                evaluation=evaluate_checkpoint(done["model_a"].best_checkpoint, data, "PublicTest", tta=True)
            ),
        ),
        (
            "sr train: experiments/debug_srgan.yaml (SRGAN x2, Ray Train; content loss on Model A's features "
            "where VGG19's ImageNet weights are absent)",
            lambda: done.update(
                srgan=run_training(
                    experiment("debug_srgan", sets=[f"sr.content_checkpoint={done['model_a'].best_checkpoint}"]),
                    runs,
                    task=SR,
                )
            ),
        ),
        (
            "sr upscale: every split 48 -> 96 with a Ray Data pool of 2 actors",
            lambda: done.update(
                upscaled=upscale(data, out / "data_sr", "srgan", done["srgan"].best_checkpoint, actors=2)
            ),
        ),
        (
            "sr eval: PSNR/SSIM against bicubic, and the LR/bicubic/SR/HR grid",
            lambda: done.update(sr_eval=evaluate_generator(done["srgan"].best_checkpoint, data)),
        ),
        (
            "tune: experiments/debug_tune.yaml, 2 trials (Ray Tune + Optuna + ASHA over lr and center-loss lambda)",
            lambda: done.update(tune=run_search(search("debug_tune", samples=2), runs)),
        ),
        (
            "train: experiments/debug_b.yaml (Model B's layout on ResNet18, on the SR faces, Ray Train)",
            lambda: done.update(model_b=run_training(experiment("debug_b", data=out / "data_sr"), runs)),
        ),
        (
            "evaluate: Model B's best checkpoint on PublicTest with ten-crop TTA",
            lambda: done.update(
                evaluation_b=evaluate_checkpoint(
                    done["model_b"].best_checkpoint, out / "data_sr", "PublicTest", tta=True
                )
            ),
        ),
        (
            "ensemble: three members (A, the search's best trial, SR -> B), fused on the selection split -> "
            "the serving bundle (sets all, fast)",
            lambda: done.update(
                bundle=build_bundle(
                    {
                        "a": done["model_a"].best_checkpoint,
                        "tuned": done["tune"]["best_checkpoint"],
                        "b": done["model_b"].best_checkpoint,
                    },
                    done["srgan"].best_checkpoint,
                    data,
                    out / "bundle",
                )
            ),
        ),
        (
            "evaluate: the ensemble on PublicTest, every member and set side by side",
            lambda: done.update(evaluation_bundle=evaluate_bundle(out / "bundle", data, "PublicTest")),
        ),
        (
            "serve: the bundle with Ray Serve, a few faces sent over HTTP",
            lambda: done.update(served=demo_requests(out / "bundle", data)),
        ),
        (
            "report: experiments/paper_debug.yaml (Table 1, Figures 2-5), reusing the runs above, training the VGGs",
            lambda: done.update(
                report=run_report(
                    load_plan(recipe("paper_debug.yaml"), data=data, sets=[f"train.seed={seed}"]),
                    out / "report",
                    reuse=[runs],
                )
            ),
        ),
        (
            "predict: ferray's default model (Model A trained on real FER2013 faces) through the Python API",
            lambda: done.update(default_model=predict_with_default(data)),
        ),
    ]
    seconds = {}
    for i, (title, run) in enumerate(steps, 1):
        log.info(f"[{i}/{len(steps)}] {title}")
        started = time.perf_counter()
        run()
        seconds[f"{i}. {title.split(':')[0]}"] = time.perf_counter() - started
    log.info(
        f"demo: done in {time.perf_counter() - t0:.0f}s; artifacts under {out.absolute()}; the report: "
        f"{(out / 'report' / 'report.html').absolute()}"
    )
    log.info("demo: seconds per step: " + ", ".join(f"{step} {s:.0f}" for step, s in seconds.items()))
    return done


def predict_with_default(data, faces: int = 4) -> list[dict]:
    """The model a user gets without training anything, answering through `ferray.load()`. The demo
    has no real photos, so it shows the synthetic drawings; `ferray predict photo.jpg` takes yours."""
    import ferray
    from ferray.data.contract import EMOTIONS, load_split

    model = ferray.load()
    card = model.card
    test = next((s for s, e in card.evaluations.items() if not e.selection), None)
    if test:
        models = " + ".join(member.model for member in card.members.values())
        log.info(
            f"default model: {models}, {test} accuracy "
            f"{card.evaluations[test].views['tta'].accuracy:.2%} with ten-crop TTA (its MODEL_CARD.md)"
        )
    images, labels, _ = load_split(data, "PublicTest")
    answers = model.predict_many(list(images[:faces]))
    for index, answer in enumerate(answers):
        face = answer["faces"][0]
        log.info(
            f"  synthetic face {index} (drawn as {EMOTIONS[labels[index]]}): {face['label']} "
            f"p={face['probs'][face['label']]:.2f}"
        )
    log.info(
        "  (drawings, not photos: on a real face, `ferray predict photo.jpg` or "
        "`python -c \"import ferray; print(ferray.load().predict('photo.jpg'))\"`)"
    )
    return answers


def demo_requests(bundle, data, faces: int = 4) -> dict:
    """The demo's last step: serve the bundle, POST a few PublicTest faces as PNGs and as a pixel row,
    print the answers, shut Serve down."""
    import json

    from ray import serve

    from ferray.data.contract import EMOTIONS, load_split
    from ferray.distributed.serving import start
    from ferray.testing import free_port, png_bytes, post

    images, labels, _ = load_split(data, "PublicTest")
    url = start(bundle, port=free_port())
    log.info(f"serve: {url} is up; POST {url}/predict with {faces} PublicTest faces")
    answers = []
    try:
        for index in range(faces):
            status, answer = post(f"{url}/predict", png_bytes(images[index]), "image/png")
            face = answer["faces"][0]
            log.info(
                f"  face {index}: HTTP {status}, true {EMOTIONS[labels[index]]:<8} predicted {face['label']:<8}"
                f" p={face['probs'][face['label']]:.2f}"
            )
            answers.append(answer)
        row = json.dumps({"pixels": images[0].reshape(-1).tolist()}).encode()
        status, answer = post(f"{url}/predict/pixels", row, "application/json")
        log.info(f"  POST /predict/pixels (face 0 as a FER2013 row): HTTP {status}, {answer['faces'][0]['label']}")
    finally:
        serve.shutdown()
    return {"url": url, "answers": answers}

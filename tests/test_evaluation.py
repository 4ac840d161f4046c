"""The prompt-adherence judge and the evaluate / demo scripts on tiny runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from ldm.data.shapes_judge import Verdict, accuracy, judge, prompt_grid
from ldm.data.synthetic import SyntheticShapes
from ldm.plots import SIZE
from scripts import demo


def as_uint8(image: np.ndarray) -> np.ndarray:
    return ((image + 1) * 127.5).round().astype(np.uint8)


def test_judge_reads_the_data_sets_own_images_perfectly():
    data = SyntheticShapes(size=32, length=300, seed=11)
    for i in range(len(data)):
        item = data[i]
        assert judge(as_uint8(item["image"]), data) == Verdict(
            item["color"], item["shape"], item["background"]
        ), item["caption"]


def test_judge_survives_noise_and_reports_a_missing_shape():
    data = SyntheticShapes(size=32, length=50, seed=2)
    rng = np.random.default_rng(0)
    hits = 0
    for i in range(len(data)):
        item = data[i]
        noisy = np.clip(as_uint8(item["image"]) + rng.normal(0, 12, (32, 32, 3)), 0, 255)
        verdict = judge(noisy.astype(np.uint8), data)
        hits += verdict == Verdict(item["color"], item["shape"], item["background"])
    assert hits >= 45
    blank = np.full((32, 32, 3), data.color_values[2], dtype=np.uint8)
    assert judge(blank, data) == Verdict(-1, -1, 2)


def test_prompt_grid_covers_every_pair_on_another_background():
    data = SyntheticShapes(size=32, length=1)
    grid = prompt_grid(data)
    assert len(grid) == len(data.color_names) * len(data.shape_names)
    assert {(c, s) for c, s, _ in grid} == {
        (c, s) for c in range(len(data.color_names)) for s in range(len(data.shape_names))
    }
    assert all(c != b for c, _, b in grid)


def test_accuracy_counts_each_attribute():
    verdicts = [Verdict(0, 1, 2), Verdict(0, 0, 2)]
    scores = accuracy(verdicts, [(0, 1, 2), (1, 1, 2)])
    assert scores == {"color": 0.5, "shape": 0.5, "background": 1.0, "all": 0.5}


@pytest.mark.slow
def test_demo_runs_end_to_end_and_writes_grids_and_scores(tmp_path):
    out = tmp_path / "out"
    result = demo.main(
        [
            "--ae_steps",
            "2",
            "--ae_precision",
            "bf16-mixed",
            "--ldm_steps",
            "2",
            "--logdir",
            str(tmp_path / "logs"),
            "--outdir",
            str(out),
            "--n_per_prompt",
            "1",
            "--eval_steps",
            "3",
            "--ckpt_every",
            "1",
        ]
    )
    for name in ("samples.png", "captions.txt", "autoencoder_loss.png", "txt2img_loss.png"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "demo.json").read_text())
    assert saved == result and saved["n_images"] == 24
    assert {"color", "shape", "background", "all", "training_minutes"} <= set(saved)
    assert {"txt2img_minutes", "scoring_minutes", "curve_minutes"} <= set(saved)
    (ae_run,) = (tmp_path / "logs").glob("*_demo-autoencoder")
    (lightning_config,) = (ae_run / "configs").glob("*-lightning.yaml")
    trained_in = OmegaConf.load(lightning_config).lightning.trainer.precision
    assert saved["autoencoder_precision"] == trained_in == "bf16-mixed"
    # two step checkpoints: each scored (one image per prompt) and drawn against its step
    curve = json.loads((out / "curve" / "curve.json").read_text())
    assert [(point["step"], point["n_images"]) for point in curve] == [(1, 24), (2, 24)]
    with Image.open(out / "accuracy.png") as image:
        assert image.format == "PNG" and image.size == SIZE


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "expected"),
    [(False, False, "32"), (True, False, "bf16-mixed"), (False, True, "bf16-mixed")],
)
def test_demo_autoencoder_trains_in_bf16_only_where_the_cpu_has_it(
    monkeypatch, avx512_bf16, amx, expected
):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    assert demo.autoencoder_precision("auto") == expected
    assert demo.autoencoder_precision("32") == "32"


@pytest.mark.slow
def test_curve_scores_every_step_checkpoint(tmp_path):
    import main
    from scripts import evaluate

    trainer = main.main(
        [
            "--base",
            "configs/tiny/txt2img.yaml",
            "-t",
            "-l",
            str(tmp_path / "logs"),
            "--max_steps",
            "2",
            "data.params.batch_size=4",
            "data.params.num_workers=0",
            "lightning.modelcheckpoint.params.every_n_train_steps=1",
        ]
    )
    curve = evaluate.main(
        [
            "--logdir",
            trainer.default_root_dir,
            "--curve",
            "--n_per_prompt",
            "1",
            "--steps",
            "2",
            "--outdir",
            str(tmp_path / "out"),
        ]
    )
    assert [point["step"] for point in curve] == [1, 2]
    assert all(point["minutes"] >= 0 and 0 <= point["all"] <= 1 for point in curve)
    assert (tmp_path / "out" / "step-000002" / "samples.png").is_file()

"""ValidationPrompts: fixed prompts sampled from fixed noise every N steps, as labelled grids
for the EMA and raw weights, leaving training bit for bit as it was (also under 2-process DDP,
where rank 0 alone writes)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import ROOT, load_config, run_ddp
from PIL import Image, ImageFont
from pytorch_lightning.plugins.precision import Precision
from pytorch_lightning.strategies import FSDPStrategy

import main
from ldm.util import ConfigError, instantiate_from_config
from ldm.validation import FONT_SIZE, LABEL_PAD, MIN_TILE, ValidationPrompts, labelled_grid

TINY = ROOT / "configs" / "tiny" / "txt2img.yaml"
SMALL = [
    "data.params.batch_size=4",
    "data.params.num_workers=0",
    "lightning.trainer.limit_val_batches=1",
]
PROMPTS = ["a red circle on a blue background", "a green square"]
TARGET = "ldm.validation.ValidationPrompts"


def callback_args(every_n_steps: int, steps: int = 2) -> list[str]:
    key = "lightning.callbacks.validation"
    return [
        f"{key}.target={TARGET}",
        f"{key}.params.prompts=[{','.join(PROMPTS)}]",
        f"{key}.params.every_n_steps={every_n_steps}",
        f"{key}.params.steps={steps}",
    ]


def train(logs: Path, *args: str):
    return main.main(["--base", str(TINY), "-l", str(logs), "-t", "--no-test", *SMALL, *args])


def grids(logs: Path) -> dict[str, np.ndarray]:
    """{file name: pixels} of the one run under `logs`."""
    (logdir,) = logs.iterdir()
    folder = logdir / "images" / "validation"
    return {path.name: np.asarray(Image.open(path)) for path in sorted(folder.glob("*.png"))}


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = instantiate_from_config(load_config("tiny/txt2img.yaml").model)
    with torch.no_grad():  # raw weights away from the EMA's, as after some training
        for p in model.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.train()


FAKE_TRAINER = SimpleNamespace(precision_plugin=Precision(), strategy=None)


def ready(model, trainer=FAKE_TRAINER, **params) -> ValidationPrompts:
    callback = ValidationPrompts(PROMPTS, steps=2, **params)
    callback.setup(trainer, model, "fit")
    return callback


# ---------------------------------------------------------------- no training


@pytest.mark.parametrize(
    "params, message",
    [
        ({"prompts": []}, "prompts must be a non-empty list, got \\[\\]"),
        ({"prompts": "a cat"}, "prompts must be a non-empty list"),
        ({"every_n_steps": 0}, "every_n_steps must be an integer >= 1, got 0"),
        ({"steps": 0}, "steps must be an integer >= 1"),
        ({"n_per_prompt": 1.5}, "n_per_prompt must be an integer >= 1"),
        ({"sampler": "euler"}, "sampler 'euler' is not one of \\['ddim', 'dpm', 'plms'\\]"),
    ],
)
def test_bad_params_are_named(params, message):
    config = {"target": TARGET, "params": {"prompts": PROMPTS, **params}}
    with pytest.raises(ConfigError, match=f"ValidationPrompts: {message}"):
        instantiate_from_config(config)  # the path main.py's `lightning.callbacks` takes


def test_sizes_are_the_models_unless_given_and_must_fit_the_first_stage(tiny):
    assert ready(tiny).shape == (4, 8, 8)  # 32 px over the tiny autoencoder's factor 4
    assert ready(tiny, height=64, width=32).shape == (4, 16, 8)
    with pytest.raises(ConfigError, match="height 30 and width 32 must be multiples of 4"):
        ready(tiny, height=30)
    unconditional = SimpleNamespace(cond_stage_model=None)
    with pytest.raises(ConfigError, match="not a text-conditioned model"):
        ready(unconditional)
    fsdp = SimpleNamespace(strategy=FSDPStrategy())
    with pytest.raises(ConfigError, match="rank 0 alone, which FSDPStrategy .*--strategy ddp"):
        ready(tiny, fsdp)


@pytest.mark.parametrize("last, evaluated", [(5, [2, 4, 5]), (4, [2, 4])])
def test_due_once_per_optimizer_step_and_after_the_last(last, evaluated):
    """Every 2 optimizer steps under 2-batch accumulation, then at the end if not just done."""
    callback, steps = ValidationPrompts(PROMPTS, every_n_steps=2), []

    def evaluate(trainer, module):
        callback.last_step = trainer.global_step
        steps.append(trainer.global_step)

    callback.evaluate = evaluate
    for step in range(last):  # global_step after each of the step's 2 batches: step, step + 1
        for after in (step, step + 1):
            callback.on_train_batch_end(SimpleNamespace(global_step=after), None, None, None, 0)
    callback.on_train_end(SimpleNamespace(global_step=last), None)
    assert steps == evaluated


def test_samples_come_from_fixed_noise_and_leave_rng_weights_and_modes_alone(tiny):
    callback = ready(tiny)
    weights = {k: v.clone() for k, v in tiny.state_dict().items()}
    torch.manual_seed(1)
    before = torch.get_rng_state()
    first = callback.sample_all(FAKE_TRAINER, tiny)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(2)  # another global state: the same samples
    second = callback.sample_all(FAKE_TRAINER, tiny)
    assert first.keys() == {"ema", "raw"}
    for name in first:
        assert [s.shape for s in first[name]] == [(2, 3, 32, 32)] * len(PROMPTS)
        for a, b in zip(first[name], second[name], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(first["ema"][0], first["raw"][0])  # two sets of weights
    assert not torch.allclose(first["raw"][0][0], first["raw"][0][1])  # n different noises
    for key, value in tiny.state_dict().items():
        torch.testing.assert_close(value, weights[key], rtol=0, atol=0, msg=key)
    assert tiny.model.training and not tiny.first_stage_model.training


def test_prompts_can_each_have_a_bucket_shape(tiny):
    prompts = ["a red circle", {"prompt": "a wide one", "height": 24, "width": 40}]
    callback = ValidationPrompts(prompts, steps=2, n_per_prompt=1)
    callback.setup(FAKE_TRAINER, tiny, "fit")
    assert callback.shapes == [(4, 8, 8), (4, 6, 10)]
    samples = callback.sample_prompts(tiny)
    assert [tuple(s.shape) for s in samples] == [(1, 3, 32, 32), (1, 3, 24, 40)]
    grid = labelled_grid(callback.prompts, samples)
    assert grid.shape[1] == 40 * 6  # the wide row (one sample: no grid padding) enlarged 6x
    with pytest.raises(ConfigError, match="prompts\\[1\\] has unknown keys \\['size'\\]"):
        ValidationPrompts(["a", {"prompt": "b", "size": 3}])


def test_unguided_samples_differ_from_guided_ones(tiny):
    guided = ready(tiny).sample_prompts(tiny)
    unguided = ready(tiny, guidance_scale=1.0).sample_prompts(tiny)
    assert not torch.allclose(guided[0], unguided[0])


def test_each_prompts_label_sits_above_its_enlarged_row():
    images = [torch.zeros(2, 3, 32, 32), torch.zeros(2, 3, 32, 32)]  # mid-grey samples
    long = "a small yellow triangle in the corner of a large black background"
    grid = labelled_grid(["a cat", long], images)
    scale = MIN_TILE // 32
    row_width, row_height = (2 * 33 + 1) * scale, 34 * scale  # make_grid pads 1 px
    assert grid.shape[1] == row_width and grid.dtype == np.uint8
    ascent, descent = ImageFont.load_default(size=FONT_SIZE).getmetrics()
    line = ascent + descent
    grey = (grid == 128).all(axis=(1, 2))  # (H,) the pixel rows of the samples
    assert grey.sum() == 2 * row_height
    first = int(np.argmax(grey))  # the first label's height
    assert first == line + 2 * LABEL_PAD  # one line
    assert not grey[:first].any() and grey[first : first + row_height].all()
    label = grid[:first]
    assert (label == 255).mean() > 0.5 and (label < 100).any()  # dark text on white
    second = grid.shape[0] - 2 * row_height - first
    assert second >= 2 * line + 2 * LABEL_PAD  # the long prompt wraps onto more lines
    assert grey[first + row_height + second :].all()


# ---------------------------------------------------------------- main.py runs


@pytest.mark.slow
def test_grids_at_due_steps_and_the_end_with_training_unchanged(tmp_path):
    """Grids at step 2 (due) and 3 (the last), EMA and raw; the weights after 3 steps are bit
    for bit those of a run without the callback. A run without EMA trains the same raw weights,
    so its raw grids (alone) equal the first run's: the same noise every time."""
    with_callback = train(tmp_path / "with", "--max_steps", "3", *callback_args(2))
    without = train(tmp_path / "without", "--max_steps", "3")
    ours, reference = with_callback.lightning_module.state_dict(), without.lightning_module
    assert ours.keys() == reference.state_dict().keys()
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(ours[key], value, rtol=0, atol=0, msg=key)
    written = grids(tmp_path / "with")
    names = [f"step-00000{s}-{w}.png" for s in (2, 3) for w in ("ema", "raw")]
    assert sorted(written) == sorted(names)

    train(tmp_path / "no-ema", "--max_steps", "3", "model.params.use_ema=false", *callback_args(2))
    raw_only = grids(tmp_path / "no-ema")
    assert sorted(raw_only) == ["step-000002-raw.png", "step-000003-raw.png"]
    for name, pixels in raw_only.items():
        np.testing.assert_array_equal(pixels, written[name], err_msg=name)


@pytest.mark.slow
def test_ddp_rank_zero_alone_writes_and_the_run_finishes(tmp_path):
    logs = tmp_path / "logs"
    args = ["--base", str(TINY), "-l", str(logs), "--max_steps", "2", *SMALL, *callback_args(1)]
    result = run_ddp(tmp_path, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    names = [f"step-00000{s}-{w}.png" for s in (1, 2) for w in ("ema", "raw")]
    assert sorted(grids(logs)) == sorted(names)
    assert result.stderr.count("validation grids in") == 2, result.stderr[-3000:]  # one rank

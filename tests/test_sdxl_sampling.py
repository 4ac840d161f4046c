"""Sampling SDXL with txt2img.py / img2img.py: the micro-conditioning flags reach the model's
size vector, default as SDXL's scripts do (the sampled size, no crop, aesthetic 6 / 2.5), and
models without it refuse them by name."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from pytorch_lightning.plugins.precision import Precision
from test_sdxl_engine import run, tiny_engine

import main
from ldm.models.diffusion import sampling
from ldm.models.diffusion.conditioning import AESTHETIC_KEY, CROP_KEY, ORIGINAL_SIZE_KEY
from ldm.modules.encoders.modules import ConcatTimestepEmbedderND
from ldm.validation import ValidationPrompts
from scripts import common, img2img, txt2img

FAST = ["--ddim_steps", "3", "--precision", "full", "--device", "cpu", "--n_iter", "1"]


@pytest.fixture(scope="module")
def sdxl_run(tmp_path_factory) -> Path:
    logs = tmp_path_factory.mktemp("sdxl-run")
    run(logs, "-t", "--max_steps", "1", "--no-test", "lightning.trainer.limit_val_batches=1")
    (logdir,) = sorted(logs.iterdir())
    return logdir


def sample(logdir: Path, out: Path, *flags: str) -> torch.Tensor:
    argv = ["--ckpt", str(logdir), "--prompt", "a red circle", "--n_samples", "1", *FAST]
    return txt2img.main([*argv, "--outdir", str(out), "--seed", "4", *flags])[0]


@pytest.fixture
def vectors(monkeypatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (cond, uncond) size vectors each sampling call of the scripts gets."""
    seen, real = [], sampling.sample

    def recording(model, cond, uncond, **kwargs):
        seen.append((cond["c_adm"][:, 48:], uncond["c_adm"][:, 48:]))
        return real(model, cond, uncond, **kwargs)

    monkeypatch.setattr(sampling, "sample", recording)
    return seen


def test_the_flags_reach_the_size_vector_and_default_to_the_sampled_size(
    sdxl_run, tmp_path, vectors
):
    plain = sample(sdxl_run, tmp_path)
    explicit = sample(
        sdxl_run, tmp_path, "--original_size", "32", "32", "--crop", "0", "0",
        "--target_size", "32", "32",
    )  # fmt: skip
    sample(sdxl_run, tmp_path, "--crop", "16", "0")
    assert torch.equal(plain, explicit)
    (plain_c, plain_u), (explicit_c, _), (cropped_c, cropped_u) = vectors
    assert torch.equal(plain_c, explicit_c) and torch.equal(plain_c, plain_u)
    embed = ConcatTimestepEmbedderND(4)
    crop = slice(8, 16)  # the second pair of (original, crop, target), 2 x 4 channels
    torch.testing.assert_close(cropped_c[:, crop], embed(torch.tensor([[16.0, 0.0]])))
    torch.testing.assert_close(cropped_u[:, crop], cropped_c[:, crop])  # uncond shares it
    assert torch.equal(cropped_c[:, :8], plain_c[:, :8])


def test_micro_conditioning_builds_the_conditioner_inputs():
    engine = tiny_engine().eval()
    opt = SimpleNamespace(**dict.fromkeys(common.SDXL_FLAGS))
    opt.original_size, opt.crop = [1024, 768], [64, 0]
    cond, uncond = common.micro_conditioning(opt, engine, (32, 48))
    assert cond == {"size": (32, 48), ORIGINAL_SIZE_KEY: (1024, 768), CROP_KEY: (64, 0)}
    assert uncond[AESTHETIC_KEY] == common.NEGATIVE_AESTHETIC
    vector = engine.get_learned_conditioning(["a red circle"], **cond)["c_adm"]  # (1, 72)
    embed = ConcatTimestepEmbedderND(4)
    expected = torch.cat(
        [embed(torch.tensor([v], dtype=torch.float)) for v in ((1024, 768), (64, 0), (32, 48))],
        dim=1,
    )
    torch.testing.assert_close(vector[:, 48:], expected)


def test_img2img_conditions_an_sdxl_run_on_the_init_image_size(sdxl_run, tmp_path, monkeypatch):
    init = tmp_path / "init.png"
    Image.fromarray(np.full((32, 64, 3), 200, dtype=np.uint8)).save(init)
    seen, real = [], sampling.img2img

    def recording(model, z0, cond, uncond, **kwargs):
        seen.append(cond["c_adm"][:, 48:])
        return real(model, z0, cond, uncond, **kwargs)

    monkeypatch.setattr(sampling, "img2img", recording)
    argv = ["--ckpt", str(sdxl_run), "--prompt", "a red circle", "--init-img", str(init)]
    images = img2img.main([*argv, *FAST, "--n_samples", "1", "--outdir", str(tmp_path)])
    assert images[0].shape == (1, 3, 32, 64)
    embed = ConcatTimestepEmbedderND(4)
    torch.testing.assert_close(seen[0][:, :8], embed(torch.tensor([[32.0, 64.0]])))


def one_step_run(logs: Path, config: str) -> Path:
    """The log dir of one training step of a tiny config."""
    base = Path(__file__).resolve().parents[1] / "configs" / "tiny" / config
    main.main(["--base", str(base), "-l", str(logs), "-t", "--max_steps", "1", "--no-test",
               "data.params.batch_size=2", "data.params.num_workers=0",
               "lightning.trainer.limit_val_batches=1"])  # fmt: skip
    (logdir,) = sorted(logs.iterdir())
    return logdir


@pytest.fixture(scope="module")
def sd_run(tmp_path_factory) -> Path:
    return one_step_run(tmp_path_factory.mktemp("sd-run"), "txt2img.yaml")


def test_sd_models_refuse_the_sdxl_flags_by_name(sd_run, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        sample(sd_run, tmp_path, "--crop", "16", "0")
    assert "--crop: SDXL's micro-conditioning" in str(exit_info.value)
    assert "LatentDiffusion does not take" in str(exit_info.value)


def test_validation_prompts_sample_sdxl_at_each_prompts_size(monkeypatch):
    engine = tiny_engine().eval()
    prompts = ["a red circle", {"prompt": "a wide blue square", "height": 32, "width": 64}]
    callback = ValidationPrompts(prompts, steps=2, n_per_prompt=1)
    callback.setup(SimpleNamespace(precision_plugin=Precision(), strategy=None), engine, "fit")
    seen, real = [], sampling.sample

    def recording(model, cond, uncond, **kwargs):
        seen.append(cond["c_adm"][:, 48:])
        return real(model, cond, uncond, **kwargs)

    monkeypatch.setattr(sampling, "sample", recording)
    images = callback.sample_prompts(engine)
    assert [tuple(i.shape[-2:]) for i in images] == [(32, 32), (32, 64)]
    embed = ConcatTimestepEmbedderND(4)
    for vector, size in zip(seen, ((32.0, 32.0), (32.0, 64.0)), strict=True):
        torch.testing.assert_close(vector[:, :8], embed(torch.tensor([size])))


@pytest.fixture(scope="module")
def refiner_run(tmp_path_factory) -> Path:
    return one_step_run(tmp_path_factory.mktemp("refiner-run"), "sdxl_refiner.yaml")


def test_the_refiner_redraws_the_base_latents_with_its_own_conditioning(
    sdxl_run, refiner_run, tmp_path, monkeypatch
):
    seen, real = [], sampling.img2img

    def recording(model, z0, cond, uncond, **kwargs):
        seen.append((z0, cond["c_adm"][:, 48:], uncond["c_adm"][:, 48:], kwargs["strength"]))
        return real(model, z0, cond, uncond, **kwargs)

    monkeypatch.setattr(sampling, "img2img", recording)
    base = sample(sdxl_run, tmp_path)
    refined = sample(sdxl_run, tmp_path, "--refiner", str(refiner_run))
    unchanged = sample(sdxl_run, tmp_path, "--refiner", str(refiner_run), "--refiner_strength", "0")
    assert not torch.allclose(base, refined, atol=1e-4)
    assert torch.equal(base, unchanged)  # strength 0 keeps the base's latents
    (z0, cond, uncond, strength), _ = seen
    assert strength == 0.3 and z0.shape == (1, 4, 8, 8)
    embed = ConcatTimestepEmbedderND(4)
    torch.testing.assert_close(cond[:, 16:], embed(torch.tensor([6.0])))  # the aesthetic score
    torch.testing.assert_close(uncond[:, 16:], embed(torch.tensor([2.5])))


def test_a_refiner_that_is_not_sdxl_is_refused_by_name(sdxl_run, sd_run, tmp_path):
    with pytest.raises(SystemExit, match="is a LatentDiffusion .*a refiner is an SDXL model"):
        sample(sdxl_run, tmp_path, "--refiner", str(sd_run))
    with pytest.raises(SystemExit, match="--refiner_strength 1.5 must lie in"):
        sample(sdxl_run, tmp_path, "--refiner", str(sd_run), "--refiner_strength", "1.5")

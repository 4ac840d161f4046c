"""SDXL's DiffusionEngine: the released configs build with the released key layout, sgm.*
targets resolve, the loss is diffusers' SDXL training loss (and generative-models' formula
for other weightings), and the tiny SDXL config trains through main.py and resumes exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, load_config
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    create_unet_diffusers_config_from_ldm,
)
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file, save_file

import main
from ldm.checkpoint import CheckpointError
from ldm.models.diffusion.engine import DiffusionEngine
from ldm.modules.diffusionmodules.loss import StandardDiffusionLoss
from ldm.util import ConfigError, get_obj_from_str, instantiate_from_config
from scripts import convert, txt2img

TINY = ROOT / "configs" / "tiny" / "sdxl.yaml"
SCALINGS = "sgm.modules.diffusionmodules.denoiser_scaling."
WEIGHTINGS = "sgm.modules.diffusionmodules.loss_weighting."
SMALL = ["data.params.batch_size=4", "data.params.num_workers=0"]


def tiny_config(**params) -> OmegaConf:
    config = OmegaConf.load(TINY).model
    for key, value in params.items():
        OmegaConf.update(config, f"params.{key}", value, merge=False)
    return config


def tiny_engine(**params) -> DiffusionEngine:
    return instantiate_from_config(tiny_config(**params))


def shapes_batch(n: int = 4) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "image": torch.rand(n, 32, 32, 3, generator=g) * 2 - 1,
        "caption": ["a red circle", "a blue square", "a green triangle", "a red square"][:n],
    }


def test_sgm_targets_are_the_ldm_classes():
    assert get_obj_from_str("sgm.models.diffusion.DiffusionEngine") is DiffusionEngine
    assert get_obj_from_str("ldm.models.diffusion.DiffusionEngine") is DiffusionEngine
    assert get_obj_from_str("sgm.modules.diffusionmodules.loss.StandardDiffusionLoss") is (
        StandardDiffusionLoss
    )


@pytest.mark.parametrize("name", ["sd_xl_base.yaml", "sd_xl_refiner.yaml"])
def test_released_configs_build_with_the_released_layout(name):
    config = load_config(f"sdxl/{name}")
    with torch.device("meta"):
        engine = instantiate_from_config(config.model)
    keys = engine.state_dict()
    prefixes = {k.split(".")[0] for k in keys}
    assert prefixes == {"model", "first_stage_model", "conditioner", "denoiser"}
    assert tuple(keys["denoiser.sigmas"].shape) == (1000,)
    unet = {k: v for k, v in keys.items() if k.startswith("model.diffusion_model.")}
    original = OmegaConf.to_container(config)
    unet_config = create_unet_diffusers_config_from_ldm(original, unet)
    with torch.device("meta"):
        reference = UNet2DConditionModel(**unet_config)
    converted = convert_ldm_unet_checkpoint(unet, unet_config)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {
        k: tuple(v.shape) for k, v in reference.state_dict().items()
    }
    embedders = {k.split(".")[2] + "." + k.split(".")[3] for k in keys if "embedders" in k}
    if name == "sd_xl_base.yaml":
        assert embedders == {"0.transformer", "1.model"}  # CLIP ViT-L, then OpenCLIP bigG
        assert engine.model.conditioning_key == "crossattn-adm"
    else:
        assert embedders == {"0.model"}  # the refiner has bigG only
        assert "conditioner.embedders.0.model.text_projection" in keys


def test_sigmas_are_those_of_sdxl_schedule_in_diffusers():
    engine = tiny_engine()
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    expected = ((1 - scheduler.alphas_cumprod) / scheduler.alphas_cumprod).sqrt()
    torch.testing.assert_close(engine.denoiser.sigmas, expected.float())
    torch.testing.assert_close(engine.alphas_cumprod, scheduler.alphas_cumprod.float())


def diffusers_unet(engine: DiffusionEngine) -> UNet2DConditionModel:
    """diffusers' text_time UNet with the engine's UNet weights."""
    unet = {
        "model.diffusion_model." + k: v
        for k, v in engine.model.diffusion_model.state_dict().items()
    }
    original = {"model": OmegaConf.to_container(tiny_config())}
    config = create_unet_diffusers_config_from_ldm(original, unet) | {
        "class_embed_type": None,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 4,
    }
    reference = UNet2DConditionModel(**config)
    reference.load_state_dict(convert_ldm_unet_checkpoint(unet, config), strict=True)
    return reference.eval()


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_training_loss_is_diffusers_sdxl_training_loss(prediction):
    scaling = "EpsScaling" if prediction == "epsilon" else "VScaling"
    weighting = "EpsWeighting" if prediction == "epsilon" else "VWeighting"
    engine = tiny_engine(
        **{
            "denoiser_config.params.scaling_config.target": SCALINGS + scaling,
            "loss_fn_config.params.loss_weighting_config.target": WEIGHTINGS + weighting,
        }
    ).eval()
    with torch.no_grad():
        for p in engine.model.parameters():
            p.normal_(0, 0.05)
    reference = diffusers_unet(engine)
    scheduler = DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction,
    )
    batch = shapes_batch()
    z, cond = engine.get_input(batch)
    t, noise = torch.tensor([3, 250, 600, 999]), torch.randn_like(z)
    with torch.no_grad():
        loss, _ = engine.p_losses(z, cond, t, noise)
        noisy = scheduler.add_noise(z, noise, t)
        pooled, sizes = (
            cond["c_adm"][:, :48],
            torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * 4),
        )
        pred = reference(
            noisy,
            t,
            encoder_hidden_states=cond["c_crossattn"][0],
            added_cond_kwargs={"text_embeds": pooled, "time_ids": sizes},
        ).sample
    target = noise if prediction == "epsilon" else scheduler.get_velocity(z, noise, t)
    torch.testing.assert_close(
        loss, torch.nn.functional.mse_loss(pred, target), rtol=1e-4, atol=1e-6
    )


@pytest.mark.parametrize(
    "scaling,weighting,loss_type",
    [("EpsScaling", "VWeighting", "l2"), ("VScaling", "EpsWeighting", "l1")],
)
def test_other_weightings_train_generative_models_loss(scaling, weighting, loss_type):
    engine = tiny_engine(
        **{
            "denoiser_config.params.scaling_config.target": SCALINGS + scaling,
            "loss_fn_config.params.loss_weighting_config.target": WEIGHTINGS + weighting,
            "loss_fn_config.params.loss_type": loss_type,
        }
    ).eval()
    loss_fn = StandardDiffusionLoss(
        sigma_sampler_config=tiny_config().params.loss_fn_config.params.sigma_sampler_config,
        loss_weighting_config={"target": WEIGHTINGS + weighting},
        loss_type=loss_type,
    )
    z, cond = engine.get_input(shapes_batch())

    def network(x, t, c):  # generative-models' OpenAIWrapper
        return engine.model(x, t, c_crossattn=c["c_crossattn"], c_adm=c["c_adm"])

    with torch.no_grad():
        torch.manual_seed(5)
        theirs = loss_fn(network, engine.denoiser, lambda batch: cond, z, {}).mean()
        torch.manual_seed(5)
        t = torch.randint(0, 1000, (len(z),))
        ours, _ = engine.p_losses(z, cond, t, torch.randn_like(z))
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


def test_ema_decay_rate_reaches_the_ema_and_a_bad_one_is_named():
    assert tiny_engine().model_ema.decay.item() == pytest.approx(0.999)  # the config's
    assert tiny_engine(ema_decay_rate=0.5).model_ema.decay.item() == 0.5
    with pytest.raises(ConfigError, match="^ema_decay_rate 2"):
        tiny_engine(ema_decay_rate=2)


def test_loss_options_that_cannot_train_are_named():
    edm = {"loss_fn_config.params.sigma_sampler_config.params.num_idx": 500}
    with pytest.raises(NotImplementedError, match="sigma_sampler must be a DiscreteSampling"):
        tiny_engine(**edm)
    with pytest.raises(NotImplementedError, match="loss_type='lpips'"):
        tiny_engine(**{"loss_fn_config.params.loss_type": "lpips"})
    with pytest.raises(NotImplementedError, match="sampler_config"):
        tiny_engine(sampler_config={"target": "sgm.modules.diffusionmodules.sampling.Euler"})
    clip_only = tiny_config().params.conditioner_config.params.emb_models[:1]
    engine = tiny_engine(**{"conditioner_config.params.emb_models": clip_only})
    with pytest.raises(ConfigError, match=r"gives \['crossattn'\].*\['crossattn', 'vector'\]"):
        engine.get_input(shapes_batch())


def test_empty_prompts_condition_on_zeroed_text_and_default_sizes():
    engine = tiny_engine().eval()
    cond = engine.get_learned_conditioning(["a red circle", ""])
    context, vector = cond["c_crossattn"][0], cond["c_adm"]
    assert context.shape == (2, 77, 80) and vector.shape == (2, 72)
    assert context[1].eq(0).all() and vector[1, :48].eq(0).all() and not context[0].eq(0).all()
    torch.testing.assert_close(vector[0, 48:], vector[1, 48:])  # 32 x 32 px, no crop
    at_64 = engine.get_learned_conditioning(["a red circle"], size=(64, 64))["c_adm"]
    assert not torch.allclose(at_64[0, 48:], vector[0, 48:])


def test_tiny_sdxl_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    engine = tiny_engine(use_ema=False).train()
    optimizer = torch.optim.AdamW(engine.trainable_parameters(), lr=2e-3)
    batch = shapes_batch()
    z, cond = engine.get_input(batch)
    t, noise = torch.randint(0, 1000, (len(z),)), torch.randn_like(z)
    losses = []
    for _ in range(30):
        loss, _ = engine.p_losses(z, cond, t, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert not any(p.requires_grad for p in engine.conditioner.parameters())


def run(logs: Path, *args: str):
    return main.main(["--base", str(TINY), "-l", str(logs), *args, *SMALL])


def test_tiny_sdxl_trains_through_main_and_resumes_exactly(tmp_path):
    previews = "lightning.callbacks.image_logger.params.batch_frequency=2"
    common = ["-t", "-s", "3", "--no-test", "lightning.trainer.limit_val_batches=1", previews]
    whole = run(tmp_path / "whole", *common, "--max_steps", "4")
    (whole_dir,) = sorted((tmp_path / "whole").iterdir())
    grids = sorted(p.name.split("_gs")[0] for p in (whole_dir / "images" / "train").glob("*.png"))
    assert set(grids) == {"inputs", "reconstructions", "samples_cfg1", "samples_cfg3"}
    first = run(tmp_path / "parts", *common, "--max_steps", "2")
    assert first.global_step == 2
    (logdir,) = sorted((tmp_path / "parts").iterdir())
    resumed = main.main(["-r", str(logdir), *common, "--max_steps", "4", *SMALL])
    assert resumed.global_step == 4
    ours, reference = resumed.lightning_module.state_dict(), whole.lightning_module.state_dict()
    assert {k.split(".")[0] for k in ours} == {
        "model",
        "model_ema",
        "first_stage_model",
        "conditioner",
        "denoiser",
    }
    for key in reference:
        torch.testing.assert_close(ours[key], reference[key], msg=key)


def test_an_original_layout_safetensors_file_loads_for_fine_tuning(tmp_path):
    source = tiny_engine(use_ema=False)
    with torch.no_grad():
        for p in source.parameters():
            p.normal_(0, 0.05)
    weights = {k: v.contiguous() for k, v in source.state_dict().items()}
    path = tmp_path / "sdxl.safetensors"
    save_file({k: v for k, v in weights.items() if k != "denoiser.sigmas"}, path)
    engine = tiny_engine(ckpt_path=str(path))  # the EMA starts from the file's weights
    for key, value in weights.items():
        assert torch.equal(engine.state_dict()[key], value), key
    ema = engine.model_ema
    with engine.ema_scope():
        assert torch.equal(
            engine.model.diffusion_model.out[2].weight, source.model.diffusion_model.out[2].weight
        )
    assert ema.num_updates.item() == 0
    broken = tmp_path / "broken.safetensors"
    save_file(
        {k: v for k, v in weights.items() if not k.startswith("conditioner.embedders.1.")}, broken
    )
    with pytest.raises(
        CheckpointError, match=r"missing \(42\): conditioner.embedders.1.model.*SDXL"
    ):
        tiny_engine(ckpt_path=str(broken))


def test_a_tiny_sdxl_run_samples_with_txt2img_and_exports_the_sdxl_layout(tmp_path):
    run(
        tmp_path / "logs",
        "-t",
        "--max_steps",
        "1",
        "--no-test",
        "lightning.trainer.limit_val_batches=1",
    )
    (logdir,) = sorted((tmp_path / "logs").iterdir())
    flags = ["--ddim_steps", "3", "--precision", "full", "--device", "cpu", "--n_iter", "1"]
    images = txt2img.main(
        [
            "--ckpt",
            str(logdir),
            "--prompt",
            "a red circle",
            "--n_samples",
            "2",
            *flags,
            "--outdir",
            str(tmp_path / "out"),
        ]
    )
    assert len(images) == 1 and images[0].shape == (2, 3, 32, 32)
    out = tmp_path / "sdxl.safetensors"
    convert.main(["--ckpt", str(logdir), "--out", str(out), "--use_ema"])
    exported = load_file(out)
    assert {k.split(".")[0] for k in exported} == {
        "model",
        "first_stage_model",
        "conditioner",
        "denoiser",
    }
    assert "conditioner.embedders.1.model.text_projection" in exported


def cached_run(tmp_path, *args: str, base: Path = TINY):
    cache = "lightning.callbacks.latent_cache"
    overlay = str(ROOT / "configs" / "tiny" / "cached.yaml")
    argv = ["--base", str(base), overlay, "-l", str(tmp_path / "logs"), "-t", "--no-test"]
    flags = [f"{cache}.params.dir={tmp_path / 'cache'}", f"{cache}.params.shard_size=16"]
    flags += ["data.params.train.params.length=24", "data.params.validation.params.length=8"]
    return main.main([*argv, *flags, *SMALL, "lightning.trainer.limit_val_batches=1", *args])


def test_sdxl_trains_on_a_latent_cache_of_every_embedders_outputs(tmp_path):
    trainer = cached_run(tmp_path, "--max_steps", "2")
    assert trainer.global_step == 2
    cached = trainer.datamodule.datasets["train"]
    item = cached[0]
    assert {k for k in item if k.startswith("conditioner_output.")} == {
        "conditioner_output.0.0",  # CLIP's context
        "conditioner_output.1.0",  # bigG's context
        "conditioner_output.1.1",  # bigG's pooled vector
        "conditioner_output.2.0",  # the three size embeddings
        "conditioner_output.3.0",
        "conditioner_output.4.0",
    }
    engine = trainer.lightning_module.eval()
    source = instantiate_from_config(OmegaConf.load(TINY).data.params.train)
    raw = {"image": torch.as_tensor(source[0]["image"])[None], "caption": [source[0]["caption"]]}
    batch = {k: (v[None] if isinstance(v, torch.Tensor) else [v]) for k, v in item.items()}
    with torch.no_grad():
        _, from_cache = engine.get_input(batch)
        _, from_images = engine.get_input(raw)
    for key in ("c_crossattn", "c_adm"):
        ours = from_cache[key][0] if key == "c_crossattn" else from_cache[key]
        theirs = from_images[key][0] if key == "c_crossattn" else from_images[key]
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_the_latent_cache_refuses_what_it_cannot_store_by_name(tmp_path):
    config = OmegaConf.load(TINY)
    config.model.params.conditioner_config.params.emb_models[0].legacy_ucg_value = ""
    OmegaConf.save(config, tmp_path / "legacy.yaml")
    with pytest.raises(ConfigError, match=r"embedder 0 \(FrozenCLIPEmbedder\) replaces captions"):
        cached_run(tmp_path, "--max_steps", "1", base=tmp_path / "legacy.yaml")
    lora = "model.params.lora_config.text_encoder.rank=2"
    with pytest.raises(ConfigError, match=r"embedder 0 .* trains \(is_trainable or LoRA\)"):
        cached_run(tmp_path, "--max_steps", "1", lora)


def test_caption_dropout_zeroes_every_text_encoder_of_an_item_at_once():
    engine = tiny_engine(caption_dropout=0.5)
    batch = {"image": torch.zeros(64, 32, 32, 3), "caption": [f"prompt {i}" for i in range(64)]}
    with torch.no_grad():
        _, kept = engine.eval().get_input(batch)
        torch.manual_seed(0)
        _, dropped = engine.train().get_input(batch)
    context, pooled = dropped["c_crossattn"][0], dropped["c_adm"][:, :48]
    zero_clip = context[:, :, :32].flatten(1).eq(0).all(dim=1)
    zero_bigg = context[:, :, 32:].flatten(1).eq(0).all(dim=1)
    assert torch.equal(zero_clip, zero_bigg) and torch.equal(zero_clip, pooled.eq(0).all(dim=1))
    assert 16 <= int(zero_clip.sum()) <= 48
    torch.testing.assert_close(context[~zero_clip], kept["c_crossattn"][0][~zero_clip])
    assert torch.equal(dropped["c_adm"][:, 48:], kept["c_adm"][:, 48:])  # the sizes stay
    with pytest.raises(ConfigError, match=r"caption_dropout 1.5: expected \[0, 1\]"):
        tiny_engine(caption_dropout=1.5)


def test_sdxl_finetune_config_is_the_base_with_training_parts(tmp_path):
    config = load_config("sdxl/sd_xl_finetune.yaml")
    with torch.device("meta"):
        engine = instantiate_from_config(config.model)
        base = instantiate_from_config(load_config("sdxl/sd_xl_base.yaml").model)
    plain = {k: tuple(v.shape) for k, v in engine.state_dict().items() if "model_ema" not in k}
    assert plain == {k: tuple(v.shape) for k, v in base.state_dict().items()}  # loads the file
    assert any(k.startswith("model_ema.") for k in engine.state_dict())
    assert engine.caption_dropout == 0.1 and engine.first_stage_key == "image"
    assert engine.model.diffusion_model.block_kwargs["use_checkpoint"]
    (optimizer,), schedulers = engine.configure_optimizers()
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["weight_decay"] == 0.01
    lr_lambda = schedulers[0]["scheduler"].lr_lambdas[0]
    assert lr_lambda(0) < 1e-3 and lr_lambda(500) == pytest.approx(1.0)
    assert config.lightning.trainer.precision == "bf16-mixed"
    Image.fromarray(np.full((800, 1200, 3), 90, np.uint8)).save(tmp_path / "wide.png")
    (tmp_path / "wide.txt").write_text("a wide grey picture")
    data = config.data.params.train
    data.params.root = str(tmp_path)
    item = instantiate_from_config(data)[0]
    height, width = item["image"].shape[:2]
    assert width > height and width % 64 == 0 and height % 64 == 0
    assert tuple(item["original_size_as_tuple"]) == (800, 1200)

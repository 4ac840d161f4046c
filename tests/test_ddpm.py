"""LatentDiffusion: SD checkpoint layout, diffusers' converters, training, EMA, bad params."""

from __future__ import annotations

import itertools

import pytest
import pytorch_lightning as pl
import torch
from conftest import diffusers_original_config, fit_fixed_batch, load_config, sd_manifest
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers import UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu
from scipy import stats
from transformers import CLIPTextConfig, CLIPTextModel

from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.util import ConfigError, instantiate_from_config

SCHEDULE_BUFFERS = 12


def build(relative: str, device: str | None = None, **params) -> LatentDiffusion:
    config = load_config(relative).model
    config.params.update(params)
    if device is None:
        return instantiate_from_config(config)
    with torch.device(device):
        return instantiate_from_config(config)


def shapes(state_dict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state_dict.items()}


@pytest.fixture(scope="module")
def sd_models() -> dict[str, tuple[object, LatentDiffusion]]:
    """Full-size SD v1 and v2 (768-v) built on the meta device: layouts without memory."""
    configs = {"v1": "v1-inference.yaml", "v2": "v2-inference-v.yaml"}
    return {
        v: (load_config(f"stable-diffusion/{c}").model, build(f"stable-diffusion/{c}", "meta"))
        for v, c in configs.items()
    }


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_full_size_state_dict_is_the_original_sd_layout(sd_models, version):
    _, model = sd_models[version]
    ours = shapes(model.state_dict())
    expected = sd_manifest(version)
    assert sorted(set(ours) - set(expected)) == [] and sorted(set(expected) - set(ours)) == []
    assert ours == expected
    prefixes = {p: sum(k.startswith(p) for k in ours) for p in ("model.", "first_stage_model.")}
    assert prefixes == {"model.": 686, "first_stage_model.": 248}
    assert sum("." not in k for k in ours) == SCHEDULE_BUFFERS


def test_ema_keys_are_named_as_in_sd_checkpoints():
    with torch.device("meta"):
        config = load_config("stable-diffusion/v1-inference.yaml").model
        config.params.use_ema = True
        model = instantiate_from_config(config)
    ema = {k for k in model.state_dict() if k.startswith("model_ema.")}
    unet = [k for k in model.state_dict() if k.startswith("model.diffusion_model.")]
    assert "model_ema.diffusion_modelinput_blocks00weight" in ema
    assert ema == {"model_ema.decay", "model_ema.num_updates"} | {
        "model_ema." + k[len("model.") :].replace(".", "") for k in unet
    }


def assert_fits(module: torch.nn.Module, converted: dict) -> None:
    expected = shapes(module.state_dict())
    assert sorted(set(expected) - set(converted)) == [], "missing after conversion"
    assert sorted(set(converted) - set(expected)) == [], "unexpected after conversion"
    assert shapes(converted) == expected


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_diffusers_single_file_converters_take_our_state_dicts(sd_models, version):
    config, model = sd_models[version]
    checkpoint = model.state_dict()
    original = diffusers_original_config(config)
    unet_config = sfu.create_unet_diffusers_config_from_ldm(original, checkpoint)
    vae_config = sfu.create_vae_diffusers_config_from_ldm(original, checkpoint)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
        vae = DiffusersAutoencoderKL(**vae_config)
        text = CLIPTextModel(sd_text_config(version))
    assert_fits(unet, sfu.convert_ldm_unet_checkpoint(checkpoint, unet_config))
    assert_fits(vae, sfu.convert_ldm_vae_checkpoint(checkpoint, vae_config))
    if version == "v1":
        assert sfu.is_clip_model(checkpoint)
        converted = sfu.convert_ldm_clip_checkpoint(checkpoint)
    else:
        assert sfu.is_open_clip_model(checkpoint)
        converted = sfu.convert_open_clip_checkpoint(text, checkpoint)
    # diffusers drops `text_model.` for transformers >= 5.6, whose CLIPTextModel is flat.
    assert_fits(text, {k.removeprefix("text_model."): v for k, v in converted.items()})


def sd_text_config(version: str) -> CLIPTextConfig:
    """The text encoders diffusers' SD 1.5 and SD 2 pipelines use (SD 2 drops the last layer)."""
    if version == "v1":
        return CLIPTextConfig(
            hidden_size=768,
            intermediate_size=3072,
            num_attention_heads=12,
            num_hidden_layers=12,
            projection_dim=768,
            hidden_act="quick_gelu",
        )
    return CLIPTextConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_attention_heads=16,
        num_hidden_layers=23,
        projection_dim=512,
        hidden_act="gelu",
    )


@pytest.fixture
def tiny() -> LatentDiffusion:
    return build("tiny/txt2img.yaml")


def tiny_batch(n: int = 4) -> dict:
    g = torch.Generator().manual_seed(1)
    captions = ["a red circle", "a blue square", "a green triangle on white", ""]
    return {"image": torch.rand(n, 32, 32, 3, generator=g) * 2 - 1, "caption": captions[:n]}


def test_tiny_model_is_small_and_gives_latents_and_context(tiny):
    assert sum(p.numel() for p in tiny.parameters()) < 5_000_000
    z, c = tiny.get_input(tiny_batch())
    assert z.shape == (4, 4, 8, 8) and c.shape == (4, 77, 32)
    assert tiny.decode_first_stage(z).shape == (4, 3, 32, 32)
    t = torch.tensor([0, 1, 500, 999])
    assert tiny.apply_model(z, t, c).shape == z.shape


@pytest.mark.parametrize("parameterization", ["eps", "v", "x0"])
def test_optimisation_steps_reduce_the_loss(parameterization):
    model = build("tiny/txt2img.yaml", parameterization=parameterization)
    z, c = model.get_input(tiny_batch())
    t, noise = torch.tensor([50, 300, 600, 900]), torch.randn_like(z)
    losses, logs = fit_fixed_batch(model, z, c, t, noise, steps=25, lr=2e-3)
    assert set(logs) == {"train/loss_simple", "train/loss_vlb", "train/loss"}
    assert losses[-1] < 0.5 * losses[0], losses


def test_frozen_stages_get_no_gradients_and_stay_in_eval(tiny):
    tiny.train()
    assert not tiny.first_stage_model.training and not tiny.cond_stage_model.training
    assert tiny.model.training
    trainable = {id(p) for p in tiny.trainable_parameters()}
    assert trainable == {id(p) for p in tiny.model.parameters()}


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, n: int):
        self.items = [{"image": tiny_batch(1)["image"][0], "caption": "a red circle"}] * n

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def test_lightning_fit_runs_steps_updates_ema_and_lr_schedule(tmp_path, tiny):
    tiny.scheduler_config = {
        "target": "ldm.lr_scheduler.LambdaLinearScheduler",
        "params": {
            "warm_up_steps": [10],
            "cycle_lengths": [1000],
            "f_start": [0.1],
            "f_max": [1.0],
            "f_min": [1.0],
        },
    }
    loader = torch.utils.data.DataLoader(ListDataset(6), batch_size=2)
    trainer = pl.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    before = [p.detach().clone() for p in tiny.model.parameters()]
    trainer.fit(tiny, loader)
    assert trainer.global_step == 3
    assert tiny.model_ema.num_updates.item() == 3
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(tiny.learning_rate * (0.1 + 0.9 * 3 / 10))
    changed = [not torch.equal(b, p) for b, p in zip(before, tiny.model.parameters(), strict=True)]
    assert any(changed)


def test_ema_scope_swaps_weights_and_restores_them(tiny):
    with torch.no_grad():
        for p in tiny.model.parameters():
            p.add_(1.0)
    weight = tiny.model.diffusion_model.out[2].weight
    trained = weight.detach().clone()
    with tiny.ema_scope("test"):
        assert torch.equal(weight, trained - 1.0)
    assert torch.equal(weight, trained)


def test_scale_by_std_sets_unit_variance_latents_on_first_batch():
    model = build("tiny/txt2img.yaml", scale_by_std=True, scale_factor=1.0)
    batch = tiny_batch()
    model.on_train_batch_start(batch, 0)
    z, _ = model.get_input(batch)
    assert z.std().item() == pytest.approx(1.0, abs=0.1)
    assert "scale_factor" in model.state_dict()


# --- p_losses against the loss written out ------------------------------------------------------

SD_LINEAR = dict(beta_schedule="linear", linear_start=0.00085, linear_end=0.012)


def sd_alphas_cumprod() -> torch.Tensor:
    """SD's schedule by hand: betas linear in sqrt(beta), alphas_cumprod their running product."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def stand_in_net(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed nonlinear function of (x_t, t) in place of the UNet."""
    return 0.5 * torch.tanh(2 * x_t) + t.to(x_t).reshape(-1, 1, 1, 1) / 1000


class StandIn:
    """apply_model replaced by stand_in_net, keeping the x_t it was given."""

    def __call__(self, x_t, t, cond=None, self_cond=None):
        self.x_t = x_t
        return stand_in_net(x_t, t)


def stand_in_model(**params) -> tuple[LatentDiffusion, StandIn]:
    """The tiny LatentDiffusion on SD's schedule without its stages, its network a StandIn."""
    config = load_config("tiny/txt2img.yaml").model
    config.params.update(first_stage_config={"target": "torch.nn.Identity"}, **SD_LINEAR)
    config.params.update(cond_stage_config={"target": "torch.nn.Identity"}, **params)
    model = instantiate_from_config(config)
    model.apply_model = StandIn()
    return model, model.apply_model


@pytest.mark.parametrize("gamma", [None, 5.0])
@pytest.mark.parametrize("parameterization", ["eps", "v", "x0"])
def test_p_losses_is_the_weighted_mse_to_the_written_out_target(parameterization, gamma):
    model, net = stand_in_model(parameterization=parameterization, min_snr_gamma=gamma)
    x0, eps = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t = torch.tensor([0, 250, 600, 999])
    loss, logs = model.p_losses(x0, None, t, eps)

    ac = sd_alphas_cumprod()
    a = ac[t].reshape(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps  # Ho et al. 2020, eq. 4
    torch.testing.assert_close(net.x_t, x_t.float())
    target = {"eps": eps, "x0": x0, "v": a.sqrt() * eps - (1 - a).sqrt() * x0}[parameterization]
    mse = ((stand_in_net(x_t, t) - target) ** 2).mean(dim=(1, 2, 3))  # (B,)
    snr = ac[t] / (1 - ac[t])
    weight = torch.ones(4, dtype=torch.float64)
    if gamma is not None:  # Hang et al. 2023: min(SNR, gamma) in x0 terms, moved to the target
        clipped = snr.clamp(max=gamma)
        weight = {"eps": clipped / snr, "x0": clipped, "v": clipped / (snr + 1)}[parameterization]
    torch.testing.assert_close(logs["train/loss_simple"].double(), mse.mean(), rtol=1e-5, atol=0)
    torch.testing.assert_close(loss.double(), (weight * mse).mean(), rtol=1e-5, atol=0)

    # The bound's L_t weights (Ho et al. 2020, eq. 12); t = 0 borrows t = 1's (zero variance).
    s = t.clamp(min=1)
    betas = 1 - ac / torch.cat([ac.new_ones(1), ac[:-1]])
    variance = betas[s] * (1 - ac[s - 1]) / (1 - ac[s])
    eps_weight = betas[s] ** 2 / (2 * variance * (1 - betas[s]) * (1 - ac[s]))
    x0_weight = (betas[s] * ac[s - 1].sqrt() / (1 - ac[s])) ** 2 / (2 * variance)
    vlb = {"eps": eps_weight, "x0": x0_weight, "v": eps_weight * ac[s]}[parameterization]
    torch.testing.assert_close(
        logs["train/loss_vlb"].double(), (vlb * mse).mean(), rtol=1e-4, atol=0
    )


def drawn_noise(model: LatentDiffusion, net: StandIn, x0: torch.Tensor, t: torch.Tensor):
    """The noise p_losses drew itself, read back from the x_t it gave the network."""
    loss, _ = model.p_losses(x0, None, t)
    a = sd_alphas_cumprod()[t].reshape(-1, 1, 1, 1).float()
    eps = (net.x_t - a.sqrt() * x0) / (1 - a).sqrt()
    mse = ((stand_in_net(net.x_t, t) - eps) ** 2).mean()  # eps-parameterised
    torch.testing.assert_close(loss, mse)
    return eps


def test_p_losses_draws_offset_noise_with_the_closed_form_statistics():
    strength = 0.3
    model, net = stand_in_model(
        parameterization="eps", min_snr_gamma=None, offset_noise_strength=strength
    )
    x0 = torch.randn(2048, 4, 4, 4)
    eps = drawn_noise(model, net, x0, torch.full((2048,), 500)).double()
    # Per (sample, channel): the mean of 16 unit normals plus strength * N(0, 1), and a
    # within-channel spread that the shared offset leaves alone (15 s^2 ~ chi2(15)).
    means = eps.mean(dim=(2, 3)).flatten()
    spread = 15 * eps.flatten(2).var(dim=2).flatten()
    offset_std = (1 / 16 + strength**2) ** 0.5
    assert stats.kstest(means.numpy(), stats.norm(scale=offset_std).cdf).pvalue > 1e-3
    assert stats.kstest(spread.numpy(), stats.chi2(15).cdf).pvalue > 1e-3


def test_p_losses_pairs_its_noise_with_the_nearest_assignment():
    model, net = stand_in_model(
        parameterization="eps", min_snr_gamma=None, offset_noise_strength=0.1, immiscible=True
    )
    x0 = torch.randn(6, 4, 8, 8) + torch.linspace(-2, 2, 6).reshape(-1, 1, 1, 1)
    eps = drawn_noise(model, net, x0, torch.tensor([1, 100, 300, 500, 700, 900]))

    def cost(order) -> float:
        return sum((x0[i] - eps[j]).norm().item() for i, j in enumerate(order))

    assert cost(range(6)) == pytest.approx(
        min(cost(p) for p in itertools.permutations(range(6))), rel=1e-6
    )


@pytest.mark.parametrize(
    "params,message",
    [
        ({"parameterization": "score"}, "parameterization 'score'"),
        ({"loss_type": "huber"}, "loss_type 'huber'"),
        ({"conditioning_key": "film"}, "conditioning_key 'film'"),
        ({"beta_schedule": "quadratic"}, "beta_schedule 'quadratic'"),
        ({"num_timesteps_cond": 10}, "num_timesteps_cond"),
        ({"min_snr_gamma": -1}, "min_snr_gamma=-1"),
    ],
)
def test_bad_model_params_are_named(params, message):
    with pytest.raises((ValueError, NotImplementedError), match=message):
        build("tiny/txt2img.yaml", **params)


def test_unknown_model_param_is_named():
    with pytest.raises(ConfigError, match="ucg_trainnig"):
        build("tiny/txt2img.yaml", ucg_trainnig=0.1)


def test_validation_loss_uses_fixed_noise_and_leaves_the_rng_alone(tiny):
    tiny.eval()
    batch = tiny_batch()
    state = torch.get_rng_state()
    first = tiny.evaluation_loss(batch, 0, "val")
    assert torch.equal(torch.get_rng_state(), state)
    torch.randn(100)  # whatever the training stream did in between
    assert tiny.evaluation_loss(batch, 0, "val") == first
    assert tiny.evaluation_loss(batch, 1, "val") != first
    assert set(first) == {"val/loss_simple", "val/loss_vlb", "val/loss"}


def test_caption_dropout_replaces_captions_only_in_training():
    model = build("tiny/txt2img.yaml", ucg_training={"txt": {"p": 1.0, "val": ""}})
    batch = tiny_batch()
    model.train()
    _, c_train = model.get_input(batch)
    _, c_empty = model.get_input({**batch, "caption": [""] * 4})
    torch.testing.assert_close(c_train, c_empty)
    model.eval()
    _, c_eval = model.get_input(batch)
    assert not torch.allclose(c_eval, c_empty)
    with pytest.raises(ValueError, match="ucg_training.caption"):
        build("tiny/txt2img.yaml", ucg_training={"caption": {"p": 2.0}})

"""DDIM sampling with classifier-free guidance, ours against a diffusers loop, and the share of
time each spends outside the UNet.

    python -m bench.sampling [--config tiny/txt2img.yaml] [--steps 20] [--batch 4]
        [--guidance 3] [--repeats 5] [--device cpu|cuda]

Ours is `ldm.models.diffusion.sampling.sample` (DDIM, as `LatentDiffusion.sample`); the
reference is the loop of diffusers' pipelines: a `DDIMScheduler` of the same schedule and
parameterisation stepping `UNet2DConditionModel` (holding the same weights) on the batched
[uncond, cond] input. Prints one JSON object: median
milliseconds of each, the ratio ours / diffusers, the fraction of time outside the UNet, and the
largest difference between the two results (same start noise).
"""

from __future__ import annotations

import argparse
import time
from contextlib import contextmanager

import torch

from bench.common import compared, emit, environment, interleaved
from bench.reference import diffusers_ddim, diffusers_unet, model_config, randomized
from ldm.models.diffusion.sampling import sample as sample_latents
from ldm.util import instantiate_from_config


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--config", default="tiny/txt2img.yaml")
    add("--steps", type=int, default=20)
    add("--batch", type=int, default=4)
    add("--guidance", type=float, default=3.0)
    add("--repeats", type=int, default=5)
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


class ForwardTimer:
    """Seconds spent inside a module's forward calls, from hooks."""

    def __init__(self, module: torch.nn.Module, device: torch.device):
        self.total, self.device, self.start = 0.0, device, 0.0
        module.register_forward_pre_hook(lambda *_: self.enter())
        module.register_forward_hook(lambda *_: self.leave())

    def enter(self) -> None:
        self.sync()
        self.start = time.perf_counter()

    def leave(self) -> None:
        self.sync()
        self.total += time.perf_counter() - self.start

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def measure(self):
        self.total = 0.0
        yield self


def diffusers_sample(unet, scheduler, x, cond, uncond, steps: int, scale: float) -> torch.Tensor:
    """The sampling loop of diffusers' StableDiffusionPipeline, without the text and VAE."""
    scheduler.set_timesteps(steps, device=x.device)
    context = torch.cat([uncond, cond])  # (2B, L, D)
    for t in scheduler.timesteps:
        pred_u, pred_c = unet(torch.cat([x, x]), t, encoder_hidden_states=context).sample.chunk(2)
        x = scheduler.step(pred_u + scale * (pred_c - pred_u), t, x).prev_sample
    return x


def main(argv: list[str] | None = None) -> dict:
    opt = get_parser().parse_args(argv)
    device = torch.device(opt.device)
    config = model_config(opt.config)
    model = instantiate_from_config(config).eval()
    randomized(model.model)
    unet = diffusers_unet(config, model.model.diffusion_model).eval().to(device)
    model = model.to(device)
    scheduler = diffusers_ddim(model)
    size, channels = model.image_size, model.channels
    x = torch.randn(opt.batch, channels, size, size, device=device)
    params = config.params.unet_config.params
    cond = torch.randn(opt.batch, 77, params.context_dim, device=device)
    uncond = torch.randn(1, 77, params.context_dim, device=device).expand_as(cond)
    timers = {
        "ours": ForwardTimer(model.model.diffusion_model, device),
        "diffusers": ForwardTimer(unet, device),
    }
    samplers = {
        "ours": lambda: sample_latents(
            model, cond, uncond, steps=opt.steps, guidance_scale=opt.guidance, x_T=x
        ),
        "diffusers": lambda: diffusers_sample(
            unet, scheduler, x, cond, uncond, opt.steps, opt.guidance
        ),
    }
    with torch.no_grad():
        difference = (samplers["ours"]() - samplers["diffusers"]()).abs().max().item()
        times = interleaved(samplers, opt.repeats, device=device)
        outside = {}
        for name, sample in samplers.items():  # one more call each, to split its time
            with timers[name].measure() as timer:
                start = time.perf_counter()
                sample()
                total = time.perf_counter() - start
            outside[name] = round(1 - timer.total / total, 4)
    record = {
        "bench": "sampling",
        "config": opt.config,
        "steps": opt.steps,
        "batch": opt.batch,
        "latent": size,
        **compared(times["ours"], times["diffusers"]),
        "outside_unet_ours": outside["ours"],
        "outside_unet_diffusers": outside["diffusers"],
        "max_abs_difference": difference,
        **environment(),
    }
    emit(record)
    return record


if __name__ == "__main__":
    main()

"""The model as an eps predictor for the samplers, with classifier-free guidance.

Every sampler takes `eps_fn(x_t (B, C, H, W), t (B,)) -> eps (B, C, H, W)`; this module builds
it from a LatentDiffusion-like model (anything with `apply_model`, `parameterization` and
`alphas_cumprod`), converting x0 or v predictions to eps in one place. Guidance pads the
shorter of cond and uncond with empty chunks where a long prompt was encoded in chunks
(`conditioning.match_context_lengths`).
Ho & Salimans 2022 (classifier-free guidance); Salimans & Ho 2022 (v-prediction).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from ldm.models.diffusion import schedule
from ldm.models.diffusion.conditioning import match_context_lengths

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def eps_from_prediction(parameterization: str, x_t, t, prediction, alphas_cumprod) -> torch.Tensor:
    """The eps implied by a model's eps, x0 or v prediction at (x_t, t)."""
    if parameterization == "eps":
        return prediction
    if parameterization == "x0":
        return schedule.eps_from_x0(x_t, t, prediction, alphas_cumprod)
    if parameterization == "v":
        return schedule.eps_from_v(x_t, t, prediction, alphas_cumprod)
    expected = schedule.PARAMETERIZATIONS
    raise ValueError(f"parameterization {parameterization!r}; expected one of {expected}")


def prediction_fn(model, cond) -> EpsFn:
    """(x_t, t) -> the model's own prediction under `cond`.

    A self-conditioned model (Chen et al. 2022) gets its x0 estimate from the previous call
    (zeros at the first), so every sampler passes it along without knowing.
    """
    if not getattr(model, "self_conditioning", False):
        return lambda x_t, t: model.apply_model(x_t, t, cond)
    previous = {}

    def predict(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        prediction = model.apply_model(x_t, t, cond, self_cond=previous.get("x0"))
        ac = model.alphas_cumprod
        previous["x0"] = schedule.x0_from_prediction(model.parameterization, x_t, t, prediction, ac)
        return prediction

    return predict


def model_eps_fn(model, cond) -> EpsFn:
    """eps_fn of the model under conditioning `cond` (no guidance)."""
    predict = prediction_fn(model, cond)

    def eps_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        prediction = predict(x_t, t)
        return eps_from_prediction(model.parameterization, x_t, t, prediction, model.alphas_cumprod)

    return eps_fn


def cat_cond(uncond, cond):
    """[uncond, cond] along the batch: tensors, lists of tensors, or {key: [tensor, ...]}."""
    if isinstance(cond, Mapping):
        return {key: cat_cond(uncond[key], cond[key]) for key in cond}
    if isinstance(cond, (list, tuple)):
        return [cat_cond(u, c) for u, c in zip(uncond, cond, strict=True)]  # (2B, ...) each
    if uncond.shape[1:] != cond.shape[1:]:
        raise ValueError(
            f"classifier-free guidance: uncond {tuple(uncond.shape)} and cond "
            f"{tuple(cond.shape)} differ beyond the batch; contexts of chunked long prompts "
            "(long_prompts: chunk) are padded with empty chunks only when both are (B, L, D) "
            "tensors whose lengths differ by a multiple of the empty prompt's"
        )
    return torch.cat([uncond, cond])  # (2B, ...)


def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, phi: float) -> torch.Tensor:
    """Lin et al. 2024, eq. 15-16: the guided prediction scaled to the conditional one's std
    (per sample), mixed with the unscaled one by phi."""
    dims = tuple(range(1, guided.ndim))
    spread = guided.std(dim=dims, keepdim=True).clamp(min=1e-12)  # an all-zero guess stays 0
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / spread)
    return phi * rescaled + (1 - phi) * guided


def cfg_eps_fn(model, cond, uncond, scale: float, rescale: float = 0.0) -> EpsFn:
    """eps_u + scale (eps_c - eps_u) from one batched model call (Ho & Salimans 2022, eq. 6).

    Guidance acts on the model's own prediction (eps, x0 or v) before it becomes eps; as the
    conversion is affine that is the same as guiding eps, except with `rescale` > 0, which
    applies `rescale_guidance` to the model's prediction as diffusers does.
    """
    if uncond is None or scale == 1.0:
        return model_eps_fn(model, cond)
    cond, uncond = match_context_lengths(model, cond, uncond)  # a long prompt's chunks
    predict = prediction_fn(model, cat_cond(uncond, cond))

    def eps_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        pred_u, pred_c = predict(torch.cat([x_t, x_t]), torch.cat([t, t])).chunk(2)  # (B, C, H, W)
        guided = pred_u + scale * (pred_c - pred_u)  # (B, C, H, W)
        if rescale:
            guided = rescale_guidance(guided, pred_c, rescale)
        return eps_from_prediction(model.parameterization, x_t, t, guided, model.alphas_cumprod)

    return eps_fn

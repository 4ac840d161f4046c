"""The diffusion process as pure tensor functions: beta schedules, noising and parameterisations.

Notation (one name per concept, as in the rest of the package):
    x0      clean sample (a first-stage latent `z` in latent diffusion)    (B, C, H, W)
    x_t     x0 noised to timestep t                                        (B, C, H, W)
    eps     the Gaussian noise mixed into x_t                              (B, C, H, W)
    v       velocity sqrt(a_t) * eps - sqrt(1 - a_t) * x0                  (B, C, H, W)
    t       integer timesteps in [0, T)                                    (B,)
    a_t     alphas_cumprod[t], broadcast against x                         (B, 1, 1, 1)
Ho et al. 2020 (DDPM), Nichol & Dhariwal 2021 (cosine), Salimans & Ho 2022 (v-prediction).
The last section discretises [0, T) into the samplers' timesteps (Song et al. 2021, DDIM).
"""

from __future__ import annotations

import math

import numpy as np
import torch

PARAMETERIZATIONS = ("eps", "x0", "v")
BETA_SCHEDULES = ("linear", "scaled_linear", "cosine", "sigmoid", "sqrt_linear", "sqrt")
MAX_BETA = 0.999  # the cap of schedules defined by alphas_cumprod, as Nichol & Dhariwal
# alphas_cumprod at t = T after zero-terminal-SNR rescaling: 0 but for float32 (diffusers' Euler
# scheduler uses the same), so that x0 and eps stay computable from each other at every t.
ZERO_SNR_FLOOR = 2.0**-24
# Floor of the posterior variance before its log: it is exactly 0 at t = 0.
POSTERIOR_VARIANCE_FLOOR = 1e-20


def betas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """(n,) betas of a schedule given as alphas_cumprod at t = 0, 1/n, ..., 1 (n + 1 values)."""
    return (1 - alphas_cumprod[1:] / alphas_cumprod[:-1]).clamp(0, MAX_BETA)


def make_beta_schedule(
    kind: str,
    n: int,
    linear_start: float,
    linear_end: float,
    cosine_s: float = 8e-3,
    sigmoid_start: float = -3.0,
    sigmoid_end: float = 3.0,
    sigmoid_tau: float = 1.0,
) -> torch.Tensor:
    """(n,) float64 betas. SD's "linear" is linear in sqrt(beta), which diffusers calls
    "scaled_linear" (accepted here as a synonym); "sqrt_linear" is linear in beta."""
    t = torch.arange(n + 1, dtype=torch.float64) / n  # 0, 1/n, ..., 1
    if kind in ("linear", "scaled_linear"):
        return torch.linspace(linear_start**0.5, linear_end**0.5, n, dtype=torch.float64) ** 2
    if kind == "cosine":  # Nichol & Dhariwal 2021, eq. 17
        s = t + cosine_s
        return betas_from_alphas_cumprod(torch.cos(s / (1 + cosine_s) * math.pi / 2) ** 2)
    if kind == "sigmoid":  # Jabri et al. 2022 (RIN), alphas_cumprod = a falling sigmoid of t
        if not sigmoid_start < sigmoid_end or sigmoid_tau <= 0:
            raise ValueError(
                f"sigmoid schedule: expected sigmoid_start < sigmoid_end and sigmoid_tau > 0; got "
                f"{sigmoid_start}, {sigmoid_end}, {sigmoid_tau}"
            )
        v_start, v_end = (
            torch.tensor(v / sigmoid_tau).sigmoid() for v in (sigmoid_start, sigmoid_end)
        )
        level = ((t * (sigmoid_end - sigmoid_start) + sigmoid_start) / sigmoid_tau).sigmoid()
        return betas_from_alphas_cumprod((v_end - level) / (v_end - v_start))
    if kind == "sqrt_linear":
        return torch.linspace(linear_start, linear_end, n, dtype=torch.float64)
    if kind == "sqrt":
        return torch.linspace(linear_start, linear_end, n, dtype=torch.float64) ** 0.5
    raise ValueError(f"beta_schedule {kind!r} is unknown; expected one of {BETA_SCHEDULES}")


def rescale_zero_terminal_snr(betas: torch.Tensor, floor: float = ZERO_SNR_FLOOR) -> torch.Tensor:
    """Betas whose SNR reaches 0 at t = T (Lin et al. 2024, "Common Diffusion Noise Schedules
    and Sample Steps are Flawed", Alg. 1): sqrt(alphas_cumprod) is shifted so that its last
    value is 0 and scaled so that its first is kept; the last is then floored at `floor`."""
    sqrt_ac = torch.cumprod(1 - betas.double(), 0).sqrt()
    first, last = sqrt_ac[0].item(), sqrt_ac[-1].item()
    alphas_cumprod = ((sqrt_ac - last) * first / (first - last)) ** 2
    alphas_cumprod[-1] = floor
    return 1 - alphas_cumprod / torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])


def zero_snr_betas(betas: torch.Tensor, parameterization: str) -> torch.Tensor:
    """`rescale_zero_terminal_snr(betas)` for a model that predicts v or x0: at SNR 0 an eps
    prediction says nothing about x0 (Lin et al. 2024), so eps models are refused."""
    if parameterization == "eps":
        raise ValueError(
            "zero_terminal_snr needs parameterization v or x0: at SNR 0 an eps "
            "prediction says nothing about x0 (Lin et al. 2024)"
        )
    return rescale_zero_terminal_snr(betas)


def model_betas(
    beta_schedule: str,
    timesteps: int,
    given_betas: list[float] | None = None,
    zero_terminal_snr: bool = False,
    parameterization: str = "eps",
    **shape: float,
) -> torch.Tensor:
    """(timesteps,) float64 betas of a model config: `given_betas`, else `make_beta_schedule`
    of the schedule and its `shape` params; rescaled to SNR 0 at t = T with zero_terminal_snr."""
    betas = (
        make_beta_schedule(beta_schedule, timesteps, **shape)
        if given_betas is None
        else torch.tensor(given_betas, dtype=torch.float64)
    )
    return zero_snr_betas(betas, parameterization) if zero_terminal_snr else betas


def schedule_buffers(betas: torch.Tensor, v_posterior: float = 0.0) -> dict[str, torch.Tensor]:
    """The original LatentDiffusion schedule buffers, by name, from betas (Ho et al. 2020)."""
    alphas = 1 - betas
    ac = torch.cumprod(alphas, 0)
    ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
    posterior_variance = (1 - v_posterior) * betas * (1 - ac_prev) / (1 - ac) + v_posterior * betas
    buffers = {
        "betas": betas,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": ac.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1 - ac).sqrt(),
        "log_one_minus_alphas_cumprod": (1 - ac).log(),
        "sqrt_recip_alphas_cumprod": (1 / ac).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1 / ac - 1).sqrt(),
        "posterior_variance": posterior_variance,  # Ho et al. 2020, eq. 7
        "posterior_log_variance_clipped": posterior_variance.clamp(
            min=POSTERIOR_VARIANCE_FLOOR
        ).log(),
        "posterior_mean_coef1": betas * ac_prev.sqrt() / (1 - ac),
        "posterior_mean_coef2": (1 - ac_prev) * alphas.sqrt() / (1 - ac),
    }
    return buffers


def vlb_weights(betas: torch.Tensor, parameterization: str) -> torch.Tensor:
    """Weights turning each parameterisation's squared error into the bound's L_t (Ho eq. 8-12)."""
    buffers = schedule_buffers(betas)
    ac, variance = buffers["alphas_cumprod"], buffers["posterior_variance"]
    eps_weights = betas**2 / (2 * variance * (1 - betas) * (1 - ac))
    weights = {
        "eps": eps_weights,
        "x0": buffers["posterior_mean_coef1"] ** 2 / (2 * variance),
        "v": eps_weights * ac,  # eps - eps_hat = sqrt(a_t) (v - v_hat)
    }[parameterization]
    weights[0] = weights[1]  # the t = 0 term divides by a zero posterior variance
    return weights.float()


def append_dims(a: torch.Tensor, ndim: int) -> torch.Tensor:
    """Append trailing singleton dims to `a` until it has `ndim` dims, for broadcasting."""
    return a.reshape(*a.shape, *([1] * (ndim - a.ndim)))


def extract(a: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """a[t] shaped (B, 1, ..., 1) with `ndim` dims."""
    return append_dims(a.to(t.device)[t], ndim)


def q_sample(x0, t, eps, alphas_cumprod) -> torch.Tensor:
    """Noise x0 to timestep t: sqrt(a_t) x0 + sqrt(1 - a_t) eps (Ho et al. 2020, eq. 4)."""
    a_t = extract(alphas_cumprod, t, x0.ndim)
    return a_t.sqrt() * x0 + (1 - a_t).sqrt() * eps


def x0_from_eps(x_t, t, eps, alphas_cumprod) -> torch.Tensor:
    """Invert q_sample for x0 given the noise (Ho et al. 2020, eq. 15)."""
    a_t = extract(alphas_cumprod, t, x_t.ndim)
    return (x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()


def eps_from_x0(x_t, t, x0, alphas_cumprod) -> torch.Tensor:
    """Invert q_sample for the noise given x0."""
    a_t = extract(alphas_cumprod, t, x_t.ndim)
    return (x_t - a_t.sqrt() * x0) / (1 - a_t).sqrt()


def v_from_eps(x0, t, eps, alphas_cumprod) -> torch.Tensor:
    """Velocity target v = sqrt(a_t) eps - sqrt(1 - a_t) x0 (Salimans & Ho 2022, sec. 4)."""
    a_t = extract(alphas_cumprod, t, x0.ndim)
    return a_t.sqrt() * eps - (1 - a_t).sqrt() * x0


def x0_from_v(x_t, t, v, alphas_cumprod) -> torch.Tensor:
    """x0 = sqrt(a_t) x_t - sqrt(1 - a_t) v (Salimans & Ho 2022, appendix D)."""
    a_t = extract(alphas_cumprod, t, x_t.ndim)
    return a_t.sqrt() * x_t - (1 - a_t).sqrt() * v


def eps_from_v(x_t, t, v, alphas_cumprod) -> torch.Tensor:
    """eps = sqrt(1 - a_t) x_t + sqrt(a_t) v (Salimans & Ho 2022, appendix D)."""
    a_t = extract(alphas_cumprod, t, x_t.ndim)
    return (1 - a_t).sqrt() * x_t + a_t.sqrt() * v


def x0_from_prediction(parameterization: str, x_t, t, prediction, alphas_cumprod) -> torch.Tensor:
    """The x0 implied by a model's eps, x0 or v prediction at (x_t, t)."""
    if parameterization == "eps":
        return x0_from_eps(x_t, t, prediction, alphas_cumprod)
    if parameterization == "x0":
        return prediction
    if parameterization == "v":
        return x0_from_v(x_t, t, prediction, alphas_cumprod)
    raise ValueError(f"parameterization {parameterization!r}; expected one of {PARAMETERIZATIONS}")


def training_target(parameterization: str, x0, t, eps, alphas_cumprod) -> torch.Tensor:
    """What the network is trained to predict for each parameterisation."""
    if parameterization == "eps":
        return eps
    if parameterization == "x0":
        return x0
    if parameterization == "v":
        return v_from_eps(x0, t, eps, alphas_cumprod)
    raise ValueError(f"parameterization {parameterization!r}; expected one of {PARAMETERIZATIONS}")


def snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio a / (1 - a) per timestep (Kingma et al. 2021)."""
    return alphas_cumprod / (1 - alphas_cumprod)


def min_snr_weights(
    alphas_cumprod: torch.Tensor, parameterization: str, gamma: float
) -> torch.Tensor:
    """(T,) Min-SNR-gamma loss weights (Hang et al. 2023, "Efficient Diffusion Training via
    Min-SNR Weighting Strategy"): min(SNR, gamma) in x0 terms, rescaled to each target.

    eps: min(SNR, gamma) / SNR; x0: min(SNR, gamma); v: min(SNR, gamma) / (SNR + 1).
    """
    if gamma <= 0:
        raise ValueError(f"min_snr_gamma={gamma}; expected a positive number (5 in the paper)")
    ratio = snr(alphas_cumprod.double())
    clipped = ratio.clamp(max=gamma)
    per_target = {"eps": clipped / ratio, "x0": clipped, "v": clipped / (ratio + 1)}
    if parameterization not in per_target:
        raise ValueError(
            f"parameterization {parameterization!r}; expected one of {list(per_target)}"
        )
    return per_target[parameterization].float()


# --- timesteps: the sampling grid over the training schedule -----------------------------------

SPACINGS = ("uniform", "quad", "leading", "trailing", "linspace")


def make_ddim_timesteps(
    num_steps: int, num_train_timesteps: int, spacing: str = "uniform"
) -> torch.Tensor:
    """(S,) int64 timesteps, descending: "uniform"/"quad" as the original, the rest as diffusers.

    "uniform" is the original's range(0, T, T // S) + 1, so S + 1 steps when S does not divide T,
    less t = T where the original indexed past the schedule (S = 3, 9, 27, ...);
    "leading" is diffusers' with steps_offset=1; "linspace" is the SD 2.x DPM-Solver grid.
    """
    n, s = num_train_timesteps, num_steps
    grids = {
        "uniform": lambda: np.arange(1, n, n // s),
        "quad": lambda: (np.linspace(0, np.sqrt(n * 0.8), s) ** 2).astype(np.int64) + 1,
        "leading": lambda: np.arange(s) * (n // s) + 1,
        "trailing": lambda: np.round(np.arange(n, 0, -n / s))[::-1] - 1,
        "linspace": lambda: np.linspace(0, n - 1, s + 1).round()[1:],
    }
    if spacing not in grids or not 0 < s <= n:
        raise ValueError(
            f"ddim timesteps: spacing {spacing!r}, {s} steps of {n}; "
            f"expected one of {SPACINGS} and 0 < steps <= {n}"
        )
    timesteps = grids[spacing]().astype(np.int64)
    if timesteps.max() >= n:
        raise ValueError(f"{spacing!r} spacing with {s} steps reaches t = {timesteps.max()} >= {n}")
    return torch.from_numpy(timesteps[::-1].copy())


def alphas_along(
    timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, final_alpha: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(a_t, a_prev) for each step: a_prev is the next timestep's level, then the final one."""
    a_t = alphas_cumprod[timesteps.to(alphas_cumprod.device)]  # (S,)
    last = alphas_cumprod[:1] if final_alpha is None else a_t.new_tensor([final_alpha])
    return a_t, torch.cat([a_t[1:], last])  # (S,), (S,)

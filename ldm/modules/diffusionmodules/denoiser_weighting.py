"""The early path of generative-models' loss weightings (the first sd_xl_base.yaml names
`ldm.modules.diffusionmodules.denoiser_weighting.EpsWeighting`); they live in loss_weighting."""

from ldm.modules.diffusionmodules.loss_weighting import (
    EDMWeighting,
    EpsWeighting,
    UnitWeighting,
    VWeighting,
)

__all__ = ["EDMWeighting", "EpsWeighting", "UnitWeighting", "VWeighting"]

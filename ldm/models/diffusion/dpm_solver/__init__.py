"""DPM-Solver++ sampling (the SD 2.x `DPMSolverSampler` import path)."""

from ldm.models.diffusion.dpm_solver.sampler import (
    DPMSolverSampler,
    dpmpp_2m_step,
    sample_dpmpp_2m,
)

__all__ = ["DPMSolverSampler", "dpmpp_2m_step", "sample_dpmpp_2m"]

"""Autoencoder training losses (`ldm.modules.losses.LPIPSWithDiscriminator` in configs)."""

from ldm.modules.losses.contperceptual import LPIPSWithDiscriminator

__all__ = ["LPIPSWithDiscriminator"]

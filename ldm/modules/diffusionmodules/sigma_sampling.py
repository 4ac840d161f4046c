"""generative-models' training noise levels: `DiscreteSampling` draws one of a discretization's
`num_idx` levels uniformly, i.e. DDPM's t ~ U{0, ..., T - 1}."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ldm.util import instantiate_from_config


class DiscreteSampling:
    def __init__(
        self,
        discretization_config: Mapping,
        num_idx: int,
        do_append_zero: bool = False,
        flip: bool = True,
    ):
        self.num_idx = num_idx
        self.discretization = instantiate_from_config(discretization_config)
        self.sigmas = self.discretization(num_idx, do_append_zero=do_append_zero, flip=flip)
        self.options = dict(do_append_zero=do_append_zero, flip=flip)

    def idx_to_sigma(self, idx: torch.Tensor) -> torch.Tensor:
        return self.sigmas[idx]

    def __call__(self, n_samples: int, rand: torch.Tensor | None = None) -> torch.Tensor:
        """(n_samples,) noise levels; `rand` gives the level indices instead of drawing them."""
        idx = torch.randint(0, self.num_idx, (n_samples,)) if rand is None else rand
        return self.idx_to_sigma(idx)

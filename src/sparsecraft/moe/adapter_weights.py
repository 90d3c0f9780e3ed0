"""E bottleneck-adapter experts as two stacked parameters (the weights PESC adds to each crafted FFN)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .stacked import forget_stacked_up


class AdapterExperts(nn.Module):
    """E bottleneck adapters as two stacked parameters: `down: [E, r, h]`, `up: [E, h, r]`.

    `up` starts at zero so a freshly crafted layer adds nothing; `down` gets nn.Linear's default init
    (Kaiming-uniform with a=sqrt(5)) per expert.
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        adapter_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.down = nn.Parameter(torch.empty(num_experts, adapter_dim, hidden_size, **kw))
        self.up = nn.Parameter(torch.empty(num_experts, hidden_size, adapter_dim, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.down.is_meta:
            return
        with torch.no_grad():
            for w in self.down.unbind(0):
                nn.init.kaiming_uniform_(w, a=math.sqrt(5))
            self.up.zero_()

    def train(self, mode: bool = True) -> AdapterExperts:
        """As `nn.Module.train`; training drops the up-projections' layout kept for inference (`moe/stacked.py`)."""
        if mode:
            forget_stacked_up(self.up)
        return super().train(mode)

    @property
    def num_experts(self) -> int:
        return self.down.shape[0]

    @property
    def adapter_dim(self) -> int:
        return self.down.shape[1]

    def extra_repr(self) -> str:
        e, r, h = self.down.shape
        return f"num_experts={e}, hidden={h}, adapter_dim={r}"

    def expert_weights(self, e: int) -> dict[str, torch.Tensor]:
        """Expert `e` as `{"down": [r, h], "up": [h, r]}` (views of the stacked weights)."""
        return {"down": self.down[e], "up": self.up[e]}

    @torch.no_grad()
    def set_expert_weights(self, e: int, weights: dict[str, torch.Tensor]) -> None:
        """Write `{"down": [r, h], "up": [h, r]}` into expert `e`."""
        for name, param in (("down", self.down), ("up", self.up)):
            param[e].copy_(weights[name].to(device=param.device, dtype=param.dtype))

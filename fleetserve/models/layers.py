"""Small building blocks of decoder models: RMSNorm and a Linear made of stacked shards."""

from __future__ import annotations

import torch
from torch import nn

from fleetserve.attention.ops import rms_norm


class RMSNorm(nn.Module):
    """RMSNorm as transformers computes it: normalize in float32, cast back, then scale."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., dim]
        return rms_norm(x, self.weight, self.eps)


class MergedLinear(nn.Linear):
    """Several projections of the same input stacked along the output dim (q/k/v, gate/up), so
    that one matmul replaces several. Checkpoints store the shards apart; ``load_shard`` copies
    shard ``i`` into rows ``offsets[i]:offsets[i+1]``."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool) -> None:
        super().__init__(in_features, sum(output_sizes), bias=bias)
        self.output_sizes = list(output_sizes)

    def load_shard(self, param: nn.Parameter, shard: int, loaded: torch.Tensor) -> None:
        start = sum(self.output_sizes[:shard])
        size = self.output_sizes[shard]
        target = param.data.narrow(0, start, size)
        if target.shape != loaded.shape:
            raise ValueError(
                f"shard {shard} of a fused projection: checkpoint shape {tuple(loaded.shape)} "
                f"!= expected {tuple(target.shape)}"
            )
        target.copy_(loaded)

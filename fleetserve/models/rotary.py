"""Rotary position embedding (RoPE) from a precomputed cos/sin cache indexed by positions.

Rotation is "rotate half" (GPT-NeoX / transformers layout): dims ``[0, D/2)`` pair with
``[D/2, D)``. llama.cpp stores Llama Q/K weights permuted for interleaved pairs; the GGUF loader
undoes that, so one layout serves both formats.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from fleetserve.attention.ops import apply_rope  # noqa: F401  (the reference, re-exported)


def rope_inv_freq(
    head_dim: int,
    theta: float,
    rope_scaling: dict[str, Any] | None,
    device: torch.device | str | None,
) -> torch.Tensor:
    """(head_dim // 2,) float32 inverse frequencies, scaled as transformers does."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    rope_type = (rope_scaling or {}).get("rope_type", "default")
    if rope_type == "linear":
        inv_freq = inv_freq / rope_scaling["factor"]
    elif rope_type == "freq_factors":
        inv_freq = inv_freq / torch.tensor(
            rope_scaling["factors"], dtype=torch.float32, device=device
        )
    elif rope_type == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, rope_scaling)
    return inv_freq


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_context = s["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(
        self,
        head_dim: int,
        max_position: int,
        theta: float,
        rope_scaling: dict[str, Any] | None,
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_position = max_position
        self.theta = theta
        self.rope_scaling = rope_scaling
        # Built on the default device: "meta" while the loader constructs the model; the loader
        # then calls init_buffers on the real device.
        self.register_buffer("cos_sin_cache", self._build(None), persistent=False)

    def _build(self, device: torch.device | None) -> torch.Tensor:
        inv_freq = rope_inv_freq(self.head_dim, self.theta, self.rope_scaling, device)
        t = torch.arange(self.max_position, dtype=torch.int64, device=device).float()
        freqs = torch.outer(t, inv_freq)  # [max_position, D/2]
        return torch.cat((freqs.cos(), freqs.sin()), dim=-1)  # [max_position, D] float32

    def init_buffers(self, device: torch.device) -> None:
        """Rebuild the float32 cache on ``device`` (after ``to_empty`` / a dtype cast)."""
        self.cos_sin_cache = self._build(device)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: (T,) -> cos, sin: (T, 1, D/2) float32, to broadcast over heads."""
        cos, sin = self.cos_sin_cache[positions].unsqueeze(1).chunk(2, dim=-1)
        return cos, sin

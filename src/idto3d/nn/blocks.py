"""Transformer blocks conditioned on a small set of code tokens (the geometry and texture fields share them)."""

from __future__ import annotations

import torch
from torch import nn


class CodeConditionedBlock(nn.Module):
    """Pre-norm transformer block: point tokens attend to [themselves; code tokens]."""

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: int = 2) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.norm_x = nn.LayerNorm(d_model)
        self.norm_c = nn.LayerNorm(d_model)
        self.q = nn.Linear(d_model, d_model)
        self.kv = nn.Linear(d_model, 2 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.norm_mlp = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, mlp_ratio * d_model), nn.GELU(),
                                 nn.Linear(mlp_ratio * d_model, d_model))
        # Code tokens get their own MLP so deeper layers see a refined expression.
        self.norm_code_mlp = nn.LayerNorm(d_model)
        self.code_mlp = nn.Sequential(nn.Linear(d_model, mlp_ratio * d_model), nn.GELU(),
                                      nn.Linear(mlp_ratio * d_model, d_model))

    def forward(self, x: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, d = x.shape
        h, dh = self.n_heads, d // self.n_heads
        xn = self.norm_x(x)
        cn = self.norm_c(codes)
        q = self.q(xn).view(n, h, dh)
        k_x, v_x = self.kv(xn).view(n, 2, h, dh).unbind(1)
        k_c, v_c = self.kv(cn).view(-1, 2, h, dh).unbind(1)  # [K, h, dh]
        scale = dh ** -0.5
        s_self = (q * k_x).sum(-1, keepdim=True) * scale  # [n, h, 1]
        s_code = torch.einsum("nhd,khd->nhk", q, k_c) * scale  # [n, h, K]
        att = torch.cat([s_self, s_code], dim=-1).softmax(dim=-1)
        mixed = att[..., :1] * v_x + torch.einsum("nhk,khd->nhd", att[..., 1:], v_c)
        x = x + self.out(mixed.reshape(n, d))
        x = x + self.mlp(self.norm_mlp(x))
        codes = codes + self.code_mlp(self.norm_code_mlp(codes))
        return x, codes

"""The paper's expression-conditioned DMTet field: ``field(expression) -> Mesh``.

Section 3.3: a network Psi_g(Gamma, k_exp) — here a small transformer — reads
positional features of the deformable tet grid Gamma plus one learnable latent
code per expression, and predicts an SDF value and a vertex offset per grid vertex;
differentiable marching tetrahedra turns them into the expression's mesh.

Token layout (why it looks like this): full self-attention over the grid's
10^5-10^7 vertices is out of reach, so every vertex is one query token that
attends to itself and to ``n_code_tokens`` tokens made from the expression code.
The expression therefore enters every layer multiplicatively through attention
(not as a constant bias), while the cost stays linear in the vertex count.
"""

from __future__ import annotations

import torch
from torch import nn

from idto3d.core.config import GeometryConfig
from idto3d.nn.blocks import CodeConditionedBlock
from idto3d.nn.encoding import encoding_from_config
from idto3d.geometry.marching_tets import marching_tets
from idto3d.geometry.tetgrid import TetGrid, make_tet_grid
from idto3d.render.mesh import Mesh


class ExpressionField(nn.Module):
    """DMTet geometry with one learnable latent code per expression.

    ``forward(expression_index)`` returns that expression's surface mesh; gradients
    flow to the transformer, the encoding and the expression's latent code.
    SDF convention: negative inside.
    """

    def __init__(self, grid: TetGrid, encoding: nn.Module, n_expressions: int, latent_dim: int = 32,
                 d_model: int = 32, n_layers: int = 2, n_heads: int = 2, deform_scale: float = 0.5,
                 n_code_tokens: int = 4, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if n_expressions < 1:
            raise ValueError("n_expressions must be >= 1")
        self.register_buffer("grid_vertices", grid.vertices.float(), persistent=False)
        self.register_buffer("tets", grid.tets.long(), persistent=False)
        self.grid_resolution = grid.resolution
        self.grid_scale = grid.scale
        self.edge_length = grid.edge_length
        self.deform_scale = deform_scale
        self.n_code_tokens = n_code_tokens
        self.encoding = encoding
        self.codes = nn.Parameter(torch.randn(n_expressions, latent_dim, generator=generator) * 0.1)
        in_dim = int(encoding.output_dim) + 3
        self.point_in = nn.Linear(in_dim, d_model)
        self.code_in = nn.Linear(latent_dim, n_code_tokens * d_model)
        self.blocks = nn.ModuleList(CodeConditionedBlock(d_model, n_heads) for _ in range(n_layers))
        self.norm_out = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, 4)
        # Start with zero offsets so the initial mesh is exactly the marched SDF.
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @property
    def n_expressions(self) -> int:
        return int(self.codes.shape[0])

    def code_path_parameters(self) -> list[nn.Parameter]:
        """The codes and the layers only they pass through (``code_in``, each block's code norms and ``code_mlp``):
        what an expression can change without touching the vertices' own route through the transformer."""
        only = [self.code_in] + [m for b in self.blocks for m in (b.norm_c, b.norm_code_mlp, b.code_mlp)]
        return [self.codes] + [q for m in only for q in m.parameters()]

    def _check_index(self, expression: int) -> None:
        if not 0 <= int(expression) < self.n_expressions:
            raise IndexError(f"expression index {expression} out of range [0, {self.n_expressions})")

    def query(self, points: torch.Tensor, expression: int) -> tuple[torch.Tensor, torch.Tensor]:
        """SDF ``[N]`` and raw offsets ``[N,3]`` (in grid cells, before tanh) at arbitrary points."""
        self._check_index(expression)
        feats = torch.cat([self.encoding(points), points / self.grid_scale], dim=-1)
        x = self.point_in(feats)
        codes = self.code_in(self.codes[expression]).view(self.n_code_tokens, -1)
        for block in self.blocks:
            x, codes = block(x, codes)
        out = self.head(self.norm_out(x))
        return out[:, 0], out[:, 1:]

    def deformed_grid(self, expression: int) -> tuple[torch.Tensor, torch.Tensor]:
        sdf, raw = self.query(self.grid_vertices, expression)
        offset = self.deform_scale * self.edge_length * torch.tanh(raw)
        return self.grid_vertices + offset, sdf

    @torch.no_grad()
    def grid_sdf(self, expression: int, chunk: int = 262_144) -> torch.Tensor:
        """SDF at every grid vertex without autograd, in chunks (memory stays flat at grid 256)."""
        return torch.cat([self.query(p, expression)[0] for p in self.grid_vertices.split(chunk)])

    def forward(self, expression: int) -> Mesh:
        # Only vertices of tets that the surface crosses reach the mesh, so autograd
        # runs on those alone: same values and gradients as a full pass, at a
        # fraction of the memory (the sign, which picks them, has no gradient).
        sdf = self.grid_sdf(expression)
        signs = (sdf[self.tets] < 0).sum(dim=1)
        # May be empty (no surface yet): the query then runs on zero points, which
        # keeps the empty mesh connected to the parameters so backward() still works.
        active = torch.unique(self.tets[(signs > 0) & (signs < 4)])
        sdf_act, raw = self.query(self.grid_vertices[active], expression)
        offset = self.deform_scale * self.edge_length * torch.tanh(raw)
        sdf = sdf.index_put((active,), sdf_act)
        vertices = self.grid_vertices.index_put((active,), self.grid_vertices[active] + offset)
        return marching_tets(vertices, sdf, self.tets)


def build_field(cfg: GeometryConfig, n_expressions: int, seed: int = 0, fast_paths: bool = False,
                device: torch.device | str | None = None) -> ExpressionField:
    """An ``ExpressionField`` from the geometry config, deterministic under ``seed``.

    Built on the CPU (so the initial weights do not depend on the device), then moved to ``device`` when
    given. ``fast_paths`` (``runtime.fast_paths``) lets a hash encoding use tiny-cuda-nn when it imports
    and the field is for a CUDA device; otherwise (the default) it is the PyTorch grid.
    """
    tcnn_ok = fast_paths and (device is None or torch.device(device).type == "cuda")
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoding = encoding_from_config(cfg.encoding, cfg.grid_scale, prefer_tcnn=tcnn_ok)
        grid = make_tet_grid(cfg.grid_resolution, cfg.grid_scale)
        fc = cfg.field
        field = ExpressionField(grid, encoding, n_expressions, latent_dim=fc.latent_dim, d_model=fc.d_model,
                                n_layers=fc.n_layers, n_heads=fc.n_heads, deform_scale=fc.deform_scale,
                                generator=gen)
    return field if device is None else field.to(device)

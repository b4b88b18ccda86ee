"""The triangle mesh type shared by every stage."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Mesh:
    """A triangle mesh as tensors.

    ``vertices`` is float ``[V, 3]`` (may carry gradients back to whatever produced it),
    ``faces`` is int64 ``[F, 3]`` with counter-clockwise winding seen from outside, so
    face normals point out of the surface.
    """

    vertices: torch.Tensor
    faces: torch.Tensor

    @property
    def device(self) -> torch.device:
        return self.vertices.device

    def face_normals(self, normalize: bool = True) -> torch.Tensor:
        v0, v1, v2 = (self.vertices[self.faces[:, i]] for i in range(3))
        n = torch.cross(v1 - v0, v2 - v0, dim=-1)
        return torch.nn.functional.normalize(n, dim=-1, eps=1e-20) if normalize else n

    def vertex_normals(self) -> torch.Tensor:
        """Area-weighted vertex normals (unnormalised face normals summed per vertex)."""
        fn = self.face_normals(normalize=False)
        vn = torch.zeros_like(self.vertices)
        for i in range(3):
            vn = vn.index_add(0, self.faces[:, i], fn)
        return torch.nn.functional.normalize(vn, dim=-1, eps=1e-20)

    def to(self, device: torch.device | str) -> "Mesh":
        return Mesh(self.vertices.to(device), self.faces.to(device))

    def cpu(self) -> "Mesh":
        return Mesh(self.vertices.cpu(), self.faces.cpu())

    def detach(self) -> "Mesh":
        return Mesh(self.vertices.detach(), self.faces)

"""Claims about choosing a rasteriser backend, and the nvdiffrast adapter's conventions."""

import importlib.machinery
import sys
import types

import pytest
import torch
import trimesh

from idto3d.core.errors import IdtoError
from idto3d.render import (
    Mesh, NvdiffrastRasterizer, TorchRasterizer, antialias, available_backends, get_rasterizer, interpolate,
    orbit_camera, rasterize, render_normal_map,
)
from idto3d.render.fragments import Fragments

needs_no_nvdiffrast = pytest.mark.skipif("nvdiffrast" in available_backends(), reason="nvdiffrast is usable here")


def test_the_torch_backend_is_always_available():
    assert "torch" in available_backends()
    assert isinstance(get_rasterizer("torch"), TorchRasterizer)


def test_auto_on_cpu_gives_the_torch_backend():
    assert isinstance(get_rasterizer("auto", device="cpu"), TorchRasterizer)
    assert get_rasterizer("auto", device=torch.device("cpu")).name == "torch"


@needs_no_nvdiffrast
def test_requesting_nvdiffrast_without_it_raises_a_clear_idto_error():
    with pytest.raises(IdtoError, match="nvdiffrast"):
        get_rasterizer("nvdiffrast")


def test_unknown_backend_name_raises_idto_error():
    with pytest.raises(IdtoError, match="unknown rasterizer"):
        get_rasterizer("opengl")


# --- A stand-in for nvdiffrast.torch with nvdiffrast's documented conventions ---------------
# rast[..., 0:2] = (u, v) weighting vertices 0 and 1 (vertex 2 gets 1 - u - v), rast[..., 2] = z/w,
# rast[..., 3] = triangle_id + 1 (0 = background), image row 0 = the BOTTOM (y_ndc = -1);
# positions float32, triangles int32. Built on our rasteriser, it checks that the adapter
# converts these conventions exactly back into ours.

def _fragments_from_rast(rast: torch.Tensor) -> Fragments:
    top = rast.flip(1)
    tid = top[..., 3].long() - 1
    mask = (tid >= 0).unsqueeze(-1)
    u, v = top[..., 0], top[..., 1]
    bary = torch.stack([u, v, 1 - u - v], -1) * mask
    return Fragments(tid, bary, torch.where(mask[..., 0], top[..., 2], torch.full_like(u, float("inf"))))


def _fake_nvdiffrast_module() -> types.ModuleType:
    dr = types.ModuleType("nvdiffrast.torch")

    class RasterizeCudaContext:
        def __init__(self, device=None):
            self.device = device

    def rasterize_(glctx, pos, tri, resolution, ranges=None, grad_db=True):
        assert isinstance(glctx, RasterizeCudaContext)
        assert pos.dtype == torch.float32 and pos.dim() == 3 and tri.dtype == torch.int32
        frags = rasterize(pos, tri.long(), tuple(resolution))
        mask = frags.mask
        rast = torch.stack(
            [frags.bary[..., 0], frags.bary[..., 1], torch.where(mask, frags.depth, torch.zeros_like(frags.depth)),
             (frags.triangle_id + 1).to(pos.dtype)], -1)
        return rast.flip(1), torch.zeros_like(rast)

    def interpolate_(attr, rast, tri, rast_db=None, diff_attrs=None):
        assert tri.dtype == torch.int32
        out = interpolate(attr, _fragments_from_rast(rast), tri.long())
        return out.flip(1), None

    def antialias_(color, rast, pos, tri, topology_hash=None, pos_gradient_boost=1.0):
        assert topology_hash == ("hash", tri.shape[0])
        return antialias(color.flip(1), _fragments_from_rast(rast), pos, tri.long()).flip(1)

    dr.RasterizeCudaContext = RasterizeCudaContext
    dr.rasterize = rasterize_
    dr.interpolate = interpolate_
    dr.antialias = antialias_
    dr.antialias_construct_topology_hash = lambda tri: ("hash", tri.shape[0])
    return dr


@pytest.fixture
def fake_nvdiffrast(monkeypatch):
    package = types.ModuleType("nvdiffrast")
    package.__spec__ = importlib.machinery.ModuleSpec("nvdiffrast", None)
    package.torch = _fake_nvdiffrast_module()
    monkeypatch.setitem(sys.modules, "nvdiffrast", package)
    monkeypatch.setitem(sys.modules, "nvdiffrast.torch", package.torch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    return package.torch


def test_auto_prefers_nvdiffrast_for_cuda_devices_when_it_imports(fake_nvdiffrast):
    assert available_backends() == ["torch", "nvdiffrast"]
    assert isinstance(get_rasterizer("auto", device="cuda"), NvdiffrastRasterizer)
    assert isinstance(get_rasterizer("auto", device="cpu"), TorchRasterizer)


def test_the_nvdiffrast_adapter_reproduces_the_torch_backend(fake_nvdiffrast):
    ico = trimesh.creation.icosphere(subdivisions=2, radius=0.7)
    mesh = Mesh(torch.tensor(ico.vertices, dtype=torch.float32), torch.tensor(ico.faces, dtype=torch.int64))
    camera = orbit_camera([10.0, -20.0], [30.0, 150.0], 3.0, 40.0)
    nv = NvdiffrastRasterizer(device="cpu")

    results, grads = [], []
    for rasterizer in (TorchRasterizer(), nv):
        verts = (mesh.vertices + torch.tensor([0.1, -0.2, 0.0])).requires_grad_(True)
        render = render_normal_map(Mesh(verts, mesh.faces), camera, (24, 40), rasterizer=rasterizer)
        (render.image * torch.linspace(0, 1, render.image.numel()).view_as(render.image)).sum().backward()
        results.append(render)
        grads.append(verts.grad)
    ours, theirs = results
    assert torch.equal(ours.fragments.triangle_id, theirs.fragments.triangle_id)
    assert torch.allclose(ours.fragments.bary, theirs.fragments.bary, atol=1e-6)
    assert torch.allclose(ours.fragments.depth, theirs.fragments.depth)
    assert torch.allclose(ours.image, theirs.image, atol=1e-6)
    assert torch.allclose(ours.mask, theirs.mask, atol=1e-6)
    assert torch.allclose(grads[0], grads[1], atol=1e-5)

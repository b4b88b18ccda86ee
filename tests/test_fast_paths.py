"""The opt-in fast paths (nvdiffrast, tiny-cuda-nn) and the device-aware offline steps.

On every machine: the defaults are the PyTorch paths, the fast paths fall back (or fail clearly) where their
packages are missing, a checkpoint of one hash-grid implementation is refused by the other with a message naming
``runtime.fast_paths``, and each offline step given ``device='cpu'`` gives exactly what it gave before, reading
from the device only every ``log_every`` steps. Where CUDA and the packages are present, the fast paths are
compared with the PyTorch reference, and the offline steps run on the GPU without per-step host syncs.
"""

from __future__ import annotations

import importlib.machinery
import sys
import types
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from torch import nn

import idto3d.nn.encoding as encoding_mod
import idto3d.render.backend as backend_mod
from idto3d.core.config import EncodingConfig, PhotoTextureConfig, TextureConfig, load_config
from idto3d.core.errors import IdtoError
from idto3d.texture.uv_atlas import shared_atlas
from idto3d.nn.encoding import (
    DenseGridEncoding, HashGridEncoding, TcnnHashGridEncoding, check_encoding_state, encoding_from_config,
    make_encoding, state_encoding_implementation, tcnn_available,
)
from idto3d.geometry.expression_field import build_field
from idto3d.nn.state import cpu_state_dict, load_field_state
from idto3d.geometry.template import build_head_template
from idto3d.geometry.template_fit import fit_field_to_mesh
from idto3d.stages.export_stage import baked_maps
from idto3d.stages.initial_geometry import ensure_init
from idto3d.render import Mesh, orbit_camera, render_normal_map
from idto3d.render.albedo import render_albedo
from idto3d.render.backend import NvdiffrastRasterizer, TorchRasterizer, available_backends, get_rasterizer
from idto3d.core.device import rasterizer_name
from idto3d.texture.texture_field import build_texture_field
from idto3d.texture.photo_texture import PhotoView, fit_photo_texture
from idto3d.texture.texels import TexelMap, scatter_texels, texel_map

SMALL_HASH = dict(n_levels=4, n_features_per_level=2, log2_hashmap_size=10, base_resolution=4,
                  max_resolution=32, bound=0.8)
# The preview preset with a tiny grid and few steps: what ensure_init / the template fit run, in a few seconds.
# 80 steps: the fewest at which both expressions have a surface (a fit with none is an error, never saved).
FAST = ["template.iterations=80", "template.points_per_step=500", "template.build_resolution=32",
        "geometry.grid_resolution=16", "expressions=[neutral, smile]"]
_TEX_CFG = TextureConfig(encoding=EncodingConfig(kind="dense", n_levels=3, n_features_per_level=4,
                                                 base_resolution=8, max_resolution=32))

has_cuda = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not has_cuda, reason="needs a CUDA device (none here)")
needs_nvdiffrast = pytest.mark.skipif(
    "nvdiffrast" not in available_backends(),
    reason="needs CUDA and nvdiffrast (pip install git+https://github.com/NVlabs/nvdiffrast); not both here")
needs_tcnn = pytest.mark.skipif(
    not tcnn_available(),
    reason="needs CUDA and tinycudann (pip install git+https://github.com/NVlabs/tiny-cuda-nn#subdirectory="
           "bindings/torch); not both here")


# ---------------------------------------------------------------- stand-ins for the packages (CPU tests)


class _FakeTcnnEncoding(nn.Module):
    """tinycudann.Encoding's parameter layout (one flat ``params`` vector); enough to build and save a field."""

    def __init__(self, n_input_dims, encoding_config, seed=1337, dtype=None):  # noqa: ANN001
        super().__init__()
        n = encoding_config["n_levels"] * encoding_config["n_features_per_level"]
        self.n_output_dims = n
        self.params = nn.Parameter(torch.zeros(64 * n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1].expand(-1, self.n_output_dims) * self.params[: self.n_output_dims]


@pytest.fixture
def fake_tcnn(monkeypatch):
    """tinycudann "importable with CUDA": the factory's choice, without the package or a GPU."""
    module = types.ModuleType("tinycudann")
    module.Encoding = _FakeTcnnEncoding
    monkeypatch.setitem(sys.modules, "tinycudann", module)
    monkeypatch.setattr(encoding_mod, "tcnn_available", lambda: True)
    return module


@pytest.fixture
def fake_nvdiffrast(monkeypatch):
    """nvdiffrast importable and CUDA present, as far as choosing a backend can tell."""
    package = types.ModuleType("nvdiffrast")
    package.__spec__ = importlib.machinery.ModuleSpec("nvdiffrast", None)
    dr = types.ModuleType("nvdiffrast.torch")
    dr.RasterizeCudaContext = lambda device=None: ("context", device)
    package.torch = dr
    monkeypatch.setitem(sys.modules, "nvdiffrast", package)
    monkeypatch.setitem(sys.modules, "nvdiffrast.torch", dr)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


# ---------------------------------------------------------------- defaults and fall-backs


def test_the_default_rasteriser_is_the_torch_one_even_where_nvdiffrast_imports(fake_nvdiffrast):
    assert isinstance(get_rasterizer(rasterizer_name("auto", False), "cpu"), TorchRasterizer)
    assert isinstance(get_rasterizer(rasterizer_name("auto", False), "cuda"), TorchRasterizer)
    # Only with fast paths on does "auto" take nvdiffrast for a CUDA device (never for a CPU one).
    assert isinstance(get_rasterizer(rasterizer_name("auto", True), "cuda"), NvdiffrastRasterizer)
    assert isinstance(get_rasterizer(rasterizer_name("auto", True), "cpu"), TorchRasterizer)
    assert rasterizer_name("torch", True) == "torch"
    # Asked for by name, it still needs the meshes on a CUDA device.
    assert isinstance(get_rasterizer("nvdiffrast", "cuda"), NvdiffrastRasterizer)
    with pytest.raises(IdtoError, match="CUDA devices only.*cpu.*render.backend to torch"):
        get_rasterizer("nvdiffrast", "cpu")


def test_fast_paths_without_nvdiffrast_fall_back_to_torch_and_asking_for_it_fails_clearly(monkeypatch):
    monkeypatch.setitem(sys.modules, "nvdiffrast", None)  # import nvdiffrast -> ImportError
    monkeypatch.setitem(sys.modules, "nvdiffrast.torch", None)
    monkeypatch.setattr(backend_mod, "_nvdiffrast_importable", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # even with a GPU
    assert available_backends() == ["torch"]
    assert isinstance(get_rasterizer(rasterizer_name("auto", True), "cuda"), TorchRasterizer)
    with pytest.raises(IdtoError, match="nvdiffrast.*not installed.*'torch' backend"):
        get_rasterizer(rasterizer_name("nvdiffrast", True), "cuda")


def test_the_hash_grid_is_the_torch_one_unless_fast_paths_ask_for_tiny_cuda_nn(fake_tcnn):
    cfg = load_config("preview", None, FAST + ["geometry.encoding.kind=hash", "texture.encoding.kind=hash",
                                               "geometry.encoding.log2_hashmap_size=10",
                                               "texture.encoding.log2_hashmap_size=10"])
    assert type(make_encoding("hash", **SMALL_HASH)) is HashGridEncoding
    assert type(encoding_from_config(cfg.geometry.encoding, 1.0)) is HashGridEncoding
    assert type(build_field(cfg.geometry, 2).encoding) is HashGridEncoding
    assert type(build_texture_field(cfg.texture, 2).encoding) is HashGridEncoding
    # Asked for, tiny-cuda-nn is used, but only for a field meant for a CUDA device.
    assert type(make_encoding("hash", prefer_tcnn=True, **SMALL_HASH)) is TcnnHashGridEncoding
    assert type(build_field(cfg.geometry, 2, fast_paths=True).encoding) is TcnnHashGridEncoding
    assert type(build_field(cfg.geometry, 2, fast_paths=True, device="cpu").encoding) is HashGridEncoding
    assert type(build_texture_field(cfg.texture, 2, fast_paths=True).encoding) is TcnnHashGridEncoding
    assert type(build_texture_field(cfg.texture, 2, fast_paths=True, device="cpu").encoding) is HashGridEncoding
    # The dense grid has no fast path.
    assert type(build_field(load_config("preview", None, FAST).geometry, 2, fast_paths=True).encoding) \
        is DenseGridEncoding


def test_fast_paths_without_tiny_cuda_nn_build_the_torch_grid(monkeypatch):
    monkeypatch.setattr(encoding_mod, "tcnn_available", lambda: False)
    cfg = load_config("preview", None, FAST + ["geometry.encoding.kind=hash", "geometry.encoding.log2_hashmap_size=10"])
    assert type(build_field(cfg.geometry, 1, fast_paths=True).encoding) is HashGridEncoding
    assert type(make_encoding("hash", prefer_tcnn=True, **SMALL_HASH)) is HashGridEncoding


# ---------------------------------------------------------------- checkpoints of the two grids


def test_a_checkpoint_of_one_hash_grid_is_refused_by_the_other_with_the_fix(fake_tcnn):
    cfg = load_config("preview", None, FAST + ["geometry.encoding.kind=hash", "geometry.encoding.log2_hashmap_size=10"])
    ours, theirs = build_field(cfg.geometry, 2), build_field(cfg.geometry, 2, fast_paths=True)
    assert state_encoding_implementation(ours.state_dict()) == "hash"
    assert state_encoding_implementation(theirs.state_dict()) == "tcnn-hash"
    with pytest.raises(IdtoError, match=r"init\.pt was saved with tiny-cuda-nn.*runtime\.fast_paths=true"):
        load_field_state(ours, theirs.state_dict(), "run/geometry/init.pt")
    with pytest.raises(IdtoError, match=r"saved with the PyTorch hash grid.*runtime\.fast_paths=false"):
        load_field_state(theirs, ours.state_dict(), "run/geometry/init.pt")
    # The same implementation loads (from any device's tensors), and nothing about it changed.
    other = build_field(cfg.geometry, 2, seed=7)
    load_field_state(other, cpu_state_dict(ours), "init.pt")
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), ours.state_dict().values()))


def test_a_checkpoint_of_the_other_encoding_kind_says_the_config_differs():
    dense = build_field(load_config("preview", None, FAST).geometry, 1)
    hashed = build_field(load_config("preview", None, FAST + ["geometry.encoding.kind=hash",
                                                             "geometry.encoding.log2_hashmap_size=10"]).geometry, 1)
    assert state_encoding_implementation(dense.state_dict()) == "dense"
    with pytest.raises(IdtoError, match="encoding.kind differs"):
        check_encoding_state(hashed.encoding, dense.state_dict(), "init.pt")


def test_ensure_init_refuses_a_tiny_cuda_nn_checkpoint_on_the_torch_path(tmp_path, fake_tcnn):
    cfg = load_config("preview", None, FAST + ["geometry.encoding.kind=hash", "geometry.encoding.log2_hashmap_size=10"])
    ensure_init(tmp_path, cfg, progress=False)
    path = tmp_path / "geometry" / "init.pt"
    state = torch.load(path, weights_only=True)
    state["field"] = cpu_state_dict(build_field(cfg.geometry, 2, fast_paths=True))  # as a CUDA run would save
    torch.save(state, path)
    with pytest.raises(IdtoError, match="tiny-cuda-nn.*runtime.fast_paths"):
        ensure_init(tmp_path, cfg, progress=False)


# ---------------------------------------------------------------- the offline steps on an explicit device


class _HostReads:
    """Counts host reads of tensors (``.item()``, ``float()``, ``bool()``, ``.tolist()``, ...) made by code in
    ``filename``: on a GPU each one waits for the device. Torch's own internals are not counted."""

    NAMES = ("item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__")

    def __init__(self, monkeypatch, filename: str):
        self.count = 0
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def counted(self_, *args, _original=original, **kwargs):
                if sys._getframe(1).f_code.co_filename == filename:
                    self.count += 1
                return _original(self_, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)


def _reads_per_run(reads: _HostReads, cadences: tuple, lengths: tuple, run) -> dict:
    """Host reads counted during ``run(iterations, log_every)`` for each cadence and run length."""
    counts = {}
    for log_every in cadences:
        for iterations in lengths:
            before = reads.count
            run(iterations, log_every)
            counts[log_every, iterations] = reads.count - before
    return counts


def _template_fit(cfg, iterations: int, log_every: int = 10, device=None, steps: list | None = None):
    cfg.template.iterations = iterations
    field = build_field(cfg.geometry, 2, seed=0)
    report = fit_field_to_mesh(field, build_head_template(32), cfg.template, seed=0, device=device,
                               log_every=log_every, on_step=None if steps is None else
                               lambda s, loss: steps.append((s, loss)))
    return field, report


def test_template_fit_on_an_explicit_cpu_device_is_the_same_fit_whatever_the_log_cadence():
    cfg = load_config("preview", None, FAST)
    field0, report0 = _template_fit(cfg, 20, log_every=1)  # the loss read every step, as before
    steps: list = []
    field1, report1 = _template_fit(cfg, 20, log_every=7, device="cpu", steps=steps)
    assert report1.losses == report0.losses and report1.chamfer == report0.chamfer
    assert all(torch.equal(a, b) for a, b in zip(field0.state_dict().values(), field1.state_dict().values()))
    # Called after every step; the loss is the latest read (steps 0, 7, 14 and the last).
    assert [s for s, _ in steps] == list(range(20))
    reads = {0: 0, 6: 0, 7: 7, 13: 7, 14: 14, 18: 14, 19: 19}
    assert all(steps[s][1] == report1.losses[r] for s, r in reads.items())
    assert field1.grid_vertices.device.type == "cpu"


def test_template_fit_reads_the_loss_from_the_device_only_every_log_every_steps(monkeypatch):
    import idto3d.geometry.template_fit as module

    cfg = load_config("preview", None, FAST)
    counts = _reads_per_run(_HostReads(monkeypatch, module.__file__), (1, 10), (20, 40),
                            lambda n, every: _template_fit(cfg, n, log_every=every, steps=[]))
    assert counts[1, 40] - counts[1, 20] == 20  # the counter sees a read per step when asked for one
    assert counts[10, 40] - counts[10, 20] == 2  # steps 20 and 30: nothing else per step


@dataclass
class _Surface:
    mesh: Mesh
    uv: torch.Tensor
    attribute_faces: torch.Tensor
    texels: TexelMap


@pytest.fixture(scope="module")
def photo_setup():
    """The built-in head at 24 and a front "photo" of it wearing a smooth colour pattern; its landmarks span the
    frame (an ellipse in dlib's point order), so the face region is the whole view."""
    atlas = shared_atlas([build_head_template(24)])[0]
    welded, uv, faces = atlas.render_inputs()
    surface = _Surface(welded, uv, faces, texel_map(atlas, 64))
    x, y, z = surface.texels.points.unbind(-1)
    colours = torch.stack([0.6 + 0.25 * torch.sin(5 * x + 1), 0.45 + 0.2 * torch.cos(4 * y),
                           0.35 + 0.2 * torch.sin(3 * x + 4 * y + 2 * z)], -1)
    h, w = 96, 84
    cam = orbit_camera(5.0, 0.0, 3.0, 26.0, aspect=w / h)
    img = render_albedo(welded, cam, (h, w), uv=uv, texture=scatter_texels(colours, surface.texels),
                        attribute_faces=faces, background=0.2).image[0]
    t = np.linspace(0.0, 2 * np.pi, 68, endpoint=False)
    angle = np.pi / 2 + (t - t[8])
    landmarks = np.stack([w / 2 + 0.47 * w * np.cos(angle), h / 2 + 0.47 * h * np.sin(angle)], 1)
    return surface, [PhotoView((img.clamp(0, 1) * 255 + 0.5).to(torch.uint8).numpy(), cam, landmarks)]


def _photo_fit(photo_setup, iterations: int, log_every: int = 10, device=None, steps: list | None = None):
    surface, views = photo_setup
    cfg = PhotoTextureConfig(iterations=iterations, resolution=64, fill_texels=128)
    field = build_texture_field(_TEX_CFG, 2, seed=3)
    report = fit_photo_texture(field, 1, surface, views, cfg, seed=5, device=device, log_every=log_every,
                               progress=None if steps is None else lambda s, loss: steps.append((s, loss)))
    return field, report


def test_photo_texture_on_an_explicit_cpu_device_is_the_same_fit_whatever_the_log_cadence(photo_setup):
    field0, report0 = _photo_fit(photo_setup, 9, log_every=1, steps=(steps0 := []))
    field1, report1 = _photo_fit(photo_setup, 9, log_every=4, device="cpu", steps=(steps1 := []))
    assert all(torch.equal(a, b) for a, b in zip(field0.state_dict().values(), field1.state_dict().values()))
    assert (report1.seen_fraction, report1.skin_tone, report1.photometric_rmse) == \
        (report0.seen_fraction, report0.skin_tone, report0.photometric_rmse)
    assert [s for s, _ in steps1] == list(range(1, 10))
    # Reads after steps 1, 5 and 9 (the last); between them the latest read repeats.
    expected = [steps0[0][1]] * 4 + [steps0[4][1]] * 4 + [steps0[8][1]]
    assert [loss for _, loss in steps1] == expected


def test_photo_texture_reads_the_loss_from_the_device_only_every_log_every_steps(photo_setup, monkeypatch):
    import idto3d.texture.photo_texture as module

    counts = _reads_per_run(_HostReads(monkeypatch, module.__file__), (1, 4), (8, 16),
                            lambda n, every: _photo_fit(photo_setup, n, log_every=every, steps=[]))
    assert counts[1, 16] - counts[1, 8] == 8
    assert counts[4, 16] - counts[4, 8] == 2  # after steps 9 and 13


def test_bad_log_every_is_refused(photo_setup):
    with pytest.raises(IdtoError, match="log_every"):
        _photo_fit(photo_setup, 2, log_every=0)
    with pytest.raises(ValueError, match="log_every"):
        _template_fit(load_config("preview", None, FAST), 2, log_every=0)


def test_ensure_init_on_an_explicit_cpu_device_fits_and_reloads_the_same_field(tmp_path):
    cfg = load_config("preview", None, FAST)
    default = ensure_init(tmp_path / "a", cfg, progress=False)
    explicit = ensure_init(tmp_path / "b", cfg, progress=False, device="cpu")
    reloaded = ensure_init(tmp_path / "b", cfg, progress=False, device=torch.device("cpu"))
    for other in (explicit, reloaded):
        assert all(torch.equal(a, b) for a, b in zip(default.state_dict().values(), other.state_dict().values()))
    state = torch.load(tmp_path / "b" / "geometry" / "init.pt", weights_only=True)  # no map_location needed
    assert all(v.device.type == "cpu" for v in state["field"].values())


def test_baked_maps_are_the_fields_bake_on_the_host(photo_setup):
    surface, _ = photo_setup
    field = build_texture_field(_TEX_CFG, 2, seed=3)
    with torch.no_grad():
        field.codes.normal_(generator=torch.Generator().manual_seed(0))
    atlas = shared_atlas([build_head_template(24)])[0]
    maps = baked_maps(field, 1, atlas, 32)
    with torch.no_grad():
        direct = field.bake(1, texel_map(atlas, 32))
    assert np.array_equal(maps.albedo, direct["albedo"].numpy())
    assert np.array_equal(maps.roughness, direct["roughness"][..., 0].numpy())
    assert np.array_equal(maps.metallic, direct["metallic"][..., 0].numpy())


def test_cpu_state_dict_holds_the_same_tensors_on_the_host():
    field = build_texture_field(_TEX_CFG, 1, seed=0)
    state = cpu_state_dict(field)
    assert list(state) == list(field.state_dict())
    assert all(v.device.type == "cpu" and torch.equal(v, field.state_dict()[k]) for k, v in state.items())


# ---------------------------------------------------------------- on a CUDA device (skipped here)


@needs_cuda
def test_template_fit_on_cuda_matches_the_cpu_fit_and_does_not_sync_per_step():
    cfg = load_config("preview", None, FAST)
    _, cpu = _template_fit(cfg, 20)
    field, gpu = _template_fit(cfg, 20, device="cuda")
    assert field.grid_vertices.is_cuda and next(field.parameters()).is_cuda
    np.testing.assert_allclose(gpu.losses, cpu.losses, rtol=1e-2)
    syncs = {}
    for iterations in (20, 40):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                _template_fit(cfg, iterations, device="cuda", steps=[])
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs[iterations] = sum("synchroniz" in str(w.message) for w in caught)
    assert syncs[40] - syncs[20] <= 4, syncs  # 2 loss reads (steps 20, 30); a per-step sync would add 20


@needs_cuda
def test_photo_texture_and_baking_on_cuda_match_the_cpu(photo_setup):
    cpu_field, cpu = _photo_fit(photo_setup, 12)
    gpu_field, gpu = _photo_fit(photo_setup, 12, device="cuda")
    assert gpu_field.codes.is_cuda
    assert gpu.seen_fraction == cpu.seen_fraction
    assert gpu.photometric_rmse == pytest.approx(cpu.photometric_rmse, rel=0.05)
    atlas = shared_atlas([build_head_template(24)])[0]
    a, b = baked_maps(cpu_field, 1, atlas, 32), baked_maps(gpu_field, 1, atlas, 32)
    np.testing.assert_allclose(b.albedo, a.albedo, atol=5e-3)


# ---------------------------------------------------------------- nvdiffrast vs the torch rasteriser


def _icosphere(subdivisions: int = 2) -> Mesh:
    ico = trimesh.creation.icosphere(subdivisions=subdivisions, radius=0.7)
    return Mesh(torch.tensor(ico.vertices, dtype=torch.float32), torch.tensor(ico.faces, dtype=torch.int64))


def _near_an_edge(frags, eps: float = 0.02) -> torch.Tensor:
    """Covered pixels whose centre lies within ``eps`` (barycentric) of their triangle's edge. nvdiffrast decides
    coverage on vertices snapped to 1/16 pixel (its barycentrics are exact, from the unsnapped vertices), so near an
    edge either triangle may own a pixel, and its barycentrics there are clamped to [0, 1]."""
    return frags.mask & (frags.bary.amin(-1) < eps)


def _silhouette_band(mask: torch.Tensor, width: int = 1) -> torch.Tensor:
    """Pixels within ``width`` of a change of coverage ``[B, H, W]``."""
    m = mask.float().unsqueeze(1)
    k = 2 * width + 1
    grown = torch.nn.functional.max_pool2d(m, k, 1, width)
    shrunk = -torch.nn.functional.max_pool2d(-m, k, 1, width)
    return (grown != shrunk).squeeze(1)


@needs_nvdiffrast
@pytest.mark.parametrize("resolution", [(64, 64), (96, 160), (257, 255)])
def test_nvdiffrast_rasterises_like_the_torch_rasteriser(resolution):
    mesh = _icosphere(2).to("cuda")
    camera = orbit_camera([10.0, -35.0], [20.0, 200.0], 2.5, 40.0, aspect=resolution[1] / resolution[0]).to("cuda")
    clip = camera.project(mesh.vertices)
    ours = TorchRasterizer().rasterize(clip, mesh.faces, resolution)
    theirs = NvdiffrastRasterizer("cuda").rasterize(clip, mesh.faces, resolution)
    covered = ours.mask | theirs.mask
    differ = (ours.triangle_id != theirs.triangle_id) & covered
    assert float(differ[covered].float().mean()) < 0.02
    # Every disagreement is a pixel centre on an edge (a shared one, or the silhouette): background bary is 0.
    closeness = torch.minimum(ours.bary.amin(-1), theirs.bary.amin(-1))
    assert bool((closeness[differ] < 0.05).all())
    interior = ours.mask & ~differ & ~_near_an_edge(ours) & ~_near_an_edge(theirs)
    assert float(interior.float().sum()) > 0.7 * float(ours.mask.float().sum())
    torch.testing.assert_close(theirs.bary[interior], ours.bary[interior], atol=1e-4, rtol=0)
    torch.testing.assert_close(theirs.depth[interior], ours.depth[interior], atol=1e-5, rtol=0)
    # Interpolation of the same attributes through each backend's own fragments.
    attrs = torch.cat([mesh.vertices, mesh.vertex_normals()], 1)
    a = TorchRasterizer().interpolate(attrs, ours, mesh.faces)
    b = NvdiffrastRasterizer("cuda").interpolate(attrs, theirs, mesh.faces)
    torch.testing.assert_close(b[interior], a[interior], atol=1e-4, rtol=0)


@needs_nvdiffrast
def test_nvdiffrast_antialiases_like_the_torch_rasteriser_on_a_coarse_mesh():
    # Coarse triangles: every silhouette pixel's own triangle carries the silhouette edge, where the torch
    # antialias is nvdiffrast's method exactly (its multi-hop search only matters for sub-pixel triangles).
    mesh = _icosphere(1).to("cuda")
    camera = orbit_camera([15.0], [30.0], 2.5, 40.0).to("cuda")
    clip = camera.project(mesh.vertices)
    renders = []
    for r in (TorchRasterizer(), NvdiffrastRasterizer("cuda")):
        frags = r.rasterize(clip, mesh.faces, 128)
        colour = torch.cat([r.interpolate(mesh.vertices * 0.5 + 0.5, frags, mesh.faces),
                            frags.mask.unsqueeze(-1).float()], -1)
        renders.append((frags, r.antialias(colour, frags, clip, mesh.faces)))
    (f0, a), (f1, b) = renders
    band = _silhouette_band(f0.mask | f1.mask, 1)
    inside = ~band & ~_near_an_edge(f0) & ~_near_an_edge(f1) & (f0.triangle_id == f1.triangle_id)
    torch.testing.assert_close(b[inside], a[inside], atol=1e-4, rtol=0)
    coverage_a, coverage_b = a[..., 3].sum(), b[..., 3].sum()
    assert abs(float(coverage_a - coverage_b)) < 0.01 * float(coverage_a)
    assert float((a[..., 3] - b[..., 3]).abs()[band].mean()) < 0.05


@needs_nvdiffrast
def test_nvdiffrast_renders_the_head_templates_normal_map_like_the_torch_rasteriser():
    head = build_head_template(64).to("cuda")
    camera = orbit_camera([5.0, 10.0, 0.0], [0.0, 60.0, 180.0], 3.0, 40.0).to("cuda")
    ours = render_normal_map(head, camera, 256, rasterizer=TorchRasterizer())
    theirs = render_normal_map(head, camera, 256, rasterizer=NvdiffrastRasterizer("cuda"))
    f0, f1 = ours.fragments, theirs.fragments
    covered = f0.mask | f1.mask
    differ = (f0.triangle_id != f1.triangle_id) & covered
    assert float(differ[covered].float().mean()) < 0.05  # pixel centres on (snapped) triangle edges
    # Silhouettes are left out: there the torch antialias also finds sub-pixel silhouette triangles.
    keep = ~_silhouette_band(covered, 2) & covered & ~differ & ~_near_an_edge(f0) & ~_near_an_edge(f1)
    assert float(keep.float().sum()) > 0.6 * float(covered.float().sum())
    torch.testing.assert_close(theirs.image[keep], ours.image[keep], atol=1e-3, rtol=0)
    torch.testing.assert_close(theirs.mask[keep], ours.mask[keep], atol=1e-5, rtol=0)
    # Smooth normals are continuous across shared edges, so away from silhouettes the images agree everywhere.
    inner = ~_silhouette_band(covered, 2) & covered
    assert float((theirs.image - ours.image).abs()[inner].mean()) < 2e-3


# ---------------------------------------------------------------- tiny-cuda-nn vs the torch hash grid


def _smooth_target(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(3 * x[:, :1]) * torch.cos(2 * x[:, 1:2]) + x[:, 2:] ** 2


def _fit_on_cuda(encoding: nn.Module, steps: int = 300, lr: float = 3e-2) -> tuple[float, float]:
    """Held-out MSE of encoding + linear head on ``_smooth_target`` before and after ``steps`` Adam steps."""
    gen = torch.Generator().manual_seed(0)
    head = nn.Linear(encoding.output_dim, 1, device="cuda")
    bound = encoding.bound
    test_x = ((torch.rand(4096, 3, generator=gen) * 2 - 1) * bound).cuda()

    def mse() -> float:
        with torch.no_grad():
            return float(((head(encoding(test_x)) - _smooth_target(test_x)) ** 2).mean())

    before = mse()
    opt = torch.optim.Adam([*encoding.parameters(), *head.parameters()], lr=lr)
    for _ in range(steps):
        x = ((torch.rand(4096, 3, generator=gen) * 2 - 1) * bound).cuda()
        loss = ((head(encoding(x)) - _smooth_target(x)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return before, mse()


@needs_tcnn
def test_tcnn_hash_grid_outputs_and_gradients_match_the_torch_grids_shape():
    torch.manual_seed(0)
    ours = HashGridEncoding(**SMALL_HASH).cuda()
    theirs = make_encoding("hash", prefer_tcnn=True, **SMALL_HASH)
    assert isinstance(theirs, TcnnHashGridEncoding)
    x = ((torch.rand(1000, 3) * 2 - 1) * 0.8).cuda()
    a, b = ours(x), theirs(x)
    assert a.shape == b.shape == (1000, ours.output_dim) and a.dtype == b.dtype == torch.float32
    params = list(theirs.parameters())
    assert params and all(p.dtype == torch.float32 and p.is_cuda for p in params)
    (b * torch.linspace(-1, 1, b.shape[1], device="cuda")).sum().backward()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in params)


@needs_tcnn
def test_tcnn_and_torch_hash_grids_fit_a_smooth_function_to_a_similar_error():
    torch.manual_seed(0)
    before_a, after_a = _fit_on_cuda(HashGridEncoding(**SMALL_HASH).cuda())
    before_b, after_b = _fit_on_cuda(make_encoding("hash", prefer_tcnn=True, **SMALL_HASH))
    assert after_a < before_a / 10 and after_b < before_b / 10, (before_a, after_a, before_b, after_b)
    assert after_b < 3 * after_a and after_a < 3 * after_b, (after_a, after_b)


@needs_tcnn
def test_a_tcnn_field_trains_on_cuda_and_its_checkpoint_is_refused_by_the_torch_path():
    cfg = load_config("preview", None, FAST + ["geometry.encoding.kind=hash", "geometry.encoding.log2_hashmap_size=12"])
    field = build_field(cfg.geometry, 2, fast_paths=True, device="cuda")
    assert isinstance(field.encoding, TcnnHashGridEncoding)
    cfg.template.iterations = 30
    report = fit_field_to_mesh(field, build_head_template(32), cfg.template, seed=0)
    assert report.losses[-1] < report.losses[0]
    assert next(field.parameters()).is_cuda and field.encoding.encoding.params.is_cuda
    with pytest.raises(IdtoError, match="runtime.fast_paths"):
        load_field_state(build_field(cfg.geometry, 2), cpu_state_dict(field), Path("init.pt"))

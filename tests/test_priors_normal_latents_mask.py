"""The geometry prior sees normal renders as RGB + coverage (Fantasia3D's downsampled-normal latents: the
normals composited on a white background, resized, in [-1, 1], with the mask as the 4th channel). The mask channel
must reach the latents: in ``downsample_latents``, in both guidances' ``encode``, and from the geometry stage's
renders, whose background is white where the mask is 0.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from idto3d.core.config import GuidanceConfig
from idto3d.priors.guidance import OracleGuidance, SDSGuidance, downsample_latents

from cpu_threads import single_thread  # noqa: F401  (fixture)
from priors_fixtures import isolated_cache, prior, tiny_base  # noqa: F401  (fixtures)


pytestmark = pytest.mark.usefixtures("single_thread")


def _normals_and_coverage(size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit normals facing the camera-ish and a soft coverage (a disc with an antialiased-like rim)."""
    g = torch.Generator().manual_seed(seed)
    n = torch.randn(2, 3, size, size, generator=g)
    n[:, 2] = n[:, 2].abs() + 0.5
    n = torch.nn.functional.normalize(n, dim=1)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    coverage = (1.5 - 2.5 * (xx**2 + yy**2).sqrt()).clamp(0, 1).expand(2, 1, size, size).clone()
    return n, coverage


def _composite_on_white(n: torch.Tensor, coverage: torch.Tensor) -> torch.Tensor:
    """What render_normal_map returns as RGB: (n + 1) / 2 over a white background, by coverage."""
    return (n * 0.5 + 0.5) * coverage + 1.0 * (1 - coverage)


def test_latents_at_the_render_size_are_the_white_composite_and_the_mask_in_minus_one_to_one():
    n, cov = _normals_and_coverage(16)
    rgb = _composite_on_white(n, cov)
    z = downsample_latents(torch.cat([rgb, cov], 1), 16)
    torch.testing.assert_close(z[:, :3], rgb * 2 - 1)
    torch.testing.assert_close(z[:, 3:], cov * 2 - 1, msg=lambda m: f"the mask channel is not latent 4\n{m}")


def test_changing_only_the_mask_changes_only_the_mask_latent():
    n, cov = _normals_and_coverage(64)
    rgb = _composite_on_white(n, cov)
    a = downsample_latents(torch.cat([rgb, cov], 1), 16)
    b = downsample_latents(torch.cat([rgb, cov * 0.5], 1), 16)
    torch.testing.assert_close(a[:, :3], b[:, :3])
    diff = float((a[:, 3] - b[:, 3]).abs().max())
    assert diff > 0.1, f"halving the mask changed the mask latent by at most {diff}: the mask channel is ignored"
    # A uniform mask stays uniform through the resize: latent 4 = 2 m - 1 exactly.
    for m in (0.0, 0.25, 1.0):
        z = downsample_latents(torch.cat([rgb, torch.full_like(cov, m)], 1), 16)
        torch.testing.assert_close(z[:, 3], torch.full_like(z[:, 3], 2 * m - 1),
                                   msg=lambda msg: f"mask {m} everywhere gave another latent 4\n{msg}")


def _mask_sensitivity(encode) -> float:  # noqa: ANN001
    n, cov = _normals_and_coverage(64)
    rgb = _composite_on_white(n, cov)
    with torch.no_grad():
        a = encode(torch.cat([rgb, cov], 1))
        b = encode(torch.cat([rgb, torch.zeros_like(cov)], 1))
    # The same pixels with no coverage: latent 4 must be -1 everywhere.
    torch.testing.assert_close(b[:, 3], torch.full_like(b[:, 3], -1.0),
                               msg=lambda m: f"{encode}: a render with mask 0 does not give latent 4 = -1\n{m}")
    torch.testing.assert_close(a, downsample_latents(torch.cat([rgb, cov], 1), a.shape[-1]),
                               msg=lambda m: f"{encode}: not the downsampled normals + mask\n{m}")
    return float((a - b).abs().max())


def test_the_guidances_encode_downsampled_normals_with_the_mask(prior):  # noqa: F811
    cfg = GuidanceConfig(latent_mode="downsample", latent_size=16)
    # The render's coverage as the 4th channel; by default SDS derives it from the RGB as training does
    # (test_priors_train_base.py::test_sds_sees_an_antialiased_render_as_training_saw_its_png).
    sds = SDSGuidance(prior, dataclasses.replace(cfg, downsample_mask="coverage"), "geometry", 10)
    assert _mask_sensitivity(sds.encode) > 0.5
    oracle = OracleGuidance(torch.ones(1, 4, 64, 64), cfg, "geometry", 10)
    assert _mask_sensitivity(oracle.encode) > 0.5


def test_the_geometry_stage_gives_the_guidance_normals_on_white_plus_the_coverage(tmp_path):
    from geometry_stage_driver import ZeroGuidance, run_geometry, sphere_field, stage_config

    cfg = stage_config(["geometry.iterations=1"])
    seen: list[torch.Tensor] = []

    class Recording(ZeroGuidance):
        def __call__(self, images, cond, step):  # noqa: ANN001
            seen.append(images.detach().clone())
            return super().__call__(images, cond, step)

    gcfg = dataclasses.replace(GuidanceConfig(), latent_mode="downsample", latent_size=16)
    run_geometry(tmp_path / "run", cfg, Recording(torch.ones(1, 4, 64, 64), gcfg, "geometry", 1), sphere_field(cfg))
    assert len(seen) == 1
    images = seen[0]
    assert images.shape[1] == 4, f"the normal prior is given {images.shape[1]} channels, not RGB + coverage"
    rgb, mask = images[:, :3], images[:, 3:]
    assert float(mask.min()) == 0.0 and float(mask.max()) == pytest.approx(1.0), "no background / no surface"
    assert 0.02 < float(mask.mean()) < 0.98
    background = (mask == 0).expand_as(rgb)
    torch.testing.assert_close(rgb[background], torch.ones_like(rgb[background]),
                               msg=lambda m: f"the background (mask 0) is not white\n{m}")
    inside = (mask == 1).expand_as(rgb)
    assert float(rgb[inside].min()) < 0.9, "the covered pixels are white too: no normals drawn"

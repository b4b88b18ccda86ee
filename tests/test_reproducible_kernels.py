"""Bit-for-bit SDS on a multi-core CPU (README "Run folders", "Threads").

The backward of ``x[idx]`` (how every mesh gathers its vertices) accumulates with ``index_put_``; on the CPU,
from 32768 elements up and with more than one thread, torch adds those floats atomically from every thread, so
the sums' last bits follow thread timing. Measured before the fix: two runs of the miniature experiment's oracle
(grid 48) parted in the 7th digit from iteration 17. ``reproducible_kernels`` turns on torch's deterministic
kernels on the CPU while an SDS loop runs.
"""

from __future__ import annotations

import hashlib

import pytest
import torch
from oracle_targets import small_head
from priors_fixtures import isolated_cache, tiny_base  # noqa: F401  (fixtures)

from idto3d.core.config import load_config
from idto3d.core.device import reproducible_kernels, resolve_device
from idto3d.priors.mesh_oracle import MeshOracleGuidance
from idto3d.stages import sds_runner
from idto3d.stages.geometry_stage import run_geometry_stage
from idto3d.stages.initial_geometry import ensure_init
from idto3d.stages.run_folder import prepare_run


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _gather_grad_digest() -> str:
    """The gradient of a gather the size of a grid-48 mesh's face-vertex lookups, as a digest of its bits."""
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(20000, 3, generator=gen, requires_grad=True)
    idx = torch.randint(0, 20000, (400000,), generator=gen)
    weight = torch.randn(400000, 3, generator=gen)
    (v[idx] * weight).sum().backward()
    return hashlib.sha256(v.grad.numpy().tobytes()).hexdigest()


def test_the_gather_backward_is_the_same_every_time_under_reproducible_kernels(two_threads):
    with reproducible_kernels("cpu"):
        digests = {_gather_grad_digest() for _ in range(12)}
    torch.set_num_threads(1)
    serial = _gather_grad_digest()
    assert digests == {serial}  # one answer, and one thread's


def test_reproducible_kernels_restore_the_global_flags_and_leave_other_devices_alone():
    assert not torch.are_deterministic_algorithms_enabled()
    with reproducible_kernels(torch.device("cpu")):
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert not torch.utils.deterministic.fill_uninitialized_memory
    assert not torch.are_deterministic_algorithms_enabled()
    assert torch.utils.deterministic.fill_uninitialized_memory  # torch's default, back
    with reproducible_kernels("cuda"):  # a device name is enough: nothing runs on it
        assert not torch.are_deterministic_algorithms_enabled()
    with pytest.raises(RuntimeError, match="inside"), reproducible_kernels("cpu"):
        raise RuntimeError("inside")
    assert not torch.are_deterministic_algorithms_enabled()


def test_the_sds_loop_runs_with_reproducible_kernels_on_the_cpu(tmp_path, monkeypatch):
    seen = []
    real_loop = sds_runner._loop

    def spy(*args, **kwargs):
        seen.append(torch.are_deterministic_algorithms_enabled())
        return real_loop(*args, **kwargs)

    monkeypatch.setattr(sds_runner, "_loop", spy)
    cfg = load_config("preview", overrides=[
        "geometry.grid_resolution=16", "template.build_resolution=48", "template.iterations=20",
        "template.points_per_step=2000", "render.resolution=32", "prior.guidance.latent_mode=downsample",
        "prior.guidance.latent_size=16", "geometry.iterations=2"])
    guidance = MeshOracleGuidance([small_head()], cfg.render.resolution, cfg.prior.guidance, "geometry",
                                  total_steps=cfg.geometry.iterations, seed=cfg.seed)
    prepare_run(tmp_path, cfg)
    field = ensure_init(tmp_path, cfg, progress=False, device=resolve_device("cpu"))
    run_geometry_stage(tmp_path, cfg, guidance, field, progress=False)
    assert seen == [True]
    assert not torch.are_deterministic_algorithms_enabled()  # and off again afterwards

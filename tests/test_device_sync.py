"""No host round-trips in the SDS stages' inner loop (issue 9): every read of a value that would live on the GPU
(``.item()``, ``float()``, ``bool()``, ``.tolist()``, ``.cpu()``, ``.numpy()``) must come from an allowed place.

This machine has no GPU, so the audit follows the data instead of timing waits: a ``TorchFunctionMode`` marks
the fields' and the prior's parameters and buffers, the stage's device inputs and everything computed from them
("device values"), and records the code location of each read of a device value. Host-side randomness (cameras,
timesteps, lighting draws) is not marked: on a GPU it stays on the host and is copied over asynchronously.
Allowed reads: the step log's periodic flush, the ends of the stage, and the two places whose output sizes depend
on the data by nature (marching tets, the PyTorch rasteriser's binning), where nvdiffrast (``runtime.fast_paths``)
avoids the latter.
"""

from __future__ import annotations

import shutil
import traceback
import weakref
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from idto3d.core.config import load_config
from idto3d.geometry.template import build_head_template
from idto3d.stages.geometry_stage import run_geometry_stage
from idto3d.stages.initial_geometry import ensure_init
from idto3d.stages.run_folder import prepare_run
from idto3d.stages.texture_stage import run_texture_stage
from idto3d.priors.guidance import SDSGuidance
from idto3d.priors.prior import build_prior

from priors_fixtures import isolated_cache, tiny_base  # noqa: F401  (fixtures)

READS = {"item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy", "cpu", "__array__"}
# Ops whose output size depends on the values: the host must wait for them to know how much memory to allocate.
SIZED = {"nonzero", "unique", "unique_consecutive", "masked_select", "argwhere", "bincount", "_unique2"}
INDEXING = {"__getitem__", "__setitem__", "index_put_", "index_put"}
SRC = str(Path(__file__).resolve().parents[1] / "src" / "idto3d")

# Functions run for checkpoints and previews (every checkpoint_every / preview_every steps) and at the end of a
# stage, not every step.
OUTSIDE_LOOP = {"current_meshes", "save_progress", "save_texture_progress", "finished", "save_mesh",
                "cpu_state_dict"}
# (module file, function) pairs allowed to read device values, with the reason.
ALLOWED = {
    ("stages/step_log.py", "flush"),                 # every runtime.log_every steps
    ("<after the loop>", None),
    ("geometry/marching_tets.py", "marching_tets"),    # output size depends on the SDF's signs
    ("geometry/expression_field.py", "forward"),                  # the tets the surface crosses (same reason)
    ("render/rasterize_torch.py", None),               # per-tile binning sizes depend on the triangles
    ("render/antialias_torch.py", None),               # silhouette edge lists depend on the image
    ("geometry/laplacian.py", "mesh_edges"),           # the topology marching tets made this step
    ("render/fragments.py", "checked_faces"),          # bounds of host meshes only (skipped on a GPU)
    ("priors/expression_embeddings.py", None),                   # the expression table: computed once, then memoised
}


class DeviceReadAudit(TorchFunctionMode):
    """Marks device values and records where they are read back to the host."""

    def __init__(self, roots: list[torch.Tensor]) -> None:
        super().__init__()
        self._marked: dict[int, weakref.ref] = {}
        self.reads: Counter = Counter()
        for t in roots:
            self.mark(t)

    def mark(self, t: torch.Tensor) -> None:
        self._marked[id(t)] = weakref.ref(t)

    def marked(self, t: object) -> bool:
        if not isinstance(t, torch.Tensor):
            return False
        ref = self._marked.get(id(t))
        return ref is not None and ref() is t

    def _site(self) -> tuple[str, str]:
        """The innermost idto3d function reading; reads made for previews and results at the end of a stage
        (not every step) are grouped under "<after the loop>"."""
        frames = [f for f in traceback.extract_stack()[:-2] if f.filename.startswith(SRC)]
        for f in frames:
            if f.name in OUTSIDE_LOOP:
                return "<after the loop>", f.name
        if frames:
            return frames[-1].filename[len(SRC) + 1:], frames[-1].name
        return "<outside idto3d>", ""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        leaves = pytree.tree_leaves((args, kwargs))
        hit = any(self.marked(a) for a in leaves)
        if hit and (name in READS or name in SIZED or (name in INDEXING and _bool_index(args))
                    or (name == "repeat_interleave" and kwargs.get("output_size") is None)):
            self.reads[self._site()] += 1
        out = func(*args, **kwargs)
        moved = name == "to" and any(isinstance(a, (str, torch.device)) for a in (*args[1:], kwargs.get("device")))
        if moved and isinstance(out, torch.Tensor):
            # A copy to "the device" (the CPU here): on a GPU it is a new tensor living there.
            out = out.clone() if out is args[0] else out
            self.mark(out)
        elif hit:
            for t in pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.mark(t)
        return out


def _bool_index(args: tuple) -> bool:
    """Whether an indexing call uses a boolean mask (a data-dependent size)."""
    return any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in pytree.tree_leaves(args[1:2]))


def _allowed(site: tuple[str, str]) -> bool:
    return any(site[0] == f and (fn is None or site[1] == fn) for f, fn in ALLOWED)


def _module_tensors(*modules: torch.nn.Module) -> list[torch.Tensor]:
    return [t for m in modules for t in (*m.parameters(), *m.buffers())]


FAST = ["template.iterations=20", "template.points_per_step=500", "template.build_resolution=24",
        "geometry.grid_resolution=12", "render.resolution=32", "prior.guidance.latent_size=4",
        "geometry.iterations=6", "geometry.checkpoint_every=1000", "geometry.preview_every=1000",
        "texture.iterations=6", "texture.resolution=32", "texture.checkpoint_every=1000",
        "texture.preview_every=1000", "runtime.log_every=3", "runtime.device=cpu"]


@pytest.fixture(scope="module")
def tiny_prior(tiny_base):  # noqa: F811
    return build_prior(tiny_base, "normal", 512, seed=0)


class EagerChecks(SDSGuidance):
    """Ignores the stage's request to defer its finiteness check."""

    deferred_checks = property(lambda self: False, lambda self, value: None)


def _mark_modules_after(audit: DeviceReadAudit, method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Mark a module's parameters and buffers whenever ``nn.Module.<method>`` runs on it: the stages build their
    fields and move them to the device (or load their state) themselves."""
    original = getattr(torch.nn.Module, method)

    def and_mark(module, *a, **k):
        out = original(module, *a, **k)
        for t in _module_tensors(out if isinstance(out, torch.nn.Module) else module):
            audit.mark(t)
        return out
    monkeypatch.setattr(torch.nn.Module, method, and_mark)


def _geometry_reads(tmp_path: Path, prior, monkeypatch, deferred: bool = True) -> Counter:
    cfg = load_config("preview", None, FAST)
    run = tmp_path / "geo"
    prepare_run(run, cfg)
    field = ensure_init(run, cfg, progress=False)
    cls = SDSGuidance if deferred else EagerChecks  # the audit's own check: a guidance that reads every step
    guidance = cls(prior, cfg.prior.guidance, "geometry", cfg.geometry.iterations, seed=0)
    ident = torch.nn.functional.normalize(torch.randn(512, generator=torch.Generator().manual_seed(0)), dim=0)
    audit = DeviceReadAudit(_module_tensors(prior, field))  # the template fit the stage starts from lives there
    _mark_modules_after(audit, "load_state_dict", monkeypatch)  # a stage that restores a checkpoint
    with audit:
        run_geometry_stage(run, cfg, guidance, field, id_embedding=ident, progress=False)
    return audit.reads


def test_geometry_stage_reads_device_values_only_where_allowed(tmp_path, tiny_prior, monkeypatch):
    reads = _geometry_reads(tmp_path, tiny_prior, monkeypatch)
    bad = {site: n for site, n in reads.items() if not _allowed(site)}
    assert not bad, f"host reads of device values in the geometry loop: {bad}"
    # 6 iterations, a flush every 3: two reads of the pending steps (one .cpu(), one .tolist() each)
    assert reads[("stages/step_log.py", "flush")] == 4


def test_the_audit_catches_a_per_step_read(tmp_path, tiny_prior, monkeypatch):
    # With deferral off, the guidance checks finiteness on the host every step: the audit must see it.
    reads = _geometry_reads(tmp_path, tiny_prior, monkeypatch, deferred=False)
    assert reads[("priors/guidance.py", "__call__")] >= 6


def test_texture_stage_reads_device_values_only_where_allowed(tmp_path, tiny_base, monkeypatch):  # noqa: F811
    cfg = load_config("preview", None, FAST)
    prior = build_prior(tiny_base, "albedo", 512, seed=0)
    guidance = SDSGuidance(prior, cfg.prior.guidance, "texture_diffuse", cfg.texture.iterations, seed=1)
    prepare_run(tmp_path / "tex", cfg)
    audit = DeviceReadAudit(_module_tensors(prior))
    _mark_modules_after(audit, "to", monkeypatch)  # the stage moves its texture field to the device
    with audit:
        run_texture_stage(tmp_path / "tex", cfg, guidance, {"neutral": build_head_template(24)}, progress=False)
    bad = {site: n for site, n in audit.reads.items() if not _allowed(site)}
    assert not bad, f"host reads of device values in the texture loop: {bad}"
    assert audit.reads[("stages/step_log.py", "flush")] == 4

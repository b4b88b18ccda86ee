"""GPU smoke of the SDS stages after the re-arrangement into layers (run on a lent CUDA machine; README "Measured on
a GPU"): ``generate`` with tiny random-weight normal and albedo priors, once on CUDA and once on the CPU from the
same seed and settings, then the seconds per step of each and how far the CUDA meshes are from the CPU ones.

    PYTHONPATH=src python tests/tools/gpu_check.py OUT_DIR

Tiny priors carry no meaning (random weights): this checks that every stage runs on the device, reads nothing
back per step that it should not, and lands where the CPU lands up to float differences; it measures nothing
about the method's quality.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

OVERRIDES = [
    "expressions=[neutral, smile]", "template.iterations=300", "geometry.grid_resolution=48",
    "render.resolution=128", "geometry.iterations=60", "geometry.checkpoint_every=20", "geometry.preview_every=1000",
    "texture.iterations=40", "texture.resolution=256", "texture.checkpoint_every=20", "texture.preview_every=1000",
    "export.turntable_views=4", "export.video=false", "face_model.enabled=false",
]


def _priors(tmp: Path, torch) -> tuple[Path, str, str]:  # noqa: ANN001
    from idto3d.core.config import AdapterConfig
    from idto3d.identity.io import IdentityEmbedding, save_identity
    from idto3d.priors.prior import build_prior, save_prior
    from idto3d.priors.tiny import make_tiny_base_model

    base = make_tiny_base_model(tmp / "sd", seed=0)
    for domain in ("normal", "albedo"):
        save_prior(build_prior(base, domain, 128, AdapterConfig(self_attn_rank=4, cross_attn_rank=4), seed=0),
                   tmp / domain)
    emb = torch.nn.functional.normalize(torch.randn(128, generator=torch.Generator().manual_seed(0)), dim=0)
    ident = tmp / "id.safetensors"
    save_identity(ident, IdentityEmbedding(emb, emb[None].clone(), torch.ones(1, dtype=torch.bool),
                                           torch.tensor([[0., 0, 10, 10]]), torch.zeros(1, 5, 2), "dlib",
                                           photos=[{"path": "x.jpg", "quality": "ok"}]))
    return ident, str(tmp / "normal"), str(tmp / "albedo")


def _run(device: str, tmp: Path, ident: Path, normal: str, albedo: str) -> dict:
    from idto3d.core.config import load_config
    from idto3d.stages.generate import generate

    cfg = load_config("preview", None, OVERRIDES + [f"runtime.device={device}"])
    t0 = time.perf_counter()
    result = generate([ident], tmp / device, cfg, normal_prior=normal, albedo_prior=albedo, progress=False)
    return {"result": result, "seconds": time.perf_counter() - t0, "laps": result.seconds}


def _mesh_gap(a, b) -> float:  # noqa: ANN001
    from idto3d.geometry.metrics import bbox_diagonal, chamfer_distance

    return float(chamfer_distance(a, b) / bbox_diagonal(b))


def main(out: Path, devices: tuple[str, str] = ("cuda", "cpu")) -> None:
    import torch

    assert "cuda" not in devices or torch.cuda.is_available(), "no CUDA device"
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ident, normal, albedo = _priors(tmp, torch)
        runs = {d: _run(d, tmp, ident, normal, albedo) for d in devices}
        gpu, cpu = (runs[d]["result"] for d in devices)
        report = {
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "torch": torch.__version__, "overrides": OVERRIDES,
            "seconds": {d: round(r["seconds"], 2) for d, r in runs.items()},
            "laps": {d: {k: round(v, 2) for k, v in r["laps"].items()} for d, r in runs.items()},
            "geometry_s_per_it": {d: round(r["result"].geometry.seconds / r["result"].geometry.iterations, 4)
                                  for d, r in runs.items()},
            "texture_s_per_it": {d: round(r["result"].texture.seconds / r["result"].texture.iterations, 4)
                                 for d, r in runs.items()},
            "skipped_steps": {d: [r["result"].geometry.skipped_steps, r["result"].texture.skipped_steps]
                              for d, r in runs.items()},
            "chamfer_cuda_vs_cpu_over_bbox_diag": {n: _mesh_gap(gpu.geometry.meshes[n], cpu.geometry.meshes[n])
                                                   for n in gpu.geometry.meshes},
            "exported_files": {d: len(r["result"].exported) for d, r in runs.items()},
        }
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    # a second argument "cpu" runs the check on the CPU twice (a dry run of the script where there is no GPU)
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "gpu_out"),
         ("cpu", "cpu") if sys.argv[2:3] == ["cpu"] else ("cuda", "cpu"))

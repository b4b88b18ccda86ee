"""GPU check of the public-weights path (issue 20; README "Weights"), for a CUDA machine with no internet.

    PYTHONPATH=src:tests python tests/tools/gpu_check_weights.py OUT_DIR          # on the GPU machine
    PYTHONPATH=src:tests python tests/tools/gpu_check_weights.py OUT_DIR --dry-run  # tiny, on a CPU

1. Writes full-size SD1.5-architecture folders from config with random weights (no download is possible
   there), in the layouts of the recommended checkpoints: a full diffusers pipeline folder (as
   xanderhuang/normal-adapted-sd1.5), a noVAE folder + a standalone VAE (as Realistic_Vision_V4.0_noVAE +
   sd-vae-ft-mse), and an ip-adapter-faceid_sd15.bin with the published key names and full-size shapes.
2. Makes both priors through ``make-prior``'s code path with the recommended conventions (humannorm-normal;
   faceid-albedo with FaceID's LoRA fused).
3. Runs ``idto3d bench pipeline --device cuda --full-size --normal-prior ... --albedo-prior ... --json``: one
   geometry and one texture SDS iteration (median of 3, after a warm-up) with those priors, and prints it.

Everything lands in OUT_DIR: ``bench_pipeline.json`` (the bench rows), ``bench_pipeline.txt`` (their table),
``gpu_check_weights.json`` (timings of each step, the priors' recorded conventions). The weights are random:
this measures speed and memory of the real architecture with the recommended conventions, not quality.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _write_pipeline(root: Path, full: bool, device: str) -> Path:
    """A diffusers pipeline folder at SD1.5's full size (or the tiny one for the dry run)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from idto3d.bench.pipeline import sd15_vae_config
    from idto3d.priors.tiny import _write_tokenizer, make_tiny_base_model, sd15_scheduler_config, sd15_unet_config

    folder = root / "normal-adapted-sd1.5"
    if not full:
        return make_tiny_base_model(folder, seed=0)
    _write_tokenizer(folder / "tokenizer")  # CLIP's vocabulary cannot be had offline; the tiny one tokenises
    tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    torch.manual_seed(0)
    with torch.device(device):  # random init of 1.1B parameters: seconds on a GPU, minutes on a CPU
        unet = UNet2DConditionModel(**sd15_unet_config())
        vae = AutoencoderKL(**sd15_vae_config())
        text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                            num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                            hidden_act="quick_gelu", projection_dim=768, bos_token_id=tok.bos_token_id,
                                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    for name, model in (("unet", unet), ("vae", vae), ("text_encoder", text)):
        model.to("cpu", torch.float16).save_pretrained(folder / name)  # fp16 on disk, as the hub's files
    DDPMScheduler(**sd15_scheduler_config()).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}))
    return folder


def _novae_layout(root: Path, pipeline: Path) -> tuple[Path, Path]:
    """Realistic Vision's layout over the same weights: no vae/ in the base, a standalone VAE beside it."""
    base, vae = root / "Realistic_Vision_V4.0_noVAE", root / "sd-vae-ft-mse"
    base.mkdir()
    for sub in ("unet", "text_encoder", "tokenizer", "scheduler"):
        (base / sub).symlink_to(pipeline / sub, target_is_directory=True)
    index = json.loads((pipeline / "model_index.json").read_text())
    index.pop("vae", None)
    (base / "model_index.json").write_text(json.dumps(index))
    vae.symlink_to(pipeline / "vae", target_is_directory=True)
    return base, vae


def main(out: Path, dry_run: bool) -> None:
    import torch
    from diffusers import UNet2DConditionModel

    from idto3d.priors.make_prior import make_prior
    from idto3d.priors.prior import read_prior_spec
    from public_layouts import faceid_state

    device = "cpu" if dry_run else "cuda"
    assert dry_run or torch.cuda.is_available(), "no CUDA device (use --dry-run on a CPU)"
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        seconds[name] = round(now - t, 1)
        t = now
        print(f"[{sum(seconds.values()):6.1f} s] {name}: {seconds[name]} s", flush=True)

    with tempfile.TemporaryDirectory(prefix="idto3d-weights-") as tmp:
        root = Path(tmp)
        pipeline = _write_pipeline(root, full=not dry_run, device=device)
        base, vae = _novae_layout(root, pipeline)
        unet = UNet2DConditionModel.from_pretrained(pipeline / "unet")
        torch.save(faceid_state(unet), root / "ip-adapter-faceid_sd15.bin")
        del unet
        lap("write full-size layouts" if not dry_run else "write tiny layouts")
        make_prior("normal", pipeline, root / "normal")
        lap("make-prior normal (humannorm-normal)")
        make_prior("albedo", base, root / "albedo", vae=str(vae), ip_adapter=root / "ip-adapter-faceid_sd15.bin",
                   fuse_lora=True)
        lap("make-prior albedo (faceid-albedo, FaceID LoRA fused)")
        cmd = [sys.executable, "-m", "idto3d.cli", "bench", "pipeline", "--device", device, "--full-size",
               "--normal-prior", str(root / "normal"), "--albedo-prior", str(root / "albedo")]
        if dry_run:
            cmd += ["--quick", "--repeats", "1", "--set", "render.resolution=64", "--set",
                    "prior.guidance.latent_size=8"]
        bench = subprocess.run(cmd + ["--json"], capture_output=True, text=True)
        if bench.returncode == 0:
            from rich.console import Console

            from idto3d.bench.timing import render_table

            (out / "bench_pipeline.json").write_text(bench.stdout)
            console = Console(record=True, width=200)
            console.print(render_table(json.loads(bench.stdout)))
            (out / "bench_pipeline.txt").write_text(console.export_text())
        else:
            print(bench.stderr[-6000:], flush=True)
            (out / "bench_pipeline.err").write_text(bench.stderr)
        lap("bench pipeline")
        report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run, tiny)",
                  "torch": torch.__version__, "seconds": seconds, "bench_returncode": bench.returncode,
                  "priors": {d: {k: v for k, v in vars(read_prior_spec(root / d)).items()
                                 if k in ("conventions", "ip_adapter", "recogniser", "vae", "id_dim")}
                             for d in ("normal", "albedo")}}
    (out / "gpu_check_weights.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "priors"}, indent=2))
    if bench.returncode:
        sys.exit(1)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "gpu_out"), "--dry-run" in sys.argv[2:])

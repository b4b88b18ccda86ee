"""``idto3d make-prior`` on tiny replicas of the public layouts (HumanNorm's pipeline folder, Realistic Vision's
noVAE folder + sd-vae-ft-mse, IP-Adapter FaceID / Plus / Plus v2 checkpoints), the conventions the stages
follow, FaceID against diffusers' own IP-Adapter path, and the recogniser check."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from typer.testing import CliRunner

from idto3d.cli import app
from idto3d.core.config import GuidanceConfig
from idto3d.core.errors import IdtoError
from idto3d.identity.io import IdentityEmbedding, load_identity, save_identity
from idto3d.priors import conventions as conv
from idto3d.priors.faceid import FACEID, FACEID_PLUS, FACEID_PLUS_V2, OTHER, checkpoint_kind
from idto3d.priors.guidance import SDSGuidance
from idto3d.priors.make_prior import make_prior
from idto3d.priors.prior import build_prior, load_prior, save_prior
from idto3d.priors.recogniser import check_recogniser
from idto3d.stages.geometry_stage import geometry_prompts, render_for_guidance, stage_conventions
from idto3d.render.camera import orbit_camera
from idto3d.geometry.template import build_head_template

from cpu_threads import one_thread
from priors_fixtures import isolated_cache  # noqa: F401  (autouse fixture: expression cache per test)
from public_layouts import (clip_image_encoder_like, faceid_plus_state, faceid_state, hf_cache, humannorm_like,
                            novae_like)

runner = CliRunner()
R50 = {"model": "w600k_r50.onnx", "sha256": "ab" * 32}


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("public")
    humannorm = humannorm_like(root / "normal-adapted-sd1.5", seed=0)
    base, vae = novae_like(root / "Realistic_Vision_V4.0_noVAE", root / "sd-vae-ft-mse", seed=1)
    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    faceid = root / "ip-adapter-faceid_sd15.bin"
    torch.save(faceid_state(unet), faceid)
    return {"humannorm": humannorm, "rv": base, "vae": vae, "faceid": faceid}


def _unet_inputs(prior, seed: int = 0, b: int = 2):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, 4, 8, 8, generator=g)
    ident = torch.nn.functional.normalize(torch.randn(b, prior.spec.id_dim, generator=g), dim=-1)
    return z, prior.encode_text(["a photo of a man"] * b), ident


def _identity(path: Path, dim: int = 512, recogniser: dict | None = R50, seed: int = 0) -> Path:
    emb = torch.nn.functional.normalize(torch.randn(dim, generator=torch.Generator().manual_seed(seed)), dim=0)
    save_identity(path, IdentityEmbedding(emb, emb[None].clone(), torch.ones(1, dtype=torch.bool),
                                          torch.tensor([[0., 0, 10, 10]]), torch.zeros(1, 5, 2), "arcface",
                                          photos=[{"path": "x.jpg", "quality": "ok"}], recogniser=recogniser))
    return path


# ---- make-prior on each layout ----------------------------------------------------------------------------

def test_make_prior_from_a_pipeline_folder_records_the_humannorm_conventions(layouts, tmp_path):
    res = runner.invoke(app, ["make-prior", "normal", "--base-model", str(layouts["humannorm"]), "-o",
                              str(tmp_path / "normal")])
    assert res.exit_code == 0, res.output
    spec = json.loads((tmp_path / "normal" / "prior_config.json").read_text())
    assert spec["conventions"]["name"] == "humannorm-normal"
    assert spec["conventions"]["background"] == [0.0, 0.0, 0.0]
    assert spec["base_model"] == str(layouts["humannorm"].resolve()) and spec["vae"] is None
    assert spec["recogniser"] is None and spec["ip_adapter"] is None and spec["base_fingerprint"]
    prior = load_prior(tmp_path / "normal")
    assert prior.conventions == conv.PRESETS["humannorm-normal"]


def test_a_made_prior_without_checkpoint_predicts_exactly_what_the_base_model_predicts(layouts, tmp_path):
    make_prior("normal", layouts["humannorm"], tmp_path / "p")
    prior = load_prior(tmp_path / "p")
    z, text, ident = _unet_inputs(prior)
    base = UNet2DConditionModel.from_pretrained(layouts["humannorm"] / "unet")
    with torch.no_grad():
        want = base(z, 500, encoder_hidden_states=text).sample
        got = prior.predict_noise(z, 500, text, ident, prior.encode_expressions(["smile", "neutral"]),
                                  lambda_id=1.0, lambda_exp=1.0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_make_prior_from_a_novae_folder_a_separate_vae_and_faceid(layouts, tmp_path):
    res = runner.invoke(app, ["make-prior", "albedo", "--base-model", str(layouts["rv"]), "--vae",
                              str(layouts["vae"]), "--ip-adapter", str(layouts["faceid"]), "-o", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    spec = json.loads((tmp_path / "a" / "prior_config.json").read_text())
    assert spec["vae"] == str(layouts["vae"].resolve()) and spec["id_dim"] == 512
    assert spec["conventions"]["name"] == "faceid-albedo" and spec["conventions"]["uncond_id"] == "zero"
    assert spec["recogniser"] == {"model": "w600k_r50.onnx", "sha256": None}
    assert spec["ip_adapter"] == {"file": "ip-adapter-faceid_sd15.bin", "kind": "faceid", "lora": "ignored"}
    prior = load_prior(tmp_path / "a")
    state = torch.load(layouts["faceid"], weights_only=True)
    assert torch.equal(prior.id_proj.norm.weight, state["image_proj"]["norm.weight"])
    # without the base's own vae/ folder the prior cannot load: the separate VAE is what makes it whole
    assert not (layouts["rv"] / "vae").exists()


@pytest.mark.slow
def test_make_prior_works_offline_from_the_hugging_face_cache(layouts, tmp_path):
    # A fresh process: huggingface_hub reads HF_HUB_CACHE / HF_HUB_OFFLINE when it is imported.
    cache = hf_cache(tmp_path / "hub", "xanderhuang/normal-adapted-sd1.5", layouts["humannorm"])
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "idto3d.cli", *args], env=env, capture_output=True, text=True,
                              timeout=300)

    res = cli("make-prior", "normal", "--base-model", "xanderhuang/normal-adapted-sd1.5", "-o", str(tmp_path / "n"))
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "n" / "prior_config.json").read_text())["base_model"] == \
        "xanderhuang/normal-adapted-sd1.5"  # portable: the hub id, not this machine's cache path
    res = cli("make-prior", "normal", "--base-model", "someone/absent-model", "-o", str(tmp_path / "m"))
    assert res.returncode == 2 and "not available offline" in res.stderr
    assert "--include 'model_index.json' 'unet/*'" in " ".join(res.stderr.split())


def test_a_v_prediction_base_model_is_refused_in_one_line(tmp_path):
    base = humannorm_like(tmp_path / "sd2-like", prediction_type="v_prediction")
    res = runner.invoke(app, ["make-prior", "normal", "--base-model", str(base), "-o", str(tmp_path / "p")])
    assert res.exit_code == 2
    assert "'v_prediction'" in res.output and "epsilon-prediction" in res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "p").exists()


def test_bad_make_prior_arguments_fail_with_one_error_line(layouts, tmp_path):
    cases = [(["make-prior", "photo", "--base-model", str(layouts["humannorm"])], "normal or an albedo"),
             (["make-prior", "normal", "--base-model", str(layouts["humannorm"]), "--conventions", "nope"],
              "unknown conventions 'nope'"),
             (["make-prior", "normal", "--base-model", str(layouts["humannorm"]), "--fuse-lora"], "needs --ip-adapter"),
             (["make-prior", "normal", "--base-model", str(layouts["humannorm"]), "--uncond-id", "one"],
              "uncond_id must be one of off, zero"),
             (["make-prior", "albedo", "--base-model", str(layouts["rv"]), "--ip-adapter", str(tmp_path / "x.bin")],
              "not found")]
    for args, message in cases:
        res = runner.invoke(app, args + ["-o", str(tmp_path / "p")])
        assert res.exit_code == 2 and message in " ".join(res.output.split()), (args, res.output)


# ---- moving a prior to another machine ------------------------------------------------------------------

def test_a_prior_made_with_a_local_base_path_loads_elsewhere_with_prior_base_model(layouts, tmp_path):
    here = tmp_path / "machine_a" / "sd"
    shutil.copytree(layouts["humannorm"], here)
    make_prior("normal", here, tmp_path / "prior")
    there = tmp_path / "machine_b" / "models" / "normal-adapted"
    shutil.move(str(here), there)  # the recorded path is gone, as on another machine
    with pytest.raises(IdtoError, match="base model folder not found"):
        load_prior(tmp_path / "prior")
    prior = load_prior(tmp_path / "prior", base_model=there, prefer_recorded=True)
    assert prior.spec.base_model == str(there.resolve())
    for dtype in (torch.bfloat16, torch.float16):  # the same weights in another precision are the same base
        assert load_prior(tmp_path / "prior", base_model=there, prefer_recorded=True, dtype=dtype).dtype == dtype
    # another model of the same architecture in its place is refused (fingerprint of the base)
    other = humannorm_like(tmp_path / "other", seed=5)
    with pytest.raises(IdtoError, match="has other weights"):
        load_prior(tmp_path / "prior", base_model=other, prefer_recorded=True)


def test_prefer_recorded_keeps_the_recorded_base_when_it_is_there(layouts, tmp_path):
    make_prior("normal", layouts["humannorm"], tmp_path / "prior")
    # a configured prior.base_model that is not even loadable does not matter while the recorded one is here
    prior = load_prior(tmp_path / "prior", base_model=tmp_path / "absent", prefer_recorded=True)
    assert prior.spec.base_model == str(layouts["humannorm"].resolve())


# ---- conventions in the stages ----------------------------------------------------------------------------

def test_the_geometry_stage_renders_and_prompts_as_the_prior_says(layouts, tmp_path):
    make_prior("normal", layouts["humannorm"], tmp_path / "p")
    prior = load_prior(tmp_path / "p")
    g = SDSGuidance(prior, GuidanceConfig(latent_mode="downsample", latent_size=8), "geometry", 10)
    c = stage_conventions(g)
    az = torch.tensor([0.0, 90.0, 180.0])
    cams = orbit_camera(torch.zeros(3), az, torch.full((3,), 3.0), torch.full((3,), 40.0))
    assert geometry_prompts(cams, "a man", c) == [
        f"a DSLR photo of a man, black background, normal map, only head, {v} view" for v in ("front", "side", "back")]
    mesh = build_head_template(24)
    img = render_for_guidance(mesh, cams, 32, conventions=c)
    legacy = render_for_guidance(mesh, cams, 32)
    bg = legacy[:, 3] == 0  # pixels the head does not cover at all
    assert bg.any() and torch.all(img[:, :3][bg.unsqueeze(1).expand(-1, 3, -1, -1)] == 0.0)
    assert torch.all(legacy[:, :3][bg.unsqueeze(1).expand(-1, 3, -1, -1)] == 1.0)
    covered = legacy[:, 3] == 1
    torch.testing.assert_close(img[:, :3][covered.unsqueeze(1).expand(-1, 3, -1, -1)],
                               legacy[:, :3][covered.unsqueeze(1).expand(-1, 3, -1, -1)])


def test_a_prior_folder_without_conventions_keeps_the_old_prompts_and_white_background(layouts, tmp_path):
    save_prior(build_prior(layouts["humannorm"], "normal", 128, seed=0), tmp_path / "old")
    data = json.loads((tmp_path / "old" / "prior_config.json").read_text())
    for key in ("conventions", "recogniser", "base_fingerprint", "ip_adapter"):
        data.pop(key)  # a folder written before these fields existed
    (tmp_path / "old" / "prior_config.json").write_text(json.dumps(data))
    prior = load_prior(tmp_path / "old")
    c = stage_conventions(SDSGuidance(prior, GuidanceConfig(), "geometry", 10))
    assert c.background == (1.0, 1.0, 1.0) and c.negative_prompt == "" and c.uncond_id == "off"
    cams = orbit_camera(torch.zeros(1), torch.zeros(1), torch.full((1,), 3.0), torch.full((1,), 40.0))
    assert geometry_prompts(cams, "a man", c) == ["A front view normal map face portrait of a man on a white background"]


def test_conventions_are_validated_when_read():
    with pytest.raises(IdtoError, match="unknown normal_encoding"):
        conv.Conventions.from_dict({"name": "x", "prompts": {"default": "{subject}"}, "normal_encoding": "world"})
    with pytest.raises(IdtoError, match="v_prediction"):
        conv.Conventions.from_dict({"name": "x", "prompts": {"default": "{subject}"}, "prediction_type": "v_prediction"})
    with pytest.raises(IdtoError, match="no \\{subject\\}"):
        conv.Conventions.from_dict({"name": "x", "prompts": {"front": "a face"}})


# ---- FaceID ---------------------------------------------------------------------------------------------

def _diffusers_faceid(unet_folder: Path, state: dict, lora: dict | None = None) -> UNet2DConditionModel:
    """diffusers' own IP-Adapter path on the same weights; ``lora`` wraps the layers IP-Adapter's way."""
    unet = UNet2DConditionModel.from_pretrained(unet_folder)
    if lora:
        class WithLoRA(torch.nn.Module):  # IP-Adapter's LoRAAttnProcessor: base(x) + up(down(x)), scale 1
            def __init__(self, base, down, up):
                super().__init__()
                self.base, self.down, self.up = base, down, up

            def forward(self, x):
                return self.base(x) + x @ self.down.T @ self.up.T

        for i, name in enumerate(unet.attn_processors):
            attn = unet.get_submodule(name.removesuffix(".processor"))
            for key, where in (("to_q", "to_q"), ("to_k", "to_k"), ("to_v", "to_v")):
                setattr(attn, where, WithLoRA(getattr(attn, where), lora[f"{i}.{key}_lora.down.weight"],
                                              lora[f"{i}.{key}_lora.up.weight"]))
            attn.to_out[0] = WithLoRA(attn.to_out[0], lora[f"{i}.to_out_lora.down.weight"],
                                      lora[f"{i}.to_out_lora.up.weight"])
    unet._load_ip_adapter_weights([state], low_cpu_mem_usage=False)
    return unet


@pytest.mark.parametrize("fuse", [False, True])
def test_faceid_noise_prediction_equals_diffusers_ip_adapter_path(layouts, tmp_path, fuse):
    args = ["--fuse-lora"] if fuse else []
    res = runner.invoke(app, ["make-prior", "albedo", "--base-model", str(layouts["rv"]), "--vae", str(layouts["vae"]),
                              "--ip-adapter", str(layouts["faceid"]), "-o", str(tmp_path / "a"), *args])
    assert res.exit_code == 0, res.output
    prior = load_prior(tmp_path / "a")  # the LoRA is fused again on loading, from base_lora.safetensors
    assert (tmp_path / "a" / "base_lora.safetensors").exists() == fuse
    state = torch.load(layouts["faceid"], weights_only=True)
    ref = _diffusers_faceid(layouts["rv"] / "unet", state, state["ip_adapter"] if fuse else None)
    z, text, ident = _unet_inputs(prior)
    with torch.no_grad():
        want = ref(z, 400, encoder_hidden_states=text, added_cond_kwargs={"image_embeds": [ident[:, None]]}).sample
        got = prior.predict_noise(z, 400, text, ident, lambda_id=1.0, lambda_exp=0.0)
        plain = ref(z, 400, encoder_hidden_states=text, added_cond_kwargs={"image_embeds": [0 * ident[:, None]]}).sample
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (got - plain).abs().max() > 1e-3  # the ID branch matters in this comparison


def test_faceid_unconditional_tokens_are_the_projected_zero_embedding(layouts, tmp_path):
    make_prior("albedo", layouts["rv"], tmp_path / "off", vae=str(layouts["vae"]), ip_adapter=layouts["faceid"],
               uncond_id="off")
    assert load_prior(tmp_path / "off").conventions.uncond_id == "off"
    make_prior("albedo", layouts["rv"], tmp_path / "a", vae=str(layouts["vae"]), ip_adapter=layouts["faceid"])
    prior = load_prior(tmp_path / "a")
    assert prior.conventions.uncond_id == "zero"
    g = SDSGuidance(prior, GuidanceConfig(guidance_scale=7.0, lambda_exp=0.0), "texture_diffuse", 10)
    z, text, ident = _unet_inputs(prior, b=1)
    from idto3d.priors.guidance import GuidanceCond

    neg = conv.PRESETS["faceid-albedo"].negative_prompt
    cond = GuidanceCond(prompts=["a photo of a man"], negative_prompt=neg, id_embedding=ident[0])
    with torch.no_grad():
        got = g.predict_noise(z, 300, cond)
        e_c = prior.predict_noise(z, 300, text, ident, lambda_id=1.0, lambda_exp=0.0)
        e_u = prior.predict_noise(z, 300, prior.encode_text([neg]), torch.zeros_like(ident), lambda_id=1.0,
                                  lambda_exp=0.0)
        e_off = prior.predict_noise(z, 300, prior.encode_text([neg]))
    torch.testing.assert_close(got, e_u + 7.0 * (e_c - e_u), rtol=1e-4, atol=1e-4)
    assert (e_u - e_off).abs().max() > 1e-3  # zero tokens are not the same as no ID branch


def test_faceid_plus_and_plus_v2_are_detected_as_diffusers_detects_them(layouts):
    unet = UNet2DConditionModel.from_pretrained(layouts["rv"] / "unet")
    plus = faceid_plus_state(unet)
    # the replica is a valid Plus checkpoint for diffusers' converter (strict load of the published names)
    proj = unet._convert_ip_adapter_image_proj_to_diffusers(plus["image_proj"], low_cpu_mem_usage=False)
    assert type(proj).__name__ == "IPAdapterFaceIDPlusImageProjection"
    assert "proj.0.weight" in plus["image_proj"] and "norm.weight" in plus["image_proj"]  # why order matters
    assert checkpoint_kind(plus["image_proj"], "ip-adapter-faceid-plus_sd15.bin") == FACEID_PLUS
    assert checkpoint_kind(plus["image_proj"], "ip-adapter-faceid-plusv2_sd15.bin") == FACEID_PLUS_V2
    assert checkpoint_kind(faceid_state(unet)["image_proj"], "ip-adapter-faceid_sd15.bin") == FACEID
    assert checkpoint_kind({"proj.weight": torch.zeros(1)}) == OTHER


@pytest.mark.parametrize("name,kind", [("ip-adapter-faceid-plus_sd15.bin", "Plus checkpoint"),
                                       ("ip-adapter-faceid-plusv2_sd15.bin", "Plus v2 checkpoint")])
def test_faceid_plus_without_an_image_encoder_is_refused_in_one_line_saying_why(layouts, tmp_path, name, kind):
    unet = UNet2DConditionModel.from_pretrained(layouts["rv"] / "unet")
    torch.save(faceid_plus_state(unet), tmp_path / name)
    res = runner.invoke(app, ["make-prior", "albedo", "--base-model", str(layouts["rv"]), "--vae", str(layouts["vae"]),
                              "--ip-adapter", str(tmp_path / name), "-o", str(tmp_path / "p")])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1
    out = " ".join(res.output.split())
    assert f"FaceID {kind}" in out and "CLIP ViT-H" in out and "--image-encoder" in out
    assert not (tmp_path / "p").exists()
    narrow = clip_image_encoder_like(tmp_path / "enc32", width=32)
    res = runner.invoke(app, ["make-prior", "albedo", "--base-model", str(layouts["rv"]), "--vae", str(layouts["vae"]),
                              "--ip-adapter", str(tmp_path / name), "--image-encoder", str(narrow),
                              "-o", str(tmp_path / "p")])
    assert res.exit_code == 2 and "gives 32-wide features" in " ".join(res.output.split())


def _diffusers_plus(unet_folder: Path, state: dict, v2: bool) -> UNet2DConditionModel:
    unet = UNet2DConditionModel.from_pretrained(unet_folder)
    unet._load_ip_adapter_weights([state], low_cpu_mem_usage=False)
    proj = unet.encoder_hid_proj.image_projection_layers[0]
    proj.shortcut, proj.shortcut_scale = v2, 1.0  # what IP-Adapter's pipeline sets for Plus v2
    return unet


@pytest.mark.parametrize("name,v2", [("ip-adapter-faceid-plus_sd15.bin", False),
                                     ("ip-adapter-faceid-plusv2_sd15.bin", True)])
def test_faceid_plus_noise_prediction_equals_diffusers_ip_adapter_path(layouts, tmp_path, name, v2):
    unet = UNet2DConditionModel.from_pretrained(layouts["rv"] / "unet")
    state = faceid_plus_state(unet)
    torch.save(state, tmp_path / name)
    encoder = clip_image_encoder_like(tmp_path / "image_encoder")
    res = runner.invoke(app, ["make-prior", "albedo", "--base-model", str(layouts["rv"]), "--vae", str(layouts["vae"]),
                              "--ip-adapter", str(tmp_path / name), "--image-encoder", str(encoder),
                              "-o", str(tmp_path / "plus")])
    assert res.exit_code == 0, res.output
    prior = load_prior(tmp_path / "plus")  # rebuilt from prior_config.json: the perceiver's sizes are recorded
    assert prior.needs_face_features and prior.spec.id_projection["shortcut"] == v2
    assert prior.spec.ip_adapter["kind"] == (FACEID_PLUS_V2 if v2 else FACEID_PLUS)
    z, text, ident = _unet_inputs(prior)
    with pytest.raises(IdtoError, match="CLIP features of the face"):
        prior.predict_noise(z, 400, text, ident, lambda_id=1.0, lambda_exp=0.0)
    g = torch.Generator().manual_seed(3)
    cond, uncond = torch.randn(50, 64, generator=g), torch.randn(50, 64, generator=g)
    prior.set_face_features(cond, uncond)
    ref = _diffusers_plus(layouts["rv"] / "unet", state, v2)
    proj = ref.encoder_hid_proj.image_projection_layers[0]
    with torch.no_grad():
        got = prior.predict_noise(z, 400, text, ident, lambda_id=1.0, lambda_exp=0.0)
        proj.clip_embeds = cond[None, None].expand(2, 1, -1, -1)
        want = ref(z, 400, encoder_hidden_states=text, added_cond_kwargs={"image_embeds": [ident[:, None]]}).sample
        proj.clip_embeds = uncond[None, None].expand(2, 1, -1, -1)
        other = ref(z, 400, encoder_hidden_states=text, added_cond_kwargs={"image_embeds": [ident[:, None]]}).sample
        got_uncond = prior.predict_noise_tokens(z, 400, text, prior.id_tokens(ident, 2, unconditional=True),
                                                lambda_id=1.0, lambda_exp=0.0)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_uncond, other, rtol=1e-4, atol=1e-5)
    assert (got - other).abs().max() > 1e-3  # the face features matter in this comparison


def test_face_clip_features_read_the_aligned_face(tmp_path):
    import numpy as np

    from idto3d.identity.clip_face import face_clip_features, face_crops
    from idto3d.identity.dlib_backend import DlibBackend
    from idto3d.identity.photos import load_photo

    from identity_models import astronaut_photo, insightface_photo

    encoder = str(clip_image_encoder_like(tmp_path / "image_encoder"))
    photos = [astronaut_photo(tmp_path), insightface_photo("Tom_Hanks_54745.png")]
    backend = DlibBackend()
    kps = np.stack([backend.detect(load_photo(p))[0].landmarks5 for p in photos])
    crops = face_crops(photos, kps)
    assert [c.shape for c in crops] == [(224, 224, 3)] * 2
    one = face_clip_features(photos[:1], kps[:1], encoder)
    two = face_clip_features(photos, kps, encoder)
    again = face_clip_features(photos[:1] * 2, np.concatenate([kps[:1]] * 2), encoder)
    assert one.cond.shape == one.uncond.shape == (50, 64)
    torch.testing.assert_close(again.cond, one.cond, rtol=1e-5, atol=1e-5)  # a mean over the photos
    assert (two.cond - one.cond).abs().max() > 1e-3 and (one.cond - one.uncond).abs().max() > 1e-3
    torch.testing.assert_close(two.uncond, one.uncond)  # the zero input's features: the same for everyone


# ---- the recogniser ---------------------------------------------------------------------------------------

def test_identity_files_record_their_recogniser_and_old_ones_still_load(tmp_path):
    assert load_identity(_identity(tmp_path / "new.safetensors")).recogniser == R50
    assert load_identity(_identity(tmp_path / "old.safetensors", recogniser=None)).recogniser is None


def test_a_prior_refuses_an_identity_from_another_recogniser_naming_the_one_it_needs():
    need = {"model": "w600k_r50.onnx", "sha256": None}
    check_recogniser(need, R50, "p", "id")  # same model file name, hash not recorded by the prior: accepted
    check_recogniser(None, {"model": "glintr100.onnx", "sha256": "cd" * 32}, "p", "id")  # no expectation
    for got, why in (({"model": "glintr100.onnx", "sha256": "cd" * 32}, "made with glintr100.onnx"),
                     ({"model": "w600k_mbf.onnx", "sha256": "ef" * 32}, "made with w600k_mbf.onnx"),
                     (None, "does not record its recogniser")):
        with pytest.raises(IdtoError, match=why) as err:
            check_recogniser(need, got, "p", "id")
        assert "w600k_r50.onnx (insightface buffalo_l)" in str(err.value)
    with pytest.raises(IdtoError, match="sha256 abababababab"):
        check_recogniser(R50, {"model": "w600k_r50.onnx", "sha256": "00" * 32}, "p", "id")


# ---- make-prior -> generate end to end ------------------------------------------------------------------

FAST = ["template.iterations=60", "template.points_per_step=1000", "template.build_resolution=32",
        "geometry.grid_resolution=16", "render.resolution=64", "prior.guidance.latent_size=8",
        "geometry.iterations=2", "geometry.checkpoint_every=2", "geometry.preview_every=100",
        "texture.iterations=2", "texture.resolution=32", "texture.checkpoint_every=2", "texture.preview_every=100",
        "texture.encoding.max_resolution=16", "export.turntable_views=2", "export.turntable_resolution=32",
        "export.video=false", "export.texture_size=32", "face_model.enabled=false"]


def _set(items: list[str]) -> list[str]:
    return [a for x in items for a in ("--set", x)]


def test_make_prior_then_generate_end_to_end_with_both_public_layouts(layouts, tmp_path):
    for args in (["normal", "--base-model", str(layouts["humannorm"]), "-o", str(tmp_path / "normal")],
                 ["albedo", "--base-model", str(layouts["rv"]), "--vae", str(layouts["vae"]), "--ip-adapter",
                  str(layouts["faceid"]), "--fuse-lora", "-o", str(tmp_path / "albedo")]):
        res = runner.invoke(app, ["make-prior", *args])
        assert res.exit_code == 0, res.output
    run = tmp_path / "run"
    cmd = ["generate", str(_identity(tmp_path / "id.safetensors")), "--out", str(run), "--normal-prior",
           str(tmp_path / "normal"), "--albedo-prior", str(tmp_path / "albedo"), "--prompt", "a man", *_set(FAST)]
    res = runner.invoke(app, cmd)
    assert res.exit_code == 0, res.output
    assert (run / "export" / "neutral.glb").stat().st_size > 0
    for stage in ("geometry", "texture"):
        log = [json.loads(x) for x in (run / stage / "log.jsonl").read_text().splitlines()]
        assert len(log) == 2 and not any(r["skipped"] for r in log), stage
    # an identity from another recogniser is refused before any compute, naming the one the prior needs
    glint = _identity(tmp_path / "glint.safetensors", recogniser={"model": "glintr100.onnx", "sha256": "cd" * 32})
    res = runner.invoke(app, ["generate", str(glint), "--out", str(tmp_path / "run2"), "--albedo-prior",
                              str(tmp_path / "albedo"), *_set(FAST)])
    assert res.exit_code == 2 and "needs identities made with w600k_r50.onnx" in " ".join(res.output.split())
    assert not (tmp_path / "run2").exists()


def test_generate_with_a_faceid_plus_prior_reads_the_face_from_the_photos(layouts, tmp_path):
    import numpy as np

    from idto3d.identity.dlib_backend import DlibBackend
    from idto3d.identity.photos import load_photo

    from identity_models import astronaut_photo

    unet = UNet2DConditionModel.from_pretrained(layouts["rv"] / "unet")
    torch.save(faceid_plus_state(unet), tmp_path / "ip-adapter-faceid-plusv2_sd15.bin")
    make_prior("albedo", layouts["rv"], tmp_path / "plus", vae=str(layouts["vae"]),
               ip_adapter=tmp_path / "ip-adapter-faceid-plusv2_sd15.bin",
               image_encoder=str(clip_image_encoder_like(tmp_path / "image_encoder")))
    photo = astronaut_photo(tmp_path)
    kps = DlibBackend().detect(load_photo(photo))[0].landmarks5
    emb = torch.nn.functional.normalize(torch.randn(512, generator=torch.Generator().manual_seed(0)), dim=0)

    def identity(path: Path, photo_path: Path) -> Path:  # an ArcFace identity of the photo (as `idto3d identity`)
        save_identity(path, IdentityEmbedding(emb, emb[None].clone(), torch.ones(1, dtype=torch.bool),
                                              torch.tensor([[0., 0, 10, 10]]), torch.from_numpy(kps[None]).float(),
                                              "arcface", photos=[{"path": str(photo_path), "used": True}],
                                              recogniser=R50))
        return path

    run = tmp_path / "run"
    res = runner.invoke(app, ["generate", str(identity(tmp_path / "id.safetensors", photo)), "--out", str(run),
                              "--albedo-prior", str(tmp_path / "plus"), *_set(FAST)])
    assert res.exit_code == 0, res.output
    log = [json.loads(x) for x in (run / "texture" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(np.isfinite(r["loss"]) for r in log if "loss" in r)
    gone = identity(tmp_path / "gone.safetensors", tmp_path / "moved.png")
    res = runner.invoke(app, ["generate", str(gone), "--out", str(tmp_path / "run2"), "--albedo-prior",
                              str(tmp_path / "plus"), *_set(FAST)])
    out = " ".join(res.output.split())
    assert res.exit_code == 2 and "FaceID Plus" in out and "moved.png is not on this machine" in out, out
    assert not (tmp_path / "run2").exists()


def test_generate_uses_prior_base_model_for_a_prior_made_on_another_machine(layouts, tmp_path):
    here = tmp_path / "a" / "sd"
    shutil.copytree(layouts["humannorm"], here)
    make_prior("normal", here, tmp_path / "normal")
    there = tmp_path / "b" / "sd"
    shutil.move(str(here), there)
    ident = _identity(tmp_path / "id.safetensors")
    cmd = ["generate", str(ident), "--normal-prior", str(tmp_path / "normal"), *_set(FAST)]
    res = runner.invoke(app, cmd + ["--out", str(tmp_path / "r1")])
    out = " ".join(res.output.split())
    assert res.exit_code == 2 and f"base model folder not found: {here}" in out and "prior.base_model" in out
    res = runner.invoke(app, cmd + ["--out", str(tmp_path / "r2"), "--set", f"prior.base_model={there}"])
    assert res.exit_code == 0, res.output


def test_train_prior_can_start_from_a_made_prior(layouts, tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from test_priors_dataset import write_data

    make_prior("albedo", layouts["rv"], tmp_path / "made", vae=str(layouts["vae"]), ip_adapter=layouts["faceid"],
               fuse_lora=True)
    data = write_data(tmp_path / "data", id_dim=512, size=64)
    res = runner.invoke(app, ["train-prior", "albedo", "--data", str(data), "--out", str(tmp_path / "tuned"),
                              "--init", str(tmp_path / "made"), "--set", "prior.train.steps=1", "--set",
                              "prior.train.resolution=64", "--set", "prior.train.batch_size=2"])
    assert res.exit_code == 0, res.output
    tuned = load_prior(tmp_path / "tuned")
    assert tuned.conventions.name == "faceid-albedo" and tuned.spec.ip_adapter["lora"] == "fused"
    assert (tmp_path / "tuned" / "base_lora.safetensors").exists()

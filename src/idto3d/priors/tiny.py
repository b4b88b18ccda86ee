"""SD1.5-architecture models built from config, with no download.

``make_tiny_base_model`` writes a diffusers folder (the layout of ``runwayml/stable-diffusion-v1-5``) whose
UNet, VAE and CLIP text encoder have the real block structure but tiny widths and random weights: the tests'
stand-in for a base model, exercising the same loading, adapter and SDS code paths. ``sd15_unet_config``
is the full-size UNet's config, for parameter counts and benchmarks without weights.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from idto3d.core.expressions import EXPRESSIONS

_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"

# Words the tiny tokenizer learns as whole tokens (with the expression descriptors), so a prompt is a few
# tokens rather than one per character.
_PROMPT_WORDS = ("a an the front side back view normal map albedo face portrait of on white background photo "
                 "dslr man woman young old caucasian asian african female male person with and head")


def sd15_unet_config() -> dict[str, Any]:
    """The Stable Diffusion 1.5 UNet's config (``unet/config.json`` of the SD1.5 family)."""
    return {
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "block_out_channels": [320, 640, 1280, 1280],
        "layers_per_block": 2,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
        "act_fn": "silu",
        "center_input_sample": False,
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-5,
    }


def tiny_unet_config() -> dict[str, Any]:
    """SD1.5's UNet structure (same blocks, layers and attention layout) at ~1/1000 of the width."""
    cfg = sd15_unet_config()
    cfg.update(sample_size=8, block_out_channels=[32, 32, 32, 32], cross_attention_dim=32,
               attention_head_dim=4, norm_num_groups=8)
    return cfg


def miniature_unet_config() -> dict[str, Any]:
    """SD1.5's UNet structure at a width a CPU trains in minutes (~4.4M parameters): the ``miniature`` preset's."""
    cfg = sd15_unet_config()
    cfg.update(sample_size=8, block_out_channels=[64, 64, 96, 96], cross_attention_dim=64,
               attention_head_dim=8, norm_num_groups=16, layers_per_block=1)
    return cfg


BASE_SIZES = {"tiny": tiny_unet_config, "miniature": miniature_unet_config}


def _tiny_vae_config() -> dict[str, Any]:
    # Four encoder blocks as in SD1.5, so the latent is 1/8 of the image and has 4 channels.
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [16, 32, 64, 64],
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 8,
        "sample_size": 64,
        "scaling_factor": 0.18215,
    }


def sd15_scheduler_config() -> dict[str, Any]:
    """SD1.5's training noise schedule (``scheduler/scheduler_config.json``)."""
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon",
        "clip_sample": False,
        "steps_offset": 1,
    }


def _tiny_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE vocabulary in CLIP's format, trained (``tokenizers``) on our prompt and descriptor
    words so that those are whole tokens; every byte, alone and word-final, is in it too, so any text
    tokenises."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    words = _PROMPT_WORDS.split() + [w for e in EXPRESSIONS for w in e.descriptor.lower().split()]
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    # CLIP's pre-tokenisation (transformers' CLIPTokenizer), so training and use split words the same way.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]"""
                                   r"""|[^\s\p{L}\p{N}]+"""), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=4096, min_frequency=1, initial_alphabet=alphabet,
                                  end_of_word_suffix="</w>", show_progress=False)
    tok.train_from_iterator([" ".join(words)], trainer)
    model = json.loads(tok.to_str())["model"]
    vocab: dict[str, int] = dict(sorted(model["vocab"].items(), key=lambda kv: kv[1]))
    vocab = {k: i for i, k in enumerate(vocab)}
    for c in sorted(alphabet):
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    vocab[_BOS] = len(vocab)
    vocab[_EOS] = len(vocab)
    return vocab, [tuple(m) for m in model["merges"]]


def _write_tokenizer(folder: Path) -> dict[str, int]:
    vocab, merges = _tiny_vocab()
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                       encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": _BOS, "eos_token": _EOS, "unk_token": _EOS, "pad_token": _EOS}), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": _BOS, "eos_token": _EOS,
         "unk_token": _EOS, "pad_token": _EOS, "do_lower_case": True}), encoding="utf-8")
    return vocab


def _quiet_save(model: Any, folder: Path) -> None:
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(folder)
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def make_tiny_base_model(folder: str | Path, seed: int = 0, size: str = "tiny") -> Path:
    """Write a tiny SD1.5-architecture diffusers folder (random weights, deterministic under ``seed``).

    UNet ~1.1M parameters, VAE ~1M, CLIP text encoder ~50k with a generated ~900-token vocabulary,
    SD1.5's DDPM scheduler. The folder appears complete or not at all. ``size="miniature"``: the UNet of
    ``miniature_unet_config`` (text encoder width 64 to match its cross-attention).
    """
    if size not in BASE_SIZES:
        raise ValueError(f"unknown base size {size!r}; choose one of {', '.join(BASE_SIZES)}")
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        vocab = _write_tokenizer(tmp / "tokenizer")
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**BASE_SIZES[size]())
        width = int(unet.config.cross_attention_dim)
        vae = AutoencoderKL(**_tiny_vae_config())
        # bos/eos must be real vocabulary ids: CLIPTextModel pools the hidden state at the first eos.
        text_cfg = CLIPTextConfig(vocab_size=len(vocab), hidden_size=width, intermediate_size=2 * width,
                                  num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                                  bos_token_id=vocab[_BOS], eos_token_id=vocab[_EOS], pad_token_id=vocab[_EOS],
                                  projection_dim=width)
        text_encoder = CLIPTextModel(text_cfg)
        unet.save_pretrained(tmp / "unet")
        vae.save_pretrained(tmp / "vae")
        _quiet_save(text_encoder, tmp / "text_encoder")
        DDPMScheduler(**sd15_scheduler_config()).save_pretrained(tmp / "scheduler")
        index = {
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": __import__("diffusers").__version__,
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
            "safety_checker": [None, None],
            "scheduler": ["diffusers", "DDPMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        }
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return folder

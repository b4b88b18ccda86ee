"""CLIP image features of the aligned face: the second input of IP-Adapter FaceID Plus / Plus v2.

FaceID Plus projects the ArcFace embedding into ID tokens and lets them attend to CLIP ViT-H image features of
the face, to carry its structure. IP-Adapter computes those features as we do here: the face warped onto the
ArcFace template at 224 px (``insightface.utils.face_align.norm_crop(image, kps, 224)``), CLIP's own
preprocessing, the image encoder's **penultimate** hidden states (``hidden_states[-2]``, ``[257, 1280]`` for
ViT-H/14). Its unconditional branch (classifier-free guidance) uses the features of an all-zero input.

Several photos: the features are averaged over the photos the identity uses (IP-Adapter's portrait variant
averages the ArcFace embeddings the same way); one photo gives exactly IP-Adapter's features.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from idto3d.core.errors import IdtoError
from idto3d.identity.align import norm_crop
from idto3d.identity.photos import load_photo

CROP = 224  # px: IP-Adapter FaceID Plus's face crop


@dataclass(frozen=True)
class FaceClipFeatures:
    cond: torch.Tensor     # [seq, hidden] float32: mean over the photos
    uncond: torch.Tensor   # [seq, hidden] float32: the encoder's features of a zero input
    encoder: str           # the image encoder's folder or hub id


def _load_encoder(ref: str):
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    try:
        model = CLIPVisionModelWithProjection.from_pretrained(ref, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise IdtoError(f"cannot load the CLIP image encoder {ref!r} ({str(exc).splitlines()[0]}); FaceID Plus "
                        f"needs CLIP ViT-H-14's image encoder, e.g. `huggingface-cli download h94/IP-Adapter "
                        f"--include 'models/image_encoder/*'` and point to that folder") from None
    # IP-Adapter builds CLIPImageProcessor() with its defaults; a folder's own preprocessor config wins.
    has_config = (Path(ref) / "preprocessor_config.json").is_file()
    processor = CLIPImageProcessor.from_pretrained(ref, local_files_only=True) if has_config else CLIPImageProcessor()
    return model.eval(), processor


def face_crops(photos: Sequence[str | Path], landmarks5: np.ndarray) -> list[np.ndarray]:
    """Each photo's face on the ArcFace template at 224 px (uint8 RGB), from its 5 landmarks."""
    if len(photos) != len(landmarks5):
        raise ValueError(f"{len(photos)} photos but {len(landmarks5)} landmark sets")
    return [norm_crop(load_photo(Path(p)), np.asarray(k), CROP) for p, k in zip(photos, landmarks5)]


@torch.no_grad()
def face_clip_features(photos: Sequence[str | Path], landmarks5: np.ndarray, encoder: str) -> FaceClipFeatures:
    """The penultimate CLIP hidden states of the aligned faces, averaged, and of a zero input (module doc)."""
    if not len(photos):
        raise IdtoError("FaceID Plus needs at least one photo of the face (an identity file alone has none)")
    model, processor = _load_encoder(encoder)
    pixels = processor(images=face_crops(photos, landmarks5), return_tensors="pt").pixel_values
    pixels = pixels.to(next(model.parameters()).dtype)
    cond = model(pixels, output_hidden_states=True).hidden_states[-2].float().mean(0)
    uncond = model(torch.zeros_like(pixels[:1]), output_hidden_states=True).hidden_states[-2].float()[0]
    return FaceClipFeatures(cond=cond, uncond=uncond, encoder=str(encoder))

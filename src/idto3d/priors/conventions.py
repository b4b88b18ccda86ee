"""What a prior was trained on, so SDS shows it renders and prompts from its own training distribution.

A prior's conventions (stored in ``prior_config.json`` under ``conventions``) say:

- ``prompts``: the prompt template per view word (``front`` / ``side`` / ``back``; ``default`` for any other),
  with ``{view}`` and ``{subject}`` filled in by the stages;
- ``negative_prompt``: the unconditional half of classifier-free guidance;
- ``background``: the RGB colour behind the object in the normal renders (normal priors);
- ``normal_encoding``: how a unit camera-space normal becomes a colour (normal priors);
- ``prediction_type``: what the UNet predicts; SDS here needs ``epsilon`` (others are refused on loading);
- ``uncond_id``: the ID branch in the unconditional half of CFG: ``off`` (no ID attention, our fine-tuning's
  condition dropout) or ``zero`` (tokens of the projected zero embedding, as IP-Adapter FaceID was trained).

A prior folder without the field (made before conventions existed) gets ``legacy(domain)``: exactly what the
stages did then (white background, "A {view} view normal map face portrait of {subject} on a white background").
Presets name the conventions of the public checkpoints we recommend (README "Weights").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from idto3d.core.errors import IdtoError

# name -> per-axis signs applied to (x right, y up, z toward the viewer) before (n + 1) / 2
NORMAL_ENCODINGS: dict[str, tuple[float, float, float]] = {
    "camera_opengl": (1.0, 1.0, 1.0),   # x right, y up, z toward the viewer: a front-facing pixel is (.5, .5, 1)
    "camera_opencv": (1.0, -1.0, -1.0),  # x right, y down, z away from the viewer
}
UNCOND_ID = ("off", "zero")
SDS_PREDICTION_TYPES = ("epsilon",)

LEGACY_PROMPTS = {"normal": "A {view} view normal map face portrait of {subject} on a white background",
                  "albedo": "A {view} view albedo face portrait of {subject} on a white background",
                  "photo": "A {view} view photo of {subject}, studio lighting, photorealistic, detailed skin"}


@dataclass(frozen=True)
class Conventions:
    name: str
    prompts: dict[str, str]
    negative_prompt: str = ""
    background: tuple[float, float, float] = (1.0, 1.0, 1.0)
    normal_encoding: str = "camera_opengl"
    prediction_type: str = "epsilon"
    uncond_id: str = "off"
    notes: str = ""

    def __post_init__(self) -> None:
        where = f"prior conventions '{self.name}'"
        if not self.prompts or not all(isinstance(v, str) for v in self.prompts.values()):
            raise IdtoError(f"{where}: 'prompts' must map view words (front, side, back, default) to templates")
        for view, template in self.prompts.items():
            if "{subject}" not in template:
                raise IdtoError(f"{where}: the {view} prompt template has no {{subject}}: {template!r}")
        if len(self.background) != 3 or not all(0.0 <= float(c) <= 1.0 for c in self.background):
            raise IdtoError(f"{where}: background must be three values in [0, 1], got {list(self.background)}")
        if self.normal_encoding not in NORMAL_ENCODINGS:
            raise IdtoError(f"{where}: unknown normal_encoding {self.normal_encoding!r}; known: "
                            f"{', '.join(NORMAL_ENCODINGS)}")
        if self.uncond_id not in UNCOND_ID:
            raise IdtoError(f"{where}: uncond_id must be one of {', '.join(UNCOND_ID)}, got {self.uncond_id!r}")
        check_prediction_type(self.prediction_type, where)

    def prompt(self, view: str, subject: str) -> str:
        template = self.prompts.get(view, self.prompts.get("default"))
        if template is None:
            raise IdtoError(f"prior conventions '{self.name}' have no prompt for the {view!r} view and no default")
        return template.format(view=view, subject=subject)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["background"] = [float(c) for c in self.background]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "prior_config.json") -> "Conventions":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise IdtoError(f"{where}: unknown conventions keys {unknown}; known: {sorted(known)}")
        data = dict(data)
        if "background" in data:
            data["background"] = tuple(float(c) for c in data["background"])
        try:
            return cls(**data)
        except TypeError as exc:
            raise IdtoError(f"{where}: bad conventions ({exc})") from None


def check_prediction_type(prediction_type: str, where: str) -> None:
    if prediction_type not in SDS_PREDICTION_TYPES:
        raise IdtoError(f"{where} predicts {prediction_type!r}; score distillation here needs an epsilon-prediction "
                        f"model (SD1.5 family), so this base model cannot be a prior")


def legacy(domain: str) -> Conventions:
    """What the stages did before priors carried conventions (prior folders without the field)."""
    return Conventions(name="idto3d-legacy", prompts={"default": LEGACY_PROMPTS.get(domain, LEGACY_PROMPTS["normal"])})


# The public checkpoints we recommend (README "Weights").
PRESETS: dict[str, Conventions] = {
    # HumanNorm's normal-adapted SD1.5 (xanderhuang/normal-adapted-sd1.5): camera-space normals (n + 1) / 2 on a
    # black background, prompts "<prompt>, black background, normal map" + threestudio's ", only head, <view>
    # view" suffix (human_part_prompt for heads), empty negative prompt.
    "humannorm-normal": Conventions(
        name="humannorm-normal",
        prompts={"default": "a DSLR photo of {subject}, black background, normal map, only head, {view} view"},
        background=(0.0, 0.0, 0.0), normal_encoding="camera_opengl", uncond_id="off",
        notes="HumanNorm normal-adapted SD1.5; no ID or expression branch was trained with it"),
    # Realistic Vision V4.0 noVAE + sd-vae-ft-mse + IP-Adapter FaceID (h94/IP-Adapter-FaceID's example): photo
    # prompts, its usual negative prompt, FaceID's unconditional ID tokens (zero embedding projected).
    "faceid-albedo": Conventions(
        name="faceid-albedo",
        prompts={"default": "a {view} view photo of the face of {subject}, flat even lighting, albedo, "
                            "white background, high quality"},
        negative_prompt="monochrome, lowres, bad anatomy, worst quality, low quality, blurry, shadows, harsh "
                        "lighting",
        uncond_id="zero", notes="Realistic Vision V4.0 noVAE + sd-vae-ft-mse + ip-adapter-faceid_sd15"),
    # Our own fine-tuned priors (train-prior on render-dataset's prompts): the legacy conventions, by name.
    "idto3d-normal": dataclasses.replace(legacy("normal"), name="idto3d-normal"),
    "idto3d-albedo": dataclasses.replace(legacy("albedo"), name="idto3d-albedo"),
}
DEFAULT_PRESET = {"normal": "humannorm-normal", "albedo": "faceid-albedo"}


def preset(name: str) -> Conventions:
    if name not in PRESETS:
        raise IdtoError(f"unknown conventions {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]


def of_spec(spec: Any) -> Conventions:
    """The conventions a ``PriorSpec`` records, or the legacy ones for folders made before the field."""
    data = getattr(spec, "conventions", None)
    return legacy(spec.domain) if data is None else Conventions.from_dict(data)


__all__ = ["Conventions", "NORMAL_ENCODINGS", "PRESETS", "DEFAULT_PRESET", "check_prediction_type", "legacy",
           "of_spec", "preset"]

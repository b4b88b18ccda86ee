"""The expression vocabulary: 23 FACS-coded descriptors in the FaceWarehouse style.

The paper conditions its priors on CLIP embeddings of "the textual descriptor of the 23 FACS coded
expressions proposed in FaceWareHouse". FaceWarehouse itself lists 20 expressions (neutral plus 19);
NPHM, the prior's training data, captures 23 per subject. The three added here (mouth open, surprise,
disgust) complete the set with common FACS combinations. The order is fixed: ``neutral`` is first and an
NPHM-style expression folder index ``i`` maps to ``EXPRESSIONS[i]`` by default; that mapping is our
assumption (the data set's own index order was not available to check) and ``render-dataset`` lets a user
override it. The descriptors' CLIP embeddings are ``priors.expression_embeddings``.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from idto3d.core.errors import IdtoError


class ExpressionError(IdtoError, ValueError):
    """An unknown expression name (a ``ValueError`` too, for callers that catch that)."""


@dataclass(frozen=True)
class Expression:
    name: str
    action_units: str  # FACS action units, for the reader; the descriptor is what gets embedded
    descriptor: str


EXPRESSIONS: tuple[Expression, ...] = (
    Expression("neutral", "AU0", "a neutral face with relaxed muscles and a closed mouth"),
    Expression("mouth_stretch", "AU27", "a mouth stretched wide open with the jaw pulled down"),
    Expression("smile", "AU6+AU12", "a smile with raised cheeks and lip corners pulled up"),
    Expression("brow_lower", "AU4", "eyebrows lowered and drawn together in a frown"),
    Expression("brow_raiser", "AU1+AU2", "inner and outer eyebrows raised high"),
    Expression("anger", "AU4+AU5+AU7+AU23", "an angry face with lowered brows, glaring eyes and pressed lips"),
    Expression("jaw_left", "AU30L", "the jaw shifted to the left"),
    Expression("jaw_right", "AU30R", "the jaw shifted to the right"),
    Expression("jaw_forward", "AU29", "the jaw thrust forward"),
    Expression("mouth_left", "AU14L", "the closed mouth pulled to the left"),
    Expression("mouth_right", "AU14R", "the closed mouth pulled to the right"),
    Expression("dimpler", "AU14", "lip corners tightened inward, making dimples"),
    Expression("chin_raiser", "AU17", "the chin boss pushed up, raising the lower lip"),
    Expression("lip_puckerer", "AU18", "lips puckered forward as for a kiss"),
    Expression("lip_funneler", "AU22", "lips funnelled outward in an O shape"),
    Expression("sadness", "AU1+AU4+AU15", "a sad face with inner brows raised and lip corners down"),
    Expression("lip_roll", "AU28", "both lips rolled in and sucked into the mouth"),
    Expression("grin", "AU12+AU25", "a broad grin showing the teeth"),
    Expression("cheek_blowing", "AU33", "cheeks puffed out with air and lips closed"),
    Expression("eyes_closed", "AU43", "both eyes closed with a relaxed face"),
    Expression("mouth_open", "AU25+AU26", "lips parted and the jaw dropped, mouth open"),
    Expression("surprise", "AU1+AU2+AU5+AU26", "a surprised face with raised brows, wide eyes and dropped jaw"),
    Expression("disgust", "AU9+AU10", "a disgusted face with a wrinkled nose and raised upper lip"),
)

EXPRESSION_NAMES: tuple[str, ...] = tuple(e.name for e in EXPRESSIONS)
_BY_NAME = {e.name: e for e in EXPRESSIONS}


def get_expression(name: str) -> Expression:
    """The expression called ``name``; an ``ExpressionError`` naming the closest valid name otherwise."""
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    if key in _BY_NAME:
        return _BY_NAME[key]
    hint = difflib.get_close_matches(key, EXPRESSION_NAMES, n=1)
    did = f" (did you mean '{hint[0]}'?)" if hint else ""
    raise ExpressionError(f"unknown expression '{name}'{did}; known expressions: {', '.join(EXPRESSION_NAMES)}")


def expression_index(name: str) -> int:
    return EXPRESSION_NAMES.index(get_expression(name).name)

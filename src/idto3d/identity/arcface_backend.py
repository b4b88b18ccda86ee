"""The paper's conditioning: SCRFD detection + ArcFace (512-D) from an insightface model pack, on onnxruntime.

Written after insightface's ``model_zoo/scrfd.py`` and ``arcface_onnx.py`` (not imported: it pulls cv2):

- SCRFD input: RGB, ``(x - 127.5) / 128``, the photo resized (aspect kept) into the model's input
  (640x640 when the model's input size is dynamic), top-left aligned, zero padded.
- SCRFD outputs (9, "bnkps" models such as det_10g): scores, box distances, keypoint offsets for
  strides 8, 16, 32 in that order, 2 anchors per location (location-major). Distances are in
  stride units; ``distance2bbox``/``distance2kps`` add them to the anchor centre; then NMS (IoU 0.4).
- ArcFace input: the 112x112 ``norm_crop`` (ARCFACE_DST similarity transform), RGB,
  ``(x - 127.5) / 127.5``; output 512 floats.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from idto3d.core.errors import IdtoError
from idto3d.identity.align import norm_crop
from idto3d.identity.face_backend import AlignedFace, recogniser_record
from idto3d.identity.faces import Face

ARCFACE_SAME_PERSON = 1.15  # unit-vector distance (cosine 0.34); see idto3d.identity.embedder
ARCFACE_DIM = 512
DEFAULT_DET_SIZE = (640, 640)  # (width, height) insightface uses for dynamic-size detectors
STRIDES = (8, 16, 32)
ANCHORS_PER_LOCATION = 2

# Known file names in insightface packs (buffalo_l/m/s/sc, antelopev2), preferred first.
DETECTOR_NAMES = ("det_10g.onnx", "scrfd_10g_bnkps.onnx", "det_2.5g.onnx", "det_500m.onnx")
RECOGNISER_NAMES = ("w600k_r50.onnx", "glintr100.onnx", "w600k_mbf.onnx")


class ModelPackError(IdtoError):
    """An insightface model pack folder is missing files or holds incompatible models."""


def find_pack_models(pack: Path) -> tuple[Path, Path]:
    """(detector, recogniser) ONNX files in an insightface pack folder."""
    if not pack.is_dir():
        raise ModelPackError(f"insightface model pack folder not found: {pack}")

    def pick(names: tuple[str, ...], kind: str) -> Path:
        for n in names:
            if (pack / n).is_file():
                return pack / n
        raise ModelPackError(f"{pack} has no {kind} ONNX file (looked for {', '.join(names)}); point --pack at "
                             "an unpacked insightface pack such as buffalo_l")

    return pick(DETECTOR_NAMES, "SCRFD detector"), pick(RECOGNISER_NAMES, "ArcFace recogniser")


def _session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for corrupt files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelPackError(f"{path} is not a loadable ONNX model: {first}") from None


def _fixed(dim: object) -> int | None:
    return dim if isinstance(dim, int) and dim > 0 else None


def distance2bbox(points: np.ndarray, distance: np.ndarray) -> np.ndarray:
    """Anchor centres [N,2] + (left, top, right, bottom) distances [N,4] -> boxes [N,4]."""
    return np.concatenate([points - distance[:, :2], points + distance[:, 2:4]], axis=1)


def distance2kps(points: np.ndarray, distance: np.ndarray) -> np.ndarray:
    """Anchor centres [N,2] + (dx, dy) offsets [N,2K] -> keypoints [N,K,2]."""
    return points[:, None, :] + distance.reshape(distance.shape[0], distance.shape[1] // 2, 2)


def anchor_centers(height: int, width: int, stride: int, num_anchors: int = ANCHORS_PER_LOCATION) -> np.ndarray:
    """Anchor centres in input pixels, row-major over locations, ``num_anchors`` copies each."""
    ys, xs = np.mgrid[:height, :width]
    centres = (np.stack([xs, ys], axis=-1).reshape(-1, 2) * stride).astype(np.float32)
    return np.repeat(centres, num_anchors, axis=0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> list[int]:
    """Greedy non-maximum suppression (insightface's +1 pixel area convention)."""
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size:
        i = order[0]
        keep.append(int(i))
        rest = order[1:]
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = w * h
        iou = inter / (areas[i] + areas[rest] - inter)
        order = rest[iou <= iou_threshold]
    return keep


class ArcFaceBackend:
    name = "arcface"
    dim = ARCFACE_DIM
    same_person_threshold = ARCFACE_SAME_PERSON

    def __init__(self, pack: Path, det_threshold: float = 0.5, nms_threshold: float = 0.4) -> None:
        self.pack = Path(pack)
        self.det_threshold = det_threshold
        self.confident_score = det_threshold  # every kept SCRFD detection already passed its threshold
        self.nms_threshold = nms_threshold
        det_path, rec_path = find_pack_models(self.pack)
        self.det_path, self.rec_path = det_path, rec_path
        self.recogniser = recogniser_record(rec_path)
        self._det = _session(det_path)
        self._rec = _session(rec_path)
        self._check_detector()
        self._check_recogniser()

    # --- signatures -------------------------------------------------------------------------
    def _check_detector(self) -> None:
        inputs, outputs = self._det.get_inputs(), self._det.get_outputs()
        shape = inputs[0].shape if len(inputs) == 1 else []
        if len(shape) != 4 or _fixed(shape[1]) not in (3, None):
            raise ModelPackError(f"{self.det_path.name}: expected one NCHW image input, got "
                                 f"{[(i.name, i.shape) for i in inputs]}")
        if len(outputs) in (6, 10):
            raise ModelPackError(f"{self.det_path.name}: this SCRFD model has no landmark outputs; ArcFace "
                                 "alignment needs a keypoint model (det_10g.onnx or *_bnkps.onnx)")
        if len(outputs) != 3 * len(STRIDES):
            raise ModelPackError(f"{self.det_path.name}: expected {3 * len(STRIDES)} SCRFD outputs (scores, "
                                 f"boxes, keypoints for strides {STRIDES}), got {len(outputs)}")
        h, w = _fixed(shape[2]), _fixed(shape[3])
        self.det_size = (w, h) if w and h else DEFAULT_DET_SIZE
        self._det_input = inputs[0].name
        self._det_batched = len(outputs[0].shape) == 3

    def _check_recogniser(self) -> None:
        inputs, outputs = self._rec.get_inputs(), self._rec.get_outputs()
        shape = inputs[0].shape if len(inputs) == 1 else []
        if len(shape) != 4 or tuple(shape[2:]) != (112, 112):
            raise ModelPackError(f"{self.rec_path.name}: expected an ArcFace input of shape [N, 3, 112, 112], "
                                 f"got {[(i.name, i.shape) for i in inputs]}")
        out = outputs[0].shape
        if len(outputs) != 1 or len(out) != 2 or (_fixed(out[1]) and out[1] != ARCFACE_DIM):
            raise ModelPackError(f"{self.rec_path.name}: expected one output of {ARCFACE_DIM} values per face "
                                 f"(ArcFace), got shape {out}")
        self._rec_input = inputs[0].name

    # --- detection --------------------------------------------------------------------------
    def _blob(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        in_w, in_h = self.det_size
        h, w = image.shape[:2]
        if h / w > in_h / in_w:
            new_h, new_w = in_h, max(1, int(in_h * w / h))
        else:
            new_w, new_h = in_w, max(1, int(in_w * h / w))
        resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR))
        canvas = np.zeros((in_h, in_w, 3), dtype=np.float32)
        canvas[:new_h, :new_w] = resized
        blob = ((canvas - 127.5) / 128.0).transpose(2, 0, 1)[None]
        return np.ascontiguousarray(blob, dtype=np.float32), new_h / h

    def detect(self, image: np.ndarray) -> list[Face]:
        blob, det_scale = self._blob(image)
        outs = self._det.run(None, {self._det_input: blob})
        if self._det_batched:
            outs = [o[0] for o in outs]
        in_h, in_w = blob.shape[2:]
        n = len(STRIDES)
        boxes, scores, kpss = [], [], []
        for i, stride in enumerate(STRIDES):
            centres = anchor_centers(in_h // stride, in_w // stride, stride)
            score, bbox, kps = (np.asarray(outs[i + k * n], dtype=np.float32) for k in range(3))
            expect = centres.shape[0]
            if score.reshape(-1).shape[0] != expect or bbox.shape != (expect, 4) or kps.shape != (expect, 10):
                raise ModelPackError(f"{self.det_path.name}: stride-{stride} outputs have shapes {score.shape}, "
                                     f"{bbox.shape}, {kps.shape}; expected ({expect}, 1), ({expect}, 4), "
                                     f"({expect}, 10) for a {in_w}x{in_h} input")
            keep = np.flatnonzero(score.reshape(-1) >= self.det_threshold)
            scores.append(score.reshape(-1)[keep])
            boxes.append(distance2bbox(centres[keep], bbox[keep] * stride))
            kpss.append(distance2kps(centres[keep], kps[keep] * stride))
        all_scores = np.concatenate(scores)
        if all_scores.size == 0:
            return []
        all_boxes = np.concatenate(boxes) / det_scale
        all_kps = np.concatenate(kpss) / det_scale
        h, w = image.shape[:2]
        faces = []
        for k in nms(all_boxes, all_scores, self.nms_threshold):
            box = np.clip(all_boxes[k], 0, [w, h, w, h]).astype(np.float32)
            faces.append(Face(box=box, score=float(all_scores[k]), landmarks5=all_kps[k].astype(np.float32)))
        return faces

    # --- recognition ------------------------------------------------------------------------
    def align(self, image: np.ndarray, face: Face) -> AlignedFace:
        crop = norm_crop(image, face.landmarks5, 112)
        return AlignedFace(model_crop=crop, arcface_crop=crop)

    def embed(self, aligned: AlignedFace) -> np.ndarray:
        x = (aligned.model_crop.astype(np.float32) - 127.5) / 127.5
        blob = np.ascontiguousarray(x.transpose(2, 0, 1)[None])
        out = np.asarray(self._rec.run(None, {self._rec_input: blob})[0], dtype=np.float32).reshape(-1)
        if out.shape[0] != ARCFACE_DIM:
            raise ModelPackError(f"{self.rec_path.name} returned {out.shape[0]} values per face; an ArcFace "
                                 f"recogniser returns {ARCFACE_DIM}")
        return out

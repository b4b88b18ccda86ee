"""Tiny ONNX stand-ins with the signatures of insightface's SCRFD (det_10g.onnx) and ArcFace (w600k_r50.onnx).

No real weights are downloadable here, so the tests build these with the ``onnx`` package:

- ``make_scrfd``: image [1, 3, H, W] -> 9 outputs (scores, box distances, keypoint offsets for
  strides 8/16/32, 2 anchors per location). The outputs are constants (plus 0 x mean(input), so
  the input is consumed) chosen so that they decode to known faces: ``decoded_faces`` computes
  the expected boxes by plain arithmetic, independently of the library's decoder.
- ``make_arcface``: crop [N, 3, 112, 112] -> [N, dim]: 14x14 average pooling, flatten, a fixed
  random matrix. ``arcface_reference`` recomputes it in numpy so preprocessing can be checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

STRIDES = (8, 16, 32)
OPSET = 13


@dataclass
class FakeFace:
    stride: int
    row: int
    col: int
    anchor: int                 # 0 or 1
    score: float
    dist: tuple                 # left, top, right, bottom in stride units
    kps: tuple = (-0.6, -0.5, 0.6, -0.5, 0.0, 0.1, -0.5, 0.7, 0.5, 0.7)  # (dx, dy) x 5 in stride units

    def index(self, width: int) -> int:
        return (self.row * (width // self.stride) + self.col) * 2 + self.anchor


# A confident face, a duplicate of it at another stride (NMS must remove it), a smaller
# second face, and one below the 0.5 score threshold. Sized for a 160x160 input.
DEFAULT_FACES = (
    FakeFace(16, 3, 5, 1, 0.95, (2.0, 2.5, 2.0, 3.0)),
    FakeFace(8, 6, 10, 0, 0.80, (4.0, 5.0, 4.0, 6.0), tuple(2 * v for v in FakeFace.kps)),
    FakeFace(8, 15, 3, 0, 0.70, (1.5, 1.5, 1.5, 2.0)),
    FakeFace(32, 1, 3, 0, 0.30, (1.0, 1.0, 1.0, 1.0)),
)


def _outputs(faces, width: int, height: int) -> list[np.ndarray]:
    scores, boxes, kpss = [], [], []
    for s in STRIDES:
        n = (height // s) * (width // s) * 2
        sc, bb, kp = np.zeros((n, 1), np.float32), np.ones((n, 4), np.float32), np.zeros((n, 10), np.float32)
        for f in faces:
            if f.stride == s:
                i = f.index(width)
                sc[i, 0], bb[i], kp[i] = f.score, f.dist, f.kps
        scores.append(sc)
        boxes.append(bb)
        kpss.append(kp)
    return scores + boxes + kpss


def make_scrfd(path: str | Path, input_size: tuple[int, int] = (160, 160), faces=DEFAULT_FACES,
               batched: bool = False, with_kps: bool = True, dynamic: bool = False) -> Path:
    """``input_size`` is (width, height); ``dynamic`` declares symbolic H, W (then use 640x640 constants)."""
    w, h = input_size
    consts = _outputs(faces, w, h)
    if not with_kps:
        consts = consts[:6]
    in_shape = [1, 3, "H", "W"] if dynamic else [1, 3, h, w]
    nodes = [helper.make_node("ReduceMean", ["input.1"], ["m"], keepdims=0),
             helper.make_node("Mul", ["m", "zero"], ["z"])]
    inits = [numpy_helper.from_array(np.zeros((), np.float32), "zero")]
    outs = []
    for k, c in enumerate(consts):
        if batched:
            c = c[None]
        inits.append(numpy_helper.from_array(c, f"c{k}"))
        nodes.append(helper.make_node("Add", [f"c{k}", "z"], [f"out{k}"]))
        outs.append(helper.make_tensor_value_info(f"out{k}", TensorProto.FLOAT, list(c.shape)))
    graph = helper.make_graph(nodes, "scrfd_stub", [helper.make_tensor_value_info("input.1", TensorProto.FLOAT,
                                                                                  in_shape)], outs, inits)
    return save_onnx_graph(graph, path)


def make_arcface(path: str | Path, dim: int = 512, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((3 * 8 * 8, dim)).astype(np.float32)
    nodes = [helper.make_node("AveragePool", ["input.1"], ["p"], kernel_shape=[14, 14], strides=[14, 14]),
             helper.make_node("Flatten", ["p"], ["f"], axis=1),
             helper.make_node("MatMul", ["f", "w"], ["683"])]
    graph = helper.make_graph(
        nodes, "arcface_stub",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["N", 3, 112, 112])],
        [helper.make_tensor_value_info("683", TensorProto.FLOAT, ["N", dim])],
        [numpy_helper.from_array(weight, "w")])
    return save_onnx_graph(graph, path)


def arcface_reference(crop112: np.ndarray, dim: int = 512, seed: int = 0) -> np.ndarray:
    """What ``make_arcface``'s model returns for an RGB uint8 crop preprocessed the ArcFace way."""
    weight = np.random.default_rng(seed).standard_normal((3 * 8 * 8, dim)).astype(np.float32)
    x = (crop112.astype(np.float32) - 127.5) / 127.5          # HWC, RGB
    pooled = x.reshape(8, 14, 8, 14, 3).mean(axis=(1, 3))     # [8, 8, 3]
    return pooled.transpose(2, 0, 1).reshape(-1) @ weight


def decoded_faces(faces, input_size: tuple[int, int], image_size: tuple[int, int], threshold: float = 0.5):
    """Expected (box, kps, score) in photo pixels (before NMS) for a photo of ``image_size`` (w, h)."""
    in_w, in_h = input_size
    im_w, im_h = image_size
    scale = in_h / im_h if im_h / im_w > in_h / in_w else int(in_w * im_h / im_w) / im_h
    out = []
    for f in faces:
        if f.score < threshold:
            continue
        cx, cy = f.col * f.stride, f.row * f.stride
        l, t, r, b = (d * f.stride for d in f.dist)
        box = np.array([cx - l, cy - t, cx + r, cy + b]) / scale
        kps = (np.array([cx, cy] * 5) + np.array(f.kps) * f.stride).reshape(5, 2) / scale
        out.append((box, kps, f.score))
    return out


def make_pack(folder: str | Path, *, dim: int = 512, **scrfd_kw) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    make_scrfd(folder / "det_10g.onnx", **scrfd_kw)
    make_arcface(folder / "w600k_r50.onnx", dim=dim)
    return folder


def save_onnx_graph(graph, path: str | Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = Path(path)
    onnx.save(model, str(path))
    return path


# --- real photos that ship in PyPI packages -----------------------------------------------------
def astronaut_photo(folder: Path) -> Path:
    """scikit-image's astronaut portrait, written as ``folder/astronaut.png``."""
    from PIL import Image
    from skimage import data

    path = folder / "astronaut.png"
    Image.fromarray(data.astronaut()).save(path)
    return path


def insightface_photo(name: str) -> Path:
    """A photo bundled with insightface (found without importing it: that would pull cv2)."""
    import importlib.util

    spec = importlib.util.find_spec("insightface")
    assert spec is not None and spec.submodule_search_locations, "tests need insightface's bundled photos"
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "images" / name


def astronaut() -> np.ndarray:
    from skimage import data

    return data.astronaut()

"""Tiny ONNX stand-ins for the FID Inception-v3 (same interface: float [B, 3, S, S] in [0, 1] -> [B, D]).

``make_feature_net``: a 3x3 stride-2 conv (C channels, fixed random weights), ReLU, global average pool and a
fixed random [C, D] projection. ``reference_features`` recomputes it with plain torch ops, independently of
onnxruntime. ``make_onnx`` builds arbitrary one-node-chain graphs for the shape-validation tests.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from onnx import TensorProto, helper, numpy_helper

from identity_models import save_onnx_graph



def _weights(dim: int, channels: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    conv = rng.standard_normal((channels, 3, 3, 3)).astype(np.float32) / 3.0
    bias = rng.standard_normal(channels).astype(np.float32) * 0.1
    proj = rng.standard_normal((channels, dim)).astype(np.float32)
    return conv, bias, proj


def make_feature_net(path: str | Path, size: int | str = 64, dim: int = 16, channels: int = 24, seed: int = 0,
                     batch: int | str = "B", pooled_4d: bool = False) -> Path:
    """``size``/``batch`` may be strings (symbolic dims); ``pooled_4d`` gives a [B, D, 1, 1] output."""
    conv, bias, proj = _weights(dim, channels, seed)
    nodes = [helper.make_node("Conv", ["x", "cw", "cb"], ["c"], kernel_shape=[3, 3], strides=[2, 2],
                              pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"], axis=1),
             helper.make_node("MatMul", ["f", "p"], ["feat"] if not pooled_4d else ["m"])]
    out_shape = [batch, dim]
    if pooled_4d:
        nodes.append(helper.make_node("Unsqueeze", ["m", "axes"], ["feat"]))
        out_shape = [batch, dim, 1, 1]
    inits = [numpy_helper.from_array(conv, "cw"), numpy_helper.from_array(bias, "cb"),
             numpy_helper.from_array(proj, "p"), numpy_helper.from_array(np.array([2, 3], np.int64), "axes")]
    return make_onnx(path, nodes, [batch, 3, size, size], out_shape, inits)


def reference_features(x: torch.Tensor, dim: int = 16, channels: int = 24, seed: int = 0) -> np.ndarray:
    """What ``make_feature_net``'s model returns for float [B, 3, S, S] input (torch, not onnxruntime)."""
    conv, bias, proj = _weights(dim, channels, seed)
    c = torch.nn.functional.conv2d(x.double(), torch.from_numpy(conv).double(), torch.from_numpy(bias).double(),
                                   stride=2, padding=1)
    return (c.relu().mean(dim=(2, 3)) @ torch.from_numpy(proj).double()).numpy()


def make_onnx(path: str | Path, nodes: list, in_shape: list, out_shape: list, inits: list | None = None,
              in_type: int = TensorProto.FLOAT) -> Path:
    """A graph with input ``x`` and output ``feat`` (float) and the declared shapes."""
    graph = helper.make_graph(nodes, "fid_stub", [helper.make_tensor_value_info("x", in_type, in_shape)],
                              [helper.make_tensor_value_info("feat", TensorProto.FLOAT, out_shape)], inits or [])
    return save_onnx_graph(graph, path)

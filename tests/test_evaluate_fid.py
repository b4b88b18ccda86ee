"""FID with torchmetrics and an ONNX feature network (a tiny stand-in with the FID Inception's interface)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper
from PIL import Image
from scipy import linalg

from fid_models import make_feature_net, make_onnx, reference_features
from idto3d.core.errors import IdtoError
from idto3d.evaluate.fid import (
    FidModelError, FidWarning, OnnxFeatureExtractor, _to_tensor, fid, fid_from_folders, load_images,
)

# Tiny sets are the point here; tests that care assert the warning with pytest.warns.
pytestmark = pytest.mark.filterwarnings("ignore::idto3d.evaluate.fid.FidWarning")


def _images(n: int, seed: int, offset: float = 0.0, shape=(80, 96)) -> list[np.ndarray]:
    """Noisy flat-colour images (varied colour and noise level), brightness shifted by ``offset``."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        base = rng.random(3) * 0.6 + 0.2
        a = base + rng.standard_normal((*shape, 3)) * rng.random() * 0.3 + offset
        out.append((np.clip(a, 0, 1) * 255).round().astype(np.uint8))
    return out


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    return make_feature_net(tmp_path_factory.mktemp("fid") / "net.onnx")


@pytest.fixture(scope="module")
def ext(net):
    return OnnxFeatureExtractor(net)


def _scipy_fid(f1: np.ndarray, f2: np.ndarray) -> float:
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_extractor_runs_the_model_on_0_1_input(ext):
    assert ext.size == (64, 64) and ext.num_features == 16 and ext.batch is None
    x = torch.rand(5, 3, 64, 64)
    np.testing.assert_allclose(ext(x).numpy(), reference_features(x), rtol=1e-4, atol=1e-5)
    u8 = (x * 255).round().to(torch.uint8)
    np.testing.assert_allclose(ext(u8).numpy(), reference_features(u8.float() / 255), rtol=1e-4, atol=1e-5)
    big = torch.rand(2, 3, 128, 128)   # resized to the model's 64x64
    small = torch.nn.functional.interpolate(big, size=(64, 64), mode="bilinear", antialias=True)
    np.testing.assert_allclose(ext(big).numpy(), reference_features(small), rtol=1e-4, atol=1e-5)


def test_fid_matches_scipy_frechet_distance(ext):
    gen, ref = _images(40, 1), _images(45, 2, offset=0.1)
    feats = [reference_features(torch.stack([_to_tensor(i, (64, 64)) for i in s])) for s in (gen, ref)]
    expected = _scipy_fid(*feats)
    assert expected > 1.0
    assert fid(gen, ref, ext, batch_size=7, progress=False) == pytest.approx(expected, rel=1e-3)


def test_fid_zero_for_same_set_grows_with_shift_and_is_symmetric(ext):
    a = _images(60, 3)
    assert abs(fid(a, a, ext, progress=False)) < 1e-3
    values = [fid(_images(60, 4, offset=o), a, ext, progress=False) for o in (0.0, 0.1, 0.3)]
    assert values[0] < values[1] < values[2] and values[2] > 10 * values[0]
    b = _images(60, 4, offset=0.1)
    assert fid(a, b, ext, progress=False) == pytest.approx(values[1], rel=1e-3)


def test_fixed_batch_and_pooled_output_give_the_same_fid(tmp_path, ext):
    fixed = OnnxFeatureExtractor(make_feature_net(tmp_path / "b1.onnx", batch=1, pooled_4d=True))
    assert fixed.batch == 1 and fixed.num_features == 16
    gen, ref = _images(12, 5), _images(11, 6, offset=0.2)
    with pytest.warns(FidWarning):
        got = fid(gen, ref, fixed, batch_size=5, progress=False)
    with pytest.warns(FidWarning):
        assert got == pytest.approx(fid(gen, ref, ext, batch_size=4, progress=False), rel=1e-4)


def test_image_size_from_model_or_argument(tmp_path):
    dyn = make_feature_net(tmp_path / "dyn.onnx", size="S")
    assert OnnxFeatureExtractor(dyn).size == (299, 299)
    assert OnnxFeatureExtractor(dyn, image_size=48).size == (48, 48)
    with pytest.raises(FidModelError, match="64x64"):
        OnnxFeatureExtractor(make_feature_net(tmp_path / "fixed.onnx"), image_size=32)


def _bad_models():
    mean2 = helper.make_node("ReduceMean", ["x"], ["feat"], axes=[2], keepdims=0)
    gap = [helper.make_node("GlobalAveragePool", ["x"], ["g"]), helper.make_node("Flatten", ["g"], ["feat"])]
    return {
        "input rank 3": ([mean2], ["B", 3, 64], ["B", 3], TensorProto.FLOAT, "input 'x'"),
        "1 channel": (gap, ["B", 1, 64, 64], ["B", 1], TensorProto.FLOAT, "input 'x'"),
        "output rank 3": ([helper.make_node("ReduceMean", ["x"], ["feat"], axes=[3], keepdims=0)],
                          ["B", 3, 64, 64], ["B", 3, 64], TensorProto.FLOAT, "output 'feat'"),
        "spatial output": ([helper.make_node("AveragePool", ["x"], ["feat"], kernel_shape=[32, 32],
                                             strides=[32, 32])], ["B", 3, 64, 64], ["B", 3, 2, 2],
                           TensorProto.FLOAT, r"returned features of shape \[1, 3, 2, 2\]"),
        "uint8 input": ([helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
                         helper.make_node("GlobalAveragePool", ["xf"], ["g"]),
                         helper.make_node("Flatten", ["g"], ["feat"])],
                        ["B", 3, 64, 64], ["B", 3], TensorProto.UINT8, "float32"),
    }


@pytest.mark.parametrize("case", list(_bad_models()))
def test_incompatible_models_are_refused(tmp_path, case):
    nodes, in_shape, out_shape, in_type, message = _bad_models()[case]
    path = make_onnx(tmp_path / "bad.onnx", nodes, in_shape, out_shape, in_type=in_type)
    with pytest.raises(FidModelError, match=message):
        OnnxFeatureExtractor(path)


def test_missing_or_corrupt_model_file(tmp_path):
    with pytest.raises(FidModelError, match="not found.*pytorch-fid"):
        OnnxFeatureExtractor(tmp_path / "inception.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(FidModelError, match="not a loadable ONNX model.*pytorch-fid"):
        fid(_images(2, 0), _images(2, 1), tmp_path / "junk.onnx", progress=False)


def test_load_images_and_fid_from_folders(tmp_path, net, ext):
    ref = _images(9, 7, offset=0.1, shape=(70, 50))
    folder = tmp_path / "refs"
    folder.mkdir()
    for i, a in enumerate(ref):
        Image.fromarray(a).save(folder / f"{i:02d}.png")
    Image.fromarray(ref[0]).convert("RGBA").save(folder / "z_rgba.webp", lossless=True)
    Image.fromarray(ref[1]).convert("L").save(folder / "z_gray.PNG")
    (folder / "notes.txt").write_text("not an image")
    loaded = load_images(folder)
    assert len(loaded) == 11 and all(a.dtype == np.uint8 and a.shape == (70, 50, 3) for a in loaded)
    np.testing.assert_array_equal(loaded[3], ref[3])
    gray = np.asarray(Image.fromarray(ref[1]).convert("L"))
    np.testing.assert_array_equal(loaded[9], np.stack([gray] * 3, axis=2))   # z_gray.PNG: suffix case ignored
    np.testing.assert_array_equal(loaded[10], ref[0])                        # lossless WebP, alpha dropped
    assert len(load_images(folder, limit=4)) == 4
    gen = _images(10, 8)
    with pytest.warns(FidWarning):
        from_folder = fid_from_folders(gen, folder, net, batch_size=4, limit=9, progress=False)
    with pytest.warns(FidWarning):
        assert from_folder == pytest.approx(fid(gen, ref, ext, progress=False), rel=1e-5)


def test_bad_folders_and_images(tmp_path, ext):
    with pytest.raises(IdtoError, match="not found"):
        load_images(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(IdtoError, match="holds no images"):
        fid_from_folders(_images(3, 0), tmp_path / "empty", ext, progress=False)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.png").write_bytes(b"\x89PNG nope")
    with pytest.raises(IdtoError, match="cannot read image"):
        load_images(tmp_path / "broken")
    with pytest.raises(IdtoError, match="at least 2 generated"):
        fid(_images(1, 0), _images(3, 1), ext, progress=False)
    rgba = [np.zeros((8, 8, 4), np.uint8)] * 2
    with pytest.raises(IdtoError, match="RGBA"):
        fid(rgba, _images(2, 1), ext, progress=False)
    floats = [a.astype(np.float32) / 255 for a in _images(3, 2)]
    with pytest.warns(FidWarning):
        assert fid(floats, _images(3, 2), ext, progress=False) == pytest.approx(0.0, abs=1e-3)

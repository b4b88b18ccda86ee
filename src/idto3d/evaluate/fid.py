"""Fréchet Inception Distance for texture (renders vs reference images) and geometry (normal maps vs reference
normal maps), paper section 4 / table 1.

torchmetrics' ``FrechetInceptionDistance`` accumulates the feature statistics and computes the distance; we
give it our own feature module, ``OnnxFeatureExtractor``, because the Inception weights cannot be downloaded
here and torchmetrics' default network needs torch-fidelity (and torchvision).

The feature network is an ONNX file the user supplies:

- exactly one input, float32, NCHW RGB, shape ``[B, 3, 299, 299]`` (the batch dimension may be symbolic or
  fixed; H and W may be symbolic, then ``image_size`` or 299 is used), values in **[0, 1]**; any further
  normalisation (the FID Inception's ``2x - 1``) happens inside the model;
- exactly one output, float, ``[B, 2048]`` (Inception-v3 pool3) or ``[B, 2048, 1, 1]``; any ``D`` works,
  but FID values are only comparable between runs that used the same file.

Make one on a machine that has pytorch-fid: wrap ``pytorch_fid.inception.InceptionV3([3])`` (pool3; its
defaults resize to 299 and map [0, 1] to [-1, 1], and its weights are the TF-FID Inception) in a module
whose ``forward(x)`` returns ``model(x)[0].flatten(1)``, then ``torch.onnx.export(wrapper,
torch.rand(1, 3, 299, 299), "inception_fid.onnx", input_names=["x"], dynamic_axes={"x": {0: "b"}})``.

Images are resized to the model's input size with antialiased bilinear filtering (as torchmetrics does
for its own Inception), so FID values differ slightly from TF-FID numbers computed with other resizers.
FID needs at least 2 images per side; with fewer images than feature dimensions (2048) the covariances
are singular and the value is biased upwards: use thousands per side for a meaningful number. Below
``FEW_IMAGES`` per side we warn.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from idto3d.core.errors import IdtoError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
DEFAULT_IMAGE_SIZE = 299     # FID Inception-v3 input; used when the model's H, W are symbolic
FEW_IMAGES = 50
HOW_TO_GET = ("export the FID Inception-v3 (pool3) to ONNX on a machine with pytorch-fid: see the docstring of "
              "idto3d.evaluate.fid or the README's 'FID' section")


class FidModelError(IdtoError):
    """The FID feature network file is missing, unreadable or has the wrong interface."""


class FidWarning(UserWarning):
    """Too few images for a meaningful FID."""


def _dim(d: object) -> int | None:
    return d if isinstance(d, int) and d > 0 else None


class OnnxFeatureExtractor(torch.nn.Module):
    """An ONNX feature network as a torch module: ``forward(images [B,3,H,W]) -> float32 [B, D]``.

    Images are uint8 in [0, 255] or float in [0, 1]; batches whose size differs from the model's input are
    resized (antialiased bilinear). ``num_features`` tells torchmetrics the feature size.
    """

    def __init__(self, weights: str | Path, image_size: int | None = None) -> None:
        super().__init__()
        import onnxruntime as ort

        self.weights = Path(weights)
        if not self.weights.is_file():
            raise FidModelError(f"FID feature network not found: {self.weights}; {HOW_TO_GET}")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(str(self.weights), sess_options=opts,
                                                 providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for corrupt files
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise FidModelError(f"{self.weights} is not a loadable ONNX model ({first}); {HOW_TO_GET}") from None
        ins, outs = self._session.get_inputs(), self._session.get_outputs()
        if len(ins) != 1 or len(outs) != 1:
            raise FidModelError(f"{self.weights}: an FID feature network has one input and one output, this one "
                                f"has {len(ins)} and {len(outs)}")
        inp, out = ins[0], outs[0]
        shape = list(inp.shape)
        if len(shape) != 4 or _dim(shape[1]) not in (3, None):
            raise FidModelError(f"{self.weights}: input '{inp.name}' has shape {shape}; expected [B, 3, H, W] "
                                "(float32 RGB in [0, 1])")
        if inp.type != "tensor(float)":
            raise FidModelError(f"{self.weights}: input '{inp.name}' is {inp.type}; expected float32 RGB in [0, 1]")
        if len(out.shape) not in (2, 4):
            raise FidModelError(f"{self.weights}: output '{out.name}' has shape {list(out.shape)}; expected "
                                "[B, D] or [B, D, 1, 1] features")
        h, w = _dim(shape[2]), _dim(shape[3])
        if image_size is not None and any(s is not None and s != image_size for s in (h, w)):
            raise FidModelError(f"{self.weights} takes {shape[2]}x{shape[3]} images, not image_size={image_size}")
        size = image_size or DEFAULT_IMAGE_SIZE
        self.size = (h or size, w or size)
        self.batch = _dim(shape[0])     # a fixed batch size (models exported without dynamic axes) or None
        self._in, self._out = inp.name, out.name
        # A real run validates what the declared shapes cannot (symbolic dims, a graph that fails at runtime).
        self.num_features = int(self._run(np.zeros((1, 3, *self.size), np.float32)).shape[1])

    def _run(self, x: np.ndarray) -> np.ndarray:
        n = x.shape[0]
        step = self.batch or n
        feats = []
        for i in range(0, n, step):
            chunk = x[i:i + step]
            if len(chunk) < step:   # fixed-batch model: pad the last chunk, drop the padding's features
                chunk = np.concatenate([chunk, np.zeros((step - len(chunk), *chunk.shape[1:]), chunk.dtype)])
            try:
                y = self._session.run([self._out], {self._in: chunk})[0]
            except Exception as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise FidModelError(f"{self.weights} failed on a [{', '.join(map(str, chunk.shape))}] input: "
                                    f"{first}") from None
            if y.ndim == 4 and y.shape[2:] == (1, 1):
                y = y[:, :, 0, 0]
            if y.ndim != 2 or y.shape[0] != step:
                raise FidModelError(f"{self.weights} returned features of shape {list(y.shape)} for a batch of "
                                    f"{step}; expected [{step}, D] or [{step}, D, 1, 1]")
            feats.append(y[:len(x[i:i + step])])
        return np.concatenate(feats).astype(np.float32, copy=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
        return torch.from_numpy(self._run(np.ascontiguousarray(x.detach().cpu().numpy())))


def _image_files(folder: Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise IdtoError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise IdtoError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def _read_rgb(path: Path) -> np.ndarray:
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.array(ImageOps.exif_transpose(im).convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise IdtoError(f"cannot read image {path}: {exc}") from None


def load_images(folder: Path, limit: int | None = None) -> list[np.ndarray]:
    """The PNG/JPG/WebP images in ``folder`` (sorted by name, first ``limit``) as RGB uint8 [H, W, 3]."""
    return [_read_rgb(p) for p in _image_files(folder)[:limit]]


def _to_tensor(img: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """One image (uint8, or float in [0, 1]; [H, W] or [H, W, 3]) -> float [3, *size] in [0, 1]."""
    a = np.asarray(img)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] != 3 or min(a.shape[:2]) < 1:
        raise IdtoError(f"FID images must be [H, W, 3] RGB (composite RGBA over a background first); got shape "
                        f"{list(a.shape)}")
    if a.dtype == np.uint8:
        x = torch.from_numpy(a.astype(np.float32)) / 255.0
    elif np.issubdtype(a.dtype, np.floating) and np.isfinite(a).all() and a.min() >= 0.0 and a.max() <= 1.0:
        x = torch.from_numpy(a.astype(np.float32))
    else:
        raise IdtoError(f"FID images must be uint8 or float in [0, 1]; got {a.dtype}")
    x = x.permute(2, 0, 1)[None]
    if tuple(x.shape[-2:]) != size:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
    return x[0]


def _batches(images: Iterable[np.ndarray], size: tuple[int, int], batch_size: int) -> Iterator[torch.Tensor]:
    buf: list[torch.Tensor] = []
    for img in images:
        buf.append(_to_tensor(img, size))
        if len(buf) == batch_size:
            yield torch.stack(buf)
            buf = []
    if buf:
        yield torch.stack(buf)


def _extractor(weights: str | Path | OnnxFeatureExtractor) -> OnnxFeatureExtractor:
    return weights if isinstance(weights, OnnxFeatureExtractor) else OnnxFeatureExtractor(weights)


def _fid(sides: dict[bool, tuple[Iterable[np.ndarray], int]], extractor: OnnxFeatureExtractor, batch_size: int,
         progress: bool) -> float:
    from torchmetrics.image.fid import FrechetInceptionDistance

    from idto3d.core.progress import progress_bar

    if batch_size < 1:
        raise IdtoError(f"batch_size must be >= 1, got {batch_size}")
    for real, (_, n) in sides.items():
        name = "reference" if real else "generated"
        if n < 2:
            raise IdtoError(f"FID needs at least 2 {name} images, got {n}")
        if n < FEW_IMAGES:
            warnings.warn(f"FID from only {n} {name} images is noisy and biased upwards; use thousands for a "
                          "meaningful value", FidWarning, stacklevel=3)
    # normalize=True: with a custom module this only tells torchmetrics we pass float [0, 1] images
    # (it hands them to the module unchanged); num_features spares its dummy forward.
    metric = FrechetInceptionDistance(feature=extractor, normalize=True)
    with progress_bar("FID features", sum(n for _, n in sides.values()), enabled=progress) as update:
        for real, (images, _) in sides.items():
            for batch in _batches(images, extractor.size, batch_size):
                metric.update(batch, real=real)
                update(len(batch))
    return float(metric.compute())


def fid(generated: Sequence[np.ndarray], reference: Sequence[np.ndarray],
        weights: str | Path | OnnxFeatureExtractor, batch_size: int = 32, progress: bool = True) -> float:
    """FID between two image sets (RGB uint8 or float [0, 1], any sizes) with the ONNX feature network."""
    ext = _extractor(weights)
    return _fid({True: (reference, len(reference)), False: (generated, len(generated))}, ext, batch_size, progress)


def fid_from_folders(generated: list[np.ndarray], reference_dir: Path,
                     weights: str | Path | OnnxFeatureExtractor, batch_size: int = 32, limit: int | None = None,
                     progress: bool = True) -> float:
    """FID of ``generated`` against the images in ``reference_dir`` (streamed, first ``limit`` by name)."""
    ext = _extractor(weights)
    files = _image_files(reference_dir)[:limit]
    return _fid({True: ((_read_rgb(p) for p in files), len(files)), False: (generated, len(generated))},
                ext, batch_size, progress)

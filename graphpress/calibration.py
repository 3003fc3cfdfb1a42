"""Calibration data for the command line: a `.npz`, a directory of `.npy` files, or a directory of images.

    data = load_calibration("calib.npz", model, batch_size=8)         # keys = the model's input names
    data = load_calibration("calib_npy/", model)                      # input_ids.npy, attention_mask.npy
    data = load_calibration("images/", model, preprocess=ImagePreprocess(scale="symmetric"))
    for batch in data: ...                                            # {input name: array}, re-iterable

Every source is checked against the model's inputs up front (names, per-sample shapes, dtypes) and a
mismatch is a `GraphpressError` naming the file and what is wrong. Batches are produced lazily: `.npy`
files are memory-mapped and images are decoded batch by batch, so the set can exceed memory (a `.npz`
is read one array at a time). The CLI wires this up with `add_calibration_options` and
`calibration_from_args`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Literal

import numpy as np
import onnx

from .errors import GraphpressError
from .ir import Model
from .ir.execute import fed_inputs

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm")
#: pixel scalings by name: what `x` (0..255) becomes before mean/std
SCALES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "raw": lambda x: x,                      # 0..255
    "unit": lambda x: x / 255.0,             # 0..1
    "symmetric": lambda x: x / 127.5 - 1.0,  # -1..1 (TF MobileNets)
}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class InputSpec:
    """A model input: name, numpy dtype, and per-dimension size (None where symbolic)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...]

    def check_sample_shape(self, shape: tuple[int, ...], where: str) -> None:
        """Refuse a per-sample shape (without the batch dim) that contradicts the model's static dims."""
        expected = self.shape[1:]
        if len(shape) != len(expected) or any(e is not None and e != s for e, s in zip(expected, shape)):
            shown = "x".join("?" if d is None else str(d) for d in expected)
            raise GraphpressError(f"{where}: samples of shape {'x'.join(map(str, shape)) or 'scalar'} do not fit "
                                  f"model input {self.name!r} (per sample {shown})")


def model_inputs(model: Model | onnx.ModelProto) -> list[InputSpec]:
    """The model's real inputs (initializers excluded)."""
    proto = model.to_onnx() if isinstance(model, Model) else model
    specs = []
    for value in fed_inputs(proto):
        ttype = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in ttype.shape.dim)
        specs.append(InputSpec(value.name, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type)), dims))
    return specs


@dataclass(frozen=True)
class ImagePreprocess:
    """How images become model input: resize, layout, pixel scaling and optional mean/std."""

    size: tuple[int, int] | None = None               # (height, width); default: the model input's
    layout: Literal["nchw", "nhwc"] | None = None      # default: guessed from where the model has 1 or 3 channels
    scale: Literal["raw", "unit", "symmetric", "imagenet"] = "unit"  # imagenet = unit, then ImageNet mean/std
    mean: tuple[float, ...] | None = None             # subtracted per channel after scaling
    std: tuple[float, ...] | None = None              # divided per channel after the mean


class CalibrationData:
    """A re-iterable of {input name: batch} dicts, made lazily from `count` samples.

    A model with a static batch dimension gets batches of exactly that size (a trailing partial batch
    is dropped), whatever `batch_size` asks for.
    """

    def __init__(self, source: str, count: int, batch_size: int,
                 take: Callable[[int, int], dict[str, np.ndarray]], inputs: list[InputSpec]):
        if batch_size < 1:
            raise GraphpressError(f"calibration batch size must be at least 1, got {batch_size}")
        static = {spec.shape[0] for spec in inputs if spec.shape and spec.shape[0] is not None}
        if static:
            batch_size = static.pop()
            count -= count % batch_size
            if count == 0:
                raise GraphpressError(f"{source}: the model takes batches of exactly {batch_size}; "
                                      f"give at least {batch_size} samples")
        self.source, self.count, self.batch_size, self._take = source, count, batch_size, take

    def __len__(self) -> int:
        return -(-self.count // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, self.count, self.batch_size):
            yield self._take(start, min(start + self.batch_size, self.count))

    def __repr__(self) -> str:
        return f"<CalibrationData {self.source}: {self.count} samples in batches of {self.batch_size}>"


def load_calibration(path: str | Path, model: Model | onnx.ModelProto, batch_size: int = 8,
                     limit: int | None = None, preprocess: ImagePreprocess | None = None) -> CalibrationData:
    """Calibration batches from `path` (see the module docstring), checked against `model`'s inputs."""
    path = Path(path)
    inputs = model_inputs(model)
    if not path.exists():
        raise GraphpressError(f"{path}: no such calibration file or directory")
    if path.is_file():
        if path.suffix != ".npz":
            raise GraphpressError(f"{path}: calibration files must be .npz (or give a directory of .npy or images)")
        arrays = _read_npz(path)
    elif any(p.suffix == ".npy" for p in path.iterdir()):
        arrays = {name: np.load(file, mmap_mode="r") for name, file in _npy_files(path, inputs).items()}
    else:
        return _images(path, inputs, preprocess or ImagePreprocess(), batch_size, limit)
    return _arrays(str(path), arrays, inputs, batch_size, limit)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except (OSError, ValueError) as exc:
        raise GraphpressError(f"{path}: not a readable .npz file ({exc})") from exc


def file_stem(input_name: str) -> str:
    """The .npy file name (without suffix) expected for a model input: path separators become '_'."""
    return input_name.replace("/", "_").replace("\\", "_").replace(":", "_")


def _npy_files(directory: Path, inputs: list[InputSpec]) -> dict[str, Path]:
    files = {}
    for spec in inputs:
        file = directory / f"{file_stem(spec.name)}.npy"
        if not file.is_file():
            present = ", ".join(sorted(p.name for p in directory.glob("*.npy")))
            raise GraphpressError(f"{directory}: no {file.name} for model input {spec.name!r} (found: {present})")
        files[spec.name] = file
    return files


def _arrays(source: str, arrays: dict[str, np.ndarray], inputs: list[InputSpec], batch_size: int,
            limit: int | None) -> CalibrationData:
    names = [spec.name for spec in inputs]
    extra = sorted(set(arrays) - set(names))
    if extra:
        raise GraphpressError(f"{source}: {extra[0]!r} is not a model input (inputs: {', '.join(names)})")
    missing = [n for n in names if n not in arrays]
    if missing:
        raise GraphpressError(f"{source}: no array for model input {missing[0]!r} (it has: {', '.join(arrays)})")
    checked = {spec.name: _checked_array(f"{source}[{spec.name}]", arrays[spec.name], spec) for spec in inputs}
    counts = {name: len(a) for name, a in checked.items()}
    if len(set(counts.values())) > 1:
        raise GraphpressError(f"{source}: inputs hold different numbers of samples ({counts})")
    count = min(next(iter(counts.values())), limit if limit is not None else np.inf)
    if count == 0:
        raise GraphpressError(f"{source}: holds no samples")
    dtypes = {spec.name: spec.dtype for spec in inputs}
    return CalibrationData(source, int(count), batch_size,
                           lambda a, b: {n: np.asarray(v[a:b], dtype=dtypes[n]) for n, v in checked.items()}, inputs)


def _checked_array(where: str, array: np.ndarray, spec: InputSpec) -> np.ndarray:
    """`array` with a batch dimension, after checking its shape and that its dtype converts safely."""
    if array.ndim == len(spec.shape) - 1:
        array = array[None]
    if array.ndim < 1:
        raise GraphpressError(f"{where}: a scalar; expected samples for input {spec.name!r}")
    spec.check_sample_shape(tuple(array.shape[1:]), where)
    if (array.dtype.kind == "f" and spec.dtype.kind != "f") or array.dtype.kind not in "fiub":
        raise GraphpressError(f"{where}: dtype {array.dtype} cannot feed input {spec.name!r} of type {spec.dtype}")
    return array


def _images(directory: Path, inputs: list[InputSpec], pre: ImagePreprocess, batch_size: int,
            limit: int | None) -> CalibrationData:
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise GraphpressError(f"{directory}: no .npy files and no images ({', '.join(IMAGE_SUFFIXES)})")
    if len(inputs) != 1 or len(inputs[0].shape) != 4:
        raise GraphpressError(f"{directory}: images can feed only a model with one 4-D input; "
                              f"this one has {', '.join(s.name for s in inputs)} (use .npz or .npy instead)")
    spec = inputs[0]
    layout = pre.layout or _guess_layout(spec, directory)
    channels = spec.shape[1] if layout == "nchw" else spec.shape[3]
    size = pre.size or (spec.shape[2:4] if layout == "nchw" else spec.shape[1:3])
    if size is None or None in size:
        raise GraphpressError(f"{directory}: the model input {spec.name!r} has no static height/width; "
                              "give the image size (--calib-size HxW)")
    files = files[:limit] if limit is not None else files
    convert = _pixel_transform(pre, channels or 3)

    def take(start: int, stop: int) -> dict[str, np.ndarray]:
        batch = np.stack([convert(_read_image(f, size, channels or 3)) for f in files[start:stop]])
        return {spec.name: (batch.transpose(0, 3, 1, 2) if layout == "nchw" else batch).astype(spec.dtype)}

    return CalibrationData(str(directory), len(files), batch_size, take, inputs)


def _guess_layout(spec: InputSpec, directory: Path) -> str:
    _, d1, _, d3 = spec.shape
    if d1 in (1, 3) and d3 not in (1, 3):
        return "nchw"
    if d3 in (1, 3):
        return "nhwc"
    raise GraphpressError(f"{directory}: cannot tell whether input {spec.name!r} is NCHW or NHWC; "
                          "give --calib-layout")


def _read_image(file: Path, size: tuple[int, int], channels: int) -> np.ndarray:
    """An image as float32 [height, width, channels] in 0..255, resized (bilinear) to `size`."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(file) as image:
            image = image.convert("L" if channels == 1 else "RGB")
            if image.size != (size[1], size[0]):
                image = image.resize((size[1], size[0]), Image.BILINEAR)
            pixels = np.asarray(image, dtype=np.float32)
    except (OSError, UnidentifiedImageError) as exc:
        raise GraphpressError(f"{file}: not a readable image ({exc})") from exc
    return pixels[..., None] if pixels.ndim == 2 else pixels


def _pixel_transform(pre: ImagePreprocess, channels: int) -> Callable[[np.ndarray], np.ndarray]:
    mean, std = pre.mean, pre.std
    if pre.scale == "imagenet":
        mean, std = mean or IMAGENET_MEAN, std or IMAGENET_STD
    scale = SCALES["unit" if pre.scale == "imagenet" else pre.scale]
    for name, values in (("mean", mean), ("std", std)):
        if values is not None and len(values) not in (1, channels):
            raise GraphpressError(f"--calib-{name} has {len(values)} values; the model takes {channels} channels")
    shift = np.asarray(mean if mean is not None else (0.0,), np.float32)
    divide = np.asarray(std if std is not None else (1.0,), np.float32)
    return lambda x: (scale(x) - shift) / divide


# ---- command line ----------------------------------------------------------------------------------------
def add_calibration_options(parser: argparse.ArgumentParser) -> None:
    """The options that shape --calib data (the command adds --calib itself)."""
    group = parser.add_argument_group("calibration data (--calib)")
    group.add_argument("--calib-batch-size", type=int, default=8, metavar="N", help="samples per calibration batch")
    group.add_argument("--calib-limit", type=int, default=None, metavar="N", help="use only the first N samples")
    group.add_argument("--calib-size", default=None, metavar="HxW", help="resize images to this (default: the model's)")
    group.add_argument("--calib-layout", choices=("nchw", "nhwc"), default=None,
                       help="image tensor layout (default: guessed from the model input)")
    group.add_argument("--calib-scale", choices=("raw", "unit", "symmetric", "imagenet"), default="unit",
                       help="pixels: raw 0..255, unit x/255, symmetric x/127.5-1, imagenet unit then mean/std")
    group.add_argument("--calib-mean", default=None, metavar="M[,M,M]", help="per-channel mean subtracted after scaling")
    group.add_argument("--calib-std", default=None, metavar="S[,S,S]", help="per-channel std divided after the mean")


def calibration_from_args(args: argparse.Namespace, model: Model) -> CalibrationData | None:
    """The calibration data named by `--calib` and shaped by the options above (None without --calib)."""
    if getattr(args, "calib", None) is None:
        return None
    preprocess = ImagePreprocess(size=_parse_size(args.calib_size), layout=args.calib_layout,
                                 scale=args.calib_scale, mean=_parse_floats(args.calib_mean, "--calib-mean"),
                                 std=_parse_floats(args.calib_std, "--calib-std"))
    return load_calibration(args.calib, model, batch_size=args.calib_batch_size, limit=args.calib_limit,
                            preprocess=preprocess)


def _parse_size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    parts = text.lower().replace("*", "x").split("x")
    try:
        height, width = (int(p) for p in (parts * 2 if len(parts) == 1 else parts))
    except ValueError:
        raise GraphpressError(f"--calib-size {text!r}: expected HxW such as 224x224") from None
    return height, width


def _parse_floats(text: str | None, flag: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise GraphpressError(f"{flag} {text!r}: expected comma-separated numbers") from None

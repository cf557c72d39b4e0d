"""Image loading for every datamodule: fast JPEG decoding, reduced-size decoding, clear errors.

One entry point, :func:`load_image`, turns a file into a uint8 RGB tensor ``(3, H, W)``:

- JPEGs are decoded by ``torchvision.io.decode_jpeg`` (libjpeg-turbo on CPU, nvjpeg when a CUDA
  device is asked for and present); anything torchvision cannot decode, and every other format,
  goes through PIL. On CPU at full size the pixels are those of ``cv2.imread`` (the official CVNet
  tester's reader) and of PIL, bit for bit (tested on real photos).
- With ``max_side``, a JPEG that must shrink by 2x or more is decoded by PIL at 1/2, 1/4 or 1/8
  size straight from its DCT coefficients (``Image.draft``), so a 4000 px photo is never fully
  decoded only to be thrown away. The final resize is bilinear with antialiasing (the same filter
  PIL's ``resize`` uses), and never enlarges.
- The EXIF orientation is read once from the file header by PIL (``Image.getexif``, which also
  honours an XMP orientation) and applied with tensor flips/transposes on every path, so the CPU,
  GPU and PIL paths agree with each other and with ``PIL.ImageOps.exif_transpose`` by construction
  (torchvision's own ``apply_exif_orientation`` exists only on CPU).
- Grayscale, CMYK, palette, 16-bit and alpha images become 3-channel RGB; alpha is dropped, as
  ``Image.convert("RGB")`` does.
- A missing, empty, truncated, corrupt or unsupported file raises :class:`ImageLoadError` naming
  the path (a JPEG whose data was cut short but still ends with an end marker is the exception:
  libjpeg decodes it, grey below the cut, with only a warning on stderr); so does a file larger
  than ``MAX_FILE_BYTES`` (checked before it is read) and an image of more than
  ``MAX_IMAGE_PIXELS`` pixels (checked on the header, before any pixel is decoded: a
  decompression bomb costs nothing). Datasets that prefer to drop bad files use :func:`load_image_or_skip` with a
  :class:`LoadPolicy`, which counts and logs what it skipped.

The returned tensor may be a strided view (channels-last memory, or a transposed view for
rotated photos); call ``.contiguous()`` when a dense layout matters. Copying by default would cost
about as much as the decode itself.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from retrieval_lightning.layers.scale_resize import scaled_size

__all__ = [
    "MAX_FILE_BYTES",
    "MAX_IMAGE_PIXELS",
    "ImageLoadError",
    "LoadPolicy",
    "SkipPolicy",
    "apply_orientation",
    "exif_orientation",
    "image_size",
    "load_image",
    "load_image_or_skip",
    "resize_by",
    "to_float",
]

log = logging.getLogger(__name__)

_ORIENTATION_TAG = 0x0112
_JPEG_FORMATS = frozenset({"JPEG", "MPO"})
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})
#: files larger than this are refused before being read (default of ``load_image(max_bytes=...)``)
MAX_FILE_BYTES = 128 << 20
#: images with more pixels are refused from their header (PIL's own warning threshold, 256 MiB of RGB)
MAX_IMAGE_PIXELS = 89_478_485


def _image_ops_available(torchvision_image: Any) -> bool:
    """Whether torchvision's image extension loaded: its private ``_has_image_ops`` where it has one (not every
    version setup.cfg allows), else the registered op itself."""
    has_ops = getattr(torchvision_image, "_has_image_ops", None)
    if callable(has_ops):
        return bool(has_ops())
    try:
        return hasattr(torch.ops.image, "decode_jpeg")
    except Exception:  # noqa: BLE001 - an op namespace that cannot load: no extension
        return False


def _load_torchvision_decoder() -> Callable[..., torch.Tensor] | None:
    """Return torchvision's JPEG decoder, or None when its image extension is missing.

    torchvision 0.29 deprecates its codecs (one DeprecationWarning per call); the filter below
    silences exactly that message so a data loader does not print it millions of times.
    """
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
        from torchvision.io import image as torchvision_image
    except ImportError:
        return None
    if not _image_ops_available(torchvision_image):
        return None
    warnings.filterwarnings(
        "ignore",
        message=r"The image decoding and encoding capabilities of TorchVision are deprecated",
        category=DeprecationWarning,
    )

    def decode(data: torch.Tensor, device: torch.device) -> torch.Tensor:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)

    return decode


_tv_decode_jpeg = _load_torchvision_decoder()


class ImageLoadError(RuntimeError):
    """An image file that cannot be loaded; ``path`` and ``cause`` say which and why.

    ``ImageLoadError(message)`` with a single argument is accepted too, because PyTorch's
    DataLoader re-raises a worker's exception by calling its class with one message string.
    """

    def __init__(self, path: str | os.PathLike[str], cause: str | None = None) -> None:
        if cause is None:
            super().__init__(str(path))
            self.path: str | None = None
            self.cause = str(path)
        else:
            self.path = os.fspath(path)
            self.cause = cause
            super().__init__(f"cannot load image {self.path!r}: {cause}")

    def __reduce__(self) -> tuple[type[ImageLoadError], tuple[str | None, ...]]:
        if self.path is None:
            return type(self), (self.cause,)
        return type(self), (self.path, self.cause)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _read_bytes(path: str, max_bytes: int) -> bytearray:
    """Read the whole file into a writable buffer (torch.frombuffer needs one, without a copy).

    The size is checked before anything is allocated, so a huge file costs nothing.
    """
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > max_bytes:
                raise ImageLoadError(path, f"file is {size} bytes, more than the limit of {max_bytes}")
            data = bytearray(size)
            n_read = handle.readinto(data)
    except FileNotFoundError:
        raise ImageLoadError(path, "file not found") from None
    except IsADirectoryError:
        raise ImageLoadError(path, "is a directory, not an image file") from None
    except PermissionError:
        raise ImageLoadError(path, "permission denied") from None
    except OSError as exc:
        raise ImageLoadError(path, _describe(exc)) from exc
    if n_read != len(data):
        del data[n_read:]
    if not data:
        raise ImageLoadError(path, "file is empty")
    return data


_PIL_LIMIT_LOCK = threading.Lock()


@contextlib.contextmanager
def _pil_pixel_limit_lifted() -> Iterator[None]:
    """PIL refuses images over twice its ``MAX_IMAGE_PIXELS`` on open, before a larger ``max_pixels``
    asked for here could apply. A lock: the limit is PIL's global, and loader threads open files at once."""
    with _PIL_LIMIT_LOCK:
        limit = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = limit


def _open_header(path: str, source: str | io.BytesIO) -> Image.Image:
    """Open lazily: PIL parses the header (size, mode, EXIF) and decodes no pixels yet."""
    try:
        with _pil_pixel_limit_lifted():  # the caller's own max_pixels check follows, naming the path
            return Image.open(source)
    except FileNotFoundError:
        raise ImageLoadError(path, "file not found") from None
    except IsADirectoryError:
        raise ImageLoadError(path, "is a directory, not an image file") from None
    except UnidentifiedImageError:
        raise ImageLoadError(path, "unsupported or unrecognised image format") from None
    except Exception as exc:
        raise ImageLoadError(path, _describe(exc)) from exc


def _orientation(img: Image.Image) -> int:
    """EXIF orientation 1..8 from the header; 1 when absent or unreadable.

    For PNG only an eXIf chunk before the pixel data counts: asking PIL for EXIF found later would
    decode the whole image, and :func:`image_size` must stay header-only and agree with
    :func:`load_image`.
    """
    try:
        if img.format == "PNG":
            raw = img.info.get("exif")
            if not raw:
                return 1
            exif = Image.Exif()
            exif.load(raw)
        else:
            exif = img.getexif()
        value = int(exif.get(_ORIENTATION_TAG, 1))
    except Exception:
        return 1
    return value if 1 <= value <= 8 else 1


@functools.cache
def _pil_orients_tiffs() -> bool:
    """Whether this Pillow turns a TIFF upright itself (its header size is then the upright one and its decode
    upright pixels), probed once on a 1x2 TIFF of orientation 6: applied again, the image turned twice."""
    exif = Image.Exif()
    exif[_ORIENTATION_TAG] = 6
    buffer = io.BytesIO()
    Image.new("L", (2, 1)).save(buffer, format="TIFF", exif=exif.tobytes())
    with Image.open(buffer) as probe:
        return probe.size == (1, 2)


def _decoded_upright(header: Image.Image) -> bool:
    """Whether PIL gives ``header``'s size and pixels already turned per its EXIF orientation."""
    return header.format == "TIFF" and _pil_orients_tiffs()


def _unorient(img: torch.Tensor, orientation: int) -> torch.Tensor:
    """Undo :func:`_orient`: the stored frame of an upright image (6 and 8 are each other's inverse)."""
    return _orient(img, {6: 8, 8: 6}.get(orientation, orientation))


def _orient(img: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply an EXIF orientation to a (C, H, W) tensor, matching ``ImageOps.exif_transpose``."""
    if orientation == 2:
        return img.flip(2)
    if orientation == 3:
        return img.flip(1, 2)
    if orientation == 4:
        return img.flip(1)
    if orientation == 5:
        return img.transpose(1, 2)
    if orientation == 6:
        return img.transpose(1, 2).flip(2)
    if orientation == 7:
        return img.transpose(1, 2).flip(1, 2)
    if orientation == 8:
        return img.transpose(1, 2).flip(1)
    return img


def _target_size(width: int, height: int, max_side: int | None) -> tuple[int, int] | None:
    """(width, height) with the long side equal to max_side, or None when no shrink is needed."""
    if max_side is None or max(width, height) <= max_side:
        return None
    scale = max_side / max(width, height)
    if width >= height:
        return max_side, max(1, int(height * scale + 0.5))
    return max(1, int(width * scale + 0.5)), max_side


def _pil_to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; 16-bit grey is rescaled (PIL's own convert would clip it)."""
    if img.mode == "RGB":
        return img
    if img.mode in _SIXTEEN_BIT_MODES:
        grey = np.asarray(img).astype(np.int64).clip(0, 65535)
        grey8 = ((grey * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(grey8, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def _decode_pil(path: str, img: Image.Image, draft: tuple[int, int] | None) -> torch.Tensor:
    """Decode with PIL, at a reduced DCT scale when ``draft`` asks for one (JPEG only)."""
    try:
        if draft is not None:
            img.draft("RGB", draft)
        img.load()
        rgb = _pil_to_rgb(img)
        array = np.array(rgb, dtype=np.uint8)
    except Exception as exc:
        raise ImageLoadError(path, _describe(exc)) from exc
    if array.ndim != 3 or array.shape[2] != 3:
        raise ImageLoadError(path, f"decoded to an array of shape {array.shape}, expected (H, W, 3)")
    return torch.from_numpy(array).permute(2, 0, 1)


def _decode_torchvision(path: str, data: bytearray, device: torch.device) -> torch.Tensor | None:
    """Decode a JPEG with torchvision on ``device`` (then on CPU); None if it cannot."""
    if _tv_decode_jpeg is None:
        return None
    encoded = torch.frombuffer(data, dtype=torch.uint8)
    devices = [device] if device.type == "cpu" else [device, torch.device("cpu")]
    for dev in devices:
        try:
            return _tv_decode_jpeg(encoded, dev)
        except RuntimeError as exc:
            log.debug("torchvision could not decode %s on %s (%s)", path, dev, _describe(exc))
    return None


def _resize(img: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Antialiased bilinear resize of a uint8 (C, H, W) tensor: PIL's BILINEAR to within 1 level, 2 on a few
    values in 10^5 (measured on real photos)."""
    batch = img.unsqueeze(0)
    if img.device.type == "cpu":
        out = F.interpolate(batch, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
        return out[0]
    out = F.interpolate(batch.float(), size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return out[0].round_().clamp_(0, 255).to(torch.uint8)


def _decode_device(device: str | torch.device) -> torch.device:
    """Where decoded pixels should live: the requested device, or CPU when CUDA is absent."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        return torch.device("cpu")
    return dev


def _check_pixels(path: str, width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageLoadError(path, f"{width}x{height} = {width * height} pixels, more than the limit of "
                                   f"{max_pixels} (a decompression bomb?)")


def _check_max_side(max_side: int | None) -> None:
    if max_side is None:
        return
    if isinstance(max_side, bool) or not isinstance(max_side, int) or max_side < 1:
        raise ValueError(f"max_side must be a positive int or None, got {max_side!r}")


def load_image(
    path: str | os.PathLike[str],
    max_side: int | None = None,
    *,
    device: str | torch.device = "cpu",
    orient: bool = True,
    max_pixels: int | None = None,
    max_bytes: int | None = None,
) -> torch.Tensor:
    """Load an image file as a uint8 RGB tensor of shape (3, H, W), upright per its EXIF.

    ``max_side`` caps the longer side (aspect kept, never enlarged); large JPEGs are then decoded
    at reduced DCT scale first. ``device="cuda"`` decodes JPEGs with nvjpeg when CUDA is present
    and returns a CUDA tensor; without CUDA the result stays on CPU. Raises
    :class:`ImageLoadError` naming ``path`` for missing, empty, truncated, corrupt or unsupported
    files, for files over ``max_bytes`` and images over ``max_pixels`` (defaults
    :data:`MAX_FILE_BYTES` and :data:`MAX_IMAGE_PIXELS`). ``orient=False`` keeps the stored pixel
    frame (EXIF orientation ignored), the frame in which revisitop's query boxes were drawn.
    """
    return load_image_sized(path, max_side, device=device, orient=orient, max_pixels=max_pixels,
                            max_bytes=max_bytes)[0]


def load_image_sized(
    path: str | os.PathLike[str],
    max_side: int | None = None,
    *,
    device: str | torch.device = "cpu",
    orient: bool = True,
    max_pixels: int | None = None,
    max_bytes: int | None = None,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """:func:`load_image` and the (height, width) of the file's image in the frame returned, before
    ``max_side``: from the header already read, so a shrunk decode still knows its original size."""
    path_str = os.fspath(path)
    _check_max_side(max_side)
    dev = _decode_device(device)
    data = _read_bytes(path_str, MAX_FILE_BYTES if max_bytes is None else max_bytes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused just below, with the path
        header = _open_header(path_str, io.BytesIO(data))
    with header:
        upright = _decoded_upright(header)  # PIL turns a TIFF itself: its size and pixels are upright already
        orientation = _orientation(header) if orient or upright else 1
        width, height = header.size
        _check_pixels(path_str, width, height, MAX_IMAGE_PIXELS if max_pixels is None else max_pixels)
        target = _target_size(width, height, max_side)
        img = None
        draft = None
        if header.format in _JPEG_FORMATS:
            if target is not None and min(width // target[0], height // target[1]) >= 2:
                draft = target
            else:
                img = _decode_torchvision(path_str, data, dev)
        if img is None:
            img = _decode_pil(path_str, header, draft)
    img = img.to(dev)
    if target is not None and tuple(img.shape[1:]) != (target[1], target[0]):
        img = _resize(img, *target)
    if upright:
        if orient:
            return img, (height, width)
        return _unorient(img, orientation), _frame_size(width, height, orientation)  # the stored frame
    return _orient(img, orientation), _frame_size(width, height, orientation)


def _frame_size(width: int, height: int, orientation: int) -> tuple[int, int]:
    """(height, width) of a ``width`` x ``height`` image turned by ``orientation`` (5 - 8 swap the sides)."""
    return (width, height) if orientation >= 5 else (height, width)


def resize_by(image: torch.Tensor, factor: float) -> torch.Tensor:
    """Resize a (3,H,W) tensor to ``(round(H*f), round(W*f))`` (at least 1), bilinear + antialias: the
    evaluation resize of the datamodules, and of ``search``'s queries (sized as their database was)."""
    if factor == 1.0:
        return image
    from torchvision.transforms.v2 import functional as TF  # as the decoder: torchvision loaded when used

    size = list(scaled_size(image.shape[1], image.shape[2], factor))
    return TF.resize(image, size, interpolation=TF.InterpolationMode.BILINEAR, antialias=True)


def to_float(img_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 image(s) of any shape to float32 in [0, 1], the form datamodules hand to models."""
    if img_uint8.dtype != torch.uint8:
        raise TypeError(f"to_float expects a uint8 tensor, got {img_uint8.dtype}")
    return img_uint8.to(torch.float32).div_(255.0)


def exif_orientation(path: str | os.PathLike[str]) -> int:
    """The EXIF orientation (1..8) that :func:`load_image` applies, read from the header only."""
    path_str = os.fspath(path)
    with _open_header(path_str, path_str) as header:
        return _orientation(header)


def apply_orientation(img: torch.Tensor, orientation: int) -> torch.Tensor:
    """Turn a (C, H, W) tensor in the stored frame upright, as ``load_image`` does (a view)."""
    return _orient(img, orientation)


def image_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(width, height) as :func:`load_image` would return it (after EXIF orientation), header only."""
    path_str = os.fspath(path)
    with _open_header(path_str, path_str) as header:
        width, height = header.size
        orientation = 1 if _decoded_upright(header) else _orientation(header)
    return (height, width) if orientation >= 5 else (width, height)


@dataclass
class LoadPolicy:
    """What to do with an unreadable image: ``"raise"`` it, or ``"skip"`` it and keep a record.

    Under ``"skip"`` every skipped path is appended to ``skipped`` and logged at WARNING level.
    Each DataLoader worker process holds its own copy, so counts made in workers stay there;
    the log lines are what reaches the main process.
    """

    on_error: Literal["raise", "skip"] = "raise"
    skipped: list[str] = field(default_factory=list)
    #: appended to a raised error: how the user switches to skipping (the owner's option name)
    hint: str | None = None

    def __post_init__(self) -> None:
        if self.on_error not in ("raise", "skip"):
            raise ValueError(f"LoadPolicy.on_error must be 'raise' or 'skip', got {self.on_error!r}")

    @property
    def count(self) -> int:
        """How many loads were skipped so far (a bad file read every epoch counts every time)."""
        return len(self.skipped)

    def handle(self, error: ImageLoadError) -> None:
        """Raise ``error`` or record it, according to ``on_error``."""
        if self.on_error == "raise":
            if self.hint and error.path is not None:
                raise ImageLoadError(error.path, f"{error.cause} ({self.hint})") from error
            raise error
        path = error.path if error.path is not None else str(error)
        self.skipped.append(path)
        log.warning("skipping unreadable image %s: %s", path, error.cause)


@dataclass
class SkipPolicy(LoadPolicy):
    """A :class:`LoadPolicy` that skips by default."""

    on_error: Literal["raise", "skip"] = "skip"


def load_image_or_skip(
    path: str | os.PathLike[str],
    policy: LoadPolicy,
    max_side: int | None = None,
    *,
    device: str | torch.device = "cpu",
    orient: bool = True,
    sized: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, tuple[int, int]] | None:
    """:func:`load_image` (with ``sized``: :func:`load_image_sized`), or None for an unreadable file
    when ``policy`` skips such files."""
    try:
        loaded = load_image_sized(path, max_side, device=device, orient=orient)
    except ImageLoadError as error:
        policy.handle(error)
        return None
    return loaded if sized else loaded[0]

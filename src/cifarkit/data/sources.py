"""Where images come from: torchvision's CIFAR-10 or a folder of class sub-folders.

Everything is turned into uint8 tensors (N, 3, H, W) once. Folder decodes are cached on disk, keyed
on the folder's listing (paths, sizes, mtimes) and the image size, so a second run starts in
seconds instead of re-decoding every JPEG.
"""
from __future__ import annotations

import hashlib
import io
import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import CifarkitError
from .tensors import TensorSplit

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm",
                    ".pgm", ".pbm")
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                   "truck"]
CACHE_VERSION = 1


@dataclass
class DataBundle:
    """Train images plus an optional held-out split that came with the data (val/ or test/)."""
    train: TensorSplit
    classes: list[str]
    splits: dict[str, TensorSplit] = field(default_factory=dict)  # e.g. {"test": ...}
    source: str = ""


def default_data_root() -> Path:
    env = os.environ.get("CIFARKIT_DATA")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cifarkit" / "data"


def cache_dir() -> Path:
    env = os.environ.get("CIFARKIT_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cifarkit" / "decoded"


# ----------------------------------------------------------------------------- CIFAR-10 (official)

def load_cifar10(root: str | os.PathLike | None = None, download: bool = True) -> DataBundle:
    """CIFAR-10 via torchvision (md5-checked download and extraction)."""
    import torchvision

    root = Path(root) if root else default_data_root()
    archive = root / torchvision.datasets.CIFAR10.filename
    fix = (f"download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz "
           f"(md5 {torchvision.datasets.CIFAR10.tgz_md5}) and place it at {archive}, "
           f"or pass --data-root DIR where it lives, or --data FOLDER for your own images")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sets = {name: torchvision.datasets.CIFAR10(str(root), train=(name == "train"),
                                                       download=download)
                    for name in ("train", "test")}
    except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted" / md5 mismatch
        state = "is corrupt or incomplete" if archive.exists() or (root / "cifar-10-batches-py").exists() \
            else "was not found"
        if archive.exists() and not _md5_ok(archive, torchvision.datasets.CIFAR10.tgz_md5):
            _quarantine(archive)
            state = "archive had a wrong checksum (moved aside as .bad)"
        raise CifarkitError(f"CIFAR-10 under {root} {state} ({str(exc).splitlines()[0]})", fix)
    except OSError as exc:  # URLError (offline), disk errors, truncated tar ...
        if archive.exists() and not _md5_ok(archive, torchvision.datasets.CIFAR10.tgz_md5):
            _quarantine(archive)
        raise CifarkitError(f"cannot get CIFAR-10 into {root}: {exc}", fix)
    except Exception as exc:  # a broken pickle inside a partly extracted folder, tarfile errors
        raise CifarkitError(f"CIFAR-10 files under {root} are unreadable ({type(exc).__name__}: {exc})",
                            f"delete {root / 'cifar-10-batches-py'} and retry; {fix}")

    def split(ds) -> TensorSplit:
        x = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))
        return TensorSplit(x, torch.tensor(ds.targets, dtype=torch.int64))

    return DataBundle(split(sets["train"]), list(sets["train"].classes), {"test": split(sets["test"])},
                      source=f"cifar10:{root}")


def _md5_ok(path: Path, md5: str) -> bool:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest() == md5


def _quarantine(path: Path) -> None:
    """A bad archive is renamed so the next run downloads afresh instead of trusting it."""
    try:
        os.replace(path, path.with_suffix(path.suffix + ".bad"))
    except OSError:
        pass


# ----------------------------------------------------------------------------- image files

def read_image(path_or_bytes, size: int | None = None) -> np.ndarray:
    """Decode any Pillow-readable image to an (H, W, 3) uint8 RGB array, resized to ``size``.

    Handles EXIF rotation, palette/alpha/grey/CMYK modes and 16-bit or float images. Raises
    CifarkitError with the file name when the file is not a readable image.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    name = "<upload>" if isinstance(path_or_bytes, (bytes, bytearray)) else str(path_or_bytes)
    src = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, (bytes, bytearray)) else path_or_bytes
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(src) as img:
                if size and img.format == "JPEG":
                    img.draft("RGB", (size, size))  # decode big JPEGs at reduced scale: far faster
                img = ImageOps.exif_transpose(img)
                img = _to_rgb(img)
                if size and img.size != (size, size):
                    img = img.resize((size, size), Image.BILINEAR, reducing_gap=2.0)
                arr = np.asarray(img, dtype=np.uint8)
    except FileNotFoundError:
        raise CifarkitError(f"{name}: no such file", "check the path")
    except PermissionError:
        raise CifarkitError(f"{name}: permission denied", "make the file readable")
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        what = "is not an image Pillow can read" if isinstance(exc, UnidentifiedImageError) \
            else "is too large to decode safely"
        raise CifarkitError(f"{name} {what}", "remove it or convert it to PNG/JPEG")
    except (OSError, ValueError, SyntaxError, IndexError, TypeError, EOFError) as exc:
        raise CifarkitError(f"{name} is damaged or truncated ({exc})", "remove or replace the file")
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise CifarkitError(f"{name} decoded to an unexpected shape {arr.shape}", "convert it to RGB")
    return arr


def _to_rgb(img):
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") else max(float(a.max()), 1.0)
        a = np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite transparent pixels on white, like a browser shows them.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def list_class_folder(split_dir: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """(classes, [(relative path, label)]) for split_dir/<class>/**; hidden entries are ignored."""
    try:
        classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    except PermissionError:
        raise CifarkitError(f"cannot read folder {split_dir}: permission denied", "check its permissions")
    if not classes:
        raise CifarkitError(f"{split_dir} has no class folders",
                            "lay images out as DIR/train/<class>/<image>.jpg")
    items: list[tuple[str, int]] = []
    for label, cls in enumerate(classes):
        files = []
        for dirpath, dirnames, filenames in os.walk(split_dir / cls):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            files += [Path(dirpath, f) for f in sorted(filenames) if is_image_file(Path(f))]
        if not files:
            raise CifarkitError(f"class folder {split_dir / cls} has no images",
                                f"add images ({', '.join(IMAGE_EXTENSIONS[:4])} ...) or remove the folder")
        items += [(str(f.relative_to(split_dir)), label) for f in files]
    return classes, items


def _decode_one(args):
    path, size = args
    try:
        return read_image(path, size), None
    except CifarkitError as exc:
        return None, str(exc)


def decode_folder(split_dir: Path, size: int, workers: int | None = None, progress: bool = True):
    """Decode split_dir/<class>/* into a TensorSplit, through the on-disk cache."""
    classes, items = list_class_folder(split_dir)
    key = _listing_key(split_dir, items, size)
    cache = cache_dir() / f"{key}.pt"
    if cache.exists():
        try:
            blob = torch.load(cache, weights_only=True)
            if blob.get("version") == CACHE_VERSION and blob["classes"] == classes:
                return TensorSplit(blob["x"], blob["y"]), classes
        except Exception:
            pass  # a damaged cache is just rebuilt
    paths = [str(split_dir / rel) for rel, _ in items]
    workers = workers or min(len(paths) // 2000 + 1, os.cpu_count() or 1)
    arrays = []
    chunks = ((p, size) for p in paths)
    desc = f"decoding {len(paths)} images in {split_dir}"
    from ..progress import Progress
    bar = Progress(len(paths), desc, unit="img", enabled=progress and len(paths) > 2000)
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            results = pool.map(_decode_one, chunks, chunksize=256)
            for r in results:
                arrays.append(r); bar.update(1)
    else:
        for c in chunks:
            arrays.append(_decode_one(c)); bar.update(1)
    bar.close()
    bad = [(p, err) for p, (arr, err) in zip(paths, arrays) if err]
    if bad:
        raise CifarkitError(f"{len(bad)} unreadable image(s) in {split_dir}; first: {bad[0][1]}",
                            "remove or fix those files, then run again")
    x = torch.from_numpy(np.stack([a for a, _ in arrays]).transpose(0, 3, 1, 2).copy())
    y = torch.tensor([label for _, label in items], dtype=torch.int64)
    try:
        from .. import atomic
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic.torch_save({"version": CACHE_VERSION, "x": x, "y": y, "classes": classes}, cache)
    except OSError as exc:  # a read-only or full cache disk only costs speed
        warnings.warn(f"could not write decode cache {cache}: {exc}")
    return TensorSplit(x, y), classes


def _listing_key(split_dir: Path, items, size: int) -> str:
    h = hashlib.sha256(f"v{CACHE_VERSION}|{size}|{split_dir.resolve()}".encode())
    for rel, label in items:
        st = (split_dir / rel).stat()
        h.update(f"{rel}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def load_folder(root: str | os.PathLike, size: int = 32, progress: bool = True) -> DataBundle:
    root = Path(root)
    if not root.exists():
        raise CifarkitError(f"data folder {root} does not exist",
                            "pass --data DIR with DIR/train/<class>/*.jpg, or --data cifar10")
    if not root.is_dir():
        raise CifarkitError(f"--data {root} is not a folder", "pass a folder laid out as DIR/train/<class>/*")
    if not os.access(root, os.R_OK | os.X_OK):
        raise CifarkitError(f"cannot read folder {root}: permission denied", "check its permissions")
    train_dir = root / "train" if (root / "train").is_dir() else root  # DIR/<class>/* works too
    train, classes = decode_folder(train_dir, size, progress=progress)
    bundle = DataBundle(train, classes, source=f"folder:{root}")
    for name in ("val", "test"):
        d = root / name
        if d.is_dir() and train_dir != root:
            split, split_classes = decode_folder(d, size, progress=progress)
            if split_classes != classes:
                extra = sorted(set(split_classes) - set(classes))
                missing = sorted(set(classes) - set(split_classes))
                if extra:
                    raise CifarkitError(f"{d} has classes not in {train_dir}: {', '.join(extra)}",
                                        "use the same class folders in every split")
                # A subset of classes is fine: relabel to the train split's indices.
                remap = torch.tensor([classes.index(c) for c in split_classes])
                split = TensorSplit(split.x, remap[split.y])
                warnings.warn(f"{d} lacks classes {', '.join(missing)}")
            bundle.splits[name] = split
    return bundle


def load_data(data: str = "cifar10", data_root: str | None = None, download: bool = True,
              image_size: int = 32, progress: bool = True) -> DataBundle:
    """The one entry point: ``data`` is 'cifar10' or a folder path."""
    if data == "cifar10":
        bundle = load_cifar10(data_root, download)
        if image_size != 32:
            bundle.train = bundle.train.resized(image_size)
            bundle.splits = {k: v.resized(image_size) for k, v in bundle.splits.items()}
        return bundle
    return load_folder(data, image_size, progress)

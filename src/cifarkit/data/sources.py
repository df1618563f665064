"""Where images come from: torchvision's CIFAR-10 or a folder of class sub-folders.

Everything is turned into uint8 tensors (N, 3, H, W) once. Folder decodes are written to a
memory-mapped file in the cache folder, keyed on the folder's listing (paths, sizes, mtimes), the
image size and the crop mode: a second run starts at once, and a set larger than memory trains.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..config import user_cache_root
from ..errors import CifarkitError
from .tensors import TensorSplit

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm",
                    ".pgm", ".pbm")
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                   "truck"]
CACHE_VERSION = 2   # 2: memory-mapped .npy images + JSON labels (1: one torch.save file)


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
    return user_cache_root() / "data"


def cache_dir() -> Path:
    env = os.environ.get("CIFARKIT_CACHE")
    if env:
        return Path(env)
    return user_cache_root() / "decoded"


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

CROP_MODES = ("center", "squash")


def preprocess_of(pre: dict) -> tuple[int, str]:
    """(size, crop_mode) of a checkpoint's or export's preprocessing. Files written before
    crop modes existed squashed every image to the square, so that is their default."""
    return int(pre.get("size", 32)), str(pre.get("crop_mode", "squash"))


def read_image(path_or_bytes, size: int | None = None, crop_mode: str = "center") -> np.ndarray:
    """Decode any Pillow-readable image to an (H, W, 3) uint8 RGB array of ``size`` x ``size``.

    ``crop_mode`` center: the shorter side is resized to ``size`` and the centre is cut out, so
    proportions are kept (torchvision's Resize + CenterCrop); squash: the whole image is stretched
    to the square. Handles EXIF rotation, palette/alpha/grey/CMYK modes and 16-bit or float
    images. Raises CifarkitError with the file name when the file is not a readable image.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if crop_mode not in CROP_MODES:
        raise CifarkitError(f"crop mode {crop_mode!r} is not valid", f"choose one of: {', '.join(CROP_MODES)}")
    name = "<upload>" if isinstance(path_or_bytes, (bytes, bytearray)) else str(path_or_bytes)
    src = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, (bytes, bytearray)) else path_or_bytes
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(src) as img:
                if size and img.format == "JPEG":
                    # Decode big JPEGs at a reduced scale (both sides stay >= size): far faster.
                    img.draft("RGB", (size, size))
                img = ImageOps.exif_transpose(img)
                img = _to_rgb(img)
                if size and img.size != (size, size):
                    if crop_mode == "center":
                        img = ImageOps.fit(img, (size, size), Image.BILINEAR, centering=(0.5, 0.5))
                    else:
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
    path, size, crop_mode = args
    try:
        return read_image(path, size, crop_mode), None
    except CifarkitError as exc:
        return None, str(exc)


def decode_folder(split_dir: Path, size: int, workers: int | None = None, progress: bool = True,
                  crop_mode: str = "center"):
    """Decode split_dir/<class>/* into a TensorSplit whose images are a memory-mapped file.

    The decoded images go straight into a uint8 ``.npy`` file in the cache folder (one image in
    memory per worker, never the whole set), which is then mapped: batches read only their pages,
    so a set larger than the machine's memory trains, and a second run maps the finished file at
    once. The cache is keyed on the folder's listing (paths, sizes, mtimes), size and crop mode.
    """
    classes, items = list_class_folder(split_dir)
    key = _listing_key(split_dir, items, size, crop_mode)
    images, meta = cache_dir() / f"{key}.u8.npy", cache_dir() / f"{key}.json"
    cached = _open_cache(images, meta, classes, len(items), size)
    if cached is not None:
        return cached, classes
    paths = [str(split_dir / rel) for rel, _ in items]
    shape = (len(paths), 3, size, size)
    from .. import atomic
    try:
        tmp = atomic.temp_beside(images)
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
    except (CifarkitError, OSError) as exc:   # a read-only or full cache disk only costs speed
        warnings.warn(f"could not write the decode cache in {images.parent} ({exc}); decoding into memory")
        tmp, out = None, np.empty(shape, np.uint8)
    y = [label for _, label in items]
    try:
        _decode_into(out, paths, size, crop_mode, split_dir, workers, progress)
    except BaseException:
        if tmp is not None:
            atomic.discard(tmp)
        raise
    if tmp is not None:
        out.flush()
        try:
            atomic.commit(tmp, images)
            # The label file is written last: it is what says the image file is complete.
            atomic.write_bytes(meta, json.dumps({"version": CACHE_VERSION, "classes": classes,
                                                 "size": size, "labels": y}).encode())
            out = _map(images)   # the same pages, now copy-on-write
        except (OSError, CifarkitError) as exc:   # e.g. the disk filled up: this run goes on
            warnings.warn(f"could not finish the decode cache {images} ({exc}); the next run decodes again")
    return TensorSplit(torch.from_numpy(out), torch.tensor(y, dtype=torch.int64),
                       mapped=tmp is not None), classes


def _decode_into(out: np.ndarray, paths: list, size: int, crop_mode: str, split_dir: Path,
                 workers: int | None, progress: bool) -> None:
    """Decode ``paths`` into the rows of ``out`` (N, 3, size, size), in worker processes."""
    from ..progress import Progress

    workers = workers or min(len(paths) // 2000 + 1, os.cpu_count() or 1)
    jobs = ((p, size, crop_mode) for p in paths)
    bar = Progress(len(paths), f"decoding {len(paths)} images in {split_dir}", unit="img",
                   enabled=progress and len(paths) > 2000)
    bad = []
    try:
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                results = pool.map(_decode_one, jobs, chunksize=256)
                _store(out, results, paths, bad, bar)
        else:
            _store(out, map(_decode_one, jobs), paths, bad, bar)
    finally:
        bar.close()
    if bad:
        raise CifarkitError(f"{len(bad)} unreadable image(s) in {split_dir}; first: {bad[0]}",
                            "remove or fix those files, then run again")


def _store(out, results, paths, bad, bar) -> None:
    for i, (arr, err) in enumerate(results):
        if err:
            bad.append(err)
        else:
            out[i] = arr.transpose(2, 0, 1)
        bar.update(1)


def _map(images: Path) -> np.ndarray:
    # Copy-on-write mapping: tensors over it are writable (no warnings, no accidental edits of
    # the cache), and pages are read from disk only when a batch touches them.
    return np.load(images, mmap_mode="c")


def _open_cache(images: Path, meta: Path, classes: list, n: int, size: int) -> TensorSplit | None:
    """The cached split, or None when it is missing, from another version, or damaged."""
    if not (images.exists() and meta.exists()):
        return None
    try:
        m = json.loads(meta.read_text())
        x = _map(images)
        if (m.get("version") != CACHE_VERSION or m.get("classes") != classes or len(m["labels"]) != n
                or x.shape != (n, 3, size, size) or x.dtype != np.uint8):
            return None
        return TensorSplit(torch.from_numpy(x), torch.tensor(m["labels"], dtype=torch.int64), mapped=True)
    except (OSError, ValueError, KeyError, TypeError):
        return None   # a damaged cache is just rebuilt


def _listing_key(split_dir: Path, items, size: int, crop_mode: str = "center") -> str:
    h = hashlib.sha256(f"v{CACHE_VERSION}|{size}|{crop_mode}|{split_dir.resolve()}".encode())
    for rel, label in items:
        st = (split_dir / rel).stat()
        h.update(f"{rel}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def load_folder(root: str | os.PathLike, size: int = 32, progress: bool = True,
                crop_mode: str = "center") -> DataBundle:
    root = Path(root)
    if not root.exists():
        raise CifarkitError(f"data folder {root} does not exist",
                            "pass --data DIR with DIR/train/<class>/*.jpg, or --data cifar10")
    if not root.is_dir():
        raise CifarkitError(f"--data {root} is not a folder", "pass a folder laid out as DIR/train/<class>/*")
    if not os.access(root, os.R_OK | os.X_OK):
        raise CifarkitError(f"cannot read folder {root}: permission denied", "check its permissions")
    train_dir = root / "train" if (root / "train").is_dir() else root  # DIR/<class>/* works too
    train, classes = decode_folder(train_dir, size, progress=progress, crop_mode=crop_mode)
    bundle = DataBundle(train, classes, source=f"folder:{root}")
    for name in ("val", "test"):
        d = root / name
        if d.is_dir() and train_dir != root:
            split, split_classes = decode_folder(d, size, progress=progress, crop_mode=crop_mode)
            if split_classes != classes:
                extra = sorted(set(split_classes) - set(classes))
                missing = sorted(set(classes) - set(split_classes))
                if extra:
                    raise CifarkitError(f"{d} has classes not in {train_dir}: {', '.join(extra)}",
                                        "use the same class folders in every split")
                # A subset of classes is fine: relabel to the train split's indices.
                remap = torch.tensor([classes.index(c) for c in split_classes])
                split = TensorSplit(split.x, remap[split.y], mapped=split.mapped)
                warnings.warn(f"{d} lacks classes {', '.join(missing)}")
            bundle.splits[name] = split
    return bundle


def load_data(data: str = "cifar10", data_root: str | None = None, download: bool = True,
              image_size: int = 32, progress: bool = True, crop_mode: str = "center") -> DataBundle:
    """The one entry point: ``data`` is 'cifar10' or a folder path; images become
    ``image_size`` squares (``crop_mode``: see read_image)."""
    if data == "cifar10":
        bundle = load_cifar10(data_root, download)
        if image_size != 32:
            bundle.train = bundle.train.resized(image_size)
            bundle.splits = {k: v.resized(image_size) for k, v in bundle.splits.items()}
        return bundle
    return load_folder(data, image_size, progress, crop_mode)

import hashlib
import os
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from cifarkit import CifarkitError
from cifarkit.data import load_data, read_image, stratified_split, channel_stats
from cifarkit.data.sources import load_cifar10, load_folder

from helpers import make_folder, write_cifar_batches


# ----------------------------------------------------------------------------- official CIFAR format

def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def cifar_md5s(monkeypatch):
    """Point torchvision's md5 table at files the test writes (the checks themselves stay real)."""
    def apply(base: Path):
        C = torchvision.datasets.CIFAR10
        monkeypatch.setattr(C, "train_list", [[f"data_batch_{i}", _md5(base / f"data_batch_{i}")] for i in range(1, 6)])
        monkeypatch.setattr(C, "test_list", [["test_batch", _md5(base / "test_batch")]])
        monkeypatch.setitem(C.meta, "md5", _md5(base / "batches.meta"))
    return apply


def test_reads_official_pickled_batches(tmp_path, cifar_md5s):
    base = write_cifar_batches(tmp_path, n_train_per_batch=20, n_test=15)
    cifar_md5s(base)
    bundle = load_cifar10(tmp_path, download=False)
    assert bundle.classes[0] == "airplane" and len(bundle.classes) == 10
    assert bundle.train.x.shape == (100, 3, 32, 32) and bundle.train.x.dtype == torch.uint8
    assert len(bundle.splits["test"]) == 15
    # pixel layout: CIFAR stores R plane, G plane, B plane; we must give back the same numbers
    import pickle
    raw = pickle.loads((base / "data_batch_1").read_bytes())
    assert torch.equal(bundle.train.x[0].flatten(), torch.from_numpy(raw["data"][0]))
    assert bundle.train.y[0].item() == raw["labels"][0]


def _make_archive(tmp_path) -> Path:
    src = tmp_path / "src"
    write_cifar_batches(src)
    tgz = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return tgz


def test_download_checks_md5_and_extracts(tmp_path, monkeypatch, cifar_md5s):
    tgz = _make_archive(tmp_path)
    cifar_md5s(tmp_path / "src" / "cifar-10-batches-py")
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "tgz_md5", _md5(tgz))
    fetched = []
    monkeypatch.setattr(torchvision.datasets.utils, "_get_redirect_url", lambda url, max_hops=3: url)
    monkeypatch.setattr(torchvision.datasets.utils, "_urlretrieve",
                        lambda url, path, *a, **k: (fetched.append(url), Path(path).write_bytes(tgz.read_bytes())))
    root = tmp_path / "root"
    bundle = load_cifar10(root, download=True)
    assert fetched and "cifar-10-python.tar.gz" in fetched[0]
    assert len(bundle.train) == 100
    # second load: archive and batches verified, nothing downloaded again
    fetched.clear()
    load_cifar10(root, download=True)
    assert fetched == []


def test_wrong_checksum_archive_is_refused_and_moved_aside(tmp_path, monkeypatch, cifar_md5s):
    tgz = _make_archive(tmp_path)
    cifar_md5s(tmp_path / "src" / "cifar-10-batches-py")
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "tgz_md5", "0" * 32)  # what the table says
    monkeypatch.setattr(torchvision.datasets.utils, "_get_redirect_url", lambda url, max_hops=3: url)
    monkeypatch.setattr(torchvision.datasets.utils, "_urlretrieve",
                        lambda url, path, *a, **k: Path(path).write_bytes(tgz.read_bytes()[:500]))
    root = tmp_path / "root"
    with pytest.raises(CifarkitError) as e:
        load_cifar10(root, download=True)
    msg = str(e.value)
    assert "\n" not in msg and "cifar-10-python.tar.gz" in msg and "md5" in msg
    assert not (root / "cifar-10-python.tar.gz").exists()       # never trusted next time
    assert (root / "cifar-10-python.tar.gz.bad").exists()


def test_offline_without_copy_names_the_fix(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("Temporary failure in name resolution")
    monkeypatch.setattr(torchvision.datasets.utils, "_get_redirect_url", offline)
    with pytest.raises(CifarkitError) as e:
        load_data("cifar10", str(tmp_path / "none"), download=True)
    msg = str(e.value)
    assert "--data-root" in msg and "cifar-10-python.tar.gz" in msg and "\n" not in msg


def test_no_download_flag_reports_missing(tmp_path):
    with pytest.raises(CifarkitError, match="not found"):
        load_cifar10(tmp_path / "empty", download=False)


# ----------------------------------------------------------------------------- folders

def test_folder_layout_hidden_and_non_images_ignored(tmp_path):
    root = make_folder(tmp_path / "d", classes=("a", "b"), n_per_class=5)
    (root / "train" / ".ipynb_checkpoints").mkdir()
    (root / "train" / "a" / ".DS_Store").write_bytes(b"junk")
    (root / "train" / "a" / "notes.txt").write_text("not an image")
    (root / "train" / "b" / ".hidden.png").write_bytes(b"junk")
    bundle = load_folder(root)
    assert bundle.classes == ["a", "b"]
    assert len(bundle.train) == 10
    assert bundle.train.y.bincount().tolist() == [5, 5]


def test_folder_without_train_level_works(tmp_path):
    root = make_folder(tmp_path / "d", classes=("x", "y"), n_per_class=3)
    bundle = load_folder(root / "train")
    assert bundle.classes == ["x", "y"] and len(bundle.train) == 6


def test_empty_class_folder_is_an_error_naming_it(tmp_path):
    root = make_folder(tmp_path / "d", classes=("a", "b"), n_per_class=3)
    (root / "train" / "empty").mkdir()
    with pytest.raises(CifarkitError, match="empty"):
        load_folder(root)


def test_val_folder_is_used_and_classes_checked(tmp_path):
    root = make_folder(tmp_path / "d", classes=("a", "b"), n_per_class=6)
    make_folder(root, classes=("a", "b"), n_per_class=2, split="val", seed=1)
    bundle = load_folder(root)
    assert len(bundle.splits["val"]) == 4
    make_folder(root, classes=("a", "zebra"), n_per_class=1, split="test", seed=2)
    with pytest.raises(CifarkitError, match="zebra"):
        load_folder(root)


def test_other_sizes_are_resized(tmp_path):
    root = make_folder(tmp_path / "d", classes=("a", "b"), n_per_class=2, size=50)
    bundle = load_folder(root, size=32)
    assert bundle.train.x.shape == (4, 3, 32, 32)


def test_decode_cache_makes_second_load_skip_decoding(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "d", classes=("a", "b"), n_per_class=4)
    first = load_folder(root)
    import cifarkit.data.sources as src
    monkeypatch.setattr(src, "_decode_one", lambda *a: (_ for _ in ()).throw(AssertionError("decoded again")))
    second = load_folder(root)
    assert torch.equal(first.train.x, second.train.x)
    # changing the folder's contents invalidates the cache
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "train" / "a" / "new.png")
    monkeypatch.undo()
    third = load_folder(root)
    assert len(third.train) == 9


def _three_bands(w: int, h: int) -> Image.Image:
    """A landscape picture: red left third, green middle, blue right third."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, :w // 3, 0] = 255
    a[:, w // 3:2 * w // 3, 1] = 255
    a[:, 2 * w // 3:, 2] = 255
    return Image.fromarray(a)


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_center_crop_keeps_proportions_and_squash_stretches(tmp_path, ext):
    path = tmp_path / f"wide{ext}"
    _three_bands(2000, 1500).save(path)
    center = read_image(path, 24, "center").astype(int)
    squash = read_image(path, 24, "squash").astype(int)
    assert center.shape == squash.shape == (24, 24, 3)
    # centre crop of a 4:3 picture: a 1500x1500 square from the middle, so the green band
    # (the middle 667 px) takes 667/1500 of the width, the red and blue ones the rest equally
    green = (center[12, :, 1] > 128).sum()
    assert 9 <= green <= 12 and (center[12, :, 0] > 128).sum() == (center[12, :, 2] > 128).sum()
    # squashed, each band keeps a third of the width
    assert 7 <= (squash[12, :, 1] > 128).sum() <= 9
    assert (squash[12, :2, 0] > 128).all() and (squash[12, -2:, 2] > 128).all()
    with pytest.raises(CifarkitError, match="crop mode"):
        read_image(path, 24, "stretch")


def test_folder_of_mixed_sizes_is_center_cropped(tmp_path):
    d = tmp_path / "d" / "train"
    for cls, (w, h) in (("a", (90, 30)), ("b", (30, 90))):
        (d / cls).mkdir(parents=True)
        _three_bands(w, h).save(d / cls / "x.png")
        _three_bands(w, h).save(d / cls / "y.png")
    center = load_folder(tmp_path / "d", size=30).train.x
    squash = load_folder(tmp_path / "d", size=30, crop_mode="squash").train.x
    assert center.shape == squash.shape == (4, 3, 30, 30)
    assert (center[0, 1] > 128).all()          # wide picture: only its green middle remains
    assert not torch.equal(center, squash)     # and the cache keeps the two modes apart


def test_decoded_folder_is_a_memory_map_and_subsets_do_not_copy(tmp_path):
    root = make_folder(tmp_path / "d", classes=("a", "b"), n_per_class=10)
    train = load_folder(root).train
    assert train.mapped
    files = list(Path(os.environ["CIFARKIT_CACHE"]).glob("*.u8.npy"))
    assert len(files) == 1 and files[0].stat().st_size >= 20 * 3 * 32 * 32
    mapped = np.load(files[0], mmap_mode="r")
    assert np.array_equal(mapped, train.x.numpy())
    idx = torch.tensor([3, 17, 5])
    sub = train.subset(idx)
    assert sub.base is train.base and sub.rows.tolist() == [3, 17, 5]   # rows, not a copy
    assert torch.equal(sub.x, train.x[idx]) and torch.equal(sub.y, train.y[idx])
    assert torch.equal(sub.images(torch.tensor([2, 0])), train.x[torch.tensor([5, 3])])
    assert torch.equal(sub.subset(torch.tensor([1])).x, train.x[17:18])
    assert sub.to("cpu") is sub
    # the map is copy-on-write: writing into a batch never changes the cache file
    train.base[0].fill_(7)
    assert not (np.load(files[0], mmap_mode="r")[0] == 7).all()


def test_damaged_or_incomplete_cache_is_rebuilt(tmp_path):
    root = make_folder(tmp_path / "d", classes=("a", "b"), n_per_class=4)
    first = load_folder(root).train.x.clone()
    cache = Path(os.environ["CIFARKIT_CACHE"])
    (images,) = cache.glob("*.u8.npy")
    images.write_bytes(images.read_bytes()[:200])              # torn image file
    assert torch.equal(load_folder(root).train.x, first)
    (meta,) = cache.glob("*.json")
    meta.unlink()                                              # labels missing: not complete
    assert torch.equal(load_folder(root).train.x, first)
    assert not list(cache.glob(".*.tmp"))                      # no temp files left behind


def test_unwritable_cache_decodes_into_memory_with_a_warning(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "d", classes=("a", "b"), n_per_class=3)
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("x")
    monkeypatch.setenv("CIFARKIT_CACHE", str(blocked / "cache"))
    with pytest.warns(UserWarning, match="decode cache"):
        bundle = load_folder(root)
    assert not bundle.train.mapped and bundle.train.x.shape == (6, 3, 32, 32)


def test_bad_image_leaves_no_cache_file(tmp_path):
    root = make_folder(tmp_path / "d", classes=("a", "b"), n_per_class=3)
    (root / "train" / "b" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(CifarkitError, match="broken.jpg"):
        load_folder(root)
    assert not any(Path(os.environ["CIFARKIT_CACHE"]).iterdir())


def test_unreadable_training_image_names_the_file(tmp_path):
    root = make_folder(tmp_path / "d", classes=("a", "b"), n_per_class=3)
    (root / "train" / "b" / "broken.jpg").write_bytes(b"<html>not a jpeg</html>")
    with pytest.raises(CifarkitError) as e:
        load_folder(root)
    assert "broken.jpg" in str(e.value)


# ----------------------------------------------------------------------------- image modes

@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "L", "I;16", "CMYK", "LA", "1", "I", "F"])
def test_read_image_any_mode(tmp_path, mode):
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8))
    if mode == "I;16":
        img = Image.fromarray((rng.integers(0, 65535, (20, 30))).astype(np.uint16))
    elif mode == "I":
        img = Image.fromarray(rng.integers(0, 1 << 20, (20, 30)).astype(np.int32))
    elif mode == "F":
        img = Image.fromarray(rng.random((20, 30)).astype(np.float32))
    else:
        img = rgb.convert(mode)
    ext = ".jpg" if mode == "CMYK" else (".tif" if mode in ("I", "F") else ".png")
    path = tmp_path / f"img{ext}"
    img.save(path)
    arr = read_image(path, 32)
    assert arr.shape == (32, 32, 3) and arr.dtype == np.uint8
    if mode not in ("1",):
        assert arr.std() > 0  # not blank


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    a = np.full((8, 8), 32768, np.uint16)
    Image.fromarray(a).save(tmp_path / "g.png")
    arr = read_image(tmp_path / "g.png")
    assert 120 <= arr.mean() <= 135


def test_exif_rotation_applied(tmp_path):
    a = np.zeros((10, 20, 3), np.uint8)
    img = Image.fromarray(a)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90
    img.save(tmp_path / "r.jpg", exif=exif.tobytes())
    assert read_image(tmp_path / "r.jpg").shape == (20, 10, 3)


# ----------------------------------------------------------------------------- splits and stats

def test_stratified_split_sizes_disjoint_and_seeded():
    y = torch.tensor([0] * 600 + [1] * 300 + [2] * 100)
    tr, va = stratified_split(y, 100, seed=3)
    assert len(va) == 100 and len(tr) == 900
    assert set(tr.tolist()).isdisjoint(va.tolist())
    assert y[va].bincount().tolist() == [60, 30, 10]
    tr2, va2 = stratified_split(y, 100, seed=3)
    assert torch.equal(va, va2)
    _, va3 = stratified_split(y, 100, seed=4)
    assert not torch.equal(va, va3)


def test_split_sizes_add_up_exactly_with_rounding():
    y = torch.tensor([0] * 7 + [1] * 7 + [2] * 7)
    tr, va = stratified_split(y, 5, seed=0)
    assert len(va) == 5 and len(tr) == 16


def test_val_size_too_large_is_clear():
    with pytest.raises(CifarkitError, match="val-size"):
        stratified_split(torch.zeros(10, dtype=torch.long), 10, 0)


def test_channel_stats_match_numpy():
    x = torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8)
    mean, std = channel_stats(x, chunk_elements=7 * 3 * 8 * 8)
    ref = x.double().div(255).permute(1, 0, 2, 3).reshape(3, -1)
    assert np.allclose(mean, ref.mean(1).numpy()) and np.allclose(std, ref.std(1, unbiased=False).numpy())
    # exact integer sums: the same numbers whatever the chunks, and a mapped subset agrees
    assert channel_stats(x) == (mean, std) == channel_stats(x, chunk_elements=1)
    assert len(x) > 7 and channel_stats(x[:7]) != (mean, std)   # every chunk counts
    from cifarkit.data.tensors import TensorSplit
    rows = torch.tensor([4, 0, 9, 9, 31])
    lazy = TensorSplit(x, torch.zeros(50, dtype=torch.long), mapped=True).subset(rows)
    assert channel_stats(lazy, chunk_elements=2 * 192) == channel_stats(x[rows])


def test_partly_extracted_folder_is_repaired_from_the_archive(tmp_path, monkeypatch, cifar_md5s):
    tgz = _make_archive(tmp_path)
    cifar_md5s(tmp_path / "src" / "cifar-10-batches-py")
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "tgz_md5", _md5(tgz))
    root = tmp_path / "root"
    root.mkdir()
    (root / "cifar-10-python.tar.gz").write_bytes(tgz.read_bytes())
    # an extraction that died half-way: one batch truncated, one missing
    part = root / "cifar-10-batches-py"
    part.mkdir()
    good = tmp_path / "src" / "cifar-10-batches-py"
    (part / "data_batch_1").write_bytes((good / "data_batch_1").read_bytes()[:100])
    (part / "batches.meta").write_bytes((good / "batches.meta").read_bytes())
    monkeypatch.setattr(torchvision.datasets.utils, "_get_redirect_url",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("no download needed")))
    bundle = load_cifar10(root, download=True)      # re-extracted from the verified archive
    assert len(bundle.train) == 100
    assert (part / "data_batch_1").read_bytes() == (good / "data_batch_1").read_bytes()


def test_partly_extracted_folder_without_archive_offline_names_the_fix(tmp_path, monkeypatch):
    part = tmp_path / "root" / "cifar-10-batches-py"
    part.mkdir(parents=True)
    (part / "data_batch_1").write_bytes(b"half")
    def offline(*a, **k):
        raise urllib.error.URLError("offline")
    monkeypatch.setattr(torchvision.datasets.utils, "_get_redirect_url", offline)
    with pytest.raises(CifarkitError) as e:
        load_cifar10(tmp_path / "root", download=True)
    msg = str(e.value)
    assert "cifar-10-python.tar.gz" in msg and "--data-root" in msg and "\n" not in msg


def test_split_apportions_the_remainder_to_the_largest_fractions():
    from cifarkit.data.tensors import stratified_split
    y = torch.tensor([0] * 5 + [1] * 3 + [2] * 2)
    # exact shares of 4 held out: 2.0, 1.2, 0.8 -> 2, 1, 0 and the one left to class 2 (0.8)
    _, va = stratified_split(y, 4, seed=0)
    assert torch.bincount(y[va], minlength=3).tolist() == [2, 1, 1]
    _, one = stratified_split(y, 1, seed=0)
    assert len(one) == 1 and y[one].item() == 0          # largest share: 0.5 of class 0
    with pytest.raises(CifarkitError, match="leaves no training images") as e:
        stratified_split(y, 10, seed=0)
    assert "smaller --val-size" in e.value.hint and "val/ folder" in e.value.hint


def test_checkpoints_without_a_crop_mode_keep_squashing(tmp_path):
    """Files written before crop modes existed were trained on squashed images: predict, eval,
    export and serve read them that way; new checkpoints say which mode they used."""
    from cifarkit.checkpoint import Checkpoint
    from cifarkit.models import create_model
    from cifarkit.predict import Predictor
    from cifarkit.data.sources import preprocess_of

    assert preprocess_of({"mean": [0] * 3, "std": [1] * 3}) == (32, "squash")
    assert preprocess_of({"size": 64, "crop_mode": "center"}) == (64, "center")
    path = tmp_path / "wide.png"
    _three_bands(96, 32).save(path)
    net = create_model("tudui", 10)
    for pre, mode in (({"mean": [0.5] * 3, "std": [0.25] * 3, "size": 32}, "squash"),
                      ({"mean": [0.5] * 3, "std": [0.25] * 3, "size": 32, "crop_mode": "center"}, "center")):
        p = Predictor(Checkpoint("tudui", {}, 10, net.state_dict(), list("abcdefghij"), pre))
        assert p.crop_mode == mode
        assert np.array_equal(p.read(path), read_image(path, 32, mode))


def test_a_cache_that_cannot_be_finished_only_costs_the_next_run(tmp_path, monkeypatch):
    """The disk fills up while the label file is written: a warning, this run trains on the
    decoded images, and the next run decodes again (no half cache is trusted)."""
    import cifarkit.atomic as atomic
    root = make_folder(tmp_path / "d", classes=("a", "b"), n_per_class=3)
    reference = load_folder(root, crop_mode="squash").train.x.clone()   # another cache key
    real = atomic.write_bytes

    def full(path, data):
        raise CifarkitError(f"cannot write {path}: No space left on device")
    monkeypatch.setattr(atomic, "write_bytes", full)
    with pytest.warns(UserWarning, match="could not finish the decode cache"):
        split = load_folder(root).train
    assert torch.equal(split.x, reference)
    monkeypatch.setattr(atomic, "write_bytes", real)
    import cifarkit.data.sources as src
    decoded = []
    monkeypatch.setattr(src, "_decode_into", lambda out, paths, *a: (decoded.append(len(paths)), out.fill(0)))
    load_folder(root)
    assert decoded == [6]

"""Issue 5: every kind of bad input gives one clear line, a non-zero exit and no traceback, and
nothing already saved is lost."""
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import assert_one_clear_line, cli, make_folder

from cifarkit import load_checkpoint


def _good_image(path: Path, size=(32, 32), mode="RGB"):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).convert(mode).save(path)
    return path


# ----------------------------------------------------------------------------- images for predict

BAD_IMAGES = {
    "zero_byte.jpg": lambda p: p.write_bytes(b""),
    "truncated.jpg": lambda p: (_good_image(p.with_suffix(".tmp.jpg"), (64, 64)),
                                p.write_bytes(p.with_suffix(".tmp.jpg").read_bytes()[:300]),
                                p.with_suffix(".tmp.jpg").unlink()),
    "not_an_image.png": lambda p: p.write_bytes(os.urandom(2000)),
    "page.jpg": lambda p: p.write_text("<!doctype html><html><body>404 not found</body></html>"),
    "text.png": lambda p: p.write_text("hello"),
}


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_predict_bad_image_reports_and_continues(trained_run, tmp_path, capsys, name):
    _, run = trained_run
    folder = tmp_path / "in"
    folder.mkdir()
    BAD_IMAGES[name](folder / name)
    _good_image(folder / "ok.png")
    rc, out, err = cli(["predict", run / "best.ckpt", folder, "--json"], capsys)
    assert rc == 1
    assert_one_clear_line(rc, err, name)
    import json
    assert [Path(r["path"]).name for r in json.loads(out)] == ["ok.png"]   # the others still predicted


GOOD_VARIANTS = {
    "rgba.png": lambda p: _good_image(p, mode="RGBA"),
    "palette.png": lambda p: _good_image(p, mode="P"),
    "grey.png": lambda p: _good_image(p, mode="L"),
    "sixteen.png": lambda p: Image.fromarray(np.random.default_rng(0).integers(0, 65535, (20, 20)).astype(np.uint16)).save(p),
    "cmyk.jpg": lambda p: _good_image(p, mode="CMYK"),
    "exif_rotated.jpg": lambda p: _exif_rotated(p),
    "one_pixel.png": lambda p: _good_image(p, (1, 1)),
    "huge.jpg": lambda p: Image.new("RGB", (8000, 8000), (200, 30, 30)).save(p, quality=50),
    "UPPER.JPG": lambda p: _good_image(p),
    "ünïcödé 猫.png": lambda p: _good_image(p),
}


def _exif_rotated(p):
    img = Image.fromarray(np.zeros((10, 20, 3), np.uint8))
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(p, exif=exif.tobytes())


def _variants(ship: np.ndarray, folder: Path) -> dict:
    """Image files of other modes and forms, each beside the RGB PNG it must decode to exactly:
    {variant file name: reference file name}."""
    pairs = {}

    def save(name, img, ref_array, **kw):
        img.save(folder / name, **kw)
        Image.fromarray(ref_array).save(folder / f"ref-{name}.png")
        pairs[name] = f"ref-{name}.png"
    rgb = Image.fromarray(ship)
    alpha = np.full(ship.shape[:2], 255, np.uint8)
    alpha[:, :8] = 0                                           # a transparent strip: white
    white_strip = ship.copy()
    white_strip[:, :8] = 255
    save("rgba.png", Image.fromarray(np.dstack([ship, alpha]), "RGBA"), white_strip)
    pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    save("palette.png", pal, np.asarray(pal.convert("RGB")))
    grey = np.asarray(rgb.convert("L"))
    save("grey.png", Image.fromarray(grey), np.dstack([grey] * 3))
    save("sixteen.png", Image.fromarray(grey.astype(np.uint16) * 257), np.dstack([grey] * 3))
    rotated = rgb.transpose(Image.Transpose.ROTATE_90)          # stored turned; EXIF says turn back
    exif = rotated.getexif()
    exif[0x0112] = 6
    save("exif_rotated.png", rotated, ship, exif=exif.tobytes())
    save("UPPER.PNG", rgb, ship)
    save("ünïcödé 猫.png", rgb, ship)
    save("one_pixel.png", Image.new("RGB", (1, 1), (30, 90, 200)), np.full((32, 32, 3), (30, 90, 200), np.uint8))
    return pairs


def test_predict_handles_every_image_variant(trained_run, tmp_path, capsys):
    import json
    data, run = trained_run
    folder = tmp_path / "variants"
    folder.mkdir()
    ship = np.asarray(Image.open(sorted((data / "train" / "ship").iterdir())[0]).convert("RGB"))
    pairs = _variants(ship, folder)
    Image.fromarray(ship).convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    Image.new("RGB", (8000, 8000), (30, 90, 200)).save(folder / "huge.jpg", quality=50)
    rc, out, err = cli(["predict", run / "best.ckpt", folder, "--json", "--top-k", "3"], capsys)
    assert rc == 0, err
    probs = {Path(r["path"]).name: {t["class"]: t["prob"] for t in r["top"]} for r in json.loads(out)}
    assert set(probs) == set(pairs) | set(pairs.values()) | {"cmyk.jpg", "huge.jpg"}
    for variant, ref in pairs.items():       # decoded to exactly the reference pixels
        assert probs[variant] == probs[ref], variant
    # lossy ones: the same answer as their exact counterparts
    assert max(probs["cmyk.jpg"], key=probs["cmyk.jpg"].get) == "ship"
    assert max(probs["huge.jpg"], key=probs["huge.jpg"].get) == max(probs["one_pixel.png"], key=probs["one_pixel.png"].get)
    assert all(abs(probs["huge.jpg"][c] - probs["one_pixel.png"][c]) < 0.05 for c in probs["huge.jpg"])


def test_predict_missing_file_and_empty_folder(trained_run, tmp_path, capsys):
    _, run = trained_run
    rc, out, err = cli(["predict", run / "best.ckpt", tmp_path / "nope.jpg"], capsys)
    assert_one_clear_line(rc, err, "nope.jpg", "no such file")
    (tmp_path / "empty").mkdir()
    rc, out, err = cli(["predict", run / "best.ckpt", tmp_path / "empty"], capsys)
    assert_one_clear_line(rc, err, "no images")


# ----------------------------------------------------------------------------- folders for train/eval

def _train(data, tmp_path, capsys, *extra):
    return cli(["train", "--data", data, "--out", tmp_path / "out", "--epochs", "1", "--batch-size", "8",
                "--val-size", "6", "--quiet", "--no-tensorboard", *extra], capsys)


def test_train_folder_with_bad_image_names_it(tmp_path, capsys):
    data = make_folder(tmp_path / "d", classes=("a", "b"), n_per_class=10)
    (data / "train" / "a" / "broken.JPG").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    rc, _, err = _train(data, tmp_path, capsys)
    assert_one_clear_line(rc, err, "broken.JPG")


def test_train_hidden_entries_are_ignored(tmp_path, capsys):
    data = make_folder(tmp_path / "d", classes=("a", "b"), n_per_class=10)
    (data / "train" / ".ipynb_checkpoints").mkdir()
    (data / "train" / ".ipynb_checkpoints" / "x.png").write_bytes(b"junk")
    (data / "train" / "a" / ".DS_Store").write_bytes(b"\x00\x01junk")
    rc, out, err = _train(data, tmp_path, capsys)
    assert rc == 0, err
    assert "2 classes" in out


def test_train_empty_class_folder(tmp_path, capsys):
    data = make_folder(tmp_path / "d", classes=("a", "b"), n_per_class=10)
    (data / "train" / "zebra").mkdir()
    rc, _, err = _train(data, tmp_path, capsys)
    assert_one_clear_line(rc, err, "zebra", "no images")


def test_train_single_class(tmp_path, capsys):
    data = make_folder(tmp_path / "d", classes=("only",), n_per_class=10)
    rc, _, err = _train(data, tmp_path, capsys)
    assert_one_clear_line(rc, err, "one class")


def test_train_val_with_other_classes(tmp_path, capsys):
    data = make_folder(tmp_path / "d", classes=("a", "b"), n_per_class=10)
    make_folder(data, classes=("a", "c"), n_per_class=2, split="val")
    rc, _, err = _train(data, tmp_path, capsys)
    assert_one_clear_line(rc, err, "classes not in")


def test_train_val_with_subset_of_classes_in_other_order_works(tmp_path, capsys):
    data = make_folder(tmp_path / "d", classes=("a", "b", "c"), n_per_class=10)
    make_folder(data, classes=("c", "a"), n_per_class=3, split="val")   # sorted: a, c
    rc, out, err = _train(data, tmp_path, capsys)
    assert rc == 0, err
    # the val images keep their own classes under train's indices: a is 0, c is 2 (not 1)
    from cifarkit.evaluate import evaluate_checkpoint
    with pytest.warns(UserWarning, match="lacks classes b"):
        r, split = evaluate_checkpoint(load_checkpoint(tmp_path / "out" / "last.ckpt"), progress=False)
    assert sorted(split.y.tolist()) == [0, 0, 0, 2, 2, 2] and r.n == 6
    assert sum(r.confusion[1]) == 0


def test_eval_class_count_differs_from_model(trained_run, tmp_path, capsys):
    _, run = trained_run
    data = make_folder(tmp_path / "d", classes=("a", "b"), n_per_class=10)
    rc, _, err = cli(["eval", run / "best.ckpt", "--data", data], capsys)
    assert_one_clear_line(rc, err, "2 classes", "trained on 3")


def test_eval_other_class_names(trained_run, tmp_path, capsys):
    _, run = trained_run
    data = make_folder(tmp_path / "d", classes=("x", "y", "z"), n_per_class=10)
    rc, _, err = cli(["eval", run / "best.ckpt", "--data", data], capsys)
    assert_one_clear_line(rc, err, "class names")


def test_data_path_missing_and_not_a_folder(tmp_path, capsys):
    rc, _, err = _train(tmp_path / "missing", tmp_path, capsys)
    assert_one_clear_line(rc, err, "does not exist")
    f = tmp_path / "file.txt"
    f.write_text("x")
    rc, _, err = _train(f, tmp_path, capsys)
    assert_one_clear_line(rc, err, "not a folder")


def test_unreadable_folder(tmp_path, capsys, monkeypatch):
    data = make_folder(tmp_path / "d", classes=("a", "b"), n_per_class=4)
    import cifarkit.data.sources as src
    real_access = os.access
    monkeypatch.setattr(src.os, "access", lambda p, m: False if Path(p) == data else real_access(p, m))
    rc, _, err = _train(data, tmp_path, capsys)
    assert_one_clear_line(rc, err, "permission denied")


# ----------------------------------------------------------------------------- checkpoints

def _damage(run, tmp_path, how):
    good = (run / "best.ckpt").read_bytes()
    p = tmp_path / f"{how}.ckpt"
    if how == "truncated":
        p.write_bytes(good[: len(good) // 3])
    elif how == "random":
        p.write_bytes(os.urandom(4096))
    elif how == "empty":
        p.write_bytes(b"")
    elif how == "zip_not_torch":
        with zipfile.ZipFile(p, "w") as z:
            z.writestr("hello.txt", "not a checkpoint")
    elif how == "json":
        p.write_text('{"model": "tudui"}')
    return p


@pytest.mark.parametrize("how", ["truncated", "random", "empty", "zip_not_torch", "json"])
def test_damaged_checkpoint(trained_run, tmp_path, capsys, how):
    _, run = trained_run
    bad = _damage(run, tmp_path, how)
    for cmd in (["eval", bad], ["predict", bad, tmp_path], ["export", bad, "--format", "safetensors", "--out", tmp_path / "x"]):
        rc, _, err = cli(cmd, capsys)
        assert_one_clear_line(rc, err, bad.name)


def test_foreign_files_load(trained_run, tmp_path, capsys):
    data, run = trained_run
    sd = torch.load(run / "best.ckpt", weights_only=True)["state_dict"]
    files = {
        "bare.pth": sd,
        "net_acc_epoch.pth": {"net": sd, "acc": 88.0, "epoch": 3},
        "dataparallel.pth": {f"module.{k}": v for k, v in sd.items()},
        "compiled.pth": {f"_orig_mod.{k}": v for k, v in sd.items()},
    }
    img = next((data / "train" / "cat").iterdir())
    answers = set()
    for name, obj in files.items():
        torch.save(obj, tmp_path / name)
        loaded = load_checkpoint(tmp_path / name, model="tudui_relu")
        assert loaded.state_dict.keys() == sd.keys() and all(torch.equal(loaded.state_dict[k], sd[k]) for k in sd)
        rc, out, err = cli(["predict", tmp_path / name, img, "--model", "tudui_relu", "--json", "--top-k", "3"],
                           capsys)
        assert rc == 0, (name, err)
        answers.add(out)
    assert len(answers) == 1                   # the same weights, so the same probabilities


def _retag_storages_as_cuda(src: Path, dst: Path) -> None:
    """Rewrite a torch zip checkpoint so its tensors claim to live on cuda:0 (as a file saved on a
    GPU does). Pickle protocol 2 has no frames, so swapping the location string is safe."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith("data.pkl"):
                assert b"\x8c\x03cpu" in data or b"X\x03\x00\x00\x00cpu" in data
                data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
                data = data.replace(b"\x8c\x03cpu", b"\x8c\x06cuda:0")
            zout.writestr(item, data)


def test_cuda_checkpoint_on_cpu_machine(trained_run, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    data, run = trained_run
    cuda_file = tmp_path / "cuda.ckpt"
    _retag_storages_as_cuda(run / "best.ckpt", cuda_file)
    with pytest.raises(Exception):       # plain torch.load cannot put them on a missing GPU
        torch.load(cuda_file, weights_only=True)
    img = next((data / "train" / "ship").iterdir())
    rc, out, err = cli(["predict", cuda_file, img, "--json", "--top-k", "3"], capsys)
    assert rc == 0, err
    rc, same, _ = cli(["predict", run / "best.ckpt", img, "--json", "--top-k", "3"], capsys)
    assert out.replace(str(cuda_file), "") == same.replace(str(run / "best.ckpt"), "")


def test_other_architecture_and_class_count(trained_run, tmp_path, capsys):
    data, run = trained_run
    sd = torch.load(run / "best.ckpt", weights_only=True)["state_dict"]
    torch.save(sd, tmp_path / "sd.pth")
    img = next((data / "train" / "cat").iterdir())
    rc, _, err = cli(["predict", tmp_path / "sd.pth", img, "--model", "resnet18"], capsys)
    assert_one_clear_line(rc, err, "missing keys", "--model")
    rc, _, err = cli(["predict", tmp_path / "sd.pth", img, "--model", "tudui_relu", "--num-classes", "10"], capsys)
    assert_one_clear_line(rc, err, "shape mismatches")


def test_future_format_version(trained_run, tmp_path, capsys):
    _, run = trained_run
    d = torch.load(run / "best.ckpt", weights_only=True)
    d["version"] = 99
    torch.save(d, tmp_path / "future.ckpt")
    rc, _, err = cli(["eval", tmp_path / "future.ckpt"], capsys)
    assert_one_clear_line(rc, err, "version 99", "upgrade")


def test_safetensors_without_metadata_needs_model(trained_run, tmp_path, capsys):
    from safetensors.torch import save_file
    data, run = trained_run
    sd = torch.load(run / "best.ckpt", weights_only=True)["state_dict"]
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "plain.safetensors"))
    img = next((data / "train" / "cat").iterdir())
    rc, _, err = cli(["predict", tmp_path / "plain.safetensors", img], capsys)
    assert_one_clear_line(rc, err, "--model")
    rc, _, err = cli(["predict", tmp_path / "plain.safetensors", img, "--model", "tudui_relu"], capsys)
    assert rc == 0, err


class _Payload:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


@pytest.mark.parametrize("where", ["eval", "predict", "convert", "export", "summary", "train_resume"])
def test_malicious_pickle_never_executes(tmp_path, capsys, where):
    target = tmp_path / "PWNED"
    evil = tmp_path / "evil.ckpt"
    torch.save({"format": "cifarkit", "version": 1, "state_dict": _Payload(target)}, evil)
    assert not target.exists()
    argv = {"eval": ["eval", evil], "predict": ["predict", evil, tmp_path],
            "convert": ["convert", evil, "--out", tmp_path / "o.ckpt"],
            "export": ["export", evil, "--format", "onnx", "--out", tmp_path / "o.onnx"],
            "summary": ["summary", evil], "train_resume": ["train", "--resume", evil]}[where]
    rc, _, err = cli(argv, capsys)
    assert_one_clear_line(rc, err, "--trust-pickle")
    assert not target.exists(), "the pickle's code ran"


def test_malicious_pickle_runs_only_with_trust(tmp_path, capsys):
    """The flag really is the gate: with --trust-pickle the payload does run (and then fails to
    convert, since it is no model) -- which is exactly why it must never run without the flag."""
    target = tmp_path / "PWNED"
    evil = tmp_path / "evil.pth"
    torch.save(_Payload(target), evil)
    rc, _, err = cli(["convert", evil, "--out", tmp_path / "o.ckpt"], capsys)
    assert not target.exists()
    rc, _, err = cli(["convert", evil, "--trust-pickle", "--out", tmp_path / "o.ckpt"], capsys)
    assert target.exists() and rc != 0 and not (tmp_path / "o.ckpt").exists()


# ----------------------------------------------------------------------------- arguments

@pytest.mark.parametrize("argv,needles", [
    (["train", "--model", "resnet81"], ["resnet18"]),
    (["train", "--recipe", "tutorail"], ["tutorial"]),
    (["train", "--epochs", "0"], ["epochs"]),
    (["train", "--batch-size", "-1"], ["batch-size"]),
    (["train", "--val-size", "-5"], ["val-size"]),
    (["train", "--lr", "0"], ["lr"]),
    (["train", "--image-size", "0"], ["image-size"]),
    (["train", "--label-smoothing", "1.5"], ["label-smoothing"]),
    (["train", "--crop-pad", "32"], ["--crop-pad", "image-size"]),
    (["train", "--progressive", "16,x"], ["--progressive", "comma-separated"]),
    (["train", "--progressive", "64"], ["--progressive", "image-size"]),
    (["train", "--progressive", "16,16,16", "--epochs", "2"], ["--progressive", "epochs"]),
    (["train", "--epochs", "ten"], ["--epochs"]),
    (["train", "--optimizer", "adam"], ["--optimizer"]),
    (["train", "--device", "cuda"], ["cuda"]),
    (["train", "--device", "mps"], ["mps"]),
    (["train", "--precision", "fp16", "--device", "cpu"], ["fp16"]),
    (["predict", "x.ckpt", "y.png", "--top-k", "0"], ["top-k"]),
    (["summary", "tudiu"], ["tudui"]),
    (["summary", "tudui", "--input", "3x32"], ["CxHxW"]),
    (["shape", "conv", "--size", "0", "--kernel", "3"], ["--size"]),
    (["shape", "pool", "--size", "32", "--kernel", "2", "--padding", "2"], ["half the kernel"]),
    (["bogus-command"], ["bogus-command"]),
])
def test_bad_arguments(argv, needles, tmp_path, capsys):
    if "--device" in argv and argv[argv.index("--device") + 1] == "cuda" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    if argv[0] == "train":
        argv = argv + ["--out", str(tmp_path / "o"), "--data", str(tmp_path / "nodata")]
    rc, _, err = cli(argv, capsys)
    assert_one_clear_line(rc, err, *needles)
    assert rc == 2, f"a bad argument is a usage error: exit code 2, not {rc}"


def test_progressive_with_a_fixed_size_network(tmp_path, capsys):
    # tudui's Linear(1024, 64) only fits 32x32 inputs: say so before training, not mid-run
    data = make_folder(tmp_path / "d", classes=("a", "b"), n_per_class=10)
    rc, _, err = cli(["train", "--data", data, "--model", "tudui", "--progressive", "24", "--epochs", "2", "--val-size", "4", "--batch-size", "4",
                      "--out", tmp_path / "o", "--quiet"], capsys)
    assert_one_clear_line(rc, err, "tudui", "24x24", "--progressive")
    assert not (tmp_path / "o" / "last.ckpt").exists()


def test_batch_larger_than_dataset(tmp_path, capsys):
    data = make_folder(tmp_path / "d", classes=("a", "b"), n_per_class=10)
    rc, _, err = cli(["train", "--data", data, "--out", tmp_path / "o", "--batch-size", "500",
                      "--val-size", "4", "--quiet"], capsys)
    assert_one_clear_line(rc, err, "batch-size", "16 images")


def test_bad_yaml_config(tmp_path, capsys):
    y = tmp_path / "c.yaml"
    for text, needle in (("epochs: [1, 2\n", "cannot read"), ("- a\n- b\n", "mapping"),
                         ("epohcs: 3\n", "epochs"), ("lr: high\n", "lr")):
        y.write_text(text)
        rc, _, err = cli(["train", "--config", y, "--out", tmp_path / "o"], capsys)
        assert_one_clear_line(rc, err, needle)
    rc, _, err = cli(["train", "--config", tmp_path / "missing.yaml"], capsys)
    assert_one_clear_line(rc, err, "does not exist")


def test_bad_model_args_fail_before_reading_data(tmp_path, capsys):
    # the data folder does not exist: the model_args error must come first, from the config alone
    y = tmp_path / "c.yaml"
    for text, needles in (("model_args: {widthz: [8, 16, 16]}\n", ("widthz", "did you mean widths")),
                          ("model_args: {whiten_width: 32}\n", ("whiten_width", "2 to 24")),
                          ("model_args: {widths: [64, 256]}\n", ("widths", "three")),
                          ("model_args: {depths: [2, 0, 3]}\n", ("depths", "1 to 8")),
                          ("model_args: {residual: 1}\n", ("residual", "true or false")),
                          ("model_args: [1, 2]\n", ("model_args", "should be dict"))):
        y.write_text(text)
        rc, _, err = cli(["train", "--recipe", "fast", "--config", y, "--data", tmp_path / "nodata",
                          "--out", tmp_path / "o"], capsys)
        assert_one_clear_line(rc, err, *needles)
        assert rc == 2
    y.write_text("model: tudui\nmodel_args: {widths: [8, 16, 16]}\n")
    rc, _, err = cli(["train", "--config", y, "--out", tmp_path / "o"], capsys)
    assert_one_clear_line(rc, err, "tudui", "takes no model_args")

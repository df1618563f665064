"""Issue 6: ONNX and TorchScript exports agree with PyTorch; predict runs an .onnx file."""
import json

import numpy as np
import pytest
import torch

from cifarkit import load_checkpoint
from cifarkit.cli import main

onnxruntime = pytest.importorskip("onnxruntime")


def test_onnx_export_matches_pytorch_with_dynamic_batch(trained_run, tmp_path, capsys):
    data, out = trained_run
    onnx_path = tmp_path / "m.onnx"
    assert main(["export", str(out / "best.ckpt"), "--format", "onnx", "--out", str(onnx_path)]) == 0
    msg = capsys.readouterr().out
    diff = float(msg.split("difference to PyTorch ")[1].split(")")[0])
    assert diff < 1e-4
    import onnx
    meta = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    info = json.loads(meta["cifarkit"])
    assert info["classes"] == ["cat", "dog", "ship"] and len(info["preprocess"]["mean"]) == 3
    assert info["preprocess"]["size"] == 32 and info["preprocess"]["crop_mode"] == "center"
    sess = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ck = load_checkpoint(out / "best.ckpt")
    model = ck.build_model()
    for n in (1, 7):                                   # any batch size
        x = torch.randn(n, 3, 32, 32)
        got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        assert got.shape == (n, 3)
        assert np.abs(got - model(x).detach().numpy()).max() < 1e-4


def test_predict_with_onnx_matches_checkpoint(trained_run, tmp_path, capsys):
    data, out = trained_run
    onnx_path = tmp_path / "m.onnx"
    main(["export", str(out / "best.ckpt"), "--format", "onnx", "--out", str(onnx_path)])
    capsys.readouterr()
    import shutil
    from PIL import Image
    folder = tmp_path / "dogs"
    shutil.copytree(data / "train" / "dog", folder)
    # A wide photo whose centre is a dog between two cats: the centre crop sees the dog, a
    # squashed copy mostly cat colours; so the crop mode decides the answer.
    cat, dog = (Image.open(next((data / "train" / c).iterdir())).convert("RGB") for c in ("cat", "dog"))
    wide = Image.new("RGB", (96, 32))
    for i, part in enumerate((cat, dog, cat)):
        wide.paste(part, (32 * i, 0))
    wide.resize((1920, 640), Image.NEAREST).save(folder / "wide.png")
    main(["predict", str(out / "best.ckpt"), str(folder), "--json", "--top-k", "3"])
    a = json.loads(capsys.readouterr().out)
    main(["predict", str(onnx_path), str(folder), "--json", "--top-k", "3"])
    b = json.loads(capsys.readouterr().out)
    assert [r["path"] for r in a] == [r["path"] for r in b]
    assert next(r for r in a if r["path"].endswith("wide.png"))["top"][0]["class"] == "dog"
    for ra, rb in zip(a, b):
        assert [t["class"] for t in ra["top"]] == [t["class"] for t in rb["top"]]
        assert all(abs(x["prob"] - y["prob"]) < 1e-4 for x, y in zip(ra["top"], rb["top"]))


def test_torchscript_export_matches(trained_run, tmp_path, capsys):
    data, out = trained_run
    ts = tmp_path / "m.pt"
    assert main(["export", str(out / "best.ckpt"), "--format", "torchscript", "--out", str(ts)]) == 0
    loaded = torch.jit.load(str(ts))
    model = load_checkpoint(out / "best.ckpt").build_model()
    x = torch.randn(5, 3, 32, 32)
    assert (loaded(x) - model(x)).abs().max().item() < 1e-4


def _checkpoint_with_trained_looking_batch_norm(name):
    """A checkpoint of ``name`` whose batch-norm layers hold running statistics and affine
    weights far from their initial 0/1 (an export that dropped them would differ)."""
    from cifarkit import create_model
    from cifarkit.checkpoint import Checkpoint
    torch.manual_seed(0)
    m = create_model(name, 10)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
                if mod.weight is not None:
                    mod.weight.uniform_(0.5, 1.5)
                if mod.bias is not None:
                    mod.bias.uniform_(-0.2, 0.2)
    return Checkpoint(name, {}, 10, m.state_dict(), [str(i) for i in range(10)],
                      {"mean": [0.5] * 3, "std": [0.25] * 3, "size": 32})


def _onnx_vs_pytorch(path, ck, n=6) -> float:
    """Max abs difference between onnxruntime on ``path`` and the checkpoint's PyTorch model."""
    sess = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = ck.build_model("cpu").eval()(x).numpy()
    return float(np.abs(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0] - ref).max())


@pytest.mark.parametrize("name", ["fast", "resnet18"])
def test_onnx_export_of_batch_norm_networks_matches_onnxruntime(tmp_path, name):
    from cifarkit.export import export_onnx
    ck = _checkpoint_with_trained_looking_batch_norm(name)
    assert export_onnx(ck, tmp_path / "m.onnx") < 1e-4
    assert _onnx_vs_pytorch(tmp_path / "m.onnx", ck) < 1e-4          # checked here, independently
    # and the statistics matter: the same network with fresh ones answers differently
    from cifarkit import create_model
    fresh = create_model(name, 10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (fresh(x) - ck.build_model("cpu").eval()(x)).abs().max() > 1e-2


def test_onnx_falls_back_to_the_torchscript_based_exporter(tmp_path, monkeypatch):
    from cifarkit.export import export_onnx
    real = torch.onnx.export
    used = []

    def no_dynamo(*a, dynamo=True, **k):
        used.append(dynamo)
        if dynamo:
            raise RuntimeError("this exporter cannot handle the model")
        return real(*a, dynamo=False, **k)
    monkeypatch.setattr(torch.onnx, "export", no_dynamo)
    ck = _checkpoint_with_trained_looking_batch_norm("fast")
    assert export_onnx(ck, tmp_path / "m.onnx") < 1e-4
    assert used == [True, False]
    assert _onnx_vs_pytorch(tmp_path / "m.onnx", ck, n=5) < 1e-4     # dynamic batch there too


@pytest.mark.parametrize("name", ["tudui", "fast"])
def test_pt2_export_matches_pytorch_with_a_dynamic_batch(tmp_path, capsys, name):
    from cifarkit import save_checkpoint
    ck = _checkpoint_with_trained_looking_batch_norm(name)
    save_checkpoint(ck, tmp_path / "m.ckpt")
    rc = main(["export", str(tmp_path / "m.ckpt"), "--format", "pt2", "--out", str(tmp_path / "m.pt2")])
    assert rc == 0 and "max abs difference" in capsys.readouterr().out
    prog = torch.export.load(str(tmp_path / "m.pt2")).module()
    net = ck.build_model("cpu").eval()
    for n in (1, 7):                                   # any batch size
        x = torch.randn(n, 3, 32, 32)
        with torch.no_grad():
            assert (prog(x) - net(x)).abs().max() < 1e-4
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []   # no temp file left


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "pt2"])
def test_an_export_that_differs_from_pytorch_is_refused_and_leaves_no_file(tmp_path, capsys, monkeypatch, fmt):
    from cifarkit import save_checkpoint
    save_checkpoint(_checkpoint_with_trained_looking_batch_norm("tudui_relu"), tmp_path / "best.ckpt")
    out = tmp_path
    if fmt == "onnx":
        real_run = onnxruntime.InferenceSession.run
        monkeypatch.setattr(onnxruntime.InferenceSession, "run",
                            lambda self, *a, **k: [o + 1e-3 for o in real_run(self, *a, **k)])
    else:
        class Off(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, x):
                return self.inner(x) + 1e-3

            def module(self):                 # torch.export.load(...).module()
                return Off(self.inner.module())
        mod, fn = (torch.jit, "load") if fmt == "torchscript" else (torch.export, "load")
        real_load = getattr(mod, fn)
        monkeypatch.setattr(mod, fn, lambda *a, **k: Off(real_load(*a, **k)))
    dest = tmp_path / "exports"
    target = dest / f"m.{ {'onnx': 'onnx', 'torchscript': 'pt', 'pt2': 'pt2'}[fmt] }"
    rc = main(["export", str(out / "best.ckpt"), "--format", fmt, "--out", str(target)])
    err = capsys.readouterr().err
    assert rc == 1 and "differs from PyTorch by 1.00e-03" in err and "was not written" in err
    assert "please report this model/exporter combination" in err
    assert list(dest.iterdir()) == []                  # neither the file nor its temp file


def test_missing_optional_packages_give_one_line(trained_run, tmp_path, capsys, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_onnx(name, *a, **k):
        if name.split(".")[0] in ("onnx", "onnxruntime", "uvicorn"):
            raise ImportError(f"No module named {name!r}", name=name)
        return real_import(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_onnx)
    rc = main(["export", str(trained_run[1] / "best.ckpt"), "--format", "onnx", "--out", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    assert rc == 1 and "cifarkit[export]" in err and "internal error" not in err
    rc = main(["serve", str(trained_run[1] / "best.ckpt"), "--port", "1"])
    err = capsys.readouterr().err
    assert rc == 1 and "cifarkit[serve]" in err


def test_an_export_exactly_at_the_tolerance_is_refused(tmp_path):
    from cifarkit import CifarkitError
    from cifarkit.export import TOLERANCE, _finish
    tmp = tmp_path / ".m.onnx.x"
    tmp.write_bytes(b"model")
    with pytest.raises(CifarkitError, match="differs from PyTorch"):
        _finish(str(tmp), tmp_path / "m.onnx", TOLERANCE, "ONNX")     # the limit itself is too much
    assert not tmp.exists() and not (tmp_path / "m.onnx").exists()
    tmp.write_bytes(b"model")
    assert _finish(str(tmp), tmp_path / "m.onnx", TOLERANCE / 2, "ONNX") == TOLERANCE / 2
    assert (tmp_path / "m.onnx").read_bytes() == b"model" and not tmp.exists()

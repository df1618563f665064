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
    folder = data / "train" / "dog"
    main(["predict", str(out / "best.ckpt"), str(folder), "--json", "--top-k", "3"])
    a = json.loads(capsys.readouterr().out)
    main(["predict", str(onnx_path), str(folder), "--json", "--top-k", "3"])
    b = json.loads(capsys.readouterr().out)
    assert [r["path"] for r in a] == [r["path"] for r in b]
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


@pytest.mark.parametrize("name", ["fast", "resnet18"])
def test_onnx_export_of_other_models(tmp_path, name):
    from cifarkit import create_model
    from cifarkit.checkpoint import Checkpoint
    from cifarkit.export import export_onnx
    m = create_model(name, 10).eval()
    ck = Checkpoint(name, {}, 10, m.state_dict(), [str(i) for i in range(10)],
                    {"mean": [0.5] * 3, "std": [0.25] * 3, "size": 32})
    assert export_onnx(ck, tmp_path / "m.onnx") < 1e-4


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

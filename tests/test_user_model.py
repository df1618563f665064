"""Your own network: the notes' Tudui, written as the notes write it, trained and used by file."""
import importlib.util
import json
import sys
import warnings

import pytest
import torch

from helpers import assert_one_clear_line, cli, make_folder

NOTES_NET = '''
import torch
from torch import nn


class Tudui(nn.Module):
    def __init__(self):
        super(Tudui, self).__init__()
        self.model1 = nn.Sequential(
            nn.Conv2d(3, 32, 5, padding=2),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 5, padding=2),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(1024, 64),
            nn.Linear(64, 10),
        )

    def forward(self, x):
        x = self.model1(x)
        return x


def small(num_classes, width=8):
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(width, num_classes))
'''

CLASSES = tuple("abcdefghij")   # the notes' network has 10 outputs


@pytest.fixture(scope="module")
def ten_classes(tmp_path_factory):
    root = tmp_path_factory.mktemp("ten")
    return make_folder(root / "d", classes=CLASSES, n_per_class=16)


@pytest.fixture
def net_file(tmp_path):
    f = tmp_path / "my_net.py"
    f.write_text(NOTES_NET)
    return f


def _train_args(data, out):
    return ["--data", data, "--out", out, "--epochs", "6", "--batch-size", "16", "--val-size", "40",
            "--optimizer", "adamw", "--lr", "3e-3", "--precision", "fp32", "--quiet", "--no-tensorboard"]


def test_the_notes_network_from_a_file_trains_and_every_command_needs_its_file(ten_classes, net_file,
                                                                             tmp_path, capsys):
    ref = f"{net_file}:Tudui"
    run = tmp_path / "run"
    rc, out, err = cli(["train", "--model", ref] + _train_args(ten_classes, run), capsys)
    assert rc == 0, err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_val_acc"] >= 0.9                    # it learns (10 easy classes; chance 0.1)
    ck = torch.load(run / "best.ckpt", weights_only=True)
    assert ck["model"]["source"]["name"] == "Tudui" and ck["model"]["source"]["path"] == str(net_file)
    assert "model1.0.weight" in ck["state_dict"]             # the notes' layer names, unchanged

    # without --model the checkpoint is refused: cifarkit never imports what a file names
    for argv in (["eval", run / "best.ckpt"], ["predict", run / "best.ckpt", ten_classes],
                 ["export", run / "best.ckpt", "--format", "onnx", "--out", tmp_path / "m.onnx"]):
        rc, _, err = cli(argv, capsys)
        assert_one_clear_line(rc, err, str(net_file), f"--model {net_file}:Tudui")
    assert not (tmp_path / "m.onnx").exists()

    rc, out, err = cli(["eval", run / "best.ckpt", "--model", ref, "--json"], capsys)
    assert rc == 0, err
    assert json.loads(out)["accuracy"] == pytest.approx(summary["best_val_acc"])

    img = next((ten_classes / "train" / "c").iterdir())
    rc, out, err = cli(["predict", run / "best.ckpt", img, "--model", ref, "--json"], capsys)
    assert rc == 0, err
    assert json.loads(out)[0]["top"][0]["class"] == "c"

    rc, out, err = cli(["export", run / "best.ckpt", "--model", ref, "--format", "onnx",
                        "--out", tmp_path / "m.onnx"], capsys)
    assert rc == 0, err
    ort = pytest.importorskip("onnxruntime")
    from cifarkit import load_checkpoint
    net = load_checkpoint(run / "best.ckpt", model=ref).build_model()
    x = torch.randn(3, 3, 32, 32)
    got = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"images": x.numpy()})[0]
    assert abs(got - net(x).detach().numpy()).max() < 1e-4

    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient
    from cifarkit.serve import create_app, load_predictor
    client = TestClient(create_app(load_predictor(str(run / "best.ckpt"), model=ref), top_k=3, max_bytes=200_000))
    r = client.post("/predict", files={"file": (img.name, img.read_bytes(), "image/png")})
    assert r.status_code == 200 and r.json()[0]["top"][0]["class"] == "c"
    assert client.get("/model").json()["model"] == str(ref)


def test_fit_trains_an_instance_of_your_class(ten_classes, net_file, tmp_path, capsys):
    import cifarkit
    spec = importlib.util.spec_from_file_location("my_net_for_fit", net_file)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["my_net_for_fit"] = mod
    spec.loader.exec_module(mod)
    net = mod.Tudui()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    s = cifarkit.fit(net, data=ten_classes, out=str(tmp_path / "fit"), epochs=6, batch_size=16,
                     val_size=40, optimizer="adamw", lr=3e-3, precision="fp32", tensorboard=False,
                     progress=False, log=lambda *a: None)
    assert s["best_val_acc"] >= 0.9
    last = cifarkit.load_checkpoint(tmp_path / "fit" / "last.ckpt", model=f"{net_file}:Tudui")
    assert all(torch.equal(v, last.state_dict[k]) for k, v in net.state_dict().items())   # net is trained
    assert not all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    # recorded by file, so the CLI can use the run too
    rc, out, err = cli(["eval", tmp_path / "fit" / "best.ckpt", "--model", f"{net_file}:Tudui", "--json"], capsys)
    assert rc == 0 and json.loads(out)["accuracy"] == pytest.approx(s["best_val_acc"])


def test_a_factory_gets_num_classes_and_model_args(tmp_path, net_file, capsys):
    data = make_folder(tmp_path / "d", classes=("a", "b", "c"), n_per_class=12)
    from cifarkit import create_model
    m = create_model(f"{net_file}:small", 3, width=4)
    assert m[-1].out_features == 3 and m[0].out_channels == 4
    rc, _, err = cli(["train", "--model", f"{net_file}:small", "--data", data, "--out", tmp_path / "r",
                      "--epochs", "1", "--batch-size", "8", "--val-size", "6", "--quiet", "--no-tensorboard"], capsys)
    assert rc == 0, err
    rc, out, err = cli(["summary", f"{net_file}:small", "--num-classes", "3"], capsys)
    assert rc == 0 and "Linear" in out


def test_bad_user_networks_get_one_line_each(tmp_path, net_file, capsys):
    data = make_folder(tmp_path / "d", classes=("a", "b", "c"), n_per_class=8)
    base = ["--data", data, "--out", tmp_path / "r", "--epochs", "1", "--batch-size", "4", "--val-size", "6",
            "--quiet", "--no-tensorboard"]
    # 10 outputs for 3 classes
    rc, _, err = cli(["train", "--model", f"{net_file}:Tudui"] + base, capsys)
    assert_one_clear_line(rc, err, "outputs 10 scores per image", "3 classes", "nn.Linear(..., 3)")
    # a name that is not in the file: the ones that are
    rc, _, err = cli(["train", "--model", f"{net_file}:Tudu"] + base, capsys)
    assert_one_clear_line(rc, err, str(net_file), "'Tudu'", "Tudui")
    # no such file
    rc, _, err = cli(["train", "--model", f"{tmp_path / 'nope.py'}:Net"] + base, capsys)
    assert_one_clear_line(rc, err, "nope.py", "does not exist")
    # an error inside the file: its line
    broken = tmp_path / "broken.py"
    broken.write_text("import torch\n\nclass Net(torch.nn.Module):\n    pass\n\nraise ValueError('oops')\n")
    rc, _, err = cli(["train", "--model", f"{broken}:Net"] + base, capsys)
    assert_one_clear_line(rc, err, str(broken), "line 6", "ValueError: oops")
    # the wrong input size for the network (the notes' Linear(1024, 64) needs 32x32)
    data10 = make_folder(tmp_path / "d10", classes=CLASSES, n_per_class=2)
    rc, _, err = cli(["train", "--model", f"{net_file}:Tudui", "--image-size", "40", "--data", data10,
                      "--out", tmp_path / "r2", "--epochs", "1", "--batch-size", "4", "--val-size", "10",
                      "--quiet", "--no-tensorboard"], capsys)
    assert_one_clear_line(rc, err, "cannot take 40x40", "--image-size")
    assert not (tmp_path / "r").exists() and not (tmp_path / "r2").exists()


def test_a_changed_file_is_a_warning_and_the_weights_still_load(ten_classes, net_file, tmp_path, capsys):
    from cifarkit import fit, load_checkpoint
    data = make_folder(tmp_path / "d", classes=("a", "b"), n_per_class=8)
    rc, _, err = cli(["train", "--model", f"{net_file}:small", "--data", data, "--out", tmp_path / "r",
                      "--epochs", "1", "--batch-size", "8", "--val-size", "4", "--quiet", "--no-tensorboard"], capsys)
    assert rc == 0, err
    net_file.write_text(NOTES_NET + "\n# edited\n")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ck = load_checkpoint(tmp_path / "r" / "last.ckpt", model=f"{net_file}:small")
        ck.build_model()
    assert any("has changed since" in str(x.message) for x in w)
    with pytest.raises(Exception, match="not the registered"):
        load_checkpoint(tmp_path / "r" / "last.ckpt", model="tudui")
    with pytest.raises(Exception, match="fit.. trains an nn.Module"):
        fit("not a module", data=str(data))

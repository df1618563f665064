"""Fine-tuning torchvision's ImageNet networks: weights from torchvision's cache (a file the test
writes in that layout: nothing is downloaded), a new head, ImageNet normalisation, --freeze,
--head-lr, and one line when the weights are missing offline."""
import json

import pytest
import torch
import torchvision

from helpers import assert_one_clear_line, cli, make_folder

from cifarkit import load_checkpoint


@pytest.fixture
def imagenet_file(tmp_path, monkeypatch):
    """A stand-in for resnet18-f37072fd.pth in $TORCH_HOME/hub/checkpoints (random weights)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    def offline(*a, **k):
        raise OSError("network is unreachable")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)   # tests never download
    torch.manual_seed(5)
    ref = torchvision.models.resnet18(weights=None)
    folder = tmp_path / "torch_home" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save(ref.state_dict(), folder / "resnet18-f37072fd.pth")
    return folder / "resnet18-f37072fd.pth", ref.state_dict()


@pytest.fixture
def photos(tmp_path):
    return make_folder(tmp_path / "photos", classes=("cat", "dog", "ship"), n_per_class=12)


def _run(photos, out, *extra):
    return ["train", "--recipe", "finetune", "--data", photos, "--out", out, "--image-size", "32",
            "--epochs", "1", "--batch-size", "8", "--val-size", "6", "--quiet", "--no-tensorboard",
            "--precision", "fp32"] + list(extra)


def test_pretrained_weights_load_with_a_new_head_and_imagenet_normalisation(imagenet_file, photos,
                                                                           tmp_path, capsys):
    file, ref = imagenet_file
    rc, out, err = cli(_run(photos, tmp_path / "r", "--freeze", "backbone"), capsys)
    assert rc == 0, err
    assert "pretrained: tv_resnet18 with torchvision's ImageNet weights, a new 3-class head" in out
    assert "trained at 224 px; this run uses 32" in out
    ck = load_checkpoint(tmp_path / "r" / "last.ckpt")
    assert ck.preprocess["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert ck.preprocess["std"] == pytest.approx([0.229, 0.224, 0.225])
    assert ck.state_dict["fc.weight"].shape == (3, 512) and ck.model_args == {}
    # frozen backbone: its parameters are exactly the file's; the head trained
    for k in set(ref) - {"fc.weight", "fc.bias"}:   # batch norms' running statistics included
        assert torch.equal(ck.state_dict[k], ref[k]), k
    # the checkpoint alone rebuilds the network: the ImageNet file is not needed any more
    file.unlink()
    rc, out, err = cli(["eval", tmp_path / "r" / "best.ckpt", "--json"], capsys)
    assert rc == 0, err
    assert json.loads(out)["n"] == 6


def test_without_freeze_the_backbone_trains_and_the_head_has_its_own_rate(imagenet_file, photos,
                                                                        tmp_path, monkeypatch):
    from cifarkit import resolve_config, train
    from cifarkit.optim import make_optimizer
    groups = {}
    import cifarkit.training.loop as loop

    def spy(cfg, model):
        opt = make_optimizer(cfg, model)
        groups.update({g.get("tag", "body") + str(i): (g["lr"], len(g["params"])) for i, g in enumerate(opt.param_groups)})
        return opt
    monkeypatch.setattr(loop, "make_optimizer", spy)
    cfg = resolve_config("finetune", overrides={"data": str(photos), "out": str(tmp_path / "r"), "image_size": 32,
                                                "epochs": 1, "batch_size": 8, "val_size": 6,
                                                "tensorboard": False, "precision": "fp32"})
    train(cfg, progress=False, log=lambda *a: None)
    head = [v for k, v in groups.items() if k.startswith("head")]
    body = [v for k, v in groups.items() if k.startswith("body")]
    assert sorted(n for _, n in head) == [1, 1] and all(lr == 1e-3 for lr, _ in head)   # fc.weight, fc.bias
    assert sum(n for _, n in body) == 60 and all(lr == 1e-4 for lr, _ in body)
    ck = load_checkpoint(tmp_path / "r" / "last.ckpt")
    assert not torch.equal(ck.state_dict["conv1.weight"], imagenet_file[1]["conv1.weight"])   # fine-tuned


def test_missing_weights_offline_is_one_line_naming_the_file_and_folder(tmp_path, photos, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setattr(torch.hub, "download_url_to_file",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("network is unreachable")))
    rc, _, err = cli(_run(photos, tmp_path / "r"), capsys)
    assert_one_clear_line(rc, err, "resnet18-f37072fd.pth", str(tmp_path / "empty_home" / "hub" / "checkpoints"),
                          "network is unreachable")
    rc, _, err = cli(_run(photos, tmp_path / "r2", "--model", "tudui"), capsys)
    assert_one_clear_line(rc, err, "--pretrained", "tudui", "tv_resnet18")


def test_summary_counts_trainable_and_frozen(capsys):
    rc, out, _ = cli(["summary", "tv_resnet18", "--num-classes", "3", "--freeze", "backbone", "--json"], capsys)
    got = json.loads(out)
    assert rc == 0 and got["trainable_parameters"] == 512 * 3 + 3
    assert got["frozen_parameters"] == got["total_parameters"] - (512 * 3 + 3)
    rc, out, _ = cli(["summary", "fast"], capsys)
    assert rc == 0 and "frozen" in out      # fast's whitening filters are fixed, not trained


def test_image_size_defaults_to_the_networks_own():
    """--image-size unset: 224 for torchvision's ImageNet networks (and vgg16 with --pretrained),
    32 for the CIFAR ones; a recipe, a file or a flag that sets it wins."""
    from cifarkit import resolve_config
    assert resolve_config(overrides={"model": "tv_mobilenet_v3_small"}).image_size == 224
    assert resolve_config(overrides={"model": "vgg16", "pretrained": True}).image_size == 224
    assert resolve_config(overrides={"model": "vgg16"}).image_size == 32
    assert resolve_config(overrides={"model": "tudui"}).image_size == 32
    assert resolve_config(overrides={"model": "tv_resnet18", "image_size": 96}).image_size == 96
    assert resolve_config("finetune", overrides={"image_size": 128}).image_size == 128


def test_frozen_batch_norms_keep_their_statistics_and_the_rest_trains():
    from torch import nn
    from cifarkit.models import train_mode
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4, affine=False),
                        nn.BatchNorm2d(4))
    for p in [*net[0].parameters(), *net[1].parameters()]:
        p.requires_grad_(False)
    net.eval()
    train_mode(net)
    assert net.training and net[0].training
    assert not net[1].training            # frozen weights: inference mode, statistics kept
    assert net[2].training and net[3].training   # no weights, or trainable ones: batch statistics
    before = net[1].running_mean.clone()
    net(torch.randn(2, 3, 6, 6) * 5 + 3)
    assert torch.equal(net[1].running_mean, before) and not torch.equal(net[3].running_mean, torch.zeros(4))

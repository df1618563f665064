"""benchmarks/vs_airbench.py runs airbench in the precision that is fast on the CPU at hand."""
import pytest
from helpers import load_benchmark


@pytest.fixture(scope="module")
def vs_airbench():
    return load_benchmark("vs_airbench")


@pytest.mark.parametrize("fast_bf16, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_is_bf16_only_where_the_cpu_has_it(vs_airbench, monkeypatch, fast_bf16, expected):
    import cifarkit.device
    monkeypatch.setattr(cifarkit.device, "cpu_has_fast_bf16", lambda: fast_bf16)
    assert vs_airbench.cpu_precision("auto") == expected
    assert vs_airbench.cpu_precision("bf16") == "bf16"     # asked for: kept, fast or not
    assert vs_airbench.cpu_precision("fp32") == "fp32"


def test_muon_record_side_is_airbench94_muons_published_settings(vs_airbench, tmp_path):
    """`--muon-record` trains cifarkit with airbench94_muon.py's settings: train94's network
    (64/256/256, two plain convolutions per group), 8 epochs all at 32 px, every image of each
    2,000-image batch trained, and the optimiser, augmentation and TTA that recipe publishes
    (the fast recipe's own, so only MUON_RECORD_CONFIG's keys may differ from it)."""
    import torch

    from cifarkit.cli import build_parser, train_config
    from cifarkit.models import create_model
    from cifarkit.optim import muon_settings
    from cifarkit.training import epoch_size

    cfg = train_config(build_parser().parse_args(
        ["train", "--recipe", "fast", *vs_airbench.muon_record_args(str(tmp_path))]))
    assert cfg.model_args == {"widths": [64, 256, 256], "depths": [2, 2, 2], "residual": False}
    assert cfg.epochs == 8 and [epoch_size(cfg, e) for e in range(cfg.epochs)] == [32] * 8
    assert cfg.hard_fraction == 1.0 and not cfg.hard_proxy
    # airbench94_muon.py: batch 2000, Muon lr 0.24 / momentum 0.6, Nesterov SGD 0.85 for biases
    # (0.053 per image) and head (0.67), decay 2e-6 per image, whitening bias 3 epochs, label
    # smoothing 0.2, flip every other epoch, 2 px translation, TTA level 2 (flip x translate)
    assert (cfg.batch_size, cfg.optimizer, cfg.lr, cfg.schedule) == (2000, "muon", 0.24, "linear")
    assert muon_settings(cfg) == {"muon_momentum": 0.6, "sgd_momentum": 0.85, "bias_lr": 0.053,
                                  "head_lr": 0.67, "decay": 2e-6, "whiten_bias_epochs": 3,
                                  "first_group_epochs": 0}
    assert (cfg.label_smoothing, cfg.flip, cfg.alt_flip, cfg.crop_pad, cfg.tta) == (0.2, True, True, 2, "flip_translate")
    # train94's network: 24-wide 2x2 whitening, then 64/256/256 with two convolutions per group
    net = create_model(cfg.model, 10, **cfg.model_args)
    assert net.whiten.out_channels == 24 and net.whiten.kernel_size == (2, 2)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m is not net.whiten]
    assert [tuple(c.weight.shape[:2]) for c in convs] == [(64, 24), (64, 64), (256, 64), (256, 256),
                                                          (256, 256), (256, 256)]

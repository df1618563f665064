"""The FLOP counts behind the published GFLOP/s (benchmarks/fast_recipe.py) count work actually done."""
import pytest
from helpers import load_benchmark

from cifarkit import resolve_config


@pytest.fixture(scope="module")
def fast_recipe():
    return load_benchmark("fast_recipe")


def test_frozen_whitening_bias_drops_the_first_convs_input_gradient(fast_recipe):
    cfg = resolve_config("fast")
    trained = fast_recipe.train_step_flops(cfg, 32)
    frozen = fast_recipe.train_step_flops(cfg, 32, bias_frozen=True)
    # group 1's first conv: 24 -> 64 channels, 3x3, on the 31x31 output of the 2x2 whitening conv
    assert trained - frozen == pytest.approx(2 * 24 * 64 * 9 * 31 * 31)


def test_run_flops_follow_sizes_and_the_freeze(fast_recipe):
    cfg = resolve_config("fast", overrides={"hard_fraction": 1.0, "hard_proxy": []})   # every image trains
    per_epoch = {(s, f): fast_recipe.train_step_flops(cfg, s, f) for s in set(cfg.progressive) | {32}
                 for f in (False, True)}
    wbe = cfg.optimizer_args["whiten_bias_epochs"]
    sizes = cfg.progressive + [32] * (cfg.epochs - len(cfg.progressive))
    expected = sum(per_epoch[(s, e >= wbe)] for e, s in enumerate(sizes)) * 100
    assert fast_recipe.run_flops(cfg, 100) == pytest.approx(expected)


def test_run_flops_count_the_scoring_and_the_trained_share(fast_recipe):
    import dataclasses
    base = {"epochs": 2, "progressive": [], "hard_fraction": 0.5}   # two 32 px epochs, bias still trains
    own = resolve_config("fast", overrides={**base, "hard_proxy": []})
    step = fast_recipe.train_step_flops(own, 32)
    score = fast_recipe.forward_flops(own, 32)
    assert 0.3 < score / step < 0.37            # a forward pass is about a third of a training step
    assert fast_recipe.run_flops(own, 100) == pytest.approx(2 * 100 * (0.5 * step + score))
    proxied = resolve_config("fast", overrides={**base, "hard_proxy": [16, 64, 64]})
    small = fast_recipe.train_step_flops(dataclasses.replace(proxied, model_args=proxied.proxy_model_args()), 32)
    assert small < step / 8                      # the proxy is a small fraction of the network
    assert fast_recipe.run_flops(proxied, 100) == pytest.approx(2 * 100 * (0.5 * step + small))
    stale = resolve_config("fast", overrides={**base, "hard_proxy": [], "hard_stale": True})
    assert fast_recipe.run_flops(stale, 100) == pytest.approx(2 * 100 * 0.5 * step)   # no scoring at all


def test_run_flops_count_the_smaller_share_trained_while_images_are_small(fast_recipe):
    """--hard-fraction-small: a 16 px epoch trains its own share, the 32 px one --hard-fraction's
    (the count once ignored it and put sprint at 158.1 TFLOP, a half everywhere)."""
    base = {"epochs": 2, "progressive": [16], "hard_fraction": 0.5, "hard_proxy": [], "hard_stale": True}
    cfg = resolve_config("fast", overrides={**base, "hard_fraction_small": 0.25})
    small, full = fast_recipe.train_step_flops(cfg, 16), fast_recipe.train_step_flops(cfg, 32)
    assert fast_recipe.epoch_flops(cfg, 100) == pytest.approx([100 * 0.25 * small, 100 * 0.5 * full])
    unset = resolve_config("fast", overrides=base)
    assert fast_recipe.epoch_flops(unset, 100) == pytest.approx([100 * 0.5 * small, 100 * 0.5 * full])


def test_a_frozen_first_group_drops_its_weight_gradients_and_the_gradient_below_group_two(fast_recipe):
    cfg = resolve_config("fast")
    bias_frozen = fast_recipe.train_step_flops(cfg, 32, bias_frozen=True)
    both = fast_recipe.train_step_flops(cfg, 32, bias_frozen=True, first_group_frozen=True)
    # group 1 (24 -> 64 at 31x31, 64 -> 64 at 15x15): both weight gradients and the second
    # conv's input gradient; group 2's first conv (64 -> 224 at 15x15): its input gradient
    skipped = 2 * 9 * (24 * 64 * 31 * 31 + 2 * 64 * 64 * 15 * 15 + 64 * 224 * 15 * 15)
    assert bias_frozen - both == pytest.approx(skipped)
    args = {**cfg.optimizer_args, "first_group_epochs": 14}
    late = resolve_config("fast", overrides={"optimizer_args": args, "hard_fraction": 1.0, "hard_proxy": []})
    never = resolve_config("fast", overrides={"hard_fraction": 1.0, "hard_proxy": []})
    # epochs 15 and 16 (32 px) skip that work
    assert fast_recipe.run_flops(never, 100) - fast_recipe.run_flops(late, 100) == pytest.approx(2 * 100 * skipped)


def test_epoch_rates_divide_each_epochs_flops_by_its_seconds(fast_recipe, tmp_path, monkeypatch, capsys):
    """benchmarks/epoch_rates.py reads a run folder: each epoch's FLOPs at its own size (a 16 px
    epoch counts less than a 32 px one) over that epoch's seconds; a half-written run is refused."""
    import json
    import sys

    from cifarkit.config import save_yaml
    cfg = resolve_config("fast", overrides={"epochs": 2, "progressive": [16], "hard_fraction": 1.0,
                                            "hard_proxy": []})
    flops = fast_recipe.epoch_flops(cfg, 100)
    assert len(flops) == 2 and flops[0] < 0.4 * flops[1]          # 16 px: about a quarter of 32 px
    save_yaml(cfg, tmp_path / "config.yaml")                        # as `cifarkit train` leaves it
    (tmp_path / "summary.json").write_text(json.dumps({"n_train": 100}))
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps({"epoch": e + 1, "seconds": s, "image_size": px})
                                                      for e, (s, px) in enumerate([(0.5, 16), (2.0, 32)])))
    rates = load_benchmark("epoch_rates")
    monkeypatch.setattr(sys, "argv", ["epoch_rates.py", str(tmp_path)])
    assert rates.main() == 0
    rows = [l.split() for l in capsys.readouterr().out.splitlines()[1:3]]
    assert [float(r[4]) for r in rows] == [round(flops[0] / 0.5 / 1e9), round(flops[1] / 2.0 / 1e9)]
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "seconds": 0.5, "image_size": 16}))
    assert rates.main() == 1                                       # one epoch of two: refused
    assert "only a run that finished" in capsys.readouterr().err

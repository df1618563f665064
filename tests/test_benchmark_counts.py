"""The FLOP counts behind the published GFLOP/s (benchmarks/fast_recipe.py) count work actually done."""
import importlib.util
from pathlib import Path

import pytest

from cifarkit import resolve_config


@pytest.fixture(scope="module")
def fast_recipe():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "fast_recipe.py"
    spec = importlib.util.spec_from_file_location("fast_recipe_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_frozen_whitening_bias_drops_the_first_convs_input_gradient(fast_recipe):
    cfg = resolve_config("fast")
    trained = fast_recipe.train_step_flops(cfg, 32)
    frozen = fast_recipe.train_step_flops(cfg, 32, bias_frozen=True)
    # group 1's first conv: 24 -> 64 channels, 3x3, on the 31x31 output of the 2x2 whitening conv
    assert trained - frozen == pytest.approx(2 * 24 * 64 * 9 * 31 * 31)


def test_run_flops_follow_sizes_and_the_freeze(fast_recipe):
    cfg = resolve_config("fast")
    per_epoch = {(s, f): fast_recipe.train_step_flops(cfg, s, f) for s in set(cfg.progressive) | {32}
                 for f in (False, True)}
    wbe = cfg.optimizer_args["whiten_bias_epochs"]
    sizes = cfg.progressive + [32] * (cfg.epochs - len(cfg.progressive))
    expected = sum(per_epoch[(s, e >= wbe)] for e, s in enumerate(sizes)) * 100
    assert fast_recipe.run_flops(cfg, 100) == pytest.approx(expected)

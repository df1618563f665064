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

"""Plain progress lines (no terminal): the speed reads right whether units take more or less than a second."""
import io

from cifarkit import progress


def _lines(monkeypatch, seconds_per_unit: float) -> list:
    now = [0.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])
    out = io.StringIO()
    bar = progress.Progress(10, "epoch 1/3", unit="step", file=out, plain_every_s=1.0)
    for _ in range(4):
        now[0] += seconds_per_unit
        bar.update()
    return out.getvalue().splitlines()


def test_slow_steps_show_seconds_per_step(monkeypatch):
    lines = _lines(monkeypatch, 2.5)
    assert lines[0] == "  epoch 1/3: 1/10 step 2.5 s/step eta 22s"
    assert "0 step/s" not in "".join(lines)


def test_fast_steps_show_steps_per_second(monkeypatch):
    lines = _lines(monkeypatch, 0.25)
    assert lines == ["  epoch 1/3: 4/10 step 4 step/s eta 2s"]

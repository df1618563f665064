"""Issue 3: the notes' worked examples (golden), the size formula against PyTorch, pictures."""
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st
from PIL import Image

from cifarkit import create_model, list_models
from cifarkit.cli import main
from cifarkit.inspect import formula_text, out_size, solve, summarize, worked_examples


# ----------------------------------------------------------------------------- golden numbers

def test_notes_worked_examples_exact():
    ex = worked_examples()
    assert ex["conv_stride1"] == [[11, 12, 16], [11, 14, 12], [13, 13, 10]]
    assert ex["conv_padding1"][0] == [1, 4, 5, 8, 8] and len(ex["conv_padding1"]) == 5
    assert ex["conv_stride2"] == [[11, 16], [13, 10]]
    assert ex["pool_ceil"] == [[2, 3], [5, 1]]
    assert ex["pool_floor"] == [[2]]
    assert ex["cross_entropy"] == pytest.approx(1.1019, abs=1e-4)
    assert ex["relu"] == [[1.0, 0.0], [0.0, 3.0]]
    assert ex["l1"] == pytest.approx(2 / 3, abs=1e-4) and ex["mse"] == pytest.approx(4 / 3, abs=1e-4)


def test_demo_prints_hand_computation_beside_results(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "1·1 + 2·2 + 0·1 + 0·0 + 2·1 + 1·0 + 1·2 + 2·1 + 2·0 = 11" in out
    assert "−0.2 + log(e^0.1 + e^0.2 + e^0.3) = 1.1019" in out
    assert "ceil 2" in out and "floor 1" in out
    assert "(32 + 2·2 − 1·(5−1) − 1) / 1 + 1 = 32" in out


def test_formula_text_matches_issue_example():
    assert formula_text(32, 5, 1, 2, 1) == "(32 + 2·2 − 1·(5−1) − 1) / 1 + 1 = 32"


# ----------------------------------------------------------------------------- formula vs PyTorch

@settings(max_examples=300, deadline=None)
@given(size=st.integers(1, 40), kernel=st.integers(1, 7), stride=st.integers(1, 5),
       padding=st.integers(0, 4), dilation=st.integers(1, 3), kind=st.sampled_from(["conv", "max", "avg"]),
       ceil=st.booleans())
def test_formula_equals_pytorch_shapes(size, kernel, stride, padding, dilation, kind, ceil):
    if kind != "conv" and padding > kernel // 2:
        padding = kernel // 2                      # PyTorch's rule for pooling
    if kind == "avg":
        dilation = 1
    if kind == "conv":
        ceil = False
        layer = nn.Conv2d(1, 1, kernel, stride, padding, dilation)
    elif kind == "max":
        layer = nn.MaxPool2d(kernel, stride, padding, dilation, ceil_mode=ceil)
    else:
        layer = nn.AvgPool2d(kernel, stride, padding, ceil_mode=ceil)
    expected = out_size(size, kernel, stride, padding, dilation, ceil)
    x = torch.zeros(1, 1, size, size)
    if expected < 1:
        with pytest.raises(RuntimeError):
            layer(x)
        return
    assert layer(x).shape[-1] == expected


def test_ceil_mode_edge_case_last_window_in_padding():
    # size 6, kernel 2, stride 2, padding 1, ceil: (6+2-1-1)/2+1 = 4, but window 4 would start at
    # 3*2 = 6 >= 6+1? no -> kept; size 5: ceil((5+2-2)/2)+1 = 4, start 6 >= 5+1 -> dropped -> 3.
    assert out_size(5, 2, 2, 1, 1, True) == 3
    assert nn.MaxPool2d(2, 2, 1, ceil_mode=True)(torch.zeros(1, 1, 5, 5)).shape[-1] == 3
    assert "dropped" in formula_text(5, 2, 2, 1, 1, True)


@pytest.mark.parametrize("name", list_models())
def test_summary_shapes_match_real_forward(name):
    model = create_model(name)
    rows = summarize(model, (3, 32, 32))
    assert rows and rows[-1].out_shape == (10,)
    for r in rows:
        if r.formula and ";" not in r.formula:
            assert r.formula.endswith(str(r.out_shape[-1])) or "→ " in r.formula
    assert sum(r.params for r in rows) <= sum(p.numel() for p in model.parameters())


def test_summary_tudui(capsys):
    assert main(["summary", "tudui"]) == 0
    out = capsys.readouterr().out
    assert "145,578" in out
    assert main(["summary", "tudui", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    shapes = [tuple(l["output"]) for l in data["layers"]]
    assert shapes == [(32, 32, 32), (32, 16, 16), (32, 16, 16), (32, 8, 8), (64, 8, 8), (64, 4, 4),
                      (1024,), (64,), (10,)]
    assert data["total_parameters"] == 145_578
    assert data["layers"][0]["mult_adds"] == 32 * 32 * 32 * 3 * 25


def test_summary_too_small_input_names_layer(capsys):
    assert main(["summary", "tudui", "--input", "3x2x2"]) == 2
    err = capsys.readouterr().err
    assert "layer 3" in err and "MaxPool2d" in err and "Traceback" not in err


def test_shape_solve_padding_the_notes_way(capsys):
    assert main(["shape", "conv", "--size", "32", "--kernel", "5", "--solve", "padding", "--target", "32"]) == 0
    assert "padding 2 gives 32" in capsys.readouterr().out
    assert solve("conv", "stride", 32, 16, 5, 1, 2, 1, False) == [2]
    assert solve("conv", "padding", 32, 100, 5, 1, 0, 1, False) == [36]
    assert solve("pool", "padding", 32, 20, 2, 2, 0, 1, False) == []   # pool padding <= kernel/2
    assert main(["shape", "pool", "--size", "32", "--kernel", "2", "--solve", "padding", "--target", "20"]) == 0
    assert "no padding gives 20" in capsys.readouterr().out


def test_shape_reports_non_square_and_bad_values(capsys):
    assert main(["shape", "pool", "--size", "5x7", "--kernel", "3", "--ceil-mode"]) == 0
    out = capsys.readouterr().out
    assert "output 2×3" in out
    assert main(["shape", "conv", "--size", "3", "--kernel", "5"]) == 1
    assert "too small" in capsys.readouterr().err


# ----------------------------------------------------------------------------- pictures

def _non_blank_png(path, min_w=200, min_h=100):
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape[1] >= min_w and img.shape[0] >= min_h
    assert img.std() > 10            # real content, not a blank canvas
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 50


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    from helpers import make_folder
    import os
    tmp = tmp_path_factory.mktemp("pics")
    os.environ["CIFARKIT_CACHE"] = str(tmp / "cache")
    data = make_folder(tmp / "data", classes=("cat", "dog", "ship", "frog"), n_per_class=30)
    out = tmp / "run"
    assert main(["train", "--data", str(data), "--out", str(out), "--epochs", "2", "--batch-size", "16",
                 "--model", "tudui", "--lr", "0.01", "--val-size", "40", "--quiet"]) == 0
    return data, out


def test_curves_png_in_run_folder(small_run):
    _non_blank_png(small_run[1] / "curves.png", 600, 250)


def test_tensorboard_has_scalars_and_images(small_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(small_run[1] / "tb"))
    acc.Reload()
    tags = acc.Tags()
    assert {"train_loss", "val_acc"} <= set(tags["scalars"])
    assert {"train_samples_augmented", "val_confusion"} <= set(tags["images"]), tags


@pytest.mark.parametrize("augmented", [False, True])
def test_show_data_grid(small_run, tmp_path, capsys, augmented):
    out = tmp_path / "grid.png"
    argv = ["show-data", "--data", str(small_run[0]), "--out", str(out), "--per-class", "6"]
    assert main(argv + (["--augmented"] if augmented else [])) == 0
    _non_blank_png(out, 300, 200)


def test_confusion_png(small_run, tmp_path, capsys):
    out = tmp_path / "cm.png"
    assert main(["eval", str(small_run[1] / "best.ckpt"), "--confusion", str(out)]) == 0
    _non_blank_png(out, 500, 200)


def test_mistakes_png(small_run, tmp_path, capsys):
    out = tmp_path / "m.png"
    rc = main(["mistakes", str(small_run[1] / "last.ckpt"), "--split", "train", "--out", str(out), "--n", "8"])
    err = capsys.readouterr().err
    if rc == 1 and "no mistakes" in err:
        pytest.skip("the model made no mistakes on this split")
    assert rc == 0
    _non_blank_png(out, 300, 100)


def test_features_png_and_bad_layer(small_run, tmp_path, capsys):
    img = sorted((small_run[0] / "train" / "cat").iterdir())[0]
    out = tmp_path / "f.png"
    assert main(["features", str(small_run[1] / "best.ckpt"), str(img), "--layer", "0", "--out", str(out)]) == 0
    assert "32 maps of 32×32" in capsys.readouterr().out
    _non_blank_png(out, 300, 200)
    assert main(["features", str(small_run[1] / "best.ckpt"), str(img), "--layer", "conv9", "--out", str(out)]) == 2
    assert "no layer" in capsys.readouterr().err

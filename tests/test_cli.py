"""The CLI end to end, in-process (fast) plus one real subprocess for `python -m cifarkit`."""
import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from cifarkit.cli import main


def run(argv, capsys):
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_models_lists_parameter_counts(capsys):
    rc, out, _ = run(["models"], capsys)
    assert rc == 0 and "tudui" in out and "145,578" in out
    rc, out, _ = run(["models", "--json"], capsys)
    rows = {r["name"]: r["parameters"] for r in json.loads(out)}
    assert rows["tudui"] == 145_578 and "resnet18" in rows


def test_eval_table_and_json(trained_run, capsys):
    data, run_dir = trained_run
    rc, out, _ = run(["eval", str(run_dir / "best.ckpt"), "--data", str(data), "--json"], capsys)
    r = json.loads(out)
    assert rc == 0 and set(r) == {"accuracy", "top5", "loss", "n", "per_class", "recall", "precision", "f1",
                                  "macro", "confusion"}
    assert r["n"] == 24 and r["accuracy"] > 0.8 and r["top5"] is None      # 3 classes: no top-5
    assert sum(map(sum, r["confusion"])) == 24 and set(r["per_class"]) == {"cat", "dog", "ship"}
    assert r["recall"] == r["per_class"] and set(r["macro"]) == {"recall", "precision", "f1"}
    rc, out, _ = run(["eval", str(run_dir / "best.ckpt"), "--split", "train", "--json"], capsys)
    assert json.loads(out)["n"] == 96          # default data: what the model was trained on
    rc, out, _ = run(["eval", str(run_dir / "best.ckpt"), "--data", str(data)], capsys)
    assert "val accuracy" in out and "confusion" in out and "ship" in out
    assert "precision" in out and "macro mean" in out


def test_predict_files_folders_modes_and_bad_file(trained_run, tmp_path, capsys):
    data, run_dir = trained_run
    imgs = tmp_path / "imgs"
    (imgs / "sub").mkdir(parents=True)
    src = sorted((data / "train" / "ship").iterdir())[0]
    rgb = Image.open(src).convert("RGB")
    rgb.convert("RGBA").save(imgs / "a.png")
    rgb.convert("P").save(imgs / "sub" / "b.PNG")
    rgb.resize((97, 61)).save(imgs / "c.jpg")
    rgb.convert("CMYK").save(imgs / "d.jpg")
    (imgs / "broken.jpg").write_bytes(b"<html>oops</html>")
    rc, out, err = run(["predict", str(run_dir / "best.ckpt"), str(imgs), "--top-k", "2", "--json"], capsys)
    assert rc == 1                                  # one file was unreadable
    assert "broken.jpg" in err and err.count("\n") == 1 and "Traceback" not in err
    res = json.loads(out)
    assert len(res) == 4 and all(len(r["top"]) == 2 for r in res)
    assert all(r["top"][0]["class"] == "ship" for r in res)
    # ranked, and the top 2 of 3 classes: more than half of the probability, less than all of it
    assert all(1 >= r["top"][0]["prob"] >= r["top"][1]["prob"] > 0 for r in res)
    assert all(0.5 < sum(t["prob"] for t in r["top"]) < 1 for r in res)
    rc, out, _ = run(["predict", str(run_dir / "best.ckpt"), str(imgs), "--top-k", "3", "--json"], capsys)
    full = json.loads(out)
    assert all(abs(sum(t["prob"] for t in r["top"]) - 1) < 1e-5 for r in full)      # all 3 classes
    assert [r["top"][:2] for r in full] == [r["top"] for r in res]
    rc, out, _ = run(["predict", str(run_dir / "best.ckpt"), str(imgs / "a.png")], capsys)
    assert rc == 0 and out.startswith(str(imgs / "a.png") + ": ship")


def test_export_and_convert_cycle(trained_run, tmp_path, capsys):
    data, run_dir = trained_run
    best = str(run_dir / "best.ckpt")
    st = tmp_path / "m.safetensors"
    assert run(["export", best, "--format", "safetensors", "--out", str(st)], capsys)[0] == 0
    pk = tmp_path / "whole.pth"
    assert run(["export", best, "--format", "pickle", "--out", str(pk)], capsys)[0] == 0
    rc, _, err = run(["convert", str(pk), "--out", str(tmp_path / "x.ckpt")], capsys)
    assert rc == 1 and "--trust-pickle" in err and not (tmp_path / "x.ckpt").exists()
    rc, out, _ = run(["convert", str(pk), "--trust-pickle", "--out", str(tmp_path / "x.ckpt")], capsys)
    assert rc == 0 and "tudui_relu" in out
    # the notes' method 2: a bare state_dict + --model
    sd = tmp_path / "sd.pth"
    torch.save(torch.load(best, weights_only=True)["state_dict"], sd)
    rc, _, err = run(["predict", str(sd), str(data / "train" / "cat")], capsys)
    assert rc == 1 and "--model" in err
    results = {}
    for f in (best, str(st), str(tmp_path / "x.ckpt")):
        rc, out, _ = run(["predict", f, str(data / "train" / "dog"), "--json", "--model", "tudui_relu"], capsys)
        results[f] = [r["top"][0]["class"] for r in json.loads(out)]
    # the checkpoint, its safetensors export and the pickle converted back predict the same
    assert results[best] == results[str(st)] == results[str(tmp_path / "x.ckpt")]
    assert len(results[best]) == 40


def test_resume_continues_from_cli(trained_run, tmp_path, capsys):
    import shutil
    data, shared = trained_run
    run_dir = tmp_path / "run"
    shutil.copytree(shared, run_dir)
    rc, out, _ = run(["train", "--resume", str(run_dir), "--epochs", "4", "--quiet"], capsys)
    assert rc == 0 and "resuming" in out and "epoch   4/4" in out
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["epoch"] for l in lines] == [1, 2, 3, 4]


@pytest.mark.parametrize("argv,needle", [
    (["train", "--model", "resnet81", "--data", "x"], "resnet18"),
    (["train", "--recipe", "fastt"], "fast"),
    (["train", "--epochs", "0"], "epochs"),
    (["train", "--batch-size", "-3"], "batch-size"),
    (["train", "--device", "cuda"], "cuda"),
    (["train", "--precision", "fp16", "--device", "cpu", "--data", "nowhere"], "fp16"),
    (["train", "--data", "/does/not/exist"], "does not exist"),
    (["eval", "/no/such.ckpt"], "does not exist"),
    (["predict", "/no/such.ckpt", "x.png"], "does not exist"),
    (["train", "--lr", "abc"], "--lr"),
])
def test_bad_arguments_one_line_no_traceback(argv, needle, capsys, tmp_path):
    if "--device" in argv and "cuda" in argv and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    argv = argv + (["--out", str(tmp_path / "o")] if argv[0] == "train" else [])
    try:
        rc = main(argv)
    except SystemExit as e:   # argparse errors
        rc = e.code
    _, err = capsys.readouterr()
    assert rc != 0 and needle in err
    assert err.strip().count("\n") == 0 and "Traceback" not in err


def test_python_dash_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "cifarkit", "models"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "vgg16" in r.stdout


def test_train_help_comes_from_the_config_fields():
    """One source for a setting's help: the TrainConfig field. Every flag shows it, every field
    with a flag has one, and choices come from config.CHOICES (so --optimizer lists muon)."""
    import argparse
    from dataclasses import fields
    from cifarkit.cli import _YAML_ONLY, build_parser
    from cifarkit.config import CHOICES, TrainConfig
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    train_p = sub.choices["train"]
    by_dest = {a.dest: a for a in train_p._actions}
    for f in fields(TrainConfig):
        assert f.metadata["help"], f.name
        if f.name == "recipe" or f.name in _YAML_ONLY:   # --recipe has its own help; mappings are YAML only
            continue
        assert by_dest[f.name].help == f.metadata["help"], f.name
        if f.name in CHOICES:
            assert tuple(by_dest[f.name].choices) == CHOICES[f.name]
    assert "muon" in by_dest["optimizer"].choices


def test_train_config_is_recipe_then_yaml_then_flags(tmp_path):
    """train_config is what `cifarkit train` runs (benchmarks/vs_airbench.py --flops counts it):
    the recipe's values, a YAML file over them, flags over both."""
    from cifarkit.cli import build_parser, train_config
    parse = lambda *argv: train_config(build_parser().parse_args(["train", *argv]))
    fast = parse("--recipe", "fast")
    assert fast.model == "fast" and fast.epochs == 16 and fast.model_args["widths"] == [64, 224, 320]
    yaml = tmp_path / "c.yaml"
    yaml.write_text("epochs: 11\nbatch_size: 500\n")
    cfg = parse("--recipe", "fast", "--config", str(yaml), "--epochs", "13")
    assert (cfg.epochs, cfg.batch_size, cfg.model) == (13, 500, "fast")   # flag > YAML > recipe
    assert parse().model == "tudui" and parse().epochs == 10               # no recipe: the notes' chapter

"""The command line: a thin layer over the API.

Each sub-command parses its flags, calls the library, prints the result. A CifarkitError becomes
one line on stderr and a non-zero exit code; nothing else is decided here.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from dataclasses import fields

from .errors import CifarkitError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + message
        self.exit(2, f"error: {message} -- see `{self.prog} --help`\n")


def _one_line_warnings() -> None:
    warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {' '.join(str(msg).split())}\n"


# ----------------------------------------------------------------------------- train

# Mappings have no flag: they are set in a --config YAML file (or a recipe).
_YAML_ONLY = ("model_args", "optimizer_args", "hard_proxy_args")


def _int_list(text: str) -> list:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers like 20,24, got {text!r}")


def _add_train(sub):
    from .config import CHOICES, TrainConfig, list_recipes

    p = sub.add_parser("train", help="train a model (the notes' loop, made fast and safe)",
                       description="Train a model. Settings come from defaults < --recipe < --config "
                                   "YAML < flags; the resolved set is saved as RUN/config.yaml.")
    p.add_argument("--recipe", default=None, help=f"named settings: {', '.join(list_recipes())} "
                                                   "(default tutorial)")
    p.add_argument("--config", help="YAML file with the same keys as a run's config.yaml")
    p.add_argument("--resume", metavar="RUN", help="continue a run folder (or its last.ckpt) where it stopped")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    types = {"int": int, "float": float, "str": str, "str | None": str, "list": _int_list}
    for f in fields(TrainConfig):
        if f.name == "recipe" or f.name in _YAML_ONLY:
            continue
        flag = "--" + f.name.replace("_", "-")
        kw = {"default": None, "help": f.metadata["help"]}   # one source: the config field
        if f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        else:
            if f.name in CHOICES:
                kw["choices"] = CHOICES[f.name]
            p.add_argument(flag, type=types[f.type], **kw)
    p.set_defaults(func=cmd_train)


def train_config(a):
    """The TrainConfig that `cifarkit train` with these parsed flags runs: recipe < YAML < flags."""
    from .config import TrainConfig, resolve

    overrides = {f.name: getattr(a, f.name) for f in fields(TrainConfig)
                 if f.name not in _YAML_ONLY and getattr(a, f.name, None) is not None}
    return resolve(a.recipe or "tutorial", a.config, overrides)


def cmd_train(a) -> int:
    from .training import train

    if a.resume:
        train(None, resume=a.resume, progress=not a.quiet, epochs=a.epochs, model=a.model)
        return 0
    train(train_config(a), progress=not a.quiet)
    return 0


# ----------------------------------------------------------------------------- eval / predict

def _load(a):
    from .checkpoint import load_checkpoint
    return load_checkpoint(a.checkpoint, model=getattr(a, "model", None),
                           num_classes=getattr(a, "num_classes", None),
                           trust_pickle=getattr(a, "trust_pickle", False))


def _add_ckpt_args(p):
    p.add_argument("checkpoint", help="a cifarkit .ckpt, a safetensors export, or a state_dict file")
    p.add_argument("--model", help="architecture of a bare state_dict (the notes' method 2), or the "
                                   "file.py:Name of your own network the checkpoint was trained with")
    p.add_argument("--num-classes", type=int, help="class count of a bare state_dict (default: from its head)")


def cmd_eval(a) -> int:
    from .evaluate import evaluate_checkpoint

    ckpt = _load(a)
    r, _ = evaluate_checkpoint(ckpt, a.data, a.split, a.device, a.precision, a.tta,
                               data_root=a.data_root, keep_probs=False, progress=not a.json)
    if a.confusion:
        from .plots import plot_confusion
        plot_confusion(r.confusion, list(ckpt.classes), a.confusion)
    if a.json:
        print(json.dumps(r.to_json()))
        return 0
    top5 = f"  top-5 {r.top5:.4f}" if r.top5 is not None else ""
    print(f"{a.split} accuracy {r.accuracy:.4f}{top5}  loss {r.loss:.4f}  n {r.n}")
    fmt = lambda v: "-" if v is None else f"{v:.4f}"
    width = max(len(c) for c in list(ckpt.classes) + ["macro mean"])
    print(f"{'class':<{width}}  {'recall':>8}  {'precision':>9}  {'F1':>8}   (recall = per-class accuracy)")
    for c in ckpt.classes:
        print(f"{c:<{width}}  {fmt(r.per_class.get(c)):>8}  {fmt(r.precision.get(c)):>9}  {fmt(r.f1.get(c)):>8}")
    print(f"{'macro mean':<{width}}  {fmt(r.macro.get('recall')):>8}  {fmt(r.macro.get('precision')):>9}  "
          f"{fmt(r.macro.get('f1')):>8}")
    print("confusion (rows: true, columns: predicted)")
    for c, row in zip(ckpt.classes, r.confusion):
        print(f"{c:<{width}}  " + " ".join(f"{v:>5}" for v in row))
    if a.confusion:
        print(f"wrote {a.confusion}")
    return 0


def cmd_predict(a) -> int:
    from .predict import Predictor

    if a.top_k < 1:
        raise CifarkitError(f"--top-k must be >= 1, got {a.top_k}", exit_code=2)
    if str(a.checkpoint).endswith(".onnx"):
        from .export import OnnxPredictor
        pred = OnnxPredictor(a.checkpoint)
    else:
        from .device import resolve_device
        pred = Predictor(_load(a), resolve_device(a.device))
    results, errors = pred.predict_paths(a.images, a.top_k)
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    if a.json:
        print(json.dumps(results))
    else:
        for r in results:
            tops = ", ".join(f"{t['class']} {t['prob']:.3f}" for t in r["top"])
            print(f"{r['path']}: {tops}")
    if not results and not errors:
        raise CifarkitError("no images found in " + ", ".join(a.images),
                            "pass image files or folders that contain .jpg/.png files")
    return 1 if errors else 0


# ----------------------------------------------------------------------------- files

def cmd_export(a) -> int:
    from .checkpoint import export_pickle, export_safetensors

    ckpt = _load(a)
    if a.format == "safetensors":
        export_safetensors(ckpt, a.out)
        print(f"wrote {a.out} (+ {a.out}.json metadata)")
    elif a.format == "pickle":
        export_pickle(ckpt, a.out)
        print(f"wrote {a.out} (whole pickled model: loading it needs weights_only=False, i.e. trust)")
    else:
        from .export import export_onnx, export_pt2, export_torchscript
        fn = {"onnx": export_onnx, "torchscript": export_torchscript, "pt2": export_pt2}[a.format]
        diff = fn(ckpt, a.out)
        print(f"wrote {a.out} (max abs difference to PyTorch {diff:.2e})")
    return 0


def cmd_convert(a) -> int:
    from .checkpoint import save_checkpoint

    ckpt = _load(a)
    if ckpt.source == "cifarkit":
        raise CifarkitError(f"{a.checkpoint} is already a cifarkit checkpoint", "nothing to convert")
    save_checkpoint(ckpt, a.out, with_training_state=False)
    print(f"wrote {a.out}: model {ckpt.model_name}, {ckpt.num_classes} classes (from a {ckpt.source} file)")
    return 0


def cmd_serve(a) -> int:
    from .serve import serve
    serve(a.checkpoint, a.host, a.port, a.top_k, a.model)
    return 0


def cmd_models(a) -> int:
    from .models import count_parameters, create_model, list_models, model_doc

    rows = [(n, count_parameters(create_model(n, a.num_classes)), model_doc(n)) for n in list_models()]
    if a.json:
        print(json.dumps([{"name": n, "parameters": c, "description": d} for n, c, d in rows]))
        return 0
    w = max(len(n) for n, _, _ in rows)
    print(f"{'model':<{w}}  {'parameters':>12}  description")
    for n, c, d in rows:
        print(f"{n:<{w}}  {c:>12,}  {d}")
    return 0


# ----------------------------------------------------------------------------- wiring

def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="cifarkit", description="Train, evaluate, inspect, save/load, export and "
                     "serve small-image classifiers (CIFAR-10 and your own image folders).")
    parser.add_argument("--version", action="version", version=f"cifarkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add_train(sub)

    p = sub.add_parser("eval", help="accuracy (top-1, top-5), loss, per-class recall/precision/F1, confusion matrix")
    _add_ckpt_args(p)
    p.add_argument("--data", help="'cifar10' or a folder (default: the data the model was trained on)")
    p.add_argument("--data-root", help="where CIFAR-10 is stored")
    p.add_argument("--split", default="val", choices=("val", "test", "train"))
    p.add_argument("--tta", choices=("none", "flip", "flip_translate", "multi"),
                   help="test-time augmentation (default: as trained)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument("--confusion", metavar="PNG", help="also draw the confusion matrix")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="classify image files and folders")
    _add_ckpt_args(p)
    p.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="write the model as safetensors, pickle, ONNX, TorchScript or torch.export (.pt2)")
    _add_ckpt_args(p)
    p.add_argument("--format", required=True, choices=("safetensors", "pickle", "onnx", "torchscript", "pt2"))
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("convert", help="turn a foreign file (pickled model, state_dict) into a safe .ckpt")
    _add_ckpt_args(p)
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow unpickling a whole model; a pickle can run code, so only for files you trust")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("serve", help="a web page and JSON API to try a model (FastAPI)")
    p.add_argument("checkpoint", help="a checkpoint (or an exported .onnx file)")
    p.add_argument("--model", help="architecture of a bare state_dict")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--top-k", type=int, default=3)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("models", help="list registered networks with parameter counts")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)

    # The learning commands live beside what they show: inspect.py (summary, shape, demo) and
    # pictures.py (show-data, mistakes, features); each adds its own flags here.
    from . import inspect as _inspect_cli, pictures
    _inspect_cli.add_commands(sub)
    pictures.add_commands(sub)
    return parser


def main(argv=None) -> int:
    _one_line_warnings()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except CifarkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `cifarkit predict ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except MemoryError:
        print("error: out of memory -- use a smaller --batch-size or image size", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug: say so plainly, show the traceback only on request
        if os.environ.get("CIFARKIT_DEBUG"):
            raise
        print(f"error: internal error ({type(exc).__name__}: {' '.join(str(exc).split())[:300]}) -- "
              "this is a cifarkit bug; rerun with CIFARKIT_DEBUG=1 for the traceback and report it",
              file=sys.stderr)
        return 3

"""Commands that draw pictures: sample grids, confident mistakes, feature maps."""
from __future__ import annotations

import torch

from .errors import CifarkitError


def show_data(data: str, out: str, per_class: int = 8, augmented: bool = False, seed: int = 0,
              data_root: str | None = None, flip: bool = True, crop_pad: int = 4, cutout: int = 0) -> None:
    from .data import load_data
    from .data.augment import augment
    from .plots import image_grid

    bundle = load_data(data, data_root, True, 32, progress=False)
    g = torch.Generator().manual_seed(seed)
    picks, titles = [], []
    for c, name in enumerate(bundle.classes):
        idx = torch.nonzero(bundle.train.y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)[:per_class]]
        picks.append(bundle.train.x[idx])
        titles += [name] * len(idx)
    x = torch.cat(picks)
    if augmented:
        x = augment(x, g, flip, crop_pad, cutout)
    image_grid(x, titles, out, cols=per_class)


def mistakes(ckpt, data: str | None, out: str, n: int = 24, split: str = "val",
             data_root: str | None = None) -> list[dict]:
    """The n most confident wrong predictions, drawn with true/predicted class and probability."""
    from .evaluate import evaluate_checkpoint
    from .plots import image_grid

    r, s = evaluate_checkpoint(ckpt, data, split, "cpu", "fp32", tta="none", data_root=data_root,
                               keep_probs=True, progress=False)
    conf, pred = r.probs.max(1)
    wrong = torch.nonzero(pred != r.labels).flatten()
    order = wrong[conf[wrong].argsort(descending=True)][:n]
    classes = ckpt.classes
    items = [{"index": int(i), "true": classes[int(r.labels[i])], "pred": classes[int(pred[i])],
              "prob": float(conf[i])} for i in order]
    if not items:
        raise CifarkitError(f"no mistakes on the {split} split ({r.n} images)", "nothing to draw")
    image_grid(s.x[order.to(s.x.device)].cpu(),
               [f"{it['true']}→{it['pred']}\n{it['prob']:.2f}" for it in items], out, cols=8, scale=1.4)
    return items


def features(ckpt, image: str, layer: str, out: str) -> tuple:
    """Activations of one image after `layer`, one panel per channel."""

    from .data.sources import preprocess_of, read_image
    from .data.tensors import normalize
    from .plots import feature_maps

    model = ckpt.build_model("cpu")
    modules = dict(model.named_modules())
    names = [n for n in modules if n]
    if layer not in modules or not layer:
        from .errors import closest
        raise CifarkitError(f"model {ckpt.model_name} has no layer {layer!r}",
                            f"{closest(layer, names)}layers: {', '.join(names[:30])}", 2)
    x = torch.from_numpy(read_image(image, *preprocess_of(ckpt.preprocess)).transpose(2, 0, 1).copy())[None]
    x = normalize(x, ckpt.preprocess["mean"], ckpt.preprocess["std"])
    captured = {}
    handle = modules[layer].register_forward_hook(lambda m, i, o: captured.setdefault("out", o))
    with torch.no_grad():
        model(x)
    handle.remove()
    act = captured.get("out")
    if act is None or not torch.is_tensor(act) or act.dim() != 4:
        shape = tuple(act.shape) if torch.is_tensor(act) else None
        raise CifarkitError(f"layer {layer!r} outputs {shape}, not feature maps (N,C,H,W)",
                            "pick a convolution, activation or pooling layer", 2)
    feature_maps(act[0].float().numpy(), f"{ckpt.model_name} · {layer} · {tuple(act.shape[1:])}", out)
    return tuple(act.shape[1:])


def _cmd_show_data(a) -> int:
    show_data(a.data, a.out, a.per_class, a.augmented, a.seed, a.data_root)
    print(f"wrote {a.out}")
    return 0


def _cmd_mistakes(a) -> int:
    from .checkpoint import load_checkpoint
    items = mistakes(load_checkpoint(a.checkpoint, model=a.model), a.data, a.out, a.n, a.split, a.data_root)
    for it in items[:5]:
        print(f"{it['true']:>12} → {it['pred']:<12} {it['prob']:.3f}")
    print(f"wrote {a.out} ({len(items)} mistakes)")
    return 0


def _cmd_features(a) -> int:
    from .checkpoint import load_checkpoint
    shape = features(load_checkpoint(a.checkpoint, model=a.model), a.image, a.layer, a.out)
    print(f"wrote {a.out} ({shape[0]} maps of {shape[1]}×{shape[2]})")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("show-data", help="a grid of sample images per class (raw or augmented)")
    p.add_argument("--data", default="cifar10")
    p.add_argument("--data-root")
    p.add_argument("--out", required=True)
    p.add_argument("--per-class", type=int, default=8)
    p.add_argument("--augmented", action="store_true", help="as the training augmentation (flip, crop) shows them")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_show_data)

    p = sub.add_parser("mistakes", help="the most confident wrong predictions, as a picture")
    p.add_argument("checkpoint")
    p.add_argument("--model", help="architecture of a bare state_dict")
    p.add_argument("--data", help="default: the data the model was trained on")
    p.add_argument("--data-root")
    p.add_argument("--split", default="val", choices=("val", "test", "train"))
    p.add_argument("--n", type=int, default=24)
    p.add_argument("--out", required=True)
    p.set_defaults(func=_cmd_mistakes)

    p = sub.add_parser("features", help="feature maps of one image after a chosen layer")
    p.add_argument("checkpoint")
    p.add_argument("image")
    p.add_argument("--layer", required=True, help="module name as in `cifarkit summary` (e.g. 0 for tudui's first conv)")
    p.add_argument("--model", help="architecture of a bare state_dict")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_cmd_features)

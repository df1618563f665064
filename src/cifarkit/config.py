"""Training configuration: dataclass defaults < recipe < ``--config`` YAML < command-line flags.

A recipe is a named, fixed set of hyper-parameters. The fully resolved config is saved as
``config.yaml`` in the run folder and inside every checkpoint; that file can be passed back with
``--config`` to repeat a run.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import CifarkitError, closest


def user_cache_root() -> Path:
    """Where cifarkit keeps what it can make again (downloads, decoded images, timing choices):
    $XDG_CACHE_HOME/cifarkit, else ~/.cache/cifarkit."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cifarkit"

CHOICES = {
    "optimizer": ("sgd", "adamw", "muon"),
    "schedule": ("constant", "onecycle", "cosine", "linear"),
    "loss": ("ce", "mse", "l1"),
    "precision": ("auto", "fp32", "bf16", "fp16"),
    "device": ("auto", "cpu", "cuda", "mps"),
    "tta": ("none", "flip", "flip_translate", "multi"),
    "balance": ("none", "weights", "sampler"),
    "freeze": ("none", "backbone"),
    "crop_mode": ("center", "squash"),
}


def setting(default, help: str):
    """A TrainConfig field with its help text: the one source of `cifarkit train --help`."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # what
    recipe: str = setting("tutorial", "named settings the others start from (config.RECIPES)")
    model: str = setting("tudui", "network from the registry (see `cifarkit models`), or your own "
                                  "nn.Module: path/to/file.py:Name")
    model_args: dict = setting({}, "the network's settings, e.g. {widths: [64, 256, 256]} (YAML only)")
    pretrained: bool = setting(False, "start from torchvision's ImageNet weights (tv_resnet18, ..., vgg16; "
                                      "their normalisation too) with a new head for the data's classes")
    freeze: str = setting("none", "backbone: train only the head (the last linear layer)")
    # data
    data: str = setting("cifar10", "'cifar10' (downloaded when missing) or a folder DIR/train/<class>/*.jpg")
    data_root: str | None = setting(None, "where CIFAR-10 is stored/downloaded (default $CIFARKIT_DATA "
                                          "or ~/.cache/cifarkit/data)")
    download: bool = setting(True, "download CIFAR-10 when missing (--no-download to forbid)")
    val_size: int = setting(5000, "images held out for validation when the data has no val/ folder "
                                  "(0: none; the final weights are RUN/last.ckpt)")
    image_size: int = setting(32, "side in pixels; images of another size are resized (see --crop-mode); "
                                  "default: the network's (224 for torchvision's tv_* networks, 32 else)")
    crop_mode: str = setting("center", "how a photo that is not image_size x image_size is fitted: center "
                                       "(shorter side resized to image_size, then the centre cut out; keeps "
                                       "proportions) or squash (stretched to the square); the checkpoint "
                                       "records it, so eval, predict, export and serve do the same")
    seed: int = setting(0, "seed for the split, initialisation, data order and augmentation")
    # optimisation
    epochs: int = setting(10, "passes over the training images")
    batch_size: int = setting(64, "images per optimiser step; GLOBAL under torchrun (split over the processes)")
    optimizer: str = setting("sgd", "muon: orthogonalised updates for conv filters, Nesterov SGD for "
                                    "the rest (optim.py)")
    optimizer_args: dict = setting({}, "muon's settings, e.g. {bias_lr: 0.053} (optim.MUON_DEFAULTS; YAML only)")
    lr: float = setting(0.01, "peak learning rate (of the conv filters under muon)")
    head_lr: float = setting(0.0, "sgd/adamw: the head's own peak learning rate (0 = --lr), e.g. 10x "
                                  "the backbone's when fine-tuning")
    momentum: float = setting(0.0, "SGD momentum")
    nesterov: bool = setting(False, "Nesterov momentum (SGD)")
    weight_decay: float = setting(0.0, "weight decay: decoupled for adamw, L2 for sgd (biases and norm "
                                       "weights are never decayed)")
    schedule: str = setting("constant", "learning-rate schedule after warm-up")
    warmup_epochs: float = setting(0.0, "linear warm-up from 0, in epochs (may be fractional)")
    label_smoothing: float = setting(0.0, "label smoothing of the targets")
    balance: str = setting("none", "unbalanced classes: weights (the loss weighs each class by its inverse "
                                   "frequency) or sampler (each epoch draws images class-balanced, with "
                                   "replacement)")
    loss: str = setting("ce", "ce (cross-entropy), mse or l1 (on softmax vs one-hot)")
    ema: float = setting(0.0, "exponential moving average of the weights, decay per step (0 = off)")
    clip_grad: float = setting(0.0, "clip the gradients' global norm to this value before each step (0 = off)")
    patience: int = setting(0, "stop early when the val accuracy has not improved for this many epochs "
                               "(0 = train all --epochs)")
    hard_fraction: float = setting(1.0, "selective backprop: train each step on this share of the batch "
                                        "with the highest loss, scored by a no-grad forward pass of the "
                                        "network or by --hard-proxy; 1 = train on all")
    hard_fraction_small: float = setting(0.0, "with --hard-fraction and --progressive: the share trained "
                                              "in the epochs of images smaller than --image-size "
                                              "(0 = --hard-fraction in every epoch)")
    hard_start: int = setting(0, "first epoch (0-based) of --hard-fraction selection; earlier ones use all")
    hard_per_class: bool = setting(False, "with --hard-fraction: take that share of each class in the "
                                          "batch, so the trained images keep the batch's class mix (a "
                                          "weak scorer that under-rates some classes otherwise picks "
                                          "mostly those)")
    hard_stale: bool = setting(False, "with --hard-fraction: rank each batch by every image's loss from "
                                      "the last step that trained on it (images not trained yet first): "
                                      "no scoring pass and no proxy, so a step costs only the trained "
                                      "share; instead of --hard-proxy")
    hard_proxy: list = setting([], "comma-separated widths of a small copy of the network that scores "
                                   "the images for --hard-fraction, trained alongside on every whole "
                                   "batch (e.g. 16,64,64); empty: the network scores itself")
    hard_proxy_args: dict = setting({}, "the proxy's model_args where they differ from the network's, "
                                        "e.g. {depths: [2, 2, 2]} (YAML only; unused without hard_proxy)")
    hard_proxy_size: int = setting(0, "with --hard-proxy: the proxy sees each batch resized to at most this "
                                      "side in pixels (cheaper, but a worse ranking: 16 cost the fast recipe "
                                      "2 points); 0 = the images' own size; unused without a proxy")
    # augmentation on whole uint8 batches
    flip: bool = setting(False, "random horizontal flips")
    alt_flip: bool = setting(False, "with --flip: mirror each image every other epoch, from a random "
                                    "per-image start, instead of at random (airbench)")
    crop_pad: int = setting(0, "random translation by up to N pixels (pad-and-crop)")
    cutout: int = setting(0, "zero a random NxN square per image (0 = off)")
    mixup: float = setting(0.0, "MixUp on whole batches: blend each image and its label with another's, "
                                "weight ~ Beta(a, a) for this a (0 = off; torchvision's v2.MixUp)")
    cutmix: float = setting(0.0, "CutMix on whole batches: paste a box of another image, labels mixed by "
                                 "area, Beta(a, a) (0 = off); with --mixup, one of the two per batch")
    tta: str = setting("none", "test-time augmentation of the final validation pass and of eval")
    progressive: list = setting([], "comma-separated image sides of the first epochs, e.g. 20,24,24: "
                                    "cheaper low-resolution epochs; the rest at --image-size")
    # execution
    precision: str = setting("auto", "auto = bf16 where the device does it fast (CUDA, AVX-512-BF16/AMX "
                                      "CPUs), else fp32")
    device: str = setting("auto", "auto picks cuda, then mps, then cpu")
    channels_last: bool = setting(True, "NHWC memory layout (faster convolutions on CPU and tensor cores)")
    compile: bool = setting(False, "torch.compile the model (falls back to eager with a warning)")
    native_kernels: bool = setting(True, "bf16 on CPU: build (once, cached) cifarkit's C++ max-pool, "
                                         "fused batch norm + GELU and 3x3 convolution weight gradient, "
                                         "time them (and that gradient as nine matrix products) against "
                                         "PyTorch's ops, and use each on the shapes where it is faster "
                                         "on this CPU; falls back with one line. fp32 on CPU: the same "
                                         "with the C++ fp32 max-pool and (AVX2) weight gradient, and the "
                                         "3x3 convolutions as matrix products (these need no build)")
    sync_bn: bool = setting(False, "torchrun on GPUs: synchronise batch-norm statistics across processes")
    threads: int = setting(0, "CPU threads (0 = one per available core)")
    deterministic: bool = setting(False, "deterministic algorithms (bit-exact resume)")
    eval_every: int = setting(1, "validate every N epochs (the last epoch always, with --tta)")
    eval_subset: int = setting(0, "val passes before the last score only this many val images, "
                                  "evenly spread over the split (0 = all): a cheaper look at "
                                  "progress, reported as 'val check'; the last pass scores them all, "
                                  "and only full passes count for best.ckpt, --patience and the summary")
    out: str | None = setting(None, "run folder (default runs/<recipe>-<time>)")
    tensorboard: bool = setting(True, "write TensorBoard events into RUN/tb")

    def validate(self) -> "TrainConfig":
        for key, allowed in CHOICES.items():
            value = getattr(self, key)
            if value not in allowed:
                raise CifarkitError(f"--{key.replace('_', '-')} {value!r} is not valid",
                                    f"{closest(str(value), allowed)}choose one of: {', '.join(allowed)}",
                                    exit_code=2)
        for key in ("epochs", "batch_size", "image_size"):
            if getattr(self, key) < 1:
                raise CifarkitError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(self, key)}",
                                    exit_code=2)
        for key in ("val_size", "crop_pad", "cutout", "warmup_epochs", "weight_decay",
                    "momentum", "eval_every", "eval_subset", "threads", "clip_grad", "patience", "mixup", "cutmix", "head_lr"):
            if getattr(self, key) < 0:
                raise CifarkitError(f"--{key.replace('_', '-')} must be >= 0, got {getattr(self, key)}",
                                    exit_code=2)
        if self.crop_pad >= self.image_size:
            raise CifarkitError(f"--crop-pad {self.crop_pad} must be smaller than --image-size "
                                f"{self.image_size}", "a shift of a few pixels (2-4) is usual", exit_code=2)
        for size in self.progressive:
            if not (isinstance(size, int) and 8 <= size <= self.image_size):
                raise CifarkitError(f"--progressive sizes must be whole numbers of pixels from 8 to "
                                    f"--image-size {self.image_size}, got {size!r}",
                                    "e.g. --progressive 20,24,24", exit_code=2)
        if len(self.progressive) > self.epochs:
            raise CifarkitError(f"--progressive lists {len(self.progressive)} epochs but --epochs is "
                                f"{self.epochs}", "give at most one size per epoch", exit_code=2)
        if not self.lr > 0:
            raise CifarkitError(f"--lr must be > 0, got {self.lr}", exit_code=2)
        if not 0 <= self.label_smoothing < 1:
            raise CifarkitError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}",
                                exit_code=2)
        self._validate_selection()
        if self.pretrained:
            from .models.pretrained import weights_for
            weights_for(self.model)   # refuses networks without ImageNet weights, before any data
        if self.head_lr and self.optimizer == "muon":
            raise CifarkitError("--head-lr is for sgd/adamw; muon sets the head's rate in optimizer_args",
                                "set optimizer_args: {head_lr: ...} in a --config YAML", exit_code=2)
        if self.balance == "weights" and self.loss != "ce":
            raise CifarkitError(f"--balance weights weighs the cross-entropy; --loss {self.loss} has no class weights",
                                "use --loss ce, or --balance sampler", exit_code=2)
        if (self.mixup or self.cutmix) and self.loss != "ce":
            raise CifarkitError(f"--mixup/--cutmix give soft targets, which --loss {self.loss} does not take",
                                "use --loss ce with them", exit_code=2)
        if (self.mixup or self.cutmix) and self.hard_per_class:
            raise CifarkitError("--hard-per-class ranks by class, which mixed labels no longer have",
                                "drop --hard-per-class or --mixup/--cutmix", exit_code=2)
        if not 0 <= self.ema < 1:
            raise CifarkitError(f"--ema must be in [0, 1), got {self.ema}", exit_code=2)
        from .models import list_models
        if self.model not in list_models():
            from .models import create_model
            create_model(self.model)  # raises the 'unknown model' error with suggestions
        if not isinstance(self.model_args, dict):
            raise CifarkitError(f"model_args should be a mapping of settings, got {self.model_args!r}",
                                "e.g. model_args: {widths: [64, 256, 256]}", exit_code=2)
        _try_build(self.model, self.model_args)   # unknown settings and bad values, before any data
        self._validate_proxy()
        return self

    def _validate_selection(self) -> None:
        """The --hard-* settings of selective backprop (the proxy's own in _validate_proxy)."""
        if not 0 < self.hard_fraction <= 1:
            raise CifarkitError(f"--hard-fraction must be in (0, 1], got {self.hard_fraction}",
                                "e.g. 0.5 trains on the harder half of each batch; 1 = all", exit_code=2)
        if not 0 <= self.hard_fraction_small <= 1:
            raise CifarkitError(f"--hard-fraction-small must be in [0, 1], got {self.hard_fraction_small}",
                                "e.g. 0.33 trains a third of each batch while the images are small; "
                                "0 = the --hard-fraction", exit_code=2)
        if self.hard_start < 0:
            raise CifarkitError(f"--hard-start must be >= 0, got {self.hard_start}", exit_code=2)
        # Each of these only acts on a selection, which --hard-fraction 1 turns off.
        for flag, on, does, off in (("--hard-stale", self.hard_stale, "ranks images", "--no-hard-stale"),
                                    ("--hard-proxy", self.hard_proxy, "scores images",
                                     "drop --hard-proxy"),
                                    ("--hard-fraction-small", self.hard_fraction_small,
                                     "sets the small-image epochs' share", "drop --hard-fraction-small")):
            if on and self.hard_fraction == 1:
                raise CifarkitError(f"{flag} {does} for --hard-fraction, which is 1 (train on all)",
                                    f"add e.g. --hard-fraction 0.5, or {off}", exit_code=2)
        if self.hard_stale and self.hard_proxy:
            raise CifarkitError(f"--hard-stale and --hard-proxy {self.hard_proxy} are two ways to rank "
                                "the images; pick one", "add --no-hard-stale, or --hard-proxy= to turn "
                                "off a recipe's proxy", exit_code=2)

    def _validate_proxy(self) -> None:
        """The --hard-proxy settings: its model_args, its image size and a network it can copy."""
        if not isinstance(self.hard_proxy_args, dict):
            raise CifarkitError(f"hard_proxy_args should be a mapping of model settings, got "
                                f"{self.hard_proxy_args!r}", "e.g. hard_proxy_args: {depths: [2, 2, 2]}", exit_code=2)
        if self.hard_proxy_size and not (isinstance(self.hard_proxy_size, int) and 8 <= self.hard_proxy_size):
            raise CifarkitError(f"--hard-proxy-size must be 0 (the images' own size) or at least 8 pixels, "
                                f"got {self.hard_proxy_size!r}", "e.g. --hard-proxy-size 16", exit_code=2)
        if self.hard_proxy:
            from .models import model_settings
            if "widths" not in model_settings(self.model):
                raise CifarkitError(f"--hard-proxy needs a model with widths; {self.model} has none",
                                    "use --model fast, or drop --hard-proxy", exit_code=2)
            try:
                _try_build(self.model, self.proxy_model_args())
            except CifarkitError as exc:   # say which setting it came from: the proxy's
                where = f"--hard-proxy {self.hard_proxy}" + (" with hard_proxy_args" if self.hard_proxy_args else "")
                raise CifarkitError(f"{where}: {exc.message}", exc.hint, 2) from None

    def proxy_model_args(self) -> dict:
        """The --hard-proxy network's settings: the model's own < hard_proxy_args < the proxy's widths."""
        return {**self.model_args, **self.hard_proxy_args, "widths": list(self.hard_proxy)}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _try_build(name: str, args: dict) -> None:
    """Build the network on the meta device (no memory, no data) so bad model_args values fail
    before the data is read; only cifarkit's own clear errors are raised here."""
    import torch

    from .models import create_model
    try:
        with torch.device("meta"):
            create_model(name, 10, **args)
    except CifarkitError:
        raise
    except Exception:  # noqa: BLE001 - the real build, after loading the data, reports it
        pass


# A recipe only lists what differs from the dataclass defaults above.
RECIPES: dict[str, dict[str, Any]] = {
    # The notes' full-training chapter, as written: tudui, SGD(lr=0.01), batch 64, 10 epochs,
    # cross-entropy, no augmentation. precision stays "auto" (bf16 on CPUs/GPUs that do it fast):
    # weights and the optimiser stay fp32, only the convolutions run in bf16.
    "tutorial": dict(model="tudui"),
    # ResNet-18 (CIFAR stem) with the classic recipe; slow on a CPU, a GPU baseline.
    "resnet18": dict(model="resnet18", epochs=30, batch_size=128, lr=0.1, momentum=0.9,
                     nesterov=True, weight_decay=5e-4, schedule="onecycle", warmup_epochs=2,
                     flip=True, crop_pad=4, label_smoothing=0.1),
    # Fine-tuning torchvision's ImageNet ResNet-18 on your own photos: its weights, normalisation
    # and 224 px input; AdamW with the new head at 10x the backbone's rate (the backbone already
    # knows images, the head starts from nothing), a short cosine schedule, flips and small shifts.
    "finetune": dict(model="tv_resnet18", pretrained=True, image_size=224, epochs=8, batch_size=32,
                     optimizer="adamw", lr=1e-4,       # backbone: small steps keep what it learned
                     head_lr=1e-3, weight_decay=0.05, schedule="cosine", warmup_epochs=0.5,
                     flip=True, crop_pad=16,           # pixels at 224 px (about 7 %)
                     label_smoothing=0.1),
    # Speed run tuned for CPU FLOPs; see docs/benchmarks.md for its measured accuracy and time.
    "fast": dict(
        # Three conv groups of 64/224/320 channels with 2/3/3 convolutions, each group's convolutions
        # after its first behind a residual (airbench96's group): more accurate than 64/256/384
        # with two plain convolutions per group at about the same CPU cost (docs/benchmarks.md).
        model="fast", model_args={"widths": [64, 224, 320], "depths": [2, 3, 3], "residual": True},
        epochs=16, batch_size=2000,           # images per step (scored; half of them train)
        # Progressive resizing: the first 10 epochs see smaller images (side in px per epoch). A
        # step's work scales with the pixel count, (side/32)^2: 0.25 at 16 px, 0.39 at 20, 0.56
        # at 24, 0.77 at 28, so these 16 epochs cost about 10.6 full ones (step_variants.py
        # --sizes times it on a machine).
        progressive=[16, 16, 16, 20, 20, 20, 24, 24, 28, 28],
        # Selective backprop: each step trains on the half of the batch with the highest loss,
        # as scored by a 16/64/64-wide copy of the network with two plain convolutions per group,
        # trained alongside on every whole batch: the backward pass (about 2/3 of a step) runs on
        # half the images, so a step costs about 2/3 of a full one (step_variants.py --select).
        hard_fraction=0.5, hard_proxy=[16, 64, 64],
        hard_proxy_args={"depths": [2, 2, 2], "residual": False},
        optimizer="muon", lr=0.24,            # Muon step size for conv filters (scale-free)
        optimizer_args={
            "muon_momentum": 0.6,
            "sgd_momentum": 0.85,             # Nesterov SGD for biases and the head
            "bias_lr": 0.053,                 # per image: x batch size, since the loss is a mean
            "head_lr": 0.67,                  # per image
            "decay": 2e-6,                    # per image and step: weight shrink of decay x batch
            "whiten_bias_epochs": 3,          # the whitening layer's bias trains this long
        },
        schedule="linear", warmup_epochs=0,   # linear decay to 0
        label_smoothing=0.2, flip=True, alt_flip=True,  # mirrored every other epoch
        crop_pad=2,                           # translate by up to 2 px (reflect)
        # A validation pass of 5,000 images costs about 0.4 % of the run; one every epoch
        # made the wall time 1.07x the training time, so every 4th (the last always, with TTA),
        # and those before the last on 1,000 of them (3.3-3.5 s each on 5,000 on a Zen 4).
        eval_every=4, eval_subset=1000,
        tta="flip_translate"),
}
# Speed run for the least time at airbench94's accuracy on a CPU: the fast recipe's network,
# optimiser and augmentation for 14 epochs, each batch ranked by stale losses (--hard-stale: every
# image's loss from the last step that trained on it) instead of the proxy network, whose step was
# 12-19 % of every epoch (Zen 4, Xeon). Per epoch it is about 0.88 of `fast` and about 0.2 points
# less accurate (seed 0, 16 and 13 epochs). A third of each batch trains while the images are
# small, a half at 32 px: 0.88 of the time of a half throughout for 0.04 points (seeds 0-3), where
# a third at 32 px cost 0.62 points (seed 0). On a Zen 4: 90.67 % against airbench94's 90.46 % in
# about 0.44x its time (docs/benchmarks.md section 7).
RECIPES["sprint"] = {
    **{k: v for k, v in RECIPES["fast"].items() if k not in ("hard_proxy", "hard_proxy_args")},
    "epochs": 14,
    "progressive": [16, 16, 16, 20, 20, 20, 24, 24, 28],   # fast's 10 of 16, scaled to 9 of 14
    "hard_stale": True,
    "hard_fraction_small": 0.33,   # share of each batch trained in the 16-28 px epochs
}


def list_recipes() -> list[str]:
    return sorted(RECIPES)


def _coerce(key: str, value: Any, source: str) -> Any:
    """Check a YAML/flag value against the dataclass field type; ints become floats where needed."""
    ftype = {f.name: f.type for f in fields(TrainConfig)}[key]
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
        "str | None": value is None or isinstance(value, str),
        "dict": isinstance(value, dict),
        "list": isinstance(value, list),
    }.get(ftype, True)
    if not ok:
        raise CifarkitError(f"{source}: {key} should be {ftype}, got {value!r}",
                            "fix the value and run again", exit_code=2)
    return float(value) if ftype == "float" else value


def load_yaml(path: str | os.PathLike) -> dict:
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CifarkitError(f"config file {path} does not exist", "check the --config path", 2)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CifarkitError(f"cannot read config file {path}: {first}",
                            "it must be a YAML mapping like the config.yaml of a run folder", 2)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CifarkitError(f"config file {path} is not a YAML mapping",
                            "write one key: value per line, as in a run's config.yaml", 2)
    return data


def resolve(recipe: str = "tutorial", config_file: str | None = None,
            overrides: dict | None = None) -> TrainConfig:
    """defaults < recipe < YAML file < overrides (flags); returns a validated TrainConfig."""
    valid = {f.name for f in fields(TrainConfig)}
    layers: list[tuple[str, dict]] = []
    file_values = load_yaml(config_file) if config_file else {}
    recipe = (overrides or {}).get("recipe") or file_values.get("recipe") or recipe
    if recipe not in RECIPES:
        raise CifarkitError(f"unknown recipe {recipe!r}",
                            f"{closest(recipe, RECIPES)}choose one of: {', '.join(list_recipes())}", 2)
    layers.append((f"recipe {recipe}", {**RECIPES[recipe], "recipe": recipe}))
    if config_file:
        layers.append((str(config_file), file_values))
    layers.append(("command line", {k: v for k, v in (overrides or {}).items() if v is not None}))
    values: dict[str, Any] = {}
    for source, layer in layers:
        for key, value in layer.items():
            if key not in valid:
                raise CifarkitError(f"{source}: unknown setting {key!r}",
                                    f"{closest(key, valid)}see `cifarkit train --help`", 2)
            values[key] = _coerce(key, copy.deepcopy(value), source)   # never alias RECIPES
    if "image_size" not in values:   # not set anywhere: the network's own size (224 for tv_*)
        from .models.pretrained import natural_size
        values["image_size"] = natural_size(values.get("model", TrainConfig.model),
                                            bool(values.get("pretrained"))) or TrainConfig.image_size
    base = RECIPES[recipe]
    own_schedule = any("progressive" in layer for _, layer in layers[1:])
    if (base.get("progressive") and not own_schedule
            and values.get("epochs", base.get("epochs")) != base.get("epochs")):
        # `--recipe fast --epochs N` keeps the recipe's resolution schedule in proportion; a
        # schedule given in a file or on the command line is taken as written.
        values["progressive"] = scale_schedule(base["progressive"], base["epochs"], values["epochs"])
    return TrainConfig(**values).validate()


def scale_schedule(sizes: list, epochs: int, new_epochs: int) -> list:
    """Stretch or shrink a per-epoch size list written for ``epochs`` epochs to ``new_epochs``.

    The low-resolution part keeps its share of the run (rounded); each new epoch takes the size
    at the same relative position of the old list.
    """
    n = min(round(len(sizes) * new_epochs / epochs), new_epochs - 1) if new_epochs > 1 else 0
    return [sizes[i * len(sizes) // n] for i in range(n)] if n > 0 else []


def save_yaml(cfg: TrainConfig, path: str | os.PathLike) -> None:
    import yaml

    from . import atomic
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    atomic.write_bytes(Path(path), text.encode("utf-8"))

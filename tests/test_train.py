import json

import pytest
import torch
import torch.nn.functional as F

from cifarkit import CifarkitError, TrainConfig, load_checkpoint, resolve_config, train
from cifarkit.errors import TrainingInterrupted
from cifarkit.optim import lr_factor
from cifarkit.training import make_loss


@pytest.fixture
def optimizer_steps():
    """Every optimiser step taken while the test runs (a global hook: any optimiser, any module)."""
    from torch.optim.optimizer import register_optimizer_step_post_hook
    steps = []
    handle = register_optimizer_step_post_hook(lambda opt, args, kwargs: steps.append(opt))
    yield steps
    handle.remove()


def ctrl_c_after(steps: list, n: int):
    """Press Ctrl-C (a real SIGINT) inside the optimiser step that makes ``steps`` n long."""
    import signal
    from torch.optim.optimizer import register_optimizer_step_post_hook

    def hook(opt, args, kwargs):
        if len(steps) == n:
            signal.raise_signal(signal.SIGINT)
    return register_optimizer_step_post_hook(hook)


def _cfg(folder, out, **kw):
    base = dict(data=str(folder), out=str(out), val_size=24, epochs=3, batch_size=16,
                model="tudui_relu", optimizer="adamw", lr=3e-3, tensorboard=False, precision="fp32")
    base.update(kw)
    return resolve_config("tutorial", overrides=base)


def test_resolution_order_defaults_recipe_yaml_flags(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("epochs: 4\nlr: 0.5\nbatch_size: 32\n")
    cfg = resolve_config("resnet18", str(y), {"lr": 0.2})
    assert cfg.model == "resnet18"      # recipe
    assert cfg.epochs == 4              # yaml over recipe
    assert cfg.lr == 0.2                # flag over yaml
    assert cfg.batch_size == 32
    assert cfg.seed == 0                # default


def test_unknown_keys_and_bad_values_are_clear(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("epochz: 4\n")
    with pytest.raises(CifarkitError, match="epochs"):
        resolve_config("tutorial", str(y))
    with pytest.raises(CifarkitError, match="recipe"):
        resolve_config("tutorail")
    with pytest.raises(CifarkitError, match="batch-size"):
        resolve_config("tutorial", overrides={"batch_size": 0})
    with pytest.raises(CifarkitError, match="mapping"):
        TrainConfig(model="fast", model_args=[64, 256, 256]).validate()     # the API, without YAML
    y.write_text("lr: fast\n")
    with pytest.raises(CifarkitError, match="lr"):
        resolve_config("tutorial", str(y))


def test_tutorial_recipe_is_the_notes_setup():
    cfg = resolve_config("tutorial")
    assert (cfg.model, cfg.optimizer, cfg.lr, cfg.batch_size, cfg.epochs, cfg.loss) == \
        ("tudui", "sgd", 0.01, 64, 10, "ce")
    assert cfg.momentum == 0 and not cfg.flip and cfg.crop_pad == 0 and cfg.schedule == "constant"


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear", "onecycle"])
def test_lr_schedules_warm_up_and_end_low(schedule):
    cfg = TrainConfig(schedule=schedule, warmup_epochs=1)
    f = [lr_factor(cfg, s, 100, 10) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and max(f) <= 1.0 + 1e-9
    assert all(b >= a for a, b in zip(f[:10], f[1:10]))   # warm-up rises
    if schedule != "constant":
        assert f[-1] < 0.05


def test_losses_match_definitions():
    logits = torch.tensor([[0.1, 0.2, 0.3]])
    y = torch.tensor([1])
    ce = make_loss(TrainConfig(loss="ce"), 3)(logits, y)
    assert ce.item() == pytest.approx(1.1019, abs=1e-4)           # the notes' number
    p = logits.softmax(1)
    onehot = torch.tensor([[0.0, 1.0, 0.0]])
    assert make_loss(TrainConfig(loss="mse"), 3)(logits, y).item() == pytest.approx(((p - onehot) ** 2).mean().item())
    assert make_loss(TrainConfig(loss="l1"), 3)(logits, y).item() == pytest.approx((p - onehot).abs().mean().item())


def test_short_run_learns_and_writes_run_folder(tiny_folder, tmp_path):
    out = tmp_path / "run"
    summary = train(_cfg(tiny_folder, out, epochs=4, tensorboard=True), progress=False, log=lambda *a: None)
    assert summary["best_val_acc"] >= 0.9      # 3 easy classes: chance is 0.33
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "curves.png", "last.ckpt", "best.ckpt"):
        assert (out / name).stat().st_size > 0, name
    assert any((out / "tb").iterdir())
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [1, 2, 3, 4]
    assert set(lines[0]) >= {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds", "images_per_s"}
    assert lines[-1]["train_loss"] < lines[0]["train_loss"]
    s = json.loads((out / "summary.json").read_text())
    assert {"best_val_acc", "final_val_acc", "wall_seconds", "train_images_per_s", "device", "torch_version"} <= set(s)
    ck = load_checkpoint(out / "best.ckpt")
    assert ck.classes == ["cat", "dog", "ship"] and ck.config["model"] == "tudui_relu"
    assert len(ck.preprocess["mean"]) == 3 and ck.preprocess["size"] == 32


def test_bf16_and_augmentation_and_ema_run(tiny_folder, tmp_path):
    s = train(_cfg(tiny_folder, tmp_path / "r", precision="bf16", flip=True, crop_pad=2, cutout=4,
                   ema=0.9, tta="flip_translate", schedule="onecycle", model="fast",
                   optimizer="muon", lr=0.24, label_smoothing=0.1, batch_size=32, epochs=4,
                   # narrow: bf16 is emulated on CPUs without it (165 s at full width on a Zen 3)
                   model_args={"widths": [16, 16, 32]}),
              progress=False, log=lambda *a: None)
    # 1.0 when it learns; with lr 1e-9 (learning nothing beyond its data-set whitening) 0.54
    assert s["best_val_acc"] >= 0.9 and s["precision"] == "bf16"
    ck = load_checkpoint(tmp_path / "r" / "last.ckpt")
    assert ck.extra["model_raw"] is not None   # EMA run keeps the raw weights for resuming


@pytest.mark.parametrize("fast_bf16", [False, True])
def test_auto_precision_follows_the_cpu_and_says_why_fp32(tiny_folder, tmp_path, monkeypatch, fast_bf16):
    import cifarkit.device
    monkeypatch.setattr(cifarkit.device, "cpu_has_fast_bf16", lambda: fast_bf16)
    logs = []
    s = train(_cfg(tiny_folder, tmp_path / "r", precision="auto", epochs=1), progress=False, log=logs.append)
    assert s["precision"] == ("bf16" if fast_bf16 else "fp32")
    said = [line for line in logs if "| precision " in line]
    assert said and ("no native bf16" in said[0]) != fast_bf16, said


@pytest.mark.parametrize("extra", [
    {},
    # the fast recipe's extras: stopped in the 24 px epoch, resumed at that size, then 32 px
    {"model": "fast", "model_args": {"widths": [8, 16, 16]}, "alt_flip": True, "progressive": [16, 24]},
    # Muon with the whitening bias frozen after epoch 1: the resumed run must freeze it too
    {"model": "fast", "model_args": {"widths": [8, 16, 16]}, "optimizer": "muon", "lr": 0.24,
     "optimizer_args": {"whiten_bias_epochs": 1}},
    # selective backprop from epoch 1: the selection depends only on the weights, so it resumes too
    {"hard_fraction": 0.5, "hard_start": 1},
    # an averaged model (EMA): the raw weights and the average both resume
    {"ema": 0.9},
    # a proxy network picks the images: its weights and optimiser resume too
    {"model": "fast", "model_args": {"widths": [8, 16, 16]}, "optimizer": "muon", "lr": 0.24,
     "optimizer_args": {"whiten_bias_epochs": 1}, "hard_fraction": 0.5, "hard_proxy": [4, 8, 8]},
    # MixUp/CutMix draw from the global RNG, which the checkpoint carries
    {"mixup": 0.4, "cutmix": 1.0},
    # ranked by the stale loss table, which the checkpoint carries (with a fresh table: other images)
    {"hard_fraction": 0.5, "hard_stale": True},
    # the network's first conv group frozen after epoch 1 (the proxy's trains on)
    {"model": "fast", "model_args": {"widths": [8, 16, 16]}, "optimizer": "muon", "lr": 0.24,
     "optimizer_args": {"whiten_bias_epochs": 1, "first_group_epochs": 1}, "hard_fraction": 0.5,
     "hard_proxy": [4, 8, 8]},
], ids=["tudui_relu", "fast-progressive-altflip", "fast-muon-frozen-whiten-bias", "hard-fraction",
        "ema", "hard-proxy", "mixup-cutmix", "hard-stale", "fast-muon-frozen-first-group"])
def test_interrupt_then_resume_is_bit_exact(tiny_folder, tmp_path, extra, optimizer_steps):
    kw = dict(epochs=3, deterministic=True, flip=True, crop_pad=2, **extra)
    full = train(_cfg(tiny_folder, tmp_path / "full", **kw), progress=False, log=lambda *a: None)
    per_step = len(optimizer_steps) // 18          # 3 epochs x 6 steps; 2 optimisers with a proxy
    optimizer_steps.clear()
    # Ctrl-C in the middle of step 9 (mid-epoch 2, 6 steps per epoch): honoured after that step
    pressed = ctrl_c_after(optimizer_steps, 9 * per_step)
    with pytest.raises(TrainingInterrupted) as e:
        train(_cfg(tiny_folder, tmp_path / "cut", **kw), progress=False, log=lambda *a: None)
    pressed.remove()
    assert "interrupted at epoch 2, step 3" in str(e.value) and "--resume" in str(e.value)
    assert len(optimizer_steps) == 9 * per_step
    optimizer_steps.clear()
    logs = []
    resumed = train(None, resume=str(tmp_path / "cut"), progress=False, log=logs.append)
    # only the remaining steps are done (a resume that started again would also end bit-exact)
    assert len(optimizer_steps) == (18 - 9) * per_step
    assert logs[0] == f"resuming {tmp_path / 'cut'} at epoch 2, step 3"
    a = load_checkpoint(tmp_path / "full" / "last.ckpt").state_dict
    b = load_checkpoint(tmp_path / "cut" / "last.ckpt").state_dict
    assert all(torch.equal(a[k], b[k]) for k in a)
    fm = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    cm = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    strip = lambda l: {k: v for k, v in json.loads(l).items() if k not in ("seconds", "images_per_s", "val_seconds")}
    assert [strip(l) for l in fm] == [strip(l) for l in cm]
    assert full["best_val_acc"] == resumed["best_val_acc"]


def test_resume_can_extend_epochs(tiny_folder, tmp_path, optimizer_steps):
    train(_cfg(tiny_folder, tmp_path / "r", epochs=1), progress=False, log=lambda *a: None)
    optimizer_steps.clear()
    s = train(None, resume=str(tmp_path / "r"), epochs=2, progress=False, log=lambda *a: None)
    assert s["epochs"] == 2 and len(optimizer_steps) == 6          # one more epoch of 6 steps
    lines = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [1, 2]


def test_resume_refuses_fewer_epochs_than_done(tiny_folder, tmp_path):
    train(_cfg(tiny_folder, tmp_path / "r", epochs=2), progress=False, log=lambda *a: None)
    with pytest.raises(CifarkitError, match="fewer than the run has already trained"):
        train(None, resume=str(tmp_path / "r"), epochs=1, progress=False, log=lambda *a: None)


def test_nan_loss_stops_with_step_and_keeps_checkpoint(tiny_folder, tmp_path):
    out = tmp_path / "r"
    train(_cfg(tiny_folder, out, epochs=1), progress=False, log=lambda *a: None)
    before = (out / "last.ckpt").read_bytes()
    with pytest.raises(CifarkitError) as e:
        train(_cfg(tiny_folder, out, epochs=2, lr=1e6, optimizer="sgd", model="tudui"),
              progress=False, log=lambda *a: None)
    assert "step" in str(e.value) and "learning rate" in str(e.value)
    assert (out / "last.ckpt").read_bytes() == before


def test_batch_larger_than_data_is_clear(tiny_folder, tmp_path):
    with pytest.raises(CifarkitError, match="batch-size"):
        train(_cfg(tiny_folder, tmp_path / "r", batch_size=10_000), progress=False, log=lambda *a: None)


def test_single_class_is_clear(tmp_path):
    from helpers import make_folder
    root = make_folder(tmp_path / "one", classes=("only",), n_per_class=10)
    with pytest.raises(CifarkitError, match="one class"):
        train(_cfg(root, tmp_path / "r", val_size=2), progress=False, log=lambda *a: None)


def test_running_totals_keep_no_graph():
    """The notes' `running_loss += loss` keeps every step's autograd graph alive; ours must not."""
    from cifarkit.training.state import EpochSums
    w = torch.ones(3, requires_grad=True)
    out = torch.stack([w * 2, w * 3])
    loss = out.sum()
    sums = EpochSums("cpu")
    sums.add(loss, out, torch.tensor([2, 0]))
    assert sums.loss.grad_fn is None and not sums.loss.requires_grad
    assert sums.loss.item() == pytest.approx(2 * 15.0) and sums.correct.item() == 1 and sums.seen == 2


def test_compile_failure_falls_back_with_one_warning(tiny_folder, tmp_path, monkeypatch):
    def broken_compile(model, *a, **k):
        def run(*args, **kw):
            raise RuntimeError("no C++ compiler here")
        return run
    monkeypatch.setattr(torch, "compile", broken_compile)
    with pytest.warns(UserWarning, match="torch.compile failed"):
        s = train(_cfg(tiny_folder, tmp_path / "r", epochs=2, compile=True), progress=False,
                  log=lambda *a: None)
    assert s["best_val_acc"] >= 0.9


# ----------------------------------------------------------------------------- progressive resizing

_SIDES: list = []


def _size_probe(num_classes=10):
    """A tiny size-agnostic network that records the side of every training batch it sees."""
    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.head = torch.nn.Linear(8, num_classes)

        def forward(self, x):
            if self.training:
                _SIDES.append(x.shape[-1])
            return self.head(torch.relu(self.conv(x)).amax((2, 3)))
    return Probe()


def test_progressive_resizing_trains_early_epochs_small(tiny_folder, tmp_path):
    from cifarkit.models import _REGISTRY, register_model
    _size_probe.__name__ = "size_probe_for_tests"
    if _size_probe.__name__ not in _REGISTRY:
        register_model(_size_probe)
    _SIDES.clear()
    cfg = _cfg(tiny_folder, tmp_path / "r", model="size_probe_for_tests", epochs=4, batch_size=24,
               progressive=[16, 24])
    s = train(cfg, progress=False, log=lambda *a: None)
    steps = len(_SIDES) // 4
    assert _SIDES == [16] * steps + [24] * steps + [32] * (2 * steps)
    assert s["best_val_acc"] > 0.5          # it learned (3 classes)
    ck = load_checkpoint(tmp_path / "r" / "last.ckpt")
    assert ck.config["progressive"] == [16, 24]


def test_progressive_config_is_checked_and_scaled_with_epochs():
    with pytest.raises(CifarkitError, match="progressive"):
        resolve_config("tutorial", overrides={"progressive": [40]})          # larger than 32 px
    with pytest.raises(CifarkitError, match="progressive"):
        resolve_config("tutorial", overrides={"epochs": 2, "progressive": [16, 16, 16]})
    fast = resolve_config("fast")
    assert len(fast.progressive) < fast.epochs and fast.progressive == sorted(fast.progressive)
    short = resolve_config("fast", overrides={"epochs": 4})
    assert 0 < len(short.progressive) < 4 and short.progressive == sorted(short.progressive)
    assert set(short.progressive) <= set(fast.progressive)
    assert resolve_config("fast", overrides={"epochs": 1}).progressive == []
    # an explicit schedule is kept as given
    assert resolve_config("fast", overrides={"epochs": 4, "progressive": [20]}).progressive == [20]
    # ... even when it equals the recipe's own list
    same = resolve_config("fast", overrides={"epochs": fast.epochs + 1, "progressive": fast.progressive})
    assert same.progressive == fast.progressive
    from cifarkit.config import RECIPES
    assert RECIPES["fast"]["progressive"] == fast.progressive    # the recipe itself is not changed


def test_sprint_is_the_measured_fast_variant():
    """docs/benchmarks.md publishes `--recipe fast --epochs 14 --hard-proxy= --hard-stale
    --hard-fraction-small 0.33` against airbench94; `--recipe sprint` must be exactly that run."""
    measured = resolve_config("fast", overrides={"epochs": 14, "hard_proxy": [], "hard_stale": True,
                                                 "hard_fraction_small": 0.33}).to_dict()
    sprint = resolve_config("sprint").to_dict()
    differ = {k for k in measured if measured[k] != sprint[k]}
    assert differ == {"recipe", "hard_proxy_args"}           # the latter unused without a proxy
    assert sprint["hard_proxy_args"] == {} and not sprint["hard_proxy"] and sprint["hard_fraction"] == 0.5


def test_stopped_whitening_bias_is_frozen_without_changing_the_result(tiny_folder, tmp_path, monkeypatch):
    import cifarkit.training.loop as train_mod
    kw = dict(model="fast", model_args={"widths": [8, 16, 16]}, optimizer="muon", lr=0.24,
              optimizer_args={"whiten_bias_epochs": 1}, epochs=3, deterministic=True, flip=True)
    frozen_at = []
    real = train_mod.freeze_stopped

    def spy(opt, global_step):
        real(opt, global_step)
        bias = [p for g in opt.param_groups if g.get("tag") == "whiten_bias" for p in g["params"]]
        frozen_at.append(not bias[0].requires_grad)
    monkeypatch.setattr(train_mod, "freeze_stopped", spy)
    train(_cfg(tiny_folder, tmp_path / "a", **kw), progress=False, log=lambda *a: None)
    assert frozen_at == [False, True, True]          # trains in epoch 1 only, then no gradient
    monkeypatch.setattr(train_mod, "freeze_stopped", lambda opt, step: None)
    train(_cfg(tiny_folder, tmp_path / "b", **kw), progress=False, log=lambda *a: None)
    a = load_checkpoint(tmp_path / "a" / "last.ckpt").state_dict
    b = load_checkpoint(tmp_path / "b" / "last.ckpt").state_dict
    assert all(torch.equal(a[k], b[k]) for k in a)   # skipping the gradient changes no weight
    assert not torch.equal(a["whiten.bias"], torch.zeros_like(a["whiten.bias"]))  # it did train


def test_first_group_follows_the_schedule_then_freezes(tiny_folder, tmp_path, monkeypatch):
    import cifarkit.training.loop as train_mod
    kw = dict(model="fast", model_args={"widths": [8, 16, 16]}, optimizer="muon", lr=0.24, epochs=4, schedule="linear",
              optimizer_args={"whiten_bias_epochs": 1, "first_group_epochs": 2}, hard_fraction=0.5,
              hard_proxy=[4, 8, 8])
    seen, real = [], train_mod.train_one_epoch

    def spy(run, epoch):
        before = {k: v.clone() for k, v in run.state.model.state_dict().items()}
        out = real(run, epoch)
        after = run.state.model.state_dict()
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        first = [g for g in run.state.opt.param_groups if g.get("tag") == "first_group"]
        seen.append((changed, [g["lr"] for g in first], run.state.model.layers[1][2].training))
        return out
    monkeypatch.setattr(train_mod, "train_one_epoch", spy)
    s = train(_cfg(tiny_folder, tmp_path / "r", **kw), progress=False, log=lambda *a: None)
    # 6 steps per epoch: the group follows the run's linear decay (to 0 at step 24) up to step 12,
    # then its rate is 0
    (c0, lr0, _), (c1, lr1, _), (c2, lr2, bn2), (c3, lr3, bn3) = seen
    assert lr0[0] == pytest.approx(0.24 * (1 - 6 / 24)) and lr1 == [0.0, 0.0] and lr3 == [0.0, 0.0]
    assert len(lr0) == 2                                   # its filters (Muon) and its BN shifts (SGD)
    assert any(k.startswith("layers.1.") for k in c1)      # it trains until its stop
    assert not any(k.startswith("layers.1.") for k in c2 | c3)   # then not at all, running stats included
    assert not bn2 and not bn3                             # its batch norms use their running statistics
    assert any(k.startswith("layers.2.") for k in c3) and "head.weight" in c3   # the rest trains on
    ck = load_checkpoint(tmp_path / "r" / "last.ckpt")
    proxy_groups = ck.extra["proxy"]["optimizer"]["param_groups"]
    assert "first_group" not in [g.get("tag") for g in proxy_groups]   # the proxy's trains to the end
    assert s["best_val_acc"] >= 0.9
    # unset, the group is trained like the rest: no group of its own
    cfg = _cfg(tiny_folder, tmp_path / "x", **{**kw, "optimizer_args": {}})
    from cifarkit.models import create_model
    from cifarkit.optim import make_optimizer
    opt = make_optimizer(cfg, create_model("fast", 3, widths=[8, 16, 16]))
    assert "first_group" not in [g.get("tag") for g in opt.param_groups]
    assert sum(len(g["params"]) for g in opt.param_groups) == 14   # every trainable parameter, once


def test_hardest_keeps_the_highest_loss_images_in_order():
    from cifarkit.training.selective import hardest as _hardest
    logits = torch.tensor([[5.0, 0.0], [0.0, 5.0], [1.0, 0.0], [0.0, 0.2], [3.0, 0.0]])
    y = torch.tensor([0, 0, 1, 1, 0])            # losses: low, high, mid-high, mid-low, low
    x = torch.arange(5.0).view(5, 1, 1, 1).expand(5, 3, 2, 2).contiguous(memory_format=torch.channels_last)
    xs, ys = _hardest(x, y, logits, 0.4)
    assert xs[:, 0, 0, 0].tolist() == [1.0, 2.0] and ys.tolist() == [0, 1]
    assert xs.is_contiguous(memory_format=torch.channels_last)
    assert len(_hardest(x, y, logits, 0.01)[1]) == 1              # never an empty batch


def test_hardest_per_class_keeps_the_class_mix_against_a_biased_scorer():
    from cifarkit.training.selective import hardest as _hardest
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (400,), generator=g)
    logits = torch.randn(400, 4, generator=g)
    logits[:, 3] -= 6.0                  # a scorer that under-rates class 3: every image of it "hard"
    x = torch.arange(400.0).view(400, 1, 1, 1)
    _, whole = _hardest(x, y, logits, 0.25)
    assert (whole == 3).float().mean() > 0.9                     # ranking the batch: nearly all class 3
    xs, ys = _hardest(x, y, logits, 0.25, per_class=True)
    assert len(ys) == 100
    loss = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    picked = xs.view(-1).long()
    for c in range(4):
        n_c = int((y == c).sum())
        mine = picked[ys == c]
        assert abs(len(mine) - 0.25 * n_c) <= 1                  # a quarter of every class
        others = loss[(y == c) & ~torch.isin(torch.arange(400), mine)]
        assert loss[mine].min() >= others.max()                  # and the hardest of that class
    assert torch.equal(picked, picked.sort().values)             # batch order kept


def _network_passes(monkeypatch) -> list:
    """(graph recorded?, batch size) of every training-mode forward pass of the network a run builds."""
    import cifarkit.models
    import cifarkit.training.prep
    sizes = []
    real_create = cifarkit.models.create_model

    def spying_create(*a, **k):
        m = real_create(*a, **k)
        m.register_forward_hook(lambda mod, i, o: sizes.append((torch.is_grad_enabled(), len(i[0])))
                                if mod.training else None)
        return m
    monkeypatch.setattr(cifarkit.training.prep, "create_model", spying_create)
    return sizes


@pytest.mark.parametrize("per_class", [False, True])
def test_hard_fraction_trains_on_the_selected_share_and_still_learns(tiny_folder, tmp_path, monkeypatch,
                                                                     per_class):
    import cifarkit.training.selective as selective
    real_hardest, modes = selective.hardest, set()

    def spying_hardest(*a):
        modes.add(a[4])
        return real_hardest(*a)
    monkeypatch.setattr(selective, "hardest", spying_hardest)
    sizes = _network_passes(monkeypatch)
    s = train(_cfg(tiny_folder, tmp_path / "r", epochs=6, hard_fraction=0.5, hard_start=1,
                   hard_per_class=per_class), progress=False, log=lambda *a: None)
    assert modes == {per_class}                   # --hard-per-class reaches the selection
    assert sizes[:6] == [(True, 16)] * 6          # epoch 0 (before hard_start): every image trains
    later = sizes[6:]
    assert [g for g, _ in later[:4]] == [False, True, False, True]   # score all, then train on half
    assert all(n == 16 for g, n in later if not g) and all(n == 8 for g, n in later if g)
    assert s["best_val_acc"] >= 0.9                                  # it learns (3 easy classes)
    m = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert m[-1]["train_acc"] > 0.6                                  # metrics over every image seen


def test_stale_ranking_trains_untrained_images_first_then_the_highest_last_loss():
    from types import SimpleNamespace

    from cifarkit.training.selective import Selector
    cfg = TrainConfig(model="fast", hard_fraction=0.5, hard_stale=True, hard_start=1).validate()
    p = SimpleNamespace(device=torch.device("cpu"), precision="fp32", train=range(8))
    sel = Selector(cfg, None, None, p, 10, 1)
    x = torch.arange(8.0)[:, None, None, None].expand(8, 3, 2, 2).contiguous()
    y = torch.zeros(8, dtype=torch.long)

    def step(index, epoch=1, logit=None):
        choose = sel.chooser(epoch)   # what the loader calls before it reads the images
        index = choose(index) if choose is not None else index
        xb, yb, whole = sel.pick(x[index], y[index], epoch, index)
        out = torch.zeros(len(yb), 2)
        out[:, 1] = logit(xb[:, 0, 0, 0].long()) if logit else 0.0   # class 0's loss grows with out[:, 1]
        sel.record(out, yb)
        return xb[:, 0, 0, 0].long().tolist(), whole

    # before --hard-start every image trains, and every one gets its loss
    assert step(torch.tensor([0, 1, 2, 3]), epoch=0, logit=lambda i: i.float()) == ([0, 1, 2, 3], None)
    want = F.cross_entropy(torch.stack([torch.zeros(4), torch.arange(4.0)], 1), torch.zeros(4, dtype=torch.long),
                           reduction="none")
    assert torch.allclose(sel.memory[:4], want) and torch.isinf(sel.memory[4:]).all()
    # never-trained images (4, 6) outrank any loss; then the highest last losses (3 over 1)
    assert step(torch.tensor([1, 4, 6, 3]), logit=lambda i: -10.0 * i.float())[0] == [4, 6]
    assert step(torch.tensor([1, 4, 6, 3]), logit=lambda i: -i.float())[0] == [1, 3]
    # now 4 and 6 hold tiny losses, 1 and 3 small fresh ones (1's above 3's); 2, left out since
    # epoch 0, keeps its old high loss and ranks first
    assert step(torch.tensor([3, 1, 4, 2]))[0] == [1, 2]
    assert sel.memory_state().shape == (8,)
    fresh = Selector(cfg, None, None, p, 10, 1)
    fresh.load_memory(sel.memory_state())
    assert torch.equal(fresh.memory, sel.memory)


def test_a_smaller_share_trains_in_the_small_image_epochs_only():
    from types import SimpleNamespace

    from cifarkit.training.selective import Selector
    cfg = TrainConfig(model="fast", hard_fraction=0.5, hard_fraction_small=0.25, hard_stale=True,
                      epochs=4, progressive=[16, 24]).validate()
    p = SimpleNamespace(device=torch.device("cpu"), precision="fp32", train=range(8))
    sel = Selector(cfg, None, None, p, 10, 1)
    assert [sel.fraction(e) for e in range(4)] == [0.25, 0.25, 0.5, 0.5]
    index = torch.arange(8)
    assert [len(sel.chooser(e)(index)) for e in range(4)] == [2, 2, 4, 4]   # 16 and 24 px, then 32
    plain = Selector(TrainConfig(model="fast", hard_fraction=0.5, hard_stale=True, epochs=4,
                                 progressive=[16, 24]).validate(), None, None, p, 10, 1)
    assert [len(plain.chooser(e)(index)) for e in range(4)] == [4, 4, 4, 4]   # 0: --hard-fraction throughout


def test_hard_stale_with_a_smaller_share_while_images_are_small_learns(tiny_folder, tmp_path, monkeypatch):
    sizes = _network_passes(monkeypatch)
    s = train(_cfg(tiny_folder, tmp_path / "r", model="fast", epochs=6, lr=0.01, hard_fraction=0.5,
                   hard_fraction_small=0.25, hard_start=1, hard_stale=True, progressive=[16, 16, 24],
                   model_args={"widths": [8, 16, 16]}),
              progress=False, log=lambda *a: None)
    # epoch 0 trains all (--hard-start 1), epochs 1-2 (16 and 24 px) a quarter, 3-5 (32 px) a half
    assert [n for _, n in sizes] == [16] * 6 + [4] * 12 + [8] * 18
    assert s["best_val_acc"] >= 0.9


def test_hard_stale_trains_only_the_picked_share_and_learns(tiny_folder, tmp_path, monkeypatch):
    import cifarkit.training.loader as loader_mod
    sizes = _network_passes(monkeypatch)
    augmented = []
    real_augment = loader_mod.augment
    monkeypatch.setattr(loader_mod, "augment", lambda x, *a, **k: augmented.append(len(x)) or real_augment(x, *a, **k))
    s = train(_cfg(tiny_folder, tmp_path / "r", epochs=6, hard_fraction=0.5, hard_start=1, hard_stale=True),
              progress=False, log=lambda *a: None)
    assert sizes == [(True, 16)] * 6 + [(True, 8)] * 30   # no scoring pass: only the trained half
    assert augmented == [16] * 6 + [8] * 30               # ... and the loader read only that half
    assert s["best_val_acc"] >= 0.9                          # it learns (3 easy classes)
    table = load_checkpoint(tmp_path / "r" / "last.ckpt").extra["hard_memory"]
    assert table.shape == (96,) and torch.isfinite(table).all() and (table >= 0).all()   # every image trained


@pytest.mark.parametrize("bad", [{"hard_fraction": 0.0}, {"hard_fraction": 1.5}, {"hard_start": -1},
                                 {"hard_stale": True},                                    # fraction 1
                                 {"model": "fast", "hard_stale": True, "hard_fraction": 0.5,
                                  "hard_proxy": [8, 8, 8]},                               # two rankers
                                 {"hard_proxy": [8, 8, 8]},                               # fraction 1
                                 {"hard_proxy": [8, 8, 8], "hard_fraction": 0.5},         # tudui: no widths
                                 {"hard_fraction_small": 1.5}, {"hard_fraction_small": -0.1},
                                 {"hard_fraction_small": 0.25},                        # no selection to shrink
                                 {"model": "fast", "hard_proxy": [8, 8], "hard_fraction": 0.5}])  # 2 widths
def test_bad_hard_fraction_settings_are_refused(bad):
    with pytest.raises(CifarkitError, match="--hard-"):
        TrainConfig(**bad).validate()
    assert TrainConfig(model="fast", hard_fraction=0.5, hard_proxy=[8, 8, 8]).validate()


def test_hard_proxy_args_set_the_proxy_apart_from_the_network():
    cfg = TrainConfig(model="fast", model_args={"widths": [8, 16, 16], "depths": [2, 3, 3], "residual": True},
                      hard_fraction=0.5, hard_proxy=[4, 8, 8], hard_proxy_args={"depths": [2, 2, 2]}).validate()
    assert cfg.proxy_model_args() == {"widths": [4, 8, 8], "depths": [2, 2, 2], "residual": True}
    cfg.hard_proxy_args = {"depths": [2, 2, 2], "widths": [99, 99, 99]}   # --hard-proxy's widths win
    assert cfg.proxy_model_args()["widths"] == [4, 8, 8]
    # without a proxy they are unused, so `--hard-proxy=` still turns the fast recipe's proxy off
    assert TrainConfig(model="fast", hard_proxy_args={"depths": [2, 2, 2]}).validate()
    for bad, needle in (({"hard_proxy_args": [2, 2, 2], "hard_fraction": 0.5, "hard_proxy": [4, 8, 8]}, "mapping"),
                        ({"hard_proxy_args": {"depths": [0, 2, 2]}, "hard_fraction": 0.5, "hard_proxy": [4, 8, 8]},
                         "--hard-proxy .*depths")):
        with pytest.raises(CifarkitError, match=needle):
            TrainConfig(model="fast", **bad).validate()


def _spy_on_training_passes(monkeypatch, record):
    """Call ``record(first width, input)`` for every training-mode forward pass of the networks
    a run builds: the network (prep) and its proxy (selective), told apart by their widths."""
    import cifarkit.models
    import cifarkit.training.prep
    import cifarkit.training.selective
    real_create = cifarkit.models.create_model

    def spying_create(*a, **k):
        m = real_create(*a, **k)
        w = k["widths"][0]
        m.register_forward_hook(lambda mod, i, o: record(w, i[0]) if mod.training else None)
        return m
    monkeypatch.setattr(cifarkit.training.prep, "create_model", spying_create)    # the network
    monkeypatch.setattr(cifarkit.training.selective, "create_model", spying_create)  # the proxy


def test_hard_proxy_picks_the_images_and_the_network_never_scores(tiny_folder, tmp_path, monkeypatch):
    seen = {}   # network width -> [(graph recorded?, batch size)] of its training-mode passes
    _spy_on_training_passes(monkeypatch, lambda w, x: seen.setdefault(w, []).append((torch.is_grad_enabled(), len(x))))
    s = train(_cfg(tiny_folder, tmp_path / "r", model="fast", model_args={"widths": [8, 16, 16]},
                   epochs=6, hard_fraction=0.5, hard_proxy=[4, 8, 8], hard_start=1, lr=0.01),
              progress=False, log=lambda *a: None)
    assert seen[4] == [(True, 16)] * 36              # the proxy trains on every whole batch
    assert seen[8][:6] == [(True, 16)] * 6           # epoch 0: the network trains on all
    assert seen[8][6:] == [(True, 8)] * 30           # then on the picked half, never scoring itself
    assert s["best_val_acc"] >= 0.9                  # with its convolutions frozen: 0.25
    ck = load_checkpoint(tmp_path / "r" / "last.ckpt")
    assert ck.extra["proxy"]["model"]["head.weight"].shape == (3, 8)
    m = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[-1])
    assert round(m["images_per_s"] * m["seconds"]) == 96   # throughput counts every image of the epoch


def test_hard_proxy_size_shows_the_proxy_smaller_images_and_the_network_full_ones(tiny_folder, tmp_path, monkeypatch):
    sides = {}   # network width -> image sides of its training-mode passes
    _spy_on_training_passes(monkeypatch, lambda w, x: sides.setdefault(w, set()).add(x.shape[-1]))
    s = train(_cfg(tiny_folder, tmp_path / "r", model="fast", model_args={"widths": [8, 16, 16]}, epochs=4,
                   hard_fraction=0.5, hard_proxy=[4, 8, 8], hard_proxy_size=16, progressive=[12], lr=0.01),
              progress=False, log=lambda *a: None)
    assert sides[8] == {12, 32}     # the network: its progressive sizes
    assert sides[4] == {12, 16}     # the proxy: at most 16 px, never enlarged
    assert s["best_val_acc"] >= 0.9
    for bad in (4, -1, 2.5):
        with pytest.raises(CifarkitError, match="--hard-proxy-size"):
            TrainConfig(model="fast", hard_fraction=0.5, hard_proxy=[4, 8, 8], hard_proxy_size=bad).validate()
    # without a proxy it is unused, so `--hard-proxy=` still turns a recipe's proxy off
    assert TrainConfig(model="fast", hard_proxy_size=16).validate()


def test_shrink_resizes_only_larger_batches():
    from cifarkit.training.selective import shrink
    i = torch.arange(32.0)
    x = (torch.sin(i / 5)[:, None] + torch.cos(i / 7)[None, :]).expand(2, 3, 32, 32)   # smooth images
    assert shrink(x, 0) is x and shrink(x, 32) is x and shrink(x, 40) is x
    small = shrink(x, 16)
    assert small.shape == (2, 3, 16, 16)
    # a 2x reduction of a smooth image is close to its 2x2 means
    assert torch.allclose(small, F.avg_pool2d(x, 2), atol=0.1)


def test_a_deeper_network_trains_with_a_shallower_proxy(tiny_folder, tmp_path):
    s = train(_cfg(tiny_folder, tmp_path / "r", model="fast", epochs=4, hard_fraction=0.5, lr=0.01,
                   model_args={"widths": [8, 16, 16], "depths": [2, 3, 3], "residual": True},
                   hard_proxy=[4, 8, 8], hard_proxy_args={"depths": [2, 2, 2], "residual": False}),
              progress=False, log=lambda *a: None)
    assert s["best_val_acc"] >= 0.9                  # with its convolutions frozen: 0.42
    ck = load_checkpoint(tmp_path / "r" / "last.ckpt")
    assert "layers.3.7.weight" in ck.state_dict                # the network's third conv of group 3
    assert "layers.3.7.weight" not in ck.extra["proxy"]["model"]  # the proxy has two per group
    assert ck.extra["proxy"]["model"]["layers.3.4.weight"].shape == (8, 8, 3, 3)


def test_without_a_val_split_training_ends_cleanly_and_says_which_checkpoint(tiny_folder, tmp_path, capsys):
    from cifarkit.cli import main
    out = tmp_path / "r"
    rc = main(["train", "--data", str(tiny_folder), "--out", str(out), "--val-size", "0", "--epochs", "2",
               "--batch-size", "16", "--model", "tudui_relu", "--optimizer", "adamw", "--lr", "0.003",
               "--no-tensorboard", "--quiet"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    last = captured.out.strip().splitlines()[-1]
    assert f"no validation split (--val-size 0): the final weights are {out / 'last.ckpt'}" in last
    assert (out / "last.ckpt").exists() and not (out / "best.ckpt").exists()
    s = json.loads((out / "summary.json").read_text())
    assert s["best_val_acc"] is None and s["n_val"] == 0 and s["n_train"] == 120 and s["eval_seconds"] == 0
    # evaluating it on its own (absent) val split is one clear line; on its training images it works
    rc = main(["eval", str(out / "last.ckpt")])
    err = capsys.readouterr().err
    assert rc == 1 and "--val-size 0" in err and err.count("\n") == 1
    rc = main(["eval", str(out / "last.ckpt"), "--split", "train", "--json"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["n"] == 120


def test_validation_is_cheap_during_training_and_full_at_the_end(tiny_folder, tmp_path):
    logs = []
    s = train(_cfg(tiny_folder, tmp_path / "r", epochs=3, tta="flip_translate"), progress=False, log=logs.append)
    lines = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [l["val_tta"] for l in lines] == ["none", "none", "flip_translate"]
    ck = load_checkpoint(tmp_path / "r" / "last.ckpt")
    from cifarkit import evaluate_checkpoint
    assert evaluate_checkpoint(ck, progress=False)[0].accuracy == lines[-1]["val_acc"]   # the recipe's TTA
    assert s["eval_seconds"] == pytest.approx(sum(l["val_seconds"] for l in lines))
    assert s["train_seconds"] + s["eval_seconds"] + s["other_seconds"] == pytest.approx(s["wall_seconds"])
    assert s["other_seconds"] > 0      # the data load at least
    assert "s training, " in logs[-1] and "s validation, " in logs[-1] and "s other" in logs[-1]


def test_val_checks_on_part_of_the_split_never_make_the_best_checkpoint(tiny_folder, tmp_path):
    logs = []
    # lr 1e-12: the weights never change, so only which passes may count decides best.ckpt
    s = train(_cfg(tiny_folder, tmp_path / "r", epochs=3, lr=1e-12, eval_subset=7), progress=False,
              log=logs.append)
    lines = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [l.get("val_check_images") for l in lines] == [7, 7, None]
    assert [l["val_acc"] is None for l in lines] == [True, True, False]
    assert all(0 <= l["val_check_acc"] <= 1 for l in lines[:2])
    assert s["best_val_acc"] == lines[-1]["val_acc"] and s["n_val"] > 7
    assert load_checkpoint(tmp_path / "r" / "best.ckpt").metrics["epoch"] == 3
    assert "val check acc" in logs[-4] and "(7 images)" in logs[-4]     # epoch 2's line
    assert s["eval_seconds"] == pytest.approx(sum(l["val_seconds"] for l in lines))
    assert (tmp_path / "r" / "curves.png").stat().st_size > 0


def test_patience_stops_when_val_accuracy_stops_improving(tiny_folder, tmp_path):
    logs = []
    s = train(_cfg(tiny_folder, tmp_path / "r", epochs=10, lr=1e-12, patience=2), progress=False, log=logs.append)
    # lr 1e-12: nothing changes, the first epoch stays the best; two epochs later the run ends
    assert s["epochs"] == 3 and len((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()) == 3
    assert any(l.startswith("early stop after epoch 3") and "at epoch 1" in l for l in logs)
    assert (tmp_path / "r" / "best.ckpt").exists() and (tmp_path / "r" / "summary.json").exists()
    s = train(_cfg(tiny_folder, tmp_path / "all", epochs=4, lr=1e-12), progress=False, log=lambda *a: None)
    assert s["epochs"] == 4                                    # patience 0: every epoch


def test_clip_grad_bounds_every_update(tiny_folder, tmp_path):
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
    before, moved = {}, []

    def pre(opt, args, kwargs):
        before.update({id(p): p.detach().clone() for g in opt.param_groups for p in g["params"]})

    def post(opt, args, kwargs):
        d = [(p.detach() - before[id(p)]).flatten() for g in opt.param_groups for p in g["params"]]
        moved.append(torch.cat(d).norm().item())
    handles = [register_optimizer_step_pre_hook(pre), register_optimizer_step_post_hook(post)]
    try:
        kw = dict(epochs=1, optimizer="sgd", lr=1.0, momentum=0.0)
        train(_cfg(tiny_folder, tmp_path / "c", clip_grad=1e-3, **kw), progress=False, log=lambda *a: None)
        clipped, moved[:] = list(moved), []
        train(_cfg(tiny_folder, tmp_path / "n", **kw), progress=False, log=lambda *a: None)
    finally:
        for h in handles:
            h.remove()
    assert len(clipped) == 6 and max(clipped) <= 1e-3 * (1 + 1e-4)    # SGD, lr 1: the update is the gradient
    assert min(moved) > 1e-2                                           # unclipped steps are far larger


@pytest.mark.parametrize("mix", [{"mixup": 0.4}, {"cutmix": 1.0}, {"mixup": 0.4, "cutmix": 1.0}])
def test_mixup_and_cutmix_train_on_soft_targets_and_still_learn(tiny_folder, tmp_path, monkeypatch, mix):
    targets = []
    real = torch.nn.CrossEntropyLoss.forward

    def spy(self, logits, target):
        if torch.is_grad_enabled():
            targets.append(target.detach().clone())
        return real(self, logits, target)
    monkeypatch.setattr(torch.nn.CrossEntropyLoss, "forward", spy)
    s = train(_cfg(tiny_folder, tmp_path / "r", epochs=8, **mix), progress=False, log=lambda *a: None)
    assert targets and all(t.ndim == 2 and t.shape[1] == 3 for t in targets)
    t = torch.cat(targets)
    assert torch.allclose(t.sum(1), torch.ones(len(t)))          # each row a distribution over classes
    assert ((t > 0) & (t < 1)).any()                            # and some rows really are mixed
    assert s["best_val_acc"] >= 0.9                             # it still learns the easy classes


@pytest.fixture
def unbalanced_folder(tmp_path):
    from helpers import make_folder
    root = make_folder(tmp_path / "unbalanced", classes=("a", "b", "c"), n_per_class=40)
    for f in sorted((root / "train" / "c").iterdir())[8:]:   # c keeps 8 of 40
        f.unlink()
    return root


def test_class_counts_are_printed_and_a_large_imbalance_warns(unbalanced_folder, tmp_path):
    logs = []
    with pytest.warns(UserWarning, match=r"unbalanced classes: [ab] has 3\d training images, c [5-8] .*--balance"):
        train(_cfg(unbalanced_folder, tmp_path / "r", epochs=1, val_size=12), progress=False, log=logs.append)
    line = next(l for l in logs if l.startswith("classes: "))
    counts = dict(part.rsplit(" ", 1) for part in line[len("classes: "):].split(", "))
    assert set(counts) == {"a", "b", "c"} and int(counts["c"]) <= 8
    assert sum(map(int, counts.values())) == 88 - 12            # the training images, after the val split


def test_balance_weights_and_sampler(unbalanced_folder, tmp_path, monkeypatch):
    seen = {"weight": [], "labels": []}
    real = torch.nn.CrossEntropyLoss.forward

    def spy(self, logits, target):
        if torch.is_grad_enabled():
            seen["weight"].append(self.weight)
            seen["labels"].append(target.detach().clone())
        return real(self, logits, target)
    monkeypatch.setattr(torch.nn.CrossEntropyLoss, "forward", spy)
    train(_cfg(unbalanced_folder, tmp_path / "w", epochs=1, val_size=12, balance="weights"),
          progress=False, log=lambda *a: None)
    w = seen["weight"][0]
    y = torch.cat(seen["labels"])
    n_c = torch.bincount(y, minlength=3).double()              # one epoch: every training image once
    assert torch.allclose(w.double(), len(y) / (3 * n_c), rtol=1e-6)
    assert w[2] > 3 * w[0]                                     # the small class weighs most
    seen["labels"].clear()
    train(_cfg(unbalanced_folder, tmp_path / "s", epochs=4, val_size=12, balance="sampler"),
          progress=False, log=lambda *a: None)
    y = torch.cat(seen["labels"])
    share = torch.bincount(y, minlength=3).double() / len(y)
    assert share[2] > 0.2                                      # c is ~0.08 of the images, ~1/3 of the draws
    assert (share - 1 / 3).abs().max() < 0.12
    with pytest.raises(CifarkitError, match="--balance weights"):
        TrainConfig(balance="weights", loss="mse").validate()


def test_sprint_recipe_trains_from_the_command_line_and_learns(tiny_folder, tmp_path, capsys):
    """`cifarkit train --recipe sprint`, narrowed by a YAML file to fit the tiny data: the stale
    table ranks (no proxy network in the checkpoint), and it learns."""
    from cifarkit.cli import main
    yaml = tmp_path / "small.yaml"
    yaml.write_text("model_args: {widths: [8, 16, 16], depths: [2, 3, 3], residual: true}\n"
                    "batch_size: 16\nval_size: 24\nprogressive: [16]\nprecision: fp32\n")
    out = tmp_path / "r"
    rc = main(["train", "--recipe", "sprint", "--config", str(yaml), "--data", str(tiny_folder),
               "--epochs", "6", "--out", str(out), "--no-tensorboard", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    s = json.loads((out / "summary.json").read_text())
    assert s["best_val_acc"] >= 0.9
    ck = load_checkpoint(out / "last.ckpt")
    assert ck.extra["proxy"] is None and torch.isfinite(ck.extra["hard_memory"]).all()
    assert "hard_stale: true" in (out / "config.yaml").read_text()

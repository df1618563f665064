"""What a resume depends on, piece by piece and fast: the Loader's data order and augmentation
state, the running sums of a partial epoch, and TrainState's round trip through a checkpoint
(optimiser, schedule, EMA, generators, global RNG, position, history). The end-to-end resume
tests (tests/test_train.py) show the whole works; these say which piece broke."""
import pytest
import torch

from cifarkit import TrainConfig, create_model
from cifarkit.data.tensors import TensorSplit
from cifarkit.distributed import Dist
from cifarkit.optim import make_optimizer, make_scheduler
from cifarkit.training.loader import Loader, epoch_size
from cifarkit.training.state import EpochSums, TrainState

CPU = torch.device("cpu")


def _split(n=40, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorSplit(torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8),
                       torch.arange(n) % 3)


def _cfg(**kw):
    base = dict(batch_size=8, seed=3, flip=True, crop_pad=1, cutout=2, image_size=8, epochs=4,
                channels_last=False)
    base.update(kw)
    return TrainConfig(**base)


def _loader(cfg, split=None, dist=None):
    return Loader(split or _split(), cfg, [0.5] * 3, [0.25] * 3, CPU, dist or Dist())


def test_epoch_size_follows_progressive_then_image_size():
    cfg = _cfg(progressive=[4, 6], image_size=8)
    assert [epoch_size(cfg, e) for e in range(4)] == [4, 6, 8, 8]


def test_loader_batches_cover_the_epoch_once_and_are_normalised():
    cfg = _cfg(flip=False, crop_pad=0, cutout=0)
    split = _split(20)
    ld = _loader(cfg, split)
    assert ld.steps_per_epoch == 3                       # 20 images in batches of 8: 8, 8, 4
    ld.start_epoch(0)
    xs, ys = zip(*[ld.batch(s)[:2] for s in range(3)])
    assert [len(y) for y in ys] == [8, 8, 4]
    x = torch.cat(xs)
    # every image once: undo the normalisation and match the raw pixels as a multiset
    raw = (x * 0.25 + 0.5) * 255
    assert torch.allclose(raw.round().sum((1, 2, 3)).sort().values,
                          split.x.float().sum((1, 2, 3)).sort().values)
    assert sorted(torch.cat(ys).tolist()) == sorted(split.y.tolist())
    assert ld.batch(0)[2] == 8                            # the global batch size


def test_loader_draws_a_new_order_each_epoch_fixed_by_the_seed():
    a, b = _loader(_cfg()), _loader(_cfg())
    a.start_epoch(0)
    first = a.perm.clone()
    a.start_epoch(1)
    assert not torch.equal(first, a.perm)
    b.start_epoch(0)
    assert torch.equal(first, b.perm)
    c = _loader(_cfg(seed=4))
    c.start_epoch(0)
    assert not torch.equal(first, c.perm)


@pytest.mark.parametrize("alt", [False, True])
def test_loader_state_mid_epoch_resumes_the_same_batches(alt):
    cfg = _cfg(alt_flip=alt)
    a = _loader(cfg)
    a.start_epoch(0)
    a.end_epoch()
    a.start_epoch(1)
    for s in range(2):
        a.batch(s)
    saved = a.state_dict()                                # mid-epoch 1, after 2 steps
    rest = [a.batch(s)[0] for s in range(2, a.steps_per_epoch)]
    a.end_epoch()
    a.start_epoch(2)
    nxt = a.batch(0)[0]

    b = _loader(cfg)
    b.load_state_dict(saved)
    b.start_epoch(1)                                      # the epoch's own permutation again
    assert all(torch.equal(r, b.batch(s)[0]) for s, r in zip(range(2, b.steps_per_epoch), rest))
    b.end_epoch()
    b.start_epoch(2)
    assert torch.equal(nxt, b.batch(0)[0])


def test_loader_state_at_an_epoch_end_starts_the_next_epoch():
    a = _loader(_cfg())
    a.start_epoch(0)
    a.batch(0)
    a.end_epoch()
    saved = a.state_dict()
    a.start_epoch(1)
    want = (a.perm.clone(), a.batch(0)[0])
    b = _loader(_cfg())
    b.load_state_dict(saved)
    b.start_epoch(1)
    assert torch.equal(want[0], b.perm) and torch.equal(want[1], b.batch(0)[0])


def test_loader_alternating_flip_mirrors_each_image_every_other_epoch():
    cfg = _cfg(alt_flip=True, crop_pad=0, cutout=0, batch_size=40)
    split = _split(40)
    ld = _loader(cfg, split)
    seen = []
    for epoch in range(2):
        ld.start_epoch(epoch)
        x, _, _, _ = ld.batch(0)
        order = ld.perm
        seen.append(x[order.argsort()])                    # back in the split's order
    assert torch.equal(seen[0], seen[1].flip(3))           # epoch 1 = epoch 0 mirrored, image by image
    assert ld.flip_bits is not None and 0 < int(ld.flip_bits.sum()) < 40


def test_loader_resizes_progressive_epochs_and_slices_for_ddp():
    cfg = _cfg(progressive=[4], batch_size=8, flip=False, crop_pad=0, cutout=0)
    ld = _loader(cfg)
    ld.start_epoch(0)
    assert ld.batch(0)[0].shape[-2:] == (4, 4)
    ld.start_epoch(1)
    assert ld.batch(0)[0].shape[-2:] == (8, 8)
    whole = _loader(cfg)
    whole.start_epoch(1)
    x_all, y_all, _, i_all = whole.batch(0)
    parts = []
    for rank in range(2):
        r = _loader(cfg, dist=Dist(rank=rank, world=2))
        r.start_epoch(1)
        x, y, n, index = r.batch(0)
        assert n == 8 and len(y) == 4
        assert torch.equal(index, i_all[rank::2])   # where its images are in the split (--hard-stale)
        parts.append((x, y))
    # interleaved shares of the same global batch: rank r holds images r, r + 2, ...
    assert torch.equal(parts[0][0], x_all[0::2]) and torch.equal(parts[1][0], x_all[1::2])
    assert torch.equal(parts[0][1], y_all[0::2]) and torch.equal(parts[1][1], y_all[1::2])


def test_loader_chooses_images_before_reading_them_and_ddp_slices_the_choice():
    cfg = _cfg(batch_size=8, flip=False, crop_pad=0, cutout=0)
    split = _split(16)
    ld = _loader(cfg, split)
    ld.start_epoch(0)
    asked = []
    x, y, n, index = ld.batch(0, choose=lambda i: asked.append(i.clone()) or i[[1, 4, 6]])
    assert torch.equal(asked[0], ld.perm[:8])             # the global batch's positions
    assert n == 8 and torch.equal(index, ld.perm[:8][[1, 4, 6]])
    assert torch.equal(y, split.y[index]) and len(x) == 3
    full = _loader(cfg, split)
    full.start_epoch(0)
    assert torch.equal(x, full.batch(0)[0][[1, 4, 6]])    # the same images as picking afterwards
    r1 = _loader(cfg, split, dist=Dist(rank=1, world=2))
    r1.start_epoch(0)
    x1, _, n1, index1 = r1.batch(0, choose=lambda i: i[[1, 4, 6]])
    assert n1 == 8 and torch.equal(index1, index[1::2]) and torch.equal(x1, x[1::2])


def test_loader_samples_do_not_touch_the_training_stream():
    a, b = _loader(_cfg()), _loader(_cfg())
    s1 = a.samples(4)
    assert torch.equal(s1, a.samples(4)) and s1.dtype == torch.uint8 and len(s1) == 4
    a.start_epoch(0)
    b.start_epoch(0)
    assert torch.equal(a.batch(0)[0], b.batch(0)[0])


# ----------------------------------------------------------------------------- sums

def test_epoch_sums_add_total_and_survive_a_checkpoint():
    s = EpochSums(CPU)
    out = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]], requires_grad=True)
    y = torch.tensor([0, 0, 0])
    s.add(torch.tensor(0.5), out, y)
    s.images += 5
    assert s.seen == 3 and s.correct.item() == 2 and s.loss.item() == pytest.approx(1.5)
    t = s.totals()
    assert t["loss"] == pytest.approx(1.5) and t["correct"] == 2 and t["seen"] == 3 and t["images"] == 5
    s.t0 -= 7.0                                             # as if the epoch had run for 7 s
    saved = s.state_dict()
    assert 7.0 <= saved["seconds"] < 8.0
    r = EpochSums(CPU, saved)
    assert r.loss.item() == pytest.approx(1.5) and r.correct.item() == 2 and r.seen == 3 and r.images == 5
    assert 7.0 <= r.seconds() < 8.0                        # time before the resume counts
    older = {k: v for k, v in saved.items() if k != "images"}   # written before "images" existed
    assert EpochSums(CPU, older).images == 3


# ----------------------------------------------------------------------------- the whole state

class _NoSelector:
    def __init__(self):
        self.loaded = None

    def state_dict(self):
        return {"proxy": torch.ones(2)} if self.loaded is None else self.loaded

    def load_state_dict(self, s):
        self.loaded = s

    def memory_state(self):
        return None

    def load_memory(self, table):
        pass


def _state(ema: bool, seed: int = 0):
    torch.manual_seed(seed)
    cfg = _cfg(optimizer="sgd", momentum=0.9, lr=0.1, schedule="linear", ema=0.5 if ema else 0.0,
               model="tudui_relu", image_size=32)
    model = create_model("tudui_relu", 3)
    opt = make_optimizer(cfg, model)
    sched = make_scheduler(cfg, opt, total_steps=20, steps_per_epoch=5)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    av = None
    if ema:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
        av = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.5), use_buffers=True)
    loader = _loader(cfg, _split(40, 32))
    return cfg, TrainState(model, opt, sched, scaler, av, _NoSelector(), loader)


def _steps(st, n):
    for i in range(n):
        x = torch.randn(4, 3, 32, 32)
        loss = torch.nn.functional.cross_entropy(st.model(x), torch.tensor([0, 1, 2, 0]))
        st.opt.zero_grad()
        loss.backward()
        st.opt.step()
        st.sched.step()
        if st.ema is not None:
            st.ema.update_parameters(st.model)


class _P:   # what TrainState.checkpoint reads from Prepared
    classes, mean, std = ["a", "b", "c"], [0.1, 0.2, 0.3], [1.0, 1.0, 1.0]


@pytest.mark.parametrize("ema", [False, True])
def test_train_state_round_trips_through_a_checkpoint(ema, tmp_path):
    from cifarkit import load_checkpoint, save_checkpoint
    cfg, a = _state(ema)
    a.loader.start_epoch(0)
    a.loader.end_epoch()
    a.loader.start_epoch(1)
    _steps(a, 3)
    a.loader.batch(0)
    a.epoch, a.step = 1, 3
    a.sums = EpochSums(CPU)
    a.sums.add(torch.tensor(2.0), torch.eye(3)[[0, 1, 1]], torch.tensor([0, 1, 2]))
    a.history = [{"epoch": 1, "val_acc": 0.5}]
    ck = a.checkpoint(cfg, _P, {"interrupted_at_step": 8}, mid_epoch=True)
    assert ck.epoch == 1 and ck.classes == ["a", "b", "c"] and ck.num_classes == 3
    assert ck.preprocess == {"mean": [0.1, 0.2, 0.3], "std": [1.0, 1.0, 1.0], "size": 32, "crop_mode": "center"}
    raw = {k: v.clone() for k, v in a.model.state_dict().items()}
    if ema:   # what is evaluated and shipped is the average; the raw weights travel for resume
        avg = a.ema.module.state_dict()
        assert all(torch.equal(ck.state_dict[k], avg[k]) for k in avg)
        assert all(torch.equal(ck.extra["model_raw"][k], raw[k]) for k in raw)
        assert not all(torch.equal(ck.state_dict[k], raw[k]) for k in raw)
    else:
        assert all(torch.equal(ck.state_dict[k], raw[k]) for k in raw) and "model_raw" not in ck.extra
    save_checkpoint(ck, tmp_path / "last.ckpt")

    _, b = _state(ema, seed=9)         # a different start in every piece
    torch.manual_seed(77)
    b.load_state_dict(load_checkpoint(tmp_path / "last.ckpt"))
    assert (b.epoch, b.step, b.history) == (1, 3, [{"epoch": 1, "val_acc": 0.5}])
    assert b.saved_sums["seen"] == 3 and b.saved_sums["correct"].item() == 2
    assert all(torch.equal(v, raw[k]) for k, v in b.model.state_dict().items())   # the raw weights
    if ema:
        assert all(torch.equal(v, a.ema.state_dict()[k]) for k, v in b.ema.state_dict().items())
    sa, sb = a.opt.state_dict(), b.opt.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert all(torch.equal(sa["state"][i]["momentum_buffer"], sb["state"][i]["momentum_buffer"]) for i in sa["state"])
    assert b.sched.state_dict()["last_epoch"] == 3 and b.opt.param_groups[0]["lr"] == a.opt.param_groups[0]["lr"]
    assert torch.equal(b.selector.loaded["proxy"], torch.ones(2))
    # the loader continues the interrupted epoch: the same permutation, and the augmentation
    # generator where it was (a's next batch is b's next batch)
    b.loader.start_epoch(1)
    a_perm = a.loader.perm.clone()
    assert torch.equal(b.loader.perm, a_perm)
    assert torch.equal(b.loader.batch(1)[0], a.loader.batch(1)[0])
    # an end-of-epoch state (the default) has no partial sums and starts at step 0
    a.epoch, a.step = 2, 5
    end = a.state_dict()["train_state"]
    assert end["step_in_epoch"] == 0 and end["sums"] == {} and end["epoch"] == 2
    assert a.checkpoint(cfg, _P, {}).extra["train_state"]["step_in_epoch"] == 0
    assert a.state_dict()["grad_scaler"] is None            # no fp16 loss scaling: nothing to keep


def test_train_state_restores_the_global_rng():
    cfg, a = _state(False)
    a.loader.start_epoch(0)
    a.sums = EpochSums(CPU)
    torch.manual_seed(42)
    extra = a.state_dict(mid_epoch=True)
    want = torch.rand(5)

    class _Ck:
        pass
    ck = _Ck()
    ck.extra, ck.state_dict = extra, a.model.state_dict()
    _, b = _state(False, seed=3)
    torch.manual_seed(0)
    b.load_state_dict(ck)
    assert torch.equal(torch.rand(5), want)


def test_loader_reports_the_state_it_was_put_in():
    a = _loader(_cfg())
    a.start_epoch(0)
    a.end_epoch()
    saved = a.state_dict()
    b = _loader(_cfg())
    b.load_state_dict(saved)
    again = b.state_dict()      # before its next epoch starts: the same state, not its own start
    assert torch.equal(again["data_gen_epoch_start"], saved["data_gen_epoch_start"])
    assert torch.equal(again["aug_gen"], saved["aug_gen"])


class _Ck:
    def __init__(self, extra, weights):
        self.extra, self.state_dict = extra, weights


def test_a_resume_checkpoint_that_does_not_fit_says_so():
    from cifarkit import CifarkitError
    cfg, a = _state(False)
    a.loader.start_epoch(0)
    a.sums = EpochSums(CPU)
    extra = a.state_dict(mid_epoch=True)
    wrong = {k: v for k, v in a.model.state_dict().items() if not k.endswith("bias")}
    _, b = _state(False)
    with pytest.raises(CifarkitError, match="resume checkpoint does not fit"):
        b.load_state_dict(_Ck(extra, wrong))


def test_older_or_partial_resume_states_load():
    """No history (an early format), EMA state but no EMA in this run, a grad scaler state while
    fp16 is off: each piece restores what is there and leaves the rest."""
    cfg, a = _state(True)
    a.loader.start_epoch(0)
    a.sums = EpochSums(CPU)
    extra = a.state_dict(mid_epoch=False)
    extra.pop("history")
    extra["grad_scaler"] = {"scale": 1024.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                            "growth_interval": 2000, "_growth_tracker": 0}
    _, b = _state(False)                       # no EMA here
    b.load_state_dict(_Ck(extra, extra["model_raw"]))
    assert b.history == [] and not b.scaler.is_enabled()


def test_an_fp16_loss_scale_resumes():
    cfg, a = _state(False)
    a.scaler = torch.amp.GradScaler("cpu", enabled=True, init_scale=256.0)
    a.loader.start_epoch(0)
    a.sums = EpochSums(CPU)
    extra = a.state_dict(mid_epoch=True)
    assert extra["grad_scaler"]["scale"] == 256.0
    _, b = _state(False)
    b.scaler = torch.amp.GradScaler("cpu", enabled=True, init_scale=65536.0)
    b.load_state_dict(_Ck(extra, a.model.state_dict()))
    assert b.scaler.get_scale() == 256.0


def test_epoch_sums_accumulate_over_batches_as_exact_counts():
    s = EpochSums(CPU)
    assert s.seconds() < 0.5 and s.correct.dtype == torch.int64 and s.loss.device.type == "cpu"
    s.add(torch.tensor(1.0), torch.eye(2)[[0, 1]], torch.tensor([0, 0]))      # 1 of 2 right
    s.add(torch.tensor(3.0), torch.eye(2)[[1, 1, 1]], torch.tensor([1, 1, 0]))  # 2 of 3 right
    assert s.seen == 5 and s.correct.item() == 3 and s.loss.item() == pytest.approx(1.0 * 2 + 3.0 * 3)


def test_loader_augments_as_configured():
    split = _split(8, 8)
    plain = _loader(_cfg(flip=False, crop_pad=0, cutout=0, batch_size=8), split)
    plain.start_epoch(0)
    base, _, _, _ = plain.batch(0)
    for kw in ({"crop_pad": 2}, {"cutout": 3}):
        ld = _loader(_cfg(flip=False, batch_size=8, **{"crop_pad": 0, "cutout": 0, **kw}), split)
        ld.start_epoch(0)
        assert not torch.equal(ld.batch(0)[0], base), kw       # the augmentation is applied
    cut = _loader(_cfg(flip=False, crop_pad=0, cutout=3, batch_size=8), split)
    cut.start_epoch(0)
    zero = (0 - 0.5) / 0.25                                     # a zeroed pixel, normalised
    assert ((cut.batch(0)[0] == zero).all(1).flatten(1).sum(1) >= 1).all()   # a hole in every image
    # random flips unless --alt-flip asks for alternating ones
    assert _loader(_cfg(flip=True, alt_flip=False)).flip_bits is None


def test_progressive_batches_are_antialiased_downscales_of_the_full_size_ones():
    import torch.nn.functional as F
    split = _split(8, 8)
    small = _loader(_cfg(flip=False, crop_pad=0, cutout=0, batch_size=8, progressive=[4]), split)
    full = _loader(_cfg(flip=False, crop_pad=0, cutout=0, batch_size=8), split)
    small.start_epoch(0)
    full.start_epoch(0)
    want = F.interpolate(full.batch(0)[0], size=(4, 4), mode="bilinear", antialias=True, align_corners=False)
    assert torch.allclose(small.batch(0)[0], want, atol=1e-6)


@pytest.mark.parametrize("cl", [True, False])
def test_loader_batches_follow_the_memory_layout_setting(cl):
    ld = _loader(_cfg(channels_last=cl, flip=False, crop_pad=0, cutout=0))
    ld.start_epoch(0)
    x = ld.batch(0)[0]
    assert x.is_contiguous(memory_format=torch.channels_last) == cl and x.is_contiguous() != cl


def test_a_new_loader_reports_its_seeded_start_state():
    ld = _loader(_cfg(seed=11))
    assert torch.equal(ld.state_dict()["data_gen_epoch_start"], torch.Generator().manual_seed(11).get_state())


def test_the_balanced_sampler_draws_each_class_about_equally():
    y = torch.tensor([0] * 60 + [1] * 15 + [2] * 5)
    split = TensorSplit(torch.zeros(80, 3, 8, 8, dtype=torch.uint8), y)
    ld = _loader(_cfg(balance="sampler"), split)
    drawn = []
    for epoch in range(5):
        ld.start_epoch(epoch)
        drawn.append(y[ld.perm])
    share = torch.bincount(torch.cat(drawn), minlength=3).double() / (5 * 80)
    assert (share - 1 / 3).abs().max() < 0.08 and len(drawn[0]) == 80     # an epoch is as long as before
    plain = _loader(_cfg(), split)
    plain.start_epoch(0)
    assert sorted(plain.perm.tolist()) == list(range(80))                 # without it: each image once
    again = _loader(_cfg(balance="sampler"), split)                       # fixed by the seed (resumable)
    torch.manual_seed(123)                                                # whatever the global RNG does
    again.start_epoch(0)
    first = _loader(_cfg(balance="sampler"), split)
    torch.manual_seed(7)
    first.start_epoch(0)
    assert torch.equal(again.perm, first.perm)

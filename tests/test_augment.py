"""Issue 4: batch augmentation is correct (crops are shifted windows of the padded image, flips
are mirrors, labels stay attached) and the in-memory fast recipe learns."""
import torch
import torch.nn.functional as F

from cifarkit.data.augment import alternating_flip, augment, cutout, random_flip, random_translate
from cifarkit.data.tensors import normalize


def _batch(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 12, 12), generator=g, dtype=torch.uint8)


def test_flip_is_a_mirror_or_identity_per_image():
    x = _batch()
    out = random_flip(x, torch.Generator().manual_seed(1))
    flipped = [torch.equal(o, xi.flip(2)) for o, xi in zip(out, x)]
    same = [torch.equal(o, xi) for o, xi in zip(out, x)]
    assert all(f or s for f, s in zip(flipped, same))
    assert 10 < sum(flipped) < 54                      # about half


def test_alternating_flip_mirrors_each_image_every_other_epoch():
    x = _batch()
    bits = torch.randint(0, 2, (len(x),), generator=torch.Generator().manual_seed(3))
    seen = []
    for epoch in range(4):
        out = alternating_flip(x, bits, epoch)
        mirrored = torch.tensor([torch.equal(o, xi.flip(2)) and not torch.equal(o, xi)
                                 for o, xi in zip(out, x)])
        unchanged = torch.tensor([torch.equal(o, xi) for o, xi in zip(out, x)])
        assert bool((mirrored | unchanged).all())
        assert torch.equal(mirrored, (bits + epoch) % 2 == 1)
        seen.append(mirrored)
    # consecutive epochs show every image once each way; the first epoch is a random half
    assert bool((seen[0] ^ seen[1]).all()) and torch.equal(seen[0], seen[2])
    assert 10 < int(seen[0].sum()) < 54
    # through augment(): the flip bits replace the coin toss
    assert torch.equal(augment(x, torch.Generator(), True, 0, 0, bits, 1), alternating_flip(x, bits, 1))


def test_translate_is_a_window_of_the_reflect_padded_image():
    x, pad = _batch(), 3
    out = random_translate(x, pad, torch.Generator().manual_seed(2))
    padded = F.pad(x.float(), (pad,) * 4, mode="reflect").to(torch.uint8)
    shifts = set()
    for o, p in zip(out, padded):
        hits = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                if torch.equal(o, p[:, dy:dy + 12, dx:dx + 12])]
        assert hits, "not a window of the padded image"
        shifts.add(hits[0])
    assert len(shifts) > 10                            # many different shifts are drawn


def test_translate_slice_and_gather_paths_agree():
    # CPUs cut the windows with slices, accelerators with one gather: same result
    from cifarkit.data.augment import _windows_by_gather, _windows_by_slices
    x = _batch(200)
    g = torch.Generator().manual_seed(7)
    dy, dx = torch.randint(0, 5, (200,), generator=g), torch.randint(0, 5, (200,), generator=g)
    padded = F.pad(x.float(), (2,) * 4, mode="reflect").to(torch.uint8)
    assert torch.equal(_windows_by_slices(padded, dy, dx, 12, 12), _windows_by_gather(padded, dy, dx, 12, 12))


def test_cutout_zeroes_one_square_and_leaves_the_rest():
    x = _batch() | 1                                   # no zero pixels to begin with
    out = cutout(x, 4, torch.Generator().manual_seed(3))
    for o, xi in zip(out, x):
        zero = (o == 0).all(0)
        assert 1 <= int(zero.sum()) <= 16
        ys, xs = torch.nonzero(zero, as_tuple=True)
        assert ys.max() - ys.min() < 4 and xs.max() - xs.min() < 4
        assert torch.equal(o[:, ~zero], xi[:, ~zero])


def test_labels_stay_attached():
    # Encode each image's label in its pixels; after augmentation the label must still match.
    labels = torch.arange(64) % 10
    x = (labels.view(-1, 1, 1, 1) * 20 + 10).to(torch.uint8).expand(64, 3, 12, 12).contiguous()
    out = augment(x, torch.Generator().manual_seed(4), flip=True, crop_pad=2, cutout_size=0)
    assert torch.equal(((out.float().mean((1, 2, 3)) - 10) / 20).round().long(), labels)


def test_same_generator_state_same_augmentation():
    x = _batch()
    a = augment(x, torch.Generator().manual_seed(5), True, 2, 4)
    b = augment(x, torch.Generator().manual_seed(5), True, 2, 4)
    assert torch.equal(a, b)


def test_normalize_is_x_over_255_minus_mean_over_std():
    x = _batch(4)
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    ref = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(normalize(x, mean, std, channels_last=True), ref, atol=1e-5)


def test_fast_recipe_short_run_learns(tiny_folder, tmp_path):
    from cifarkit import resolve_config, train
    cfg = resolve_config("fast", overrides={"data": str(tiny_folder), "out": str(tmp_path / "r"),
                                            "epochs": 4, "batch_size": 32, "val_size": 24,
                                            "tensorboard": False})
    s = train(cfg, progress=False, log=lambda *a: None)
    # 3 classes: chance is 0.33; the same network with its convolutions frozen reaches 0.67
    assert s["best_val_acc"] >= 0.9


def test_multi_tta_averages_ten_views():
    from cifarkit.evaluate import _translate, logits_tta
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(5))
    x = torch.randn(6, 3, 10, 10)
    model(x)
    views = [x, x.flip(3)]
    shifted = [_translate(v, dx, dy) for dx, dy in [(1, 0), (-1, 0), (0, 1), (0, -1)] for v in views]
    ref = 0.5 * torch.stack([model(v) for v in views]).mean(0) + 0.5 * torch.stack([model(v) for v in shifted]).mean(0)
    assert torch.allclose(logits_tta(model, x, "multi"), ref, atol=1e-5)
    # the window is offset by (dx, dy): dx=+1 shows columns 1.. of the image, dx=-1 columns ..-1
    assert torch.equal(_translate(x, 1, 0)[..., :, :-1], x[..., :, 1:])
    assert torch.equal(_translate(x, -1, 0)[..., :, 1:], x[..., :, :-1])
    assert torch.equal(_translate(x, 0, 1)[..., :-1, :], x[..., 1:, :])
    assert torch.equal(_translate(x, 1), _translate(x, 1, 1))    # one number: the diagonal shift

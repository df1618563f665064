"""Evaluation scored on answers known by hand: accuracy, per-class accuracy (recall), the
confusion matrix's orientation, test-time augmentation views, and the test split of a folder."""
import pytest
import torch

from helpers import make_folder

from cifarkit import CifarkitError, create_model, evaluate
from cifarkit.checkpoint import Checkpoint
from cifarkit.data.tensors import TensorSplit
from cifarkit.evaluate import _translate, evaluate_checkpoint, logits_tta


class _Lookup(torch.nn.Module):
    """Predicts ``preds[i]`` for the image whose pixels all equal i (mean 0, std 1 normalisation
    turns the pixel value v into v / 255)."""

    def __init__(self, preds, k):
        super().__init__()
        self.logits = torch.nn.functional.one_hot(torch.tensor(preds), k).float() * 5

    def forward(self, x):
        idx = (x[:, 0, 0, 0].float() * 255).round().long()
        return self.logits[idx]


def _split(labels):
    n = len(labels)
    x = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 4, 4).contiguous()
    return TensorSplit(x, torch.tensor(labels))


def test_accuracy_per_class_and_confusion_on_a_known_answer():
    y = [0, 0, 0, 1, 1, 2]
    pred = [0, 1, 0, 1, 2, 2]
    r = evaluate(_Lookup(pred, 3), _split(y), ["a", "b", "c"], [0, 0, 0], [1, 1, 1], torch.device("cpu"))
    assert r.n == 6 and r.accuracy == pytest.approx(4 / 6)
    # rows are the true class, columns the prediction
    assert r.confusion == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    # per-class accuracy is recall: right answers over the images of that class
    assert r.per_class == pytest.approx({"a": 2 / 3, "b": 1 / 2, "c": 1.0})
    logits = _Lookup(pred, 3).logits
    assert r.loss == pytest.approx(torch.nn.functional.cross_entropy(logits, torch.tensor(y)).item())


def test_a_class_without_images_has_no_accuracy_and_empty_data_is_nan():
    r = evaluate(_Lookup([0, 0], 3), _split([0, 0]), ["a", "b", "c"], [0] * 3, [1] * 3, torch.device("cpu"))
    assert r.per_class == {"a": 1.0, "b": None, "c": None} and r.accuracy == 1.0
    empty = TensorSplit(torch.zeros(0, 3, 4, 4, dtype=torch.uint8), torch.zeros(0, dtype=torch.long))
    r = evaluate(_Lookup([0], 3), empty, ["a", "b", "c"], [0] * 3, [1] * 3, torch.device("cpu"))
    assert r.n == 0 and r.accuracy != r.accuracy


def test_translate_shifts_with_reflection():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    right = _translate(x, 1, 0)                  # content moves left: column j shows j + 1
    assert right[0, 0, 0].tolist() == [1, 2, 3, 2]     # the last column reflects
    down = _translate(x, 0, -1)
    assert down[0, 0, :, 0].tolist() == [4, 0, 4, 8]


def test_tta_views_and_weights():
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, x):
            seen.append(x.clone())
            return x.mean((2, 3))
    x = torch.arange(32.0).view(2, 1, 4, 4)
    assert torch.equal(logits_tta(Spy(), x, "none"), x.mean((2, 3)))
    seen.clear()
    logits_tta(Spy(), x, "flip")
    assert len(seen) == 2 and torch.equal(seen[1], x.flip(3))
    seen.clear()
    logits_tta(Spy(), x, "flip_translate")
    assert len(seen) == 4 and torch.equal(seen[2], _translate(x, 1))
    assert torch.equal(seen[3], _translate(x, -1).flip(3))
    seen.clear()
    logits_tta(Spy(), x, "multi")
    assert len(seen) == 10
    # weights: a model that scores only the exact image gives it half the vote in flip_translate
    class Exact(torch.nn.Module):
        def forward(self, v):
            return (v == x).all(dim=(1, 2, 3)).float().unsqueeze(1)
    assert logits_tta(Exact(), x, "flip").flatten().tolist() == [0.5, 0.5]
    assert logits_tta(Exact(), x, "flip_translate").flatten().tolist() == [0.25, 0.25]
    assert logits_tta(Exact(), x, "multi").flatten().tolist() == [0.25, 0.25]


def _checkpoint(data, classes):
    torch.manual_seed(0)
    model = create_model("tudui_relu", len(classes))
    return Checkpoint("tudui_relu", {}, len(classes), model.state_dict(), list(classes),
                      {"mean": [0.5] * 3, "std": [0.25] * 3, "size": 32},
                      {"data": str(data), "val_size": 6, "seed": 0})


@pytest.mark.filterwarnings("ignore:.*lacks classes")
def test_test_split_of_a_folder_is_used_with_the_trains_class_indices(tmp_path):
    data = make_folder(tmp_path / "d", classes=("cat", "dog", "ship"), n_per_class=4)
    make_folder(tmp_path / "d", classes=("dog", "ship"), n_per_class=3, split="test", seed=5)
    ck = _checkpoint(data, ["cat", "dog", "ship"])
    with pytest.warns(UserWarning, match="lacks classes cat"):
        r, split = evaluate_checkpoint(ck, split="test", progress=False)
    # the test folder's "dog" is class 1 of the model, "ship" class 2 (not 0 and 1)
    assert r.n == 6 and split.y.tolist() == [1, 1, 1, 2, 2, 2]
    assert sum(r.confusion[0]) == 0 and sum(r.confusion[1]) == 3 and sum(r.confusion[2]) == 3
    val, _ = evaluate_checkpoint(ck, split="val", progress=False)
    train, _ = evaluate_checkpoint(ck, split="train", progress=False)
    assert (val.n, train.n) == (6, 6)                      # 12 images: 6 held out (the config's)


def test_test_split_missing_is_one_clear_error(tmp_path):
    data = make_folder(tmp_path / "d", classes=("cat", "dog"), n_per_class=4)
    with pytest.raises(CifarkitError, match="no test split"):
        evaluate_checkpoint(_checkpoint(data, ["cat", "dog"]), split="test", progress=False)


def test_precision_f1_macro_and_top5_on_a_known_answer():
    y = [0, 0, 0, 1, 1, 2]
    pred = [0, 1, 0, 1, 2, 2]          # confusion [[2,1,0],[0,1,1],[0,0,1]]
    r = evaluate(_Lookup(pred, 3), _split(y), ["a", "b", "c"], [0, 0, 0], [1, 1, 1], torch.device("cpu"))
    # precision: right answers over the predictions of that class (columns)
    assert r.precision == pytest.approx({"a": 1.0, "b": 1 / 2, "c": 1 / 2})
    f1 = lambda p, q: 2 * p * q / (p + q)
    assert r.f1 == pytest.approx({"a": f1(1, 2 / 3), "b": f1(1 / 2, 1 / 2), "c": f1(1 / 2, 1)})
    assert r.macro == pytest.approx({"recall": (2 / 3 + 1 / 2 + 1) / 3, "precision": (1 + 1 / 2 + 1 / 2) / 3,
                                     "f1": (f1(1, 2 / 3) + 1 / 2 + f1(1 / 2, 1)) / 3})
    assert r.top5 is None                                   # fewer than 5 classes
    # a class never predicted although it has images: precision 0 (all missed); one with neither: None
    r = evaluate(_Lookup([0, 0, 0], 3), _split([0, 1, 0]), ["a", "b", "c"], [0] * 3, [1] * 3, torch.device("cpu"))
    assert r.precision == pytest.approx({"a": 2 / 3, "b": 0.0, "c": None})
    assert r.f1["b"] == 0.0 and r.f1["c"] is None and r.macro["recall"] == pytest.approx(0.5)


def test_top5_counts_the_true_class_among_the_five_highest_scores():
    class Ranked(torch.nn.Module):
        def forward(self, x):          # scores 6,5,4,...: class 0 first, class 6 seventh
            return torch.arange(7, 0, -1).float().expand(len(x), 7)
    y = [0, 4, 5, 6]                   # ranks 1, 5 (in the top 5), 6, 7 (not)
    r = evaluate(Ranked(), _split(y), list("abcdefg"), [0] * 3, [1] * 3, torch.device("cpu"))
    assert r.top5 == pytest.approx(2 / 4) and r.accuracy == pytest.approx(1 / 4)


def test_class_metrics_of_an_empty_confusion_are_undefined_not_an_error():
    from cifarkit.evaluate import class_metrics
    recall, precision, f1, macro = class_metrics(torch.zeros(2, 2, dtype=torch.long), ["a", "b"])
    assert recall == {"a": None, "b": None} and precision == {"a": None, "b": None}
    assert macro == {"recall": None, "precision": None, "f1": None}


def test_evaluate_defaults_one_view_no_probabilities_and_keeps_them_when_asked():
    class LeftPixel(torch.nn.Module):   # looks at the left column only: a mirror changes its answer
        def forward(self, x):
            return torch.stack([x[:, 0, 0, 0], -x[:, 0, 0, 0]], 1) * 10
    x = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    x[:, :, :, 0] = 255                 # bright left edge -> class 0; mirrored it would be class 1
    split = TensorSplit(x, torch.tensor([0, 0]))
    r = evaluate(LeftPixel(), split, ["a", "b"], [0.5] * 3, [0.5] * 3, torch.device("cpu"))
    assert r.accuracy == 1.0            # a single, unmirrored view by default
    assert r.probs is None and r.labels is None
    k = evaluate(LeftPixel(), split, ["a", "b"], [0.5] * 3, [0.5] * 3, torch.device("cpu"), keep_probs=True)
    assert torch.allclose(k.probs.sum(1), torch.ones(2)) and k.probs.shape == (2, 2) and k.probs[0, 0] > 0.99
    assert torch.equal(k.labels, torch.tensor([0, 0]))


def test_empty_data_gives_nan_and_empty_tables():
    import math
    empty = TensorSplit(torch.zeros(0, 3, 4, 4, dtype=torch.uint8), torch.zeros(0, dtype=torch.long))
    r = evaluate(_Lookup([0], 3), empty, ["a", "b", "c"], [0] * 3, [1] * 3, torch.device("cpu"))
    assert math.isnan(r.accuracy) and math.isnan(r.loss) and r.n == 0
    assert r.per_class == {} and r.confusion == []


def test_top5_with_exactly_five_classes():
    r = evaluate(_Lookup([0, 1, 2, 3, 4], 5), _split([0, 1, 2, 3, 4]), list("abcde"), [0] * 3, [1] * 3,
                 torch.device("cpu"))
    assert r.top5 == 1.0                # every class is among the 5 highest of 5

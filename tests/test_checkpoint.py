import os
import pickle
from pathlib import Path

import pytest
import torch

from cifarkit import CifarkitError, create_model, load_checkpoint, save_checkpoint
from cifarkit.atomic import torch_save as atomic_torch_save
from cifarkit.checkpoint import (Checkpoint, FORMAT_VERSION, export_pickle,
                                 export_safetensors)


def _ckpt(name="tudui", n=10, **kw):
    torch.manual_seed(0)
    m = create_model(name, n)
    return Checkpoint(name, {}, n, m.state_dict(), [f"c{i}" for i in range(n)],
                      {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.2], "size": 32},
                      {"recipe": "tutorial", "val_size": 7}, {"val_acc": 0.5}, 3, **kw), m


def _same_outputs(m1, m2):
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        return torch.allclose(m1.eval()(x), m2.eval()(x))


def test_round_trip_loads_with_weights_only(tmp_path):
    ck, m = _ckpt()
    save_checkpoint(ck, tmp_path / "a.ckpt")
    raw = torch.load(tmp_path / "a.ckpt", weights_only=True)   # plain tensors and types only
    assert raw["format"] == "cifarkit" and raw["version"] == FORMAT_VERSION
    back = load_checkpoint(tmp_path / "a.ckpt")
    assert back.classes == ck.classes and back.preprocess == ck.preprocess and back.epoch == 3
    assert back.config["val_size"] == 7
    assert _same_outputs(m, back.build_model())


def test_bare_state_dict_needs_model_and_infers_class_count(tmp_path):
    m = create_model("tudui", 4)
    torch.save(m.state_dict(), tmp_path / "sd.pth")             # the notes' method 2
    with pytest.raises(CifarkitError, match="--model"):
        load_checkpoint(tmp_path / "sd.pth")
    ck = load_checkpoint(tmp_path / "sd.pth", model="tudui")
    assert ck.num_classes == 4 and _same_outputs(m, ck.build_model())


def test_vgg16_state_dict_like_the_notes(tmp_path):
    import torchvision
    m = torchvision.models.vgg16(weights=None)                  # 1000-class head, as in the notes
    torch.save(m.state_dict(), tmp_path / "vgg16_method2.pth")
    ck = load_checkpoint(tmp_path / "vgg16_method2.pth", model="vgg16")
    assert ck.num_classes == 1000
    ck.build_model()


@pytest.mark.parametrize("wrap", ["module", "orig_mod", "net_dict", "cuda_like"])
def test_foreign_wrappers_and_prefixes(tmp_path, wrap):
    m = create_model("tudui_relu", 10)
    sd = m.state_dict()
    if wrap == "module":
        obj = {f"module.{k}": v for k, v in sd.items()}
    elif wrap == "orig_mod":
        obj = {f"_orig_mod.{k}": v for k, v in sd.items()}
    elif wrap == "net_dict":
        obj = {"net": {f"module.{k}": v for k, v in sd.items()}, "acc": 91.2, "epoch": 7}
    else:
        obj = {"state_dict": sd, "epoch": 2}
    torch.save(obj, tmp_path / "f.pth")
    ck = load_checkpoint(tmp_path / "f.pth", model="tudui_relu")
    assert _same_outputs(m, ck.build_model())


def test_cuda_saved_tensors_map_to_cpu(tmp_path, monkeypatch):
    # A CUDA-saved file on a CPU-only machine: load_checkpoint must pass map_location.
    seen = {}
    real = torch.load
    def spy(*a, **k):
        seen.update(k)
        return real(*a, **k)
    monkeypatch.setattr(torch, "load", spy)
    ck, _ = _ckpt()
    save_checkpoint(ck, tmp_path / "a.ckpt")
    load_checkpoint(tmp_path / "a.ckpt")
    assert str(seen["map_location"]) == "cpu" and seen["weights_only"] is True


def test_mismatch_lists_keys(tmp_path):
    ck, _ = _ckpt("tudui")
    ck.model_name = "resnet18"
    save_checkpoint(ck, tmp_path / "x.ckpt")
    with pytest.raises(CifarkitError) as e:
        load_checkpoint(tmp_path / "x.ckpt").build_model()
    assert "missing keys" in str(e.value) and "unexpected keys" in str(e.value)


def test_class_count_mismatch_is_named(tmp_path):
    m = create_model("tudui", 5)
    torch.save(m.state_dict(), tmp_path / "sd.pth")
    with pytest.raises(CifarkitError, match="shape mismatches"):
        load_checkpoint(tmp_path / "sd.pth", model="tudui", num_classes=10).build_model()


def test_future_version_refused(tmp_path):
    ck, _ = _ckpt()
    d = ck.to_dict()
    d["version"] = FORMAT_VERSION + 1
    torch.save(d, tmp_path / "f.ckpt")
    with pytest.raises(CifarkitError, match="upgrade cifarkit"):
        load_checkpoint(tmp_path / "f.ckpt")


@pytest.mark.parametrize("damage", ["truncated", "random", "empty", "text"])
def test_damaged_files_give_one_clear_error(tmp_path, damage):
    ck, _ = _ckpt()
    good = tmp_path / "g.ckpt"
    save_checkpoint(ck, good)
    data = good.read_bytes()
    bad = tmp_path / "b.ckpt"
    bad.write_bytes({"truncated": data[: len(data) // 2], "random": os.urandom(5000), "empty": b"",
                     "text": b"hello, I am not a checkpoint\n"}[damage])
    with pytest.raises(CifarkitError) as e:
        load_checkpoint(bad)
    assert "b.ckpt" in str(e.value) and "\n" not in str(e.value)


def test_safetensors_export_round_trip(tmp_path):
    ck, m = _ckpt()
    export_safetensors(ck, tmp_path / "m.safetensors")
    back = load_checkpoint(tmp_path / "m.safetensors")
    assert back.source == "safetensors" and back.classes == ck.classes
    assert back.preprocess == ck.preprocess
    assert _same_outputs(m, back.build_model())
    assert (tmp_path / "m.safetensors.json").exists()


def test_whole_model_pickle_refused_without_trust_then_converted(tmp_path):
    ck, m = _ckpt()
    export_pickle(ck, tmp_path / "whole.pth")
    with pytest.raises(CifarkitError) as e:
        load_checkpoint(tmp_path / "whole.pth")
    assert "--trust-pickle" in str(e.value) and "code" in str(e.value)
    back = load_checkpoint(tmp_path / "whole.pth", trust_pickle=True)
    assert back.model_name == "tudui" and _same_outputs(m, back.build_model())
    # cifarkit's own pickle keeps what the module alone cannot say: classes, preprocessing
    assert back.classes == ck.classes and back.preprocess == ck.preprocess
    # ... and the model's settings, so a non-default network is recognised too
    torch.manual_seed(1)
    fast = create_model("fast", 3, widths=[16, 32, 48])
    custom = Checkpoint("fast", {"widths": [16, 32, 48]}, 3, fast.state_dict(), ["x", "y", "z"],
                        {"mean": [0.1] * 3, "std": [0.3] * 3, "size": 32})
    export_pickle(custom, tmp_path / "fast.pth")
    back = load_checkpoint(tmp_path / "fast.pth", trust_pickle=True)
    assert (back.model_name, back.model_args, back.classes) == ("fast", {"widths": [16, 32, 48]}, ["x", "y", "z"])
    assert _same_outputs(fast, back.build_model())
    # a foreign whole-model pickle (no such attribute) still gets default names
    torch.save(create_model("tudui", 10), tmp_path / "foreign.pth")
    assert load_checkpoint(tmp_path / "foreign.pth", trust_pickle=True).classes[0] == "airplane"


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def test_malicious_pickle_never_runs(tmp_path):
    target = tmp_path / "PWNED"
    payload = tmp_path / "evil.pth"
    torch.save({"state_dict": _Evil(str(target))}, payload)
    assert not target.exists()
    with pytest.raises(CifarkitError, match="trust-pickle"):
        load_checkpoint(payload, model="tudui")
    assert not target.exists()
    # plain pickle (not torch's zip format) is refused the same way
    plain = tmp_path / "evil.pkl"
    plain.write_bytes(pickle.dumps(_Evil(str(target))))
    with pytest.raises(CifarkitError):
        load_checkpoint(plain, model="tudui")
    assert not target.exists()


def test_atomic_write_keeps_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"a": torch.ones(3)}, path)
    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk on fire")
    with pytest.raises(RuntimeError):
        atomic_torch_save({"a": Boom()}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]   # no temp file left behind


def test_unwritable_folder_is_a_clear_error(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user that ignores permissions")
        ck, _ = _ckpt()
        with pytest.raises(CifarkitError, match="cannot write"):
            save_checkpoint(ck, ro / "x.ckpt")
    finally:
        ro.chmod(0o700)


def test_output_path_under_a_file_is_a_clear_error(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    ck, _ = _ckpt()
    with pytest.raises(CifarkitError, match="cannot write"):
        save_checkpoint(ck, blocker / "x.ckpt")

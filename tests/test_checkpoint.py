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


@pytest.mark.parametrize("key", ["state_dict", "model_state_dict", "model", "net", "weights", "params"])
def test_every_common_wrapper_key_is_found(tmp_path, key):
    """Training scripts save {'<key>': state_dict, 'optimizer': ..., 'epoch': ...}; each common key
    is looked into (a wrong guess would be 'holds no model weights')."""
    m = create_model("tudui_relu", 10)
    torch.save({key: m.state_dict(), "optimizer": {"lr": torch.tensor(0.1)}, "epoch": 3}, tmp_path / "f.pth")
    ck = load_checkpoint(tmp_path / "f.pth", model="tudui_relu")
    assert ck.epoch == 3 and _same_outputs(m, ck.build_model())


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


def test_saved_weights_are_detached_plain_tensors_and_other_state_is_kept(tmp_path):
    w = torch.ones(2, 3, requires_grad=True)
    ck = Checkpoint("tudui_relu", {}, 10, {"w": w * 2, "_extra_state": 3}, [str(i) for i in range(10)],
                    {"mean": [0.0] * 3, "std": [1.0] * 3, "size": 32})
    save_checkpoint(ck, tmp_path / "c.ckpt")
    raw = torch.load(tmp_path / "c.ckpt", weights_only=True)
    assert not raw["state_dict"]["w"].requires_grad and raw["state_dict"]["w"].grad_fn is None
    assert torch.equal(raw["state_dict"]["w"], torch.full((2, 3), 2.0)) and raw["state_dict"]["_extra_state"] == 3


def test_a_checkpoint_naming_a_file_is_refused_without_model_and_says_which(tmp_path):
    ck = Checkpoint("/somewhere/net.py:Net", {}, 10, {"w": torch.ones(1)}, [str(i) for i in range(10)],
                    {"mean": [0.0] * 3, "std": [1.0] * 3, "size": 32},
                    model_source={"path": "/elsewhere/net.py", "name": "Net2", "sha256": "0" * 64})
    save_checkpoint(ck, tmp_path / "c.ckpt")
    with pytest.raises(CifarkitError) as e:
        load_checkpoint(tmp_path / "c.ckpt")
    # the recorded source names the file: its path and name, in the message and the hint
    assert "/elsewhere/net.py:Net2" in e.value.message and "--model /elsewhere/net.py:Net2" in e.value.hint
    assert "never imports code that a checkpoint names" in e.value.message
    with pytest.raises(CifarkitError) as e:
        load_checkpoint(tmp_path / "c.ckpt", model="tudui")
    assert "not the registered 'tudui'" in e.value.message and e.value.hint == "pass --model /elsewhere/net.py:Net2"
    # the file is only read when the network is built: a moved or unrecorded file loads the weights
    assert load_checkpoint(tmp_path / "c.ckpt", model=str(tmp_path / "moved.py") + ":Net2").model_name.endswith("moved.py:Net2")
    bare = Checkpoint("/somewhere/net.py:Net", {}, 10, {"w": torch.ones(1)}, [str(i) for i in range(10)],
                      {"mean": [0.0] * 3, "std": [1.0] * 3, "size": 32})
    save_checkpoint(bare, tmp_path / "b.ckpt")
    with pytest.raises(CifarkitError, match="/somewhere/net.py:Net"):
        load_checkpoint(tmp_path / "b.ckpt")
    mine = tmp_path / "net.py"
    mine.write_text("x = 1\n")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")      # no hash recorded: nothing to compare, no warning
        assert load_checkpoint(tmp_path / "b.ckpt", model=f"{mine}:Net").model_name == f"{mine}:Net"


@pytest.mark.parametrize("text, pickled", [
    ("Weights only load failed. Re-running with weights_only=False would run code", True),
    ("Unsupported global: GLOBAL mymodule.Net was not an allowed global", True),
    ("Unsupported operand 149", True),
    ("invalid load key, 'x'.", False),
])
def test_unpickling_errors_are_sorted_into_pickled_code_or_a_damaged_file(tmp_path, monkeypatch, text, pickled):
    """torch.load(weights_only=True) refuses a pickle in several wordings; each one names the
    pickle and the trusted way in, anything else is a damaged file. Either way nothing is unpickled."""
    f = tmp_path / "m.pth"
    f.write_bytes(b"x")
    monkeypatch.setattr(torch, "load", lambda *a, **k: (_ for _ in ()).throw(pickle.UnpicklingError(text)))
    with pytest.raises(CifarkitError) as e:
        load_checkpoint(f)
    if pickled:
        assert "holds pickled Python objects" in e.value.message and "can run arbitrary code" in e.value.message
        assert e.value.hint == f"if you trust its source: cifarkit convert {f} --trust-pickle --out safe.ckpt"
    else:
        assert e.value.message == f"{f} is not a readable checkpoint ({text})"


@pytest.mark.parametrize("exc, first", [(EOFError(), "EOFError"), (RuntimeError("x" * 300 + "\nmore"), "x" * 160)])
def test_other_read_errors_name_the_first_line_or_the_error_type(tmp_path, monkeypatch, exc, first):
    f = tmp_path / "m.pth"
    f.write_bytes(b"x")
    monkeypatch.setattr(torch, "load", lambda *a, **k: (_ for _ in ()).throw(exc))
    with pytest.raises(CifarkitError) as e:
        load_checkpoint(f)
    assert e.value.message == f"{f} is not a readable checkpoint: {first}"
    assert e.value.hint == "the file is truncated, damaged or not a PyTorch/safetensors file"


def test_stacked_prefixes_are_all_stripped_and_a_misfit_names_where():
    from cifarkit.checkpoint import load_weights, strip_prefixes
    assert strip_prefixes({"module._orig_mod.fc.w": 1, "_orig_mod.module.b": 2, "c": 3}) == {"fc.w": 1, "b": 2, "c": 3}
    m = create_model("tudui_relu", 10)
    with pytest.raises(CifarkitError) as e:
        load_weights(m, {"nothing": torch.ones(1)})
    assert e.value.message.startswith("checkpoint does not fit model Sequential")


def test_a_misfit_lists_up_to_four_keys_per_kind_and_counts_the_rest():
    from cifarkit.checkpoint import load_weights
    m = torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(3)])   # 0.weight ... 2.bias
    sd = {k: v for k, v in m.state_dict().items() if k.startswith("2.")}    # 4 keys missing
    sd["2.weight"] = torch.zeros(3, 2)                                      # one shape mismatch
    sd.update({f"extra{i}": torch.zeros(1) for i in range(6)})               # 6 unexpected
    with pytest.raises(CifarkitError) as e:
        load_weights(m, sd, "f.pth")
    assert e.value.message == (
        "f.pth does not fit model Sequential: missing keys: 0.weight, 0.bias, 1.weight, 1.bias; "
        "unexpected keys: extra0, extra1, extra2, extra3 (+2 more); "
        "shape mismatches: 2.weight (3, 2) vs model (2, 2)")
    assert e.value.hint == "pass the --model (and --num-classes) the weights were trained with"
    five = {k: v for k, v in m.state_dict().items() if k.startswith("2.")}
    five.update({f"x{i}": torch.zeros(1) for i in range(5)})
    with pytest.raises(CifarkitError) as e:
        load_weights(m, five, "g")
    assert "unexpected keys: x0, x1, x2, x3 (+1 more)" in e.value.message

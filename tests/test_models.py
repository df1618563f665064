import pytest
import torch

from cifarkit import create_model, list_models, count_parameters, CifarkitError


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_forward_shape(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


def test_registry_has_the_issue_models():
    assert {"tudui", "tudui_relu", "vgg16", "resnet18", "fast"} <= set(list_models())


def test_tudui_is_the_notes_network():
    m = create_model("tudui")
    assert count_parameters(m) == 145_578
    kinds = [type(l).__name__ for l in m]
    assert kinds == ["Conv2d", "MaxPool2d", "Conv2d", "MaxPool2d", "Conv2d", "MaxPool2d", "Flatten",
                     "Linear", "Linear"]
    shapes, x = [], torch.zeros(1, 3, 32, 32)
    for layer in m:
        x = layer(x)
        shapes.append(tuple(x.shape[1:]))
    assert shapes == [(32, 32, 32), (32, 16, 16), (32, 16, 16), (32, 8, 8), (64, 8, 8), (64, 4, 4),
                      (1024,), (64,), (10,)]


def test_tudui_relu_adds_activations_only():
    m = create_model("tudui_relu")
    assert count_parameters(m) == 145_578
    assert sum(type(l).__name__ == "ReLU" for l in m) == 4


def test_resnet18_has_cifar_stem():
    m = create_model("resnet18")
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1)
    assert isinstance(m.maxpool, torch.nn.Identity)


def test_unknown_model_suggests_close_names():
    with pytest.raises(CifarkitError) as e:
        create_model("tudiu")
    assert "tudui" in str(e.value) and e.value.exit_code == 2


def test_fast_whitening_decorrelates_patches():
    m = create_model("fast")
    x = torch.randn(200, 3, 32, 32) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1)
    x[:, 1] += 0.8 * x[:, 0]  # correlated channels
    m.init_whitening(x)
    with torch.no_grad():
        out = m.whiten(x)[:, :12]  # the + half of the +/- pairs
    flat = out.permute(1, 0, 2, 3).reshape(12, -1)
    cov = torch.cov(flat)
    assert torch.allclose(torch.diag(cov), torch.ones(12), atol=0.15)
    off = cov - torch.diag(torch.diag(cov))
    assert off.abs().max() < 0.15


def test_fast_depths_add_convolutions_and_keep_old_module_names():
    base = create_model("fast", widths=[8, 16, 16])
    deep = create_model("fast", widths=[8, 16, 16], depths=[1, 2, 3])
    convs = lambda m: [n for n, l in m.named_modules() if isinstance(l, torch.nn.Conv2d)]
    assert len(convs(base)) == 1 + 6 and len(convs(deep)) == 1 + 6
    per_group = [sum(isinstance(l, torch.nn.Conv2d) for l in g) for g in list(deep.layers)[1:4]]
    assert per_group == [1, 2, 3]
    # depth 2 (the default) keeps the module names checkpoints written before depths existed use
    assert set(create_model("fast", depths=[2, 2, 2]).state_dict()) == set(create_model("fast").state_dict())
    assert "layers.1.4.weight" in base.state_dict() and "layers.3.7.weight" in deep.state_dict()


def test_fast_residual_adds_the_first_block_to_the_last():
    torch.manual_seed(0)
    plain = create_model("fast", widths=[8, 16, 16], depths=[2, 3, 3]).eval()
    res = create_model("fast", widths=[8, 16, 16], depths=[2, 3, 3], residual=True).eval()
    res.load_state_dict(plain.state_dict())   # same weights: only the sum differs
    x = torch.randn(4, 8, 16, 16)
    group_plain, group_res = plain.layers[2], res.layers[2]
    with torch.no_grad():
        skip = group_plain[3](group_plain[2](group_plain[1](group_plain[0](x))))
        assert torch.allclose(group_res(x), group_plain(x) + skip, atol=1e-6)
        images = torch.randn(2, 3, 32, 32)
        assert not torch.allclose(res(images), plain(images))
    # a group of one convolution has nothing to skip over
    one = create_model("fast", widths=[8, 16, 16], depths=[1, 1, 1], residual=True).eval()
    assert not any(g.residual for g in list(one.layers)[1:4])


def test_fast_pool_first_pools_before_the_first_convolution():
    from torch.utils.flop_counter import FlopCounterMode
    torch.manual_seed(0)
    plain = create_model("fast", widths=[8, 16, 16], depths=[2, 2, 2]).eval()
    pooled = create_model("fast", widths=[8, 16, 16], depths=[2, 2, 2], pool_first=[False, True, True]).eval()
    assert set(pooled.state_dict()) == set(plain.state_dict())   # a pool has no parameters
    pooled.load_state_dict(plain.state_dict())
    x = torch.randn(4, 8, 15, 15)
    g_plain, g_pooled = plain.layers[2], pooled.layers[2]
    with torch.no_grad():
        expect = g_pooled[3](g_pooled[2](g_pooled[0](g_pooled[1](x))))   # pool -> conv -> BN -> GELU
        expect = g_pooled[6](g_pooled[5](g_pooled[4](expect)))
        assert torch.allclose(g_pooled(x), expect, atol=1e-6)
        assert g_pooled(x).shape == g_plain(x).shape == (4, 16, 7, 7)
        assert not torch.allclose(g_pooled(x), g_plain(x))

    def macs(model):
        with FlopCounterMode(display=False) as fc:
            model(torch.zeros(1, 3, 32, 32))
        return fc.get_total_flops() / 2
    # the first convolution of groups 2 and 3 runs on a quarter of the pixels (7x7 of 15x15; 3x3 of 7x7)
    saved = 8 * 16 * 9 * (15 * 15 - 7 * 7) + 16 * 16 * 9 * (7 * 7 - 3 * 3)
    assert macs(plain) - macs(pooled) == saved
    with pytest.raises(CifarkitError, match="pool_first"):
        create_model("fast", pool_first=True)

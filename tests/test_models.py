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

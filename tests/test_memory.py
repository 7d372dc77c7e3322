"""peak_memory: one training step's peak, split by category (MemTracker on CPU, the allocator on CUDA)."""

import pytest
import torch
import torch.nn.functional as F

import tritonact
from tritonact.memory import peak_memory

torchvision = pytest.importorskip("torchvision")

CATEGORIES = ("parameters", "buffers", "gradients", "activations", "temporaries", "optimizer", "other")


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.fixture
def resnet():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    y = torch.randint(0, 10, (2,))
    return model, x, y


def _check_split(r, model):
    assert set(CATEGORIES) <= set(r)
    assert all(isinstance(r[k], int) and r[k] >= 0 for k in CATEGORIES)
    assert sum(r[k] for k in CATEGORIES) == r["total"]
    assert r["parameters"] == _nbytes(model.parameters())
    assert r["buffers"] == _nbytes(model.buffers())
    assert r["activations_after_forward"] > 0
    assert r["activations_temporaries_peak"] >= r["activations"] + r["temporaries"]
    assert all(p.grad is None for p in model.parameters()), "gradients are released after the step"


@pytest.mark.slow
def test_exact_step_splits_into_categories(resnet):
    model, x, y = resnet
    r = peak_memory(model, x, y)
    _check_split(r, model)
    assert r["method"] == "memtracker" and r["device"] == "cpu"
    # resnet18 at 32x32, batch 2: parameters and their gradients dominate the peak
    assert 0 < r["gradients"] <= r["parameters"]
    assert r["optimizer"] == 0
    assert r["other"] == _nbytes([x, y])  # the batch, registered with the tracker


@pytest.mark.slow
@pytest.mark.parametrize("naive", [False, True], ids=["4-bit", "naive-4-bit"])
def test_inside_approximate_activations_are_smaller(resnet, naive):
    model, x, y = resnet
    exact = peak_memory(model, x, y)
    with tritonact.approximate(model, bits=4, naive=naive) as ctx:
        approx = peak_memory(model, x, y)
        assert ctx.report().code_bytes > 0, "the step ran through tritonact's units"
    _check_split(approx, model)
    # codes instead of fp32 activations: what forward leaves for backward shrinks a lot (exact ~0.88 MiB, 4-bit
    # ~0.28 MiB here; the rest is conv inputs and constants outside the fused units)
    assert approx["activations_after_forward"] < 0.5 * exact["activations_after_forward"]


@pytest.mark.slow
def test_optimizer_state_counts(resnet):
    model, x, y = resnet
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    before = [p.detach().clone() for p in model.parameters()]
    r = peak_memory(model, x, y, optimizer=opt)
    _check_split(r, model)
    assert r["optimizer"] == _nbytes(model.parameters())  # one momentum buffer per parameter
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters())), "the optimizer stepped"


def test_loss_fn_with_and_without_target():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.LazyLinear(3)
    )
    x = torch.randn(2, 3, 8, 8)
    model(x)  # materialize the lazy layer
    seen = []

    def loss2(out, target):
        seen.append("target")
        return F.cross_entropy(out, target)

    def loss1(out):
        seen.append("plain")
        return out.sum()

    for kw in ({"target": torch.tensor([0, 2]), "loss_fn": loss2}, {"loss_fn": loss1}, {}):
        r = peak_memory(model, x, **kw)
        assert sum(r[k] for k in CATEGORIES) == r["total"] > 0
    assert seen == ["target", "plain"]


@pytest.mark.parametrize(
    "kwargs, err, words",
    [
        ({"model": "resnet"}, TypeError, "str"),
        ({"x": [1.0, 2.0]}, TypeError, "list"),
        ({"target": 3}, TypeError, "int"),
        ({"loss_fn": 3}, TypeError, "3"),
        ({"optimizer": "sgd"}, TypeError, "str"),
        ({"x": torch.randn(2, 3, 8, 8, device="meta")}, ValueError, "meta"),
    ],
    ids=["model", "x", "target", "loss_fn", "optimizer", "device"],
)
def test_bad_arguments_name_the_value(kwargs, err, words):
    args = {"model": torch.nn.Conv2d(3, 4, 3), "x": torch.randn(2, 3, 8, 8)}
    args.update(kwargs)
    with pytest.raises(err, match=words):
        peak_memory(**args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_step_splits_into_categories():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).cuda()
    x, y = torch.randn(8, 3, 64, 64, device="cuda"), torch.randint(0, 10, (8,), device="cuda")
    exact = peak_memory(model, x, y)
    _check_split(exact, model)
    assert exact["method"] == "cuda"
    with tritonact.approximate(model, bits=4):
        approx = peak_memory(model, x, y)
    _check_split(approx, model)
    assert approx["activations_after_forward"] < 0.5 * exact["activations_after_forward"]

"""The ring scheduler and buffers: slot counts, safety, lifecycle, and bitwise-identical results."""

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import tritonact
import tritonact.ring as ring_mod
from tritonact.ring import Ring


def run(model, x, y, **kw):
    with tritonact.approximate(model, bits=4, **kw) as ctx:
        out = model(x)
        F.cross_entropy(out, y).backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, ctx.report()


@pytest.mark.parametrize(
    "name,size",
    [("resnet18", 32), ("resnet50", 32), ("densenet121", 32), ("mobilenet_v2", 32), ("vgg11_bn", 32)],
)
def test_ring_on_and_off_are_bitwise_identical(name, size):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, num_classes=10)
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 3, size, size, generator=g), torch.randint(0, 10, (2,), generator=g)
    torch.manual_seed(2)  # dropout (vgg) draws the same masks in both runs
    out_on, grads_on, rep = run(model, x, y, ring=True)
    torch.manual_seed(2)
    out_off, grads_off, rep_off = run(other, x, y, ring=False)
    torch.testing.assert_close(out_on, out_off, rtol=0, atol=0)
    for n in grads_on:
        torch.testing.assert_close(grads_on[n], grads_off[n], rtol=0, atol=0, msg=n)
    assert rep.ring_slots >= 1 and "ring: off" in str(rep_off)


def test_slot_count_is_computed_from_liveness():
    torch.manual_seed(0)
    # resnet: the block input stays alive until the join while one branch activation is alive: 2 slots
    _, _, rep = run(
        torchvision.models.resnet18(num_classes=10), torch.randn(2, 3, 32, 32), torch.tensor([1, 2]), ring=True
    )
    assert rep.ring_slots == 2
    assert rep.ring_kept_out == []
    # a plain chain: each unit's output dies at the next conv, before the next unit writes: 1 slot
    chain = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )
    _, _, rep = run(chain, torch.randn(2, 3, 8, 8), torch.tensor([1, 2]), ring=True)
    assert rep.ring_slots == 1


def test_outputs_that_escape_are_kept_out_and_reported():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.bn2 = nn.BatchNorm2d(8)
            self.fc = nn.Linear(8 * 8 * 8, 10)

        def forward(self, x):
            a = F.relu(self.bn(self.conv(x)))  # read by flatten (a view): must not live in the ring
            b = torch.relu(self.bn2(self.conv(x)))  # a graph output
            return self.fc(torch.flatten(a, 1)), b

    net = Net()
    x = torch.randn(2, 3, 8, 8)
    with tritonact.approximate(net, bits=4, ring=True) as ctx:
        out, b = net(x)
        (F.cross_entropy(out, torch.tensor([1, 2])) + b.sum()).backward()
    kept = dict(ctx.report().ring_kept_out)
    assert "flatten" in kept["bn"] and "graph output" in kept["bn2"]
    assert ctx.report().ring_slots == 0
    ref = copy.deepcopy(net)
    ref.zero_grad()
    out2, b2 = ref(x)
    torch.testing.assert_close(b, b2, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("held_by", ["python", "autograd"])
def test_reusing_a_referenced_slot_fails_loudly(held_by):
    """Fault injection below the scheduler's rules: a slot handed out again while the tensor it held is still
    referenced (by user code, or saved by autograd) raises at once instead of being overwritten."""
    ring = Ring(1)
    w = torch.ones(4, requires_grad=True)
    a = ring.take(0, (4,), (0,), torch.float32, torch.device("cpu"))
    a.copy_(torch.arange(4.0))
    y = (a * w).sum()  # mul saves `a` for the gradient of w
    if held_by == "autograd":
        a = None  # only the saved tensor of the mul holds the slot now
    with pytest.raises(RuntimeError, match="ring slot 0 is handed out again"):
        ring.take(0, (4,), (0,), torch.float32, torch.device("cpu"))
    y.backward()
    assert torch.equal(w.grad, torch.arange(4.0))  # nothing was overwritten
    del y, a
    ring.take(0, (4,), (0,), torch.float32, torch.device("cpu"))  # free again once nothing refers to it


def test_a_scheduler_that_puts_an_escaping_output_in_the_ring_is_caught(monkeypatch):
    """Fault injection into the scheduler: every reader declared safe, so a unit output that the model returns
    gets a slot; the next forward, while the caller still holds that output, raises instead of overwriting it."""

    class Feats(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.conv2, self.bn2 = (
                nn.Conv2d(3, 8, 3),
                nn.BatchNorm2d(8),
                nn.Conv2d(8, 8, 1),
                nn.BatchNorm2d(8),
            )

        def forward(self, x):
            f = torch.relu(self.bn(self.conv(x)))
            return f, torch.relu(self.bn2(self.conv2(f)))

    monkeypatch.setattr(ring_mod, "reader_is_safe", lambda *a: None)
    model = Feats()
    x = torch.randn(2, 3, 8, 8)
    with tritonact.approximate(model, bits=4, ring=True) as ctx:
        assert ctx.report().ring_slots >= 1 and not ctx.report().ring_kept_out
        first, _ = model(x)
        with pytest.raises(RuntimeError, match="handed out again"):
            model(x)
        kept = first.clone()
    torch.testing.assert_close(first, kept)


def test_buffers_allocated_on_use_grown_and_released():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    with tritonact.approximate(model, bits=4, ring=True) as ctx:
        rep = ctx.report()
        assert rep.ring_bytes == 0  # nothing before the first forward
        F.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([1, 2])).backward()
        small = rep.ring_bytes
        # each of the 2 slots is sized for its largest occupant; the largest unit output with a slot is layer1's,
        # 2x64x8x8 fp32 (the stem's unit output lives inside tritonact::stem)
        largest = 2 * 64 * 8 * 8 * 4
        assert largest < small <= 2 * largest
        F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([1, 2, 3, 4])).backward()
        assert rep.ring_bytes == 2 * small
    assert rep.ring_bytes == 0  # released on exit


def test_auto_ring_is_off_on_cpu():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    with tritonact.approximate(model, bits=4) as ctx:
        F.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([1, 2])).backward()
        assert ctx.report().ring_bytes == 0

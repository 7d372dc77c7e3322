"""Gradient fidelity on real torchvision models: the numbers issue 3 asks for (randomly initialised resnet18 and
resnet50, 10 classes, 8 samples of 64x64, one step from the same weights and batch as exact training)."""

import pytest
import torch

from tritonact.fidelity import exact_run, grad_errors, rel_l2, summarize

torchvision = pytest.importorskip("torchvision")

pytestmark = pytest.mark.slow

# bits -> (max median error, max error) over all conv weight gradients
THRESHOLDS = {8: (0.02, 0.05), 4: (0.15, 0.26), 2: (0.45, 0.80)}
FORWARD_RTOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Single-threaded: these are many small ops, which a second (shared) core barely speeds up but a busy one
    slows down a lot (spinning OpenMP workers)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module", params=["resnet18", "resnet50"])
def case(request):
    """One model, batch and exact run per architecture, shared by every test of the module."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, request.param)(num_classes=10)
    x, target = torch.randn(8, 3, 64, 64), torch.randint(0, 10, (8,))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    exact = exact_run(model, x, target)
    n_convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    return request.param, model, x, target, exact, n_convs, {"state": state}


def _errors(case, bits, naive=False):
    arch, model, x, target, exact, _, cache = case
    if (bits, naive) not in cache:
        cache[(bits, naive)] = grad_errors(model, x, target, bits=bits, naive=naive, exact=exact)
    return cache[(bits, naive)]


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_forward_is_exact_and_conv_grad_errors_within_thresholds(case, bits):
    arch, *_, n_convs, _ = case
    errs = _errors(case, bits)
    assert errs.output_rel_diff <= FORWARD_RTOL, (arch, bits, errs.output_rel_diff)
    assert errs.loss_rel_diff <= FORWARD_RTOL, (arch, bits, errs.loss_rel_diff)
    assert len(errs) == n_convs  # every conv weight is measured
    s = summarize(errs)
    med_max, max_max = THRESHOLDS[bits]
    worst = max(errs, key=lambda t: t[2])
    assert s.median <= med_max, f"{arch} {bits}-bit median error {s.median:.4f} > {med_max}"
    assert s.max <= max_max, f"{arch} {bits}-bit max error {s.max:.4f} > {max_max} ({worst[0]})"


def test_naive_mode_is_worse(case):
    arch = case[0]
    naive, exact_fwd = summarize(_errors(case, 4, naive=True)), summarize(_errors(case, 4))
    assert naive.median > exact_fwd.median, (arch, naive, exact_fwd)
    assert _errors(case, 4, naive=True).output_rel_diff > FORWARD_RTOL  # the naive forward really is approximate


def test_exact_run_is_reproducible_and_leaves_model_untouched(case):
    arch, model, x, target, exact, _, cache = case
    errs = _errors(case, 8)
    assert [d for _, d, _ in errs] == list(range(len(errs)))  # depth = forward execution order
    # neither the exact nor the approximate runs touched the model: weights, buffers (BN statistics), grads
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in cache["state"].items())
    assert all(p.grad is None for p in model.parameters())
    again = exact_run(model, x, target)
    assert rel_l2(again.loss, exact.loss) == 0.0
    assert list(again.depth) == list(exact.depth)
    assert all(torch.equal(again.grads[k], exact.grads[k]) for k in exact.grads)

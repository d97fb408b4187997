"""The chunked vocabulary cross-entropy gives the plain computation's loss and gradients."""
import pytest
import torch
import torch.nn.functional as F

from model.losses import IGNORE, linear_cross_entropy, lm_loss


@pytest.mark.parametrize("chunk", [7, 64, 512])
def test_chunked_loss_and_gradients_equal_the_plain_ones(chunk):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(100, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (100,), generator=g)
    targets[::9] = IGNORE
    plain = F.cross_entropy(hidden @ weight.t(), targets, ignore_index=IGNORE)
    gh, gw = torch.autograd.grad(plain * 3.0, (hidden, weight))
    ours = linear_cross_entropy(hidden, weight, targets, chunk)
    oh, ow = torch.autograd.grad(ours * 3.0, (hidden, weight))
    assert torch.allclose(ours, plain, atol=1e-6)
    assert torch.allclose(oh, gh, atol=1e-6) and torch.allclose(ow, gw, atol=1e-6)


def test_evaluation_reports_accuracy_and_the_same_loss():
    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(2, 10, 8, generator=g), torch.randn(30, 8, generator=g)
    targets = (hidden @ weight.t()).argmax(-1)
    targets[0, :5] = 0
    with torch.no_grad():
        loss, stats = lm_loss(hidden, weight, targets)
    assert torch.allclose(loss, F.cross_entropy((hidden @ weight.t()).flatten(0, 1), targets.flatten()))
    assert 0.7 <= stats["accuracy"].item() < 1.0

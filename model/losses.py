"""Cross-entropy over a tied vocabulary projection, without materialising the (tokens x vocab) logits.

For next-token objectives the output projection is more than half of a small model's FLOPs and its
(tokens x vocab) logits, their log-softmax and its gradient are the largest tensors of a step.
`linear_cross_entropy` computes loss and gradients chunk by chunk in the forward pass (the
gradient of a mean cross-entropy is softmax - one-hot, known as soon as the logits are), so those
tensors exist one chunk at a time and are never stored for the backward pass. The matmuls are the
same three as the plain path; what goes is the memory traffic of the full-size intermediates.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100
CHUNK_ROWS = 512


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int):
        valid = targets != IGNORE
        n = valid.sum().clamp(min=1)
        loss = hidden.new_zeros((), dtype=torch.float32)
        grad_h = torch.empty_like(hidden)
        grad_w = torch.zeros_like(weight, dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk):
            h, t, ok = hidden[start:start + chunk], targets[start:start + chunk], valid[start:start + chunk]
            logp = torch.log_softmax((h @ weight.t()).float(), dim=-1)
            safe_t = t.clamp(min=0)
            loss -= (logp.gather(1, safe_t[:, None]).squeeze(1) * ok).sum()
            grad = logp.exp_()  # softmax, in place
            grad[torch.arange(len(t), device=t.device), safe_t] -= 1.0
            grad.mul_((ok / n)[:, None])
            grad = grad.to(hidden.dtype)
            grad_h[start:start + chunk] = grad @ weight
            grad_w.addmm_(grad.t().float(), h.float())
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return loss / n

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out, grad_w * grad_out, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk: int = CHUNK_ROWS) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `targets` (IGNORE positions left out).

    hidden: (N, d), weight: (V, d), targets: (N,). Falls back to the plain computation when no
    gradient is needed (evaluation) or under `torch.compile` (which fuses the plain path itself).
    """
    if not torch.is_grad_enabled() or not (hidden.requires_grad or weight.requires_grad) or torch.compiler.is_compiling():
        return F.cross_entropy((hidden @ weight.t()).float(), targets, ignore_index=IGNORE)
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk)


def lm_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Loss of a tied vocabulary head over (B, T, d) hidden states, and its token accuracy in evaluation.

    Training never builds the full logits (see `linear_cross_entropy`), so the accuracy, which needs
    them, is an evaluation statistic; the trainer logs statistics only from evaluation.
    """
    flat_h, flat_t = hidden.flatten(0, 1), targets.flatten()
    if torch.is_grad_enabled():
        return linear_cross_entropy(flat_h, weight, flat_t), {}
    logits = (flat_h @ weight.t()).float()
    valid = flat_t != IGNORE
    accuracy = (logits.argmax(-1) == flat_t)[valid].float().mean()
    return F.cross_entropy(logits, flat_t, ignore_index=IGNORE), {"accuracy": accuracy}

"""Comparing two models' next-token distributions, the way quantisations are judged."""

from __future__ import annotations

import torch


def compare_logits(reference: torch.Tensor, candidate: torch.Tensor) -> dict[str, float]:
    """Relative logit error, top-1 agreement and mean KL(reference || candidate) over all positions."""
    ref = reference.float().reshape(-1, reference.shape[-1])
    cand = candidate.float().reshape(-1, candidate.shape[-1])
    log_p = torch.log_softmax(ref, dim=-1)
    log_q = torch.log_softmax(cand, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return {
        "relative_error": float((cand - ref).norm() / ref.norm()),
        "top1_agreement": float((ref.argmax(-1) == cand.argmax(-1)).float().mean()),
        "mean_kl": float(kl.mean()),
        "max_kl": float(kl.max()),
        "positions": ref.shape[0],
    }

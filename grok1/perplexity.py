"""Perplexity of a model over a text, and its distance from a reference model (mean KL divergence
and top-1 agreement of the next-token distributions), the way quantisations are judged."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from .errors import Grok1Error
from .model import Grok1


def windows(ids: list[int], context: int) -> Iterator[list[int]]:
    """Non-overlapping windows of `context` tokens (the last one may be shorter, but has >= 2)."""
    for start in range(0, len(ids) - 1, context):
        chunk = ids[start : start + context]
        if len(chunk) >= 2:
            yield chunk


@torch.inference_mode()
def evaluate(model: Grok1, ids: list[int], context: int, reference: Grok1 | None = None) -> dict[str, float]:
    if len(ids) < 2:
        raise Grok1Error("the text is too short: perplexity needs at least 2 tokens")
    if context < 2:
        raise Grok1Error(f"--context must be at least 2, got {context}")
    context = min(context, model.config.sequence_len)
    nll = ref_nll = kl = 0.0
    agree = count = 0
    for chunk in windows(ids, context):
        tokens = torch.tensor([chunk])
        targets = tokens[0, 1:].to(model.device)
        log_probs = torch.log_softmax(model(tokens)[0, :-1].float(), dim=-1)
        nll -= float(log_probs.gather(-1, targets[:, None]).sum())
        if reference is not None:
            ref_log_probs = torch.log_softmax(reference(tokens)[0, :-1].float().to(log_probs.device), dim=-1)
            ref_nll -= float(ref_log_probs.gather(-1, targets[:, None]).sum())
            kl += float((ref_log_probs.exp() * (ref_log_probs - log_probs)).sum())
            agree += int((ref_log_probs.argmax(-1) == log_probs.argmax(-1)).sum())
        count += len(chunk) - 1
    result = {"tokens": count, "context": context, "perplexity": math.exp(nll / count)}
    if reference is not None:
        result.update(
            reference_perplexity=math.exp(ref_nll / count), mean_kl=kl / count, top1_agreement=agree / count
        )
    return result

"""int4 against int8: logit error, top-1 agreement and KL divergence on a synthetic mid-size model
(the `mid` preset), both on grok1's exact (fidelity) float32 path.

    python bench/quant_error.py [--workdir /tmp/grok1-bench]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import mid_models, save, table  # noqa: E402

import grok1  # noqa: E402
from grok1.config import PRESETS  # noqa: E402
from grok1.metrics import compare_logits  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default="/tmp/grok1-bench")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    config = PRESETS["mid"]
    release, paths = mid_models(args.workdir)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, config.vocab_size, (args.prompts, args.tokens), generator=gen)
    logits = {}
    for quant, path in paths.items():
        model = grok1.load(path, dtype="float32")
        with torch.no_grad():
            logits[quant] = torch.cat([model(tokens[i : i + 1]) for i in range(args.prompts)])
        del model
    figures = compare_logits(logits["int8"], logits["int4"])
    # Yardsticks: the weights' own error, and how far bf16 activations alone move this model.
    m8, m4 = grok1.load(paths["int8"], dtype="float32"), grok1.load(paths["int4"], dtype="float32")
    weight_errors = []
    for (_, w8), (_, w4) in zip(m8.named_official_weights(), m4.named_official_weights(), strict=True):
        if hasattr(w4, "packed"):
            experts = range(w8.qweight.shape[0]) if w8.qweight.dim() == 4 else [None]
            for e in experts:
                a, b = w8.dequantize(e).float(), w4.dequantize(e).float()
                weight_errors.append(float((a - b).norm() / a.norm()))
    m8.activation_dtype = torch.bfloat16
    with torch.no_grad():
        bf16 = torch.cat([m8(tokens[i : i + 1]) for i in range(args.prompts)])
    yardstick = compare_logits(logits["int8"], bf16)
    figures["weight_relative_error_mean"] = sum(weight_errors) / len(weight_errors)
    figures["int8_f32_vs_bf16_activations"] = yardstick
    # The fast path (bfloat16 activations, weight-only kernels) against the fidelity path (float32):
    # whole prompts (prefill kernels), and token by token through the decode kernels (first prompt).
    fast_rows = []
    for quant, path in paths.items():
        fast = grok1.load(path)
        with torch.no_grad():
            whole = torch.cat([fast(tokens[i : i + 1]) for i in range(args.prompts)])
            cache = fast.new_cache(1, args.tokens)
            steps = torch.cat([fast(tokens[:1, i : i + 1], cache, torch.tensor([i])) for i in range(args.tokens)], dim=1)
        figures[f"fast_{quant}_vs_fidelity_int8"] = compare_logits(logits["int8"], whole)
        figures[f"fast_{quant}_decode_vs_fidelity_int8"] = compare_logits(logits["int8"][0], steps[0])
        for label, key in (("whole prompts", f"fast_{quant}_vs_fidelity_int8"),
                           ("decoded token by token", f"fast_{quant}_decode_vs_fidelity_int8")):
            f = figures[key]
            fast_rows.append((f"fast {quant} (bf16) vs fidelity int8 (f32), {label}",
                              f"rel {f['relative_error']:.4f}, top-1 {100 * f['top1_agreement']:.1f} %, KL {f['mean_kl']:.4f}"))
        del fast
    rows = [
        ("model", f"mid preset (emb {config.emb_size}, {config.num_layers} layers, 8 experts of {config.ffn_size}), random weights"),
        ("positions compared", f"{figures['positions']} ({args.prompts} x {args.tokens} random tokens), float32 path"),
        ("relative logit error int4 vs int8", f"{figures['relative_error']:.4f}"),
        ("top-1 agreement", f"{100 * figures['top1_agreement']:.1f} %"),
        ("mean KL(int8 || int4)", f"{figures['mean_kl']:.4f} nats"),
        ("weights: mean relative error int4 vs int8", f"{figures['weight_relative_error_mean']:.4f} per matrix"),
        ("yardstick: int8 float32 vs bfloat16 activations",
         f"rel {yardstick['relative_error']:.4f}, top-1 {100 * yardstick['top1_agreement']:.1f} %, "
         f"KL {yardstick['mean_kl']:.4f} (random weights are far more sensitive than trained ones)"),
        *fast_rows,
    ]
    print(table(rows, "int4 (groups of 32, bf16 scales) against the release's int8"))
    print(f"wrote {save('quant_error', {'config': 'mid', **figures})}")


if __name__ == "__main__":
    main()

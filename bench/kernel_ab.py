"""Two versions of grok1's CPU kernels (grok1/csrc/cpu_kernels.cpp) on the same decode steps,
interleaved in one process so that both see the same machine: the way kernel changes are judged on
a shared machine whose speed drifts by more than the changes.

    python bench/kernel_ab.py OLD.cpp NEW.cpp [--model /tmp/grok1-bench/mid-int4] [--head int4]

(e.g. OLD.cpp from `git show HEAD~1:grok1/csrc/cpu_kernels.cpp > /tmp/old.cpp`). Prints the best
decode-step time of each over --rounds rounds of --steps steps, and writes bench/results/kernel_ab.json.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import mid_models, save, table  # noqa: E402

import grok1  # noqa: E402
from grok1 import kernels  # noqa: E402


def build(source: str) -> object:
    from torch.utils.cpp_extension import load

    digest = hashlib.sha256(open(source, "rb").read()).hexdigest()[:12]
    return load(name=f"grok1_kernels_ab_{digest}", sources=[source], extra_cflags=kernels.compile_flags())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--model", help="native model (default: the mid preset, int4)")
    parser.add_argument("--head", default="int4")
    parser.add_argument("--workdir", default="/tmp/grok1-bench")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=48)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = args.model or mid_models(args.workdir)[1]["int4"]
    builds = {"A": build(args.a), "B": build(args.b)}
    model = grok1.load(path, head=args.head)
    prompt = torch.randint(3, model.config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0))
    best = {"A": float("inf"), "B": float("inf")}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for name, module in builds.items():
                kernels._module = module
                cache = model.new_cache(1, prompt.shape[1] + args.steps + 1)
                logits = model(prompt, cache, torch.tensor([0]), logits_index=torch.tensor([prompt.shape[1] - 1]))
                token = logits[:, -1].argmax(-1, keepdim=True)
                started = time.perf_counter()
                for i in range(args.steps):
                    logits = model(token, cache, torch.tensor([prompt.shape[1] + i]))
                    token = logits[:, -1].argmax(-1, keepdim=True)
                best[name] = min(best[name], (time.perf_counter() - started) / args.steps)
    rows = [(f"{name}: {source}", f"{best[name] * 1e3:.3f} ms per decode step ({1 / best[name]:.1f} tok/s)")
            for name, source in (("A", args.a), ("B", args.b))]
    rows.append(("B / A", f"{best['B'] / best['A']:.3f} of the time"))
    print(table(rows, f"kernel A/B on {os.path.basename(path)}, {args.head} head, best of {args.rounds} x {args.steps} steps"))
    print(f"wrote {save('kernel_ab', {'a': args.a, 'b': args.b, 'model': path, 'head': args.head, 'best_step_s': best})}")


if __name__ == "__main__":
    main()

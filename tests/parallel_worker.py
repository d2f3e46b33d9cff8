"""One rank of the multi-process checks in test_parallel.py (launched by torchrun, gloo on CPU).

    torchrun --nproc-per-node N tests/parallel_worker.py OUT FIXTURE SECOND [SECOND_INT4]

Every rank loads its part of each model and runs the same inputs; rank 0 writes the logits,
greedy continuations and every rank's weight bytes to OUT/results.npz and OUT/results.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

import grok1
from grok1 import parallel
from grok1.errors import CheckpointError, Grok1Error

SECOND_PROMPTS = [[17, 99, 3, 201, 45], [5, 6]]
SECOND_NEW_TOKENS = 16


def second_tokens() -> torch.Tensor:
    tokens = torch.randint(1, 250, (2, 24), generator=torch.Generator().manual_seed(5))
    tokens[1, :3] = 0  # a left-padded row
    return tokens


def main() -> None:
    out_dir, fixture, second = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    second_int4 = sys.argv[4] if len(sys.argv) > 4 else None
    torch.set_num_threads(1)
    group = parallel.init("cpu")
    arrays: dict[str, np.ndarray] = {}
    report: dict = {"world_size": group.world_size}

    cases = json.loads((Path(fixture) / "cases.json").read_text())["cases"]
    npz = np.load(Path(fixture) / "cases.npz")
    greedy = json.loads((Path(fixture) / "greedy.json").read_text())

    def logits(model, tokens) -> np.ndarray:
        with torch.no_grad():
            return model(tokens).numpy()

    def bytes_per_rank(model) -> list[int]:
        held = [None] * group.world_size
        torch.distributed.all_gather_object(held, parallel.weight_bytes(model))
        return held

    for dtype, exact in (("float32", False), ("bfloat16", True), ("bfloat16", False)):
        model = parallel.load(fixture, group, dtype=dtype, exact=exact)
        tag = dtype if dtype == "float32" else ("bf16_exact" if exact else "bf16_fast")
        for case in cases:
            tokens = torch.from_numpy(npz[case["tokens_key"]].astype(np.int64))
            arrays[f"fixture_{tag}__{case['name']}"] = logits(model, tokens)
        if dtype == "float32":
            report["fixture_greedy"] = [
                grok1.generate(model, prompt, max_new_tokens=greedy["num_new_tokens"], temperature=0, ignore_eos=True)
                for prompt in greedy["prompts"]
            ]
            report["fixture_bytes"] = bytes_per_rank(model)
            report["placement"] = [None] * group.world_size
            torch.distributed.all_gather_object(report["placement"], model.placement.describe())

    for name, path in (("second", second), ("second_int4", second_int4)):
        if path is None:
            continue
        model = parallel.load(path, group, dtype="float32")
        arrays[f"{name}__logits"] = logits(model, second_tokens())
        report[f"{name}_greedy"] = [
            grok1.generate(model, prompt, max_new_tokens=SECOND_NEW_TOKENS, temperature=0, ignore_eos=True)
            for prompt in SECOND_PROMPTS
        ]
        report[f"{name}_bytes"] = bytes_per_rank(model)

    # A load error on one rank only: it raises its own error, the others an error naming that rank.
    def broken(*args, **kwargs):
        raise CheckpointError("a file only rank 1 reads is broken")

    reader = parallel._load_release
    if group.rank == 1:
        parallel._load_release = broken
    try:
        parallel.load(fixture, group)
        outcome = "loaded"
    except Grok1Error as exc:
        outcome = f"{type(exc).__name__} (rank {getattr(exc, 'rank', None)}): {exc}"
    finally:
        parallel._load_release = reader
    report["one_rank_fails"] = [None] * group.world_size
    torch.distributed.all_gather_object(report["one_rank_fails"], outcome)

    if group.rank == 0:
        np.savez(out_dir / "results.npz", **arrays)
        (out_dir / "results.json").write_text(json.dumps(report))
    parallel.shutdown()


if __name__ == "__main__":
    main()

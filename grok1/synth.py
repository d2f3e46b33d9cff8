"""Synthetic Grok-1 checkpoints in the release layout (random weights at a realistic scale), and the
small tokenizer the demo uses.

The weights are drawn so that a model of any width behaves like a trained one in the ways that
matter for testing the engine: logits with a standard deviation of a few units, a few attention
heads whose logits reach the 30 soft-cap, and routers that prefer some experts without being
one-hot. They are quantised like the release (int8 per output column, 8 row blocks for the
row-parallel matrices, bf16 scales) and written in the release's exact pickle layout.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Callable

import torch
from tqdm import tqdm

from .config import Grok1Config
from .errors import Grok1Error
from .formats import xai
from .model import ParamSpec
from .quant import Int8Weight, quantize_int8

# Query heads scaled up so that their attention logits exceed the soft-cap (head -> factor).
LOUD_QUERY_HEADS = {0: 4.0, 1: 3.0, 5: 2.0}
REFERENCE_WIDTH = 128  # the width at which the base standard deviations below were tuned


def _draw(spec: ParamSpec, config: Grok1Config, gen: torch.Generator, expert: int | None = None) -> torch.Tensor:
    """float32 master weights for one parameter (one expert's slice when `expert` is given)."""
    d, f = config.emb_size, config.ffn_size
    width = math.sqrt(REFERENCE_WIDTH / d)  # keeps dot products over D at the reference scale
    # Layer parameters are named by their path inside the layer ("moe/linear/w", "router/w", ...).
    kind = spec.path.split("/", 2)[2] if spec.path.startswith("transformer/") else spec.path
    shape = spec.shape[1:] if expert is not None else spec.shape

    def normal(std: float) -> torch.Tensor:
        return torch.randn(shape, generator=gen) * std

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(shape, generator=gen) * (hi - lo) + lo

    if kind == "language_model/in_out_embed/embeddings":
        return normal(0.0115 * width)
    if kind == "language_model/rms_norm/scale":
        return uniform(20.0, 40.0)
    if kind in ("rms_norm/scale", "rms_norm_2/scale"):
        return uniform(0.5, 1.5)
    if kind in ("rms_norm_1/scale", "rms_norm_3/scale"):
        return uniform(1.5, 3.5)
    if kind == "router/w":
        return normal(0.12 * width)
    if kind == "multi_head_attention/query/w":
        w = normal(0.18 * width).view(d, config.num_q_heads, config.key_size)
        for head, factor in LOUD_QUERY_HEADS.items():
            if head < config.num_q_heads:
                w[:, head] *= factor
        return w.reshape(shape)
    if kind == "multi_head_attention/key/w":
        return normal(0.18 * width)
    if kind == "multi_head_attention/value/w":
        return normal(0.09 * width)
    if kind == "multi_head_attention/linear/w":
        return normal(1.0 / math.sqrt(config.q_proj_size))
    if kind in ("moe/linear/w", "moe/linear_v/w"):
        return normal(1.0 / math.sqrt(d))
    if kind == "moe/linear_1/w":
        return normal(1.0 / math.sqrt(f))
    raise AssertionError(f"no initialiser for {spec.path}")


def synth_tensor(spec: ParamSpec, config: Grok1Config, gen: torch.Generator) -> torch.Tensor | Int8Weight:
    if not spec.quantised:
        return _draw(spec, config, gen)
    blocks = xai.RELEASE_ROW_BLOCKS if spec.row_parallel else 1
    if len(spec.shape) == 3:  # an expert stack: draw and quantise one expert at a time
        parts = [quantize_int8(_draw(spec, config, gen, expert=e), blocks) for e in range(spec.shape[0])]
        return Int8Weight.from_release(torch.stack([q for q, _ in parts]), torch.stack([s for _, s in parts]))
    return Int8Weight.from_release(*quantize_int8(_draw(spec, config, gen), blocks))


def check_writable_config(config: Grok1Config) -> None:
    blocks = xai.RELEASE_ROW_BLOCKS
    for field_name, size in (("num_q_heads * key_size", config.q_proj_size), ("ffn_size", config.ffn_size)):
        if size % blocks:
            raise Grok1Error(
                f"{field_name} = {size} is not a multiple of {blocks}: the release layout splits the row-parallel "
                f"matrices into {blocks} scale blocks"
            )


def prepare_destination(dst: str, force: bool) -> None:
    if os.path.exists(dst):
        if not os.path.isdir(dst):
            raise Grok1Error(f"{dst}: exists and is not a directory")
        if os.listdir(dst) and not force:
            raise Grok1Error(f"{dst}: already exists and is not empty (use --force to replace it)")


def commit_directory(tmp: str, dst: str) -> None:
    """Moves a finished temporary directory into place, replacing what was there."""
    if os.path.exists(dst):
        old = dst.rstrip(os.sep) + ".old-" + os.path.basename(tmp)
        os.rename(dst, old)
        os.rename(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, dst)


def write_release(
    dst: str | os.PathLike[str],
    config: Grok1Config,
    *,
    seed: int = 0,
    tokenizer: str | None = None,
    force: bool = False,
    progress: bool = True,
    tensor_fn: Callable[[ParamSpec], torch.Tensor | Int8Weight] | None = None,
) -> str:
    """Writes `dst/config.json` and `dst/ckpt-0/` in the release layout; returns dst.

    Everything is written to a temporary sibling directory that is renamed into place only when
    complete, so an interrupted run never leaves something that looks like a model.
    """
    dst = os.fspath(dst)
    check_writable_config(config)
    prepare_destination(dst, force)
    parent = os.path.dirname(os.path.abspath(dst))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".grok1-synth-", dir=parent)
    try:
        ckpt = os.path.join(tmp, xai.CHECKPOINT_SUBDIR)
        os.makedirs(ckpt)
        gen = torch.Generator().manual_seed(seed)
        order = xai.release_order(config)
        total = sum(_file_bytes(s) for s in order)
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"writing {os.path.basename(dst)}", disable=not progress) as bar:
            for index, spec in enumerate(order):
                value = tensor_fn(spec) if tensor_fn is not None else synth_tensor(spec, config, gen)
                with open(os.path.join(ckpt, xai.tensor_filename(index)), "wb") as fh:
                    xai.write_tensor_file(fh, value)
                bar.update(_file_bytes(spec))
        config.save(os.path.join(tmp, "config.json"))
        if tokenizer is not None:
            shutil.copyfile(tokenizer, os.path.join(tmp, "tokenizer.model"))
        commit_directory(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _file_bytes(spec: ParamSpec) -> int:
    n = math.prod(spec.shape)
    if not spec.quantised:
        return 4 * n
    return n + 2 * math.prod(xai.scales_shape(spec))


def train_demo_tokenizer(out_dir: str, vocab_size: int = 512) -> str:
    """A small byte-fallback BPE SentencePiece model with Grok-1's special ids (pad 0, bos 1, eos 2,
    unk 3), trained on a text shipped with the package. Returns the path of tokenizer.model."""
    import sentencepiece as spm

    corpus_file = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "demo_corpus.txt")
    with open(corpus_file, encoding="utf-8") as fh:
        corpus = fh.read()
    os.makedirs(out_dir, exist_ok=True)
    prefix = os.path.join(out_dir, "tokenizer")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus.splitlines()),
        model_prefix=prefix,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        character_coverage=1.0,
        pad_id=0,
        bos_id=1,
        eos_id=2,
        unk_id=3,
        pad_piece="[PAD]",
        bos_piece="[BOS]",
        eos_piece="[EOS]",
        unk_piece="[UNK]",
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    os.remove(prefix + ".vocab")
    return prefix + ".model"


def random_model(config: Grok1Config, *, seed: int = 0, dtype: torch.dtype = torch.bfloat16):
    """An in-memory model with the same weights `write_release(..., seed=seed)` would write."""
    from .model import Grok1

    check_writable_config(config)
    gen = torch.Generator().manual_seed(seed)
    model = Grok1(config, activation_dtype=dtype)
    for spec in xai.release_order(config):
        model.set_weight(spec.path, synth_tensor(spec, config, gen))
    if dtype == torch.bfloat16:
        model.embeddings = model.embeddings.to(torch.bfloat16)
    return model.eval()

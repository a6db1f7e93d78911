"""Model transforms of ``torchkvq eval``: KV-head merging (``heads-K``, ``heads-K+<cache>``).

A method named ``heads-K`` runs the full-precision cache on a copy of the model whose KV heads
were merged into ``K`` per layer by :func:`torchkvq.heads.compress` (calibrated on activations);
``heads-K+kivi-4`` runs a cache policy on that copy. Every score is still taken against the
*original* model's full-precision cache, so KL and top-1 measure the merge and the cache
together.

The calibration tokens never overlap the evaluated ones: they are Wikipedia tokens placed right
after the evaluated windows (or right before them when the text is too short after), and any
Wikipedia tokens when the evaluation reads the long text.
"""

from __future__ import annotations

import copy
import re

import torch

from . import corpus

__all__ = ["HEADS_PATTERN", "heads_spec", "calibration_window", "merged_models"]

#: ``heads-K`` or ``heads-K+<cache method>``
HEADS_PATTERN = re.compile(r"^heads-(\d+)(?:\+(.+))?$")


def heads_spec(name: str) -> tuple[int, str | None] | None:
    """``(K, cache method or None)`` of a ``heads-K[+method]`` name; ``None`` for other names."""
    m = HEADS_PATTERN.match(name)
    if m is None:
        return None
    return int(m[1]), m[2]


def calibration_window(total_tokens: int, n_tokens: int, eval_text: str, eval_start: int,
                       eval_stop: int) -> int:
    """Token offset of ``n_tokens`` calibration tokens of the Wikipedia corpus (``total_tokens``
    long) that do not overlap evaluation tokens ``[eval_start, eval_stop)`` of ``eval_text``
    (``"wiki"`` or ``"long"``). Raises ``ValueError`` when no disjoint window fits."""
    if eval_text != "wiki":
        start = 0
    elif eval_stop + n_tokens <= total_tokens:
        start = eval_stop
    elif n_tokens <= eval_start:
        start = eval_start - n_tokens
    else:
        raise ValueError(f"no {n_tokens} Wikipedia calibration tokens fit outside the evaluated tokens "
                         f"[{eval_start}, {eval_stop}) of {total_tokens}; lower --heads-calibration-tokens")
    if start + n_tokens > total_tokens:
        raise ValueError(f"the Wikipedia corpus has {total_tokens} tokens, fewer than "
                         f"--heads-calibration-tokens={n_tokens}")
    return start


def merged_models(model, kv_heads: set[int], calibration: torch.Tensor, progress: bool = True,
                  **compress_kwargs) -> dict[int, torch.nn.Module]:
    """A merged copy of ``model`` per KV-head count (the original untouched), each calibrated
    on ``calibration [n, T]`` token ids; ``compress_kwargs`` go to :func:`torchkvq.heads.compress`."""
    from ..heads import compress

    out = {}
    for k in sorted(kv_heads):
        out[k] = compress(copy.deepcopy(model), calibration, kv_heads=k, progress=progress, **compress_kwargs)
    return out


def calibration_tokens(tokenizer, n_tokens: int, seq_len: int, eval_text: str, eval_start: int,
                       eval_stop: int) -> tuple[torch.Tensor, int]:
    """``([n, seq_len] calibration token ids, their offset in the Wikipedia corpus)``, disjoint
    from the evaluated tokens (see :func:`calibration_window`)."""
    text = corpus.wiki_corpus_text()
    total = len(corpus.tokenize(tokenizer, text))
    seq_len = min(seq_len, n_tokens)
    n = max(1, n_tokens // seq_len)
    start = calibration_window(total, n * seq_len, eval_text, eval_start, eval_stop)
    return corpus.token_sequences(tokenizer, text, n, seq_len, start), start

"""The streaming evaluation protocol of the project (see docs/results.md).

Quantizing history matters during generation, so the model reads each sequence the way
generation uses the cache: a prompt of P tokens is prefilled, then the rest arrives in chunks of
C tokens, each attending to the (compressed) history. Every token after the prompt is scored.
Per method and sequence we keep the log-probabilities' agreement with the full-precision
cache, which is run on the same tokens first.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field

import torch

from .methods import Method


@dataclass
class SequenceScore:
    """Sums over the scored tokens of one sequence (divide by ``tokens`` for means)."""

    tokens: int = 0
    nll: float = 0.0
    kl: float = 0.0
    top1_agree: int = 0
    cache_bytes: int = 0
    cache_bytes_in_use: int = 0
    cached_tokens: int = 0


@dataclass
class MethodResult:
    method: Method
    scores: list[SequenceScore] = field(default_factory=list)
    decode_tokens_per_s: float | None = None
    decode_peak_rss_mib: float | None = None
    decode_cache_bytes: int | None = None

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.scores)

    @property
    def perplexity(self) -> float:
        return float(torch.tensor(sum(s.nll for s in self.scores) / self.tokens).exp())

    @property
    def mean_kl(self) -> float:
        return sum(s.kl for s in self.scores) / self.tokens

    @property
    def top1_agreement(self) -> float:
        return sum(s.top1_agree for s in self.scores) / self.tokens

    @property
    def bytes_per_token(self) -> float:
        """Bytes the cache holds (reserved capacity included) per cached token."""
        return sum(s.cache_bytes for s in self.scores) / sum(s.cached_tokens for s in self.scores)

    @property
    def bytes_in_use_per_token(self) -> float:
        """Bytes that hold data (reserved capacity left out) per cached token."""
        return sum(s.cache_bytes_in_use for s in self.scores) / sum(s.cached_tokens for s in self.scores)


@torch.inference_mode()
def stream_logprobs(model, ids: torch.Tensor, cache, prompt: int, chunk: int) -> torch.Tensor:
    """Log-probabilities ``[n - prompt, vocab]`` predicting tokens ``ids[prompt:]`` (``ids`` is
    ``[1, n]``), reading the prompt at once and the rest in chunks through `cache`."""
    n = ids.shape[1]
    out = model(ids[:, :prompt], past_key_values=cache, use_cache=True)
    logits = [out.logits[:, -1:].float()]
    for start in range(prompt, n - 1, chunk):
        stop = min(start + chunk, n - 1)
        out = model(ids[:, start:stop], past_key_values=cache, use_cache=True)
        logits.append(out.logits.float())
    return torch.log_softmax(torch.cat(logits, dim=1)[0], dim=-1)


def score(logprobs: torch.Tensor, reference: torch.Tensor, targets: torch.Tensor) -> SequenceScore:
    """Compare a method's log-probabilities with the full-precision cache's on the same tokens."""
    nll = -logprobs.gather(-1, targets[:, None]).sum()
    kl = (reference.exp() * (reference - logprobs)).sum(-1).clamp_min(0).sum()
    agree = (logprobs.argmax(-1) == reference.argmax(-1)).sum()
    return SequenceScore(tokens=targets.numel(), nll=float(nll), kl=float(kl), top1_agree=int(agree))


def _reset_peak_rss() -> bool:
    try:  # Linux: writing 5 resets the process's peak resident set size (VmHWM)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mib() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


@torch.inference_mode()
def decode_speed(model, method: Method, ids: torch.Tensor, new_tokens: int) -> tuple[float, float | None, int]:
    """Greedy decoding of `new_tokens` one at a time after prefilling ``ids [1, n]``.

    Returns (tokens/s: the inverse of the median decode step, so that one stall of the machine
    does not move the figure; peak RSS in MiB during decoding or None where the OS cannot tell;
    bytes the cache holds at the end).
    """
    if new_tokens < 1:
        raise ValueError(f"decode_speed: new_tokens must be >= 1, got {new_tokens}")
    cache = method.make_cache(model)
    out = model(ids, past_key_values=cache, use_cache=True)
    token = out.logits[:, -1:].argmax(-1)
    can_peak = _reset_peak_rss()
    steps = []
    for _ in range(new_tokens):
        start = time.perf_counter()
        out = model(token, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        steps.append(time.perf_counter() - start)
    peak = _peak_rss_mib() if can_peak else None
    return 1.0 / statistics.median(steps), peak, method.nbytes(cache)


def evaluate(model, methods: list[Method], sequences: torch.Tensor, prompt: int, chunk: int,
             progress=None, models: dict | None = None) -> dict[str, MethodResult]:
    """Run every method over every sequence ``[n_seqs, n]``; the first method is the baseline.
    ``models`` maps a method name to the model it runs on instead of ``model`` (model
    transforms, e.g. merged KV heads); scores stay relative to the baseline on ``model``."""
    results = {m.name: MethodResult(m) for m in methods}
    models = models or {}
    for seq in sequences:
        ids = seq[None]
        targets = seq[prompt:]
        reference = None
        for m in methods:
            mdl = models.get(m.name, model)
            cache = m.make_cache(mdl)
            lp = stream_logprobs(mdl, ids, cache, prompt, chunk)
            if reference is None:
                reference = lp
            s = score(lp, reference, targets)
            s.cache_bytes, s.cache_bytes_in_use = m.nbytes(cache), m.bytes_in_use(cache)
            s.cached_tokens = ids.shape[1] - 1
            results[m.name].scores.append(s)
            if progress is not None:
                progress.update(1)
    return results


def machine_info() -> dict:
    """CPU model, cores and versions, recorded next to every figure."""
    import platform

    import torchkvq

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "torchkvq": torchkvq.__version__,
            "python": platform.python_version()}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info

"""Calibration statistics for KV-head merging.

The key, value and query projections of a Llama-family attention layer all read the same
input ``x`` (the normed hidden state). Every second moment the merge needs — of the keys,
values and queries the projections produce — is a quadratic form of the input's second moment:
``E[(W x + b)(W x + b)^T] = W~ E[x~ x~^T] W~^T`` with ``x~ = [x, 1]`` and ``W~ = [W, b]``.
So one forward pre-hook on each layer's ``k_proj`` accumulating ``sum x~ x~^T`` is exactly
equivalent to collecting the projections' outputs (pre-RoPE keys and values, pre-RoPE
queries), at a fraction of the memory, and one calibration pass serves every group, every
target head count and every weighting.

``init="weights"`` uses the identity in place of ``E[x x^T]`` (and no bias term): the same
construction then becomes a PCA of the weight matrices themselves.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

__all__ = ["attention_modules", "augmented_moment", "calibration_token_ids", "collect_input_moments",
           "output_sensitivities"]


def attention_modules(model) -> list[torch.nn.Module]:
    """The model's attention modules (those with ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``
    and ``head_dim``), in layer order."""
    mods = [m for m in model.modules()
            if all(hasattr(m, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim"))]
    if not mods:
        raise ValueError(f"{type(model).__name__} has no Llama-style attention modules "
                         "(q_proj/k_proj/v_proj/o_proj + head_dim)")
    return mods


def calibration_token_ids(data, tokenizer=None, seq_len: int = 512) -> list[torch.Tensor]:
    """Calibration sequences as a list of ``[B, T]`` int64 tensors.

    ``data`` may be a string or a list of strings (tokenized with ``tokenizer`` without
    special tokens, concatenated with blank lines and cut into windows of ``seq_len`` tokens;
    the remainder becomes a last, shorter window), a 1-D or 2-D tensor of token ids, or a list
    of token-id lists / 1-D tensors (each one sequence).
    """
    if isinstance(data, torch.Tensor):
        if data.dim() == 1:
            data = data[None]
        if data.dim() != 2 or data.is_floating_point():
            raise ValueError(f"token ids must be an integer [T] or [B, T] tensor, got {tuple(data.shape)}")
        return [data.long()]
    if isinstance(data, str):
        data = [data]
    if not isinstance(data, Sequence) or len(data) == 0:
        raise ValueError("calibration data must be text(s) or token ids, and not empty")
    if all(isinstance(t, str) for t in data):
        if tokenizer is None:
            raise ValueError("calibration texts need a tokenizer (pass tokenizer=...), or pass token ids")
        ids = list(tokenizer("\n\n".join(data), add_special_tokens=False)["input_ids"])
        if not ids:
            raise ValueError("calibration text tokenizes to nothing")
        full = len(ids) // seq_len * seq_len
        out = []
        if full:
            out.append(torch.tensor(ids[:full], dtype=torch.long).view(-1, seq_len))
        if full < len(ids):
            out.append(torch.tensor(ids[full:], dtype=torch.long)[None])
        return out
    return [torch.as_tensor(list(s) if not isinstance(s, torch.Tensor) else s, dtype=torch.long).reshape(1, -1)
            for s in data]


def first_output(out) -> torch.Tensor:
    """A module's output tensor: transformers' attention and decoder layers return tuples whose
    first element is the hidden states (older versions), or the tensor itself."""
    return out[0] if isinstance(out, tuple) else out


def augmented_moment(x: torch.Tensor) -> torch.Tensor:
    """``sum x~ x~^T`` over the rows of ``x [..., hidden]`` with ``x~ = [x, 1]``: float64
    ``[hidden+1, hidden+1]`` on the CPU (the product itself in float32, as every figure in
    docs/heads.md was computed)."""
    x = x.detach().reshape(-1, x.shape[-1]).float()
    xa = torch.cat([x, torch.ones_like(x[:, :1])], 1)
    return (xa.T @ xa).to(torch.float64).cpu()


@torch.inference_mode()
def collect_input_moments(model, batches: Iterable[torch.Tensor], batch_size: int = 1,
                          progress: bool = True) -> tuple[list[torch.Tensor], int]:
    """Run ``model`` over ``batches`` (``[B, T]`` token ids) and return, per attention layer,
    ``sum x~ x~^T`` (float64, ``[hidden+1, hidden+1]``, ``x~ = [x, 1]``) over every token's
    attention input, and the number of tokens."""
    from tqdm.auto import tqdm

    mods = attention_modules(model)
    hidden = mods[0].k_proj.in_features
    moments = [torch.zeros(hidden + 1, hidden + 1, dtype=torch.float64) for _ in mods]
    device = next(model.parameters()).device

    def hook_for(i):
        def hook(_module, args, kwargs=None):
            moments[i] += augmented_moment(args[0] if args else kwargs["input"])
        return hook

    handles = [m.k_proj.register_forward_pre_hook(hook_for(i)) for i, m in enumerate(mods)]
    was_training = model.training
    model.eval()
    rows = [b[j:j + batch_size] for b in batches for j in range(0, b.shape[0], batch_size)]
    tokens = 0
    try:
        for ids in tqdm(rows, desc="calibration", unit="batch", disable=not progress):
            model(ids.to(device), use_cache=False)
            tokens += ids.numel()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if tokens == 0:
        raise ValueError("no calibration tokens")
    return moments, tokens


def output_sensitivities(model, batches: Sequence[torch.Tensor], progress: bool = True) -> list[list[torch.Tensor]]:
    """How much each attention layer's output matters to the model's next-token loss.

    For every ``[B, T]`` batch of token ids, one forward and backward pass of ``model`` (its
    parameters untouched, no parameter gradients) gives ``g = dL/da`` for each layer's attention
    output ``a`` (``L``: the summed next-token cross-entropy of the batch). Returns, per layer
    and per batch, ``g**2`` (float32, ``[B, T, hidden]``): the diagonal of the empirical Fisher
    per token, so that ``sum g**2 * (a' - a)**2`` is a second-order estimate of what changing
    ``a`` to ``a'`` costs the loss (BRECQ's Fisher-weighted reconstruction).
    """
    from tqdm.auto import tqdm

    mods = attention_modules(model)
    sens: list[list[torch.Tensor]] = [[] for _ in mods]
    device = next(model.parameters()).device

    def hook_for(i):
        def hook(_m, _args, out):
            first_output(out).register_hook(lambda g: sens[i].append(g.detach().float().square().cpu()))
        return hook

    def leaf(_m, _args, out):  # gradients flow from the embeddings on, not into any parameter
        return out.detach().requires_grad_(True)

    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    handles = [m.register_forward_hook(hook_for(i)) for i, m in enumerate(mods)]
    handles.append(model.get_input_embeddings().register_forward_hook(leaf))
    was_training = model.training
    model.eval()
    try:
        for p in params:
            p.requires_grad_(False)
        with torch.enable_grad():
            for ids in tqdm(batches, desc="output sensitivities", unit="batch", disable=not progress):
                ids = ids.to(device)
                logits = model(ids, use_cache=False).logits
                torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1),
                    reduction="sum").backward()
    finally:
        for h in handles:
            h.remove()
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        model.train(was_training)
    return sens

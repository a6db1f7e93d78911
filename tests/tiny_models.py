"""A tiny random Llama for fast integration tests (no weights on disk, no network).

hidden 64, 4 query heads, 2 KV heads (GQA 2:1), head_dim 16, 2 layers, vocab 128. Weights are
drawn from a seeded generator with a larger init range than transformers' default (0.02), so
attention is not uniform and greedy decoding has clear winners: quantization errors then show
up in the logits instead of being drowned by an almost flat model.
"""

from __future__ import annotations

import torch

PAD, BOS, EOS = 0, 1, 2
VOCAB = 128


def tiny_config(**overrides):
    from transformers import LlamaConfig

    kw = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
        rms_norm_eps=1e-6, initializer_range=0.08, tie_word_embeddings=False,
        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def tiny_model(seed: int = 0, **overrides):
    """A fresh fp32 ``LlamaForCausalLM`` in eval mode with SDPA attention, seeded weights."""
    from transformers import LlamaForCausalLM

    cfg = tiny_config(**overrides)
    cfg._attn_implementation = "sdpa"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    model.set_attn_implementation("sdpa")
    return model.float().eval()


def random_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """Token ids in [3, VOCAB) (no pad/bos/eos), seeded."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=gen)

"""Coverage matrix: torchkvq.hf on tiny random configs of the causal-LM families transformers ships.

Every family in :data:`FAMILIES` is built from a tiny seeded random config (2 layers, vocab 256,
fp32, eval) and run with every policy in :data:`POLICIES` (all at 8 bits, so the quantization
error stays far below the model's logit margins):

* ``model.generate`` with ``torchkvq.hf.enable(model, policy)``'s cache gives the same greedy
  tokens (and logits within a tight tolerance) as a plain ``DynamicCache``, on a 150-token prompt
  that really gets quantized (``n_quantized > 0`` in every layer). Random tiny models have near
  ties (top-2 margins of 1e-3); a token may differ only at such a tie, and every token must then
  still be the fp model's greedy choice on the same history (see ``assert_greedy_matches_fp``);
* the fused attention (``store.attend``) over each layer's store equals
  ``scaled_dot_product_attention`` over ``store.dequantized()`` on that family's shapes
  (head_dim, GQA ratio), causal, prefill and decode query lengths;
* KIVI-4 gives the fp cache's greedy tokens on a short horizon;
* a large k_proj bias (Qwen2) does not collapse KIVI-4's quality.

Sliding-window families (Mistral with a window, Qwen2 with ``use_sliding_window``, Gemma 2 and
Gemma 3 mixing sliding and full layers) use a window of 80 tokens, shorter than the prompt, so
their sliding layers really drop tokens and free blocks; Gemma 2 also soft-caps its scores.
GPT-OSS adds learned attention sinks. Families torchkvq does not support (models whose attention
does not go through ``Cache.update`` and transformers' attention interface, bidirectional
attention) must fail with a clear error, never with silent garbage. ``docs/models.md`` lists what is covered.

To add a policy: one line in :data:`POLICIES`. To add a family: one entry in :data:`FAMILIES`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache  # noqa: E402

import torchkvq.hf as kvq_hf  # noqa: E402
from torchkvq.policies import KIVI, QAQ, REGISTRY, LogQuant, Policy, XQuant, XQuantCL  # noqa: E402

# ---------------------------------------------------------------------------------------------
# The policy axis: one line per policy (name -> factory of a fresh policy). Every family x policy
# must pass test_generate_matches_fp_cache and test_fused_attention_matches_sdpa. Use widths that
# make the quantization error small (8 bits) and settings under which the 150-token prompt is
# mostly quantized (residual / window well below the prompt).
# ---------------------------------------------------------------------------------------------
POLICIES: dict[str, Callable[[], Policy]] = {
    "kivi-8": lambda: KIVI(key_bits=8, value_bits=8, group_size=32, residual=32),
    "logquant-8": lambda: LogQuant(bits=8, window=16, group_size=32),
    "qaq-8": lambda: QAQ(min_bits=8, max_bits=8, residual=32, group_size=32),
}

# XQuant caches the layer input and rebuilds keys as RoPE(k_norm(X·W_k + b)): it serves
# full-attention, Llama-layout decoders whose keys are exactly that (k_norm: a per-head QK-norm,
# or none), and refuses the rest with these reasons.
XQUANT_POLICIES: dict[str, Callable[[], Policy]] = {
    "xquant-8": lambda: XQuant(bits=8, group_size=32, residual=32, block=32),
    "xquant-cl-8": lambda: XQuantCL(bits=8, group_size=32, residual=32, block=32, first_layers=0),
    # X itself (not the latents the GQA families get by default) and V absorbed
    "xquant-8-x-absorb": lambda: XQuant(bits=8, group_size=32, residual=32, block=32, mode="x", absorb_values=True),
}
_SLIDING, _LAYOUT = "XQuant serves full-attention decoders only", "is not a Llama-style decoder"
XQUANT_REFUSES = {
    "mistral-sliding": _SLIDING, "qwen2-sliding": _SLIDING, "ministral": _SLIDING, "gemma2": _SLIDING,
    "gpt_oss": _SLIDING, "gemma3": _SLIDING,
    "phi3": _LAYOUT, "gpt2": _LAYOUT, "opt": _LAYOUT, "gpt_neox": _LAYOUT, "olmo2": _LAYOUT,
    "phi": r"rotates 40 of its 80 key channels \(partial rotary\)",
}

VOCAB = 256
PAD, BOS, EOS = 0, 1, 2
PROMPT = 150  # > residual + group_size: blocks really get quantized during the prefill
NEW_TOKENS = 16
KIVI4_TOKENS = 8  # the "short horizon" of the KIVI-4 check
# Max |logit error| allowed, relative to the fp logits' max |logit| (observed: <= 0.5% at 8 bits).
TOL_8BIT = 0.02
TOL_4BIT = 0.10

COMMON = dict(vocab_size=VOCAB, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
              tie_word_embeddings=False, initializer_range=0.08)


def _key_bias(channels) -> Callable:
    """A setup adding a Qwen2-style large key bias: +5 on these channels of every KV head
    (the keys themselves are ~N(0, 0.6), so this is ~8 sigma)."""

    def setup(model) -> None:
        with torch.no_grad():
            for layer in model.model.layers:
                attn = layer.self_attn
                attn.k_proj.bias.view(-1, attn.head_dim)[:, channels] += 5.0

    return setup


def _sinks(value: float) -> Callable:
    """A setup giving GPT-OSS's learned sinks weight: logits around `value` (random init leaves
    them near 0, where they barely matter)."""

    def setup(model) -> None:
        with torch.no_grad():
            for layer in model.model.layers:
                sinks = layer.self_attn.sinks
                sinks.copy_(value + torch.linspace(-1, 1, sinks.numel()))

    return setup


@dataclass(frozen=True)
class Family:
    """One row of the matrix: a tiny config of one transformers model type."""

    id: str
    model_type: str
    config: dict
    #: Policy fields this family needs changed (applied with dataclasses.replace).
    policy_overrides: dict = field(default_factory=dict)
    #: Called on the freshly built model (e.g. to plant a large key bias).
    setup: Callable | None = None
    #: Relative logit tolerance of the KIVI-4 check.
    tol_4bit: float = TOL_4BIT
    #: attn_implementation of the fp reference (Gemma 2 has no SDPA path: soft-capping).
    attn: str = "sdpa"


def _llama(id: str, head_dim: int, heads: int, kv_heads: int, **family_kw) -> Family:
    cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, head_dim=head_dim,
               num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512)
    return Family(id, "llama", cfg, **family_kw)


_SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, max_position_embeddings=512)
_QWEN2 = dict(_SMALL, num_attention_heads=4, num_key_value_heads=2)  # head_dim 16
# Sliding window of the sliding families: shorter than the prompt, and wider than residual +
# group_size (32 + 32) so that blocks get quantized before they leave the window.
WINDOW = 80
_GEMMA = dict(_SMALL, num_attention_heads=2, num_key_value_heads=1, head_dim=256, sliding_window=WINDOW)

FAMILIES = [
    # GQA 2:1, head_dim 32
    _llama("llama", 32, 4, 2),
    # MQA: one KV head for 4 query heads
    _llama("llama-mqa", 32, 4, 1),
    # the head_dim axis (Llama attention decouples head_dim from hidden_size)
    _llama("llama-hd64", 64, 4, 2),
    # 80 is not a multiple of the default value_group_size (32): see test_head_dim_80_defaults
    _llama("llama-hd80", 80, 2, 1, policy_overrides=dict(value_group_size=16)),
    _llama("llama-hd96", 96, 2, 2),  # MHA
    _llama("llama-hd128", 128, 4, 1),  # MQA
    _llama("llama-hd256", 256, 2, 1),
    # sliding_window=None: full attention (Mistral-7B v0.2+)
    Family("mistral", "mistral", dict(_SMALL, num_attention_heads=4, num_key_value_heads=2,
                                      head_dim=16, sliding_window=None)),
    # a sliding window on every layer (Mistral-7B v0.1), shorter than the prompt
    Family("mistral-sliding", "mistral", dict(_SMALL, num_attention_heads=4, num_key_value_heads=2,
                                              head_dim=16, sliding_window=WINDOW)),
    # layer 0 full, layer 1 sliding (use_sliding_window above max_window_layers), q/k/v bias
    Family("qwen2-sliding", "qwen2", dict(_QWEN2, use_sliding_window=True, sliding_window=WINDOW,
                                          max_window_layers=1)),
    # sliding + full layers (Ministral's alternation)
    Family("ministral", "ministral", dict(_SMALL, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                          sliding_window=WINDOW,
                                          layer_types=["sliding_attention", "full_attention"])),
    # sliding + full layers, head_dim 256, MQA, logit soft-capping (a cap of 1 that bites on
    # these scores; Gemma 2 ships 50)
    Family("gemma2", "gemma2", dict(_GEMMA, attn_logit_softcapping=1.0), attn="eager"),
    # sliding + full layers, learned attention sinks (s_aux, set around 3 so that they take a
    # real share of the softmax), MoE, biases; no SDPA path in transformers (sinks)
    Family("gpt_oss", "gpt_oss", dict(_SMALL, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      intermediate_size=64, num_local_experts=2, num_experts_per_tok=1,
                                      sliding_window=WINDOW), setup=_sinks(3.0), attn="eager"),
    # sliding + full layers, QK-norm, head_dim 256, MQA
    Family("gemma3", "gemma3_text", dict(_GEMMA, layer_types=["sliding_attention", "full_attention"])),
    # q/k/v biases (Qwen2 always has them)
    Family("qwen2", "qwen2", _QWEN2),
    # + a large key bias on every 4th channel (head_dim 16: RoPE pairs of high and low frequency).
    # On high-frequency channels RoPE turns the constant bias into a +-5 oscillation inside each
    # block, which widens the per-channel ranges: KIVI-4's error about triples (0.045 -> 0.125, see
    # test_large_key_bias_does_not_collapse_quality), hence the looser 4-bit tolerance.
    Family("qwen2-kbias", "qwen2", _QWEN2, setup=_key_bias(slice(0, None, 4)), tol_4bit=0.25),
    # QK-norm (per head, before RoPE): keys are cached after norm and RoPE
    Family("qwen3", "qwen3", dict(_SMALL, num_attention_heads=4, num_key_value_heads=2, head_dim=32)),
    # head_dim 256 (Gemma's own default), 2 query heads on 1 KV head, GeGLU, scaled embeddings
    Family("gemma", "gemma", dict(_SMALL, num_attention_heads=2, num_key_value_heads=1, head_dim=256)),
    # fused qkv_proj
    Family("phi3", "phi3", dict(_SMALL, num_attention_heads=4, num_key_value_heads=2)),
    # MHA, learned positions, fused c_attn with bias, per-layer scaling 1/(layer+1)/sqrt(d)
    Family("gpt2", "gpt2", dict(n_embd=128, n_head=2, n_layer=2, n_positions=512,
                                scale_attn_by_inverse_layer_idx=True)),
    # MHA, biases, queries pre-scaled (the attention function gets scaling=1.0)
    Family("opt", "opt", dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=2,
                              word_embed_proj_dim=64, max_position_embeddings=512)),
    # MHA, partial rotary (25%), biases
    Family("gpt_neox", "gpt_neox", dict(_SMALL, num_attention_heads=2)),
    # Phi-2 shapes: head_dim 80, partial rotary (50%), biases
    Family("phi", "phi", dict(_SMALL, hidden_size=160, num_attention_heads=2, num_key_value_heads=2),
           policy_overrides=dict(value_group_size=16)),
    # QK-norm over the whole projection (not per head)
    Family("olmo2", "olmo2", dict(_SMALL, num_attention_heads=4, num_key_value_heads=2)),
]
FAMILY_PARAMS = [pytest.param(f, id=f.id) for f in FAMILIES]
# Variants used by single tests only: the large key bias on RoPE's slowest / fastest channels
# (head_dim 16: channels c and c + 8 rotate together, c = 7 slowest, c = 0 fastest).
_EXTRA = [
    Family("qwen2-kbias-lowfreq", "qwen2", _QWEN2, setup=_key_bias([6, 7, 14, 15])),
    Family("qwen2-kbias-highfreq", "qwen2", _QWEN2, setup=_key_bias([0, 1, 8, 9])),
]
FAMILY_BY_ID = {f.id: f for f in FAMILIES + _EXTRA}


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def make_policy(factory: Callable[[], Policy], family: Family) -> Policy:
    """A fresh policy from `factory`, with the family's overrides."""
    policy = factory()
    if family.policy_overrides:
        policy = dataclasses.replace(policy, **family.policy_overrides)
    return policy


@functools.lru_cache(maxsize=None)
def build(family_id: str):
    """(model, prompt, fp reference) for a family; the model is switched to torchkvq's attention.

    The reference is computed with SDPA (Gemma 2: eager) before ``enable``;
    test_fp_cache_after_enable checks that the enabled model still gives it with a plain
    DynamicCache.
    """
    fam = FAMILY_BY_ID[family_id]
    cfg = AutoConfig.for_model(fam.model_type, **{**COMMON, **fam.config})
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=fam.attn)
    model = model.float().eval()
    if fam.setup is not None:
        fam.setup(model)
    ids = torch.randint(3, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    ref = generate(model, ids, DynamicCache(config=model.config))
    kvq_hf.enable(model, KIVI())  # the returned cache is not used
    return model, ids, ref


@functools.lru_cache(maxsize=None)
def run_policy(family_id: str, policy_name: str):
    """(generate output, filled KVQCache) of a family x policy; shared by the matrix tests."""
    model, ids, _ = build(family_id)
    cache = kvq_hf.KVQCache(model.config, make_policy(POLICIES[policy_name], FAMILY_BY_ID[family_id]))
    return generate(model, ids, cache), cache


def generate(model, ids, cache, n: int = NEW_TOKENS):
    with torch.inference_mode():
        return model.generate(ids, past_key_values=cache, max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=PAD, output_logits=True,
                              return_dict_in_generate=True)


def assert_greedy_matches_fp(model, got, ref, rel_tol: float, n: int | None = None) -> float:
    """The KVQ cache's greedy tokens are the fp model's greedy tokens.

    Each generated token is checked against the fp model's logits *on the same history* (one
    teacher-forced fp forward over ``got.sequences``): the KVQ logits must be within
    ``rel_tol * max|fp logits|`` of them, and the KVQ token must be the fp argmax - unless the fp
    model is at a near tie there (top margin below the measured logit error, which is the only
    way a small error can flip a greedy choice). Random tiny models do have such ties (margins of
    1e-3 happen); without one, the sequence equals the DynamicCache generation `ref`, which is
    asserted up to the first tie. Returns the largest relative logit error.
    """
    n = n or len(got.logits)
    seq = got.sequences[:, : got.sequences.shape[1] - len(got.logits) + n]
    with torch.inference_mode():  # no cache: the "kvq" attention is plain SDPA here
        fp = model(seq, use_cache=False).logits[0, -n - 1 : -1]
    fp_choice = fp.clone()
    fp_choice[:, EOS] = -float("inf")  # generate(min_new_tokens=n) never picks EOS
    toks = seq[0, -n:]
    scale = float(fp.abs().max())
    errs, ties = [], []
    for i in range(n):
        delta = (got.logits[i][0] - fp[i]).abs().max()
        errs.append(float(delta) / scale)
        best = int(fp_choice[i].argmax())
        if int(toks[i]) != best:
            margin = float(fp[i, best] - fp[i, toks[i]])
            assert margin <= 2 * float(delta), (
                f"step {i}: token {int(toks[i])} instead of the fp argmax {best}, fp margin "
                f"{margin:.4g} is no near tie (logit error {float(delta):.4g})"
            )
            ties.append(i)
    assert max(errs) <= rel_tol, f"relative logit errors {[round(e, 5) for e in errs]} > {rel_tol}"
    first = ties[0] if ties else n
    r = ref.sequences[0, -len(ref.logits):][:n]
    assert torch.equal(toks[:first], r[:first]), "differs from the DynamicCache generation before any tie"
    return max(errs)


def assert_quantized(cache) -> None:
    stores = cache.stores
    assert len(stores) == len(cache.layers) == 2
    for s, layer in zip(stores, cache.layers):
        assert s.block_bits, "no quantized block held: the test would not test the store"
        assert s.window == layer.window
        if s.window is not None:  # the window really dropped tokens and freed blocks
            assert s.q_offset > 0 and s.window_start > 0
            assert min(s.fp_positions) >= s.window_start


def sdpa_over_store(store, q: torch.Tensor, scale: float, softcap: float | None = None) -> torch.Tensor:
    """Reference attention of the last L positions' queries over ``store.dequantized()``, with
    the store's sliding window and the soft-cap, if any."""
    keys, values, pos = store.dequantized()
    rep = q.shape[1] // store.kv_heads
    keys = keys.repeat_interleave(rep, dim=1)
    values = values.repeat_interleave(rep, dim=1)
    L = q.shape[2]
    qpos = torch.arange(store.n_tokens - L, store.n_tokens)[:, None]
    mask = pos[None, :] <= qpos
    if store.window is not None:
        mask &= pos[None, :] > qpos - store.window
    s = q.float() @ keys.transpose(-1, -2) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    return s.masked_fill(~mask, float("-inf")).softmax(-1) @ values


# ---------------------------------------------------------------------------------------------
# the matrix
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_fp_cache_after_enable(family):
    """enable() switches to "kvq" attention, which is plain SDPA for non-KVQ caches: a prefill
    and a decode step with a DynamicCache give the reference's (SDPA's) logits."""
    model, ids, ref = build(family.id)
    assert model.config._attn_implementation == kvq_hf.ATTN_IMPLEMENTATION
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        prefill = model(ids, past_key_values=cache, use_cache=True).logits[:, -1]
        step = model(ref.sequences[:, PROMPT : PROMPT + 1], past_key_values=cache, use_cache=True).logits[:, -1]
    torch.testing.assert_close(prefill, ref.logits[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(step, ref.logits[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_generate_matches_fp_cache(family, policy):
    model, ids, ref = build(family.id)
    got, cache = run_policy(family.id, policy)
    assert got.sequences.shape == (1, PROMPT + NEW_TOKENS)
    assert_quantized(cache)
    assert cache.get_seq_length() == PROMPT + NEW_TOKENS - 1
    assert_greedy_matches_fp(model, got, ref, TOL_8BIT)


@pytest.mark.parametrize("policy", list(XQUANT_POLICIES))
@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_xquant_generate_matches_fp_cache_or_refuses(family, policy):
    """XQuant and XQuant-CL at 8 bits follow the fp model on every family they serve (every layer
    holds quantized tokens); on the others building the cache raises, naming the reason, before
    anything is patched or stored."""
    model, ids, ref = build(family.id)
    if family.id in XQUANT_REFUSES:
        with pytest.raises(NotImplementedError, match=XQUANT_REFUSES[family.id]):
            kvq_hf.new_cache(model, XQUANT_POLICIES[policy]())
        return
    cache = kvq_hf.new_cache(model, XQUANT_POLICIES[policy]())
    got = generate(model, ids, cache)
    assert len(cache.stores) == 2 and all(s.n_quantized >= PROMPT - 64 for s in cache.stores)
    assert_greedy_matches_fp(model, got, ref, TOL_8BIT)


def test_xquant_refuses_a_key_norm_over_more_than_a_head():
    """XQuant applies k_norm per head (Qwen3's form); a norm over the whole projection (OLMo-2's
    form) on an otherwise Llama-layout model is refused, not applied per head."""
    fam = FAMILY_BY_ID["qwen3"]
    cfg = AutoConfig.for_model(fam.model_type, **{**COMMON, **fam.config})
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").float().eval()
    kv_dim = cfg.num_key_value_heads * cfg.head_dim
    for layer in model.model.layers:
        layer.self_attn.k_norm = torch.nn.RMSNorm(kv_dim)
    with pytest.raises(NotImplementedError, match=rf"layer 0 normalizes its keys with a k_norm that is not "
                       rf"a per-head norm over head_dim={cfg.head_dim} \(weight shape \({kv_dim},\)\)"):
        kvq_hf.enable(model, XQUANT_POLICIES["xquant-8"]())
    assert model.config._attn_implementation == "sdpa"  # refused before anything changed


@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_kivi4_short_horizon(family):
    model, ids, ref = build(family.id)
    policy = make_policy(lambda: KIVI(key_bits=4, value_bits=4, group_size=32, residual=32), family)
    cache = kvq_hf.KVQCache(model.config, policy)
    got = generate(model, ids, cache, KIVI4_TOKENS)
    assert_quantized(cache)
    assert_greedy_matches_fp(model, got, ref, family.tol_4bit, KIVI4_TOKENS)


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_fused_attention_matches_sdpa(family, policy):
    """store.attend (the kernel reading packed codes) == attention over the dequantized store,
    on the stores the model itself filled during generate (this family's head_dim and GQA ratio,
    sliding window and soft-cap, this policy's layout: pinned tokens, excluded quantized copies,
    outliers, freed blocks), causal, for a decode step (L = 1) and a chunk (L = 5) appended to a
    copy of each store."""
    model, _, _ = build(family.id)
    _, cache = run_policy(family.id, policy)
    assert_quantized(cache)
    text = model.config.get_text_config(decoder=True)
    hq, softcap = text.num_attention_heads, getattr(text, "attn_logit_softcapping", None)
    gen = torch.Generator().manual_seed(2)
    for original in cache.stores:
        assert hq % original.kv_heads == 0
        D = original.head_dim
        for L in (1, 5):
            store = copy.deepcopy(original)
            k, v = (torch.randn(1, store.kv_heads, L, D, generator=gen) for _ in range(2))
            store.append(k, v)
            q = torch.randn(1, hq, L, D, generator=gen)
            out, lse, _ = store.attend(q, scale=D**-0.5, causal=True, softcap=softcap)
            assert out.shape == (1, hq, L, D)
            want = sdpa_over_store(store, q, D**-0.5, softcap)
            torch.testing.assert_close(out.float(), want, rtol=1e-4, atol=1e-5)
            if softcap is not None:  # the cap really changes these scores
                uncapped = sdpa_over_store(store, q, D**-0.5)
                assert (want - uncapped).abs().max() > 1e-2


def test_large_key_bias_does_not_collapse_quality():
    """Qwen2 with +5 on some k_proj channels (~8 sigma of the keys), KIVI-4.

    Per-channel key quantization absorbs a bias that stays constant over a block: on RoPE's
    slow channels the error is that of the model without the bias (per-token quantization would
    spend its range on the bias instead). On RoPE's fast channels the bias turns into a +-5
    oscillation inside every block, the per-channel ranges widen and the error grows (about 4x
    here) - but greedy decoding still follows the fp model: no collapse.
    """
    errs, keys = {}, {}
    kivi4 = KIVI(key_bits=4, value_bits=4, group_size=32, residual=32)
    for fid in ("qwen2", "qwen2-kbias-lowfreq", "qwen2-kbias-highfreq"):
        model, ids, ref = build(fid)
        cache = kvq_hf.KVQCache(model.config, kivi4)
        got = generate(model, ids, cache, KIVI4_TOKENS)
        errs[fid] = assert_greedy_matches_fp(model, got, ref, 0.3, KIVI4_TOKENS)
        keys[fid] = cache.stores[0].dequantized()[0][0, :, : cache.stores[0].n_quantized]  # [H, T, D]
    # the bias really is in the cached keys
    assert float(keys["qwen2-kbias-lowfreq"][..., [6, 7, 14, 15]].mean()) > 4.0
    blocks = keys["qwen2-kbias-highfreq"][..., [0, 8]].unflatten(1, (-1, 32))  # [H, blocks, 32, 2]
    assert float((blocks.amax(2) - blocks.amin(2)).mean()) > 8.0  # +-5 swings inside each block
    assert errs["qwen2-kbias-lowfreq"] <= 1.5 * errs["qwen2"] + 0.005, errs
    assert errs["qwen2-kbias-highfreq"] <= 0.3, errs


@pytest.mark.parametrize("family_id", ["mistral-sliding", "gemma2"])
def test_left_padded_batch_with_sinks(family_id):
    """A left-padded batch (padding 37 in row 0) on a sliding-window family, KIVI-8 with 4
    sinks: each row's sinks are its own first real tokens (positions 37-40 and 0-3 pinned in
    the full layers; gone with the window in the sliding ones), and each row generates what a
    DynamicCache generates for the same batch."""
    model, ids, _ = build(family_id)
    npad = 37
    batch = torch.cat([torch.cat([torch.full((1, npad), PAD), ids[:, npad:]], 1), ids], 0)
    mask = torch.ones_like(batch)
    mask[0, :npad] = 0
    policy = KIVI(key_bits=8, value_bits=8, group_size=32, residual=32, sinks=4)
    cache = kvq_hf.KVQCache(model.config, policy)
    with torch.inference_mode():
        kw = dict(attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                  pad_token_id=PAD, output_logits=True, return_dict_in_generate=True)
        got = model.generate(batch, past_key_values=cache, **kw)
        ref = model.generate(batch, past_key_values=DynamicCache(config=model.config), **kw)
    assert_quantized(cache)
    for store, layer in zip(cache.stores, cache.layers):
        if layer.window is None:
            assert store.pinned == {0, 1, 2, 3, npad, npad + 1, npad + 2, npad + 3}
        else:
            assert not store.pinned
    assert torch.equal(got.sequences, ref.sequences)
    err = max(float((g - r).abs().max() / r.abs().max()) for g, r in zip(got.logits, ref.logits))
    assert err <= TOL_8BIT, err


def test_every_registered_policy_on_mixed_layers():
    """Every policy of the REGISTRY (as ``torchkvq eval`` runs them: residual 128, 2-4 bits,
    fp16 windows, outliers) on Gemma 3 with sliding (window 200) and full layers and a
    240-token prompt: both layers hold quantized blocks (group 32), the sliding one nothing the
    window left, the fused attention over every store equals attention over its dequantized copy, the
    logits are finite and KIVI-4's stay within 15% of the fp model's (observed: 6%). (At 2 bits
    this random model's logit errors are 24-44% with the window and 25-36% with a window of
    10000 that drops nothing: quantization error, not the window.)"""
    cfg = AutoConfig.for_model("gemma3_text", **{**COMMON, **_GEMMA, "sliding_window": 200,
                                                  "layer_types": ["sliding_attention", "full_attention"]})
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").float().eval()
    kvq_hf.enable(model, KIVI())
    ids = torch.randint(3, VOCAB, (1, 240), generator=torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(4)
    for name, factory in REGISTRY.items():
        policy = factory()
        if isinstance(policy, XQuant):  # caches the layer input: full-attention models only
            with pytest.raises(NotImplementedError, match="XQuant serves full-attention decoders only"):
                kvq_hf.new_cache(model, policy)
            continue
        cache = kvq_hf.KVQCache(model.config, policy)
        got = generate(model, ids, cache)
        with torch.inference_mode():
            fp = model(got.sequences[:, :-1], use_cache=False).logits[0, -NEW_TOKENS:]
        assert all(bool(g.isfinite().all()) for g in got.logits), name
        if name == "kivi-4":
            err = max(float((g[0] - f).abs().max()) for g, f in zip(got.logits, fp)) / float(fp.abs().max())
            assert err <= 0.15, err
        sliding, full = cache.stores
        assert sliding.window == 200 and full.window is None
        assert sliding.window_start > 0 and min(sliding.fp_positions) >= sliding.window_start
        # (kivi-2-g128's blocks of 128 need 256 tokens beyond the residual: none here)
        assert (full.block_bits and sliding.block_bits) or policy.group_size > 32, name
        for store in cache.stores:
            store = copy.deepcopy(store)
            k, v = (torch.randn(1, 1, 1, 256, generator=gen) for _ in range(2))
            store.append(k, v)
            q = torch.randn(1, 2, 1, 256, generator=gen)
            out, _, _ = store.attend(q, scale=256**-0.5)
            torch.testing.assert_close(out.float(), sdpa_over_store(store, q, 256**-0.5), rtol=1e-3, atol=1e-4)


def test_head_dim_80_defaults():
    model, ids, ref = build("llama-hd80")
    cache = kvq_hf.KVQCache(model.config, KIVI(key_bits=8, value_bits=8, group_size=32, residual=32))
    assert_greedy_matches_fp(model, generate(model, ids, cache), ref, TOL_8BIT)


# ---------------------------------------------------------------------------------------------
# not supported yet: a clear error, never silent garbage
# ---------------------------------------------------------------------------------------------

_TINY = dict(COMMON, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16)

UNSUPPORTED = [
    # bidirectional attention: not a causal decoder
    pytest.param("gemma3_text", dict(_TINY, sliding_window=16, use_bidirectional_attention=True),
                 NotImplementedError, "bidirectional attention", id="gemma3-bidirectional"),
    # attention computed inside the model, not through transformers' attention interface:
    # set_attn_implementation("kvq") is skipped (with a warning) and KVQCache refuses the model
    pytest.param("falcon", dict(COMMON, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                num_kv_heads=1, multi_query=True), ValueError,
                 "does not use transformers' attention interface", id="falcon"),
    pytest.param("bloom", dict(COMMON, hidden_size=64, n_layer=2, n_head=4), ValueError,
                 "does not use transformers' attention interface", id="bloom"),
    pytest.param("gptj", dict(COMMON, n_embd=64, n_layer=2, n_head=4, rotary_dim=8), ValueError,
                 "does not use transformers' attention interface", id="gptj"),
    pytest.param("mpt", dict(COMMON, d_model=64, n_layers=2, n_heads=4), ValueError,
                 "does not use transformers' attention interface", id="mpt"),
]


def _build_plain(model_type: str, cfg: dict):
    config = AutoConfig.for_model(model_type, **cfg)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config).float().eval()


@pytest.mark.parametrize("model_type, cfg, error, match", UNSUPPORTED)
def test_unsupported_families_raise(model_type, cfg, error, match):
    model = _build_plain(model_type, cfg)
    with pytest.raises(error, match=match):
        kvq_hf.enable(model, KIVI(key_bits=8, value_bits=8))


def test_jetmoe_is_exact_or_raises():
    """A model that transforms the keys between Cache.update and attention must not give garbage.

    With nothing quantized (residual larger than the sequence) a KVQCache must equal the fp
    cache to float32 rounding - or the library must refuse the model."""
    model = _build_plain("jetmoe", dict(COMMON, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_key_value_heads=2, kv_channels=16, num_local_experts=2,
                                        num_experts_per_tok=2))
    ids = torch.randint(3, VOCAB, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = model(ids).logits
        try:
            cache = kvq_hf.enable(model, KIVI(key_bits=8, value_bits=8, residual=10**6))
            model(ids[:, :39], past_key_values=cache, use_cache=True)
            got = model(ids[:, 39:], past_key_values=cache, use_cache=True).logits
        except (NotImplementedError, ValueError):
            return  # a clear refusal is fine
    torch.testing.assert_close(got, ref[:, 39:], rtol=1e-4, atol=1e-5)


def test_refused_enable_leaves_model_unchanged():
    model = _build_plain("gemma3_text", dict(_TINY, sliding_window=8, use_bidirectional_attention=True))
    ids = torch.randint(3, VOCAB, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        before = model(ids).logits
        with pytest.raises(NotImplementedError):
            kvq_hf.enable(model, KIVI())
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)

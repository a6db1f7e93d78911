"""scripts/soak.py's byte accounting on a tiny model: its formulas (written from docs/store.md
and the XStore layout, not from the stores' own counts) agree with every store's accounting for
each kind of policy, and a store whose accounting is off makes the soak fail."""

from __future__ import annotations

import importlib.util
import os

import pytest

pytest.importorskip("transformers")
pytest.importorskip("psutil")
pytest.importorskip("tqdm")

from torchkvq.policies import KIVI, QAQ, LogQuant, XQuant, XQuantCL  # noqa: E402
from torchkvq.xstore import XStore  # noqa: E402

from tiny_models import random_ids, tiny_model  # noqa: E402

_path = os.path.join(os.path.dirname(__file__), os.pardir, "scripts", "soak.py")
_spec = importlib.util.spec_from_file_location("soak", _path)
soak = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(soak)

POLICIES = {
    "kivi": lambda: KIVI(key_bits=2, value_bits=4, group_size=8, residual=8, sinks=2),
    "logquant": lambda: LogQuant(window=6, bits=2, group_size=8),
    "qaq": lambda: QAQ(key_error=0.5, value_error=2.0, residual=8, group_size=8, outlier_fraction=0.1),
    "xquant-latent": lambda: XQuant(bits=3, group_size=16, residual=8, block=8, mode="latent"),
    "xquant-x": lambda: XQuant(bits=4, group_size=32, residual=8, block=8, mode="x"),
    "xquant-cl": lambda: XQuantCL(bits=2, group_size=32, residual=8, block=8, first_layers=1),
}


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_bytes_as_predicted(model, name):
    prompt = random_ids(1, 21, seed=4)
    res = soak.soak(model, prompt, name, tokens=40, every=8, warmup=8, policy=POLICIES[name]())
    # 40 tokens are too few for the RSS slope (allocator noise); the byte checks are exact
    assert [f for f in res["failures"] if not f.startswith("RSS")] == []
    rows = res["rows"]
    assert [r["step"] for r in rows] == [8, 16, 24, 32, 40]
    assert all(r["in_use"] == r["store_in_use"] and r["allocated"] == r["nbytes"] for r in rows)
    assert rows[-1]["tokens"] == 21 + 40 and rows[-1]["quantized_tokens"] > rows[0]["quantized_tokens"]
    assert res["bytes_per_quantized_token"] > 0


def test_off_accounting_fails(model, monkeypatch):
    """A window the accounting forgets is caught: the formulas and the store disagree."""
    real = XStore.nbytes_breakdown

    def forgets_window(self):
        br = real(self)
        br["reserved"] += br.pop("fp_window")
        return br

    monkeypatch.setattr(XStore, "nbytes_breakdown", forgets_window)
    res = soak.soak(model, random_ids(1, 21, seed=4), "xquant", tokens=8, every=8, warmup=8,
                    policy=POLICIES["xquant-latent"]())
    assert any("by the formulas" in f for f in res["failures"])


def test_slope_and_summary():
    assert soak.slope([0, 1, 2, 3], [5, 7, 9, 11]) == pytest.approx(2.0)
    assert soak.slope([1], [3]) == 0.0
    rows = [{"step": s, "tokens": 100 + s, "rss": 1000 + 3 * s, "allocated": 10 * s, "gc_objects": 7,
             "in_use": 10 * s, "quantized_tokens": s, "fp_tokens": 20, "fp_token_bytes": 4,
             "fp16_bytes_per_token": 64.0} for s in (0, 8, 16, 24)]
    summary = soak.summarize(rows, warmup=8)
    assert summary["leak_bytes_per_token"] == pytest.approx(-7.0)
    assert summary["gc_objects_per_token"] == 0.0
    assert summary["bytes_per_quantized_token"] == pytest.approx(10.0)
    assert soak.summarize(rows[:1], warmup=0) == {}

"""CUDA kernel of kvq::quant_attention against the CPU kernel and a float64 ground truth.

The CUDA kernel sums in another order than the CPU kernel (online softmax over other tiles,
warp reductions, split merges), so it is held to a FlashAttention-style bound: on every output
(out, lse, stats) its largest error against the exact float64 attention of the same compressed
store (``store_factory.attention_f64``) is at most twice the CPU kernel's largest error plus a
small tolerance (a few roundings of the output dtype at the result's scale). Rows that see
nothing must agree exactly (out 0, lse -inf).

Argument sets come from ``tests/store_factory.py`` (random valid stores: mixed per-block widths,
unused blocks with NaN scales, empty fp slots, exclusions, pinned tokens, outliers).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import torchkvq
from store_factory import make_attention_args, attention_f64, nan_cases

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torchkvq.cuda_available(), reason="needs a CUDA device and torchkvq built with CUDA"
    ),
]

quant_attention = torch.ops.kvq.quant_attention
_EPS = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def _to_cuda(A):
    return A.replace(**{k: v.cuda() for k, v in A.kw.items() if isinstance(v, torch.Tensor)})


def _check(A, what=""):
    """CUDA vs CPU vs float64 truth; returns the CUDA outputs (on the CPU)."""
    want = quant_attention(*A.args())
    got = quant_attention(*_to_cuda(A).args())
    truth = attention_f64(A)
    got = tuple(t.cpu() for t in got)
    names = ("out", "lse", "stats")
    for name, g, w, t in zip(names, got, want, truth):
        assert g.dtype == w.dtype and g.shape == w.shape, (what, name, g.dtype, g.shape, w.shape)
        if name == "stats" and not A["return_stats"]:
            assert g.numel() == 0
            continue
        seen = torch.isfinite(t)
        if name == "lse":  # rows that see nothing: exactly -inf, like the CPU kernel
            assert torch.equal(g[~seen], w[~seen]), (what, name)
        err_g = (g.double() - t).abs()[seen]
        err_w = (w.double() - t).abs()[seen]
        if err_g.numel() == 0:
            continue
        scale = t.abs()[seen].max().item()
        tol = 2 * err_w.max().item() + 4 * _EPS[g.dtype] * scale + 1e-5
        assert err_g.max().item() <= tol, (
            f"{what} {name}: CUDA error {err_g.max().item():.3g} > {tol:.3g} "
            f"(CPU error {err_w.max().item():.3g})")
    if A["return_stats"]:  # tokens nobody sees have statistic 0 exactly
        assert torch.equal(got[2][truth[2] == 0], torch.zeros_like(got[2][truth[2] == 0]))
    nothing = ~torch.isfinite(truth[1])
    assert torch.equal(got[0][nothing], torch.zeros_like(got[0][nothing])), what
    return got


WIDTHS = (4, 0, 2, 8, 1, 3, 0, 5, 6, 7)  # every width, unused blocks in between

# Decode (L = 1): the GQA group shares every dequantized tile.
DECODE = [(hq, hkv, d) for hq, hkv in [(4, 4), (4, 2), (6, 2), (8, 2), (8, 1), (16, 1)]
          for d in (64, 128, 256)]


@pytest.mark.parametrize("fp_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv,D", DECODE, ids=[f"{a}x{b}d{c}" for a, b, c in DECODE])
def test_decode_matches(hq, hkv, D, fp_dtype):
    i = DECODE.index((hq, hkv, D))
    A = make_attention_args(
        B=2, Hq=hq, Hkv=hkv, L=1, D=D, k_widths=WIDTHS, v_widths=(2, 0, 8, 1, 3, 4, 0, 5, 7, 6),
        group_size=(16, 32)[i % 2], v_group_size=(16, 32)[(i // 2) % 2], F=7, n_empty=2,
        q_exclude=i % 3 == 0, scale_dtype=(torch.float16, torch.float32)[i % 2],
        fp_dtype=fp_dtype, q_dtype=fp_dtype, causal=i % 2 == 1, return_stats=i % 4 == 0,
        seed=100 + i)
    _check(A, f"decode {hq}x{hkv} D{D}")


PREFILL = [(l, hq, hkv, d) for l in (2, 5, 17) for hq, hkv in [(2, 1), (4, 2), (8, 1)]
           for d in (64, 128)]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("L,hq,hkv,D", PREFILL, ids=[f"L{a}_{b}x{c}d{d}" for a, b, c, d in PREFILL])
def test_chunked_prefill_matches(L, hq, hkv, D, causal):
    i = PREFILL.index((L, hq, hkv, D))
    A = make_attention_args(
        B=2, Hq=hq, Hkv=hkv, L=L, D=D, k_widths=(2, 4, 0, 3, 8), group_size=16,
        v_group_size=16, F=L + 6, n_empty=2, q_exclude=i % 2 == 0, causal=causal,
        return_stats=i % 3 == 0, fp_dtype=(torch.float16, torch.bfloat16, torch.float32)[i % 3],
        q_dtype=(torch.float16, torch.bfloat16, torch.float32)[i % 3], seed=200 + i)
    _check(A, f"prefill L{L} {hq}x{hkv} D{D}")


@pytest.mark.parametrize("n_k,n_v", [(1, 0), (0, 2), (3, 4)])
@pytest.mark.parametrize("D", [64, 128])
def test_outliers_match(n_k, n_v, D):
    A = make_attention_args(B=2, Hq=4, Hkv=2, L=1, D=D, k_widths=(2, 4, 0, 3), F=5,
                            n_k_outliers=n_k, n_v_outliers=n_v, q_exclude=True,
                            return_stats=True, fp_dtype=torch.float16, q_dtype=torch.float16,
                            seed=300 + n_k + 10 * n_v + D)
    _check(A, f"outliers {n_k},{n_v}")
    A = A.replace(causal=True, query=torch.randn(2, 4, 3, D).half())  # and chunked prefill
    _check(A, f"outliers {n_k},{n_v} prefill")


# (q_offset, window, softcap): freed blocks, sliding windows from 1 to wider than the store,
# Gemma 2's soft-capping
FRAMES = [(37, 7, None), (1000, 33, 20.0), (0, 1, 1.0), (5, 100, None), (64, None, 2.0)]


@pytest.mark.parametrize("L", [1, 5])
@pytest.mark.parametrize("frame", FRAMES, ids=[f"off{o}-W{w}-cap{c}" for o, w, c in FRAMES])
def test_window_offset_softcap_match(frame, L):
    q_offset, window, softcap = frame
    A = make_attention_args(B=2, Hq=8, Hkv=2, L=L, D=128, k_widths=(2, 4, 0, 3, 8), group_size=16,
                            v_group_size=32, F=L + 6, n_empty=1, q_exclude=True, n_k_outliers=1,
                            causal=True, return_stats=True, fp_dtype=torch.float16,
                            q_dtype=torch.float16, seed=700 + L, q_offset=q_offset,
                            window=window, softcap=softcap)
    _check(A, f"frame {frame} L{L}")


@pytest.mark.parametrize("D,vg", [(8, 8), (32, 8), (96, 32), (512, 64), (1024, 128)])
def test_other_head_dims(D, vg):
    A = make_attention_args(B=1, Hq=4, Hkv=2, L=1, D=D, k_widths=(3, 8, 1), group_size=8,
                            v_group_size=vg, F=4, return_stats=True, seed=400 + D)
    _check(A, f"D{D}")


def test_long_cache_is_split_and_merged():
    """Long caches, few (batch, kv head) pairs: token ranges split over CTAs, merged by lse."""
    widths = tuple(((i * 7) % 9) for i in range(96))  # includes 0 (unused) and 8
    for causal, L in [(False, 1), (True, 1), (True, 6)]:
        A = make_attention_args(B=1, Hq=8, Hkv=1, L=L, D=128, k_widths=widths, group_size=16,
                                v_group_size=32, F=40, n_empty=9, q_exclude=True, causal=causal,
                                return_stats=True, n_k_outliers=1, n_v_outliers=1,
                                fp_dtype=torch.bfloat16, q_dtype=torch.bfloat16, seed=500 + L)
        _check(A, f"long causal={causal} L={L}")


def test_degenerate_stores():
    # no quantized block at all; only unused blocks; no fp slot; every slot empty
    for kw in [dict(k_widths=(), F=6), dict(k_widths=(0, 0), F=3),
               dict(k_widths=(2, 4), F=0), dict(k_widths=(0,), F=4, n_empty=4)]:
        for causal in (False, True):
            A = make_attention_args(B=2, Hq=4, Hkv=2, L=1, D=64, causal=causal,
                                    return_stats=True, seed=600, **kw)
            _check(A, f"degenerate {kw} causal={causal}")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_nan_and_inf_propagate_like_the_cpu(causal):
    """Rows with a NaN/+inf score (NaN/Inf in the query or a key they see) come out NaN, out
    and lse, exactly the rows the CPU kernel makes NaN; the other rows stay within the CPU's
    bound of the reference. Poisoned rows add nothing to the stats."""
    A, want = nan_cases(causal)
    cpu = quant_attention(*A.args())
    got = tuple(t.cpu() for t in quant_attention(*_to_cuda(A).args()))
    assert torch.equal(cpu[0].isnan().all(-1), want) and torch.equal(cpu[1].isnan(), want)
    assert torch.equal(got[0].isnan().all(-1), want) and torch.equal(got[1].isnan(), want)
    assert not bool(got[0][~want].isnan().any()) and bool(got[2].isfinite().all())
    torch.testing.assert_close(got[0][~want], cpu[0][~want], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[1][~want], cpu[1][~want], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[2], cpu[2], atol=1e-4, rtol=1e-4)


def test_unused_and_excluded_tokens_never_leak():
    """NaN scales of unused blocks and NaN values of excluded tokens must not reach the output."""
    A = make_attention_args(B=1, Hq=2, Hkv=1, L=1, D=64, k_widths=(4, 0, 4), F=3, seed=700)
    ex = torch.zeros(1, 3 * 32, dtype=torch.bool)
    ex[0, 5] = True
    vs = A["v_scale"].clone()
    vs[0, 0, 5] = float("nan")  # the excluded token's value scale
    A = A.replace(q_exclude=ex, v_scale=vs)
    out = _check(A, "leak")[0]
    assert bool(torch.isfinite(out).all())


def test_pool_slack_and_noncontiguous_query():
    A = make_attention_args(B=2, Hq=4, Hkv=2, L=3, D=64, k_widths=(2, 5), F=6, pool_slack=37,
                            causal=True, seed=800)
    q = A["query"].transpose(1, 2).contiguous().transpose(1, 2)
    assert not q.is_contiguous()
    _check(A.replace(query=q), "slack")


def test_bad_widths_never_crash_without_debug_checks():
    """Without TORCHKVQ_CUDA_CHECKS bad widths are clamped/skipped on the device: no error, no
    out-of-bounds read (run under compute-sanitizer by scripts/gpu_check.sh)."""
    A = _to_cuda(make_attention_args(B=1, Hq=2, Hkv=1, L=1, D=64, k_widths=(2, 4, 3), F=3,
                                     seed=900))
    for kb, vb in [((9, 4, 3), (2, 4, 3)), ((-1, 4, 3), (2, 4, 3)), ((2, 4, 3), (2, 4, 100)),
                   ((2, 0, 3), (2, 4, 3))]:
        bad = A.replace(k_bits=torch.tensor(kb, dtype=torch.int32, device="cuda"),
                        v_bits=torch.tensor(vb, dtype=torch.int32, device="cuda"))
        out, lse, _ = quant_attention(*bad.args())
        torch.cuda.synchronize()
        assert bool(torch.isfinite(out).all())
    short = A.replace(k_codes=A["k_codes"][:, :, :-5].contiguous())
    out, _, _ = quant_attention(*short.args())
    torch.cuda.synchronize()
    assert bool(torch.isfinite(out).all())


def test_debug_checks_validate_widths():
    """TORCHKVQ_CUDA_CHECKS=1 runs the CPU kernel's width validation (read once per process)."""
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    code = textwrap.dedent(f"""
        import sys, torch, torchkvq
        sys.path.insert(0, {tests_dir!r})
        from store_factory import make_attention_args
        A = make_attention_args(B=1, Hq=2, Hkv=1, L=1, D=64, k_widths=(2, 4, 3), F=3, seed=1)
        A = A.replace(**{{k: v.cuda() for k, v in A.kw.items() if isinstance(v, torch.Tensor)}})
        torch.ops.kvq.quant_attention(*A.args())  # valid: passes
        cases = [
            (dict(k_bits=torch.tensor([2, 9, 3], dtype=torch.int32, device="cuda")),
             "k_bits must hold widths in [0, 8]"),
            (dict(v_bits=torch.tensor([2, 0, 3], dtype=torch.int32, device="cuda")),
             "block 1 has k_bits 4 but v_bits 0"),
            (dict(k_codes=A["k_codes"][:, :, :-1].contiguous()), "k_codes holds"),
        ]
        for change, msg in cases:
            try:
                torch.ops.kvq.quant_attention(*A.replace(**change).args())
            except RuntimeError as e:
                assert msg in str(e), (msg, str(e))
            else:
                raise AssertionError("no error for " + msg)
        print("DEBUG-CHECKS-OK")
    """)
    env = dict(os.environ, TORCHKVQ_CUDA_CHECKS="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert "DEBUG-CHECKS-OK" in res.stdout, res.stdout + res.stderr


def test_runs_on_current_stream():
    A = make_attention_args(B=2, Hq=8, Hkv=2, L=1, D=128, k_widths=(4, 2, 8), F=5,
                            return_stats=True, seed=1000)
    C = _to_cuda(A)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = quant_attention(*C.args())
    stream.synchronize()
    want = quant_attention(*C.args())
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_opcheck():
    A = make_attention_args(B=2, Hq=4, Hkv=2, L=2, D=64, k_widths=(2, 0, 4), F=5, q_exclude=True,
                            n_k_outliers=1, n_v_outliers=1, causal=True, return_stats=True,
                            fp_dtype=torch.float16, q_dtype=torch.float16, seed=1100)
    torch.library.opcheck(quant_attention.default, _to_cuda(A).args())
    torch.library.opcheck(quant_attention.default, _to_cuda(A.replace(return_stats=False)).args())


def test_compiles_under_torch_compile():
    C = _to_cuda(make_attention_args(B=1, Hq=4, Hkv=2, L=1, D=64, k_widths=(2, 4), F=5,
                                     causal=True, seed=1200))
    args = C.args()

    def step(q, *rest):
        out, lse, _ = quant_attention(q * 1.5, *rest)
        return out.float() * 2, lse

    got = torch.compile(step, backend="aot_eager", fullgraph=True)(*args)
    want = step(*args)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_decode_step_captures_in_a_cuda_graph():
    """A decode step (new token written into an fp slot, attention over the store) captured once
    and replayed with new data: the op must not synchronize with the host (capture would fail)
    and must re-derive everything from the device tensors at replay (widths included)."""
    widths = (4,) * 12 + (0,) * 4
    A = make_attention_args(B=2, Hq=8, Hkv=2, L=1, D=128, k_widths=widths, group_size=32,
                            v_group_size=32, F=16, n_empty=6, causal=True, return_stats=True,
                            q_exclude=True, fp_dtype=torch.float16, q_dtype=torch.float16,
                            seed=1300)
    C = _to_cuda(A)
    args = list(C.args())
    q, k_fp, v_fp, fp_pos, k_bits, v_bits = (C["query"], C["k_fp"], C["v_fp"], C["fp_pos"],
                                             C["k_bits"], C["v_bits"])
    new_k = torch.randn(2, 2, 1, 128, device="cuda").half()
    new_v = torch.randn(2, 2, 1, 128, device="cuda").half()
    slots = [int((fp_pos[b] < 0).nonzero()[0]) for b in range(2)]  # an empty slot per row
    pos = fp_pos.amax(dim=1) + 1

    def step():
        for b, s in enumerate(slots):
            k_fp[b, :, s].copy_(new_k[b, :, 0])
            v_fp[b, :, s].copy_(new_v[b, :, 0])
            fp_pos[b, s].copy_(pos[b])
        return quant_attention(*args)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (lazy init, smem attributes) outside the capture
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse, stats = step()

    # New data in place: queries, the new token, and the last used block dropped (its width 0).
    q.copy_(torch.randn_like(q))
    new_k.copy_(torch.randn_like(new_k))
    new_v.copy_(torch.randn_like(new_v))
    pos.add_(3)
    k_bits[11] = 0
    v_bits[11] = 0
    graph.replay()
    torch.cuda.synchronize()
    got = (out.clone(), lse.clone(), stats.clone())
    want = quant_attention(*args)  # eager, on the state the replay left behind
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    # and against the CPU kernel on the same state
    cpu_args = [a.cpu() if isinstance(a, torch.Tensor) else a for a in args]
    for g, w in zip(got, quant_attention(*cpu_args)):
        torch.testing.assert_close(g.cpu().float(), w.float(), rtol=2e-3, atol=2e-3)


def test_argument_errors_name_the_op():
    C = _to_cuda(make_attention_args(B=1, Hq=4, Hkv=2, L=1, D=64, k_widths=(2,), F=3, seed=1400))
    op = r"kvq::quant_attention: "
    with pytest.raises(RuntimeError, match=op + r"fp_pos is on cpu but query is on cuda:0; move every input to one device"):
        quant_attention(*C.replace(fp_pos=C["fp_pos"].cpu()).args())
    with pytest.raises(RuntimeError, match=op + r"query heads \(3\) must be a multiple of kv heads \(2\)"):
        quant_attention(*C.replace(query=torch.randn(1, 3, 1, 64, device="cuda")).args())

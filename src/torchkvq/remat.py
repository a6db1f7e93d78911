"""Attention over XQuant's stores: keys and values rematerialized from the cached layer input.

A :class:`RematStore` is what one attention layer holds under XQuant (arXiv 2508.10395): the
quantized layer input X (MHA) or its low-rank latents ``X·U_k``, ``X·U_v`` (GQA), or for
XQuant-CL the quantized difference of the residual stream to the accumulator of the earlier
layers, each in an :class:`~torchkvq.xstore.XStore` with a full-precision window. At attention
time it rebuilds this layer's keys (RoPE at each token's position) and values from them.

Memory, honestly: rematerialization builds full-precision keys ``[batch, tokens, kv_dim]`` (and
values, unless they are absorbed) of ONE layer at a time during that layer's attention, a
temporary the size of that layer's fp cache; XQuant-CL additionally holds a float32 accumulator
``[batch, quantized tokens, hidden]`` during a forward pass, and every variant the rotary tables
(cos and sin ``[batch, tokens, head_dim]`` float32, computed once per step for all layers); both
are released after the last layer's attention and counted by the cache while held. The
persistent cache is only what the XStores hold and the token index.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import ops
from .reference import rotate_half_rope
from .xstore import _GROWTH, XStore, _grow


@dataclass
class Stream:
    """One cached per-token vector and how keys/values come back from it.

    ``latent = x @ encode`` (or x itself when ``encode`` is None) is what the store holds;
    ``out = x̂ @ weight.T + bias`` rematerializes ``n_k`` key channels (RoPE applied) followed by
    value channels.
    """

    encode: torch.Tensor | None  # [hidden, width]
    weight: torch.Tensor  # [n_k + n_v, width]
    bias: torch.Tensor | None  # [n_k + n_v]
    n_k: int

    @property
    def width(self) -> int:
        return self.weight.shape[1]

    @property
    def n_v(self) -> int:
        return self.weight.shape[0] - self.n_k


@dataclass
class LayerWeights:
    """The projections of one attention layer in the form XQuant caches them (see :meth:`build`)."""

    streams: list[Stream]
    kv_heads: int
    head_dim: int

    @classmethod
    def build(cls, w_k: torch.Tensor, b_k: torch.Tensor | None, w_v: torch.Tensor,
              b_v: torch.Tensor | None, kv_heads: int, head_dim: int, mode: str) -> "LayerWeights":
        """From ``k_proj``/``v_proj`` (``nn.Linear`` layout ``[kv_dim, hidden]``).

        ``mode="x"``: cache X itself; one stream rematerializes ``cat(W_k, W_v)`` so X is
        unpacked once. ``mode="latent"``: an offline SVD ``W_kᵀ = U_k Σ_k B_kᵀ`` (likewise for
        W_v) of rank kv_dim (exact: W has that rank at most); cache ``X·U_k`` and ``X·U_v`` and
        rematerialize with ``Σ·Bᵀ`` folded into the weight.
        """
        if mode == "x":
            bias = None if b_k is None else torch.cat([b_k, b_v])
            return cls([Stream(None, torch.cat([w_k, w_v]), bias, w_k.shape[0])], kv_heads, head_dim)
        if mode != "latent":
            raise ValueError(f"LayerWeights.build: mode must be 'x' or 'latent', got {mode!r}")
        streams = []
        for w, b, is_key in ((w_k, b_k, True), (w_v, b_v, False)):
            u, s, vh = torch.linalg.svd(w.double().T, full_matrices=False)  # [hidden, r], [r], [r, n]
            fold = (s[:, None] * vh).T  # [n, r]: out = latent @ fold.T
            streams.append(Stream(u.to(w.dtype).contiguous(), fold.to(w.dtype).contiguous(), b,
                                  w.shape[0] if is_key else 0))
        return cls(streams, kv_heads, head_dim)


class TokenIndex:
    """Per-cache token bookkeeping shared by every layer: each token's RoPE position and whether
    it is padding, plus the rotary tables of the current step (computed once for all layers,
    released by the last layer: :meth:`release_tables`)."""

    def __init__(self, batch_size: int, rope: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                 device: torch.device | str) -> None:
        self.batch_size, self._rope = batch_size, rope
        # capacity grows by 1.25x (as the XStores do), so a decode step does not copy the index
        self._positions = torch.zeros(batch_size, 0, dtype=torch.int64, device=device)
        self._valid = torch.zeros(batch_size, 0, dtype=torch.bool, device=device)
        self._n = 0
        self._tables: tuple[int, torch.Tensor, torch.Tensor] | None = None

    @property
    def n(self) -> int:
        return self._n

    @property
    def positions(self) -> torch.Tensor:
        """RoPE position of every token ``[batch, n]`` int64 (a view)."""
        return self._positions[:, : self._n]

    @property
    def valid(self) -> torch.Tensor:
        """``[batch, n]`` bool, False for padding (a view: padding is marked in place)."""
        return self._valid[:, : self._n]

    def extend(self, positions: torch.Tensor, total: int) -> None:
        """Record the positions ``[batch or 1, n]`` of the newest tokens if no layer did yet."""
        if self._n >= total:
            return
        pos = positions.to(self._positions.device).expand(self.batch_size, -1)
        n, k = self._n, pos.shape[1]
        if n + k > self._positions.shape[1]:
            cap = max(n + k, int(self._positions.shape[1] * _GROWTH))
            self._positions, self._valid = (_grow(t, 1, cap) for t in (self._positions, self._valid))
        self._positions[:, n : n + k] = pos
        self._valid[:, n : n + k] = True
        self._n = n + k
        self._tables = None

    def mark_padding(self, valid: torch.Tensor) -> None:
        n = valid.shape[-1]
        self._valid[:, self._n - n : self._n] &= valid.to(self._valid.device)

    def tables(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``[batch, n, head_dim]`` at the first `n` tokens' positions."""
        if self._tables is None or self._tables[0] != n:
            cos, sin = self._rope(self.positions[:, :n].clamp_min(0))
            self._tables = (n, cos.contiguous(), sin.contiguous())
        return self._tables[1], self._tables[2]

    def release_tables(self) -> None:
        """Drop the current step's rotary tables (the last layer has used them): between steps they
        would hold 2 x head_dim float32 per token for nothing."""
        self._tables = None

    def nbytes(self) -> int:
        """Bytes of the positions and padding flags held, capacity included."""
        return sum(t.numel() * t.element_size() for t in (self._positions, self._valid))

    def nbytes_in_use(self) -> int:
        """Bytes of the positions and padding flags of the tokens held (9 per token and row)."""
        return self.batch_size * self._n * (8 + 1)

    def tables_nbytes(self) -> int:
        """Bytes of the rotary tables while a step holds them (0 between steps)."""
        return 0 if self._tables is None else sum(t.numel() * t.element_size() for t in self._tables[1:])


class Accumulator:
    """XQuant-CL's running sum of dequantized deltas over the quantized tokens.

    After layer l has flushed, ``acc`` holds ``sum_{j<=l} dequantize(delta_j)`` for every quantized
    token: the value the encoder subtracts from layer l+1's input and the decoder adds layer l+1's
    delta to. Both sides read the same tensor, so nothing drifts. Layers must run in order, once
    per forward pass (layer 0 starts a new sum).
    """

    def __init__(self) -> None:
        self.acc: torch.Tensor | None = None
        self.layer = -1

    def before(self, layer: int, rows: int, batch: int, width: int, device) -> torch.Tensor:
        if layer == 0:
            self.acc = torch.zeros(batch, rows, width, device=device)
        elif self.acc is None or self.layer != layer - 1 or self.acc.shape[1] != rows:
            raise RuntimeError(
                f"XQuant-CL: layer {layer} ran after layer {self.layer}; the cross-layer "
                "accumulator needs every layer once per forward pass, in order"
            )
        self.layer = layer
        return self.acc

    def release(self) -> None:
        self.acc = None

    def nbytes(self) -> int:
        return 0 if self.acc is None else self.acc.numel() * self.acc.element_size()


def _rope(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> torch.Tensor:
    B, n, c = k.shape
    out = rotate_half_rope(k.float().reshape(B, n, c // head_dim, head_dim), cos.float(), sin.float())
    return out.reshape(B, n, c).to(k.dtype)


class RematStore:
    """One attention layer under XQuant: what it caches and attention that rematerializes K, V.

    Args:
        layer: the layer's index (XQuant-CL runs layers in order).
        weights: its projections as :class:`LayerWeights`.
        tokens: the cache's shared :class:`TokenIndex`.
        stores: one :class:`XStore` per stream of `weights`.
        absorb_values: attend with ``out = (Σ_t p_t·X̂_t)·W_vᵀ`` instead of rematerializing V.
        accumulator: XQuant-CL's shared :class:`Accumulator` (then the single stream holds the
            residual stream's deltas and `norm` turns the accumulated residual into X).
        norm: the layer's input norm (XQuant-CL only).
        key_norm: the layer's key norm for QK-norm models (``[B, T, n_k] -> [B, T, n_k]``,
            applied to the rebuilt keys before RoPE, as the model applies it to its own), or None.
        last: whether this is the model's last layer (it releases the accumulator and the rotary tables).
    """

    def __init__(self, layer: int, weights: LayerWeights, tokens: TokenIndex, stores: list[XStore],
                 absorb_values: bool = False, accumulator: Accumulator | None = None,
                 norm: Callable[[torch.Tensor], torch.Tensor] | None = None, last: bool = False,
                 key_norm: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        if len(stores) != len(weights.streams):
            raise ValueError("RematStore: one XStore per stream")
        if accumulator is not None and (norm is None or len(stores) != 1):
            raise ValueError("RematStore: XQuant-CL needs one stream (the residual) and the layer's norm")
        self.layer, self.weights, self.tokens, self.stores = layer, weights, tokens, stores
        self.absorb_values, self.accumulator, self.norm, self.last = absorb_values, accumulator, norm, last
        self.key_norm = key_norm

    # ---- writing ---------------------------------------------------------------------------

    @property
    def n_tokens(self) -> int:
        return self.stores[0].n_tokens

    @property
    def n_quantized(self) -> int:
        return self.stores[0].n_quantized

    def append(self, x: torch.Tensor, positions: torch.Tensor) -> None:
        """Cache the new tokens' input ``x [batch, n, hidden]`` (X, or the residual stream for
        XQuant-CL) at RoPE positions ``[batch or 1, n]``; they wait in the window."""
        rows = self.stores[0].batch_size
        if x.dim() != 3 or x.shape[0] != rows:
            raise ValueError(
                f"RematStore.append: the layer input must be [batch={rows}, n, hidden], got {list(x.shape)}; "
                "a cache serves the batch it was built for: build a new one (torchkvq.hf.new_cache) for another"
            )
        if not bool(torch.isfinite(x).all()):  # named here: the streams below are derived from x
            what = "residual stream" if self.accumulator is not None else "attention input"
            raise ValueError(f"RematStore.append: layer {self.layer}'s {what} contains NaN or Inf; "
                             "the cache was left unchanged")
        encoded = [x if s.encode is None else x.to(s.encode.dtype) @ s.encode for s in self.weights.streams]
        # every stream checked before any is written; a projected latent is checked for NaN/Inf
        # again (a finite input can overflow in the projection), x itself was just checked
        for st, e, s in zip(self.stores, encoded, self.weights.streams):
            st.check_append(e, check_finite=s.encode is not None)
        for st, e in zip(self.stores, encoded):
            st.write(e)
        self.tokens.extend(positions, self.n_tokens)

    def mark_padding(self, valid: torch.Tensor) -> None:
        """Mark padding among the newest ``valid.shape[1]`` tokens (attention skips them)."""
        self.tokens.mark_padding(valid)

    def flush(self, n: int) -> None:
        """Quantize the `n` oldest window tokens (n may be 0). XQuant-CL: quantize their delta to
        the accumulator, then advance the accumulator to this layer (every call, every layer)."""
        if self.accumulator is None:
            for st in self.stores:
                if n:
                    st.quantize_oldest(n)
            return
        st = self.stores[0]
        q0, q1 = st.n_quantized, st.n_quantized + n
        acc = self.accumulator.before(self.layer, q1, st.batch_size, st.width, st.window.device)
        if n:
            st.quantize_oldest(n, base=acc[:, q0:q1])
        if q1:
            codes, scale, zero = st.quantized()
            acc += ops.dequantize(codes, scale, zero, st.bits, st.group_size, -1, torch.float32)

    # ---- reading ---------------------------------------------------------------------------

    def _stream_outputs(self, i: int, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype,
                        values: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys ``[B, T, n_k]`` and values ``[B, T, n_v]`` (values empty unless `values`) of
        stream i, quantized part then window."""
        s, st = self.weights.streams[i], self.stores[i]
        D, Q = self.weights.head_dim, st.n_quantized
        n_out = s.n_k + (s.n_v if values else 0)
        if n_out == 0:
            empty = torch.zeros(st.batch_size, st.n_tokens, 0, dtype=dtype, device=st.window.device)
            return empty, empty
        w = s.weight[:n_out].to(dtype)
        b = None if s.bias is None else s.bias[:n_out].to(dtype)
        kn = self.key_norm

        def rope_keys(out: torch.Tensor, c: torch.Tensor, sn: torch.Tensor) -> torch.Tensor:
            k = out[..., : s.n_k] if kn is None else kn(out[..., : s.n_k])
            return torch.cat([_rope(k, c, sn, D), out[..., s.n_k :]], -1)

        parts = []
        if Q:
            if self.accumulator is not None:
                out = torch.nn.functional.linear(self.norm(self.accumulator.acc.to(dtype)), w, b)
                parts.append(rope_keys(out, cos[:, :Q], sin[:, :Q]) if s.n_k else out)
            else:
                codes, scale, zero = st.quantized()
                if s.n_k and kn is None:  # the kernel applies RoPE to the key channels itself
                    rc, rs = cos[:, :Q].to(dtype), sin[:, :Q].to(dtype)
                    parts.append(ops.remat_kv(codes, scale, zero, st.bits, st.group_size, w, b, rc, rs, s.n_k))
                else:  # no keys, or keys normalized before RoPE: the kernel must not rotate them
                    out = ops.remat_kv(codes, scale, zero, st.bits, st.group_size, w, b)
                    parts.append(rope_keys(out, cos[:, :Q], sin[:, :Q]) if s.n_k else out)
        if st.n_tokens > Q:
            x = st.window_tokens().to(dtype)
            if self.accumulator is not None:
                x = self.norm(x)
            out = torch.nn.functional.linear(x, w, b)
            parts.append(rope_keys(out, cos[:, Q:], sin[:, Q:]) if s.n_k else out)
        out = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        return out[..., : s.n_k], out[..., s.n_k :]

    def evict(self, first_query: int) -> None:
        """Nothing to drop: XQuant serves full-attention layers only (:class:`XQuantCache`
        refuses sliding-window models). Here so that the attention function treats every store
        alike."""

    def attend(self, query: torch.Tensor, scale: float | None = None, causal: bool = True,
               return_stats: bool = False, softcap: float | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Attention of ``query [B, Hq, L, D]`` (the newest L tokens) over every token held.

        Returns ``(out [B, Hq, L, D], lse [B, Hq, L], stats)`` like
        :meth:`torchkvq.store.KVStore.attend`; ``stats`` is empty (XQuant needs none).
        """
        if return_stats:
            raise NotImplementedError("RematStore.attend: XQuant keeps no attention statistics")
        if softcap is not None:
            raise NotImplementedError("RematStore.attend: XQuant does not support logit soft-capping")
        B, Hq, L, D = query.shape
        T, Q = self.n_tokens, self.n_quantized
        Hkv = self.weights.kv_heads
        if L > T or D != self.weights.head_dim or Hq % Hkv:
            raise ValueError(f"RematStore.attend: query must be [batch, q_heads (multiple of {Hkv}), "
                             f"L <= {T}, {self.weights.head_dim}], got {list(query.shape)}")
        scale = D**-0.5 if scale is None else scale
        dtype = self.weights.streams[0].weight.dtype
        cos, sin = self.tokens.tables(T)
        absorb = self.absorb_values and Q > 0
        keys, values = [], []
        for i in range(len(self.stores)):
            k, v = self._stream_outputs(i, cos, sin, dtype, values=not absorb)
            keys.append(k)
            values.append(v)
        K = torch.cat(keys, -1).view(B, T, Hkv, D).transpose(1, 2)
        valid = self.tokens.valid[:, :T]
        pos = torch.where(valid, torch.arange(T, device=valid.device), -1)
        if not absorb:
            V = torch.cat(values, -1).view(B, T, Hkv, D).transpose(1, 2)
            out = self._fused(query, K.contiguous(), V.contiguous(), pos, scale, causal)
        else:
            out = self._absorbed(query, K, cos, sin, valid, scale, causal)
        if self.last:
            self.tokens.release_tables()
            if self.accumulator is not None:
                self.accumulator.release()
        return out

    def _fused(self, query, K, V, pos, scale, causal):
        """kvq.quant_attention over the rematerialized K, V given as full-precision tokens."""
        B, Hkv, _, D = K.shape
        z = lambda *s, dt=K.dtype: torch.zeros(*s, dtype=dt, device=K.device)  # noqa: E731
        codes, bits = z(B, Hkv, 0, dt=torch.uint8), z(0, dt=torch.int32)
        sc, vs = z(B, Hkv, 0, D, dt=torch.float16), z(B, Hkv, 0, 1, dt=torch.float16)
        return ops.quant_attention(query, codes, sc, sc, bits, codes, vs, vs, bits, K, V, pos,
                                   None, None, None, None, None, 8, D, scale, causal)

    def _absorbed(self, query, K, cos, sin, valid, scale, causal):
        """``out = P_w·V_w + (P_q·X̂_q)·W_vᵀ``: values of quantized tokens are never rebuilt."""
        B, Hq, L, D = query.shape
        Hkv, T, Q = K.shape[1], K.shape[2], self.n_quantized
        g = Hq // Hkv
        q = query.float().reshape(B, Hkv, g, L, D)
        s = torch.einsum("bkgld,bktd->bkglt", q, K.float()) * scale
        mask = valid[:, None, None, None, :]
        if causal:
            t = torch.arange(T, device=K.device)
            mask = mask & (t[None, :] <= (T - L + torch.arange(L, device=K.device))[:, None])
        s = s.masked_fill(~mask, float("-inf"))
        lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
        out = torch.zeros(B, Hkv, g, L, D, device=K.device)
        dtype = self.weights.streams[0].weight.dtype
        for i, (stream, st) in enumerate(zip(self.weights.streams, self.stores)):
            if stream.n_v == 0:
                continue
            w_v = stream.weight[stream.n_k :].float().view(Hkv, D, stream.width)
            p_q = p[..., :Q].reshape(B, Hkv * g * L, Q)
            if self.accumulator is not None:
                y = p_q @ self.norm(self.accumulator.acc.to(dtype)).float()
            else:
                codes, sc, zero = st.quantized()
                y = ops.dequant_matmul(p_q, codes, sc, zero, st.bits, st.group_size, -1, False)
            out += torch.einsum("bkglw,kdw->bkgld", y.view(B, Hkv, g, L, stream.width), w_v)
            if stream.bias is not None:
                b_v = stream.bias[stream.n_k :].float().view(Hkv, 1, 1, D)
                out += p[..., :Q].sum(-1, keepdim=True) * b_v
            if T > Q:  # the window's values are rebuilt: they are few
                x = st.window_tokens().to(dtype)
                if self.accumulator is not None:
                    x = self.norm(x)
                v_w = torch.nn.functional.linear(x, stream.weight[stream.n_k :].to(dtype),
                                                 None if stream.bias is None else stream.bias[stream.n_k :].to(dtype))
                v_w = v_w.float().view(B, T - Q, Hkv, D).transpose(1, 2)
                out += torch.einsum("bkglt,bktd->bkgld", p[..., Q:], v_w)
        empty = torch.zeros(0, device=K.device)
        return out.reshape(B, Hq, L, D).to(query.dtype), lse.reshape(B, Hq, L), empty

    # ---- bytes -----------------------------------------------------------------------------

    def nbytes(self) -> int:
        """Bytes this layer's stores hold (the shared token index and accumulator are counted by
        the cache, once)."""
        return sum(st.nbytes() for st in self.stores)

    def nbytes_breakdown(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for st in self.stores:
            for k, v in st.nbytes_breakdown().items():
                total[k] = total.get(k, 0) + v
        return total

    def fp16_nbytes(self) -> int:
        """Bytes an fp16 K/V cache of the same tokens would take."""
        return 2 * 2 * self.stores[0].batch_size * self.weights.kv_heads * self.weights.head_dim * self.n_tokens

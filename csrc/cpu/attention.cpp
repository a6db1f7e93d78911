// CPU kernel of kvq::quant_attention: flash-style attention over a compressed KV store.
//
// Work is split over (batch, kv head, token range). Each work item walks its tiles - a quantized
// block of G tokens or a chunk of full-precision slots - and for each tile:
//   1. scores every query row of the kv head's group against all the tile's tokens at once
//      (GQA: the g query heads and L queries of one kv head share each tile), reading 1-, 2-
//      and 4-bit key codes straight from their packed bytes (other widths are unpacked into a
//      small float32 buffer that stays in L1; never the history). The codes are never
//      dequantized: the block's per-channel key scale is folded into the query;
//   2. folds the tile into a running (max, sum, accumulator) per row - the online softmax;
//   3. accumulates probabilities times value codes (1-4 bits read from the packed runs), the
//      per-token value scale folded into the probability and the zeros summed once per row and
//      channel group.
// Partial results of the token ranges of one (batch, kv head) are merged by log-sum-exp.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "attention_args.h"
#include "cpu/tiles.h"
#include "dispatch.h"

namespace kvq::cpu {
namespace {

constexpr int64_t kFpTile = 32;  // full-precision slots per tile
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct RowState {
  std::vector<float> m, l, acc;  // per query row: running max, sum, and [rows, D] accumulator
  void reset(int64_t rows, int64_t D) {
    m.assign(rows, kNegInf);
    l.assign(rows, 0.f);
    acc.assign(rows * D, 0.f);
  }
};

template <typename TQ, typename TF, typename S>
struct Attention {
  // problem
  int64_t B, Hq, L, D, Hkv, g, NB, G, VG, F, Q, rows, n_k_out, n_v_out;
  float scale;
  bool causal, stats_wanted;
  int64_t q_offset;  // position of quantized token 0
  int64_t window;    // keys a query sees back from its own position (itself included); 0: all
  float softcap;     // scores become softcap * tanh(score / softcap); 0: no capping
  // inputs
  const TQ* query;
  const uint8_t *k_codes, *v_codes;
  int64_t k_pool, v_pool;  // bytes per (batch, kv head)
  const S *k_scale, *k_zero, *v_scale, *v_zero;
  const int32_t *k_bits, *v_bits;
  std::vector<int64_t> k_off, v_off;
  const TF *k_fp, *v_fp;
  const int64_t* fp_pos;
  const bool* q_exclude;
  const int16_t *k_oi, *v_oi;
  const TF *k_ov, *v_ov;
  std::vector<int64_t> end_pos;  // per batch row: one past the newest position held

  int64_t tiles() const { return NB + (F + kFpTile - 1) / kFpTile; }
  int64_t cap() const { return std::max(G, kFpTile); }

  // Per-thread buffers of one tile, all small enough for L1/L2.
  struct Scratch {
    std::vector<float> q, qs, qz, kt, vt, s, p, w, scl, zro;
    std::vector<int64_t> pos;
    std::vector<uint8_t> tmp;
  };
  Scratch scratch(int64_t b, int64_t h) const {
    const int64_t n = cap(), vgroups = D / VG;
    Scratch x{std::vector<float>(rows * D), std::vector<float>(rows * D), std::vector<float>(rows),
              std::vector<float>(std::max(n, rows) * D), std::vector<float>(n * D), std::vector<float>(rows * n),
              std::vector<float>(rows * n), std::vector<float>(n * vgroups * rows),
              std::vector<float>(std::max(D, G * vgroups)), std::vector<float>(std::max(D, G * vgroups)),
              std::vector<int64_t>(n), std::vector<uint8_t>(n * D)};
    load_queries(b, h, x.q);
    return x;
  }

  static void to_float(const S* src, int64_t n, float* dst) {
    if constexpr (std::is_same_v<S, float>) {
      std::copy(src, src + n, dst);
    } else {
      static_assert(std::is_same_v<S, c10::Half>, "scales are float32 or float16");
      half_to_float(reinterpret_cast<const uint16_t*>(src), dst, n);
    }
  }

  // Scores x.s [rows, n] of every query row against tile `t` of (b, h), soft-capped if asked,
  // masked (invalid, in the future, or out of the query's window) to -inf; returns the tile's token count n, 0 when it holds nothing to attend to.
  // Quantized keys are never dequantized: with one (scale s, zero z) per channel for the whole
  // block, q . (s * code + z) = (q * s) . code + q . z, so the query takes the scale.
  int64_t tile_scores(int64_t b, int64_t h, int64_t t, Scratch& x) const {
    const int64_t bh = b * Hkv + h;
    int64_t n;
    if (t < NB) {
      if (k_bits[t] == 0) return 0;
      n = G;
      bool any = false;
      for (int64_t j = 0; j < G; ++j) {
        const int64_t i = t * G + j;
        const bool skip = q_exclude != nullptr && q_exclude[b * Q + i];
        x.pos[j] = skip ? -1 : q_offset + i;
        any |= !skip;
      }
      if (!any) return 0;
      to_float(k_scale + (bh * NB + t) * D, D, x.scl.data());
      to_float(k_zero + (bh * NB + t) * D, D, x.zro.data());
      mul_columns(x.q.data(), rows, D, x.scl.data(), x.qs.data());
      score_tile(x.q.data(), rows, x.zro.data(), 1, D, nullptr, x.qz.data());
      score_codes(x.qs.data(), rows, k_codes + bh * k_pool + k_off[t], G, D, k_bits[t], x.qz.data(),
                  x.tmp.data(), x.kt.data(), x.s.data());
      // Outliers add ov at channel oi of token j: q . e_oi * ov.
      for (int64_t j = 0; j < G; ++j) {
        const int64_t row = bh * Q + t * G + j;
        for (int64_t o = 0; o < n_k_out; ++o) {
          const int64_t c = k_oi[row * n_k_out + o];
          const float ov = static_cast<float>(k_ov[row * n_k_out + o]);
          for (int64_t r = 0; r < rows; ++r) x.s[r * G + j] += x.q[r * D + c] * ov;
        }
      }
    } else {
      const int64_t f0 = (t - NB) * kFpTile;
      n = std::min(kFpTile, F - f0);
      bool any = false;
      for (int64_t j = 0; j < n; ++j) {
        x.pos[j] = fp_pos[b * F + f0 + j];
        any |= x.pos[j] >= 0;
      }
      if (!any) return 0;
      const TF* ksrc = k_fp + (bh * F + f0) * D;
      for (int64_t e = 0; e < n * D; ++e) x.kt[e] = static_cast<float>(ksrc[e]);
      score_tile(x.q.data(), rows, x.kt.data(), n, D, nullptr, x.s.data());
    }
    if (softcap > 0.f)
      for (int64_t e = 0; e < rows * n; ++e) x.s[e] = softcap * std::tanh(x.s[e] / softcap);
    // Most tiles are seen whole by every row: valid tokens, none after the earliest query and,
    // with a window, none before the newest query's window.
    int64_t newest = -1, oldest = std::numeric_limits<int64_t>::max();
    bool all_valid = true;
    for (int64_t j = 0; j < n; ++j) {
      newest = std::max(newest, x.pos[j]);
      oldest = std::min(oldest, x.pos[j]);
      all_valid &= x.pos[j] >= 0;
    }
    if (all_valid && (!causal || newest <= end_pos[b] - L) &&
        (window == 0 || oldest > end_pos[b] - 1 - window))
      return n;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t qpos = end_pos[b] - L + r % L;
      for (int64_t j = 0; j < n; ++j) {
        const bool visible = x.pos[j] >= 0 && (!causal || x.pos[j] <= qpos) &&
                             (window == 0 || x.pos[j] > qpos - window);
        if (!visible) x.s[r * n + j] = kNegInf;
      }
    }
    return n;
  }

  // acc += P . V for tile `t` with probabilities x.p [rows, n]. Quantized values stay codes:
  // with (scale s, zero z) per token and channel group, sum_j p_j (s_j code_j + z_j) =
  // sum_j (p_j s_j) code_j + sum_j p_j z_j, the last term one number per row and group.
  void tile_values(int64_t b, int64_t h, int64_t t, int64_t n, Scratch& x, float* acc) const {
    const int64_t bh = b * Hkv + h;
    if (t >= NB) {
      const TF* vsrc = v_fp + (bh * F + (t - NB) * kFpTile) * D;
      for (int64_t e = 0; e < n * D; ++e) x.vt[e] = static_cast<float>(vsrc[e]);
      accumulate_tile(x.p.data(), x.vt.data(), rows, n, D, D, acc);  // weights = probabilities
      return;
    }
    const int64_t vgroups = D / VG;
    float* vs = x.scl.data();
    float* vz = x.zro.data();
    to_float(v_scale + (bh * Q + t * G) * vgroups, G * vgroups, vs);
    to_float(v_zero + (bh * Q + t * G) * vgroups, G * vgroups, vz);
    value_weights(x.p.data(), rows, G, vs, vz, D, VG, x.kt.data() /* keys are done with */,
                  x.w.data(), acc);
    accumulate_codes(x.w.data(), v_codes + bh * v_pool + v_off[t], rows, n, D, VG, v_bits[t],
                     x.tmp.data(), x.vt.data(), acc);
    for (int64_t j = 0; j < G; ++j) {
      const int64_t row = bh * Q + t * G + j;
      for (int64_t o = 0; o < n_v_out; ++o) {
        const int64_t c = v_oi[row * n_v_out + o];
        const float ov = static_cast<float>(v_ov[row * n_v_out + o]);
        for (int64_t r = 0; r < rows; ++r) acc[r * D + c] += x.p[r * n + j] * ov;
      }
    }
  }

  void load_queries(int64_t b, int64_t h, std::vector<float>& q) const {
    // Query head h*g + gi, query l -> row gi*L + l; pre-scaled by the softmax scale.
    for (int64_t gi = 0; gi < g; ++gi)
      for (int64_t l = 0; l < L; ++l) {
        const TQ* src = query + (((b * Hq) + h * g + gi) * L + l) * D;
        float* dst = q.data() + (gi * L + l) * D;
        for (int64_t c = 0; c < D; ++c) dst[c] = static_cast<float>(src[c]) * scale;
      }
  }

  // Online softmax over tiles [t0, t1) of (b, h).
  void run(int64_t b, int64_t h, int64_t t0, int64_t t1, RowState& st) const {
    Scratch x = scratch(b, h);
    st.reset(rows, D);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = tile_scores(b, h, t, x);
      if (n == 0) continue;
      bool any = false;
      for (int64_t r = 0; r < rows; ++r) {
        const float* sr = x.s.data() + r * n;
        float* pr = x.p.data() + r * n;
        // NaN once any score the row sees is NaN (a NaN in its query or in a key); the NaN then
        // flows through alpha, the sum and the accumulator, and the merge writes NaN.
        const float mx = max_of(sr, n, st.m[r]);
        if (mx == kNegInf) {  // this row sees nothing in the tile or before it
          std::fill(pr, pr + n, 0.f);
          continue;
        }
        any = true;
        const float alpha = std::exp(st.m[r] - mx);
        if (alpha != 1.f) scale_inplace(alpha, st.acc.data() + r * D, D);
        st.l[r] = st.l[r] * alpha + exp_shifted(sr, n, mx, pr);
        st.m[r] = mx;
      }
      if (any) tile_values(b, h, t, n, x, st.acc.data());
    }
  }

  // Per held token, the largest probability any row gives it (needs the final lse).
  void stats(int64_t b, int64_t h, int64_t t0, int64_t t1, const float* lse, float* out) const {
    Scratch x = scratch(b, h);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t first = t < NB ? t * G : Q + (t - NB) * kFpTile;
      const int64_t width = t < NB ? G : std::min(kFpTile, F - (t - NB) * kFpTile);
      std::fill(out + first, out + first + width, 0.f);
      const int64_t n = tile_scores(b, h, t, x);
      if (n == 0) continue;
      for (int64_t r = 0; r < rows; ++r) {
        // A row that sees nothing, or whose scores hold NaN (its lse is NaN), gives no token a
        // probability: the stats stay those of the other rows, as on CUDA.
        if (lse[r] == kNegInf || std::isnan(lse[r])) continue;
        float* pr = x.p.data() + r * n;
        exp_shifted(x.s.data() + r * n, n, lse[r], pr);
        for (int64_t j = 0; j < n; ++j) out[first + j] = std::max(out[first + j], pr[j]);
      }
    }
  }
};

template <typename TQ, typename TF, typename S>
void run_attention(Attention<TQ, TF, S>& a, at::Tensor& out, at::Tensor& lse, at::Tensor& stats) {
  const int64_t pairs = a.B * a.Hkv, tiles = a.tiles();
  // Split each (batch, kv head) over token ranges when there are too few pairs for the threads,
  // into a number of work items the threads share evenly (parallel_for hands each thread one
  // contiguous run: 9 items on 2 threads would leave one thread a fifth of the work idle).
  const int64_t threads = at::get_num_threads(), want = 4 * threads;
  int64_t splits = std::max<int64_t>(1, std::min<int64_t>(tiles, (want + pairs - 1) / pairs));
  while (splits < tiles && (pairs * splits) % threads != 0) ++splits;
  const int64_t per = (tiles + splits - 1) / std::max<int64_t>(splits, 1);
  std::vector<RowState> parts(pairs * splits);
  at::parallel_for(0, pairs * splits, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const int64_t pair = w / splits, sp = w % splits;
      const int64_t t0 = sp * per, t1 = std::min(tiles, t0 + per);
      a.run(pair / a.Hkv, pair % a.Hkv, t0, t1, parts[w]);
    }
  });
  TQ* op = out.mutable_data_ptr<TQ>();
  float* lp = lse.mutable_data_ptr<float>();
  std::vector<float> lse_rows(pairs * a.rows);
  // The merge is light: run it on the calling thread unless there is a lot of it, since each
  // parallel region costs a wake-up of every worker.
  const int64_t merge_grain = std::max<int64_t>(1, (int64_t{1} << 16) / (a.rows * a.D * splits));
  at::parallel_for(0, pairs, merge_grain, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(a.D);
    for (int64_t pair = begin; pair < end; ++pair) {
      const int64_t b = pair / a.Hkv, h = pair % a.Hkv;
      for (int64_t r = 0; r < a.rows; ++r) {
        float M = kNegInf;
        bool nan = false;  // a NaN score (running max NaN) or a +inf one (sum NaN): NaN out, as SDPA
        for (int64_t sp = 0; sp < splits; ++sp) {
          const float m = parts[pair * splits + sp].m[r];
          nan |= std::isnan(m);
          M = std::max(M, m);
        }
        float l = 0.f;
        std::fill(acc.begin(), acc.end(), 0.f);
        if (!nan && M != kNegInf) {
          for (int64_t sp = 0; sp < splits; ++sp) {
            const RowState& st = parts[pair * splits + sp];
            if (st.m[r] == kNegInf) continue;
            const float w = std::exp(st.m[r] - M);
            l += st.l[r] * w;
            axpy(w, st.acc.data() + r * a.D, acc.data(), a.D);
          }
        }
        const int64_t gi = r / a.L, li = r % a.L;
        const int64_t qh = h * a.g + gi;
        TQ* dst = op + ((b * a.Hq + qh) * a.L + li) * a.D;
        nan |= std::isnan(l);
        constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
        const float inv = l > 0.f ? 1.f / l : 0.f;
        for (int64_t c = 0; c < a.D; ++c) dst[c] = static_cast<TQ>(nan ? kNaN : acc[c] * inv);
        const float row_lse = nan ? kNaN : l > 0.f ? M + std::log(l) : kNegInf;
        lp[(b * a.Hq + qh) * a.L + li] = row_lse;
        lse_rows[pair * a.rows + r] = row_lse;
      }
    }
  });
  if (!a.stats_wanted) return;
  float* sp = stats.mutable_data_ptr<float>();
  const int64_t T = a.Q + a.F;
  at::parallel_for(0, pairs * splits, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const int64_t pair = w / splits, s = w % splits;
      const int64_t t0 = s * per, t1 = std::min(tiles, t0 + per);
      a.stats(pair / a.Hkv, pair % a.Hkv, t0, t1, lse_rows.data() + pair * a.rows, sp + pair * T);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quant_attention(
    const at::Tensor& query_in, const at::Tensor& k_codes_in, const at::Tensor& k_scale_in,
    const at::Tensor& k_zero_in, const at::Tensor& k_bits_in, const at::Tensor& v_codes_in,
    const at::Tensor& v_scale_in, const at::Tensor& v_zero_in, const at::Tensor& v_bits_in,
    const at::Tensor& k_fp_in, const at::Tensor& v_fp_in, const at::Tensor& fp_pos_in,
    const std::optional<at::Tensor>& q_exclude_in, const std::optional<at::Tensor>& k_oi_in,
    const std::optional<at::Tensor>& k_ov_in, const std::optional<at::Tensor>& v_oi_in,
    const std::optional<at::Tensor>& v_ov_in, int64_t group_size, int64_t v_group_size,
    double scale, bool causal, bool return_stats, int64_t q_offset,
    std::optional<int64_t> window, std::optional<double> softcap) {
  const AttentionShape shp = check_quant_attention_args(
      query_in, k_codes_in, k_scale_in, k_zero_in, k_bits_in, v_codes_in, v_scale_in, v_zero_in,
      v_bits_in, k_fp_in, v_fp_in, fp_pos_in, q_exclude_in, k_oi_in, k_ov_in, v_oi_in, v_ov_in,
      group_size, v_group_size);
  check_attention_frame(q_offset, window, softcap, causal);
  const at::Tensor query = query_in.contiguous(), k_codes = k_codes_in.contiguous(),
                   k_scale = k_scale_in.contiguous(), k_zero = k_zero_in.contiguous(),
                   k_bits = k_bits_in.contiguous(), v_codes = v_codes_in.contiguous(),
                   v_scale = v_scale_in.contiguous(), v_zero = v_zero_in.contiguous(),
                   v_bits = v_bits_in.contiguous(), k_fp = k_fp_in.contiguous(),
                   v_fp = v_fp_in.contiguous(), fp_pos = fp_pos_in.contiguous();
  const auto opt = [](const std::optional<at::Tensor>& t) {
    return t.has_value() ? t->contiguous() : at::Tensor();
  };
  const at::Tensor q_exclude = opt(q_exclude_in), k_oi = opt(k_oi_in), k_ov = opt(k_ov_in),
                   v_oi = opt(v_oi_in), v_ov = opt(v_ov_in);
  const std::vector<int64_t> k_off = block_offsets("k", k_bits, group_size * shp.D / 8, k_codes.size(2));
  const std::vector<int64_t> v_off = block_offsets("v", v_bits, group_size * shp.D / 8, v_codes.size(2));
  for (int64_t b = 0; b < shp.NB; ++b) {
    TORCH_CHECK((k_bits.const_data_ptr<int32_t>()[b] == 0) == (v_bits.const_data_ptr<int32_t>()[b] == 0),
                "kvq::quant_attention: block ", b, " has k_bits ", k_bits.const_data_ptr<int32_t>()[b],
                " but v_bits ", v_bits.const_data_ptr<int32_t>()[b], "; a block is used by both or neither");
  }

  at::Tensor out = at::empty({shp.B, shp.Hq, shp.L, shp.D}, query.options());
  at::Tensor lse = at::empty({shp.B, shp.Hq, shp.L}, query.options().dtype(at::kFloat));
  at::Tensor stats = return_stats
      ? at::empty({shp.B, shp.Hkv, shp.Q + shp.F}, query.options().dtype(at::kFloat))
      : at::empty({0}, query.options().dtype(at::kFloat));

  KVQ_DISPATCH_FLOATS(query.scalar_type(), "kvq::quant_attention", [&] {
    using TQ = scalar_t;
    KVQ_DISPATCH_FLOATS(k_fp.scalar_type(), "kvq::quant_attention", [&] {
      using TF = scalar_t;
      const auto go = [&](auto scale_tag) {
        using S = decltype(scale_tag);
        Attention<TQ, TF, S> a;
        a.B = shp.B; a.Hq = shp.Hq; a.L = shp.L; a.D = shp.D; a.Hkv = shp.Hkv;
        a.g = shp.Hq / shp.Hkv; a.NB = shp.NB; a.G = group_size; a.VG = v_group_size;
        a.F = shp.F; a.Q = shp.Q; a.rows = a.g * a.L;
        a.n_k_out = k_oi.defined() ? k_oi.size(3) : 0;
        a.n_v_out = v_oi.defined() ? v_oi.size(3) : 0;
        a.scale = static_cast<float>(scale); a.causal = causal; a.stats_wanted = return_stats;
        a.q_offset = q_offset; a.window = window.value_or(0);
        a.softcap = static_cast<float>(softcap.value_or(0.0));
        a.query = query.const_data_ptr<TQ>();
        a.k_codes = k_codes.const_data_ptr<uint8_t>(); a.v_codes = v_codes.const_data_ptr<uint8_t>();
        a.k_pool = k_codes.size(2); a.v_pool = v_codes.size(2);
        a.k_scale = k_scale.const_data_ptr<S>(); a.k_zero = k_zero.const_data_ptr<S>();
        a.v_scale = v_scale.const_data_ptr<S>(); a.v_zero = v_zero.const_data_ptr<S>();
        a.k_bits = k_bits.const_data_ptr<int32_t>(); a.v_bits = v_bits.const_data_ptr<int32_t>();
        a.k_off = k_off; a.v_off = v_off;
        a.k_fp = k_fp.const_data_ptr<TF>(); a.v_fp = v_fp.const_data_ptr<TF>();
        a.fp_pos = fp_pos.const_data_ptr<int64_t>();
        a.q_exclude = q_exclude.defined() ? q_exclude.const_data_ptr<bool>() : nullptr;
        a.k_oi = k_oi.defined() ? k_oi.const_data_ptr<int16_t>() : nullptr;
        a.v_oi = v_oi.defined() ? v_oi.const_data_ptr<int16_t>() : nullptr;
        a.k_ov = k_ov.defined() ? k_ov.const_data_ptr<TF>() : nullptr;
        a.v_ov = v_ov.defined() ? v_ov.const_data_ptr<TF>() : nullptr;
        a.end_pos = held_end_positions(k_bits, q_exclude, fp_pos, group_size, q_offset);
        run_attention(a, out, lse, stats);
      };
      if (k_scale.scalar_type() == at::kHalf) go(c10::Half{}); else go(float{});
    });
  });
  return {out, lse, stats};
}

}  // namespace

TORCH_LIBRARY_IMPL(kvq, CPU, m) { m.impl("quant_attention", &quant_attention); }

}  // namespace kvq::cpu

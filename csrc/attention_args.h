// Argument validation of kvq::quant_attention (the same rules and messages as
// src/torchkvq/_checks.py), plus the block bookkeeping both backends derive from k_bits.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>
#include <utility>
#include <vector>

#include "quantize_args.h"

namespace kvq {

struct AttentionShape {
  int64_t B, Hq, L, D, Hkv, NB, Q, F;
};

inline void check_attention_shape(const at::Tensor& t, const char* name,
                                  std::vector<int64_t> expected, const char* why) {
  TORCH_CHECK(t.sizes().vec() == expected, "kvq::quant_attention: ", name, " must have shape ",
              shape_str(expected), " (", why, "), got ", shape_str(t.sizes()));
}

inline void check_attention_outliers(const std::optional<at::Tensor>& index,
                                     const std::optional<at::Tensor>& value, const char* prefix,
                                     const AttentionShape& s, const at::Tensor& k_fp) {
  constexpr const char* op = "kvq::quant_attention";
  TORCH_CHECK(index.has_value() == value.has_value(), op, ": ", prefix, "index and ", prefix,
              "value must be given together");
  if (!index.has_value()) return;
  TORCH_CHECK(index->scalar_type() == at::kShort, op, ": ", prefix, "index must be int16, got ",
              index->scalar_type());
  TORCH_CHECK(value->scalar_type() == k_fp.scalar_type(), op, ": ", prefix,
              "value must have k_fp's dtype ", k_fp.scalar_type(), ", got ", value->scalar_type());
  TORCH_CHECK(index->dim() == 4 && index->size(0) == s.B && index->size(1) == s.Hkv &&
                  index->size(2) == s.Q && index->size(3) <= s.D,
              op, ": ", prefix, "index must have shape [", s.B, ", ", s.Hkv, ", ", s.Q,
              ", n] with n <= head_dim, got ", shape_str(index->sizes()));
  TORCH_CHECK(value->sizes() == index->sizes(), op, ": ", prefix, "value must have the shape of ",
              prefix, "index ", shape_str(index->sizes()), ", got ", shape_str(value->sizes()));
}

inline AttentionShape check_quant_attention_args(
    const at::Tensor& query, const at::Tensor& k_codes, const at::Tensor& k_scale,
    const at::Tensor& k_zero, const at::Tensor& k_bits, const at::Tensor& v_codes,
    const at::Tensor& v_scale, const at::Tensor& v_zero, const at::Tensor& v_bits,
    const at::Tensor& k_fp, const at::Tensor& v_fp, const at::Tensor& fp_pos,
    const std::optional<at::Tensor>& q_exclude, const std::optional<at::Tensor>& k_oi,
    const std::optional<at::Tensor>& k_ov, const std::optional<at::Tensor>& v_oi,
    const std::optional<at::Tensor>& v_ov, int64_t group_size, int64_t v_group_size) {
  constexpr const char* op = "kvq::quant_attention";
  TORCH_CHECK(is_float_input(query.scalar_type()), op,
              ": query must be float32, float16 or bfloat16, got ", query.scalar_type());
  TORCH_CHECK(query.dim() == 4, op, ": query must be [batch, q_heads, q_len, head_dim], got rank ",
              query.dim());
  TORCH_CHECK(k_fp.dim() == 4, op,
              ": k_fp must be [batch, kv_heads, fp_tokens, head_dim], got rank ", k_fp.dim());
  AttentionShape s{query.size(0), query.size(1), query.size(2), query.size(3), k_fp.size(1),
                   k_bits.dim() == 1 ? k_bits.size(0) : -1, 0, k_fp.size(2)};
  TORCH_CHECK(s.L >= 1 && s.D >= 1 && s.B >= 1, op, ": query must not be empty, got shape ",
              shape_str(query.sizes()));
  TORCH_CHECK(s.Hkv >= 1 && s.Hq % s.Hkv == 0, op, ": query heads (", s.Hq,
              ") must be a multiple of kv heads (", s.Hkv, ")");
  // Every input against query, in the order of _checks.py, so a message names the misplaced one.
  const std::pair<const char*, const at::Tensor*> inputs[] = {
      {"k_codes", &k_codes}, {"k_scale", &k_scale}, {"k_zero", &k_zero}, {"k_bits", &k_bits},
      {"v_codes", &v_codes}, {"v_scale", &v_scale}, {"v_zero", &v_zero}, {"v_bits", &v_bits},
      {"k_fp", &k_fp},       {"v_fp", &v_fp},       {"fp_pos", &fp_pos}};
  for (const auto& [name, t] : inputs) check_same_device(op, name, *t, "query", query);
  const std::pair<const char*, const std::optional<at::Tensor>*> optional_inputs[] = {
      {"q_exclude", &q_exclude},      {"k_outlier_index", &k_oi}, {"k_outlier_value", &k_ov},
      {"v_outlier_index", &v_oi},     {"v_outlier_value", &v_ov}};
  for (const auto& [name, t] : optional_inputs)
    if (t->has_value()) check_same_device(op, name, **t, "query", query);
  check_bits_and_group(op, 1, group_size);
  TORCH_CHECK(v_group_size > 0 && v_group_size % 8 == 0 && s.D % v_group_size == 0, op,
              ": v_group_size must be a positive multiple of 8 dividing head_dim ", s.D, ", got ",
              v_group_size);
  TORCH_CHECK(is_float_input(k_fp.scalar_type()), op,
              ": k_fp must be float32, float16 or bfloat16, got ", k_fp.scalar_type());
  check_attention_shape(k_fp, "k_fp", {s.B, s.Hkv, s.F, s.D}, "batch, kv heads, fp tokens, head_dim");
  TORCH_CHECK(v_fp.scalar_type() == k_fp.scalar_type(), op, ": v_fp must have k_fp's dtype ",
              k_fp.scalar_type(), ", got ", v_fp.scalar_type());
  check_attention_shape(v_fp, "v_fp", {s.B, s.Hkv, s.F, s.D}, "the shape of k_fp");
  TORCH_CHECK(fp_pos.scalar_type() == at::kLong, op, ": fp_pos must be int64, got ",
              fp_pos.scalar_type());
  check_attention_shape(fp_pos, "fp_pos", {s.B, s.F},
                        "one position per batch row and fp token, -1 for an empty slot");
  for (const auto& [name, t] : {std::pair{"k_bits", &k_bits}, std::pair{"v_bits", &v_bits}}) {
    TORCH_CHECK(t->scalar_type() == at::kInt && t->dim() == 1, op, ": ", name,
                " must be a 1-D int32 tensor (one width per block), got ", t->scalar_type(),
                " of rank ", t->dim());
  }
  check_attention_shape(v_bits, "v_bits", {s.NB}, "one width per block, like k_bits");
  for (const auto& [name, t] : {std::pair{"k_codes", &k_codes}, std::pair{"v_codes", &v_codes}}) {
    TORCH_CHECK(t->scalar_type() == at::kByte && t->dim() == 3 && t->size(0) == s.B &&
                    t->size(1) == s.Hkv,
                op, ": ", name, " must be uint8 [batch, kv_heads, bytes] = [", s.B, ", ", s.Hkv,
                ", n], got ", t->scalar_type(), " ", shape_str(t->sizes()));
  }
  TORCH_CHECK(k_scale.scalar_type() == at::kHalf || k_scale.scalar_type() == at::kFloat, op,
              ": k_scale must be float16 or float32, got ", k_scale.scalar_type());
  for (const auto& [name, t] : {std::pair{"k_zero", &k_zero}, std::pair{"v_scale", &v_scale},
                                std::pair{"v_zero", &v_zero}}) {
    TORCH_CHECK(t->scalar_type() == k_scale.scalar_type(), op, ": ", name,
                " must have k_scale's dtype ", k_scale.scalar_type(),
                " (scales and zeros share one dtype), got ", t->scalar_type());
  }
  s.Q = s.NB * group_size;
  check_attention_shape(k_scale, "k_scale", {s.B, s.Hkv, s.NB, s.D}, "one per block and channel");
  check_attention_shape(k_zero, "k_zero", {s.B, s.Hkv, s.NB, s.D}, "the shape of k_scale");
  check_attention_shape(v_scale, "v_scale", {s.B, s.Hkv, s.Q, s.D / v_group_size},
                        "one per token and channel group");
  check_attention_shape(v_zero, "v_zero", {s.B, s.Hkv, s.Q, s.D / v_group_size},
                        "the shape of v_scale");
  if (q_exclude.has_value()) {
    TORCH_CHECK(q_exclude->scalar_type() == at::kBool, op, ": q_exclude must be bool, got ",
                q_exclude->scalar_type());
    check_attention_shape(*q_exclude, "q_exclude", {s.B, s.Q},
                          "one flag per batch row and quantized token");
  }
  check_attention_outliers(k_oi, k_ov, "k_outlier_", s, k_fp);
  check_attention_outliers(v_oi, v_ov, "v_outlier_", s, k_fp);
  return s;
}

// The positions and score options: q_offset, window, softcap (same messages as _checks.py).
inline void check_attention_frame(int64_t q_offset, std::optional<int64_t> window,
                                  std::optional<double> softcap, bool causal) {
  constexpr const char* op = "kvq::quant_attention";
  TORCH_CHECK(q_offset >= 0, op, ": q_offset (the position of quantized token 0) must be >= 0, got ",
              q_offset);
  if (window.has_value()) {
    TORCH_CHECK(*window >= 1, op,
                ": window must be >= 1 (the positions a query sees, its own included), got ", *window);
    TORCH_CHECK(causal, op,
                ": window needs causal=True (it is measured back from each query's position)");
  }
  if (softcap.has_value()) {
    TORCH_CHECK(*softcap > 0 && std::isfinite(*softcap), op,
                ": softcap must be a positive finite number (or None for no capping)");
  }
}

// Byte offset of every block in a pool from the per-block widths (a CPU tensor), checking the
// widths and that the pool holds them all.
inline std::vector<int64_t> block_offsets(const char* which, const at::Tensor& bits,
                                          int64_t bytes_per_bit, int64_t pool_bytes) {
  std::vector<int64_t> off(bits.numel());
  const int32_t* w = bits.const_data_ptr<int32_t>();
  int64_t total = 0;
  for (int64_t b = 0; b < bits.numel(); ++b) {
    TORCH_CHECK(w[b] >= 0 && w[b] <= 8, "kvq::quant_attention: ", which,
                "_bits must hold widths in [0, 8] (0 = unused block), got ", w[b], " at block ", b);
    off[b] = total;
    total += w[b] * bytes_per_bit;
  }
  TORCH_CHECK(total <= pool_bytes, "kvq::quant_attention: ", which, "_codes holds ", pool_bytes,
              " bytes per head but the block widths need ", total);
  return off;
}

// One past the newest position held per batch row: the causal frame of the queries. Quantized
// token i sits at position q_offset + i.
inline std::vector<int64_t> held_end_positions(const at::Tensor& k_bits,
                                               const at::Tensor& q_exclude,
                                               const at::Tensor& fp_pos, int64_t group_size,
                                               int64_t q_offset) {
  const int64_t B = fp_pos.size(0), F = fp_pos.size(1), NB = k_bits.numel(), Q = NB * group_size;
  const int32_t* w = k_bits.const_data_ptr<int32_t>();
  const int64_t* p = fp_pos.const_data_ptr<int64_t>();
  const bool* ex = q_exclude.defined() ? q_exclude.const_data_ptr<bool>() : nullptr;
  std::vector<int64_t> end(B, 0);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t i = Q - 1; i >= 0; --i) {
      if (w[i / group_size] > 0 && (ex == nullptr || !ex[b * Q + i])) {
        end[b] = q_offset + i + 1;
        break;
      }
    }
    for (int64_t f = 0; f < F; ++f) end[b] = std::max(end[b], p[b * F + f] + 1);
  }
  return end;
}

}  // namespace kvq

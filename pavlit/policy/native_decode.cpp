// One decode step of a Llama-architecture model's layers for pavlit's grouped decoder (float32, CPU).
//
// pavlit/policy/fast_decode.py does the same arithmetic in about forty tensor operations per layer; on a small
// model each of them costs more in Python and dispatch than in arithmetic. Here the matrix products stay library
// calls (the same BLAS, or oneDNN for weights prepacked for it), and everything between them - RMSNorm, RoPE with the KV-cache write, the suffix part
// of attention with the joint softmax, SiLU-and-multiply - is one loop each, without Python and without the GIL.
//
// Layouts are the grouped decoder's: rows are [group, slot]; a group's queries for kv head h are rows
// (slot, rep) of one [S*rep, d] block, scored against its prompt's prefix keys in one batched product. Each
// row's own generated keys and values live in [R, kv, capacity, d] caches, R = the rows the batch started with:
// a slot reads and writes its row's cache row through slot_cache, so dropping finished rows moves no KV.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

inline float dot(const float* a, const float* b, int64_t n) {
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int k = 0; k < 8; ++k) acc[k] += a[i + k] * b[i + k];
  }
  float sum = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// exp(x) in place, for float32 x (-inf gives 0): Cephes' range reduction and degree-6 polynomial, about one
// ulp from std::exp, written branch-free so the compiler vectorizes it (std::exp is a scalar call per value,
// and the softmax and SiLU take one per score and per MLP unit).
inline void exp_inplace(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    float c = v < -87.0f ? -87.0f : v;
    c = c > 88.0f ? 88.0f : c;
    const float k = __builtin_floorf(c * 1.44269504088896341f + 0.5f);
    const float r = (c - k * 0.693359375f) + k * 2.12194440e-4f;
    float y = 1.9875691500e-4f;
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * r * r + r + 1.0f;
    const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    x[i] = v < -87.0f ? 0.0f : y * scale;
  }
}

// dst = base + sum_j p[j] * value_j over n values [n, D] (D known at compile time keeps the sum in registers).
template <int64_t D>
inline void own_values_fixed(const float* p, const float* values, int64_t n, const float* base, float* dst) {
  float acc[D];
  for (int64_t i = 0; i < D; ++i) acc[i] = base[i];
  for (int64_t j = 0; j < n; ++j) {
    const float pj = p[j];
    const float* v = values + j * D;
    for (int64_t i = 0; i < D; ++i) acc[i] += pj * v[i];
  }
  for (int64_t i = 0; i < D; ++i) dst[i] = acc[i];
}

inline void own_values_into(const float* p, const float* values, int64_t n, int64_t d, const float* base, float* dst) {
  switch (d) {
    case 32: return own_values_fixed<32>(p, values, n, base, dst);
    case 64: return own_values_fixed<64>(p, values, n, base, dst);
    case 128: return own_values_fixed<128>(p, values, n, base, dst);
    default:
      for (int64_t i = 0; i < d; ++i) dst[i] = base[i];
      for (int64_t j = 0; j < n; ++j) {
        for (int64_t i = 0; i < d; ++i) dst[i] += p[j] * values[j * d + i];
      }
  }
}

// x @ W^T for a layer's weight W [out, in]. A weight prepacked into oneDNN's blocked layout (an MKLDNN tensor:
// pavlit/policy/decode_weights.py packs them where oneDNN's kernels are the faster ones) goes through oneDNN's
// linear; a plain one is W^T itself, [in, out] and contiguous, and goes through ATen's mm (the BLAS).
torch::Tensor project(const torch::Tensor& x, const torch::Tensor& w) {
  if (!w.is_mkldnn()) return at::mm(x, w);
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, c10::string_view,
                            c10::List<std::optional<at::Scalar>>, std::optional<c10::string_view>)>();
  return op.call(x, w, std::nullopt, "none", c10::List<std::optional<at::Scalar>>(), std::nullopt);
}

// residual + x @ w^T (one addmm for a plain weight).
torch::Tensor project_add(const torch::Tensor& residual, const torch::Tensor& x, const torch::Tensor& w) {
  if (!w.is_mkldnn()) return at::addmm(residual, x, w);
  return project(x, w).add_(residual);
}

// weight * (x * rsqrt(mean(x^2) + eps)), row by row (LlamaRMSNorm's order of operations).
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  RECORD_FUNCTION("pavlit::rms_norm", std::vector<c10::IValue>());
  const int64_t rows = x.size(0), width = x.size(1);
  auto out = torch::empty_like(x);
  const float* in = x.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* row = in + r * width;
      const float scale = 1.f / std::sqrt(dot(row, row, width) / static_cast<float>(width) + static_cast<float>(eps));
      float* dst = o + r * width;
      for (int64_t i = 0; i < width; ++i) dst[i] = w[i] * (row[i] * scale);
    }
  });
  return out;
}

}  // namespace

// hidden [G*S, hidden] (updated and returned); rope [G, 2, d] (cos, sign-folded sin at each group's position);
// per layer: weights (6 each: input norm, post-attention norm, and the products' weights transposed or prepacked
// (see project): fused qkv [hidden, N], o [H*d, hidden], fused gate-up [hidden, 2I], down [I, hidden]),
// prefix keys^T [G*kv, d, W] and prefix values [G*kv, W, d];
// own keys and values [R, kv, capacity, d] and slot_cache [G*S] (each slot's cache row, -1 for a hole: it
// attends to its prefix only and writes nothing); bias [G*kv, 1, W] (additive padding mask) or undefined.
torch::Tensor layers_step(torch::Tensor hidden, torch::Tensor rope, const std::vector<torch::Tensor>& weights,
                          const std::vector<torch::Tensor>& prefix_keys_t,
                          const std::vector<torch::Tensor>& prefix_values, const c10::optional<torch::Tensor>& bias,
                          const std::vector<torch::Tensor>& own_keys_cache,
                          const std::vector<torch::Tensor>& own_values_cache, const torch::Tensor& slot_cache,
                          int64_t t, int64_t groups, int64_t slots, int64_t heads, int64_t kv, double eps) {
  const int64_t layers = static_cast<int64_t>(own_keys_cache.size());
  const int64_t d = own_keys_cache[0].size(3), capacity = own_keys_cache[0].size(2);
  const int64_t* cache_row = slot_cache.data_ptr<int64_t>();
  const int64_t rep = heads / kv, half = d / 2, rows = groups * slots;
  const int64_t width = prefix_values[0].size(1), own = t + 1;  // prefix keys; the row's own tokens so far
  const int64_t qkv_width = (heads + 2 * kv) * d;
  const bool has_bias = bias.has_value() && bias->defined();
  const float* rope_p = rope.data_ptr<float>();

  for (int64_t layer = 0; layer < layers; ++layer) {
    const auto& in_norm = weights[6 * layer];
    const auto& post_norm = weights[6 * layer + 1];
    const auto& qkv_w = weights[6 * layer + 2];
    const auto& o_w = weights[6 * layer + 3];
    const auto& gate_up_w = weights[6 * layer + 4];
    const auto& down_w = weights[6 * layer + 5];

    auto qkv = project(rms_norm(hidden, in_norm, eps), qkv_w);  // [rows, (H + 2kv) d]
    auto queries = torch::empty({groups * kv, slots * rep, d}, hidden.options());
    float* q_p = queries.data_ptr<float>();
    const float* qkv_p = qkv.data_ptr<float>();
    float* keys_p = own_keys_cache[layer].data_ptr<float>();
    float* values_p = own_values_cache[layer].data_ptr<float>();

    // RoPE on q and k; q into the grouped query blocks, k and v into each row's cache slot t.
    {
    RECORD_FUNCTION("pavlit::rope_and_cache", std::vector<c10::IValue>());
    at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t g = row / slots, s = row % slots, c = cache_row[row];
        const float* cos = rope_p + g * 2 * d;
        const float* sin = cos + d;
        const float* src = qkv_p + row * qkv_width;
        for (int64_t h = 0; h < heads + kv; ++h) {
          const float* x = src + h * d;
          float* dst;
          if (h < heads) {
            const int64_t kvh = h / rep, r = h % rep;
            dst = q_p + ((g * kv + kvh) * slots * rep + s * rep + r) * d;
          } else if (c >= 0) {
            dst = keys_p + ((c * kv + (h - heads)) * capacity + t) * d;
          } else {
            continue;  // a hole keeps no KV
          }
          for (int64_t i = 0; i < half; ++i) dst[i] = x[i] * cos[i] + x[i + half] * sin[i];
          for (int64_t i = half; i < d; ++i) dst[i] = x[i] * cos[i] + x[i - half] * sin[i];
        }
        for (int64_t h = 0; h < kv && c >= 0; ++h) {
          const float* x = src + (heads + kv + h) * d;
          float* dst = values_p + ((c * kv + h) * capacity + t) * d;
          for (int64_t i = 0; i < d; ++i) dst[i] = x[i];
        }
      }
    });
    }

    // Prefix scores for every query of a group in one product, then the joint softmax with the own tokens.
    auto scores = has_bias ? at::baddbmm(*bias, queries, prefix_keys_t[layer]) : at::bmm(queries, prefix_keys_t[layer]);
    auto own_probs = torch::empty({groups * kv * slots * rep, own}, hidden.options());
    float* scores_p = scores.data_ptr<float>();
    float* own_p = own_probs.data_ptr<float>();
    {
    RECORD_FUNCTION("pavlit::suffix_scores_softmax", std::vector<c10::IValue>());
    at::parallel_for(0, groups * kv, 1, [&](int64_t begin, int64_t end) {
      for (int64_t block = begin; block < end; ++block) {
        const int64_t g = block / kv, kvh = block % kv;
        for (int64_t s = 0; s < slots; ++s) {
          const int64_t c = cache_row[g * slots + s], n = c >= 0 ? own : 0;
          const float* own_keys = keys_p + (std::max<int64_t>(c, 0) * kv + kvh) * capacity * d;
          for (int64_t r = 0; r < rep; ++r) {
            const int64_t query = block * slots * rep + s * rep + r;
            const float* q = q_p + query * d;
            float* prefix = scores_p + query * width;
            float* mine = own_p + query * own;
            float top = -INFINITY;
            for (int64_t j = 0; j < width; ++j) top = std::max(top, prefix[j]);
            for (int64_t j = 0; j < n; ++j) {
              mine[j] = dot(q, own_keys + j * d, d);
              top = std::max(top, mine[j]);
            }
            for (int64_t j = 0; j < width; ++j) prefix[j] -= top;
            for (int64_t j = 0; j < n; ++j) mine[j] -= top;
            exp_inplace(prefix, width);
            exp_inplace(mine, n);
            float total = 0.f;
            for (int64_t j = 0; j < width; ++j) total += prefix[j];
            for (int64_t j = 0; j < n; ++j) total += mine[j];
            const float inv = 1.f / total;
            for (int64_t j = 0; j < width; ++j) prefix[j] *= inv;
            for (int64_t j = 0; j < n; ++j) mine[j] *= inv;
          }
        }
      }
    });
    }
    auto prefix_out = at::bmm(scores, prefix_values[layer]);  // [G*kv, S*rep, d]
    auto attended = torch::empty({rows, heads * d}, hidden.options());
    const float* prefix_out_p = prefix_out.data_ptr<float>();
    float* attended_p = attended.data_ptr<float>();
    {
    RECORD_FUNCTION("pavlit::suffix_values", std::vector<c10::IValue>());
    at::parallel_for(0, groups * kv, 1, [&](int64_t begin, int64_t end) {
      for (int64_t block = begin; block < end; ++block) {
        const int64_t g = block / kv, kvh = block % kv;
        for (int64_t s = 0; s < slots; ++s) {
          const int64_t c = cache_row[g * slots + s], n = c >= 0 ? own : 0;
          const float* own_values = values_p + (std::max<int64_t>(c, 0) * kv + kvh) * capacity * d;
          for (int64_t r = 0; r < rep; ++r) {
            const int64_t query = block * slots * rep + s * rep + r;
            float* dst = attended_p + (g * slots + s) * heads * d + (kvh * rep + r) * d;
            own_values_into(own_p + query * own, own_values, n, d, prefix_out_p + query * d, dst);
          }
        }
      }
    });
    }
    hidden = project_add(hidden, attended, o_w);

    auto gate_up = project(rms_norm(hidden, post_norm, eps), gate_up_w);  // [rows, 2I]
    const int64_t inner = gate_up.size(1) / 2;
    auto activated = torch::empty({rows, inner}, hidden.options());
    const float* gu_p = gate_up.data_ptr<float>();
    float* act_p = activated.data_ptr<float>();
    {
    RECORD_FUNCTION("pavlit::silu_mul", std::vector<c10::IValue>());
    at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const float* gate = gu_p + row * 2 * inner;
        const float* up = gate + inner;
        float* dst = act_p + row * inner;
        for (int64_t i = 0; i < inner; ++i) dst[i] = -gate[i];
        exp_inplace(dst, inner);
        for (int64_t i = 0; i < inner; ++i) dst[i] = gate[i] / (1.f + dst[i]) * up[i];
      }
    });
    }
    hidden = project_add(hidden, activated, down_w);
  }
  return hidden;
}

// One whole step: tokens [real rows] (placed into their slots [G*S] when row_slot is given: the other slots are
// holes, fed token 0 and dropped before the output layer); rope_table [reach, 2, d] read at positions [G];
// weights = [embedding, final norm, output layer] + 6 per layer; the caches and slot_cache as in layers_step.
// Returns logits [real rows, V].
torch::Tensor decode_step(torch::Tensor tokens, const c10::optional<torch::Tensor>& row_slot, torch::Tensor rope_table,
                          torch::Tensor positions, const std::vector<torch::Tensor>& weights,
                          const std::vector<torch::Tensor>& prefix_keys_t,
                          const std::vector<torch::Tensor>& prefix_values, const c10::optional<torch::Tensor>& bias,
                          const std::vector<torch::Tensor>& own_keys_cache,
                          const std::vector<torch::Tensor>& own_values_cache, const torch::Tensor& slot_cache,
                          int64_t t, int64_t groups, int64_t slots, int64_t heads, int64_t kv, double eps) {
  const bool holes = row_slot.has_value() && row_slot->defined();
  if (holes) tokens = at::zeros({groups * slots}, tokens.options()).index_copy_(0, *row_slot, tokens);
  auto hidden = at::embedding(weights[0], tokens).contiguous();
  auto rope = rope_table.index_select(0, positions).contiguous();
  std::vector<torch::Tensor> layer_weights(weights.begin() + 3, weights.end());
  hidden = layers_step(hidden, rope, layer_weights, prefix_keys_t, prefix_values, bias, own_keys_cache,
                       own_values_cache, slot_cache, t, groups, slots, heads, kv, eps);
  if (holes) hidden = hidden.index_select(0, *row_slot);
  return project(rms_norm(hidden.contiguous(), weights[1], eps), weights[2]);
}

// One token per row by inverting the cumulative distribution of softmax(logits / temperature): the first token
// whose cumulative mass exceeds draw * total (pavlit/policy/sampling.py's rule, same draws). The unnormalised
// masses exp((l - max) / T) are summed in float64 over blocks of 64 tokens, eight lanes each, then the walk
// descends into the one block holding the draw: the sequential float64 cumulative sum over the vocabulary
// (49,152 dependent adds per row for SmolLM2) becomes ~1,500 independent ones. Rounding differs from the
// sequential sum by ~1e-16 of the total, the same order as the sequential sum's own.
torch::Tensor sample_rows(torch::Tensor logits, torch::Tensor draws, double temperature) {
  RECORD_FUNCTION("pavlit::sample_rows", std::vector<c10::IValue>());
  auto x = logits.to(torch::kFloat32).contiguous();
  auto u = draws.to(torch::kFloat64).contiguous();
  const int64_t rows = x.size(0), vocab = x.size(1);
  constexpr int64_t block = 64;
  const int64_t blocks = (vocab + block - 1) / block;
  auto picked = torch::empty({rows}, logits.options().dtype(torch::kLong));
  const float* in = x.data_ptr<float>();
  const double* draw = u.data_ptr<double>();
  int64_t* out = picked.data_ptr<int64_t>();
  const float inv_t = static_cast<float>(1.0 / temperature);
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> mass(vocab);
    std::vector<double> sums(blocks);
    for (int64_t r = begin; r < end; ++r) {
      const float* row = in + r * vocab;
      float top = -INFINITY;
      for (int64_t j = 0; j < vocab; ++j) top = std::max(top, row[j]);
      float* p = mass.data();
      if (top == -INFINITY) {  // nothing has mass: the last token, as the float64 cumulative sum would pick
        out[r] = vocab - 1;
        continue;
      }
      for (int64_t j = 0; j < vocab; ++j) p[j] = (row[j] - top) * inv_t;
      exp_inplace(p, vocab);
      double total = 0.0;
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t lo = b * block, hi = std::min(vocab, lo + block);
        double lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        int64_t j = lo;
        for (; j + 8 <= hi; j += 8) {
          for (int k = 0; k < 8; ++k) lane[k] += static_cast<double>(p[j + k]);
        }
        double sum = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
        for (; j < hi; ++j) sum += static_cast<double>(p[j]);
        sums[b] = sum;
        total += sum;
      }
      const double target = draw[r] * total;
      double before = 0.0;
      int64_t b = 0;
      while (b + 1 < blocks && before + sums[b] <= target) before += sums[b++];
      int64_t choice = -1, last = -1;
      for (int64_t j = b * block; j < vocab; ++j) {  // normally ends inside block b; rounding may carry it on
        if (p[j] > 0.f) last = j;
        before += static_cast<double>(p[j]);
        if (before > target && p[j] > 0.f) {
          choice = j;
          break;
        }
      }
      out[r] = choice >= 0 ? choice : (last >= 0 ? last : vocab - 1);
    }
  });
  return picked;
}

// The token loop's bookkeeping for one new token per row (pavlit/policy/decode.py's record and stop, same rule):
// write tokens [rows] into column t of generated [rows, T] (and their log-probabilities under logits [rows, V]
// into logprobs, when given); lengths += alive; a row stops on an EOS token (codes = 1) or, with max_steps > 0,
// once steps_done (+= step_table[token]) reaches max_steps (codes = 2); alive drops stopped rows. Returns how
// many rows are still alive: one call and no GIL instead of about fifteen tensor operations per token.
int64_t record_rows(const torch::Tensor& tokens, int64_t t, torch::Tensor generated, torch::Tensor lengths,
                    torch::Tensor codes, torch::Tensor alive, const torch::Tensor& is_eos,
                    const c10::optional<torch::Tensor>& logits, const c10::optional<torch::Tensor>& logprobs,
                    const c10::optional<torch::Tensor>& steps_done, const c10::optional<torch::Tensor>& step_table,
                    int64_t max_steps) {
  RECORD_FUNCTION("pavlit::record_rows", std::vector<c10::IValue>());
  TORCH_CHECK(tokens.scalar_type() == torch::kLong && generated.scalar_type() == torch::kLong &&
                  lengths.scalar_type() == torch::kLong && codes.scalar_type() == torch::kLong &&
                  alive.scalar_type() == torch::kBool && is_eos.scalar_type() == torch::kBool,
              "record_rows: tokens, generated, lengths and codes must be int64, alive and is_eos bool");
  TORCH_CHECK(generated.is_contiguous() && lengths.is_contiguous() && codes.is_contiguous() && alive.is_contiguous(),
              "record_rows: the row state must be contiguous");
  const int64_t rows = tokens.size(0), width = generated.size(1);
  TORCH_CHECK(generated.size(0) == rows && t >= 0 && t < width, "record_rows: ", rows, " tokens for column ", t,
              " of generated ", generated.sizes());
  const auto token_t = tokens.contiguous();
  const int64_t* token = token_t.data_ptr<int64_t>();
  int64_t* gen = generated.data_ptr<int64_t>();
  int64_t* length = lengths.data_ptr<int64_t>();
  int64_t* code = codes.data_ptr<int64_t>();
  bool* live = alive.data_ptr<bool>();
  const bool* eos = is_eos.data_ptr<bool>();
  const int64_t vocab = is_eos.size(0);
  const bool steps = max_steps > 0;
  int64_t* done = nullptr;
  const int64_t* table = nullptr;
  if (steps) {
    TORCH_CHECK(steps_done.has_value() && step_table.has_value() && steps_done->is_contiguous() &&
                    steps_done->scalar_type() == torch::kLong && step_table->scalar_type() == torch::kLong,
                "record_rows: max_steps needs int64 steps_done and step_table");
    done = steps_done->data_ptr<int64_t>();
    table = step_table->data_ptr<int64_t>();
  }
  const bool want_logprobs = logprobs.has_value() && logprobs->defined();
  torch::Tensor logit_t;
  if (want_logprobs) {
    TORCH_CHECK(logits.has_value() && logprobs->is_contiguous() && logprobs->scalar_type() == torch::kFloat32,
                "record_rows: log-probs need the logits and a contiguous float32 logprobs tensor");
    logit_t = logits->contiguous();
    TORCH_CHECK(logit_t.scalar_type() == torch::kFloat32 || logit_t.scalar_type() == torch::kBFloat16,
                "record_rows: float32 or bfloat16 logits");
    TORCH_CHECK(logit_t.dim() == 2 && logit_t.size(0) == rows && logprobs->sizes() == generated.sizes(),
                "record_rows: logits ", logit_t.sizes(), " and logprobs ", logprobs->sizes(), " for ", rows, " rows");
  }
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(token[r] >= 0 && token[r] < vocab, "record_rows: token ", token[r], " outside the vocabulary of ", vocab);
  }
  if (want_logprobs) {  // pavlit/policy/sampling.py's token_logprobs, the same ATen calls (vectorized exp)
    auto picked = at::log_softmax(logit_t.to(torch::kFloat32), -1).gather(1, token_t.unsqueeze(1));
    logprobs->select(1, t).copy_(picked.squeeze(1));
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t tok = token[r];
    gen[r * width + t] = tok;
    if (!live[r]) continue;
    length[r] += 1;
    if (eos[tok]) {
      code[r] = 1;
      live[r] = false;
      continue;
    }
    if (steps) {
      done[r] += table[tok];
      if (done[r] >= max_steps) {
        code[r] = 2;
        live[r] = false;
      }
    }
  }
  int64_t n_alive = 0;
  for (int64_t r = 0; r < rows; ++r) n_alive += live[r];
  return n_alive;
}

// sample_rows with its draws from generator (torch.rand((rows, 1), dtype=float64, generator=...): the same
// stream as pavlit/policy/sampling.py), then record_rows: one call per token for the whole sampling side.
std::tuple<torch::Tensor, int64_t> sample_and_record(
    const torch::Tensor& logits, const c10::optional<at::Generator>& generator, double temperature, int64_t t,
    torch::Tensor generated, torch::Tensor lengths, torch::Tensor codes, torch::Tensor alive,
    const torch::Tensor& is_eos, const c10::optional<torch::Tensor>& logprobs,
    const c10::optional<torch::Tensor>& steps_done, const c10::optional<torch::Tensor>& step_table, int64_t max_steps) {
  auto draws = at::rand({logits.size(0), 1}, generator, logits.options().dtype(torch::kFloat64));
  auto tokens = sample_rows(logits, draws, temperature);
  const int64_t n_alive =
      record_rows(tokens, t, generated, lengths, codes, alive, is_eos, logits, logprobs, steps_done, step_table, max_steps);
  return {tokens, n_alive};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_step", &decode_step, "One token of the grouped decoder, embedding to logits (float32, CPU)",
        py::call_guard<py::gil_scoped_release>());
  m.def("sample_rows", &sample_rows, "One token per row by inverting softmax(logits / T)'s cumulative distribution",
        py::call_guard<py::gil_scoped_release>());
  m.def("sample_and_record", &sample_and_record, "sample_rows with its draws from a generator, then record_rows",
        py::call_guard<py::gil_scoped_release>());
  m.def("record_rows", &record_rows, "Record one token per row, stop rows on EOS or their step limit; rows alive",
        py::call_guard<py::gil_scoped_release>());
}

// The glue of a Llama decode step on CPU, fused: what lies between the weight products of a layer
// (RMSNorm with its residual add, RoPE, the KV-cache write and attention, SiLU x up) costs a
// dozen small PyTorch ops each, dominated by their per-call overhead at one to a few rows. Here
// each is one call. Loaded by service/engines/lm/kernels.py; the PyTorch ops they replace are
// in model.py (the reference the tests compare with).
//
// Activations are fp32; the products' inputs and outputs, and the cache, fp32 or bf16.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;

// Calls f(T{}) with T the C++ type of `dtype`: float or BFloat16.
template <typename F>
void with_type(at::ScalarType dtype, F&& f) {
  if (dtype == at::kFloat) f(float{});
  else if (dtype == at::kBFloat16) f(c10::BFloat16{});
  else TORCH_CHECK(false, "expected float32 or bfloat16, got ", dtype);
}

inline float dot(const float* a, const float* b, int64_t n) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// A row as fp32: the row itself when it is fp32, else converted into `buffer`.
inline const float* as_float(const float* row, float*, int64_t) { return row; }
inline const float* as_float(const c10::BFloat16* row, float* buffer, int64_t n) {
  for (int64_t i = 0; i < n; ++i) buffer[i] = static_cast<float>(row[i]);
  return buffer;
}

// x[i] = exp(x[i] - max) for n values; returns their sum.
inline float exp_shifted(float* x, int64_t n, float max) {
  Vec vmax(max), vsum(0.f);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    Vec e = (Vec::loadu(x + i) - vmax).exp();
    e.store(x + i);
    vsum = vsum + e;
  }
  float lanes[Vec::size()];
  vsum.store(lanes);
  float sum = 0.f;
  for (float lane : lanes) sum += lane;
  for (; i < n; ++i) {
    x[i] = std::exp(x[i] - max);
    sum += x[i];
  }
  return sum;
}

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.dim() == 2, name, ": a contiguous CPU matrix");
}

}  // namespace

// With `residual`: x += residual (in place). Then rms_norm(x) * weight, in `dtype`.
// x: (rows, dim) fp32; residual: (rows, dim) fp32 or bf16; weight: (dim,) fp32.
at::Tensor add_rms_norm(at::Tensor x, const std::optional<at::Tensor>& residual, const at::Tensor& weight,
                        double eps, at::ScalarType dtype) {
  check_rows(x, "x");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "x: float32");
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.is_contiguous() && weight.numel() == x.size(1),
              "weight: float32 (dim,)");
  const int64_t rows = x.size(0), dim = x.size(1);
  float* xs = x.data_ptr<float>();
  if (residual) {
    check_rows(*residual, "residual");
    TORCH_CHECK(residual->sizes() == x.sizes(), "residual: the shape of x");
    with_type(residual->scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      const T* ys = residual->data_ptr<T>();
#pragma omp simd
      for (int64_t i = 0; i < rows * dim; ++i) xs[i] += static_cast<float>(ys[i]);
    });
  }
  at::Tensor out = at::empty({rows, dim}, x.options().dtype(dtype));
  const float* w = weight.data_ptr<float>();
  with_type(dtype, [&](auto tag) {
    using T = decltype(tag);
    T* os = out.data_ptr<T>();
    for (int64_t r = 0; r < rows; ++r) {
      const float* xr = xs + r * dim;
      const float scale = 1.f / std::sqrt(dot(xr, xr, dim) / dim + static_cast<float>(eps));
#pragma omp simd
      for (int64_t i = 0; i < dim; ++i) os[r * dim + i] = static_cast<T>(xr[i] * scale * w[i]);
    }
  });
  return out;
}

// gate_up: (rows, 2F), gate then up -> silu(gate) * up, (rows, F), rounded to the input's dtype
// after the SiLU and after the product, as F.silu(gate) * up rounds.
at::Tensor silu_mul(const at::Tensor& gate_up) {
  check_rows(gate_up, "gate_up");
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "gate_up: an even number of columns");
  const int64_t rows = gate_up.size(0), f = gate_up.size(1) / 2;
  at::Tensor out = at::empty({rows, f}, gate_up.options());
  with_type(gate_up.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* in = gate_up.data_ptr<T>();
    T* os = out.data_ptr<T>();
    std::vector<float> silu(f);
    for (int64_t r = 0; r < rows; ++r) {
      const T* gate = in + r * 2 * f;
      const T* up = gate + f;
      T* o = os + r * f;
      for (int64_t i = 0; i < f; ++i) silu[i] = static_cast<float>(gate[i]);
      int64_t i = 0;
      for (; i + Vec::size() <= f; i += Vec::size()) {
        Vec g = Vec::loadu(silu.data() + i);
        (g / (Vec(1.f) + g.neg().exp())).store(silu.data() + i);
      }
      for (; i < f; ++i) silu[i] = silu[i] / (1.f + std::exp(-silu[i]));
      for (int64_t i = 0; i < f; ++i)
        o[i] = static_cast<T>(static_cast<float>(static_cast<T>(silu[i])) * static_cast<float>(up[i]));
    }
  });
  return out;
}

// One step's attention for B sequences, each at its own position of its own cache slot.
// qkv: (B, (H + 2 KV) * head_dim), the queries, keys and values of the new tokens;
// rope: (context, 2, head_dim) fp32, cos and sign-folded sin per position (model.rope_table);
// cache_k, cache_v: (layers, slots, KV, positions, head_dim); slots, positions: (B,) int64.
// RoPE turns queries and keys, the keys and values are written at [layer, slot, :, position], and
// each query head attends over positions [0, position] of its kv head (H / KV consecutive query
// heads share one). -> (B, H * head_dim) in `dtype`.
at::Tensor rope_attention(const at::Tensor& qkv, const at::Tensor& rope, at::Tensor cache_k, at::Tensor cache_v,
                          int64_t layer, const at::Tensor& slots, const at::Tensor& positions, int64_t n_heads,
                          int64_t n_kv_heads, at::ScalarType dtype) {
  check_rows(qkv, "qkv");
  TORCH_CHECK(cache_k.dim() == 5 && cache_k.is_contiguous() && cache_v.is_contiguous() &&
                  cache_k.sizes() == cache_v.sizes() && cache_k.scalar_type() == cache_v.scalar_type(),
              "cache: two contiguous (layers, slots, kv_heads, positions, head_dim) tensors alike");
  const int64_t B = qkv.size(0), head_dim = cache_k.size(4), half = head_dim / 2;
  const int64_t S = cache_k.size(1), P = cache_k.size(3);
  TORCH_CHECK(n_kv_heads > 0 && n_heads % n_kv_heads == 0 && cache_k.size(2) == n_kv_heads, "heads");
  TORCH_CHECK(head_dim % 2 == 0, "head_dim: even");
  const int64_t groups = n_heads / n_kv_heads, width = n_heads + 2 * n_kv_heads;
  TORCH_CHECK(qkv.size(1) == width * head_dim, "qkv: (B, (n_heads + 2 n_kv_heads) * head_dim)");
  TORCH_CHECK(0 <= layer && layer < cache_k.size(0), "layer");
  TORCH_CHECK(rope.scalar_type() == at::kFloat && rope.is_contiguous() && rope.dim() == 3 && rope.size(1) == 2 &&
                  rope.size(2) == head_dim,
              "rope: float32 (context, 2, head_dim)");
  TORCH_CHECK(slots.scalar_type() == at::kLong && positions.scalar_type() == at::kLong && slots.is_contiguous() &&
                  positions.is_contiguous() && slots.numel() == B && positions.numel() == B,
              "slots, positions: (B,) int64");
  const int64_t* slot = slots.data_ptr<int64_t>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  int64_t longest = 0;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(0 <= slot[b] && slot[b] < S && 0 <= pos[b] && pos[b] < std::min(P, rope.size(0)),
                "slot or position outside the cache");
    longest = std::max(longest, pos[b] + 1);
  }

  // The new queries and keys turned, and the values, in fp32: (B, width, head_dim).
  std::vector<float> heads(B * width * head_dim);
  with_type(qkv.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* in = qkv.data_ptr<T>();
    const float* table = rope.data_ptr<float>();
    std::vector<float> buffer(head_dim);
    for (int64_t b = 0; b < B; ++b) {
      const float* cos = table + pos[b] * 2 * head_dim;
      const float* sin = cos + head_dim;
      for (int64_t h = 0; h < width; ++h) {
        const float* x = as_float(in + (b * width + h) * head_dim, buffer.data(), head_dim);
        float* turned = heads.data() + (b * width + h) * head_dim;
        if (h >= n_heads + n_kv_heads) {  // a value
          std::copy(x, x + head_dim, turned);
          continue;
        }
        // x * cos + cat(x2, x1) * sin, as model.apply_rope
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) turned[i] = x[i] * cos[i] + x[i + half] * sin[i];
#pragma omp simd
        for (int64_t i = half; i < head_dim; ++i) turned[i] = x[i] * cos[i] + x[i - half] * sin[i];
      }
    }
  });

  at::Tensor out = at::empty({B, n_heads * head_dim}, qkv.options().dtype(dtype));
  with_type(cache_k.scalar_type(), [&](auto cache_tag) {
    using C = decltype(cache_tag);
    C* keys = cache_k.data_ptr<C>();
    C* values = cache_v.data_ptr<C>();
    auto row = [&](C* cache, int64_t b, int64_t kv, int64_t t) {
      return cache + (((layer * S + slot[b]) * n_kv_heads + kv) * P + t) * head_dim;
    };
    for (int64_t b = 0; b < B; ++b)
      for (int64_t kv = 0; kv < n_kv_heads; ++kv) {
        const float* key = heads.data() + (b * width + n_heads + kv) * head_dim;
        const float* value = key + n_kv_heads * head_dim;
        C* key_row = row(keys, b, kv, pos[b]);
        C* value_row = row(values, b, kv, pos[b]);
        for (int64_t i = 0; i < head_dim; ++i) {
          key_row[i] = static_cast<C>(key[i]);
          value_row[i] = static_cast<C>(value[i]);
        }
      }

    const float scale = 1.f / std::sqrt(static_cast<float>(head_dim));
    // One task per (sequence, kv head), whose query heads read each cached row once; short
    // prefixes stay on one thread (starting the other costs more than it saves).
    const int64_t grain = std::max<int64_t>(1, 16384 / (longest * head_dim * groups));
    with_type(dtype, [&](auto tag) {
      using T = decltype(tag);
      T* os = out.data_ptr<T>();
      at::parallel_for(0, B * n_kv_heads, grain, [&](int64_t begin, int64_t end) {
        std::vector<float> scores(groups * longest), sums(groups), acc(groups * head_dim), buffer(head_dim);
        for (int64_t task = begin; task < end; ++task) {
          const int64_t b = task / n_kv_heads, kv = task % n_kv_heads, len = pos[b] + 1;
          const float* q = heads.data() + (b * width + kv * groups) * head_dim;
          for (int64_t t = 0; t < len; ++t) {
            const float* key = as_float(row(keys, b, kv, t), buffer.data(), head_dim);
            for (int64_t g = 0; g < groups; ++g) scores[g * len + t] = dot(q + g * head_dim, key, head_dim) * scale;
          }
          for (int64_t g = 0; g < groups; ++g) {
            float* s = scores.data() + g * len;
            sums[g] = exp_shifted(s, len, *std::max_element(s, s + len));
          }
          std::fill(acc.begin(), acc.end(), 0.f);
          for (int64_t t = 0; t < len; ++t) {
            const float* value = as_float(row(values, b, kv, t), buffer.data(), head_dim);
            for (int64_t g = 0; g < groups; ++g) {
              const float p = scores[g * len + t];
              float* a = acc.data() + g * head_dim;
#pragma omp simd
              for (int64_t i = 0; i < head_dim; ++i) a[i] += p * value[i];
            }
          }
          for (int64_t g = 0; g < groups; ++g) {
            T* o = os + b * n_heads * head_dim + (kv * groups + g) * head_dim;
            for (int64_t i = 0; i < head_dim; ++i) o[i] = static_cast<T>(acc[g * head_dim + i] / sums[g]);
          }
        }
      });
    });
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("add_rms_norm", &add_rms_norm, "x += residual (if given); rms_norm(x) * weight in dtype");
  m.def("silu_mul", &silu_mul, "silu(gate) * up");
  m.def("rope_attention", &rope_attention, "RoPE, KV-cache write and attention of one decode step");
}

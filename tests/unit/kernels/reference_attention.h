// Naive float64 softmax attention, the independent reference the KV cache tests compare against.
//
//   std::vector<float> out = ReferenceAttention(q, num_q_heads, keys, values, num_kv_heads, d,
//                                               /*num_keys=*/len, scale);
#pragma once

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

namespace kvgate::kernels::testing {

// q [num_q_heads, d]; keys, values [num_keys, num_kv_heads, d]; query head h reads kv-head
// h / (num_q_heads / num_kv_heads). Returns [num_q_heads, d].
inline std::vector<float> ReferenceAttention(const float* q, int num_q_heads, const float* keys,
                                             const float* values, int num_kv_heads, int d,
                                             int64_t num_keys, float scale) {
  std::vector<float> out(static_cast<size_t>(num_q_heads) * d);
  const int group = num_q_heads / num_kv_heads;
  for (int h = 0; h < num_q_heads; ++h) {
    const int kvh = h / group;
    std::vector<double> s(num_keys);
    double mx = -1e300;
    for (int64_t t = 0; t < num_keys; ++t) {
      double dot = 0;
      for (int e = 0; e < d; ++e) {
        dot += static_cast<double>(q[h * d + e]) * keys[(t * num_kv_heads + kvh) * d + e];
      }
      s[t] = dot * scale;
      mx = std::max(mx, s[t]);
    }
    double sum = 0;
    for (auto& x : s) sum += (x = std::exp(x - mx));
    for (int e = 0; e < d; ++e) {
      double acc = 0;
      for (int64_t t = 0; t < num_keys; ++t) acc += s[t] * values[(t * num_kv_heads + kvh) * d + e];
      out[h * d + e] = static_cast<float>(acc / sum);
    }
  }
  return out;
}

inline std::vector<float> RandomVector(size_t n, uint32_t seed, float stddev = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, stddev);
  std::vector<float> x(n);
  for (auto& v : x) v = dist(rng);
  return x;
}

inline float MaxAbsDiff(const std::vector<float>& a, const std::vector<float>& b) {
  float m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::fabs(a[i] - b[i]));
  return m;
}

}  // namespace kvgate::kernels::testing

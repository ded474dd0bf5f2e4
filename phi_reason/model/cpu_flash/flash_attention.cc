// Fused causal attention for the XLA CPU backend (float32), exposed through the XLA FFI.
//
// Why: on the CPU, attention written in XLA materialises every score-sized tensor in memory
// (scores, probabilities, their gradients) and runs the [T, S] products as many small batched
// dots. This kernel is the FlashAttention-2 algorithm on cache-sized blocks: per (batch, KV head)
// task, the query rows of the KV head's g query heads are stacked, scores live only in a
// [g*64, 64] tile, and the backward recomputes the probabilities from the saved log-sum-exp.
// Tasks run on the process's cores with plain threads (each task owns its output rows).
//
// Mask (as phi_reason.model.attention): key s is visible to query t iff s <= t and
// q_segment[t] == kv_segment[s]; index = arange (self-attention over the whole row).
// Layouts are the model's token-major ones: q [B, T, nH, hd], k/v [B, T, nKV, hd];
// lse [B, nH, T] holds log(sum exp(scale * q.k)) per query row.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <new>
#include <thread>
#include <vector>

#include <sched.h>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kBlock = 64;  // query rows per head and keys per tile
typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

inline v8 load8(const float* p) { v8 r; std::memcpy(&r, p, sizeof r); return r; }
inline void store8(float* p, v8 x) { std::memcpy(p, &x, sizeof x); }
inline v8 splat(float x) { return v8{x, x, x, x, x, x, x, x}; }

// C[R, 16] += A[R, K] . B[K, 16]: R x 2 vector accumulators held in registers. With kTransA,
// A is stored transposed ([K, R] with leading dimension lda).
template <int R, bool kTransA>
inline void tile16(int k, const float* a, int lda, const float* b, int ldb, float* c, int ldc) {
  v8 c0[R], c1[R];
  for (int r = 0; r < R; ++r) {
    c0[r] = load8(c + r * ldc);
    c1[r] = load8(c + r * ldc + 8);
  }
  for (int p = 0; p < k; ++p) {
    const v8 b0 = load8(b + p * ldb), b1 = load8(b + p * ldb + 8);
    for (int r = 0; r < R; ++r) {
      const v8 av = splat(kTransA ? a[p * lda + r] : a[r * lda + p]);
      c0[r] += av * b0;
      c1[r] += av * b1;
    }
  }
  for (int r = 0; r < R; ++r) {
    store8(c + r * ldc, c0[r]);
    store8(c + r * ldc + 8, c1[r]);
  }
}

// C[M, N] += op(A)[M, K] . B[K, N] (row-major with leading dimensions; op(A) = A, or A^T when
// A is stored [K, M]). 6-row tiles keep 12 independent accumulators in flight (enough to hide
// the FMA latency on AVX2 cores).
template <bool kTransA = false>
void gemm_acc(int m, int n, int k, const float* a, int lda, const float* b, int ldb, float* c,
              int ldc) {
  auto a_rows = [&](int i) { return kTransA ? a + i : a + i * lda; };
  const int n16 = n - n % 16;
  for (int j = 0; j < n16; j += 16) {
    int i = 0;
    for (; i + 6 <= m; i += 6)
      tile16<6, kTransA>(k, a_rows(i), lda, b + j, ldb, c + i * ldc + j, ldc);
    for (; i + 2 <= m; i += 2)
      tile16<2, kTransA>(k, a_rows(i), lda, b + j, ldb, c + i * ldc + j, ldc);
    for (; i < m; ++i) tile16<1, kTransA>(k, a_rows(i), lda, b + j, ldb, c + i * ldc + j, ldc);
  }
  for (int i = 0; i < m; ++i)
    for (int p = 0; p < k; ++p) {
      const float av = kTransA ? a[p * lda + i] : a[i * lda + p];
      for (int j = n16; j < n; ++j) c[i * ldc + j] += av * b[p * ldb + j];
    }
}

// exp on 8 lanes: 2^n * p(r) with x = n ln2 + r, |r| <= ln2/2 (Cephes expf polynomial,
// ~1 ulp on the range used here); inputs below -87 flush to 0 (masked scores).
inline v8 exp8(v8 x) {
  const v8 lo = splat(-87.0f), hi = splat(88.0f);
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  v8 n = x * splat(1.44269504088896341f) + splat(0.5f);
  v8i ni = __builtin_convertvector(n, v8i);
  v8 nf = __builtin_convertvector(ni, v8);
  ni = nf > n ? ni - 1 : ni;  // floor
  nf = __builtin_convertvector(ni, v8);
  v8 r = x - nf * splat(0.693359375f) - nf * splat(-2.12194440e-4f);
  v8 p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * r * r + r + splat(1.0f);
  v8i bits = (ni + 127) << 23;
  v8 scale;
  std::memcpy(&scale, &bits, sizeof scale);
  v8 out = p * scale;
  return x <= lo ? splat(0.0f) : out;
}

// x[i] = exp(x[i] - sub) for i < n (any n), in place; returns the sum of the results.
float exp_shifted(float* x, int n, float sub) {
  v8 sum = splat(0.0f);
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    const v8 e = exp8(load8(x + i) - splat(sub));
    store8(x + i, e);
    sum += e;
  }
  if (i < n) {
    float tmp[8] = {-1e30f, -1e30f, -1e30f, -1e30f, -1e30f, -1e30f, -1e30f, -1e30f};
    for (int t = i; t < n; ++t) tmp[t - i] = x[t] - sub;
    const v8 e = exp8(load8(tmp));
    sum += e;  // padding lanes are exp(-1e30) = 0
    store8(tmp, e);
    for (int t = i; t < n; ++t) x[t] = tmp[t - i];
  }
  float total = 0.0f;
  for (int lane = 0; lane < 8; ++lane) total += sum[lane];
  return total;
}

float row_max(const float* x, int n) {
  v8 best = splat(-1e30f);
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    const v8 v = load8(x + i);
    best = v > best ? v : best;
  }
  float out = -1e30f;
  for (int lane = 0; lane < 8; ++lane) out = std::max(out, best[lane]);
  for (; i < n; ++i) out = std::max(out, x[i]);
  return out;
}

struct Dims {
  int64_t b, t, nh, nkv, hd, g;
  int64_t q_row(int64_t bi, int64_t ti, int64_t h) const { return ((bi * t + ti) * nh + h) * hd; }
  int64_t kv_row(int64_t bi, int64_t si, int64_t kh) const {
    return ((bi * t + si) * nkv + kh) * hd;
  }
};

int cpu_count() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

// Runs fn(task) for task in [0, n) on up to cpu_count() threads. A task that cannot allocate its
// work buffers fails the call instead of terminating the process from a worker thread.
template <typename Fn>
ffi::Error parallel_tasks(int64_t n, Fn fn) {
  const int workers = static_cast<int>(std::min<int64_t>(n, cpu_count()));
  std::atomic<int64_t> next{0};
  std::atomic<bool> failed{false};
  auto run = [&] {
    try {
      for (int64_t task = next++; task < n && !failed; task = next++) fn(task);
    } catch (const std::bad_alloc&) {
      failed = true;
    }
  };
  std::vector<std::thread> threads;
  for (int w = 1; w < workers; ++w) threads.emplace_back(run);
  run();
  for (auto& th : threads) th.join();
  if (failed)
    return ffi::Error(ffi::ErrorCode::kResourceExhausted,
                      "cpu_flash: out of memory for the attention work buffers");
  return ffi::Error::Success();
}

// Whether key s may be seen by query t.
inline bool visible(const int32_t* qseg, const int32_t* kseg, int64_t t, int64_t s) {
  return s <= t && qseg[t] == kseg[s];
}

// Stacks the g query heads of KV head kh for query rows [q0, q0+nq): out[(gi*nq + r), :] =
// mul * src[row(q0 + r, kh*g + gi)].
void pack_rows(const Dims& d, const float* src, int64_t bi, int64_t kh, int64_t q0, int nq,
               float mul, float* out) {
  for (int64_t gi = 0; gi < d.g; ++gi)
    for (int r = 0; r < nq; ++r) {
      const float* row = src + d.q_row(bi, q0 + r, kh * d.g + gi);
      float* dst = out + (gi * nq + r) * d.hd;
      for (int64_t e = 0; e < d.hd; ++e) dst[e] = mul * row[e];
    }
}

// out[e, j] = src[row(k0 + j)][e]: a key/value block transposed to [hd, nk].
void pack_transposed(const Dims& d, const float* src, int64_t bi, int64_t kh, int64_t k0, int nk,
                     float* out) {
  for (int j = 0; j < nk; ++j) {
    const float* row = src + d.kv_row(bi, k0 + j, kh);
    for (int64_t e = 0; e < d.hd; ++e) out[e * nk + j] = row[e];
  }
}

enum class Tile { kHidden, kVisible, kPartial };

// The segment id shared by positions [start, start+n), or -1 when they differ (ids are >= 0).
int64_t uniform_segment(const int32_t* seg, int64_t start, int n) {
  for (int i = 1; i < n; ++i)
    if (seg[start + i] != seg[start]) return -1;
  return seg[start];
}

// What the mask leaves of the tile (queries [q0, q0+nq), keys [k0, k0+nk)), decided from the
// blocks' segment ids before any product: the common case (below the diagonal, one sequence)
// needs no per-element mask.
Tile classify_tile(const int32_t* qseg, const int32_t* kseg, int64_t q0, int nq, int64_t k0,
                   int nk) {
  const int64_t qs = uniform_segment(qseg, q0, nq), ks = uniform_segment(kseg, k0, nk);
  if (qs >= 0 && ks >= 0 && qs != ks) return Tile::kHidden;
  if (qs >= 0 && qs == ks && k0 + nk - 1 <= q0) return Tile::kVisible;
  return Tile::kPartial;
}

// Sets masked entries of the score tile [g*nq, nk] to -inf-like; returns false if the whole
// tile is masked.
bool mask_tile(const Dims& d, const int32_t* qseg, const int32_t* kseg, int64_t q0, int nq,
               int64_t k0, int nk, float* s) {
  bool any = false;
  for (int r = 0; r < nq; ++r) {
    int visible_cols = 0;
    for (int j = 0; j < nk; ++j) {
      const bool ok = visible(qseg, kseg, q0 + r, k0 + j);
      visible_cols += ok;
      if (!ok)
        for (int64_t gi = 0; gi < d.g; ++gi) s[(gi * nq + r) * nk + j] = -1e30f;
    }
    any |= visible_cols > 0;
  }
  return any;
}

void forward_task(const Dims& d, const float* q, const float* k, const float* v,
                  const int32_t* qseg_all, const int32_t* kseg_all, float scale, int64_t task,
                  float* out, float* lse) {
  const int64_t bi = task / d.nkv, kh = task % d.nkv, hd = d.hd;
  const int32_t* qseg = qseg_all + bi * d.t;
  const int32_t* kseg = kseg_all + bi * d.t;
  const int rows_max = static_cast<int>(d.g) * kBlock;
  std::vector<float> qp(rows_max * hd), s(rows_max * kBlock), o(rows_max * hd);
  std::vector<float> m(rows_max), l(rows_max), kt_all(d.t * hd);  // block k0 at kt_all[k0*hd]
  for (int64_t k0 = 0; k0 < d.t; k0 += kBlock)
    pack_transposed(d, k, bi, kh, k0, static_cast<int>(std::min<int64_t>(kBlock, d.t - k0)),
                    kt_all.data() + k0 * hd);
  for (int64_t q0 = 0; q0 < d.t; q0 += kBlock) {
    const int nq = static_cast<int>(std::min<int64_t>(kBlock, d.t - q0));
    const int rows = static_cast<int>(d.g) * nq;
    pack_rows(d, q, bi, kh, q0, nq, scale, qp.data());
    std::fill(o.begin(), o.begin() + rows * hd, 0.0f);
    std::fill(m.begin(), m.begin() + rows, -1e30f);
    std::fill(l.begin(), l.begin() + rows, 0.0f);
    for (int64_t k0 = 0; k0 < q0 + nq; k0 += kBlock) {
      const int nk = static_cast<int>(std::min<int64_t>(kBlock, d.t - k0));
      const Tile tile = classify_tile(qseg, kseg, q0, nq, k0, nk);
      if (tile == Tile::kHidden) continue;
      std::fill(s.begin(), s.begin() + rows * nk, 0.0f);
      gemm_acc(rows, nk, static_cast<int>(hd), qp.data(), static_cast<int>(hd),
               kt_all.data() + k0 * hd, nk, s.data(), nk);
      if (tile == Tile::kPartial && !mask_tile(d, qseg, kseg, q0, nq, k0, nk, s.data())) continue;
      for (int r = 0; r < rows; ++r) {
        float* sr = s.data() + r * nk;
        const float m_new = std::max(m[r], row_max(sr, nk));
        const float sum = exp_shifted(sr, nk, m_new);
        const float correction = std::exp(m[r] - m_new);
        l[r] = l[r] * correction + sum;
        m[r] = m_new;
        if (correction != 1.0f)
          for (int64_t e = 0; e < hd; ++e) o[r * hd + e] *= correction;
      }
      gemm_acc(rows, static_cast<int>(hd), nk, s.data(), nk, v + d.kv_row(bi, k0, kh),
               static_cast<int>(d.nkv * hd), o.data(), static_cast<int>(hd));
    }
    for (int64_t gi = 0; gi < d.g; ++gi)
      for (int r = 0; r < nq; ++r) {
        const int row = static_cast<int>(gi) * nq + r;
        const float inv = 1.0f / l[row];
        float* dst = out + d.q_row(bi, q0 + r, kh * d.g + gi);
        for (int64_t e = 0; e < hd; ++e) dst[e] = o[row * hd + e] * inv;
        lse[(bi * d.nh + kh * d.g + gi) * d.t + q0 + r] = m[row] + std::log(l[row]);
      }
  }
}

void backward_task(const Dims& d, const float* q, const float* k, const float* v,
                   const int32_t* qseg_all, const int32_t* kseg_all, const float* out,
                   const float* lse, const float* dout, float scale, int64_t task, float* dq,
                   float* dk, float* dv) {
  const int64_t bi = task / d.nkv, kh = task % d.nkv, hd = d.hd, t = d.t;
  const int ihd = static_cast<int>(hd), ldkv = static_cast<int>(d.nkv * hd);
  const int32_t* qseg = qseg_all + bi * t;
  const int32_t* kseg = kseg_all + bi * t;
  const int rows_max = static_cast<int>(d.g) * kBlock;
  // delta[gi*t + ti] = sum_e dout * out (the softmax-gradient row term); dq_acc unscaled.
  std::vector<float> delta(d.g * t), dq_acc(d.g * t * hd, 0.0f);
  for (int64_t gi = 0; gi < d.g; ++gi)
    for (int64_t ti = 0; ti < t; ++ti) {
      const int64_t off = d.q_row(bi, ti, kh * d.g + gi);
      float s = 0.0f;
      for (int64_t e = 0; e < hd; ++e) s += dout[off + e] * out[off + e];
      delta[gi * t + ti] = s;
    }
  // Query-block q0's stacked rows [(gi*nq + r), hd] at offset g*q0*hd, packed once.
  std::vector<float> qp_all(d.g * t * hd), dop_all(d.g * t * hd);
  for (int64_t q0 = 0; q0 < t; q0 += kBlock) {
    const int nq = static_cast<int>(std::min<int64_t>(kBlock, t - q0));
    pack_rows(d, q, bi, kh, q0, nq, scale, qp_all.data() + d.g * q0 * hd);
    pack_rows(d, dout, bi, kh, q0, nq, 1.0f, dop_all.data() + d.g * q0 * hd);
  }
  std::vector<float> kt(hd * kBlock), vt(hd * kBlock), p(rows_max * kBlock), dp(rows_max * kBlock);
  std::vector<float> dk_acc(kBlock * hd), dv_acc(kBlock * hd);
  for (int64_t k0 = 0; k0 < t; k0 += kBlock) {
    const int nk = static_cast<int>(std::min<int64_t>(kBlock, t - k0));
    pack_transposed(d, k, bi, kh, k0, nk, kt.data());
    pack_transposed(d, v, bi, kh, k0, nk, vt.data());
    std::fill(dk_acc.begin(), dk_acc.end(), 0.0f);
    std::fill(dv_acc.begin(), dv_acc.end(), 0.0f);
    for (int64_t q0 = (k0 / kBlock) * kBlock; q0 < t; q0 += kBlock) {
      const int nq = static_cast<int>(std::min<int64_t>(kBlock, t - q0));
      const int rows = static_cast<int>(d.g) * nq;
      const Tile tile = classify_tile(qseg, kseg, q0, nq, k0, nk);
      if (tile == Tile::kHidden) continue;
      const float* qp = qp_all.data() + d.g * q0 * hd;
      const float* dop = dop_all.data() + d.g * q0 * hd;
      std::fill(p.begin(), p.begin() + rows * nk, 0.0f);
      gemm_acc(rows, nk, ihd, qp, ihd, kt.data(), nk, p.data(), nk);
      if (tile == Tile::kPartial && !mask_tile(d, qseg, kseg, q0, nq, k0, nk, p.data())) continue;
      for (int64_t gi = 0; gi < d.g; ++gi)
        for (int r = 0; r < nq; ++r)
          exp_shifted(p.data() + (gi * nq + r) * nk, nk,
                      lse[(bi * d.nh + kh * d.g + gi) * t + q0 + r]);
      gemm_acc<true>(nk, ihd, rows, p.data(), nk, dop, ihd, dv_acc.data(), ihd);  // P^T dO
      std::fill(dp.begin(), dp.begin() + rows * nk, 0.0f);
      gemm_acc(rows, nk, ihd, dop, ihd, vt.data(), nk, dp.data(), nk);
      for (int64_t gi = 0; gi < d.g; ++gi)
        for (int r = 0; r < nq; ++r) {
          const float dl = delta[gi * t + q0 + r];
          float* pr = p.data() + (gi * nq + r) * nk;
          const float* dpr = dp.data() + (gi * nq + r) * nk;
          for (int j = 0; j < nk; ++j) pr[j] *= dpr[j] - dl;  // dS
        }
      for (int64_t gi = 0; gi < d.g; ++gi)  // one head's rows are contiguous in dq_acc
        gemm_acc(nq, ihd, nk, p.data() + gi * nq * nk, nk, k + d.kv_row(bi, k0, kh), ldkv,
                 dq_acc.data() + (gi * t + q0) * hd, ihd);
      gemm_acc<true>(nk, ihd, rows, p.data(), nk, qp, ihd, dk_acc.data(), ihd);  // dS^T Q
    }
    for (int j = 0; j < nk; ++j) {
      const int64_t off = d.kv_row(bi, k0 + j, kh);
      std::memcpy(dk + off, dk_acc.data() + j * hd, hd * sizeof(float));
      std::memcpy(dv + off, dv_acc.data() + j * hd, hd * sizeof(float));
    }
  }
  for (int64_t gi = 0; gi < d.g; ++gi)
    for (int64_t ti = 0; ti < t; ++ti) {
      float* dst = dq + d.q_row(bi, ti, kh * d.g + gi);
      const float* src = dq_acc.data() + (gi * t + ti) * hd;
      for (int64_t e = 0; e < hd; ++e) dst[e] = scale * src[e];
    }
}

// The problem's dimensions; rejects shapes the tasks would index out of bounds.
ffi::Error read_dims(ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k,
                     ffi::Buffer<ffi::F32>& v, Dims* d) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "q, k, v must be rank 4");
  if (kd[2] <= 0 || qd[2] % kd[2] != 0)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "query heads must be a multiple of KV heads");
  for (int i = 0; i < 4; ++i)
    if (kd[i] != vd[i] || (i != 2 && kd[i] != qd[i]))
      return ffi::Error(ffi::ErrorCode::kInvalidArgument, "k/v must be [B, T, nKV, hd] like q");
  *d = Dims{qd[0], qd[1], qd[2], kd[2], qd[3], qd[2] / kd[2]};
  return ffi::Error::Success();
}

ffi::Error forward_impl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                        ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> qseg,
                        ffi::Buffer<ffi::S32> kseg, ffi::ResultBuffer<ffi::F32> out,
                        ffi::ResultBuffer<ffi::F32> lse, float scale) {
  Dims d;
  if (auto err = read_dims(q, k, v, &d); err.failure()) return err;
  return parallel_tasks(d.b * d.nkv, [&](int64_t task) {
    forward_task(d, q.typed_data(), k.typed_data(), v.typed_data(), qseg.typed_data(),
                 kseg.typed_data(), scale, task, out->typed_data(), lse->typed_data());
  });
}

ffi::Error backward_impl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                         ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> qseg,
                         ffi::Buffer<ffi::S32> kseg, ffi::Buffer<ffi::F32> out,
                         ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout,
                         ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                         ffi::ResultBuffer<ffi::F32> dv, float scale) {
  Dims d;
  if (auto err = read_dims(q, k, v, &d); err.failure()) return err;
  return parallel_tasks(d.b * d.nkv, [&](int64_t task) {
    backward_task(d, q.typed_data(), k.typed_data(), v.typed_data(), qseg.typed_data(),
                  kseg.typed_data(), out.typed_data(), lse.typed_data(), dout.typed_data(), scale,
                  task, dq->typed_data(), dk->typed_data(), dv->typed_data());
  });
}

// The arguments both targets start with: q, k, v, q_segment_ids, kv_segment_ids.
auto bind_attention_inputs() {
  return ffi::Ffi::Bind()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::S32>>()
      .Arg<ffi::Buffer<ffi::S32>>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PhiFlashForward, forward_impl,
                              bind_attention_inputs()
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out
                                  .Ret<ffi::Buffer<ffi::F32>>()  // lse
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(PhiFlashBackward, backward_impl,
                              bind_attention_inputs()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // out
                                  .Arg<ffi::Buffer<ffi::F32>>()  // lse
                                  .Arg<ffi::Buffer<ffi::F32>>()  // d_out
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dq
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dk
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dv
                                  .Attr<float>("scale"));

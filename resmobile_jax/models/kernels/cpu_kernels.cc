// Convolution kernels for XLA:CPU, NHWC float32, symmetric zero padding, registered as XLA FFI custom calls
// (resmobile_jax/models/kernels/cpu_kernels.py builds and loads this file):
// - depthwise k x k: forward, input gradient and kernel gradient. XLA:CPU runs the kernel gradient of a depthwise
//   convolution (k*k reductions over N*H*W) 10-30x slower than the forward pass in every formulation tried
//   (bench.depthwise_grad); here each pass is one loop nest with channels innermost, so the C loop vectorizes and
//   the k*k*C accumulators stay in L1.
// - dense convolution with few input channels (the stems: 3 -> 16 3x3, 3 -> 64 7x7): forward and kernel gradient,
//   output channels innermost so every tap is one broadcast multiply-add into a register-resident output vector.
//   XLA:CPU runs these 2-8x slower than PyTorch (oneDNN).
//
// Layouts: x (N, H, W, C), depthwise w (K, K, C) (the model's (K, K, 1, C) kernel, flattened), dense w
// (K, K, Cin, Cout), y (N, Ho, Wo, C), Ho = (H + 2P - K) / S + 1. Tap (i, j) of output (r, q) reads input
// (r*S + i - P, q*S + j - P).

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Geometry {
  int64_t n, h, w, c, k, s, p, ho, wo;
};

ffi::Error MakeGeometry(const ffi::Buffer<ffi::F32>& x, int64_t k, int64_t stride, int64_t padding, Geometry* g) {
  auto d = x.dimensions();
  if (d.size() != 4) return ffi::Error::InvalidArgument("depthwise_cpu: input must be NHWC (rank 4)");
  if (k < 1 || stride < 1 || padding < 0) return ffi::Error::InvalidArgument("depthwise_cpu: bad k/stride/padding");
  g->n = d[0]; g->h = d[1]; g->w = d[2]; g->c = d[3];
  g->k = k; g->s = stride; g->p = padding;
  g->ho = (g->h + 2 * padding - k) / stride + 1;
  g->wo = (g->w + 2 * padding - k) / stride + 1;
  return ffi::Error::Success();
}

// Runs body(begin, end) over [0, total) in about `pieces` contiguous chunks on XLA's intra-op pool. The caller
// thread takes chunks too and only waits for chunks other threads have already started, so it cannot deadlock
// when every pool thread is busy (tasks that start late find nothing left and return).
template <typename Body>
void ParallelFor(ffi::ThreadPool& pool, int64_t total, int64_t pieces, Body body) {
  pieces = std::max<int64_t>(1, std::min(pieces, total));
  if (pieces == 1) {
    body(0, total, 0);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto state = std::make_shared<State>();
  auto run = [state, total, pieces, body]() {
    for (;;) {
      int64_t piece = state->next.fetch_add(1);
      if (piece >= pieces) return;
      body(total * piece / pieces, total * (piece + 1) / pieces, piece);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pieces - 1, std::max<int64_t>(0, pool.num_threads()));
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([run]() { run(); });
  run();
  while (state->done.load(std::memory_order_acquire) < pieces) std::this_thread::yield();
}

// A few chunks per thread, so a thread that starts late or runs slow does not leave the others waiting.
int64_t Pieces(ffi::ThreadPool& pool) { return 4 * std::max<int64_t>(1, pool.num_threads()); }

// y[b, r, q, :] = sum_ij x[b, r*S+i-P, q*S+j-P, :] * w[i, j, :]
ffi::Error DepthwiseForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                            ffi::ResultBuffer<ffi::F32> y, int64_t stride, int64_t padding) {
  Geometry g;
  int64_t k = w.dimensions()[0];
  if (auto e = MakeGeometry(x, k, stride, padding, &g); e.failure()) return e;
  const float* xd = x.typed_data();
  const float* wd = w.typed_data();
  float* yd = y->typed_data();
  const int64_t C = g.c;
  ParallelFor(pool, g.n * g.ho, Pieces(pool), [&](int64_t begin, int64_t end, int64_t) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / g.ho, r = row % g.ho;
      float* out = yd + row * g.wo * C;
      std::memset(out, 0, sizeof(float) * g.wo * C);
      for (int64_t i = 0; i < g.k; ++i) {
        const int64_t hi = r * g.s + i - g.p;
        if (hi < 0 || hi >= g.h) continue;
        const float* xrow = xd + (b * g.h + hi) * g.w * C;
        for (int64_t q = 0; q < g.wo; ++q) {
          float* o = out + q * C;
          for (int64_t j = 0; j < g.k; ++j) {
            const int64_t wi = q * g.s + j - g.p;
            if (wi < 0 || wi >= g.w) continue;
            const float* xi = xrow + wi * C;
            const float* wij = wd + (i * g.k + j) * C;
            for (int64_t ch = 0; ch < C; ++ch) o[ch] += xi[ch] * wij[ch];
          }
        }
      }
    }
  });
  return ffi::Error::Success();
}

// dx[b, hi, wi, :] = sum over the (r, q, i, j) with r*S+i-P = hi, q*S+j-P = wi of dy[b, r, q, :] * w[i, j, :].
// Computed row by row of dx (a gather, so rows are independent and need no atomics).
ffi::Error DepthwiseInputGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w,
                              ffi::Buffer<ffi::F32> x_like, ffi::ResultBuffer<ffi::F32> dx, int64_t stride,
                              int64_t padding) {
  Geometry g;
  int64_t k = w.dimensions()[0];
  if (auto e = MakeGeometry(x_like, k, stride, padding, &g); e.failure()) return e;
  const float* gd = dy.typed_data();
  const float* wd = w.typed_data();
  float* xd = dx->typed_data();
  const int64_t C = g.c;
  ParallelFor(pool, g.n * g.h, Pieces(pool), [&](int64_t begin, int64_t end, int64_t) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / g.h, hi = row % g.h;
      float* out = xd + row * g.w * C;
      std::memset(out, 0, sizeof(float) * g.w * C);
      for (int64_t i = 0; i < g.k; ++i) {
        const int64_t t = hi + g.p - i;  // = r * S
        if (t < 0 || t % g.s != 0) continue;
        const int64_t r = t / g.s;
        if (r >= g.ho) continue;
        const float* grow = gd + (b * g.ho + r) * g.wo * C;
        for (int64_t q = 0; q < g.wo; ++q) {
          const float* gq = grow + q * C;
          for (int64_t j = 0; j < g.k; ++j) {
            const int64_t wi = q * g.s + j - g.p;
            if (wi < 0 || wi >= g.w) continue;
            float* o = out + wi * C;
            const float* wij = wd + (i * g.k + j) * C;
            for (int64_t ch = 0; ch < C; ++ch) o[ch] += gq[ch] * wij[ch];
          }
        }
      }
    }
  });
  return ffi::Error::Success();
}

// dw[i, j, :] = sum_{b, r, q} x[b, r*S+i-P, q*S+j-P, :] * dy[b, r, q, :]. Each chunk of output rows sums into its
// own k*k*C accumulator (float, with a per-row partial sum so long reductions keep their precision); the chunks'
// accumulators are added at the end in a fixed order, so the result does not depend on thread timing.
ffi::Error DepthwiseKernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                               ffi::ResultBuffer<ffi::F32> dw, int64_t stride, int64_t padding) {
  Geometry g;
  int64_t k = dw->dimensions()[0];
  if (auto e = MakeGeometry(x, k, stride, padding, &g); e.failure()) return e;
  const float* xd = x.typed_data();
  const float* gd = dy.typed_data();
  const int64_t C = g.c, taps = g.k * g.k;
  const int64_t pieces = std::min<int64_t>(Pieces(pool), g.n * g.ho);
  std::vector<float> acc(pieces * taps * C, 0.0f);
  ParallelFor(pool, g.n * g.ho, pieces, [&](int64_t begin, int64_t end, int64_t piece) {
    float* total = acc.data() + piece * taps * C;
    std::vector<float> row_sum(taps * C);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / g.ho, r = row % g.ho;
      const float* grow = gd + row * g.wo * C;
      std::fill(row_sum.begin(), row_sum.end(), 0.0f);
      for (int64_t i = 0; i < g.k; ++i) {
        const int64_t hi = r * g.s + i - g.p;
        if (hi < 0 || hi >= g.h) continue;
        const float* xrow = xd + (b * g.h + hi) * g.w * C;
        for (int64_t q = 0; q < g.wo; ++q) {
          const float* gq = grow + q * C;
          for (int64_t j = 0; j < g.k; ++j) {
            const int64_t wi = q * g.s + j - g.p;
            if (wi < 0 || wi >= g.w) continue;
            const float* xi = xrow + wi * C;
            float* a = row_sum.data() + (i * g.k + j) * C;
            for (int64_t ch = 0; ch < C; ++ch) a[ch] += xi[ch] * gq[ch];
          }
        }
      }
      for (int64_t e = 0; e < taps * C; ++e) total[e] += row_sum[e];
    }
  });
  float* out = dw->typed_data();
  std::memcpy(out, acc.data(), sizeof(float) * taps * C);
  for (int64_t piece = 1; piece < pieces; ++piece) {
    const float* part = acc.data() + piece * taps * C;
    for (int64_t e = 0; e < taps * C; ++e) out[e] += part[e];
  }
  return ffi::Error::Success();
}

// Dense convolution, few input channels. y[b, r, q, :] = sum_{i, j, c} x[b, r*S+i-P, q*S+j-P, c] * w[i, j, c, :].
// The output pixel's Cout values are accumulated in vector registers (GCC/Clang vector extensions: AVX on x86, NEON
// on ARM) across all K*K*Cin taps when Cout is a multiple of 8 up to 64, the stems' 16 and 64; else a plain loop.
typedef float Vec8 __attribute__((vector_size(32), aligned(4), may_alias));  // unaligned, may alias float

template <int V>  // V = Cout / 8 vectors of accumulators
void DenseForwardRowsVec(const Geometry& g, int64_t cin, const float* xd, const float* wd, float* yd, int64_t begin,
                         int64_t end) {
  const int64_t co = 8 * V;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t b = row / g.ho, r = row % g.ho;
    for (int64_t q = 0; q < g.wo; ++q) {
      Vec8 acc[V];
      for (int t = 0; t < V; ++t) acc[t] = Vec8{};
      for (int64_t i = 0; i < g.k; ++i) {
        const int64_t hi = r * g.s + i - g.p;
        if (hi < 0 || hi >= g.h) continue;
        for (int64_t j = 0; j < g.k; ++j) {
          const int64_t wi = q * g.s + j - g.p;
          if (wi < 0 || wi >= g.w) continue;
          const float* xi = xd + ((b * g.h + hi) * g.w + wi) * cin;
          const float* wij = wd + (i * g.k + j) * cin * co;
          for (int64_t c = 0; c < cin; ++c) {
            const float xv = xi[c];
            const Vec8* wc = reinterpret_cast<const Vec8*>(wij + c * co);
            for (int t = 0; t < V; ++t) acc[t] += xv * wc[t];
          }
        }
      }
      Vec8* out = reinterpret_cast<Vec8*>(yd + (row * g.wo + q) * co);
      for (int t = 0; t < V; ++t) out[t] = acc[t];
    }
  }
}

void DenseForwardRows(const Geometry& g, int64_t cin, int64_t co, const float* xd, const float* wd, float* yd,
                      int64_t begin, int64_t end) {
  for (int64_t row = begin; row < end; ++row) {
    const int64_t b = row / g.ho, r = row % g.ho;
    for (int64_t q = 0; q < g.wo; ++q) {
      float* out = yd + (row * g.wo + q) * co;
      std::fill(out, out + co, 0.0f);
      for (int64_t i = 0; i < g.k; ++i) {
        const int64_t hi = r * g.s + i - g.p;
        if (hi < 0 || hi >= g.h) continue;
        for (int64_t j = 0; j < g.k; ++j) {
          const int64_t wi = q * g.s + j - g.p;
          if (wi < 0 || wi >= g.w) continue;
          const float* xi = xd + ((b * g.h + hi) * g.w + wi) * cin;
          const float* wij = wd + (i * g.k + j) * cin * co;
          for (int64_t c = 0; c < cin; ++c) {
            const float xv = xi[c];
            const float* wc = wij + c * co;
            for (int64_t o = 0; o < co; ++o) out[o] += xv * wc[o];
          }
        }
      }
    }
  }
}

ffi::Error DenseConvForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                            ffi::ResultBuffer<ffi::F32> y, int64_t stride, int64_t padding) {
  Geometry g;
  auto wdim = w.dimensions();
  if (wdim.size() != 4) return ffi::Error::InvalidArgument("dense_conv: kernel must be (K, K, Cin, Cout)");
  if (auto e = MakeGeometry(x, wdim[0], stride, padding, &g); e.failure()) return e;
  const int64_t cin = wdim[2], co = wdim[3];
  const float* xd = x.typed_data();
  const float* wd = w.typed_data();
  float* yd = y->typed_data();
  ParallelFor(pool, g.n * g.ho, Pieces(pool), [&](int64_t begin, int64_t end, int64_t) {
    switch (co) {
      case 16: DenseForwardRowsVec<2>(g, cin, xd, wd, yd, begin, end); break;
      case 32: DenseForwardRowsVec<4>(g, cin, xd, wd, yd, begin, end); break;
      case 64: DenseForwardRowsVec<8>(g, cin, xd, wd, yd, begin, end); break;
      default: DenseForwardRows(g, cin, co, xd, wd, yd, begin, end);
    }
  });
  return ffi::Error::Success();
}

// dw[i, j, c, :] = sum_{b, r, q} x[b, r*S+i-P, q*S+j-P, c] * dy[b, r, q, :], accumulated per chunk of output rows
// (each chunk's own K*K*Cin*Cout accumulator, added in a fixed order at the end, as for the depthwise gradient).
// V > 0: Cout = 8 * V, dy's pixel held in vector registers; V = 0: any Cout.
template <int V>
void DenseKernelGradRows(const Geometry& g, int64_t cin, int64_t co, const float* xd, const float* gd, float* total,
                         int64_t begin, int64_t end) {
  const int64_t size = g.k * g.k * cin * co;
  std::vector<float> row_sum(size);
  for (int64_t row = begin; row < end; ++row) {
    const int64_t b = row / g.ho, r = row % g.ho;
    std::fill(row_sum.begin(), row_sum.end(), 0.0f);
    for (int64_t q = 0; q < g.wo; ++q) {
      const float* gq = gd + (row * g.wo + q) * co;
      Vec8 gv[V > 0 ? V : 1];
      for (int t = 0; t < V; ++t) gv[t] = reinterpret_cast<const Vec8*>(gq)[t];
      for (int64_t i = 0; i < g.k; ++i) {
        const int64_t hi = r * g.s + i - g.p;
        if (hi < 0 || hi >= g.h) continue;
        for (int64_t j = 0; j < g.k; ++j) {
          const int64_t wi = q * g.s + j - g.p;
          if (wi < 0 || wi >= g.w) continue;
          const float* xi = xd + ((b * g.h + hi) * g.w + wi) * cin;
          float* a = row_sum.data() + (i * g.k + j) * cin * co;
          for (int64_t c = 0; c < cin; ++c) {
            const float xv = xi[c];
            if (V > 0) {
              Vec8* ac = reinterpret_cast<Vec8*>(a + c * co);
              for (int t = 0; t < V; ++t) ac[t] += xv * gv[t];
            } else {
              float* ac = a + c * co;
              for (int64_t o = 0; o < co; ++o) ac[o] += xv * gq[o];
            }
          }
        }
      }
    }
    for (int64_t e = 0; e < size; ++e) total[e] += row_sum[e];
  }
}

ffi::Error DenseConvKernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                               ffi::ResultBuffer<ffi::F32> dw, int64_t stride, int64_t padding) {
  Geometry g;
  auto wdim = dw->dimensions();
  if (auto e = MakeGeometry(x, wdim[0], stride, padding, &g); e.failure()) return e;
  const int64_t cin = wdim[2], co = wdim[3], size = g.k * g.k * cin * co;
  const float* xd = x.typed_data();
  const float* gd = dy.typed_data();
  const int64_t pieces = std::min<int64_t>(Pieces(pool), g.n * g.ho);
  std::vector<float> acc(pieces * size, 0.0f);
  ParallelFor(pool, g.n * g.ho, pieces, [&](int64_t begin, int64_t end, int64_t piece) {
    float* total = acc.data() + piece * size;
    switch (co) {
      case 16: DenseKernelGradRows<2>(g, cin, co, xd, gd, total, begin, end); break;
      case 32: DenseKernelGradRows<4>(g, cin, co, xd, gd, total, begin, end); break;
      case 64: DenseKernelGradRows<8>(g, cin, co, xd, gd, total, begin, end); break;
      default: DenseKernelGradRows<0>(g, cin, co, xd, gd, total, begin, end);
    }
  });
  float* out = dw->typed_data();
  std::memcpy(out, acc.data(), sizeof(float) * size);
  for (int64_t piece = 1; piece < pieces; ++piece) {
    const float* part = acc.data() + piece * size;
    for (int64_t e = 0; e < size; ++e) out[e] += part[e];
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResmobileDepthwiseForward, DepthwiseForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("padding"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResmobileDepthwiseInputGrad, DepthwiseInputGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("padding"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResmobileDepthwiseKernelGrad, DepthwiseKernelGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("padding"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResmobileDenseConvForward, DenseConvForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("padding"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResmobileDenseConvKernelGrad, DenseConvKernelGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("padding"));

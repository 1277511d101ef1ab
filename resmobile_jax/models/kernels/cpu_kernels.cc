// Convolution kernels for XLA:CPU, NHWC float32, symmetric zero padding, registered as XLA FFI custom calls
// (resmobile_jax/models/kernels/cpu_kernels.py builds and loads this file):
// - depthwise k x k: forward, input gradient and kernel gradient. XLA:CPU runs the kernel gradient of a depthwise
//   convolution (k*k reductions over N*H*W) 10-30x slower than the forward pass in every formulation tried
//   (bench.depthwise_grad). Here all three passes walk lines of pixels with channels innermost, summing in vector
//   registers (SumLine, AddRowTap below).
// - dense convolution with few input channels (the stems: 3 -> 16 3x3, 3 -> 64 7x7): forward and kernel gradient,
//   output channels innermost so every tap is one broadcast multiply-add into a register-resident output vector.
//   XLA:CPU runs these 2-8x slower than PyTorch (oneDNN).
// - both forward passes also come with an eval-mode epilogue, y = act(y * scale + shift) (BatchNorm with running
//   statistics folded into scale and shift, then ReLU / Hardswish), applied to each output row while it is in cache:
//   XLA cannot fuse anything into a custom call, so otherwise that is one more pass over the output in memory.
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
#include <utility>
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

// Kernel gradients: body(begin, end, acc) sums rows [begin, end) into its chunk's own zeroed `size`-float
// accumulator; the chunks' accumulators are then added into `out` in chunk order, so the result does not depend on
// thread timing.
template <typename Body>
void ParallelSum(ffi::ThreadPool& pool, int64_t rows, int64_t size, float* out, Body body) {
  const int64_t pieces = std::max<int64_t>(1, std::min<int64_t>(Pieces(pool), rows));
  std::vector<float> acc(pieces * size, 0.0f);
  ParallelFor(pool, rows, pieces, [&](int64_t begin, int64_t end, int64_t piece) {
    body(begin, end, acc.data() + piece * size);
  });
  std::memcpy(out, acc.data(), sizeof(float) * size);
  for (int64_t piece = 1; piece < pieces; ++piece) {
    const float* part = acc.data() + piece * size;
    for (int64_t e = 0; e < size; ++e) out[e] += part[e];
  }
}

typedef float Vec8 __attribute__((vector_size(32), aligned(4), may_alias));  // unaligned, may alias float

// The three depthwise passes share one inner routine: along one line of outputs (an output row in the forward pass,
// one column class of an input row in the input gradient), out[m] = sum over taps t of in_t[a*m + col_t] * w_t,
// channels innermost. Outputs whose taps all fall inside the line take Q = 8 (then 4) pixels at a time with the Q
// sums in vector registers (each weight vector loaded once per Q pixels, each sum stored once); the few edge pixels
// check bounds.
// (A running sum in memory, or one pixel at a time, left the 16-channel 112x112 layers 4-5x slower than oneDNN.)
struct Tap {
  const float* in;  // the tap's input line (the pixel at column 0, channel 0)
  const float* w;   // its weights (channel 0)
  int64_t col;      // input column at m = 0
};

// memcpy, not a pointer cast: a template argument loses Vec8's aligned(4), and an aligned load of an unaligned
// address faults. Compiles to one unaligned vector load / store.
template <typename V> inline V Load(const float* p) { V v; std::memcpy(&v, p, sizeof(V)); return v; }
template <typename V> inline void Store(float* p, V v) { std::memcpy(p, &v, sizeof(V)); }
// (Not Vec8{} + s: adding the zero vector is kept, -0.0 + 0.0 being +0.0, and costs an add per broadcast.)
inline Vec8 Broadcast(float s) { return Vec8{s, s, s, s, s, s, s, s}; }

// [lo, hi): the outputs m in [0, count) whose input columns a*m + col_min .. a*m + col_max all lie in [0, in_w).
inline std::pair<int64_t, int64_t> InBoundsOutputs(int64_t col_min, int64_t col_max, int64_t a, int64_t in_w,
                                                   int64_t count) {
  const int64_t lo = std::min(count, std::max<int64_t>(0, (-col_min + a - 1) / a));
  const int64_t last = in_w - 1 - col_max;
  return {lo, std::max(lo, std::min(count, last < 0 ? 0 : last / a + 1))};
}

// Channels [ch, ch + lanes(V)) of outputs m .. m+Q-1; kChecked skips taps outside [0, in_w).
template <typename V, int Q, bool kChecked>
inline void SumPixels(const Tap* taps, int64_t n, int64_t a, int64_t in_w, int64_t C, int64_t m, int64_t ch,
                      float* out, int64_t out_stride) {
  V acc[Q] = {};
  const int64_t step = a * C;  // from one output's input pixel to the next one's
  for (int64_t t = 0; t < n; ++t) {
    const V wv = Load<V>(taps[t].w + ch);
    const int64_t col = a * m + taps[t].col;
    const float* in = taps[t].in + col * C + ch;
    for (int u = 0; u < Q; ++u) {
      if (kChecked && (col + a * u < 0 || col + a * u >= in_w)) continue;
      acc[u] += Load<V>(in + u * step) * wv;
    }
  }
  for (int u = 0; u < Q; ++u) Store<V>(out + (m + u) * out_stride + ch, acc[u]);
}

// All channels of outputs m .. m+Q-1. Channels innermost, so a block of outputs reads contiguous runs of its input
// pixels (channel blocks outermost swept each line C/8 times in strided 32-byte pieces: wide layers ran at ~5 GB/s).
template <int Q, bool kChecked>
inline void SumPixelsAllChannels(const Tap* taps, int64_t n, int64_t a, int64_t in_w, int64_t C, int64_t m,
                                 float* out, int64_t out_stride) {
  int64_t ch = 0;
  for (; ch + 8 <= C; ch += 8) SumPixels<Vec8, Q, kChecked>(taps, n, a, in_w, C, m, ch, out, out_stride);
  for (; ch < C; ++ch) SumPixels<float, Q, kChecked>(taps, n, a, in_w, C, m, ch, out, out_stride);
}

// out[m * out_stride + :C] for m in [0, count), taps in list order (n may be 0: zeros).
void SumLine(const Tap* taps, int64_t n, int64_t a, int64_t in_w, int64_t C, int64_t count, float* out,
             int64_t out_stride) {
  int64_t col_min = 0, col_max = 0;
  for (int64_t t = 0; t < n; ++t) {
    col_min = t == 0 ? taps[t].col : std::min(col_min, taps[t].col);
    col_max = t == 0 ? taps[t].col : std::max(col_max, taps[t].col);
  }
  const auto [m_lo, m_hi] = InBoundsOutputs(col_min, col_max, a, in_w, count);  // every tap in bounds
  int64_t m = 0;
  for (; m < m_lo; ++m) SumPixelsAllChannels<1, true>(taps, n, a, in_w, C, m, out, out_stride);
  // 8 outputs per block where the line is long (8 independent sums hide the FMA latency: the 112x112x64 stride-2
  // forward 12.8 -> 8.8 ms), then 4, then single pixels.
  for (; m + 8 <= m_hi; m += 8) SumPixelsAllChannels<8, false>(taps, n, a, in_w, C, m, out, out_stride);
  for (; m + 4 <= m_hi; m += 4) SumPixelsAllChannels<4, false>(taps, n, a, in_w, C, m, out, out_stride);
  for (; m < m_hi; ++m) SumPixelsAllChannels<1, false>(taps, n, a, in_w, C, m, out, out_stride);
  for (; m < count; ++m) SumPixelsAllChannels<1, true>(taps, n, a, in_w, C, m, out, out_stride);
}

// The eval-mode epilogue (after a convolution) and prologue (before a depthwise one): act(v * scale[c] + shift[c])
// over `pixels` x C values. The same float32 operations as the model's BatchNorm and activations (layers.py), so
// only rounding (an FMA) differs.
enum Activation : int64_t { kIdentity = 0, kRelu = 1, kHardswish = 2 };

struct Epilogue {
  const float* scale = nullptr;  // nullptr: no epilogue (training, or the plain forward pass)
  const float* shift = nullptr;
  int64_t activation = kIdentity;
};

// In vector registers explicitly (Vec8, then a scalar tail): GCC left the Hardswish form as a scalar loop with
// branches, 6x slower than XLA's own pass over memory.
template <int64_t kAct, typename V>
inline V Activate(V t) {
  if constexpr (kAct == kRelu) return t > V{} ? t : V{};
  if constexpr (kAct == kHardswish) {
    const V six = V{} + 6.0f;
    V u = t + 3.0f;
    u = u > V{} ? u : V{};
    u = u < six ? u : six;
    return t * (u / 6.0f);
  }
  return t;
}

template <int64_t kAct>
void ApplyEpilogue(const Epilogue& e, const float* src, float* dst, int64_t pixels, int64_t C) {
  for (int64_t m = 0; m < pixels; ++m) {
    const float* u = src + m * C;
    float* v = dst + m * C;
    int64_t c = 0;
    for (; c + 8 <= C; c += 8)
      Store<Vec8>(v + c, Activate<kAct>(Load<Vec8>(u + c) * Load<Vec8>(e.scale + c) + Load<Vec8>(e.shift + c)));
    for (; c < C; ++c) v[c] = Activate<kAct>(u[c] * e.scale[c] + e.shift[c]);
  }
}

// dst = act(src * scale + shift) over pixels x C values (src == dst: in place); nothing without a scale.
void ApplyEpilogue(const Epilogue& e, const float* src, float* dst, int64_t pixels, int64_t C) {
  if (e.scale == nullptr) return;
  if (e.activation == kRelu) ApplyEpilogue<kRelu>(e, src, dst, pixels, C);
  else if (e.activation == kHardswish) ApplyEpilogue<kHardswish>(e, src, dst, pixels, C);
  else ApplyEpilogue<kIdentity>(e, src, dst, pixels, C);
}

ffi::Error MakeEpilogue(ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> shift, int64_t activation, int64_t c,
                        Epilogue* e) {
  if (scale.element_count() != static_cast<size_t>(c) || shift.element_count() != static_cast<size_t>(c))
    return ffi::Error::InvalidArgument("conv epilogue: scale and shift need one value per output channel");
  if (activation < kIdentity || activation > kHardswish)
    return ffi::Error::InvalidArgument("conv epilogue: activation must be 0 (identity), 1 (relu) or 2 (hardswish)");
  *e = {scale.typed_data(), shift.typed_data(), activation};
  return ffi::Error::Success();
}

// A 1x1 convolution in eval mode, pixel by pixel: out[m, :] = act((in[m, :] @ w) * scale + shift) (+ add[m, :]),
// w (cin, cout). Blocks of 6 pixels x 16 output channels are summed in 12 vector registers, each weight vector
// loaded once per 6 pixels and each input value broadcast once per 16 channels. The weights are first repacked into
// panels of 16 (then 8) output channels, contiguous over cin, which a block reads front to back (from w itself, a
// 16-channel panel is 64 bytes of every cin-th cache line: the 80 -> 184 layers ran ~15% slower).
struct Pointwise {
  const float* w = nullptr;       // (cin, cout); nullptr: none
  const float* panels = nullptr;  // the panel of channels [c, c + 16) (or + 8) at panels + c * cin
  int64_t cin = 0, cout = 0;
  Epilogue bn;  // its BatchNorm (scale, shift per output channel) and activation
};

// Fills `storage` with w's panels (the channels of a last partial panel are read from w itself).
void PackPanels(Pointwise* pw, std::vector<float>* storage) {
  const int64_t K = pw->cin, N = pw->cout;
  storage->assign(K * N, 0.0f);
  for (int64_t c = 0, width = 16; c < N; c += width) {
    width = c + 16 <= N ? 16 : 8;
    if (c + width > N) break;
    for (int64_t k = 0; k < K; ++k) std::memcpy(storage->data() + c * K + k * width, pw->w + k * N + c, sizeof(float) * width);
  }
  pw->panels = storage->data();
}

template <int Q, int NV, int64_t kAct>
inline void PointwiseBlock(const Pointwise& pw, const float* in, const float* add, float* out, int64_t c0) {
  const int64_t K = pw.cin, N = pw.cout;
  Vec8 acc[Q][NV] = {};
  for (int64_t k = 0; k < K; ++k) {
    Vec8 wv[NV];
    for (int v = 0; v < NV; ++v) wv[v] = Load<Vec8>(pw.panels + c0 * K + k * 8 * NV + 8 * v);
    for (int u = 0; u < Q; ++u) {
      const Vec8 xv = Broadcast(in[u * K + k]);
      for (int v = 0; v < NV; ++v) acc[u][v] += xv * wv[v];
    }
  }
  for (int v = 0; v < NV; ++v) {
    const int64_t c = c0 + 8 * v;
    const Vec8 scale = Load<Vec8>(pw.bn.scale + c), shift = Load<Vec8>(pw.bn.shift + c);
    for (int u = 0; u < Q; ++u) {
      Vec8 t = Activate<kAct>(acc[u][v] * scale + shift);
      if (add != nullptr) t += Load<Vec8>(add + u * N + c);
      Store<Vec8>(out + u * N + c, t);
    }
  }
}

// Blocks of kPixels pixels (a multiple of kPixels of them), every channel.
constexpr int kPixels = 6;

template <int64_t kAct>
void PointwiseBlocks(const Pointwise& pw, const float* in, int64_t pixels, const float* add, float* out) {
  const int64_t K = pw.cin, N = pw.cout;
  int64_t c = 0;
  for (; c + 16 <= N; c += 16)
    for (int64_t m = 0; m < pixels; m += kPixels)
      PointwiseBlock<kPixels, 2, kAct>(pw, in + m * K, add == nullptr ? nullptr : add + m * N, out + m * N, c);
  for (; c + 8 <= N; c += 8)
    for (int64_t m = 0; m < pixels; m += kPixels)
      PointwiseBlock<kPixels, 1, kAct>(pw, in + m * K, add == nullptr ? nullptr : add + m * N, out + m * N, c);
  for (; c < N; ++c) {
    for (int64_t m = 0; m < pixels; ++m) {
      float sum = 0.0f;
      for (int64_t k = 0; k < K; ++k) sum += in[m * K + k] * pw.w[k * N + c];
      const float t = Activate<kAct>(sum * pw.bn.scale[c] + pw.bn.shift[c]);
      out[m * N + c] = add == nullptr ? t : t + add[m * N + c];
    }
  }
}

// The last pixels of a row (fewer than kPixels) go through one full block on zero-padded copies: single pixels
// (2 independent sums per step, each waiting on the previous FMA) ran the 14-pixel rows ~30% slower.
template <int64_t kAct>
void Pointwise1x1(const Pointwise& pw, const float* in, int64_t pixels, const float* add, float* out) {
  const int64_t K = pw.cin, N = pw.cout, full = pixels / kPixels * kPixels, rest = pixels - full;
  PointwiseBlocks<kAct>(pw, in, full, add, out);
  if (rest == 0) return;
  thread_local std::vector<float> padded;
  padded.assign(kPixels * (K + 2 * N), 0.0f);
  float* pin = padded.data();
  float* padd = pin + kPixels * K;
  float* pout = padd + kPixels * N;
  std::memcpy(pin, in + full * K, sizeof(float) * rest * K);
  if (add != nullptr) std::memcpy(padd, add + full * N, sizeof(float) * rest * N);
  PointwiseBlocks<kAct>(pw, pin, kPixels, add == nullptr ? nullptr : padd, pout);
  std::memcpy(out + full * N, pout, sizeof(float) * rest * N);
}

void Pointwise1x1(const Pointwise& pw, const float* in, int64_t pixels, const float* add, float* out) {
  if (pw.bn.activation == kRelu) Pointwise1x1<kRelu>(pw, in, pixels, add, out);
  else if (pw.bn.activation == kHardswish) Pointwise1x1<kHardswish>(pw, in, pixels, add, out);
  else Pointwise1x1<kIdentity>(pw, in, pixels, add, out);
}

// What eval mode runs around a depthwise convolution in the same pass, one output row at a time (all optional):
// - on its input rows: act(x * scale + shift) (`pro`: the BN + activation of the 1x1 expansion XLA ran before), or
//   the whole expansion act((x @ w) * scale + shift) (`expand`);
// - on its output row: act(y * scale + shift) (`epi`: its own BN + activation), then the 1x1 projection
//   (y @ w) * scale + shift (`project`), plus the block's input row when `residual`.
struct Fused {
  Epilogue pro;
  Pointwise expand;
  Epilogue epi;
  Pointwise project;
  bool residual = false;
};

// y[b, r, q, :] = sum_ij x[b, r*S+i-P, q*S+j-P, :] * w[i, j, :]: output row (b, r) is one line, a = S, taps (i, j)
// in order with col = j - P. Transformed input rows (f.pro, f.expand) go to a per-thread ring of K rows: each is
// computed once per chunk of output rows, and the padding stays zero (taps outside x are skipped). With a
// projection, the depthwise output row is a per-thread scratch row that never reaches memory as a feature map.
ffi::Error DepthwiseForwardWith(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                                ffi::ResultBuffer<ffi::F32> y, int64_t stride, int64_t padding, const Fused& f) {
  Geometry g;
  int64_t k = w.dimensions()[0];
  if (auto e = MakeGeometry(x, k, stride, padding, &g); e.failure()) return e;
  const float* xd = x.typed_data();
  const float* wd = w.typed_data();
  float* yd = y->typed_data();
  const int64_t C = f.expand.w != nullptr ? f.expand.cout : g.c;  // the depthwise convolution's channels
  const int64_t cy = f.project.w != nullptr ? f.project.cout : C;
  const bool transform = f.pro.scale != nullptr || f.expand.w != nullptr;
  const int64_t x_row = g.w * g.c, row_size = g.w * C;
  ParallelFor(pool, g.n * g.ho, Pieces(pool), [&](int64_t begin, int64_t end, int64_t) {
    std::vector<Tap> taps(g.k * g.k);
    std::vector<float> ring(transform ? g.k * row_size : 0);  // input row hi in slot hi % K
    std::vector<int64_t> ring_row(g.k, -1);                    // which (b * H + hi) each slot holds
    std::vector<float> scratch(f.project.w != nullptr ? g.wo * C : 0);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / g.ho, r = row % g.ho;
      int64_t n = 0;
      for (int64_t i = 0; i < g.k; ++i) {
        const int64_t hi = r * g.s + i - g.p;
        if (hi < 0 || hi >= g.h) continue;
        const float* in = xd + (b * g.h + hi) * x_row;
        if (transform) {  // the K rows of one output row are consecutive, so their slots differ
          const int64_t slot = hi % g.k, input_row = b * g.h + hi;
          float* transformed = ring.data() + slot * row_size;
          if (ring_row[slot] != input_row) {
            if (f.expand.w != nullptr) Pointwise1x1(f.expand, in, g.w, nullptr, transformed);
            else ApplyEpilogue(f.pro, in, transformed, g.w, C);
          }
          ring_row[slot] = input_row;
          in = transformed;
        }
        for (int64_t j = 0; j < g.k; ++j) taps[n++] = {in, wd + (i * g.k + j) * C, j - g.p};
      }
      float* out = f.project.w != nullptr ? scratch.data() : yd + row * g.wo * C;
      SumLine(taps.data(), n, g.s, g.w, C, g.wo, out, C);
      ApplyEpilogue(f.epi, out, out, g.wo, C);
      if (f.project.w != nullptr)  // residual: stride 1 and same padding, so input row `row` is this output row
        Pointwise1x1(f.project, out, g.wo, f.residual ? xd + row * x_row : nullptr, yd + row * g.wo * cy);
    }
  });
  return ffi::Error::Success();
}

ffi::Error DepthwiseForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                            ffi::ResultBuffer<ffi::F32> y, int64_t stride, int64_t padding) {
  return DepthwiseForwardWith(pool, x, w, y, stride, padding, Fused{});
}

ffi::Error DepthwiseForwardBnAct(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                                 ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> shift,
                                 ffi::ResultBuffer<ffi::F32> y, int64_t stride, int64_t padding, int64_t activation) {
  Epilogue epi;
  if (auto e = MakeEpilogue(scale, shift, activation, x.dimensions().back(), &epi); e.failure()) return e;
  Fused f;
  f.epi = epi;
  return DepthwiseForwardWith(pool, x, w, y, stride, padding, f);
}

// The same with the prologue: in_scale, in_shift and input_activation transform x before the convolution.
ffi::Error DepthwiseForwardBnActIn(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                                   ffi::Buffer<ffi::F32> in_scale, ffi::Buffer<ffi::F32> in_shift,
                                   ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> shift,
                                   ffi::ResultBuffer<ffi::F32> y, int64_t stride, int64_t padding, int64_t activation,
                                   int64_t input_activation) {
  Epilogue pro, epi;
  const int64_t c = x.dimensions().back();
  if (auto e = MakeEpilogue(in_scale, in_shift, input_activation, c, &pro); e.failure()) return e;
  if (auto e = MakeEpilogue(scale, shift, activation, c, &epi); e.failure()) return e;
  Fused f;
  f.pro = pro;
  f.epi = epi;
  return DepthwiseForwardWith(pool, x, w, y, stride, padding, f);
}

ffi::Error MakePointwise(ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> shift,
                         int64_t activation, int64_t cin, Pointwise* pw, std::vector<float>* panels) {
  auto d = w.dimensions();
  if (d.size() != 2 || d[0] != cin)
    return ffi::Error::InvalidArgument("inverted_residual: a 1x1 kernel must be (Cin, Cout) with Cin its input's channels");
  pw->w = w.typed_data();
  pw->cin = d[0];
  pw->cout = d[1];
  PackPanels(pw, panels);
  return MakeEpilogue(scale, shift, activation, d[1], &pw->bn);
}

// A whole MobileNetV3 inverted residual without squeeze-excitation, eval mode: [1x1 expand + BN + act] -> depthwise
// + BN + act -> 1x1 project + BN [+ x]. The expanded and depthwise feature maps (the block's largest, up to 4-6x
// its input) then exist only row by row in cache: unfused, each is written and read back by a separate XLA op,
// and in the 112x112 and 56x56 blocks those passes over memory took most of the block's time.
// An empty expand_w means no expansion (the depthwise convolution runs on x itself).
ffi::Error InvertedResidualForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> expand_w,
                                   ffi::Buffer<ffi::F32> expand_scale, ffi::Buffer<ffi::F32> expand_shift,
                                   ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> shift,
                                   ffi::Buffer<ffi::F32> project_w, ffi::Buffer<ffi::F32> project_scale,
                                   ffi::Buffer<ffi::F32> project_shift, ffi::ResultBuffer<ffi::F32> y, int64_t stride,
                                   int64_t padding, int64_t activation, int64_t residual) {
  if (x.dimensions().size() != 4) return ffi::Error::InvalidArgument("inverted_residual: input must be NHWC (rank 4)");
  const int64_t cin = x.dimensions().back();
  Fused f;
  std::vector<float> expand_panels, project_panels;
  if (expand_w.element_count() > 0) {
    if (auto e = MakePointwise(expand_w, expand_scale, expand_shift, activation, cin, &f.expand, &expand_panels);
        e.failure())
      return e;
  }
  const int64_t c = f.expand.w != nullptr ? f.expand.cout : cin;
  auto wd = w.dimensions();
  if (wd.size() != 3 || wd[0] != wd[1] || wd[2] != c)
    return ffi::Error::InvalidArgument("inverted_residual: depthwise kernel must be (K, K, C), C the expanded width");
  if (auto e = MakeEpilogue(scale, shift, activation, c, &f.epi); e.failure()) return e;
  if (auto e = MakePointwise(project_w, project_scale, project_shift, kIdentity, c, &f.project, &project_panels);
      e.failure())
    return e;
  f.residual = residual != 0;
  if (f.residual && (stride != 1 || 2 * padding != wd[0] - 1 || f.project.cout != cin))
    return ffi::Error::InvalidArgument("inverted_residual: the residual needs stride 1, same padding and Cout == Cin");
  return DepthwiseForwardWith(pool, x, w, y, stride, padding, f);
}

// dx[b, hi, wi, :] = sum over the (r, q, i, j) with r*S+i-P = hi, q*S+j-P = wi of dy[b, r, q, :] * w[i, j, :]: a
// gather, row by row of dx. The columns wi = S*m + phi of one residue phi form a line (a = 1): they take the taps
// j = phi + P (mod S), reading dy column q = m + (phi + P - j) / S.
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
    std::vector<Tap> taps(g.k * g.k);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / g.h, hi = row % g.h;
      for (int64_t phi = 0; phi < std::min(g.s, g.w); ++phi) {
        int64_t n = 0;
        for (int64_t i = 0; i < g.k; ++i) {
          const int64_t t = hi + g.p - i;  // = r * S
          if (t < 0 || t % g.s != 0 || t / g.s >= g.ho) continue;
          const float* grow = gd + (b * g.ho + t / g.s) * g.wo * C;
          for (int64_t j = 0; j < g.k; ++j) {
            if (((phi + g.p - j) % g.s + g.s) % g.s != 0) continue;
            taps[n++] = {grow, wd + (i * g.k + j) * C, (phi + g.p - j) / g.s};
          }
        }
        SumLine(taps.data(), n, 1, g.wo, C, (g.w - phi + g.s - 1) / g.s, xd + (row * g.w + phi) * C, g.s * C);
      }
    }
  });
  return ffi::Error::Success();
}

// dw[i, j, :] = sum_{b, r, q} x[b, r*S+i-P, q*S+j-P, :] * dy[b, r, q, :]. For each output row and tap, the sum
// over q runs in vector registers, 8 outputs at a time, and those partial sums go into the chunk's k*k*C
// accumulator (so long reductions keep their precision); the chunks' accumulators are added at the end in a fixed
// order, so the result does not depend on thread timing.
template <typename V>
inline void AddRowTap(const float* xrow, const float* grow, int64_t C, int64_t s, int64_t col0, int64_t q_lo,
                      int64_t q_hi, int64_t ch, float* total) {
  V acc{};
  for (int64_t q = q_lo; q < q_hi; ++q) acc += Load<V>(xrow + (q * s + col0) * C + ch) * Load<V>(grow + q * C + ch);
  Store<V>(total + ch, Load<V>(total + ch) + acc);
}

ffi::Error DepthwiseKernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                               ffi::ResultBuffer<ffi::F32> dw, int64_t stride, int64_t padding) {
  Geometry g;
  int64_t k = dw->dimensions()[0];
  if (auto e = MakeGeometry(x, k, stride, padding, &g); e.failure()) return e;
  const float* xd = x.typed_data();
  const float* gd = dy.typed_data();
  const int64_t C = g.c, taps = g.k * g.k;
  ParallelSum(pool, g.n * g.ho, taps * C, dw->typed_data(), [&](int64_t begin, int64_t end, float* total) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / g.ho, r = row % g.ho;
      const float* grow = gd + row * g.wo * C;
      for (int64_t i = 0; i < g.k; ++i) {
        const int64_t hi = r * g.s + i - g.p;
        if (hi < 0 || hi >= g.h) continue;
        const float* xrow = xd + (b * g.h + hi) * g.w * C;
        for (int64_t j = 0; j < g.k; ++j) {
          const int64_t col0 = j - g.p;
          const auto [q_lo, q_hi] = InBoundsOutputs(col0, col0, g.s, g.w, g.wo);  // 0 <= q*S + j - P < W
          float* tap_total = total + (i * g.k + j) * C;
          // 8 outputs at a time, all channels of them, then the next 8: contiguous reads, one add into the
          // accumulator per 8 products.
          for (int64_t q0 = q_lo; q0 < q_hi; q0 += 8) {
            const int64_t q1 = std::min(q_hi, q0 + 8);
            int64_t ch = 0;
            for (; ch + 8 <= C; ch += 8) AddRowTap<Vec8>(xrow, grow, C, g.s, col0, q0, q1, ch, tap_total);
            for (; ch < C; ++ch) AddRowTap<float>(xrow, grow, C, g.s, col0, q0, q1, ch, tap_total);
          }
        }
      }
    }
  });
  return ffi::Error::Success();
}

// Dense convolution, few input channels. y[b, r, q, :] = sum_{i, j, c} x[b, r*S+i-P, q*S+j-P, c] * w[i, j, c, :].
// The input is first copied into a zero-padded buffer, so the inner loops have no bounds checks. When Cout is a
// multiple of 8, outputs are computed in blocks of Q pixels x 8V channels held in vector registers (GCC/Clang
// vector extensions: AVX on x86, NEON on ARM): every weight vector loaded is used for Q pixels, and the block's
// weights (K*K*Cin*8V floats) stay in L1. Other Cout: a plain loop.

struct Padded {
  const float* data;
  int64_t hp, wp;
};

// The padded copy lives in a per-thread buffer that is kept and reused: a fresh 20 MB buffer per call (224 px,
// batch 32) came from newly mapped memory every time: a third of the page faults of a 224 px forward pass.
// A thread runs one custom call at a time, so the buffer is never shared; it keeps the largest size seen (32 images
// at 224 px: 20 MB per XLA worker thread).
Padded PadInput(ffi::ThreadPool& pool, const Geometry& g, const float* xd) {
  static thread_local std::vector<float> buffer;
  Padded out{nullptr, g.h + 2 * g.p, g.w + 2 * g.p};
  // The tail: a last partial block of pixels reads up to 7 pixels (x S) past the last row (results discarded).
  buffer.assign(g.n * out.hp * out.wp * g.c + 8 * g.s * g.c, 0.0f);  // reuses the capacity it has
  float* pd = buffer.data();
  out.data = pd;
  ParallelFor(pool, g.n * g.h, Pieces(pool), [&](int64_t begin, int64_t end, int64_t) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / g.h, hi = row % g.h;
      std::memcpy(pd + ((b * out.hp + hi + g.p) * out.wp + g.p) * g.c, xd + row * g.w * g.c, sizeof(float) * g.w * g.c);
    }
  });
  return out;
}

template <int V, int Q>
void DenseForwardBlocked(const Geometry& g, int64_t co, const Padded& xp, const float* wd, float* yd, int64_t begin,
                         int64_t end) {
  const int64_t cin = g.c;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t b = row / g.ho, r = row % g.ho;
    for (int64_t o0 = 0; o0 < co; o0 += 8 * V) {
      for (int64_t q0 = 0; q0 < g.wo; q0 += Q) {
        Vec8 acc[Q][V];
        for (int u = 0; u < Q; ++u)
          for (int t = 0; t < V; ++t) acc[u][t] = Vec8{};
        for (int64_t i = 0; i < g.k; ++i) {
          const float* xrow = xp.data + (b * xp.hp + r * g.s + i) * xp.wp * cin;
          for (int64_t j = 0; j < g.k; ++j) {
            const float* wij = wd + (i * g.k + j) * cin * co + o0;
            const float* x0 = xrow + (q0 * g.s + j) * cin;
            for (int64_t c = 0; c < cin; ++c) {
              const Vec8* wc = reinterpret_cast<const Vec8*>(wij + c * co);
              for (int u = 0; u < Q; ++u) {
                const float xv = x0[u * g.s * cin + c];  // past the row's end in a last partial block (discarded)
                for (int t = 0; t < V; ++t) acc[u][t] += xv * wc[t];
              }
            }
          }
        }
        for (int u = 0; u < Q && q0 + u < g.wo; ++u) {
          Vec8* out = reinterpret_cast<Vec8*>(yd + (row * g.wo + q0 + u) * co + o0);
          for (int t = 0; t < V; ++t) out[t] = acc[u][t];
        }
      }
    }
  }
}

void DenseForwardRows(const Geometry& g, int64_t co, const Padded& xp, const float* wd, float* yd, int64_t begin,
                      int64_t end) {
  const int64_t cin = g.c;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t b = row / g.ho, r = row % g.ho;
    for (int64_t q = 0; q < g.wo; ++q) {
      float* out = yd + (row * g.wo + q) * co;
      std::fill(out, out + co, 0.0f);
      for (int64_t i = 0; i < g.k; ++i) {
        const float* xrow = xp.data + (b * xp.hp + r * g.s + i) * xp.wp * cin;
        for (int64_t j = 0; j < g.k; ++j) {
          const float* xi = xrow + (q * g.s + j) * cin;
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

ffi::Error DenseConvForwardWith(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                                ffi::ResultBuffer<ffi::F32> y, int64_t stride, int64_t padding, const Epilogue& epi) {
  Geometry g;
  auto wdim = w.dimensions();
  if (wdim.size() != 4) return ffi::Error::InvalidArgument("dense_conv: kernel must be (K, K, Cin, Cout)");
  if (auto e = MakeGeometry(x, wdim[0], stride, padding, &g); e.failure()) return e;
  const int64_t co = wdim[3];
  const float* wd = w.typed_data();
  float* yd = y->typed_data();
  const Padded xp = PadInput(pool, g, x.typed_data());
  ParallelFor(pool, g.n * g.ho, Pieces(pool), [&](int64_t begin, int64_t end, int64_t) {
    for (int64_t row = begin; row < end; ++row) {  // one output row at a time, so the epilogue finds it in cache
      if (co % 32 == 0) DenseForwardBlocked<4, 3>(g, co, xp, wd, yd, row, row + 1);
      else if (co % 16 == 0) DenseForwardBlocked<2, 6>(g, co, xp, wd, yd, row, row + 1);
      else if (co % 8 == 0) DenseForwardBlocked<1, 8>(g, co, xp, wd, yd, row, row + 1);
      else DenseForwardRows(g, co, xp, wd, yd, row, row + 1);
      ApplyEpilogue(epi, yd + row * g.wo * co, yd + row * g.wo * co, g.wo, co);
    }
  });
  return ffi::Error::Success();
}

ffi::Error DenseConvForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                            ffi::ResultBuffer<ffi::F32> y, int64_t stride, int64_t padding) {
  return DenseConvForwardWith(pool, x, w, y, stride, padding, Epilogue{});
}

ffi::Error DenseConvForwardBnAct(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                                 ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> shift,
                                 ffi::ResultBuffer<ffi::F32> y, int64_t stride, int64_t padding, int64_t activation) {
  Epilogue epi;
  if (auto e = MakeEpilogue(scale, shift, activation, w.dimensions().back(), &epi); e.failure()) return e;
  return DenseConvForwardWith(pool, x, w, y, stride, padding, epi);
}

// dw[i, j, c, :] = sum_{b, r, q} x[b, r*S+i-P, q*S+j-P, c] * dy[b, r, q, :], accumulated per chunk of output rows
// (each chunk's own K*K*Cin*Cout accumulator, added in a fixed order at the end, as for the depthwise gradient).
// Per output row and tap (i, j, c), a block of 8V output channels is summed over the row's pixels in registers:
// the row of dy (Wo*Cout floats) stays in L1 and nothing is stored inside the pixel loop.
template <int V>
void DenseKernelGradBlocked(const Geometry& g, int64_t co, const Padded& xp, const float* gd, float* total,
                            int64_t begin, int64_t end) {
  const int64_t cin = g.c;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t b = row / g.ho, r = row % g.ho;
    const float* grow = gd + row * g.wo * co;
    for (int64_t i = 0; i < g.k; ++i) {
      const float* xrow = xp.data + (b * xp.hp + r * g.s + i) * xp.wp * cin;
      for (int64_t j = 0; j < g.k; ++j) {
        for (int64_t c = 0; c < cin; ++c) {
          const float* x0 = xrow + j * cin + c;
          float* a = total + ((i * g.k + j) * cin + c) * co;
          for (int64_t o0 = 0; o0 < co; o0 += 8 * V) {
            Vec8 acc[V];
            for (int t = 0; t < V; ++t) acc[t] = Vec8{};
            for (int64_t q = 0; q < g.wo; ++q) {
              const float xv = x0[q * g.s * cin];
              const Vec8* gq = reinterpret_cast<const Vec8*>(grow + q * co + o0);
              for (int t = 0; t < V; ++t) acc[t] += xv * gq[t];
            }
            Vec8* at = reinterpret_cast<Vec8*>(a + o0);
            for (int t = 0; t < V; ++t) at[t] += acc[t];
          }
        }
      }
    }
  }
}

void DenseKernelGradRows(const Geometry& g, int64_t co, const Padded& xp, const float* gd, float* total,
                         int64_t begin, int64_t end) {
  const int64_t cin = g.c;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t b = row / g.ho, r = row % g.ho;
    for (int64_t q = 0; q < g.wo; ++q) {
      const float* gq = gd + (row * g.wo + q) * co;
      for (int64_t i = 0; i < g.k; ++i) {
        const float* xrow = xp.data + (b * xp.hp + r * g.s + i) * xp.wp * cin;
        for (int64_t j = 0; j < g.k; ++j) {
          const float* xi = xrow + (q * g.s + j) * cin;
          float* a = total + (i * g.k + j) * cin * co;
          for (int64_t c = 0; c < cin; ++c) {
            const float xv = xi[c];
            float* ac = a + c * co;
            for (int64_t o = 0; o < co; ++o) ac[o] += xv * gq[o];
          }
        }
      }
    }
  }
}

ffi::Error DenseConvKernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                               ffi::ResultBuffer<ffi::F32> dw, int64_t stride, int64_t padding) {
  Geometry g;
  auto wdim = dw->dimensions();
  if (auto e = MakeGeometry(x, wdim[0], stride, padding, &g); e.failure()) return e;
  const int64_t co = wdim[3], size = g.k * g.k * g.c * co;
  const float* gd = dy.typed_data();
  const Padded xp = PadInput(pool, g, x.typed_data());
  ParallelSum(pool, g.n * g.ho, size, dw->typed_data(), [&](int64_t begin, int64_t end, float* total) {
    if (co % 32 == 0) DenseKernelGradBlocked<4>(g, co, xp, gd, total, begin, end);
    else if (co % 16 == 0) DenseKernelGradBlocked<2>(g, co, xp, gd, total, begin, end);
    else if (co % 8 == 0) DenseKernelGradBlocked<1>(g, co, xp, gd, total, begin, end);
    else DenseKernelGradRows(g, co, xp, gd, total, begin, end);
  });
  return ffi::Error::Success();
}

}  // namespace

// Every kernel takes NHWC float32 buffers and the stride and symmetric padding as attributes.
static auto TwoInputs() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>()
      .Attr<int64_t>("stride")
      .Attr<int64_t>("padding");
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResmobileDepthwiseForward, DepthwiseForward, TwoInputs());
XLA_FFI_DEFINE_HANDLER_SYMBOL(ResmobileDepthwiseKernelGrad, DepthwiseKernelGrad, TwoInputs());
XLA_FFI_DEFINE_HANDLER_SYMBOL(ResmobileDenseConvForward, DenseConvForward, TwoInputs());
XLA_FFI_DEFINE_HANDLER_SYMBOL(ResmobileDenseConvKernelGrad, DenseConvKernelGrad, TwoInputs());
// The forward passes with the eval-mode epilogue: x, w, scale, shift; the activation's code as an attribute.
static auto ForwardBnAct() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>()
      .Attr<int64_t>("stride")
      .Attr<int64_t>("padding")
      .Attr<int64_t>("activation");
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResmobileDepthwiseForwardBnAct, DepthwiseForwardBnAct, ForwardBnAct());
XLA_FFI_DEFINE_HANDLER_SYMBOL(ResmobileDepthwiseForwardBnActIn, DepthwiseForwardBnActIn,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w
                                  .Arg<ffi::Buffer<ffi::F32>>()  // in_scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // in_shift
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // shift
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("padding")
                                  .Attr<int64_t>("activation")
                                  .Attr<int64_t>("input_activation"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(ResmobileDenseConvForwardBnAct, DenseConvForwardBnAct, ForwardBnAct());
XLA_FFI_DEFINE_HANDLER_SYMBOL(ResmobileInvertedResidualForward, InvertedResidualForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // expand_w (Cin, C), or empty
                                  .Arg<ffi::Buffer<ffi::F32>>()  // expand_scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // expand_shift
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w (K, K, C)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // shift
                                  .Arg<ffi::Buffer<ffi::F32>>()  // project_w (C, Cout)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // project_scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // project_shift
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("padding")
                                  .Attr<int64_t>("activation")
                                  .Attr<int64_t>("residual"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(ResmobileDepthwiseInputGrad, DepthwiseInputGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x, for its shape
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("padding"));

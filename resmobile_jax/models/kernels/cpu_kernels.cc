// Convolution kernels for XLA:CPU, NHWC float32, symmetric zero padding, registered as XLA FFI custom calls
// (resmobile_jax/models/kernels/cpu_kernels.py builds and loads this file):
// - depthwise k x k: forward, input gradient and kernel gradient. XLA:CPU runs the kernel gradient of a depthwise
//   convolution (k*k reductions over N*H*W) 10-30x slower than the forward pass in every formulation tried
//   (bench.depthwise_grad). Here all three passes walk lines of pixels with channels innermost, summing in vector
//   registers (SumLine / SumRowsLine, AddRowTap below).
// - dense convolution with few input channels (the stems: 3 -> 16 3x3, 3 -> 64 7x7): forward and kernel gradient,
//   output channels innermost so every tap is one broadcast multiply-add into a register-resident output vector.
//   XLA:CPU runs these 2-8x slower than PyTorch (oneDNN).
// - both forward passes also come with an eval-mode epilogue, y = act(y * scale + shift) (BatchNorm with running
//   statistics folded into scale and shift, then ReLU / Hardswish), applied to each output row while it is in cache:
//   XLA cannot fuse anything into a custom call, so otherwise that is one more pass over the output in memory. The
//   stem's dense convolution can also run ResNet's max pool on its rows (V2); the max pool and its gradient also
//   run alone (training).
// - eval-mode MobileNetV3 inverted residuals: the 1x1 expansion, depthwise and 1x1 projection layers with their
//   BatchNorms, activations and the residual in one pass over rows (two around the squeeze-excitation's matmuls),
//   with an own register-blocked 1x1 kernel (Pointwise1x1): unfused, the expanded and depthwise maps, the largest
//   of the network, are each written to memory and read back by separate XLA ops.
// - eval-mode ResNet bottlenecks (the tail) in three passes over rows, their narrow inner maps staying in cache.
// - training-mode BatchNorm + activation (batch statistics; forward and backward), and that BN + activation as a
//   prologue of the depthwise forward and kernel-gradient passes (applied to each input row as it is read), so an
//   inverted residual's expanded map is written once, before its BN, instead of also after it.
//
// Layouts: x (N, H, W, C), depthwise w (K, K, C) (the model's (K, K, 1, C) kernel, flattened), dense w
// (K, K, Cin, Cout), y (N, Ho, Wo, C), Ho = (H + 2P - K) / S + 1. Tap (i, j) of output (r, q) reads input
// (r*S + i - P, q*S + j - P).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__FMA__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

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

// The chunks of a call over `rows` rows whose chunks keep no partial sums: one per thread for calls of few rows (a
// batch-1 embedding's maps have at most 112), where each further chunk's handoff costs more than an uneven split
// would (one chunk per thread in every such call: V2 224 px batch-1 embed 0.967x the time on a 2-core Zen 4, batch
// 32 1.012x, so only below kFewRows). The outputs do not depend on the chunking.
constexpr int64_t kFewRows = 128;
int64_t PiecesOf(ffi::ThreadPool& pool, int64_t rows) {
  return rows < kFewRows ? std::max<int64_t>(1, pool.num_threads()) : Pieces(pool);
}

// ParallelFor over `total` rows in PiecesOf's chunks, for bodies that keep no per-chunk partial sums.
template <typename Body>
void ParallelFor(ffi::ThreadPool& pool, int64_t total, Body body) {
  ParallelFor(pool, total, PiecesOf(pool, total), body);
}

// The chunks ParallelFor makes of `rows` rows, for callers that keep per-chunk accumulators.
int64_t PiecesFor(ffi::ThreadPool& pool, int64_t rows) {
  return std::max<int64_t>(1, std::min<int64_t>(Pieces(pool), rows));
}

// Kernel gradients: body(begin, end, acc) sums rows [begin, end) into its chunk's own zeroed `size`-float
// accumulator; the chunks' accumulators are then added into `out` in chunk order, so the result does not depend on
// thread timing.
template <typename Body>
void ParallelSum(ffi::ThreadPool& pool, int64_t rows, int64_t size, float* out, Body body) {
  const int64_t pieces = PiecesFor(pool, rows);
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
// The widest vector the CPU has (the library is compiled with -march=native): on AVX-512 CPUs the multiply-add
// loops of the eval-mode 1x1 convolutions, the dense convolutions and the depthwise lines run 16 channels per
// instruction, 8-channel vectors covering what is left (the network's widths are multiples of 8, not of 16).
// Each output channel's sum is the same chain of multiply-adds (Fma, below) at either width, so outputs are
// bit-identical to the AVX2 build (tested).
#ifdef __AVX512F__
typedef float VecW __attribute__((vector_size(64), aligned(4), may_alias));
#else
typedef Vec8 VecW;
#endif
template <typename V> constexpr int64_t kLanesOf = sizeof(V) / sizeof(float);
constexpr int64_t kWide = sizeof(VecW) / sizeof(float);

// Channels [c, C) of an elementwise pass in the widest vectors, then 8 lanes, then one at a time:
// body(V{}, c) handles kLanesOf<V> channels from c (V = VecW, Vec8 or float).
template <typename Body>
inline void ForChannelVectors(int64_t c, int64_t C, Body&& body) {
  if constexpr (kWide > 8)
    for (; c + kWide <= C; c += kWide) body(VecW{}, c);
  for (; c + 8 <= C; c += 8) body(Vec8{}, c);
  for (; c < C; ++c) body(0.0f, c);
}

// The vectors of a weight panel `width` channels wide (PanelWidth, DensePanelWidth: two wide vectors, one, or 8
// lanes): body(V{}, std::integral_constant<int, NV>{}) with NV vectors V making the width; false (body not called)
// for a width that is none of these, which the callers' scalar loops handle.
template <typename Body>
inline bool ForPanelVectors(int64_t width, Body&& body) {
  if (width == 2 * kWide) body(VecW{}, std::integral_constant<int, 2>{});
  else if (width == kWide) body(VecW{}, std::integral_constant<int, 1>{});
  else if (width == 8) body(Vec8{}, std::integral_constant<int, 1>{});
  else return false;
  return true;
}

// The forward and input-gradient passes share one inner routine: along one line of outputs (an output row in the
// forward pass, one column class of an input row in the input gradient), out[m] = sum over taps t of
// in_t[a*m + col_t] * w_t, channels innermost. Outputs whose taps all fall inside the line take Q = 8 (then 4)
// pixels at a time with the Q sums in vector registers (each weight vector loaded once per Q pixels, each sum stored
// once); the few edge pixels check bounds. (For the network's 3x3 and 5x5 kernels, SumRowsLine below does the same
// sums loading each input vector once per kernel row instead of once per tap.)
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
// (A loop over the lanes compiled to lane-by-lane inserts: the 1x1 convolutions ran 2-3x slower.)
template <typename V = Vec8>
inline V Broadcast(float s) {
  if constexpr (kLanesOf<V> == 8) return V{s, s, s, s, s, s, s, s};
  else return V{s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s};
}

// a * b + c rounded once (one FMA instruction), for V = VecW, Vec8, float or double. Every multiply-add of this
// file is written with it, and on x86-64 the library is built with -ffp-contract=off (cpu_kernels.py), so the
// compiler fuses nothing on its own: under its default (-ffp-contract=fast) GCC fused a multiply and an add in some
// code shapes and not in others, so that, e.g., pairs of depthwise edge pixels summed the same taps in the same
// order as single pixels and still came out 3-7 ulps apart. With it, outputs do not depend on how a loop is
// blocked or how wide its vectors are (the AVX2 and AVX-512 builds are tested bit-identical). Without FMA
// instructions (or on other CPUs, where the compiler's default contraction stays on) a plain a * b + c.
template <typename V>
inline V Fma(V a, V b, V c) {
  if constexpr (std::is_same_v<V, float> || std::is_same_v<V, double>) {
#if defined(__FMA__) || defined(__aarch64__)
    return std::fma(a, b, c);
#else
    return a * b + c;  // (std::fma would be a slow library call)
#endif
#ifdef __AVX512F__
  } else if constexpr (kLanesOf<V> == 16) {
    return (V)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#endif
#ifdef __FMA__
  } else if constexpr (kLanesOf<V> == 8) {
    return (V)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#endif
  } else {
    return a * b + c;
  }
}

// Non-temporal stores for outputs much larger than the caches (training BatchNorm's output and input gradient; at
// 224 px, batch 32, the 112x112x64 map's 103 MB): a plain store first reads each line it writes (read-for-ownership),
// a third more memory traffic in a pass that is bound by it. Only for 64-byte aligned 16-float vectors: Streamable
// says whether all of a call's stores are (C a multiple of 16, the buffer aligned), and StreamingDone orders them
// before the thread reports its chunk done. (A 16 MB threshold measured no better: benchmarks/SPEED.md.)
constexpr int64_t kStreamingMinFloats = int64_t{16} << 20;  // 64 MB, twice a Zen 5 CCD's L3
inline bool Streamable(const float* out, int64_t floats, int64_t C) {
#ifdef __AVX512F__
  return floats >= kStreamingMinFloats && C % 16 == 0 && reinterpret_cast<uintptr_t>(out) % 64 == 0;
#else
  (void)out, (void)floats, (void)C;
  return false;
#endif
}
// Store<V>, or with kStream (Streamable said yes) a non-temporal store of a 16-float vector.
template <bool kStream, typename V>
inline void StoreOut(float* p, V v) {
#ifdef __AVX512F__
  if constexpr (kStream && kLanesOf<V> == 16) {
    _mm512_stream_ps(p, (__m512)v);
    return;
  }
#endif
  Store<V>(p, v);
}
inline void StreamingDone() {
#ifdef __AVX512F__
  _mm_sfence();
#endif
}

// [lo, hi): the outputs m in [0, count) whose input columns a*m + col_min .. a*m + col_max all lie in [0, in_w).
inline std::pair<int64_t, int64_t> InBoundsOutputs(int64_t col_min, int64_t col_max, int64_t a, int64_t in_w,
                                                   int64_t count) {
  const int64_t lo = std::min(count, std::max<int64_t>(0, (-col_min + a - 1) / a));
  const int64_t last = in_w - 1 - col_max;
  return {lo, std::max(lo, std::min(count, last < 0 ? 0 : last / a + 1))};
}

// Channels [ch, ch + NV lanes(V)) of outputs m .. m+Q-1; kChecked skips taps outside [0, in_w). The Q x NV sums
// are independent chains of multiply-adds (a pixel's taps, in list order, form one chain per channel vector).
template <typename V, int Q, int NV, bool kChecked>
inline void SumPixels(const Tap* taps, int64_t n, int64_t a, int64_t in_w, int64_t C, int64_t m, int64_t ch,
                      float* out, int64_t out_stride) {
  constexpr int64_t kLanes = sizeof(V) / sizeof(float);
  V acc[Q][NV] = {};
  const int64_t step = a * C;  // from one output's input pixel to the next one's
  for (int64_t t = 0; t < n; ++t) {
    V wv[NV];
    for (int v = 0; v < NV; ++v) wv[v] = Load<V>(taps[t].w + ch + v * kLanes);
    const int64_t col = a * m + taps[t].col;
    const float* in = taps[t].in + col * C + ch;
    for (int u = 0; u < Q; ++u) {
      if (kChecked && (col + a * u < 0 || col + a * u >= in_w)) continue;
      for (int v = 0; v < NV; ++v) acc[u][v] = Fma(Load<V>(in + u * step + v * kLanes), wv[v], acc[u][v]);
    }
  }
  for (int u = 0; u < Q; ++u)
    for (int v = 0; v < NV; ++v) Store<V>(out + (m + u) * out_stride + ch + v * kLanes, acc[u][v]);
}

// Channels [ch, ch_end) (SumLine's chunk of up to 8 wide vectors) of outputs m .. m+Q-1. Channels innermost within
// the chunk, so a block of outputs reads contiguous runs of its input pixels (8-channel blocks outermost swept each
// line C/8 times in strided 32-byte pieces: wide layers ran at ~5 GB/s).
// Blocks of fewer than 8 pixels take several channel vectors at once, so that there are still up to 8 independent
// sums: one pixel and one vector at a time waited on the multiply-add latency (4 cycles) at every tap, and on 7x7
// maps with a 5x5 kernel every output is such a pixel (2 edge outputs each side, 3 inside: too few for a block).
template <int Q, int NV, bool kChecked, typename V = VecW>
inline int64_t SumChannelBlocks(const Tap* taps, int64_t n, int64_t a, int64_t in_w, int64_t C, int64_t m,
                                int64_t ch, int64_t ch_end, float* out, int64_t out_stride) {
  for (; ch + kLanesOf<V> * NV <= ch_end; ch += kLanesOf<V> * NV)
    SumPixels<V, Q, NV, kChecked>(taps, n, a, in_w, C, m, ch, out, out_stride);
  return ch;
}

// (Pairs take 8 vectors on AVX-512, 16 sums and 8 weight vectors of its 32 registers, and 4 on AVX2's 16.)
template <int Q, bool kChecked>
inline void SumPixelChannels(const Tap* taps, int64_t n, int64_t a, int64_t in_w, int64_t C, int64_t ch,
                             int64_t ch_end, int64_t m, float* out, int64_t out_stride) {
  if constexpr (Q == 1 || (Q == 2 && kWide > 8))
    ch = SumChannelBlocks<Q, 8, kChecked>(taps, n, a, in_w, C, m, ch, ch_end, out, out_stride);
  if constexpr (Q < 4) ch = SumChannelBlocks<Q, 4, kChecked>(taps, n, a, in_w, C, m, ch, ch_end, out, out_stride);
  if constexpr (Q < 8) ch = SumChannelBlocks<Q, 2, kChecked>(taps, n, a, in_w, C, m, ch, ch_end, out, out_stride);
  ch = SumChannelBlocks<Q, 1, kChecked>(taps, n, a, in_w, C, m, ch, ch_end, out, out_stride);
  if constexpr (kWide > 8)
    ch = SumChannelBlocks<Q, 1, kChecked, Vec8>(taps, n, a, in_w, C, m, ch, ch_end, out, out_stride);
  for (; ch < ch_end; ++ch) SumPixels<float, Q, 1, kChecked>(taps, n, a, in_w, C, m, ch, out, out_stride);
}

constexpr int64_t kLineChannels = 8 * kWide;  // SumLine's chunk (chunks of 2 or 1 wide vectors measured slower)

// out[m * out_stride + :C] for m in [0, count), taps in list order (n may be 0: zeros).
void SumLine(const Tap* taps, int64_t n, int64_t a, int64_t in_w, int64_t C, int64_t count, float* out,
             int64_t out_stride) {
  int64_t col_min = 0, col_max = 0;
  for (int64_t t = 0; t < n; ++t) {
    col_min = t == 0 ? taps[t].col : std::min(col_min, taps[t].col);
    col_max = t == 0 ? taps[t].col : std::max(col_max, taps[t].col);
  }
  const auto [m_lo, m_hi] = InBoundsOutputs(col_min, col_max, a, in_w, count);  // every tap in bounds
  // Channels in chunks of up to 8 wide vectors (128 on AVX-512), all pixels of the line per chunk: a chunk's
  // weights and input pixels stay in L1 while its pixels are summed (all 960 channels of a 7x7, 5x5 layer at once
  // are 96 KB of weights and 134 KB of input rows, read from L2 for every pixel).
  for (int64_t c0 = 0; c0 < C; c0 += kLineChannels) {
    const int64_t c1 = std::min(C, c0 + kLineChannels);
    int64_t m = 0;
    for (; m + 2 <= m_lo; m += 2) SumPixelChannels<2, true>(taps, n, a, in_w, C, c0, c1, m, out, out_stride);
    for (; m < m_lo; ++m) SumPixelChannels<1, true>(taps, n, a, in_w, C, c0, c1, m, out, out_stride);
    // 8 outputs per block where the line is long (8 independent sums hide the FMA latency: the 112x112x64
    // stride-2 forward 12.8 -> 8.8 ms), then 4, then pairs, then single pixels.
    for (; m + 8 <= m_hi; m += 8) SumPixelChannels<8, false>(taps, n, a, in_w, C, c0, c1, m, out, out_stride);
    for (; m + 4 <= m_hi; m += 4) SumPixelChannels<4, false>(taps, n, a, in_w, C, c0, c1, m, out, out_stride);
    for (; m + 2 <= m_hi; m += 2) SumPixelChannels<2, false>(taps, n, a, in_w, C, c0, c1, m, out, out_stride);
    for (; m < m_hi; ++m) SumPixelChannels<1, false>(taps, n, a, in_w, C, c0, c1, m, out, out_stride);
    for (; m + 2 <= count; m += 2) SumPixelChannels<2, true>(taps, n, a, in_w, C, c0, c1, m, out, out_stride);
    for (; m < count; ++m) SumPixelChannels<1, true>(taps, n, a, in_w, C, c0, c1, m, out, out_stride);
  }
}

// Lines whose taps are whole kernel rows: row r's taps j = 0..K-1 (taps[r*K + j]) read one input line, weights C
// floats apart, output m at columns S*m + j - P (the forward pass) or, kMirror (the stride-1 input gradient), at
// m + P - j. Block by block of Q outputs, each input vector of a row is loaded once and used for every tap and output
// that reads it (up to K multiply-adds): S*(Q-1) + K loads per row and channel vector instead of SumPixels' Q*K,
// which left these passes bound by loads (Zen 4, one thread, V2 224 px shapes: 0.34-0.86x the time,
// benchmarks/kernel_routines_zen4.md). An output's sum is the same chain of multiply-adds in the same order (rows, then j ascending;
// taps outside the line skipped), so outputs are bit-identical to SumLine's.
template <typename V, int Q, int K, int S, bool kMirror, bool kChecked>
inline void SumRowBlock(const Tap* taps, int64_t rows, int64_t in_w, int64_t C, int64_t col0, int64_t ch, float* out,
                        int64_t out_stride) {
  constexpr int kCols = S * (Q - 1) + K;  // input columns col0 .. col0 + kCols - 1
  V acc[Q] = {};
  for (int64_t r = 0; r < rows; ++r) {
    const Tap& first = taps[r * K];
    V wv[K];  // wv[e]: the tap that reads column S*u + e of output u's block, e = j (kMirror: K-1-j)
#pragma GCC unroll 8
    for (int e = 0; e < K; ++e) wv[e] = Load<V>(first.w + (kMirror ? K - 1 - e : e) * C + ch);
    const float* in = first.in + col0 * C + ch;
#pragma GCC unroll 32
    for (int s = 0; s < kCols; ++s) {
      const int t = kMirror ? kCols - 1 - s : s;  // so that each sum takes its taps with j ascending
      if (kChecked && (col0 + t < 0 || col0 + t >= in_w)) continue;
      const V x = Load<V>(in + t * C);
#pragma GCC unroll 8
      for (int e = 0; e < K; ++e) {  // output u = (t - e) / S reads column t
        if (t >= e && (t - e) % S == 0 && (t - e) / S < Q) acc[(t - e) / S] = Fma(x, wv[e], acc[(t - e) / S]);
      }
    }
  }
#pragma GCC unroll 8
  for (int u = 0; u < Q; ++u) Store<V>(out + u * out_stride + ch, acc[u]);
}

template <int Q, int K, int S, bool kMirror, bool kChecked>
void SumRowBlockChannels(const Tap* taps, int64_t rows, int64_t in_w, int64_t C, int64_t col0, int64_t c0,
                         int64_t c1, float* out, int64_t out_stride) {
  ForChannelVectors(c0, c1, [&](auto lanes, int64_t ch) {
    SumRowBlock<decltype(lanes), Q, K, S, kMirror, kChecked>(taps, rows, in_w, C, col0, ch, out, out_stride);
  });
}

template <int K, int S, bool kMirror>
void SumRowsLine(const Tap* taps, int64_t rows, int64_t P, int64_t in_w, int64_t C, int64_t count, float* out,
                 int64_t out_stride) {
  static_assert(!kMirror || S == 1);
  constexpr int kQ = 8;
  for (int64_t c0 = 0; c0 < C; c0 += kLineChannels) {  // SumLine's channel chunks, for the same reason
    const int64_t c1 = std::min(C, c0 + kLineChannels);
    for (int64_t m = 0; m < count; m += kQ) {
      const int64_t q = std::min<int64_t>(kQ, count - m), col0 = kMirror ? m + P - (K - 1) : S * m - P;
      float* o = out + m * out_stride;
      if (q == kQ && col0 >= 0 && col0 + S * (kQ - 1) + K <= in_w) {
        SumRowBlockChannels<kQ, K, S, kMirror, false>(taps, rows, in_w, C, col0, c0, c1, o, out_stride);
        continue;
      }
      switch (q) {  // a block at an edge of the line, or the line's last few outputs
        case 8: SumRowBlockChannels<8, K, S, kMirror, true>(taps, rows, in_w, C, col0, c0, c1, o, out_stride); break;
        case 7: SumRowBlockChannels<7, K, S, kMirror, true>(taps, rows, in_w, C, col0, c0, c1, o, out_stride); break;
        case 6: SumRowBlockChannels<6, K, S, kMirror, true>(taps, rows, in_w, C, col0, c0, c1, o, out_stride); break;
        case 5: SumRowBlockChannels<5, K, S, kMirror, true>(taps, rows, in_w, C, col0, c0, c1, o, out_stride); break;
        case 4: SumRowBlockChannels<4, K, S, kMirror, true>(taps, rows, in_w, C, col0, c0, c1, o, out_stride); break;
        case 3: SumRowBlockChannels<3, K, S, kMirror, true>(taps, rows, in_w, C, col0, c0, c1, o, out_stride); break;
        case 2: SumRowBlockChannels<2, K, S, kMirror, true>(taps, rows, in_w, C, col0, c0, c1, o, out_stride); break;
        default: SumRowBlockChannels<1, K, S, kMirror, true>(taps, rows, in_w, C, col0, c0, c1, o, out_stride); break;
      }
    }
  }
}

// The network's depthwise shapes, which the row-reuse routines (SumRowsLine, AddRowTaps) are instantiated for:
// body(integral_constant K, integral_constant S) for K in {3, 5}, S in {1, 2}; false (body not called) otherwise.
template <typename Body>
inline bool WithRowKernel(int64_t K, int64_t S, Body&& body) {
  using std::integral_constant;
  if (K == 3 && S == 1) body(integral_constant<int, 3>{}, integral_constant<int, 1>{});
  else if (K == 3 && S == 2) body(integral_constant<int, 3>{}, integral_constant<int, 2>{});
  else if (K == 5 && S == 1) body(integral_constant<int, 5>{}, integral_constant<int, 1>{});
  else if (K == 5 && S == 2) body(integral_constant<int, 5>{}, integral_constant<int, 2>{});
  else return false;
  return true;
}

// The forward pass's line (output row): SumRowsLine for the network's kernels, other shapes SumLine.
void SumForwardLine(const Tap* taps, int64_t n, int64_t K, int64_t S, int64_t P, int64_t in_w, int64_t C,
                    int64_t count, float* out) {
  if (!WithRowKernel(K, S, [&](auto k, auto s) {
        SumRowsLine<decltype(k)::value, decltype(s)::value, false>(taps, n / K, P, in_w, C, count, out, C);
      }))
    SumLine(taps, n, S, in_w, C, count, out, C);
}

// The input gradient's line (input row) at stride 1: taps j = 0..K-1 of each kernel row at columns m + P - j.
void SumInputGradLine(const Tap* taps, int64_t n, int64_t K, int64_t P, int64_t in_w, int64_t C, int64_t count,
                      float* out) {
  if (!WithRowKernel(K, 1, [&](auto k, auto) {
        SumRowsLine<decltype(k)::value, 1, true>(taps, n / K, P, in_w, C, count, out, C);
      }))
    SumLine(taps, n, 1, in_w, C, count, out, C);
}

// The eval-mode epilogue (BatchNorm folded into scale and shift, then the activation): act(v * scale[c] + shift[c])
// over `pixels` x C values. The same float32 operations as the model's BatchNorm and activations (layers.py), so
// only rounding (an FMA) differs.
// kHardsigmoid (PyTorch's, relu6(t + 3) / 6, as layers.hard_sigmoid) is for the SE's scale inside this file only:
// the handlers' activation attributes stop at kHardswish (cpu_kernels.ACTIVATION_CODES).
enum Activation : int64_t { kIdentity = 0, kRelu = 1, kHardswish = 2, kHardsigmoid = 3 };

struct Epilogue {
  const float* scale = nullptr;  // nullptr: no epilogue (training, or the plain forward pass)
  const float* shift = nullptr;
  int64_t activation = kIdentity;
};

// In vector registers explicitly (callers pass VecW, Vec8 or float; see ForChannelVectors): GCC left the Hardswish
// form as a scalar loop with branches, 6x slower than XLA's own pass over memory.
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
  if constexpr (kAct == kHardsigmoid) {
    const V six = V{} + 6.0f;
    V u = t + 3.0f;
    u = u > V{} ? u : V{};
    u = u < six ? u : six;
    return u / 6.0f;
  }
  return t;
}

template <int64_t kAct, bool kStream>
void ApplyEpilogue(const Epilogue& e, const float* src, float* dst, int64_t pixels, int64_t C) {
  for (int64_t m = 0; m < pixels; ++m) {
    const float* u = src + m * C;
    float* v = dst + m * C;
    ForChannelVectors(0, C, [&](auto lanes, int64_t c) {
      using V = decltype(lanes);
      StoreOut<kStream>(v + c, Activate<kAct>(Fma(Load<V>(u + c), Load<V>(e.scale + c), Load<V>(e.shift + c))));
    });
  }
  if constexpr (kStream) StreamingDone();
}

// dst = act(src * scale + shift) over pixels x C values (src == dst: in place); nothing without a scale. `stream`:
// non-temporal stores (Streamable for the whole output).
void ApplyEpilogue(const Epilogue& e, const float* src, float* dst, int64_t pixels, int64_t C, bool stream = false) {
  if (e.scale == nullptr) return;
  auto apply = [&](auto act) {
    constexpr int64_t kAct = decltype(act)::value;
    if (stream) ApplyEpilogue<kAct, true>(e, src, dst, pixels, C);
    else ApplyEpilogue<kAct, false>(e, src, dst, pixels, C);
  };
  if (e.activation == kRelu) apply(std::integral_constant<int64_t, kRelu>{});
  else if (e.activation == kHardswish) apply(std::integral_constant<int64_t, kHardswish>{});
  else apply(std::integral_constant<int64_t, kIdentity>{});
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
// w (cin, cout). Blocks of 6 pixels x 2 vectors of output channels (16 channels on AVX2, 32 on AVX-512) are summed
// in 12 vector registers, each weight vector loaded once per 6 pixels and each input value broadcast once per panel.
// The weights are first repacked into panels of 2 vectors (then 1, then 8 channels) of output channels, contiguous
// over cin, which a block reads front to back (from w itself, a 16-channel panel is 64 bytes of every cin-th cache
// line: the 80 -> 184 layers ran ~15% slower). (On AVX-512, 4-vector panels and 12-pixel blocks measured no faster.)
struct Pointwise {
  const float* w = nullptr;       // (cin, cout); nullptr: none
  const float* panels = nullptr;  // the panel of channels [c, c + width) at panels + c * cin, (cin, width)
  int64_t cin = 0, cout = 0;
  Epilogue bn;  // its BatchNorm (scale, shift per output channel) and activation
};

// The panels' widths: two wide vectors, then one, then 8 (on AVX-512: 32, 16, 8), then what is left.
inline int64_t PanelWidth(int64_t c, int64_t N) {
  const int64_t rest = N - c;
  return rest >= 2 * kWide ? 2 * kWide : rest >= kWide ? kWide : rest >= 8 ? 8 : rest;
}

// The panel of channels [c, c + PanelWidth(c)) into dst (cin x width); with `row_scale`, row k of w is multiplied
// by row_scale[k] (a per-channel scale of the 1x1 convolution's input, folded into its weights).
void PackPanel(const Pointwise& pw, int64_t c, const float* row_scale, float* dst) {
  const int64_t N = pw.cout, width = PanelWidth(c, N);
  for (int64_t k = 0; k < pw.cin; ++k) {
    const float* src = pw.w + k * N + c;
    if (row_scale == nullptr) std::memcpy(dst + k * width, src, sizeof(float) * width);
    else for (int64_t l = 0; l < width; ++l) dst[k * width + l] = src[l] * row_scale[k];
  }
}

// Fills `storage` with all of w's panels.
void PackPanels(Pointwise* pw, std::vector<float>* storage) {
  storage->resize(pw->cin * pw->cout);
  for (int64_t c = 0; c < pw->cout; c += PanelWidth(c, pw->cout))
    PackPanel(*pw, c, nullptr, storage->data() + c * pw->cin);
  pw->panels = storage->data();
}

// Output channels [c0, c0 + L NV) of Q pixels, L = V's lanes; `panel` is those channels' panel, (cin, L NV).
template <typename V, int Q, int NV, int64_t kAct>
inline void PointwiseBlock(const Pointwise& pw, const float* panel, const float* in, const float* add, float* out,
                           int64_t c0) {
  constexpr int64_t L = kLanesOf<V>;
  const int64_t K = pw.cin, N = pw.cout;
  V acc[Q][NV] = {};
  for (int64_t k = 0; k < K; ++k) {
    V wv[NV];
    for (int v = 0; v < NV; ++v) wv[v] = Load<V>(panel + k * L * NV + L * v);
    for (int u = 0; u < Q; ++u) {
      const V xv = Broadcast<V>(in[u * K + k]);
      for (int v = 0; v < NV; ++v) acc[u][v] = Fma(xv, wv[v], acc[u][v]);
    }
  }
  for (int v = 0; v < NV; ++v) {
    const int64_t c = c0 + L * v;
    const V scale = Load<V>(pw.bn.scale + c), shift = Load<V>(pw.bn.shift + c);
    for (int u = 0; u < Q; ++u) {
      V t = Activate<kAct>(Fma(acc[u][v], scale, shift));
      if (add != nullptr) t += Load<V>(add + u * N + c);
      Store<V>(out + u * N + c, t);
    }
  }
}

// Pixel blocks of 6, and 3-5 at the end of a line: a line of 7 runs as 4 + 3 and one of 14 as 6 + 4 + 4 (padding
// 7 to 12 wasted 40% of the 7x7 layers' work; a block of 1-2 pixels has too few independent sums to hide the FMA
// latency).
inline int NextBlock(int64_t rest) { return rest >= 9 ? 6 : rest >= 7 ? 4 : static_cast<int>(rest); }

template <typename V, int NV, int64_t kAct>
void PointwisePixels(const Pointwise& pw, const float* panel, int64_t c, const float* in, int64_t pixels,
                     const float* add, float* out) {
  const int64_t K = pw.cin, N = pw.cout;
  for (int64_t m = 0; m < pixels;) {
    const int q = NextBlock(pixels - m);
    const float* a = add == nullptr ? nullptr : add + m * N;
    switch (q) {
      case 6: PointwiseBlock<V, 6, NV, kAct>(pw, panel, in + m * K, a, out + m * N, c); break;
      case 5: PointwiseBlock<V, 5, NV, kAct>(pw, panel, in + m * K, a, out + m * N, c); break;
      case 4: PointwiseBlock<V, 4, NV, kAct>(pw, panel, in + m * K, a, out + m * N, c); break;
      case 3: PointwiseBlock<V, 3, NV, kAct>(pw, panel, in + m * K, a, out + m * N, c); break;
      case 2: PointwiseBlock<V, 2, NV, kAct>(pw, panel, in + m * K, a, out + m * N, c); break;
      default: PointwiseBlock<V, 1, NV, kAct>(pw, panel, in + m * K, a, out + m * N, c); break;
    }
    m += q;
  }
}

// One panel (channels [c, c + PanelWidth(c))) over all pixels.
template <int64_t kAct>
void PointwisePanel(const Pointwise& pw, const float* panel, int64_t c, const float* in, int64_t pixels,
                    const float* add, float* out) {
  const int64_t K = pw.cin, N = pw.cout, width = PanelWidth(c, N);
  if (ForPanelVectors(width, [&](auto vec, auto nv) {
        PointwisePixels<decltype(vec), nv, kAct>(pw, panel, c, in, pixels, add, out);
      }))
    return;
  for (int64_t m = 0; m < pixels; ++m) {  // a last panel narrower than 8
    for (int64_t l = 0; l < width; ++l) {
      float sum = 0.0f;
      for (int64_t k = 0; k < K; ++k) sum = Fma(in[m * K + k], panel[k * width + l], sum);
      const float t = Activate<kAct>(Fma(sum, pw.bn.scale[c + l], pw.bn.shift[c + l]));
      out[m * N + c + l] = add == nullptr ? t : t + add[m * N + c + l];
    }
  }
}

// The same with pw's activation picked at run time.
void PointwisePanel(const Pointwise& pw, const float* panel, int64_t c, const float* in, int64_t pixels,
                    const float* add, float* out) {
  if (pw.bn.activation == kRelu) PointwisePanel<kRelu>(pw, panel, c, in, pixels, add, out);
  else if (pw.bn.activation == kHardswish) PointwisePanel<kHardswish>(pw, panel, c, in, pixels, add, out);
  else PointwisePanel<kIdentity>(pw, panel, c, in, pixels, add, out);
}

void Pointwise1x1(const Pointwise& pw, const float* in, int64_t pixels, const float* add, float* out) {
  for (int64_t c = 0; c < pw.cout; c += PanelWidth(c, pw.cout))
    PointwisePanel(pw, pw.panels + c * pw.cin, c, in, pixels, add, out);
}

// What eval mode runs around a depthwise convolution in the same pass (all optional): on its input, the 1x1
// expansion act((x @ w) * scale + shift) (`expand`); on its output, act(y * scale + shift) (`epi`: its own BN +
// activation), the rows' channel sums (`row_sums`, for the SE's global pool), then the 1x1 projection
// (y @ w) * scale + shift (`project`), plus the block's input when `residual`.
struct Fused {
  Pointwise expand;
  Epilogue prologue;  // training: the previous layer's BN + activation, applied to input rows as they are read
  Epilogue epi;
  Pointwise project;
  bool residual = false;
  float* row_sums = nullptr;  // (N * Ho, C): each output row's sum over its pixels
};

// dst[:C] = sum over `pixels` pixels of src (pixels x C), in vector registers.
void SumPixelRow(const float* src, int64_t pixels, int64_t C, float* dst) {
  ForChannelVectors(0, C, [&](auto lanes, int64_t c) {
    using V = decltype(lanes);
    V acc{};
    for (int64_t m = 0; m < pixels; ++m) acc += Load<V>(src + m * C + c);
    Store<V>(dst + c, acc);
  });
}

// Rows per 1x1 call: each call reads all of its weights, so narrow maps take several rows at a time (~64 pixels).
// One 7- or 14-pixel row per call left the late layers, whose weights (up to 2 x 600 KB) do not fit in L2, bound by
// reading weights: 1.3-1.7x slower than XLA's own matmuls.
inline int64_t RowsPerCall(int64_t width) { return std::max<int64_t>(1, (64 + width - 1) / width); }

// y[b, r, q, :] = sum_ij x[b, r*S+i-P, q*S+j-P, :] * w[i, j, :]: output row (b, r) is one line, a = S, taps (i, j)
// in order with col = j - P. With an expansion, expanded input rows live in a per-thread ring, computed a few rows
// per call as the output rows advance (each once per chunk of output rows); the padding stays zero (taps outside x
// are skipped); so do the rows of a prologue (training: the previous BN + activation, whose output map is then
// never written). With a projection, depthwise output rows collect in a per-thread scratch buffer and are projected a
// few rows at a time: neither the expanded nor the depthwise map is ever written to memory whole.
// With few output rows per chunk (small batches), a chunk's first K-1 input rows, which the chunk before computes
// too, would be a large part of the expansion (batch 1, 7x7 map, k5: up to 5x its work), so the expansion is done
// first over all input rows, in parallel, into one buffer (small, as the map is).
ffi::Error DepthwiseForwardWith(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                                ffi::ResultBuffer<ffi::F32> y, int64_t stride, int64_t padding, const Fused& f) {
  Geometry g;
  int64_t k = w.dimensions()[0];
  if (auto e = MakeGeometry(x, k, stride, padding, &g); e.failure()) return e;
  const float* xd = x.typed_data();
  const float* wd = w.typed_data();
  float* yd = y->typed_data();
  const bool project = f.project.w != nullptr;
  const int64_t C = f.expand.w != nullptr ? f.expand.cout : g.c;  // the depthwise convolution's channels
  const int64_t cy = project ? f.project.cout : C;
  const int64_t x_row = g.w * g.c, row_size = g.w * C;
  // The depthwise convolution's input rows are x's, or computed from x's: the 1x1 expansion, or the prologue.
  const bool computed = f.expand.w != nullptr || f.prologue.scale != nullptr;
  auto compute_rows = [&](const float* x_rows, int64_t rows, float* out) {
    if (f.expand.w != nullptr) Pointwise1x1(f.expand, x_rows, rows * g.w, nullptr, out);
    else ApplyEpilogue(f.prologue, x_rows, out, rows * g.w, C);
  };
  std::vector<float> expanded;  // the staged computed rows
  const float* src = xd;        // the depthwise convolution's input rows, when not in a ring
  if (computed && g.n * g.ho < 2 * g.k * Pieces(pool)) {
    expanded.resize(g.n * g.h * row_size);
    ParallelFor(pool, g.n * g.h, [&](int64_t begin, int64_t end, int64_t) {
      compute_rows(xd + begin * x_row, end - begin, expanded.data() + begin * row_size);
    });
    src = expanded.data();
  }
  const bool expand = computed && expanded.empty();  // computed rows in the ring
  // Rows [lo, lo + K) are needed for one output row and a call adds up to batch_in rows past the first missing one.
  const int64_t batch_in = expand ? std::min(g.h, RowsPerCall(g.w)) : 0;
  const int64_t capacity = expand ? g.k + batch_in - 1 : 0;
  const int64_t batch_out = project ? std::min(g.n * g.ho, RowsPerCall(g.wo)) : 0;
  ParallelFor(pool, g.n * g.ho, [&](int64_t begin, int64_t end, int64_t) {
    std::vector<Tap> taps(g.k * g.k);
    std::vector<float> ring(capacity * row_size);  // expanded input row hi in slot hi % capacity
    std::vector<int64_t> ring_row(capacity, -1);    // which (b * H + hi) each slot holds
    std::vector<float> scratch(batch_out * g.wo * C);
    int64_t first = begin, pending = 0;  // scratch holds depthwise output rows [first, first + pending)
    auto project_pending = [&]() {  // consecutive rows of y (and of x for the residual: stride 1, same size)
      if (pending == 0) return;
      Pointwise1x1(f.project, scratch.data(), pending * g.wo, f.residual ? xd + first * x_row : nullptr,
                   yd + first * g.wo * cy);
      pending = 0;
    };
    auto expand_rows = [&](int64_t b, int64_t from, int64_t to) {  // input rows [from, to) of image b
      for (int64_t hi = from; hi < to;) {  // in at most two runs of consecutive slots
        const int64_t slot = hi % capacity, run = std::min(to - hi, capacity - slot);
        compute_rows(xd + (b * g.h + hi) * x_row, run, ring.data() + slot * row_size);
        for (int64_t t = 0; t < run; ++t) ring_row[slot + t] = b * g.h + hi + t;
        hi += run;
      }
    };
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / g.ho, r = row % g.ho;
      if (expand) {
        const int64_t lo = std::max<int64_t>(0, r * g.s - g.p), hi_end = std::min(g.h, r * g.s - g.p + g.k);
        int64_t missing = lo;
        while (missing < hi_end && ring_row[missing % capacity] == b * g.h + missing) ++missing;
        if (missing < hi_end) expand_rows(b, missing, std::min(g.h, std::max(hi_end, missing + batch_in)));
      }
      int64_t n = 0;
      for (int64_t i = 0; i < g.k; ++i) {
        const int64_t hi = r * g.s + i - g.p;
        if (hi < 0 || hi >= g.h) continue;
        const float* in = expand ? ring.data() + hi % capacity * row_size : src + (b * g.h + hi) * row_size;
        for (int64_t j = 0; j < g.k; ++j) taps[n++] = {in, wd + (i * g.k + j) * C, j - g.p};
      }
      if (pending == 0) first = row;
      float* out = project ? scratch.data() + pending * g.wo * C : yd + row * g.wo * C;
      SumForwardLine(taps.data(), n, g.k, g.s, g.p, g.w, C, g.wo, out);
      ApplyEpilogue(f.epi, out, out, g.wo, C);
      if (f.row_sums != nullptr) SumPixelRow(out, g.wo, C, f.row_sums + row * C);
      if (project && ++pending == batch_out) project_pending();
    }
    project_pending();
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

// A 1x1 layer's weights, BN and activation; its panels packed into `panels` unless that is nullptr.
ffi::Error MakePointwise(ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> shift,
                         int64_t activation, int64_t cin, Pointwise* pw, std::vector<float>* panels) {
  auto d = w.dimensions();
  if (d.size() != 2 || d[0] != cin)
    return ffi::Error::InvalidArgument("1x1 conv: the kernel must be (Cin, Cout), Cin the input's channels");
  pw->w = w.typed_data();
  pw->cin = d[0];
  pw->cout = d[1];
  if (panels != nullptr) PackPanels(pw, panels);
  return MakeEpilogue(scale, shift, activation, d[1], &pw->bn);
}

// f.expand (none if expand_w is empty) and f.epi of an inverted residual's [expansion] and depthwise layers.
ffi::Error MakeExpandDepthwise(const ffi::Buffer<ffi::F32>& x, ffi::Buffer<ffi::F32> expand_w,
                               ffi::Buffer<ffi::F32> expand_scale, ffi::Buffer<ffi::F32> expand_shift,
                               const ffi::Buffer<ffi::F32>& w, ffi::Buffer<ffi::F32> scale,
                               ffi::Buffer<ffi::F32> shift, int64_t activation, Fused* f,
                               std::vector<float>* expand_panels) {
  if (x.dimensions().size() != 4) return ffi::Error::InvalidArgument("inverted_residual: input must be NHWC (rank 4)");
  const int64_t cin = x.dimensions().back();
  if (expand_w.element_count() > 0) {
    if (auto e = MakePointwise(expand_w, expand_scale, expand_shift, activation, cin, &f->expand, expand_panels);
        e.failure())
      return e;
  }
  const int64_t c = f->expand.w != nullptr ? f->expand.cout : cin;
  auto wd = w.dimensions();
  if (wd.size() != 3 || wd[0] != wd[1] || wd[2] != c)
    return ffi::Error::InvalidArgument("inverted_residual: depthwise kernel must be (K, K, C), C the expanded width");
  return MakeEpilogue(scale, shift, activation, c, &f->epi);
}

// The first half of an inverted residual with squeeze-excitation, eval mode: [1x1 expand + BN + act] -> depthwise
// + BN + act into y, and each output row's channel sums into row_sums (N * Ho, C), from which the SE's global
// average pool is a small sum; the expanded map exists only row by row in cache.
ffi::Error ExpandDepthwiseForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> expand_w,
                                  ffi::Buffer<ffi::F32> expand_scale, ffi::Buffer<ffi::F32> expand_shift,
                                  ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> shift,
                                  ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> row_sums, int64_t stride,
                                  int64_t padding, int64_t activation) {
  Fused f;
  std::vector<float> expand_panels;
  if (auto e = MakeExpandDepthwise(x, expand_w, expand_scale, expand_shift, w, scale, shift, activation, &f,
                                   &expand_panels);
      e.failure())
    return e;
  f.row_sums = row_sums->typed_data();
  return DepthwiseForwardWith(pool, x, w, y, stride, padding, f);
}

// Its second half: out = ((d * se[b]) @ w) * scale + shift (+ x), se (N, C) the SE's per-image channel scale. The
// scale is folded into the weights, so d is read once and d * se never exists. One task per (image, panel of output
// channels) packs its own scaled panel (C x 16 floats) and runs it over the image's pixels: nothing is packed twice,
// and a single image (batch-1 latency) still splits across threads.
ffi::Error SeProjectForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> d, ffi::Buffer<ffi::F32> se,
                            ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> shift,
                            ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> y) {
  auto dd = d.dimensions();
  if (dd.size() != 4) return ffi::Error::InvalidArgument("se_project: input must be NHWC (rank 4)");
  const int64_t n = dd[0], pixels = dd[1] * dd[2], c = dd[3];
  if (se.element_count() != static_cast<size_t>(n * c))
    return ffi::Error::InvalidArgument("se_project: the SE scale must be (N, C)");
  Pointwise pw;  // its panels are packed per task, scaled
  if (auto e = MakePointwise(w, scale, shift, kIdentity, c, &pw, nullptr); e.failure()) return e;
  const int64_t cout = pw.cout;
  if (x.element_count() != 0 && x.element_count() != static_cast<size_t>(n * pixels * cout))
    return ffi::Error::InvalidArgument("se_project: the residual must have the output's shape");
  std::vector<int64_t> panel_start;
  for (int64_t p = 0; p < cout; p += PanelWidth(p, cout)) panel_start.push_back(p);
  const int64_t panels = panel_start.size();
  const float* dp = d.typed_data();
  const float* sp = se.typed_data();
  const float* xp = x.element_count() != 0 ? x.typed_data() : nullptr;
  float* yp = y->typed_data();
  ParallelFor(pool, n * panels, [&](int64_t begin, int64_t end, int64_t) {
    std::vector<float> panel(c * 2 * kWide);  // the widest panel
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / panels, c0 = panel_start[task % panels];
      PackPanel(pw, c0, sp + b * c, panel.data());
      const int64_t p0 = b * pixels;
      PointwisePanel<kIdentity>(pw, panel.data(), c0, dp + p0 * c, pixels, xp == nullptr ? nullptr : xp + p0 * cout,
                                yp + p0 * cout);
    }
  });
  return ffi::Error::Success();
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
  Fused f;
  std::vector<float> expand_panels, project_panels;
  if (auto e = MakeExpandDepthwise(x, expand_w, expand_scale, expand_shift, w, scale, shift, activation, &f,
                                   &expand_panels);
      e.failure())
    return e;
  const int64_t cin = x.dimensions().back(), k = w.dimensions()[0], c = w.dimensions()[2];
  if (auto e = MakePointwise(project_w, project_scale, project_shift, kIdentity, c, &f.project, &project_panels);
      e.failure())
    return e;
  f.residual = residual != 0;
  if (f.residual && (stride != 1 || 2 * padding != k - 1 || f.project.cout != cin))
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
  ParallelFor(pool, g.n * g.h, [&](int64_t begin, int64_t end, int64_t) {
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
        float* out = xd + (row * g.w + phi) * C;
        if (g.s == 1) SumInputGradLine(taps.data(), n, g.k, g.p, g.wo, C, g.w, out);
        else SumLine(taps.data(), n, 1, g.wo, C, (g.w - phi + g.s - 1) / g.s, out, g.s * C);
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
  for (int64_t q = q_lo; q < q_hi; ++q)
    acc = Fma(Load<V>(xrow + (q * s + col0) * C + ch), Load<V>(grow + q * C + ch), acc);
  Store<V>(total + ch, Load<V>(total + ch) + acc);
}

// All K taps of one kernel row over one output row at once (K, S compile-time: the network's 3x3 and 5x5, stride 1
// or 2): dy[q] is loaded once for the K taps, and the input columns q*S + j - P live in a window of K registers
// that moves S columns per output, so 1 + S loads feed K multiply-adds where AddRowTap loads two per one. Each tap's
// sums are AddRowTap's exactly: the same chain over its outputs, added into `total` at the same points (every 8
// outputs from its first in-bounds one), so the gradient is bit-identical.
template <typename V, int K, int S>
inline void AddRowTaps(const float* xrow, const float* grow, int64_t C, int64_t P, int64_t W, int64_t wo, int64_t ch,
                       float* total) {
  int64_t lo[K], hi[K], first = wo, last = 0;
  for (int j = 0; j < K; ++j) {
    std::tie(lo[j], hi[j]) = InBoundsOutputs(j - P, j - P, S, W, wo);
    first = std::min(first, lo[j]);
    last = std::max(last, hi[j]);
  }
  auto column = [&](int64_t col) { return col >= 0 && col < W ? Load<V>(xrow + col * C + ch) : V{}; };
  V window[K], acc[K] = {};
  for (int j = 0; j < K; ++j) window[j] = column(first * S + j - P);
  for (int64_t q = first; q < last; ++q) {
    if (q > first) {  // move the window S columns on
      for (int j = 0; j + S < K; ++j) window[j] = window[j + S];
      for (int j = K - S; j < K; ++j) window[j] = column(q * S + j - P);
    }
    const V dyv = Load<V>(grow + q * C + ch);
    for (int j = 0; j < K; ++j) {
      if (q < lo[j] || q >= hi[j]) continue;
      acc[j] = Fma(window[j], dyv, acc[j]);
      if ((q - lo[j]) % 8 == 7 || q == hi[j] - 1) {
        Store<V>(total + j * C + ch, Load<V>(total + j * C + ch) + acc[j]);
        acc[j] = V{};
      }
    }
  }
}

// One kernel row's K taps over one output row, tap by tap with AddRowTap (any K and S): 8 outputs at a time, all
// channels of them, then the next 8: contiguous reads, one add into the accumulator per 8 products.
void AddKernelRowByTaps(const float* xrow, const float* grow, int64_t C, int64_t K, int64_t S, int64_t P, int64_t W,
                        int64_t wo, float* total) {
  for (int64_t j = 0; j < K; ++j) {
    const int64_t col0 = j - P;
    const auto [q_lo, q_hi] = InBoundsOutputs(col0, col0, S, W, wo);  // 0 <= q*S + j - P < W
    for (int64_t q0 = q_lo; q0 < q_hi; q0 += 8) {
      const int64_t q1 = std::min(q_hi, q0 + 8);
      ForChannelVectors(0, C, [&](auto lanes, int64_t ch) {
        AddRowTap<decltype(lanes)>(xrow, grow, C, S, col0, q0, q1, ch, total + j * C);
      });
    }
  }
}

// The same sums (bit-identical): AddRowTaps over all channels for the network's kernels, else AddKernelRowByTaps.
void AddKernelRow(const float* xrow, const float* grow, int64_t C, int64_t K, int64_t S, int64_t P, int64_t W,
                  int64_t wo, float* total) {
  if (!WithRowKernel(K, S, [&](auto k, auto s) {
        ForChannelVectors(0, C, [&](auto lanes, int64_t ch) {
          AddRowTaps<decltype(lanes), decltype(k)::value, decltype(s)::value>(xrow, grow, C, P, W, wo, ch, total);
        });
      }))
    AddKernelRowByTaps(xrow, grow, C, K, S, P, W, wo, total);
}

// With a prologue (act(x * scale + shift), the previous layer's BN + activation), the kernel's input rows are
// computed from x's into a per-thread ring of K rows as the output rows advance (slot hi % K holds row hi).
ffi::Error DepthwiseKernelGradWith(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                                   ffi::ResultBuffer<ffi::F32> dw, int64_t stride, int64_t padding,
                                   const Epilogue& prologue) {
  Geometry g;
  int64_t k = dw->dimensions()[0];
  if (auto e = MakeGeometry(x, k, stride, padding, &g); e.failure()) return e;
  const float* xd = x.typed_data();
  const float* gd = dy.typed_data();
  const int64_t C = g.c, taps = g.k * g.k, row_size = g.w * C;
  const bool ring_rows = prologue.scale != nullptr;
  ParallelSum(pool, g.n * g.ho, taps * C, dw->typed_data(), [&](int64_t begin, int64_t end, float* total) {
    std::vector<float> ring(ring_rows ? g.k * row_size : 0);
    std::vector<int64_t> ring_row(ring_rows ? g.k : 0, -1);  // which (b * H + hi) each slot holds
    auto input_row = [&](int64_t b, int64_t hi) -> const float* {
      const float* x_row = xd + (b * g.h + hi) * row_size;
      if (!ring_rows) return x_row;
      float* slot = ring.data() + hi % g.k * row_size;
      if (ring_row[hi % g.k] != b * g.h + hi) {
        ApplyEpilogue(prologue, x_row, slot, g.w, C);
        ring_row[hi % g.k] = b * g.h + hi;
      }
      return slot;
    };
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / g.ho, r = row % g.ho;
      const float* grow = gd + row * g.wo * C;
      for (int64_t i = 0; i < g.k; ++i) {
        const int64_t hi = r * g.s + i - g.p;
        if (hi < 0 || hi >= g.h) continue;
        AddKernelRow(input_row(b, hi), grow, C, g.k, g.s, g.p, g.w, g.wo, total + i * g.k * C);
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error DepthwiseKernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                               ffi::ResultBuffer<ffi::F32> dw, int64_t stride, int64_t padding) {
  return DepthwiseKernelGradWith(pool, x, dy, dw, stride, padding, Epilogue{});
}

// Dense convolution, few input channels. y[b, r, q, :] = sum_{i, j, c} x[b, r*S+i-P, q*S+j-P, c] * w[i, j, c, :].
// The input is first copied into a zero-padded buffer, so the inner loops have no bounds checks. When Cout is a
// multiple of 8, outputs are computed in blocks of Q pixels x NV vectors of channels held in vector registers
// (GCC/Clang vector extensions: AVX on x86, NEON on ARM): every weight vector loaded is used for Q pixels, and the
// block's weights (K*K*Cin x the panel's width), repacked into one contiguous panel per block of channels, stay in
// L1. Other Cout: a plain loop.

struct Padded {
  const float* data;
  int64_t hp, wp;
};

// The padded copy lives in a per-thread buffer that is kept and reused: a fresh 20 MB buffer per call (224 px,
// batch 32) came from newly mapped memory every time: a third of the page faults of a 224 px forward pass.
// A thread runs one custom call at a time, so the buffer is never shared; it keeps the largest size seen (32 images
// at 224 px: 20 MB per XLA worker thread). fill_row(b, hi, dst) writes row hi of image b's input (W x C floats).
template <typename FillRow>
Padded PadRows(ffi::ThreadPool& pool, const Geometry& g, FillRow fill_row) {
  static thread_local std::unique_ptr<float[]> buffer;
  static thread_local int64_t capacity = 0;
  Padded out{nullptr, g.h + 2 * g.p, g.w + 2 * g.p};
  // The tail: a last partial block of pixels reads up to 7 pixels (x S) past the last row (results discarded).
  const int64_t row_floats = out.wp * g.c, tail = 8 * g.s * g.c, size = g.n * out.hp * row_floats + tail;
  if (capacity < size) {
    buffer.reset(new float[size]);
    capacity = size;
  }
  float* pd = buffer.get();
  out.data = pd;
  std::fill(pd + size - tail, pd + size, 0.0f);
  // Each padded row in one task: zeros where it is padding, the input row in between (zero-filling the whole
  // buffer first was a single-threaded 20 MB pass, a third of the V1 stem's forward time).
  ParallelFor(pool, g.n * out.hp, [&](int64_t begin, int64_t end, int64_t) {
    for (int64_t prow = begin; prow < end; ++prow) {
      const int64_t b = prow / out.hp, hi = prow % out.hp - g.p;
      float* dst = pd + prow * row_floats;
      if (hi < 0 || hi >= g.h) {
        std::fill(dst, dst + row_floats, 0.0f);
        continue;
      }
      std::fill(dst, dst + g.p * g.c, 0.0f);
      fill_row(b, hi, dst + g.p * g.c);
      std::fill(dst + (g.p + g.w) * g.c, dst + row_floats, 0.0f);
    }
  });
  return out;
}

// The convolution's input x, copied.
Padded PadInput(ffi::ThreadPool& pool, const Geometry& g, const float* xd) {
  return PadRows(pool, g, [&](int64_t b, int64_t hi, float* dst) {
    std::memcpy(dst, xd + (b * g.h + hi) * g.w * g.c, sizeof(float) * g.w * g.c);
  });
}

// The weights' output-channel blocks of width W (DensePanelWidth) as panels, each (K*K*Cin, W) contiguous. From w, a
// block's weights are K*K*Cin runs of W floats Cout floats apart: for V2's stem 147 cache lines 256 bytes apart,
// which map to a quarter of L1's sets and do not fit there. Ad-hoc, bit-identical outputs: the 7x7 stem's rows on one
// thread 78-82 GFLOP/s from w, 91-93 from the panels; whole calls at batch 32 (old and new library in one process,
// calls interleaved) V2's stem + max pool 1.04-1.08x faster, V1's stem 1.02-1.03x, the tail's 3x3 (40 -> 40) 1.2x.
std::vector<float> PackDensePanels(const float* wd, int64_t taps, int64_t co, int64_t width) {
  std::vector<float> panels(taps * co);
  for (int64_t o0 = 0; o0 < co; o0 += width)
    for (int64_t t = 0; t < taps; ++t)
      std::memcpy(panels.data() + o0 * taps + t * width, wd + t * co + o0, sizeof(float) * width);
  return panels;
}

// Output row `row` (b * Ho + r) into out (Wo x Cout), from the panels of width W = NV vectors Vec. In one kernel
// row i the taps (j, c) are K*Cin consecutive floats of the padded input row (jc = j*Cin + c), so they run as one loop.
template <typename Vec, int NV, int Q>
void DenseForwardBlocked(const Geometry& g, int64_t co, const Padded& xp, const float* panels, int64_t row,
                         float* yrow) {
  constexpr int64_t L = kLanesOf<Vec>, W = L * NV;
  const int64_t kc = g.k * g.c, step = g.s * g.c;
  const int64_t b = row / g.ho, r = row % g.ho;
  for (int64_t o0 = 0; o0 < co; o0 += W) {
    const float* panel = panels + o0 * g.k * kc;
    for (int64_t q0 = 0; q0 < g.wo; q0 += Q) {
      Vec acc[Q][NV] = {};
      for (int64_t i = 0; i < g.k; ++i) {
        const float* x0 = xp.data + (b * xp.hp + r * g.s + i) * xp.wp * g.c + q0 * step;
        const float* wi = panel + i * kc * W;
        for (int64_t jc = 0; jc < kc; ++jc) {
          Vec wc[NV];
          for (int t = 0; t < NV; ++t) wc[t] = Load<Vec>(wi + jc * W + t * L);
          for (int u = 0; u < Q; ++u) {
            const Vec xv = Broadcast<Vec>(x0[u * step + jc]);  // past the row's end in a last partial block (discarded)
            for (int t = 0; t < NV; ++t) acc[u][t] = Fma(xv, wc[t], acc[u][t]);
          }
        }
      }
      for (int u = 0; u < Q && q0 + u < g.wo; ++u)
        for (int t = 0; t < NV; ++t) Store<Vec>(yrow + (q0 + u) * co + o0 + t * L, acc[u][t]);
    }
  }
}

void DenseForwardPlain(const Geometry& g, int64_t co, const Padded& xp, const float* wd, int64_t row, float* yrow) {
  const int64_t cin = g.c;
  const int64_t b = row / g.ho, r = row % g.ho;
  for (int64_t q = 0; q < g.wo; ++q) {
    float* out = yrow + q * co;
    std::fill(out, out + co, 0.0f);
    for (int64_t i = 0; i < g.k; ++i) {
      const float* xrow = xp.data + (b * xp.hp + r * g.s + i) * xp.wp * cin;
      for (int64_t j = 0; j < g.k; ++j) {
        const float* xi = xrow + (q * g.s + j) * cin;
        const float* wij = wd + (i * g.k + j) * cin * co;
        for (int64_t c = 0; c < cin; ++c) {
          const float xv = xi[c];
          const float* wc = wij + c * co;
          for (int64_t o = 0; o < co; ++o) out[o] = Fma(xv, wc[o], out[o]);
        }
      }
    }
  }
}

// The panel width of DenseForwardBlocked for Cout: 6 pixels x 2 vectors (12 sums, 2 weight vectors and a
// broadcast: 15 of AVX2's 16 registers) also for 64 outputs: 3 x 4 vectors (12 sums + 4 weight vectors) spilled and
// ran V2's 7x7 stem at half the speed (67 vs 127-157 GFLOP/s, 224 px, batch 32). 0: the plain loop.
inline int64_t DensePanelWidth(int64_t co) {
  for (int64_t w : {2 * kWide, kWide, int64_t{8}})
    if (co % w == 0) return w;
  return 0;
}

// The weights as one output row reads them: panels for the blocked kernel, w itself for the plain loop.
struct DenseWeights {
  const float* w;
  std::vector<float> panels;  // empty for the plain loop
  const float* data() const { return panels.empty() ? w : panels.data(); }
};

DenseWeights MakeDenseWeights(const Geometry& g, const float* wd, int64_t co) {
  const int64_t width = DensePanelWidth(co);
  return {wd, width == 0 ? std::vector<float>() : PackDensePanels(wd, g.k * g.k * g.c, co, width)};
}

// One output row of the convolution, then the epilogue while it is in cache.
void DenseForwardRow(const Geometry& g, int64_t co, const Padded& xp, const DenseWeights& w, const Epilogue& epi,
                     int64_t row, float* yrow) {
  const bool blocked = ForPanelVectors(DensePanelWidth(co), [&](auto vec, auto nv) {  // 6 pixels x 2 vectors, 8 x 1
    DenseForwardBlocked<decltype(vec), nv, nv == 2 ? 6 : 8>(g, co, xp, w.data(), row, yrow);
  });
  if (!blocked) DenseForwardPlain(g, co, xp, w.data(), row, yrow);
  ApplyEpilogue(epi, yrow, yrow, g.wo, co);
}

// ResNet's MaxPool2d(3, stride 2, padding 1) over the convolution's output, eval mode: pooled row (b, pr) takes
// the max over convolution rows 2pr-1 .. 2pr+1 and columns 2q-1 .. 2q+1 (those inside the map: the padding is -inf,
// so it never wins). The convolution rows are computed into a per-thread ring of 3 (each once per chunk of pooled
// rows), so the full-resolution map (32 x 112 x 112 x 64 floats at 224 px) is never written: XLA's reduce_window
// over it took a third as long as the convolution.
constexpr int64_t kPool = 3, kPoolStride = 2, kPoolPadding = 1;
inline int64_t PooledSize(int64_t size) { return (size + 2 * kPoolPadding - kPool) / kPoolStride + 1; }

void MaxPoolRow(const float* const* rows, int64_t n_rows, int64_t wo, int64_t co, int64_t wp, float* out) {
  for (int64_t q = 0; q < wp; ++q) {
    const int64_t c_lo = std::max<int64_t>(0, q * kPoolStride - kPoolPadding);
    const int64_t c_hi = std::min<int64_t>(wo, q * kPoolStride - kPoolPadding + kPool);
    ForChannelVectors(0, co, [&](auto lanes, int64_t c) {  // (v > m ? v : m: std::max(m, v) for floats)
      using V = decltype(lanes);
      V m = Load<V>(rows[0] + c_lo * co + c);
      for (int64_t i = 0; i < n_rows; ++i)
        for (int64_t col = c_lo; col < c_hi; ++col) {
          const V v = Load<V>(rows[i] + col * co + c);
          m = v > m ? v : m;
        }
      Store<V>(out + q * co + c, m);
    });
  }
}

ffi::Error DenseConvForwardWith(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                                ffi::ResultBuffer<ffi::F32> y, int64_t stride, int64_t padding, const Epilogue& epi,
                                bool max_pool = false) {
  Geometry g;
  auto wdim = w.dimensions();
  if (wdim.size() != 4) return ffi::Error::InvalidArgument("dense_conv: kernel must be (K, K, Cin, Cout)");
  if (auto e = MakeGeometry(x, wdim[0], stride, padding, &g); e.failure()) return e;
  const int64_t co = wdim[3];
  const DenseWeights wd = MakeDenseWeights(g, w.typed_data(), co);
  float* yd = y->typed_data();
  const Padded xp = PadInput(pool, g, x.typed_data());
  if (!max_pool) {
    ParallelFor(pool, g.n * g.ho, [&](int64_t begin, int64_t end, int64_t) {
      for (int64_t row = begin; row < end; ++row) DenseForwardRow(g, co, xp, wd, epi, row, yd + row * g.wo * co);
    });
    return ffi::Error::Success();
  }
  const int64_t hp = PooledSize(g.ho), wp = PooledSize(g.wo);
  const int64_t row_size = g.wo * co;
  ParallelFor(pool, g.n * hp, [&](int64_t begin, int64_t end, int64_t) {
    std::vector<float> ring(kPool * row_size);  // convolution row r in slot r % 3
    std::vector<int64_t> ring_row(kPool, -1);    // which (b * Ho + r) each slot holds
    for (int64_t prow = begin; prow < end; ++prow) {
      const int64_t b = prow / hp, pr = prow % hp;
      const float* rows[kPool];
      int64_t n_rows = 0;
      for (int64_t i = 0; i < kPool; ++i) {
        const int64_t r = pr * kPoolStride - kPoolPadding + i;
        if (r < 0 || r >= g.ho) continue;
        const int64_t slot = r % kPool, conv_row = b * g.ho + r;
        float* yrow = ring.data() + slot * row_size;
        if (ring_row[slot] != conv_row) DenseForwardRow(g, co, xp, wd, epi, conv_row, yrow);
        ring_row[slot] = conv_row;
        rows[n_rows++] = yrow;
      }
      MaxPoolRow(rows, n_rows, g.wo, co, wp, yd + prow * wp * co);
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

// ResNet's max pool alone (training, where BN uses batch statistics): the same row routine over x's rows. XLA's
// reduce_window took 29 ms on V2's 112x112x64 stem output (batch 32) against PyTorch's 11.
ffi::Error MaxPoolForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> y) {
  auto d = x.dimensions();
  if (d.size() != 4) return ffi::Error::InvalidArgument("max_pool: input must be NHWC (rank 4)");
  const int64_t n = d[0], h = d[1], w = d[2], c = d[3];
  const int64_t hp = PooledSize(h), wp = PooledSize(w);
  const float* xd = x.typed_data();
  float* yd = y->typed_data();
  ParallelFor(pool, n * hp, [&](int64_t begin, int64_t end, int64_t) {
    for (int64_t prow = begin; prow < end; ++prow) {
      const int64_t b = prow / hp, pr = prow % hp;
      const float* rows[kPool];
      int64_t n_rows = 0;
      for (int64_t i = 0; i < kPool; ++i) {
        const int64_t r = pr * kPoolStride - kPoolPadding + i;
        if (r >= 0 && r < h) rows[n_rows++] = xd + (b * h + r) * w * c;
      }
      MaxPoolRow(rows, n_rows, w, c, wp, yd + prow * wp * c);
    }
  });
  return ffi::Error::Success();
}

// Its gradient (training): dx[b, r, q, :] = the sum of g over the windows whose first maximum, in row-major window
// order, is (r, q): the tie rule of PyTorch's kernel and of layers.max_pool_3x3_s2's XLA form. That form (a padded
// copy of x, then nine compare-and-select passes over parity grids) took ~29 ms of V2's 224 px batch-32 train step
// (trace), for what is one read of x, y and g and one write of dx. Here each task is one image, scattering into its
// dx pooled row by pooled row, each dx row zeroed just before the first window that reaches it, so the rows being
// summed stay in cache. (Tasks of one image's 16-channel block each read every pixel's cache line of their channels,
// 256 bytes apart: 37 ms, slower than XLA's form.) Padding taps are skipped: a window of -inf values sends its
// gradient to its first tap inside x, as PyTorch's does.
ffi::Error MaxPoolBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> y,
                           ffi::Buffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> dx) {
  auto d = x.dimensions();
  if (d.size() != 4) return ffi::Error::InvalidArgument("max_pool backward: input must be NHWC (rank 4)");
  const int64_t n = d[0], h = d[1], w = d[2], c = d[3];
  const int64_t hp = PooledSize(h), wp = PooledSize(w);
  const size_t pooled = static_cast<size_t>(n * hp * wp * c);
  if (y.element_count() != pooled || g.element_count() != pooled)
    return ffi::Error::InvalidArgument("max_pool backward: y and g must have the pooled shape");
  const float* xd = x.typed_data();
  const float* yd = y.typed_data();
  const float* gd = g.typed_data();
  float* out = dx->typed_data();
  ParallelFor(pool, n, [&](int64_t begin, int64_t end, int64_t) {
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t pr = 0; pr < hp; ++pr) {
        const int64_t fresh = std::min(h, kPoolStride * pr + 2) - kPoolStride * pr;  // rows no earlier window reached
        if (fresh > 0) std::fill_n(out + (b * h + kPoolStride * pr) * w * c, fresh * w * c, 0.0f);
        for (int64_t q = 0; q < wp; ++q) {
          const int64_t at = ((b * hp + pr) * wp + q) * c;
          ForChannelVectors(0, c, [&](auto lanes, int64_t ch) {
            using V = decltype(lanes);
            using Mask = decltype(V{} == V{});
            const V yv = Load<V>(yd + at + ch), gv = Load<V>(gd + at + ch), zero{};
            Mask taken{};
            for (int64_t i = 0; i < kPool; ++i)
              for (int64_t j = 0; j < kPool; ++j) {
                const int64_t r = kPoolStride * pr - kPoolPadding + i, col = kPoolStride * q - kPoolPadding + j;
                if (r < 0 || r >= h || col < 0 || col >= w) continue;  // padding
                const int64_t pixel = ((b * h + r) * w + col) * c + ch;
                const Mask hit = (Load<V>(xd + pixel) == yv) & ~taken;
                Store<V>(out + pixel, Load<V>(out + pixel) + (hit ? gv : zero));
                taken = taken | hit;
              }
          });
        }
      }
    }
  });
  return ffi::Error::Success();
}

// y (n, m) = act(x (n, k) @ w (k, m) + b) for a few rows n, split over column chunks of y so that every thread
// streams its own part of w: the squeeze-excitation's products are matrix-vector products at batch 1, bound by
// reading weights that are cold in cache on every call (benchmarks/SPEED.md, 2026-12-06). Each output sums its k
// products in order with FMAs, whatever the chunking.
template <int64_t kAct>
void SmallDense(ffi::ThreadPool& pool, const float* x, int64_t n, int64_t k, const float* w, const float* b,
                int64_t m, float* y) {
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), m / 16));
  ParallelFor(pool, chunks, chunks, [&](int64_t begin, int64_t end, int64_t) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      // Chunk edges on multiples of 16 columns (whole vectors; the last chunk takes what is left).
      const int64_t j0 = m * chunk / chunks / 16 * 16;
      const int64_t j1 = chunk + 1 == chunks ? m : m * (chunk + 1) / chunks / 16 * 16;
      // The sums in a buffer of the chunk's own: summed in place in y, two chunks' edges sharing a cache line
      // bounce it between the cores at every product (2.5x the time of one thread, measured).
      std::vector<float> acc(j1 - j0);
      for (int64_t r = 0; r < n; ++r) {
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t c = 0; c < k; ++c) {
          const float xv = x[r * k + c];
          const float* wr = w + c * m + j0;
          ForChannelVectors(0, j1 - j0, [&](auto v, int64_t j) {
            using V = decltype(v);
            if constexpr (std::is_same_v<V, float>) acc[j] = Fma(xv, wr[j], acc[j]);
            else Store<V>(acc.data() + j, Fma(Broadcast<V>(xv), Load<V>(wr + j), Load<V>(acc.data() + j)));
          });
        }
        float* out = y + r * m + j0;
        ForChannelVectors(0, j1 - j0, [&](auto v, int64_t j) {
          using V = decltype(v);
          V t;
          if constexpr (std::is_same_v<V, float>) t = acc[j] + b[j0 + j];
          else t = Load<V>(acc.data() + j) + Load<V>(b + j0 + j);
          t = Activate<kAct>(t);
          if constexpr (std::is_same_v<V, float>) out[j] = t;
          else Store<V>(out + j, t);
        });
      }
    }
  });
}

// The eval-mode squeeze-excitation's channel scale from the pooled features: hardsigmoid(relu(pooled @ w1 + b1)
// @ w2 + b2), pooled (N, C), w1 (C, S), w2 (S, C); both products in SmallDense, one kernel call instead of XLA's
// two dots and their two elementwise passes.
ffi::Error SeScaleForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> pooled, ffi::Buffer<ffi::F32> w1,
                          ffi::Buffer<ffi::F32> b1, ffi::Buffer<ffi::F32> w2, ffi::Buffer<ffi::F32> b2,
                          ffi::ResultBuffer<ffi::F32> scale) {
  auto pd = pooled.dimensions(), d1 = w1.dimensions(), d2 = w2.dimensions();
  if (pd.size() != 2 || d1.size() != 2 || d2.size() != 2 || d1[0] != pd[1] || d2[0] != d1[1] || d2[1] != pd[1] ||
      b1.element_count() != d1[1] || b2.element_count() != pd[1])
    return ffi::Error::InvalidArgument("se_scale: shapes must be pooled (N, C), w1 (C, S), b1 (S), w2 (S, C), b2 (C)");
  const int64_t n = pd[0], c = pd[1], sq = d1[1];
  std::vector<float> hidden(n * sq);
  SmallDense<kRelu>(pool, pooled.typed_data(), n, c, w1.typed_data(), b1.typed_data(), sq, hidden.data());
  SmallDense<kHardsigmoid>(pool, hidden.data(), n, sq, w2.typed_data(), b2.typed_data(), c, scale->typed_data());
  return ffi::Error::Success();
}

// An eval-mode 1x1 convolution with its BatchNorm and activation, y = act((x @ w) * scale + shift), x (..., Cin)
// taken as (pixels, Cin), w (Cin, Cout): for maps of few pixels (a batch-1 embedding's 7x7 stage), where XLA's
// matmul of 49 rows by 160 -> 960 channels ran at ~90 GFLOP/s and its BN + activation was one more op. The
// threads split the output channels' panels (Pointwise1x1's blocks), each packing its panels as it goes, so every
// thread reads its own part of w once; with fewer panels than threads, the pixels.
ffi::Error PointwiseForwardBnAct(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                                 ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> shift,
                                 ffi::ResultBuffer<ffi::F32> y, int64_t activation) {
  auto d = x.dimensions();
  if (d.size() < 1) return ffi::Error::InvalidArgument("pointwise: input must have a channel axis");
  Pointwise pw;
  if (auto e = MakePointwise(w, scale, shift, activation, d.back(), &pw, nullptr); e.failure()) return e;
  const int64_t pixels = x.element_count() / pw.cin, K = pw.cin, N = pw.cout;
  std::vector<int64_t> starts;
  for (int64_t c = 0; c < N; c += PanelWidth(c, N)) starts.push_back(c);
  const int64_t panels = static_cast<int64_t>(starts.size());
  const int64_t pieces = PiecesOf(pool, pixels);
  const bool by_panel = panels >= pieces;
  const float* xd = x.typed_data();
  float* yd = y->typed_data();
  ParallelFor(pool, by_panel ? panels : pixels, pieces, [&](int64_t begin, int64_t end, int64_t) {
    std::vector<float> panel(K * 2 * kWide);
    const int64_t p0 = by_panel ? begin : 0, p1 = by_panel ? end : panels;
    const int64_t m0 = by_panel ? 0 : begin, m1 = by_panel ? pixels : end;
    for (int64_t p = p0; p < p1; ++p) {
      PackPanel(pw, starts[p], nullptr, panel.data());
      PointwisePanel(pw, panel.data(), starts[p], xd + m0 * K, m1 - m0, nullptr, yd + m0 * N);
    }
  });
  return ffi::Error::Success();
}

// The same followed by ResNet's 3x3 stride-2 max pool (the V2 stem in eval mode).
ffi::Error DenseConvForwardBnActMaxPool(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                                       ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> shift,
                                       ffi::ResultBuffer<ffi::F32> y, int64_t stride, int64_t padding,
                                       int64_t activation) {
  Epilogue epi;
  if (auto e = MakeEpilogue(scale, shift, activation, w.dimensions().back(), &epi); e.failure()) return e;
  return DenseConvForwardWith(pool, x, w, y, stride, padding, epi, /*max_pool=*/true);
}

// A ResNet bottleneck without downsample, eval mode: relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x)))))))) + x),
// conv1/conv3 1x1 (C -> P -> C), conv2 3x3 padding 1 (P -> P). The tail's maps are small (7x7x160 at 224 px), so
// unfused each of a block's ~6 XLA ops was a separate short pass. Three passes over rows here, each split across
// threads (a single 7x7 image too): conv1 straight into conv2's zero-padded input, conv2 (the dense conv's rows),
// conv3 with the residual and the final ReLU; the intermediate maps (P = C/4 channels) stay in cache.
ffi::Error BottleneckForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w1,
                             ffi::Buffer<ffi::F32> scale1, ffi::Buffer<ffi::F32> shift1, ffi::Buffer<ffi::F32> w2,
                             ffi::Buffer<ffi::F32> scale2, ffi::Buffer<ffi::F32> shift2, ffi::Buffer<ffi::F32> w3,
                             ffi::Buffer<ffi::F32> scale3, ffi::Buffer<ffi::F32> shift3,
                             ffi::ResultBuffer<ffi::F32> y) {
  auto d = x.dimensions();
  if (d.size() != 4) return ffi::Error::InvalidArgument("bottleneck: input must be NHWC (rank 4)");
  const int64_t n = d[0], h = d[1], w = d[2], c = d[3];
  Pointwise reduce, restore;
  std::vector<float> reduce_panels, restore_panels;
  if (auto e = MakePointwise(w1, scale1, shift1, kRelu, c, &reduce, &reduce_panels); e.failure()) return e;
  const int64_t planes = reduce.cout;
  auto d2 = w2.dimensions();
  if (d2.size() != 4 || d2[0] != 3 || d2[1] != 3 || d2[2] != planes || d2[3] != planes)
    return ffi::Error::InvalidArgument("bottleneck: conv2 must be (3, 3, P, P), P conv1's output channels");
  if (auto e = MakePointwise(w3, scale3, shift3, kIdentity, planes, &restore, &restore_panels); e.failure()) return e;
  if (restore.cout != c) return ffi::Error::InvalidArgument("bottleneck: conv3 must restore the input's channels");
  Epilogue epi2;
  if (auto e = MakeEpilogue(scale2, shift2, kRelu, planes, &epi2); e.failure()) return e;
  const Geometry g{n, h, w, planes, 3, 1, 1, h, w};  // conv2
  const DenseWeights w2_panels = MakeDenseWeights(g, w2.typed_data(), planes);
  const float* xd = x.typed_data();
  float* yd = y->typed_data();
  // conv1's rows written straight into conv2's zero-padded input, as the stems' convs pad theirs.
  const Padded a = PadRows(pool, g, [&](int64_t b, int64_t r, float* dst) {
    Pointwise1x1(reduce, xd + (b * h + r) * w * c, w, nullptr, dst);
  });
  std::unique_ptr<float[]> mid(new float[n * h * w * planes]);  // conv2's output
  const int64_t pieces = Pieces(pool);
  ParallelFor(pool, n * h, pieces, [&](int64_t begin, int64_t end, int64_t) {
    for (int64_t row = begin; row < end; ++row) DenseForwardRow(g, planes, a, w2_panels, epi2, row, mid.get() + row * w * planes);
  });
  ParallelFor(pool, n * h, pieces, [&](int64_t begin, int64_t end, int64_t) {
    const int64_t rows = end - begin, count = rows * w * c;
    float* out = yd + begin * w * c;
    Pointwise1x1(restore, mid.get() + begin * w * planes, rows * w, xd + begin * w * c, out);  // bn3(conv3(.)) + x
    ForChannelVectors(0, count, [&](auto lanes, int64_t i) {
      using V = decltype(lanes);
      Store<V>(out + i, Activate<kRelu>(Load<V>(out + i)));
    });
  });
  return ffi::Error::Success();
}

// dw[i, j, c, :] = sum_{b, r, q} x[b, r*S+i-P, q*S+j-P, c] * dy[b, r, q, :], accumulated per chunk of output rows
// (each chunk's own K*K*Cin*Cout accumulator, added in a fixed order at the end, as for the depthwise gradient).
// Per output row and kernel row i, the taps (j, c) of one padded input row are consecutive floats (jc = j*Cin + c),
// so a block of P taps x V vectors Vec of output channels is summed over the row's pixels in P*V registers: each dy
// vector loaded once per P taps, P*V independent sums (one sum per block, as before, left the V1 stem's gradient
// waiting on FMA latency at ~30 GFLOP/s). Nothing is stored inside the pixel loop.
template <typename Vec, int V, int P>
void DenseKernelGradTaps(const Geometry& g, int64_t co, const float* xrow, const float* grow, int64_t jc0,
                         float* a) {
  constexpr int64_t L = kLanesOf<Vec>;
  const int64_t step = g.s * g.c;
  for (int64_t o0 = 0; o0 < co; o0 += L * V) {
    Vec acc[P][V] = {};
    for (int64_t q = 0; q < g.wo; ++q) {
      const float* xq = xrow + q * step + jc0;
      const float* gq = grow + q * co + o0;
      Vec gv[V];
      for (int t = 0; t < V; ++t) gv[t] = Load<Vec>(gq + L * t);
      for (int p = 0; p < P; ++p) {
        const Vec xv = Broadcast<Vec>(xq[p]);
        for (int t = 0; t < V; ++t) acc[p][t] = Fma(xv, gv[t], acc[p][t]);
      }
    }
    for (int p = 0; p < P; ++p)
      for (int t = 0; t < V; ++t) {
        float* at = a + (jc0 + p) * co + o0 + L * t;
        Store<Vec>(at, Load<Vec>(at) + acc[p][t]);
      }
  }
}

template <typename Vec, int V>
void DenseKernelGradBlocked(const Geometry& g, int64_t co, const Padded& xp, const float* gd, float* total,
                            int64_t begin, int64_t end) {
  constexpr int kTaps = 12 / V;  // 12 sums in registers, plus V dy vectors and a broadcast
  const int64_t taps = g.k * g.c;  // (j, c) per kernel row
  for (int64_t row = begin; row < end; ++row) {
    const int64_t b = row / g.ho, r = row % g.ho;
    const float* grow = gd + row * g.wo * co;
    for (int64_t i = 0; i < g.k; ++i) {
      const float* xrow = xp.data + (b * xp.hp + r * g.s + i) * xp.wp * g.c;
      float* a = total + i * taps * co;
      int64_t jc = 0;
      for (; jc + kTaps <= taps; jc += kTaps) DenseKernelGradTaps<Vec, V, kTaps>(g, co, xrow, grow, jc, a);
      for (; jc + kTaps / 2 <= taps; jc += kTaps / 2) DenseKernelGradTaps<Vec, V, kTaps / 2>(g, co, xrow, grow, jc, a);
      for (; jc < taps; ++jc) DenseKernelGradTaps<Vec, V, 1>(g, co, xrow, grow, jc, a);
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
            for (int64_t o = 0; o < co; ++o) ac[o] = Fma(xv, gq[o], ac[o]);
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
    // Two-vector blocks for 64 outputs too (6 taps x 2 vectors): on AVX2, 3 taps x 4 vectors spilled registers (50 vs
    // 56-63 ms, V2 stem). The blocks' widths as the forward pass's panels (DensePanelWidth).
    const bool blocked = ForPanelVectors(DensePanelWidth(co), [&](auto vec, auto nv) {
      DenseKernelGradBlocked<decltype(vec), nv>(g, co, xp, gd, total, begin, end);
    });
    if (!blocked) DenseKernelGradRows(g, co, xp, gd, total, begin, end);
  });
  return ffi::Error::Success();
}

// Training-mode BatchNorm (batch statistics) + activation over x (rows, C), C innermost. Autodiff through XLA's
// form takes ~7 passes over the map where these take 5: one to reduce the statistics, one to normalize; in the
// backward pass one to reduce sum(g') and sum(g' * (x - mean)), g' = g * act'(z), one to write dx. Each pass
// works row by row (one image row: W pixels x C) on several threads; every chunk of rows keeps its own
// double-precision sums, merged in chunk order (deterministic).
struct ChannelMoments {  // count, mean and sum of squared deviations per channel (Chan et al.'s pairwise merge)
  double count = 0;
  std::vector<double> mean, m2;
  explicit ChannelMoments(int64_t c) : mean(c, 0.0), m2(c, 0.0) {}
  void Merge(double n_b, const double* mean_b, const double* m2_b) {
    const double total = count + n_b, w_mean = n_b / total, w_m2 = count * n_b / total;
    for (size_t c = 0; c < mean.size(); ++c) {
      const double delta = mean_b[c] - mean[c];
      mean[c] = Fma(delta, w_mean, mean[c]);
      m2[c] += Fma(delta * delta, w_m2, m2_b[c]);
    }
    count = total;
  }
};

// A group of consecutive rows (`pixels` pixels, ~64 KB) relative to its first pixel (small numbers, so float sums
// keep their digits even when the mean is large against the spread), the group's mean of those, then the squared
// deviations from that mean (the group is in cache): the two-pass formula's accuracy at one pass over memory. One
// row per group left the float64 merge as costly as reading the row for the narrow 7x7 and 14x14 maps.
void RowMoments(const float* x, int64_t pixels, int64_t C, float* sum, float* m2, ChannelMoments* acc,
                std::vector<double>* mean_b, std::vector<double>* m2_b) {
  std::fill(sum, sum + C, 0.0f);
  std::fill(m2, m2 + C, 0.0f);
  for (int pass = 0; pass < 2; ++pass) {
    for (int64_t m = 1; m < pixels; ++m) {
      const float* u = x + m * C;
      ForChannelVectors(0, C, [&](auto lanes, int64_t c) {
        using V = decltype(lanes);
        const V d = Load<V>(u + c) - Load<V>(x + c);
        if (pass == 0) Store<V>(sum + c, Load<V>(sum + c) + d);
        else {
          const V e = d - Load<V>(sum + c);
          Store<V>(m2 + c, Fma(e, e, Load<V>(m2 + c)));
        }
      });
    }
    if (pass == 0)
      for (int64_t c = 0; c < C; ++c) sum[c] /= static_cast<float>(pixels);  // the mean, relative to pixel 0
  }
  for (int64_t c = 0; c < C; ++c) {
    (*mean_b)[c] = static_cast<double>(x[c]) + sum[c];
    const double rel_mean = sum[c];  // the mean relative to pixel 0
    (*m2_b)[c] = Fma(rel_mean, rel_mean, static_cast<double>(m2[c]));  // pixel 0 itself: deviation -mean
  }
  acc->Merge(static_cast<double>(pixels), mean_b->data(), m2_b->data());
}

// The folded affine of the float32 statistics, as layers.BatchNorm computes it: inv = rsqrt(var + eps) * gamma,
// shift = beta - mean * inv. Both passes call this, so the backward pass takes the activation's slope at exactly
// the forward pass's z.
struct FoldedAffine {
  std::vector<float> inv, shift;
  FoldedAffine(const float* mean, const float* var, const float* gamma, const float* beta, float epsilon, int64_t C)
      : inv(C), shift(C) {
    for (int64_t c = 0; c < C; ++c) {
      inv[c] = 1.0f / std::sqrt(var[c] + epsilon) * gamma[c];
      shift[c] = Fma(-mean[c], inv[c], beta[c]);
    }
  }
};

ffi::Error BatchNormShape(const ffi::Buffer<ffi::F32>& x, const ffi::Buffer<ffi::F32>& gamma,
                          const ffi::Buffer<ffi::F32>& beta, int64_t activation, int64_t* rows, int64_t* width,
                          int64_t* C) {
  auto d = x.dimensions();
  if (d.size() < 2) return ffi::Error::InvalidArgument("batch_norm: input must have a channel axis and a batch axis");
  *C = d.back();
  *width = d.size() >= 3 ? d[d.size() - 2] : 1;
  *rows = x.element_count() / std::max<int64_t>(1, *C * *width);
  if (gamma.element_count() != static_cast<size_t>(*C) || beta.element_count() != static_cast<size_t>(*C))
    return ffi::Error::InvalidArgument("batch_norm: gamma and beta need one value per channel");
  if (activation < kIdentity || activation > kHardswish)
    return ffi::Error::InvalidArgument("batch_norm: activation must be 0 (identity), 1 (relu) or 2 (hardswish)");
  return ffi::Error::Success();
}

// mean[c] and the biased variance var[c] of x (rows x width x C) over all but the channel axis.
void BatchMoments(ffi::ThreadPool& pool, const float* xd, int64_t rows, int64_t width, int64_t C, float* md,
                  float* vd) {
  const int64_t pieces = PiecesFor(pool, rows);
  std::vector<ChannelMoments> parts(pieces, ChannelMoments(C));
  const int64_t group = std::max<int64_t>(1, (16 << 10) / (width * C));  // rows per group: ~16k floats
  ParallelFor(pool, rows, pieces, [&](int64_t begin, int64_t end, int64_t piece) {
    std::vector<float> sum(C), m2(C);
    std::vector<double> mean_b(C), m2_b(C);
    for (int64_t r = begin; r < end; r += group)
      RowMoments(xd + r * width * C, std::min(group, end - r) * width, C, sum.data(), m2.data(), &parts[piece],
                 &mean_b, &m2_b);
  });
  ChannelMoments total(C);
  for (const ChannelMoments& part : parts)
    if (part.count > 0) total.Merge(part.count, part.mean.data(), part.m2.data());
  for (int64_t c = 0; c < C; ++c) {
    md[c] = static_cast<float>(total.mean[c]);
    vd[c] = static_cast<float>(total.m2[c] / std::max(total.count, 1.0));
  }
}

ffi::Error BatchNormActForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> gamma,
                               ffi::Buffer<ffi::F32> beta, ffi::ResultBuffer<ffi::F32> y,
                               ffi::ResultBuffer<ffi::F32> mean, ffi::ResultBuffer<ffi::F32> var, float epsilon,
                               int64_t activation) {
  int64_t rows, width, C;
  if (auto e = BatchNormShape(x, gamma, beta, activation, &rows, &width, &C); e.failure()) return e;
  const float* xd = x.typed_data();
  float* md = mean->typed_data();
  float* vd = var->typed_data();
  BatchMoments(pool, xd, rows, width, C, md, vd);
  const FoldedAffine f(md, vd, gamma.typed_data(), beta.typed_data(), epsilon, C);
  const Epilogue epi{f.inv.data(), f.shift.data(), activation};
  float* yd = y->typed_data();
  const bool stream = Streamable(yd, rows * width * C, C);
  ParallelFor(pool, rows, [&](int64_t begin, int64_t end, int64_t) {
    ApplyEpilogue(epi, xd + begin * width * C, yd + begin * width * C, (end - begin) * width, C, stream);
  });
  return ffi::Error::Success();
}


// act'(z) as PyTorch's backward kernels take it: ReLU passes where z > 0; Hardswish's slope is 0 for z <= -3,
// z / 3 + 1/2 below 3, else 1.
template <int64_t kAct, typename V>
inline V ActivationSlope(V z) {
  const V one = V{} + 1.0f;
  if constexpr (kAct == kRelu) return z > V{} ? one : V{};
  if constexpr (kAct == kHardswish) {
    const V mid = Fma(z, V{} + 1.0f / 3.0f, V{} + 0.5f);
    return z <= -3.0f ? V{} : (z < 3.0f ? mid : one);
  }
  return one;
}

// The backward pass: `Reduce` rows [begin, end) into sums of g' and g' * (x - mean) (float per row, then double);
// `Write` dx = a * g' - b - c * (x - mean) with per-channel a, b, c.
template <int64_t kAct>
struct BatchNormActGrad {
  const float *x, *g, *inv, *shift, *mean;
  int64_t width, C;

  template <typename V>
  inline V Slope(const float* xp, const float* gp, int64_t c) const {
    const V xv = Load<V>(xp + c);
    return Load<V>(gp + c) * ActivationSlope<kAct>(Fma(xv, Load<V>(inv + c), Load<V>(shift + c)));
  }

  void Reduce(int64_t begin, int64_t end, double* sum_g, double* sum_gx) const {
    std::vector<float> rg(C), rgx(C);
    for (int64_t r = begin; r < end; ++r) {
      std::fill(rg.begin(), rg.end(), 0.0f);
      std::fill(rgx.begin(), rgx.end(), 0.0f);
      for (int64_t m = 0; m < width; ++m) {
        const float* xp = x + (r * width + m) * C;
        const float* gp = g + (r * width + m) * C;
        ForChannelVectors(0, C, [&](auto lanes, int64_t c) {
          using V = decltype(lanes);
          const V gs = Slope<V>(xp, gp, c);
          Store<V>(rg.data() + c, Load<V>(rg.data() + c) + gs);
          Store<V>(rgx.data() + c, Fma(gs, Load<V>(xp + c) - Load<V>(mean + c), Load<V>(rgx.data() + c)));
        });
      }
      for (int64_t c = 0; c < C; ++c) {
        sum_g[c] += rg[c];
        sum_gx[c] += rgx[c];
      }
    }
  }

  template <bool kStream>
  void WriteRows(int64_t begin, int64_t end, const float* a, const float* b, const float* cc, float* dx) const {
    for (int64_t i = begin * width; i < end * width; ++i) {
      const float* xp = x + i * C;
      const float* gp = g + i * C;
      float* out = dx + i * C;
      ForChannelVectors(0, C, [&](auto lanes, int64_t c) {
        using V = decltype(lanes);
        const V centred = Load<V>(xp + c) - Load<V>(mean + c);
        const V v = Fma(-centred, Load<V>(cc + c), Fma(Slope<V>(xp, gp, c), Load<V>(a + c), -Load<V>(b + c)));
        StoreOut<kStream>(out + c, v);
      });
    }
    if constexpr (kStream) StreamingDone();
  }

  // dx's rows [begin, end); `stream`: Streamable(dx, its size, C).
  void Write(int64_t begin, int64_t end, const float* a, const float* b, const float* cc, float* dx,
             bool stream) const {
    if (stream) WriteRows<true>(begin, end, a, b, cc, dx);
    else WriteRows<false>(begin, end, a, b, cc, dx);
  }
};

template <int64_t kAct>
void BatchNormActBackwardWith(ffi::ThreadPool& pool, const BatchNormActGrad<kAct>& k, int64_t rows,
                              const float* gamma, const float* var, float epsilon, float* dx, float* dgamma,
                              float* dbeta) {
  const int64_t C = k.C;
  const int64_t pieces = PiecesFor(pool, rows);
  std::vector<double> sums(pieces * 2 * C, 0.0);
  ParallelFor(pool, rows, pieces, [&](int64_t begin, int64_t end, int64_t piece) {
    k.Reduce(begin, end, sums.data() + piece * 2 * C, sums.data() + piece * 2 * C + C);
  });
  // With r = rsqrt(var + eps), n values per channel: dbeta = sum g', dgamma = r * sum g' (x - mean), and
  // dx = gamma r (g' - dbeta / n - (x - mean) r dgamma / n).
  std::vector<float> a(C), b(C), cc(C);
  const double n = static_cast<double>(rows * k.width);
  for (int64_t c = 0; c < C; ++c) {
    double sg = 0, sgx = 0;
    for (int64_t piece = 0; piece < pieces; ++piece) {
      sg += sums[piece * 2 * C + c];
      sgx += sums[piece * 2 * C + C + c];
    }
    const double r = 1.0 / std::sqrt(static_cast<double>(var[c]) + epsilon);
    dbeta[c] = static_cast<float>(sg);
    dgamma[c] = static_cast<float>(r * sgx);
    const double gr = gamma[c] * r;
    a[c] = static_cast<float>(gr);
    b[c] = static_cast<float>(gr * sg / n);
    cc[c] = static_cast<float>(gr * r * r * sgx / n);
  }
  const bool stream = Streamable(dx, rows * k.width * C, C);
  ParallelFor(pool, rows, [&](int64_t begin, int64_t end, int64_t) {
    k.Write(begin, end, a.data(), b.data(), cc.data(), dx, stream);
  });
}

ffi::Error BatchNormActBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g,
                                ffi::Buffer<ffi::F32> gamma, ffi::Buffer<ffi::F32> beta,
                                ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> var,
                                ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dgamma,
                                ffi::ResultBuffer<ffi::F32> dbeta, float epsilon, int64_t activation) {
  int64_t rows, width, C;
  if (auto e = BatchNormShape(x, gamma, beta, activation, &rows, &width, &C); e.failure()) return e;
  if (g.element_count() != x.element_count() || mean.element_count() != static_cast<size_t>(C) ||
      var.element_count() != static_cast<size_t>(C))
    return ffi::Error::InvalidArgument("batch_norm backward: g must match x, mean and var need one value per channel");
  const float* gm = gamma.typed_data();
  const float* md = mean.typed_data();
  const FoldedAffine f(md, var.typed_data(), gm, beta.typed_data(), epsilon, C);
  auto run = [&](auto grad) {
    BatchNormActBackwardWith(pool, grad, rows, gm, var.typed_data(), epsilon, dx->typed_data(),
                             dgamma->typed_data(), dbeta->typed_data());
  };
  const float* xd = x.typed_data();
  const float* gd = g.typed_data();
  const float *inv = f.inv.data(), *shift = f.shift.data();
  if (activation == kRelu) run(BatchNormActGrad<kRelu>{xd, gd, inv, shift, md, width, C});
  else if (activation == kHardswish) run(BatchNormActGrad<kHardswish>{xd, gd, inv, shift, md, width, C});
  else run(BatchNormActGrad<kIdentity>{xd, gd, inv, shift, md, width, C});
  return ffi::Error::Success();
}

// Training, a BatchNorm (batch statistics) + activation followed by a depthwise conv: the statistics of x in one
// pass, then the conv's kernels apply act(x * inv + shift) to each input row as they read it, so the BN's output
// (an inverted residual's expanded map, the block's largest) is never written or read back. The backward pass
// takes the input gradient with the plain kernel and the BN backward kernel on x.
ffi::Error BatchNormStatistics(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> mean,
                               ffi::ResultBuffer<ffi::F32> var) {
  auto d = x.dimensions();
  if (d.size() < 2) return ffi::Error::InvalidArgument("batch_norm: input must have a channel axis and a batch axis");
  const int64_t C = d.back(), width = d[d.size() - 2];
  BatchMoments(pool, x.typed_data(), x.element_count() / (width * C), width, C, mean->typed_data(), var->typed_data());
  return ffi::Error::Success();
}

// The depthwise kernels' prologue from the BN's batch statistics, folded as the BN kernels fold them.
ffi::Error MakePrologue(const ffi::Buffer<ffi::F32>& x, const ffi::Buffer<ffi::F32>& gamma,
                        const ffi::Buffer<ffi::F32>& beta, const ffi::Buffer<ffi::F32>& mean,
                        const ffi::Buffer<ffi::F32>& var, float epsilon, int64_t activation,
                        std::unique_ptr<FoldedAffine>* folded, Epilogue* prologue) {
  int64_t rows, width, C;
  if (auto e = BatchNormShape(x, gamma, beta, activation, &rows, &width, &C); e.failure()) return e;
  if (mean.element_count() != static_cast<size_t>(C) || var.element_count() != static_cast<size_t>(C))
    return ffi::Error::InvalidArgument("batch_norm: mean and var need one value per channel");
  *folded = std::make_unique<FoldedAffine>(mean.typed_data(), var.typed_data(), gamma.typed_data(),
                                           beta.typed_data(), epsilon, C);
  *prologue = {(*folded)->inv.data(), (*folded)->shift.data(), activation};
  return ffi::Error::Success();
}

ffi::Error BnActDepthwiseForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> gamma,
                                 ffi::Buffer<ffi::F32> beta, ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> var,
                                 ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y, int64_t stride,
                                 int64_t padding, float epsilon, int64_t activation) {
  std::unique_ptr<FoldedAffine> folded;
  Fused f;
  if (auto e = MakePrologue(x, gamma, beta, mean, var, epsilon, activation, &folded, &f.prologue); e.failure())
    return e;
  return DepthwiseForwardWith(pool, x, w, y, stride, padding, f);
}

ffi::Error BnActDepthwiseKernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> gamma,
                                    ffi::Buffer<ffi::F32> beta, ffi::Buffer<ffi::F32> mean,
                                    ffi::Buffer<ffi::F32> var, ffi::Buffer<ffi::F32> dy,
                                    ffi::ResultBuffer<ffi::F32> dw, int64_t stride, int64_t padding, float epsilon,
                                    int64_t activation) {
  std::unique_ptr<FoldedAffine> folded;
  Epilogue prologue;
  if (auto e = MakePrologue(x, gamma, beta, mean, var, epsilon, activation, &folded, &prologue); e.failure())
    return e;
  return DepthwiseKernelGradWith(pool, x, dy, dw, stride, padding, prologue);
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
XLA_FFI_DEFINE_HANDLER_SYMBOL(ResmobileDenseConvForwardBnAct, DenseConvForwardBnAct, ForwardBnAct());
XLA_FFI_DEFINE_HANDLER_SYMBOL(ResmobileDenseConvForwardBnActMaxPool, DenseConvForwardBnActMaxPool, ForwardBnAct());
XLA_FFI_DEFINE_HANDLER_SYMBOL(ResmobileMaxPoolForward, MaxPoolForward,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(ResmobileMaxPoolBackward, MaxPoolBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // y
                                  .Arg<ffi::Buffer<ffi::F32>>()  // g
                                  .Ret<ffi::Buffer<ffi::F32>>());
// The [expansion] and depthwise layers' arguments, shared by both inverted-residual kernels.
static auto ExpandDepthwiseArgs() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()   // x
      .Arg<ffi::Buffer<ffi::F32>>()   // expand_w (Cin, C), or empty
      .Arg<ffi::Buffer<ffi::F32>>()   // expand_scale
      .Arg<ffi::Buffer<ffi::F32>>()   // expand_shift
      .Arg<ffi::Buffer<ffi::F32>>()   // w (K, K, C)
      .Arg<ffi::Buffer<ffi::F32>>()   // scale
      .Arg<ffi::Buffer<ffi::F32>>();  // shift
}
XLA_FFI_DEFINE_HANDLER_SYMBOL(ResmobileExpandDepthwiseForward, ExpandDepthwiseForward,
                              ExpandDepthwiseArgs()
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y
                                  .Ret<ffi::Buffer<ffi::F32>>()  // row_sums (N * Ho, C)
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("padding")
                                  .Attr<int64_t>("activation"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(ResmobileSeScaleForward, SeScaleForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // pooled (N, C)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w1 (C, S)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // b1 (S)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w2 (S, C)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // b2 (C)
                                  .Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(ResmobilePointwiseForwardBnAct, PointwiseForwardBnAct,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x (..., Cin)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w (Cin, Cout)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // shift
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y (..., Cout)
                                  .Attr<int64_t>("activation"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(ResmobileSeProjectForward, SeProjectForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // d (N, H, W, C)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // se (N, C)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w (C, Cout)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // shift
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x (N, H, W, Cout), or empty
                                  .Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(ResmobileInvertedResidualForward, InvertedResidualForward,
                              ExpandDepthwiseArgs()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // project_w (C, Cout)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // project_scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // project_shift
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("padding")
                                  .Attr<int64_t>("activation")
                                  .Attr<int64_t>("residual"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(ResmobileBottleneckForward, BottleneckForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x (N, H, W, C)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // conv1 (C, P)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bn1 scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bn1 shift
                                  .Arg<ffi::Buffer<ffi::F32>>()  // conv2 (3, 3, P, P)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bn2 scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bn2 shift
                                  .Arg<ffi::Buffer<ffi::F32>>()  // conv3 (P, C)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bn3 scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bn3 shift
                                  .Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(ResmobileDepthwiseInputGrad, DepthwiseInputGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x, for its shape
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("padding"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(ResmobileBatchNormActForward, BatchNormActForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x (..., W, C)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // gamma
                                  .Arg<ffi::Buffer<ffi::F32>>()  // beta
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y
                                  .Ret<ffi::Buffer<ffi::F32>>()  // batch mean
                                  .Ret<ffi::Buffer<ffi::F32>>()  // batch variance (biased)
                                  .Attr<float>("epsilon")
                                  .Attr<int64_t>("activation"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(ResmobileBatchNormActBackward, BatchNormActBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // g, the gradient of y
                                  .Arg<ffi::Buffer<ffi::F32>>()  // gamma
                                  .Arg<ffi::Buffer<ffi::F32>>()  // beta
                                  .Arg<ffi::Buffer<ffi::F32>>()  // mean
                                  .Arg<ffi::Buffer<ffi::F32>>()  // var
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dx
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dgamma
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dbeta
                                  .Attr<float>("epsilon")
                                  .Attr<int64_t>("activation"));
// BN (batch statistics) + activation into a depthwise conv: x, gamma, beta, mean, var, then w or dy.
static auto BnActDepthwiseArgs() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()   // x, the BN's input
      .Arg<ffi::Buffer<ffi::F32>>()   // gamma
      .Arg<ffi::Buffer<ffi::F32>>()   // beta
      .Arg<ffi::Buffer<ffi::F32>>()   // batch mean
      .Arg<ffi::Buffer<ffi::F32>>()   // batch variance (biased)
      .Arg<ffi::Buffer<ffi::F32>>()   // w (K, K, C), or dy (the gradient of the conv's output)
      .Ret<ffi::Buffer<ffi::F32>>()   // y, or dw
      .Attr<int64_t>("stride")
      .Attr<int64_t>("padding")
      .Attr<float>("epsilon")
      .Attr<int64_t>("activation");
}
XLA_FFI_DEFINE_HANDLER_SYMBOL(ResmobileBnActDepthwiseForward, BnActDepthwiseForward, BnActDepthwiseArgs());
XLA_FFI_DEFINE_HANDLER_SYMBOL(ResmobileBnActDepthwiseKernelGrad, BnActDepthwiseKernelGrad, BnActDepthwiseArgs());
XLA_FFI_DEFINE_HANDLER_SYMBOL(ResmobileBatchNormStatistics, BatchNormStatistics,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x (..., W, C)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // batch mean
                                  .Ret<ffi::Buffer<ffi::F32>>());  // batch variance (biased)

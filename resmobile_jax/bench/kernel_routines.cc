// Times cpu_kernels.cc's inner routines on one thread, their data in cache, on V2's shapes at 224 px: how close each
// runs to one core's FMA peak, which whole calls and traces do not show. Built and run by bench/kernel_routines.py
// with -DKERNEL_SOURCE="path/to/cpu_kernels.cc" (the version to time; its anonymous namespace is this file's) and
// -DHAVE_ROW_LINES where that version has SumRowsLine (README Speed item 16), -DHAVE_ROW_GRADIENT where it has
// AddKernelRow (item 18; without it the kernel-gradient cases are left out).
// Usage: kernel_routines [REPS]. Prints one tab-separated line per case: name, FLOP, best ns of REPS-call rounds,
// an FNV-1a hash of the output bytes, and whether the row-reuse routine equals the generic one bit for bit (SumLine
// for depthwise lines, AddKernelRowByTaps for kernel-gradient rows; - if n/a).
#include KERNEL_SOURCE

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>

namespace {

std::vector<float> Random(size_t n, float lo = -1.0f, float hi = 1.0f) {
  static std::mt19937 gen(1);
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = d(gen);
  return v;
}

uint64_t Hash(const std::vector<float>& v) {
  uint64_t h = 1469598103934665603ull;
  const auto* p = reinterpret_cast<const unsigned char*>(v.data());
  for (size_t i = 0; i < v.size() * sizeof(float); ++i) h = (h ^ p[i]) * 1099511628211ull;
  return h;
}

// The best of 7 rounds of `reps` calls, in ns per call (the first round also warms the caches).
template <typename F>
double BestNs(F f, int reps) {
  double best = 1e300;
  for (int round = 0; round < 7; ++round) {
    const auto start = std::chrono::steady_clock::now();
    for (int r = 0; r < reps; ++r) f();
    const auto stop = std::chrono::steady_clock::now();
    best = std::min(best, std::chrono::duration<double, std::nano>(stop - start).count() / reps);
  }
  return best;
}

void Print(const char* name, double flop, double ns, const std::vector<float>& out, const char* matches = "-") {
  std::printf("%s\t%.0f\t%.1f\t%016llx\t%s\n", name, flop, ns, static_cast<unsigned long long>(Hash(out)), matches);
}

// A fused block's 1x1 call: `pixels` pixels (the rows RowsPerCall groups), cin -> cout, BN + activation.
void PointwiseCase(const char* name, int64_t pixels, int64_t cin, int64_t cout, int64_t activation, int reps) {
  auto w = Random(cin * cout), x = Random(pixels * cin), scale = Random(cout, 0.5f, 1.5f), shift = Random(cout);
  std::vector<float> out(pixels * cout), panels;
  Pointwise pw;
  pw.w = w.data();
  pw.cin = cin;
  pw.cout = cout;
  pw.bn = {scale.data(), shift.data(), activation};
  PackPanels(&pw, &panels);
  const double ns = BestNs([&] { Pointwise1x1(pw, x.data(), pixels, nullptr, out.data()); }, reps);
  Print(name, 2.0 * pixels * cin * cout, ns, out);
}

// `rows` output rows of a k x k depthwise convolution (padding (k-1)/2) over lines `width` pixels wide, C channels:
// the forward pass at `stride`, or (`input_grad`, stride 1) the input gradient's lines (taps at columns m + P - j).
void DepthwiseCase(const char* name, int64_t rows, int64_t width, int64_t C, int64_t k, int64_t stride,
                   bool input_grad, int reps) {
  const int64_t p = (k - 1) / 2, count = (width + 2 * p - k) / stride + 1;
  auto in = Random((rows * stride + k) * width * C), w = Random(k * k * C);
  std::vector<float> out(rows * count * C), reference(rows * count * C);
  std::vector<Tap> taps(k * k);
  auto line_taps = [&](int64_t r) {
    for (int64_t i = 0; i < k; ++i)
      for (int64_t j = 0; j < k; ++j)
        taps[i * k + j] = {in.data() + (r * stride + i) * width * C, w.data() + (i * k + j) * C,
                           input_grad ? p - j : j - p};
  };
  auto run = [&](float* dst, bool generic) {
    for (int64_t r = 0; r < rows; ++r) {
      line_taps(r);
      float* o = dst + r * count * C;
#ifdef HAVE_ROW_LINES
      if (!generic) {
        if (input_grad) SumInputGradLine(taps.data(), k * k, k, p, width, C, count, o);
        else SumForwardLine(taps.data(), k * k, k, stride, p, width, C, count, o);
        continue;
      }
#endif
      (void)generic;
      SumLine(taps.data(), k * k, input_grad ? 1 : stride, width, C, count, o, C);
    }
  };
  const double ns = BestNs([&] { run(out.data(), false); }, reps);
  run(reference.data(), true);
  const bool same = std::memcmp(out.data(), reference.data(), out.size() * sizeof(float)) == 0;
  Print(name, 2.0 * rows * count * C * k * k, ns, out, same ? "yes" : "NO");
}

#ifdef HAVE_ROW_GRADIENT
// The depthwise kernel gradient's sums over `rows` output rows (all k kernel rows of each) into one k*k*C
// accumulator: AddKernelRow, checked against the tap-by-tap AddKernelRowByTaps.
void KernelGradCase(const char* name, int64_t rows, int64_t width, int64_t C, int64_t k, int64_t stride, int reps) {
  const int64_t p = (k - 1) / 2, wo = (width + 2 * p - k) / stride + 1;
  auto x = Random((rows * stride + k) * width * C), dy = Random(rows * wo * C);
  std::vector<float> total(k * k * C), reference(k * k * C);
  auto run = [&](float* dst, bool by_taps) {
    std::fill(dst, dst + k * k * C, 0.0f);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t i = 0; i < k; ++i) {
        const float* xrow = x.data() + (r * stride + i) * width * C;
        const float* grow = dy.data() + r * wo * C;
        if (by_taps) AddKernelRowByTaps(xrow, grow, C, k, stride, p, width, wo, dst + i * k * C);
        else AddKernelRow(xrow, grow, C, k, stride, p, width, wo, dst + i * k * C);
      }
  };
  const double ns = BestNs([&] { run(total.data(), false); }, reps);
  run(reference.data(), true);
  const bool same = std::memcmp(total.data(), reference.data(), total.size() * sizeof(float)) == 0;
  Print(name, 2.0 * rows * wo * C * k * k, ns, total, same ? "yes" : "NO");
}
#endif

// `rows` output rows of the V2 stem's 7x7 stride-2 convolution, 3 -> 64 channels, from a zero-padded 224 px image.
void StemCase(const char* name, int64_t rows, int reps) {
  Geometry g{1, 224, 224, 3, 7, 2, 3, 112, 112};
  const int64_t co = 64, wp = g.w + 2 * g.p, hp = g.h + 2 * g.p;
  auto image = Random(g.h * g.w * g.c), w = Random(g.k * g.k * g.c * co);
  std::vector<float> padded(hp * wp * g.c + 8 * g.s * g.c, 0.0f), out(rows * g.wo * co);
  for (int64_t h = 0; h < g.h; ++h)
    std::memcpy(padded.data() + ((h + g.p) * wp + g.p) * g.c, image.data() + h * g.w * g.c, sizeof(float) * g.w * g.c);
  const Padded xp{padded.data(), hp, wp};
  const DenseWeights weights = MakeDenseWeights(g, w.data(), co);
  const double ns = BestNs([&] {
    for (int64_t r = 0; r < rows; ++r) DenseForwardRow(g, co, xp, weights, Epilogue{}, r, out.data() + r * g.wo * co);
  }, reps);
  Print(name, 2.0 * rows * g.wo * co * g.k * g.k * g.c, ns, out);
}

}  // namespace

// The fused blocks' 1x1 calls at V2 224 px: ~64 pixels of rows per call (RowsPerCall), a whole 14x14 / 7x7 image
// for the SE projections (SeProjectForward).
struct PointwiseShape {
  const char* name;
  int64_t pixels, cin, cout, activation;
};
constexpr PointwiseShape kPointwise[] = {
    {"1x1 56x56 24->72 relu (4 rows)", 224, 24, 72, kRelu},
    {"1x1 28x28 40->120 relu (3 rows)", 84, 40, 120, kRelu},
    {"1x1 28x28 120->40 (3 rows)", 84, 120, 40, kIdentity},
    {"1x1 14x14 80->200 hswish (5 rows)", 70, 80, 200, kHardswish},
    {"1x1 14x14 200->80 (5 rows)", 70, 200, 80, kIdentity},
    {"1x1 14x14 112->672 hswish (5 rows)", 70, 112, 672, kHardswish},
    {"1x1 14x14 672->112 (image)", 196, 672, 112, kIdentity},
    {"1x1 7x7 160->960 hswish (image)", 49, 160, 960, kHardswish},
    {"1x1 7x7 960->160 (image)", 49, 960, 160, kIdentity},
    {"1x1 7x7 160->40 relu (bottleneck)", 49, 160, 40, kRelu},
};

// Depthwise output rows of the blocks (stride 1 and 2), and the stride-1 input gradient's lines.
struct DepthwiseShape {
  const char* name;
  int64_t rows, width, channels, k, stride;
  bool input_grad;
};
constexpr DepthwiseShape kDepthwise[] = {
    {"depthwise 56x56x72 k3", 4, 56, 72, 3, 1, false},
    {"depthwise 56->28 x72 k5 s2", 2, 56, 72, 5, 2, false},
    {"depthwise 28x28x120 k5", 3, 28, 120, 5, 1, false},
    {"depthwise 14x14x200 k3", 5, 14, 200, 3, 1, false},
    {"depthwise 14x14x672 k3", 5, 14, 672, 3, 1, false},
    {"depthwise 14->7 x672 k5 s2", 7, 14, 672, 5, 2, false},
    {"depthwise 7x7x960 k5", 7, 7, 960, 5, 1, false},
    {"depthwise 112->56 x64 k3 s2 (V1)", 4, 112, 64, 3, 2, false},
    {"depthwise 9 px x20 k3 (edges, tails)", 4, 9, 20, 3, 1, false},
    {"depthwise input grad 56x56x72 k3", 4, 56, 72, 3, 1, true},
    {"depthwise input grad 28x28x120 k5", 3, 28, 120, 5, 1, true},
    {"depthwise input grad 7x7x960 k5", 7, 7, 960, 5, 1, true},
};

int main(int argc, char** argv) {
  const int reps = argc > 1 ? std::max(1, std::atoi(argv[1])) : 20;
  for (const auto& c : kPointwise) PointwiseCase(c.name, c.pixels, c.cin, c.cout, c.activation, reps);
  for (const auto& c : kDepthwise)
    DepthwiseCase(c.name, c.rows, c.width, c.channels, c.k, c.stride, c.input_grad, reps);
#ifdef HAVE_ROW_GRADIENT
  KernelGradCase("depthwise kernel grad 56x56x72 k3", 4, 56, 72, 3, 1, reps);
  KernelGradCase("depthwise kernel grad 56->28 x72 k5 s2", 2, 56, 72, 5, 2, reps);
  KernelGradCase("depthwise kernel grad 7x7x960 k5", 7, 7, 960, 5, 1, reps);
  KernelGradCase("depthwise kernel grad 9 px x20 k3 (edges, tails)", 4, 9, 20, 3, 1, reps);
#endif
  StemCase("stem 7x7 s2 3->64 (8 rows)", 8, std::max(1, reps / 4));
  return 0;
}

// One core's fp32 multiply-add throughput, measured: 12 independent chains of vector FMAs, more than two FMA ports
// need in flight to hide their latency. Prints GFLOP/s (2 FLOP per lane per FMA).
// Usage: fma_peak [SECONDS]. Built by resmobile_jax/bench/system.py with -O2 -march=native -ffp-contract=fast.
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#if defined(__AVX512F__)
#define LANES 16
#else
#define LANES 8
#endif
typedef float V __attribute__((vector_size(LANES * 4)));

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

int main(int argc, char** argv) {
  const double seconds = argc > 1 ? atof(argv[1]) : 0.3;
  // Read through volatile: the compiler cannot know x == 1 (and fold a * x + y into an add), and the chains start
  // apart, so none is merged with another.
  volatile float one = 1.0f, step = 1e-7f;
  V x, y;
  for (int l = 0; l < LANES; ++l) x[l] = one, y[l] = step;
  V a0 = x * 0, a1 = a0 + 1, a2 = a0 + 2, a3 = a0 + 3, a4 = a0 + 4, a5 = a0 + 5;
  V a6 = a0 + 6, a7 = a0 + 7, a8 = a0 + 8, a9 = a0 + 9, a10 = a0 + 10, a11 = a0 + 11;
  long iterations = 0;
  const double start = now();
  double elapsed;
  do {
    for (int i = 0; i < 1000000; ++i) {
      a0 = a0 * x + y; a1 = a1 * x + y; a2 = a2 * x + y; a3 = a3 * x + y; a4 = a4 * x + y; a5 = a5 * x + y;
      a6 = a6 * x + y; a7 = a7 * x + y; a8 = a8 * x + y; a9 = a9 * x + y; a10 = a10 * x + y; a11 = a11 * x + y;
    }
    iterations += 1000000;
  } while ((elapsed = now() - start) < seconds);
  const V sum = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8 + a9 + a10 + a11;
  printf("%.3f %g\n", iterations * 12.0 * 2 * LANES / elapsed / 1e9, (double)sum[0]);  // the sum keeps the chains
  return 0;
}

// cpu_dropout.h — the C++ CPU dropout kernel (cpu_dropout.cpp): y = keep ? x / (1 - rate) : 0.
//
// The mask is a pure function of (seed, counter, element index): keep[i] is true when a 32-bit
// draw — two keyed rounds of the lowbias32 hash of i mod 2^32, keyed per block by a SplitMix64
// (murmur3 finaliser) mix of (seed, counter, i >> 32) — is >= threshold = floor(rate * 2^32).  So the result does not depend on the thread count or the
// blocking, the loop vectorises (no RNG state carried between elements), and the backward pass
// regenerates the same mask from (seed, counter) instead of storing one (dx = the same kernel
// on dy): no mask buffer to write, keep alive and read back.
// Dropped elements are 0 whatever x holds (NaN/Inf included), kept ones x / (1 - rate): the
// select of tf.nn.dropout and of Keras' torch/JAX dropout (where(mask, x / keep, 0)).
//
// Threads: OpenMP over blocks of DROPOUT_BLOCK consecutive elements; a thread owns its block's
// y[i] (index map: element i of the flat, C-contiguous buffer ↔ hash input i).
#pragma once

#include <cstdint>

namespace dlconv {
namespace cpu {

// Throws std::invalid_argument naming `rate` unless 0 < rate < 1 (rate == 0 is the caller's
// identity, and no kernel call).
void check_dropout_rate(double rate, const char* kernel);

// The keep threshold on a 32-bit draw for `rate` (exposed for the tests' expected fractions).
uint32_t dropout_threshold(double rate);

// keep[i] as the kernel computes it (1 kept, 0 dropped) — for tests; n elements.
void dropout_mask(int64_t n, double rate, uint64_t seed, uint64_t counter, uint8_t* mask);

// y[i] = keep[i] ? x[i] / float(1 - rate) : 0 for i < n; y may equal x (in place).
void dropout_forward(int64_t n, const float* x, double rate, uint64_t seed, uint64_t counter, float* y);

}  // namespace cpu
}  // namespace dlconv

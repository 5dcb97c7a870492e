/* What the CPU backend's two paged-attention kernels share (paged_decode.c, paged_prefill.c):
 * reading 16 cache elements (fp32 or bf16) as fp32, 16 exponentials at once, and where a
 * sequence's tokens lie in the cache. AVX-512 only; included inside the kernels' AVX-512
 * sections. */
#ifndef CROSSINFER_PAGED_H
#define CROSSINFER_PAGED_H
#include <immintrin.h>
#include <stdint.h>

#define NO_SCORE -1e30f /* below every real score; finite (-ffast-math assumes no infinities) */

/* 16 elements from element i of an fp32 or bf16 row, as fp32. */
static inline __m512 load16(const char *base, int64_t i, const int bf16)
{
    if (!bf16) return _mm512_loadu_ps((const float *)base + i);
    const __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)base + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* exp(x) for x <= 0: x = n ln2 + f with |f| <= ln2 / 2 (ln2 in two parts, so f is exact to
 * float precision), e^f by its Taylor series to f^6 (relative error below 2e-7), times 2^n. */
static inline __m512 exp16(__m512 x)
{
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f)); /* e^-87 ~ 1.6e-38, still a normal float */
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);
    f = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), f);
    __m512 e = _mm512_set1_ps(1.0f / 720);
    e = _mm512_fmadd_ps(e, f, _mm512_set1_ps(1.0f / 120));
    e = _mm512_fmadd_ps(e, f, _mm512_set1_ps(1.0f / 24));
    e = _mm512_fmadd_ps(e, f, _mm512_set1_ps(1.0f / 6));
    e = _mm512_fmadd_ps(e, f, _mm512_set1_ps(0.5f));
    e = _mm512_fmadd_ps(e, f, _mm512_set1_ps(1.0f));
    e = _mm512_fmadd_ps(e, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(e, n);
}

/* Byte offsets in the cache of tokens [start, start + n) of a sequence (block sizes are powers
 * of two), from the start of the keys (the same offsets from the start of the values). */
static inline void token_offsets(int64_t *offsets, const int32_t *table, int64_t start,
                                 int64_t n, int shift, int64_t token_bytes)
{
    const int64_t mask = ((int64_t)1 << shift) - 1;
    for (int64_t i = 0; i < n; i++) {
        const int64_t t = start + i;
        offsets[i] = ((((int64_t)table[t >> shift]) << shift) + (t & mask)) * token_bytes;
    }
}

#endif

/* The int8 GEMM of the CPU backend's W8A8 linear layer (int8.py) on AVX-512 VNNI, with the
 * dequantisation fused into its last step:
 *
 *     out[m, n] = (sum_k xq[m, k] * wq[n, k]) * x_scale[m] * w_scale[n] (+ bias[n])
 *
 * Why a kernel of our own: at decode sizes (32 rows) torch._int_mm runs at 250-480 GOPS on the
 * project's 2-core Zen 4 against 620-720 on 2048 rows (it packs the weight again on every
 * call); this kernel, on a weight packed once at load, runs at 540-690 at 32 rows and level
 * or ahead on 2048 (the table in benchmarks/RESULTS.md, 2026-12-02).
 *
 * VPDPBUSD multiplies 4 unsigned bytes by 4 signed bytes in each of 16 int32 lanes and adds
 * the 4 products to the lane. The weight is the unsigned side, stored as wq + 128 (1 .. 255),
 * and the activations the signed side, 4 bytes of a row broadcast to every lane (the broadcast
 * folds into the instruction's memory operand: measured 1.4x faster than the other way round,
 * where every step needs a separate broadcast). The extra 128 * sum_k xq[m, k] is taken off
 * each row's sums at the end (the row's sum, from quantize_row), so the int32 sums are exactly
 * the signed GEMM's (|partial sums| < 255 * 127 * k: no overflow below k = 66,000).
 *
 * The packed weight: for each block of 16 output columns, for each 4 consecutive k, one
 * 64-byte row, packed[n / 16][k / 4][16][4]. A register tile is up to MAX_ROWS rows x 4 blocks
 * (16 accumulators) over the whole k.
 *
 * The activations are quantised per row inside the same call (quantize.c's quantize_row, in
 * the same parallel region): one call from Python a layer. On a CPU with AMX, calls of enough
 * rows go to int8_amx.c, which reads the same packed weight.
 *
 * Built at run time by native.py with the other kernels. Without AVX-512 VNNI at compile time
 * int8_gemm_available() returns 0 and int8.py uses torch._int_mm.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ROWS_PER_CHUNK 96
#define MAX_ROWS 4
#define MAX_BLOCKS 4
#define UNSIGNED_OFFSET 128

#if defined(__AVX512VNNI__) && defined(__AVX512F__)
#include <immintrin.h>

int int8_gemm_available(void) { return 1; }

/* Rows [0, MR) x blocks [0, NB) of the output, over all of k. */
static inline __attribute__((always_inline)) void tile(
    float *out, int64_t out_stride, const int8_t *x, int64_t k, const float *x_scale,
    const int32_t *row_sums, const uint8_t *w, int64_t block_stride, const float *w_scale,
    const float *bias, const int MR, const int NB)
{
    __m512i acc[MAX_ROWS][MAX_BLOCKS];
    for (int r = 0; r < MR; r++)
        for (int b = 0; b < NB; b++) {
            acc[r][b] = _mm512_setzero_si512();
            /* An opaque zero: with a known one, gcc 12 copies every accumulator on each
             * step of the loop below (measured 0.75x). */
            __asm__("" : "+v"(acc[r][b]));
        }
    for (int64_t g = 0; g < k / 4; g++) {
        for (int b = 0; b < NB; b++) {
            const __m512i wv = _mm512_loadu_si512((const void *)(w + b * block_stride + g * 64));
            for (int r = 0; r < MR; r++) {
                int32_t four; /* x[r, 4g .. 4g + 3], broadcast by the instruction's operand */
                memcpy(&four, x + r * k + g * 4, 4);
                acc[r][b] = _mm512_dpbusd_epi32(acc[r][b], wv, _mm512_set1_epi32(four));
            }
        }
    }
    for (int r = 0; r < MR; r++) {
        const __m512i offset = _mm512_set1_epi32(row_sums[r] * UNSIGNED_OFFSET);
        const __m512 xs = _mm512_set1_ps(x_scale[r]);
        for (int b = 0; b < NB; b++) {
            __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][b], offset));
            v = _mm512_mul_ps(_mm512_mul_ps(v, xs), _mm512_loadu_ps(w_scale + b * 16));
            if (bias) v = _mm512_add_ps(v, _mm512_loadu_ps(bias + b * 16));
            _mm512_storeu_ps(out + r * out_stride + b * 16, v);
        }
    }
}

/* `blocks` (1 .. MAX_BLOCKS) blocks of columns over `rows` rows, in tiles of MAX_ROWS rows. */
static void panel(float *out, int64_t out_stride, const int8_t *x, int64_t k,
                  const float *x_scale, const int32_t *row_sums, int64_t rows, const uint8_t *w,
                  int64_t block_stride, const float *w_scale, const float *bias, int blocks)
{
    for (int64_t r = 0; r < rows; r += MAX_ROWS) {
        const int mr = rows - r < MAX_ROWS ? (int)(rows - r) : MAX_ROWS;
#define TILE(MR, NB)                                                                         \
    tile(out + r * out_stride, out_stride, x + r * k, k, x_scale + r, row_sums + r, w,       \
         block_stride, w_scale, bias, MR, NB)
#define ROW_CASES(NB)                                                                        \
    switch (mr) {                                                                            \
    case 4: TILE(4, NB); break;                                                              \
    case 3: TILE(3, NB); break;                                                              \
    case 2: TILE(2, NB); break;                                                              \
    default: TILE(1, NB); break;                                                             \
    }
        switch (blocks) {
        case 4: ROW_CASES(4); break;
        case 3: ROW_CASES(3); break;
        case 2: ROW_CASES(2); break;
        default: ROW_CASES(1); break;
        }
#undef ROW_CASES
#undef TILE
    }
}

float quantize_row(int8_t *q, const float *x, int64_t cols, int32_t *sum); /* quantize.c */
int int8_amx_wants(int64_t rows, int64_t k);                              /* int8_amx.c */
int int8_amx_linear(float *out, const float *x, int64_t x_stride, int64_t rows,
                    const uint8_t *w, const float *w_scale, const float *bias, int64_t n,
                    int64_t k, int num_threads);

/* out = the layer on x: out [rows, n] fp32 contiguous; x [rows, k] fp32, rows strided by
 * x_stride; w: packed [n / 16][k / 4][16][4] uint8 (wq + 128); w_scale, bias: [n] (bias may
 * be NULL). k % 4 == 0 and n % 16 == 0. One parallel region: the threads quantise the rows,
 * then each takes an even share of the column blocks (in panels of MAX_BLOCKS) for every
 * chunk of rows, so its part of the weight stays in its own cache. Returns -1 when the
 * scratch for the quantised rows cannot be allocated, else 0. */
int int8_linear(float *out, const float *x, int64_t x_stride, int64_t rows, const uint8_t *w,
                const float *w_scale, const float *bias, int64_t n, int64_t k, int num_threads)
{
    if (int8_amx_wants(rows, k))
        return int8_amx_linear(out, x, x_stride, rows, w, w_scale, bias, n, k, num_threads);
    int8_t *xq = malloc((size_t)(rows * k));
    float *x_scale = malloc(sizeof(float) * (size_t)rows);
    int32_t *row_sums = malloc(sizeof(int32_t) * (size_t)rows);
    if (xq == NULL || x_scale == NULL || row_sums == NULL) {
        free(xq), free(x_scale), free(row_sums);
        return -1;
    }
    const int64_t blocks = n / 16, block_stride = k * 16;
    const int64_t chunks = (rows + ROWS_PER_CHUNK - 1) / ROWS_PER_CHUNK;
    const int64_t parts = blocks < num_threads ? blocks : num_threads;
    const int64_t items = chunks * parts;
    const int threads = items < num_threads ? (int)items : num_threads;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++)
            x_scale[r] = quantize_row(xq + r * k, x + r * x_stride, k, row_sums + r);
#pragma omp for schedule(static)
        for (int64_t item = 0; item < items; item++) {
            const int64_t part = item / chunks, chunk = item % chunks; /* a thread keeps its part */
            const int64_t r0 = chunk * ROWS_PER_CHUNK;
            const int64_t chunk_rows = rows - r0 < ROWS_PER_CHUNK ? rows - r0 : ROWS_PER_CHUNK;
            const int64_t b_end = blocks * (part + 1) / parts;
            for (int64_t b0 = blocks * part / parts; b0 < b_end; b0 += MAX_BLOCKS) {
                const int nb = b_end - b0 < MAX_BLOCKS ? (int)(b_end - b0) : MAX_BLOCKS;
                const int64_t c0 = b0 * 16;
                panel(out + r0 * n + c0, n, xq + r0 * k, k, x_scale + r0, row_sums + r0,
                      chunk_rows, w + b0 * block_stride, block_stride, w_scale + c0,
                      bias ? bias + c0 : NULL, nb);
            }
        }
    }
    free(xq), free(x_scale), free(row_sums);
    return 0;
}

#else

int int8_gemm_available(void) { return 0; }

int int8_linear(float *out, const float *x, int64_t x_stride, int64_t rows, const uint8_t *w,
                const float *w_scale, const float *bias, int64_t n, int64_t k, int num_threads)
{
    (void)out, (void)x, (void)x_stride, (void)rows, (void)w, (void)w_scale, (void)bias;
    (void)n, (void)k, (void)num_threads;
    return -1;
}

#endif

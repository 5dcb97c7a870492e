/* The int8 GEMM of the CPU backend's W8A8 linear layer on AMX, Intel's tile unit (Sapphire
 * Rapids and later), over the same packed weight as int8_gemm.c and with the same arithmetic:
 *
 *     out[m, n] = (sum_k xq[m, k] * wq[n, k]) * x_scale[m] * w_scale[n] (+ bias[n])
 *
 * int8_gemm.c's int8_linear hands a call here when AMX is on (int8_amx_enable), the layer's
 * k is a multiple of 64 and there are at least AMX_MIN_ROWS rows; its VPDPBUSD loop does
 * the rest. Why: TDPBSUD multiplies a 16 x 64 tile of signed bytes by a 64 x 16 tile of
 * unsigned ones into 16 x 16 int32 sums in one instruction, 16 times the work of a VPDPBUSD.
 * Measured on the project's 2-core AMX Xeon (benchmarks/RESULTS.md).
 *
 * Tiles: the activations' A tiles are 16 quantised rows x 64 k (row stride k); the weight's B
 * tiles are 16 groups of 4 k x 16 columns, which is exactly 1 KB of int8_gemm.c's packed
 * layout packed[n / 16][k / 4][16][4] (row stride 64 bytes): no second copy of the weight.
 * The weight is stored unsigned (wq + 128), so TDPBSUD's sums carry an extra
 * 128 * sum_k xq[m, k], taken off at the end as int8_gemm.c does. A register block is 2 x 2
 * tiles of sums (32 rows x 32 columns) fed by 2 A and 2 B tiles: all 8 tile registers.
 *
 * Linux hands the tile state only to a process that asks for it (arch_prctl); the threads
 * each load the tile configuration and release the tiles when done.
 */
#define _GNU_SOURCE /* syscall() */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

float quantize_row(int8_t *q, const float *x, int64_t cols, int32_t *sum); /* quantize.c */

/* Fewer rows run int8_gemm.c's loop: SmolLM2-135M's five layer shapes, interleaved, AMX
 * against VNNI: 1 row 0.95x, 4 rows 0.97x, 8 rows 1.23x, 16 rows 1.72x, 32 rows 2.24x. */
#define AMX_MIN_ROWS 8
#define CHUNK_BYTES (1 << 20) /* quantised rows a chunk: half the L2 of the cores measured on */
#define UNSIGNED_OFFSET 128

#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AVX512F__) && defined(__linux__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

static int amx_on = 0;

/* Ask the kernel for the tile state (once is enough for the process; asking again is
 * harmless) when wanted; returns whether AMX is on. */
int int8_amx_enable(int wanted)
{
    amx_on = wanted && syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
    return amx_on;
}

int int8_amx_wants(int64_t rows, int64_t k) { return amx_on && rows >= AMX_MIN_ROWS && k % 64 == 0; }

struct tile_config {
    uint8_t palette, start_row, reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
};

/* Every tile 16 rows x 64 bytes: sums 16 x 16 int32, A 16 x 64 int8, B 16 x (16 x 4). */
static void configure_tiles(void)
{
    struct tile_config config;
    memset(&config, 0, sizeof config);
    config.palette = 1;
    for (int t = 0; t < 8; t++) config.rows[t] = 16, config.bytes_per_row[t] = 64;
    _tile_loadconfig(&config);
}

/* sums[32][32] (int32, row stride 32) = 32 rows of xq (16 when RT == 1) against 32 columns
 * (two packed blocks w0, w1; one when CB == 1) over all of k. Tiles 0..3 hold the sums
 * (row tile r, column block b: tile 2r + b), 4..5 the rows, 6..7 the blocks. */
static inline __attribute__((always_inline)) void block(int32_t *sums, const int8_t *xq,
                                                        int64_t k, const uint8_t *w0,
                                                        const uint8_t *w1, const int RT,
                                                        const int CB)
{
    _tile_zero(0);
    if (CB == 2) _tile_zero(1);
    if (RT == 2) _tile_zero(2);
    if (RT == 2 && CB == 2) _tile_zero(3);
    for (int64_t k0 = 0; k0 < k; k0 += 64) {
        _tile_loadd(4, xq + k0, k);
        _tile_loadd(6, w0 + k0 * 16, 64); /* groups k0 / 4 .. k0 / 4 + 15 of the block */
        _tile_dpbsud(0, 4, 6);
        if (CB == 2) {
            _tile_loadd(7, w1 + k0 * 16, 64);
            _tile_dpbsud(1, 4, 7);
        }
        if (RT == 2) {
            _tile_loadd(5, xq + 16 * k + k0, k);
            _tile_dpbsud(2, 5, 6);
            if (CB == 2) _tile_dpbsud(3, 5, 7);
        }
    }
    _tile_stored(0, sums, 128);
    if (CB == 2) _tile_stored(1, sums + 16, 128);
    if (RT == 2) _tile_stored(2, sums + 16 * 32, 128);
    if (RT == 2 && CB == 2) _tile_stored(3, sums + 16 * 32 + 16, 128);
}

/* out rows [0, rows) x columns [0, 16 * CB) from the block's sums: the unsigned offset off,
 * then the row and column scales and the bias. */
static void dequantize(float *out, int64_t out_stride, const int32_t *sums, int64_t rows,
                       int blocks, const float *x_scale, const int32_t *row_sums,
                       const float *w_scale, const float *bias)
{
    for (int64_t r = 0; r < rows; r++) {
        const __m512i offset = _mm512_set1_epi32(row_sums[r] * UNSIGNED_OFFSET);
        const __m512 xs = _mm512_set1_ps(x_scale[r]);
        for (int b = 0; b < blocks; b++) {
            const __m512i acc = _mm512_loadu_si512((const void *)(sums + r * 32 + 16 * b));
            __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc, offset));
            v = _mm512_mul_ps(_mm512_mul_ps(v, xs), _mm512_loadu_ps(w_scale + 16 * b));
            if (bias) v = _mm512_add_ps(v, _mm512_loadu_ps(bias + 16 * b));
            _mm512_storeu_ps(out + r * out_stride + 16 * b, v);
        }
    }
}

/* int8_linear's contract (int8_gemm.c), k % 64 == 0. The quantised rows are padded with zero
 * rows to a multiple of 32 so every A tile is whole; the padding's sums are never written. */
int int8_amx_linear(float *out, const float *x, int64_t x_stride, int64_t rows,
                    const uint8_t *w, const float *w_scale, const float *bias, int64_t n,
                    int64_t k, int num_threads)
{
    const int64_t padded = (rows + 31) / 32 * 32;
    int8_t *xq = malloc((size_t)(padded * k));
    float *x_scale = malloc(sizeof(float) * (size_t)rows);
    int32_t *row_sums = malloc(sizeof(int32_t) * (size_t)rows);
    if (xq == NULL || x_scale == NULL || row_sums == NULL) {
        free(xq), free(x_scale), free(row_sums);
        return -1;
    }
    memset(xq + rows * k, 0, (size_t)((padded - rows) * k));
    const int64_t blocks = n / 16, block_stride = k * 16;
    /* A chunk of rows stays in L2 while a thread's column pairs pass over it, each pair's
     * weight in L1 for the whole chunk: at 2048 rows, 1 MB of rows measured ahead of 128 rows
     * (k = 576: 7.2 against 8.5 ms for SmolLM2's four layers) and level at k = 4096. */
    int64_t chunk_rows = CHUNK_BYTES / k / 32 * 32;
    if (chunk_rows < 32) chunk_rows = 32;
    const int64_t chunks = (rows + chunk_rows - 1) / chunk_rows;
    /* each thread an even share of the column pairs, so its part of the weight stays in its
     * own cache over every chunk of rows */
    const int64_t pairs = (blocks + 1) / 2;
    const int64_t parts = pairs < num_threads ? pairs : num_threads;
    const int64_t items = chunks * parts;
    const int threads = items < num_threads ? (int)items : num_threads;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++)
            x_scale[r] = quantize_row(xq + r * k, x + r * x_stride, k, row_sums + r);
        configure_tiles();
        int32_t sums[32 * 32] __attribute__((aligned(64)));
#pragma omp for schedule(static)
        for (int64_t item = 0; item < items; item++) {
            const int64_t part = item / chunks, chunk = item % chunks;
            const int64_t r_end = rows < (chunk + 1) * chunk_rows ? rows : (chunk + 1) * chunk_rows;
            const int64_t b_end = pairs * (part + 1) / parts * 2;
            for (int64_t b0 = pairs * part / parts * 2; b0 < b_end && b0 < blocks; b0 += 2) {
                const int cb = blocks - b0 >= 2 ? 2 : 1;
                const uint8_t *w0 = w + b0 * block_stride, *w1 = w0 + block_stride;
                for (int64_t r0 = chunk * chunk_rows; r0 < r_end; r0 += 32) {
                    const int64_t live = r_end - r0 < 32 ? r_end - r0 : 32;
                    const int8_t *a = xq + r0 * k;
                    if (live > 16) {
                        if (cb == 2) block(sums, a, k, w0, w1, 2, 2);
                        else block(sums, a, k, w0, w1, 2, 1);
                    } else {
                        if (cb == 2) block(sums, a, k, w0, w1, 1, 2);
                        else block(sums, a, k, w0, w1, 1, 1);
                    }
                    dequantize(out + r0 * n + b0 * 16, n, sums, live, cb, x_scale + r0,
                               row_sums + r0, w_scale + b0 * 16, bias ? bias + b0 * 16 : NULL);
                }
            }
        }
        _tile_release();
    }
    free(xq), free(x_scale), free(row_sums);
    return 0;
}

#else

int int8_amx_enable(int wanted)
{
    (void)wanted;
    return 0;
}

int int8_amx_wants(int64_t rows, int64_t k)
{
    (void)rows, (void)k;
    return 0;
}

int int8_amx_linear(float *out, const float *x, int64_t x_stride, int64_t rows,
                    const uint8_t *w, const float *w_scale, const float *bias, int64_t n,
                    int64_t k, int num_threads)
{
    (void)out, (void)x, (void)x_stride, (void)rows, (void)w, (void)w_scale, (void)bias;
    (void)n, (void)k, (void)num_threads;
    return -1;
}

#endif

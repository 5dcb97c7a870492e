/* Prefill attention read in place from the paged KV cache (fp32 or bf16), for the CPU backend:
 * causal, grouped-query, over a ragged batch of sequences each adding q_len tokens after
 * seq_len - q_len cached ones (a whole prompt, a chunk of one, or a prompt after a cached
 * prefix). AVX-512, head sizes a multiple of 16 up to 256, power-of-two blocks; attention.py
 * takes other shapes through scaled_dot_product_attention.
 *
 * A task is (sequence, KV head, 16 query tokens): its rows are those tokens' query heads of
 * that KV head (16 x group rows). The keys are walked in tiles of 16, up to the last query
 * token's position, with a running (online) softmax per row:
 *   scores: the tile's keys are transposed once into [head_size][16] (bf16 widened there), so
 *           the scores of 8 rows x 16 keys are 8 accumulators over head_size broadcast FMAs,
 *           not a dot product and a horizontal sum per pair;
 *   mask:   a key after a row's own position scores nothing (tiles wholly past every row are
 *           never read: the causal half of the work is skipped);
 *   values: the rows' sums (in L1 scratch) are rescaled and take the tile's values, read in
 *           place, in blocks of rows x head_size / 16 accumulators that stay in registers
 *           over the tile.
 * In PyTorch the same step gathers each sequence's blocks into a dense copy, widens it, and
 * runs scaled_dot_product_attention under a mask that computes the masked half anyway.
 *
 * Built at run time by native.py with the other kernels.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define QUERY_TILE 16  /* query tokens a task */
#define KEY_TILE 16    /* keys a tile: one score per lane */
#define MAX_HEAD 256

#if defined(__AVX512F__)
#include "paged.h"

struct prefill {
    float *out;
    int64_t out_row_stride;
    const float *query;
    int64_t query_row_stride;
    const char *keys, *values; /* fp32 or bf16 elements */
    int64_t block_size, num_kv_heads, group, head_size;
    float scale;
};

/* The scratch of one thread: a task's row sums and softmax state, the transposed key tile,
 * the tile's weights. */
struct scratch {
    float *q;       /* [rows][head_size]: the task's query rows, scaled, side by side */
    float *sums;    /* [rows][head_size], 64-byte aligned */
    float *top;     /* [rows] */
    float *total;   /* [rows] */
    float *weights; /* [rows][KEY_TILE] */
    float *keys_t;  /* [head_size][KEY_TILE] */
};

/* acc[r] = the scores of 8 rows q (head_size apart) against the transposed tile's 16 keys. */
static inline __attribute__((always_inline)) void score_rows(__m512 acc[8], const float *q,
                                                             const float *keys_t,
                                                             const int64_t head_size)
{
    for (int r = 0; r < 8; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t d = 0; d < head_size; d++) {
        const __m512 k = _mm512_load_ps(keys_t + d * KEY_TILE);
        for (int r = 0; r < 8; r++)
            acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(q[r * head_size + d]), k, acc[r]);
    }
}

/* sums[r] = sums[r] * rescale[r] + weights[r] . V for R rows, the n values at `at`. */
static inline __attribute__((always_inline)) void value_rows(
    float *sums, const float *weights, const float *rescale, const char *values,
    const int64_t *at, int64_t n, const int64_t head_size, const int bf16, const int R)
{
    const int64_t chunks = head_size / 16;
    __m512 acc[4][4];
    for (int64_t c0 = 0; c0 < chunks; c0 += 4) { /* 4 chunks (64 columns) of the head at once */
        const int64_t cn = chunks - c0 < 4 ? chunks - c0 : 4;
        for (int r = 0; r < R; r++)
            for (int64_t c = 0; c < cn; c++)
                acc[r][c] = _mm512_mul_ps(_mm512_load_ps(sums + r * head_size + 16 * (c0 + c)),
                                          _mm512_set1_ps(rescale[r]));
        for (int64_t t = 0; t < n; t++) {
            __m512 v[4];
            for (int64_t c = 0; c < cn; c++) v[c] = load16(values + at[t], 16 * (c0 + c), bf16);
            for (int r = 0; r < R; r++) {
                const __m512 w = _mm512_set1_ps(weights[r * KEY_TILE + t]);
                for (int64_t c = 0; c < cn; c++) acc[r][c] = _mm512_fmadd_ps(w, v[c], acc[r][c]);
            }
        }
        for (int r = 0; r < R; r++)
            for (int64_t c = 0; c < cn; c++)
                _mm512_store_ps(sums + r * head_size + 16 * (c0 + c), acc[r][c]);
    }
}

/* One task: query tokens [q0, q0 + nq) of a sequence (first query row `row0` in the batch,
 * the first at position `first`), KV head h. */
static inline __attribute__((always_inline)) void prefill_task(
    const struct prefill *p, const int32_t *table, int64_t row0, int64_t first, int64_t q0,
    int64_t nq, int64_t h, struct scratch *w, const int64_t head_size, const int bf16)
{
    const int64_t esize = bf16 ? 2 : 4, group = p->group, rows = nq * group;
    const int64_t token_bytes = p->num_kv_heads * head_size * esize;
    const int shift = __builtin_ctzll((unsigned long long)p->block_size);
    const char *keys = p->keys + h * head_size * esize, *values = p->values + h * head_size * esize;
    /* row r = token j (r / group), query head h * group + g (r % group); the rows are copied
     * side by side (and scaled) so 8 of them score a tile together; 8 rows past the last are
     * zero so the last block of 8 needs no case of its own */
    const float *q = p->query + (row0 + q0) * p->query_row_stride + h * group * head_size;
    for (int64_t r = 0; r < rows; r++) {
        const float *qr = q + (r / group) * p->query_row_stride + (r % group) * head_size;
        for (int64_t d = 0; d < head_size; d++) w->q[r * head_size + d] = qr[d] * p->scale;
        memset(w->sums + r * head_size, 0, sizeof(float) * head_size);
        w->top[r] = NO_SCORE, w->total[r] = 0.0f;
    }
    memset(w->q + rows * head_size, 0, sizeof(float) * 8 * head_size);
    const int64_t last = first + q0 + nq - 1; /* the last row's position: keys [0, last] */
    int64_t at[KEY_TILE];
    float rescale[8];
    for (int64_t k0 = 0; k0 <= last; k0 += KEY_TILE) {
        const int64_t n = last + 1 - k0 < KEY_TILE ? last + 1 - k0 : KEY_TILE;
        token_offsets(at, table, k0, n, shift, token_bytes);
        for (int64_t c = 0; c < head_size / 16; c++) { /* transpose: keys_t[d][t] = k_t[d] */
            float block[KEY_TILE][16] __attribute__((aligned(64)));
            for (int64_t t = 0; t < KEY_TILE; t++)
                _mm512_store_ps(block[t], t < n ? load16(keys + at[t], 16 * c, bf16)
                                                : _mm512_setzero_ps());
            for (int64_t d = 0; d < 16; d++)
                for (int64_t t = 0; t < KEY_TILE; t++)
                    w->keys_t[(16 * c + d) * KEY_TILE + t] = block[t][d];
        }
        for (int64_t r0 = 0; r0 < rows; r0 += 8) {
            const int64_t rn = rows - r0 < 8 ? rows - r0 : 8;
            __m512 acc[8];
            score_rows(acc, w->q + r0 * head_size, w->keys_t, head_size);
            for (int64_t r = r0; r < r0 + rn; r++) {
                const int64_t pos = first + q0 + r / group; /* this row's token position */
                const int64_t live = pos + 1 - k0 < n ? pos + 1 - k0 : n;
                const __mmask16 valid = live <= 0 ? 0 : (__mmask16)((1u << live) - 1);
                const __m512 s = _mm512_mask_mov_ps(_mm512_set1_ps(NO_SCORE), valid, acc[r - r0]);
                const float top = fmaxf(w->top[r], _mm512_reduce_max_ps(s));
                const float factor = w->top[r] == top ? 1.0f : expf(w->top[r] - top);
                const __m512 e = _mm512_maskz_mov_ps(valid, exp16(_mm512_sub_ps(s, _mm512_set1_ps(top))));
                w->total[r] = w->total[r] * factor + _mm512_reduce_add_ps(e);
                w->top[r] = top;
                rescale[r - r0] = factor;
                _mm512_store_ps(w->weights + (r - r0) * KEY_TILE, e);
            }
            for (int64_t r = r0; r < r0 + rn; r += 4) {
                const int64_t m = r0 + rn - r < 4 ? r0 + rn - r : 4;
                float *sums = w->sums + r * head_size;
                const float *wt = w->weights + (r - r0) * KEY_TILE;
                const float *rs = rescale + (r - r0);
                switch (m) {
                case 4: value_rows(sums, wt, rs, values, at, n, head_size, bf16, 4); break;
                case 3: value_rows(sums, wt, rs, values, at, n, head_size, bf16, 3); break;
                case 2: value_rows(sums, wt, rs, values, at, n, head_size, bf16, 2); break;
                default: value_rows(sums, wt, rs, values, at, n, head_size, bf16, 1); break;
                }
            }
        }
    }
    for (int64_t r = 0; r < rows; r++) {
        const int64_t j = r / group, g = r % group;
        float *o = p->out + (row0 + q0 + j) * p->out_row_stride + (h * group + g) * head_size;
        const float inv = 1.0f / w->total[r];
        for (int64_t d = 0; d < head_size; d++) o[d] = w->sums[r * head_size + d] * inv;
    }
}

int paged_prefill_available(void) { return 1; }

/* out[rows] = causal attention of each sequence's query rows over its cache. Sequence s adds
 * query_lens[s] tokens at query rows first_rows[s] ..; it holds seq_lens[s] tokens, the
 * added ones last. out, query: [rows, num_heads * head_size] with row strides. Returns -1
 * when the scratch cannot be allocated, -2 for a shape the kernel does not take. */
int paged_prefill_attention(
    float *out, int64_t out_row_stride, const float *query, int64_t query_row_stride,
    const int64_t *first_rows, const int32_t *query_lens, const void *cache, int cache_bf16,
    int64_t num_blocks, int64_t block_size, int64_t num_kv_heads, int64_t head_size,
    int64_t num_heads, const int32_t *block_table, int64_t block_table_stride,
    const int32_t *seq_lens, int64_t num_seqs, float scale, int num_threads)
{
    if (head_size % 16 != 0 || head_size > MAX_HEAD || (block_size & (block_size - 1)) != 0)
        return -2;
    const int64_t group = num_heads / num_kv_heads;
    const int64_t esize = cache_bf16 ? 2 : 4;
    const char *keys = cache;
    const char *values = keys + num_blocks * block_size * num_kv_heads * head_size * esize;
    const struct prefill p = {out, out_row_stride, query, query_row_stride, keys, values,
                              block_size, num_kv_heads, group, head_size, scale};
    /* tasks (sequence, query tile, KV head), each sequence's later tiles (longer contexts)
     * first, so the dynamic schedule ends on short ones */
    int64_t num_tasks = 0;
    for (int64_t s = 0; s < num_seqs; s++)
        num_tasks += (query_lens[s] + QUERY_TILE - 1) / QUERY_TILE * num_kv_heads;
    int64_t(*tasks)[3] = malloc(sizeof(int64_t[3]) * (size_t)(num_tasks > 0 ? num_tasks : 1));
    if (tasks == NULL) return -1;
    for (int64_t s = 0, t = 0; s < num_seqs; s++)
        for (int64_t tile = (query_lens[s] + QUERY_TILE - 1) / QUERY_TILE - 1; tile >= 0; tile--)
            for (int64_t h = 0; h < num_kv_heads; h++, t++)
                tasks[t][0] = s, tasks[t][1] = tile, tasks[t][2] = h;
    int failed = 0;
#pragma omp parallel num_threads(num_threads)
    {
        const int64_t rows = QUERY_TILE * group;
        struct scratch w;
        w.q = aligned_alloc(64, sizeof(float) * (size_t)((rows + 8) * head_size));
        w.sums = aligned_alloc(64, sizeof(float) * (size_t)(rows * head_size));
        w.top = malloc(sizeof(float) * (size_t)rows);
        w.total = malloc(sizeof(float) * (size_t)rows);
        w.weights = aligned_alloc(64, sizeof(float) * 8 * KEY_TILE);
        w.keys_t = aligned_alloc(64, sizeof(float) * (size_t)(head_size * KEY_TILE));
        if (!w.q || !w.sums || !w.top || !w.total || !w.weights || !w.keys_t) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < num_tasks; t++) {
            if (failed) continue;
            const int64_t s = tasks[t][0], q0 = tasks[t][1] * QUERY_TILE, h = tasks[t][2];
            const int64_t nq = query_lens[s] - q0 < QUERY_TILE ? query_lens[s] - q0 : QUERY_TILE;
            const int32_t *table = block_table + s * block_table_stride;
            const int64_t first = seq_lens[s] - query_lens[s];
#define TASK(HS, BF16) prefill_task(&p, table, first_rows[s], first, q0, nq, h, &w, HS, BF16)
            if (cache_bf16) {
                if (head_size == 64) TASK(64, 1);
                else if (head_size == 128) TASK(128, 1);
                else TASK(head_size, 1);
            } else {
                if (head_size == 64) TASK(64, 0);
                else if (head_size == 128) TASK(128, 0);
                else TASK(head_size, 0);
            }
#undef TASK
        }
        free(w.q), free(w.sums), free(w.top), free(w.total), free(w.weights), free(w.keys_t);
    }
    free(tasks);
    return failed ? -1 : 0;
}

#else

int paged_prefill_available(void) { return 0; }

int paged_prefill_attention(
    float *out, int64_t out_row_stride, const float *query, int64_t query_row_stride,
    const int64_t *first_rows, const int32_t *query_lens, const void *cache, int cache_bf16,
    int64_t num_blocks, int64_t block_size, int64_t num_kv_heads, int64_t head_size,
    int64_t num_heads, const int32_t *block_table, int64_t block_table_stride,
    const int32_t *seq_lens, int64_t num_seqs, float scale, int num_threads)
{
    (void)out, (void)out_row_stride, (void)query, (void)query_row_stride, (void)first_rows;
    (void)query_lens, (void)cache, (void)cache_bf16, (void)num_blocks, (void)block_size;
    (void)num_kv_heads, (void)head_size, (void)num_heads, (void)block_table;
    (void)block_table_stride, (void)seq_lens, (void)num_seqs, (void)scale, (void)num_threads;
    return -2;
}

#endif

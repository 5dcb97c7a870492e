/* Decode attention read in place from the paged KV cache (fp32 or bf16), for the CPU backend.
 *
 * One query token per sequence. The cache of one layer is
 * [2, num_blocks, block_size, num_kv_heads, head_size], contiguous: keys, then values.
 * A task is a sequence (or one KV head of it, when there are too few sequences to keep every
 * thread busy). Keys and values are read once each, where they lie, through the block table;
 * the PyTorch path gathers them into a dense copy first, which triples the memory traffic. A
 * bf16 cache (--kv-cache-dtype bfloat16) halves what is read; each element is widened to fp32
 * as it is loaded (bf16 is the top half of an fp32), the arithmetic is fp32.
 *
 * With AVX-512 (head sizes that are a multiple of 16, up to 128) the query heads of a KV head
 * walk the sequence in tiles of 16 tokens, keys and values of a tile together, with a running
 * (online) softmax: the 16 scores of a query row come out of one tree of shuffles (sum16)
 * instead of a horizontal sum per dot product, the exponentials are taken 16 at a time, the
 * value sums stay in registers over the whole sequence, and the next tile's keys and values
 * are prefetched while this one is computed (the blocks of a sequence lie anywhere in the
 * cache, so the hardware prefetcher alone loses the stream at every block boundary).
 * Elsewhere a plain two-pass loop (scores, softmax, weighted values) does the same sums.
 *
 * Built at run time by native.py (-O3 -ffast-math -march=native -fopenmp) and linked against
 * the OpenMP runtime torch has already loaded, so both share one thread pool.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

struct problem {
    float *out;
    int64_t out_row_stride;
    const float *query;
    int64_t query_row_stride;
    const int64_t *rows;
    const char *keys, *values; /* fp32 or bf16 elements */
    int64_t block_size, num_kv_heads, group;
    const int32_t *block_table;
    int64_t block_table_stride;
    const int32_t *seq_lens;
    float scale;
};

static inline float widen(const char *base, int64_t i, const int bf16)
{
    if (!bf16) return ((const float *)base)[i];
    const uint32_t bits = (uint32_t)((const uint16_t *)base)[i] << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Query rows r of KV heads [h0, h1) of sequence s in two passes: scores[r][t] for every
 * token, their softmax, then the weighted sum of the values. Any head size and element type. */
static void attend_two_pass(const struct problem *p, int64_t s, int64_t h0, int64_t h1,
                            int64_t head_size, const int bf16, float *restrict scores,
                            float *restrict acc)
{
    const int64_t esize = bf16 ? 2 : 4;
    const int64_t group = p->group, len = p->seq_lens[s], block_size = p->block_size;
    const int64_t rows = (h1 - h0) * group;
    const int64_t token_stride = p->num_kv_heads * head_size;
    const int32_t *table = p->block_table + s * p->block_table_stride;
    const float *restrict q = p->query + p->rows[s] * p->query_row_stride + h0 * group * head_size;
    for (int64_t t = 0; t < len; t++) {
        const int64_t token = table[t / block_size] * block_size + t % block_size;
        const char *k = p->keys + (token * token_stride + h0 * head_size) * esize;
        for (int64_t r = 0; r < rows; r++) {
            const char *kh = k + (r / group) * head_size * esize;
            float dot = 0.0f;
            for (int64_t d = 0; d < head_size; d++) dot += q[r * head_size + d] * widen(kh, d, bf16);
            scores[r * len + t] = dot * p->scale;
        }
    }
    for (int64_t i = 0; i < rows * head_size; i++) acc[i] = 0.0f;
    for (int64_t r = 0; r < rows; r++) {
        float *restrict row = scores + r * len;
        float top = row[0], sum = 0.0f;
        for (int64_t t = 1; t < len; t++) top = row[t] > top ? row[t] : top;
        for (int64_t t = 0; t < len; t++) sum += row[t] = expf(row[t] - top);
        for (int64_t t = 0; t < len; t++) row[t] /= sum;
    }
    for (int64_t t = 0; t < len; t++) {
        const int64_t token = table[t / block_size] * block_size + t % block_size;
        const char *v = p->values + (token * token_stride + h0 * head_size) * esize;
        for (int64_t r = 0; r < rows; r++) {
            const char *vh = v + (r / group) * head_size * esize;
            const float w = scores[r * len + t];
            for (int64_t d = 0; d < head_size; d++) acc[r * head_size + d] += w * widen(vh, d, bf16);
        }
    }
    float *restrict o = p->out + p->rows[s] * p->out_row_stride + h0 * group * head_size;
    for (int64_t i = 0; i < rows * head_size; i++) o[i] = acc[i];
}

/* The running state of one query row: its value sums, the largest score so far (the sums
 * and the total are scaled by exp(-top)) and the total of the weights. */
struct row_state {
    float *sums; /* head_size floats, 64-byte aligned */
    float top, total;
};

#if defined(__AVX512F__)
#include "paged.h"
#define TILE 16       /* tokens a tile: one score per lane */
#define MAX_CHUNKS 8  /* 16-float chunks of a head: head sizes up to 128 */
#define MAX_VECTORS 16 /* value sums kept in registers: rows x chunks */

/* The horizontal sums of 16 vectors, in two steps so that only 4 of them are live at a time:
 * quarter() folds vectors 4j .. 4j + 3 into u[j] (128-bit lane L, element i: the sum over
 * lane L of vector 4j + i), finish() adds the lanes, giving lane t = the sum of vector t. 45
 * instructions for 16 dot products, where a horizontal sum each takes about 8. */
static inline __m512 quarter(const __m512 w[4])
{
    const __m512 a = _mm512_add_ps(_mm512_unpacklo_ps(w[0], w[1]), _mm512_unpackhi_ps(w[0], w[1]));
    const __m512 b = _mm512_add_ps(_mm512_unpacklo_ps(w[2], w[3]), _mm512_unpackhi_ps(w[2], w[3]));
    return _mm512_add_ps(_mm512_shuffle_ps(a, b, _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(a, b, _MM_SHUFFLE(3, 2, 3, 2)));
}

static inline __m512 finish(const __m512 u[4])
{
    const __m512 x0 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                    _mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(3, 1, 3, 1)));
    const __m512 x1 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                    _mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(x0, x1, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(x0, x1, _MM_SHUFFLE(3, 1, 3, 1)));
}

static inline void prefetch_tokens(const char *keys, const char *values, const int64_t *offsets,
                                   int64_t n, int64_t span)
{
    for (int64_t i = 0; i < n; i++)
        for (int64_t b = 0; b < span; b += 64) {
            __builtin_prefetch(keys + offsets[i] + b, 0, 3);
            __builtin_prefetch(values + offsets[i] + b, 0, 3);
        }
}

/* One tile of n tokens (byte offsets `at` from keys / values, this KV head's first element)
 * for R query rows of one KV head, q: R rows head_size apart. */
static inline __attribute__((always_inline)) void tile_step(
    const struct problem *p, const char *keys, const char *values, const int64_t *at,
    int64_t n, const float *q, struct row_state *state, const int64_t head_size,
    const int bf16, const int R)
{
    const int64_t chunks = head_size / 16;
    const __mmask16 valid = (__mmask16)((1u << n) - 1);
    float weights[4][TILE], rescale[4];
    /* bf16 keys are widened once a tile when more than one row reads them */
    float widened[TILE * 16 * MAX_CHUNKS] __attribute__((aligned(64)));
    int64_t local[TILE];
    const int kbf16 = bf16 && R == 1;
    const char *kbase = keys;
    const int64_t *kat = at;
    if (bf16 && R > 1) {
        for (int64_t i = 0; i < n; i++) {
            for (int64_t c = 0; c < chunks; c++)
                _mm512_store_ps(widened + i * head_size + 16 * c, load16(keys + at[i], 16 * c, 1));
            local[i] = i * head_size * 4;
        }
        kbase = (const char *)widened;
        kat = local;
    }
    for (int r = 0; r < R; r++) {
        __m512 qr[MAX_CHUNKS], u[4]; /* the query row stays in registers over the tile */
        for (int64_t c = 0; c < chunks; c++) qr[c] = _mm512_loadu_ps(q + r * head_size + 16 * c);
        for (int j = 0; j < 4; j++) {
            __m512 part[4];
            for (int t = 0; t < 4; t++) {
                part[t] = _mm512_setzero_ps();
                if (4 * j + t < n) {
                    const char *k = kbase + kat[4 * j + t];
                    for (int64_t c = 0; c < chunks; c++)
                        part[t] = _mm512_fmadd_ps(qr[c], load16(k, 16 * c, kbf16), part[t]);
                }
            }
            u[j] = quarter(part);
        }
        const __m512 scores = _mm512_mask_mov_ps(
            _mm512_set1_ps(NO_SCORE), valid, _mm512_mul_ps(finish(u), _mm512_set1_ps(p->scale)));
        struct row_state *st = state + r;
        const float top = fmaxf(st->top, _mm512_reduce_max_ps(scores));
        rescale[r] = st->top == top ? 1.0f : expf(st->top - top);
        const __m512 w =
            _mm512_maskz_mov_ps(valid, exp16(_mm512_sub_ps(scores, _mm512_set1_ps(top))));
        st->total = st->total * rescale[r] + _mm512_reduce_add_ps(w);
        st->top = top;
        _mm512_storeu_ps(weights[r], w);
    }
    __m512 acc[4][MAX_CHUNKS];
    for (int r = 0; r < R; r++)
        for (int64_t c = 0; c < chunks; c++)
            acc[r][c] = _mm512_mul_ps(_mm512_load_ps(state[r].sums + 16 * c),
                                      _mm512_set1_ps(rescale[r]));
    for (int64_t i = 0; i < n; i++) {
        const char *v = values + at[i];
        __m512 vv[MAX_CHUNKS];
        for (int64_t c = 0; c < chunks; c++) vv[c] = load16(v, 16 * c, bf16);
        for (int r = 0; r < R; r++) {
            const __m512 w = _mm512_set1_ps(weights[r][i]);
            for (int64_t c = 0; c < chunks; c++) acc[r][c] = _mm512_fmadd_ps(w, vv[c], acc[r][c]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int64_t c = 0; c < chunks; c++) _mm512_store_ps(state[r].sums + 16 * c, acc[r][c]);
}

/* KV heads [h0, h1) of sequence s: tile by tile, every head's query rows on each tile (R at a
 * time, as many as keep their value sums in registers), so a tile's keys and values are read
 * as whole token rows while the next tile's are prefetched. state: a row_state per query row
 * of the task. */
static inline __attribute__((always_inline)) void attend_tiles(
    const struct problem *p, int64_t s, int64_t h0, int64_t h1, const int64_t head_size,
    const int bf16, struct row_state *state)
{
    const int64_t esize = bf16 ? 2 : 4, group = p->group, len = p->seq_lens[s];
    const int64_t token_bytes = p->num_kv_heads * head_size * esize;
    const int64_t head_bytes = head_size * esize, rows = (h1 - h0) * group;
    const int shift = __builtin_ctzll((unsigned long long)p->block_size);
    const int32_t *table = p->block_table + s * p->block_table_stride;
    const int64_t most = MAX_VECTORS / (head_size / 16);
    const int64_t per_pass = group < most ? group : most > 4 ? 4 : most;
    const float *q = p->query + p->rows[s] * p->query_row_stride + h0 * group * head_size;
    const char *keys = p->keys + h0 * head_bytes, *values = p->values + h0 * head_bytes;
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t d = 0; d < head_size; d++) state[r].sums[d] = 0.0f;
        state[r].top = NO_SCORE, state[r].total = 0.0f;
    }
    int64_t here[TILE], ahead[TILE];
    token_offsets(here, table, 0, len < TILE ? len : TILE, shift, token_bytes);
    for (int64_t start = 0; start < len; start += TILE) {
        const int64_t n = len - start < TILE ? len - start : TILE;
        const int64_t next = start + TILE, n_next = len - next < TILE ? len - next : TILE;
        if (n_next > 0) {
            token_offsets(ahead, table, next, n_next, shift, token_bytes);
            prefetch_tokens(keys, values, ahead, n_next, (h1 - h0) * head_bytes);
        }
        for (int64_t h = 0; h < h1 - h0; h++)
            for (int64_t r0 = 0; r0 < group; r0 += per_pass) {
                const int64_t row = h * group + r0;
                const int64_t R = group - r0 < per_pass ? group - r0 : per_pass;
#define STEP(R)                                                                              \
    tile_step(p, keys + h * head_bytes, values + h * head_bytes, here, n,                   \
              q + row * head_size, state + row, head_size, bf16, R)
                switch (R) {
                case 4: STEP(4); break;
                case 3: STEP(3); break;
                case 2: STEP(2); break;
                default: STEP(1); break;
                }
#undef STEP
            }
        memcpy(here, ahead, sizeof here);
    }
    float *o = p->out + p->rows[s] * p->out_row_stride + h0 * group * head_size;
    for (int64_t r = 0; r < rows; r++) {
        const float inv = 1.0f / state[r].total;
        for (int64_t d = 0; d < head_size; d++) o[r * head_size + d] = state[r].sums[d] * inv;
    }
}
#define TILED(head_size) ((head_size) % 16 == 0 && (head_size) <= 16 * MAX_CHUNKS)
#else
#define TILED(head_size) 0
static inline void attend_tiles(const struct problem *p, int64_t s, int64_t h0, int64_t h1,
                                const int64_t head_size, const int bf16, struct row_state *state)
{
    (void)p, (void)s, (void)h0, (void)h1, (void)head_size, (void)bf16, (void)state;
}
#endif

/* One task, with a constant head size for the common ones and a constant element type, so
 * the compiler unrolls the head dimension. */
static inline __attribute__((always_inline)) void attend(
    const struct problem *p, int64_t s, int64_t h0, int64_t h1, int64_t head_size,
    const int bf16, float *scores, float *acc, struct row_state *state)
{
    if (state == NULL) {
        attend_two_pass(p, s, h0, h1, head_size, bf16, scores, acc);
        return;
    }
    switch (head_size) {
    case 64: attend_tiles(p, s, h0, h1, 64, bf16, state); break;
    case 128: attend_tiles(p, s, h0, h1, 128, bf16, state); break;
    default: attend_tiles(p, s, h0, h1, head_size, bf16, state); break;
    }
}

int paged_decode_attention(
    float *out, int64_t out_row_stride,            /* [rows, num_heads * head_size] */
    const float *query, int64_t query_row_stride,  /* [rows, num_heads * head_size] */
    const int64_t *rows,                           /* [num_seqs] query/out row per sequence */
    const void *cache, int cache_bf16, /* fp32 elements, or bf16 when cache_bf16 */
    int64_t num_blocks, int64_t block_size, int64_t num_kv_heads, int64_t head_size,
    int64_t num_heads,
    const int32_t *block_table, int64_t block_table_stride, /* [num_seqs, >= blocks used] */
    const int32_t *seq_lens, int64_t num_seqs, float scale, int num_threads)
{
    const int64_t group = num_heads / num_kv_heads;
    const int64_t esize = cache_bf16 ? 2 : 4;
    const char *keys = cache;
    const char *values = keys + num_blocks * block_size * num_kv_heads * head_size * esize;
    const struct problem p = {out, out_row_stride, query, query_row_stride, rows, keys, values,
                              block_size, num_kv_heads, group, block_table, block_table_stride,
                              seq_lens, scale};
    /* Whole sequences when there are enough to share out; else one KV head per task. */
    const int64_t heads_per_task = num_seqs >= 4 * num_threads ? num_kv_heads : 1;
    const int64_t tasks_per_seq = num_kv_heads / heads_per_task;
    const int tiled = TILED(head_size) && (block_size & (block_size - 1)) == 0;
    int64_t max_len = 1;
    for (int64_t s = 0; s < num_seqs; s++)
        if (seq_lens[s] > max_len) max_len = seq_lens[s];
    int failed = 0;

#pragma omp parallel num_threads(num_threads)
    {
        /* scratch: the tiled path's row states, or the two-pass loop's scores and sums */
        const int64_t task_rows = heads_per_task * group;
        float *sums = aligned_alloc(64, sizeof(float) * task_rows * ((head_size + 15) / 16 * 16));
        float *scores = tiled ? NULL : malloc(sizeof(float) * task_rows * max_len);
        struct row_state *state = tiled ? malloc(sizeof(struct row_state) * task_rows) : NULL;
        if (sums == NULL || (tiled ? state == NULL : scores == NULL)) {
#pragma omp atomic write
            failed = 1;
        } else if (tiled) {
            for (int64_t r = 0; r < task_rows; r++) state[r].sums = sums + r * head_size;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < num_seqs * tasks_per_seq; task++) {
            if (failed) continue;
            const int64_t s = task / tasks_per_seq;
            const int64_t h0 = (task % tasks_per_seq) * heads_per_task, h1 = h0 + heads_per_task;
            if (cache_bf16)
                attend(&p, s, h0, h1, head_size, 1, scores, sums, state);
            else
                attend(&p, s, h0, h1, head_size, 0, scores, sums, state);
        }
        free(sums);
        free(scores);
        free(state);
    }
    return failed ? -1 : 0;
}

/* Decode attention read in place from the paged KV cache (fp32 or bf16), for the CPU backend.
 *
 * One query token per sequence. The cache of one layer is
 * [2, num_blocks, block_size, num_kv_heads, head_size], contiguous: keys, then values.
 * A task is a sequence (or one KV head of it, when there are too few sequences to keep every
 * thread busy): its query heads are scored against every key of the sequence, read through
 * the block table token by token (all KV heads of a token lie together), softmax-ed in fp32,
 * and the values are summed with those weights. Keys and values are read once each, where
 * they lie; the PyTorch path gathers them into a dense copy first, which triples the memory
 * traffic. A bf16 cache (--kv-cache-dtype bfloat16) halves what is read; each element is
 * widened to fp32 as it is loaded (bf16 is the top half of an fp32), the arithmetic is fp32.
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

/* Where the block after the one at `start` begins, when it is not the next one in memory (the
 * hardware prefetcher follows a run of adjacent blocks, not a jump); NULL when it is, or when
 * the sequence ends first. A bf16 cache only: measured there (decode blocks interleaved as the
 * engine allocates them, 487 -> 444 us a layer; shuffled blocks 512 -> 382), while an fp32
 * cache, twice the prefetches a token, was level in the kernel and no better end to end
 * (benchmarks/RESULTS.md). */
static inline const char *next_block(const int32_t *table, int64_t start, int64_t block_size,
                                     int64_t len, const char *base, int64_t block_bytes,
                                     const int bf16)
{
    const int64_t j = start / block_size;
    if (!bf16 || start + block_size >= len || table[j + 1] == table[j] + 1) return NULL;
    return base + table[j + 1] * block_bytes;
}

/* A jump's block is asked for one block ahead of need, token by token as the current block is
 * read: bytes [0, span) of token row i of the block at next (NULL: nothing to ask for). */
static inline void prefetch_token(const char *next, int64_t i, int64_t token_bytes, int64_t span)
{
    if (next == NULL) return;
    const char *row = next + i * token_bytes;
    for (int64_t b = 0; b < span; b += 64) __builtin_prefetch(row + b, 0, 3);
}

#if defined(__AVX512F__)
#include <immintrin.h>
#define REGISTER_VALUES 1
#define MAX_CHUNKS 8 /* head sizes up to 128 */

/* 16 elements from element i of an fp32 or bf16 row, as fp32. */
static inline __m512 load16(const char *base, int64_t i, const int bf16)
{
    if (!bf16) return _mm512_loadu_ps((const float *)base + i);
    const __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)base + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* acc[g] = sum_t scores[g][t] * v_t for the G query rows of one KV head, the G x head_size / 16
 * accumulators in registers over all the tokens and each value row loaded once for the G
 * rows. Summing into acc in memory token by token instead was most of the kernel's time
 * (one store per FMA; measured by ablation, benchmarks/RESULTS.md). values: this KV head's
 * first element in the cache; G * head_size / 16 <= 16. */
static inline __attribute__((always_inline)) void value_rows(
    const struct problem *p, const int32_t *table, int64_t len, const char *values,
    const float *scores, float *acc, const int64_t head_size, const int bf16, const int G)
{
    const int64_t esize = bf16 ? 2 : 4, block_size = p->block_size, chunks = head_size / 16;
    const int64_t token_bytes = p->num_kv_heads * head_size * esize;
    __m512 a[4][MAX_CHUNKS];
    for (int g = 0; g < G; g++)
        for (int64_t c = 0; c < chunks; c++) a[g][c] = _mm512_setzero_ps();
    for (int64_t start = 0; start < len; start += block_size) {
        const int64_t n = len - start < block_size ? len - start : block_size;
        const char *v = values + table[start / block_size] * block_size * token_bytes;
        const char *next = next_block(table, start, block_size, len, values,
                                      block_size * token_bytes, bf16);
        for (int64_t i = 0; i < n; i++, v += token_bytes) {
            prefetch_token(next, i, token_bytes, head_size * esize);
            __m512 vv[MAX_CHUNKS];
            for (int64_t c = 0; c < chunks; c++) vv[c] = load16(v, 16 * c, bf16);
            for (int g = 0; g < G; g++) {
                const __m512 w = _mm512_set1_ps(scores[g * len + start + i]);
                for (int64_t c = 0; c < chunks; c++) a[g][c] = _mm512_fmadd_ps(w, vv[c], a[g][c]);
            }
        }
    }
    for (int g = 0; g < G; g++)
        for (int64_t c = 0; c < chunks; c++) _mm512_storeu_ps(acc + g * head_size + 16 * c, a[g][c]);
}
#else
#define REGISTER_VALUES 0
#endif

/* acc[r] = sum_t scores[r][t] * v_t for the task's query rows r (kv_heads KV heads from
 * head_offset): in registers (value_rows) where the AVX-512 path takes the shape, else one
 * row and token at a time through acc. */
static inline __attribute__((always_inline)) void values_pass(
    const struct problem *p, const int32_t *table, int64_t len, int64_t kv_heads,
    int64_t head_offset, const int64_t head_size, const int bf16, const float *restrict scores,
    float *restrict acc)
{
    const int64_t esize = bf16 ? 2 : 4, group = p->group, block_size = p->block_size;
#if REGISTER_VALUES
    if (head_size % 16 == 0 && head_size <= 16 * MAX_CHUNKS && group <= 4
        && group * head_size <= 256) {
        for (int64_t h = 0; h < kv_heads; h++) {
            const char *vh = p->values + (head_offset + h * head_size) * esize;
            const float *sc = scores + h * group * len;
            float *ah = acc + h * group * head_size;
            switch (group) {
            case 1: value_rows(p, table, len, vh, sc, ah, head_size, bf16, 1); break;
            case 2: value_rows(p, table, len, vh, sc, ah, head_size, bf16, 2); break;
            case 3: value_rows(p, table, len, vh, sc, ah, head_size, bf16, 3); break;
            default: value_rows(p, table, len, vh, sc, ah, head_size, bf16, 4); break;
            }
        }
        return;
    }
#endif
    const int64_t token_stride = p->num_kv_heads * head_size;
    const int64_t block_stride = block_size * token_stride;
    for (int64_t i = 0; i < kv_heads * group * head_size; i++) acc[i] = 0.0f;
    for (int64_t start = 0; start < len; start += block_size) {
        const int64_t n = len - start < block_size ? len - start : block_size;
        const char *restrict v =
            p->values + (table[start / block_size] * block_stride + head_offset) * esize;
        for (int64_t i = 0; i < n; i++, v += token_stride * esize) {
            for (int64_t h = 0, r = 0; h < kv_heads; h++) {
                const char *restrict vh = v + h * head_size * esize;
                for (int64_t g = 0; g < group; g++, r++) {
                    const float w = scores[r * len + start + i];
                    float *restrict a = acc + r * head_size;
                    for (int64_t d = 0; d < head_size; d++) a[d] += w * widen(vh, d, bf16);
                }
            }
        }
    }
}

/* KV heads [h0, h1) of sequence s. Inlined with a constant head_size for the common sizes and
 * a constant element type, so the compiler unrolls and vectorises the head dimension. */
static inline __attribute__((always_inline)) void attend(
    const struct problem *p, int64_t s, int64_t h0, int64_t h1, const int64_t head_size,
    const int bf16, float *restrict scores, float *restrict acc, float *restrict total)
{
    const int64_t esize = bf16 ? 2 : 4;
    const int64_t group = p->group, len = p->seq_lens[s], block_size = p->block_size;
    const int64_t rows_per_task = (h1 - h0) * group; /* query heads of this task */
    const int64_t token_stride = p->num_kv_heads * head_size;
    const int64_t block_stride = block_size * token_stride;
    const int32_t *table = p->block_table + s * p->block_table_stride;
    const float *restrict q = p->query + p->rows[s] * p->query_row_stride + h0 * group * head_size;
    const int64_t head_offset = h0 * head_size;

    /* scores[r][t] = scale * q_r . k_t, r = query head of the task, t = token */
    for (int64_t start = 0; start < len; start += block_size) {
        const int64_t n = len - start < block_size ? len - start : block_size;
        const char *restrict k =
            p->keys + (table[start / block_size] * block_stride + head_offset) * esize;
        const char *next = next_block(table, start, block_size, len,
                                      p->keys + head_offset * esize, block_stride * esize, bf16);
        for (int64_t i = 0; i < n; i++, k += token_stride * esize) {
            prefetch_token(next, i, token_stride * esize, (h1 - h0) * head_size * esize);
            for (int64_t h = 0, r = 0; h < h1 - h0; h++) {
                const char *restrict kh = k + h * head_size * esize;
                for (int64_t g = 0; g < group; g++, r++) {
                    const float *restrict qr = q + r * head_size;
                    float dot = 0.0f;
                    for (int64_t d = 0; d < head_size; d++) dot += qr[d] * widen(kh, d, bf16);
                    scores[r * len + start + i] = dot * p->scale;
                }
            }
        }
    }
    /* softmax in place; the normaliser is applied at the end */
    for (int64_t r = 0; r < rows_per_task; r++) {
        float *restrict row = scores + r * len;
        float top = row[0];
        for (int64_t t = 1; t < len; t++) top = row[t] > top ? row[t] : top;
        float sum = 0.0f;
        for (int64_t t = 0; t < len; t++) {
            row[t] = expf(row[t] - top);
            sum += row[t];
        }
        total[r] = sum;
    }
    values_pass(p, table, len, h1 - h0, head_offset, head_size, bf16, scores, acc);
    float *restrict o = p->out + p->rows[s] * p->out_row_stride + h0 * group * head_size;
    for (int64_t r = 0; r < rows_per_task; r++) {
        const float inv = 1.0f / total[r];
        for (int64_t d = 0; d < head_size; d++) o[r * head_size + d] = acc[r * head_size + d] * inv;
    }
}

/* attend with a constant head size for the common ones (bf16 a constant too). */
static inline __attribute__((always_inline)) void attend_sized(
    const struct problem *p, int64_t s, int64_t h0, int64_t h1, int64_t head_size,
    const int bf16, float *scores, float *acc, float *total)
{
    switch (head_size) {
    case 64: attend(p, s, h0, h1, 64, bf16, scores, acc, total); break;
    case 128: attend(p, s, h0, h1, 128, bf16, scores, acc, total); break;
    default: attend(p, s, h0, h1, head_size, bf16, scores, acc, total); break;
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
    int64_t max_len = 1;
    for (int64_t s = 0; s < num_seqs; s++)
        if (seq_lens[s] > max_len) max_len = seq_lens[s];
    int failed = 0;

#pragma omp parallel num_threads(num_threads)
    {
        const int64_t task_rows = heads_per_task * group;
        float *scores = malloc(sizeof(float) * task_rows * max_len);
        float *acc = malloc(sizeof(float) * task_rows * head_size);
        float *total = malloc(sizeof(float) * task_rows);
        if (scores == NULL || acc == NULL || total == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < num_seqs * tasks_per_seq; task++) {
            if (failed) continue;
            const int64_t s = task / tasks_per_seq;
            const int64_t h0 = (task % tasks_per_seq) * heads_per_task, h1 = h0 + heads_per_task;
            if (cache_bf16)
                attend_sized(&p, s, h0, h1, head_size, 1, scores, acc, total);
            else
                attend_sized(&p, s, h0, h1, head_size, 0, scores, acc, total);
        }
        free(scores);
        free(acc);
        free(total);
    }
    return failed ? -1 : 0;
}

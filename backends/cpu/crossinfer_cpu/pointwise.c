/* The small per-token operations of a decoder layer (fp32), one pass over memory each, for
 * the CPU backend: RMSNorm (with the residual add folded in), rotary embedding in place, SiLU
 * times the up projection, and the KV-cache write.
 *
 * In PyTorch each of these is several operators, each a dispatch, an output allocation and a
 * pass over the data; at decode sizes (a few thousand floats) the dispatch is most of the
 * cost. Rows are split over the threads only when there are enough elements to pay for
 * waking them.
 *
 * Built at run time by native.py together with paged_decode.c.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

/* At 32 decode rows of SmolLM2-135M, norm + SiLU + rotary + KV write took 12.7 ms per step
 * with 4096 here and 15.8 ms with 32768 (one run each): the SiLU and norms then use both
 * cores. */
#define MIN_ELEMENTS_PER_THREAD (1 << 12)

static int threads_for(int64_t elements, int num_threads)
{
    int64_t useful = elements / MIN_ELEMENTS_PER_THREAD;
    if (useful < 1) return 1;
    return useful < num_threads ? (int)useful : num_threads;
}

/* 1 / sqrt(mean(x^2) + eps) over one row */
static inline float inverse_rms(const float *restrict x, int64_t n, float eps)
{
    float sum = 0.0f;
    for (int64_t i = 0; i < n; i++) sum += x[i] * x[i];
    return 1.0f / sqrtf(sum / (float)n + eps);
}

/* out[r] = (x[r] / rms(x[r])) * weight */
void rms_norm(float *out, int64_t out_stride, const float *x, int64_t x_stride,
              const float *weight, int64_t rows, int64_t hidden, float eps, int num_threads)
{
#pragma omp parallel for num_threads(threads_for(rows * hidden, num_threads)) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *restrict xr = x + r * x_stride;
        float *restrict o = out + r * out_stride;
        const float inv = inverse_rms(xr, hidden, eps);
        for (int64_t i = 0; i < hidden; i++) o[i] = (xr[i] * inv) * weight[i];
    }
}

/* residual[r] += x[r]; x[r] = (residual[r] / rms(residual[r])) * weight. Both in place. */
void add_rms_norm(float *x, int64_t x_stride, float *residual, int64_t residual_stride,
                  const float *weight, int64_t rows, int64_t hidden, float eps, int num_threads)
{
#pragma omp parallel for num_threads(threads_for(rows * hidden, num_threads)) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        float *restrict xr = x + r * x_stride;
        float *restrict res = residual + r * residual_stride;
        for (int64_t i = 0; i < hidden; i++) res[i] += xr[i];
        const float inv = inverse_rms(res, hidden, eps);
        for (int64_t i = 0; i < hidden; i++) xr[i] = (res[i] * inv) * weight[i];
    }
}

/* Rotates heads [0, num_heads) of every token in place, "rotate half" layout: with
 * x = (a, b), a and b each head_size / 2 long, x becomes (a cos - b sin, b cos + a sin).
 * cos and sin are [tokens, head_size / 2], the token's position already looked up. */
void rotary(float *x, int64_t token_stride, int64_t num_heads, int64_t head_size,
            const float *cos, const float *sin, int64_t tokens, int num_threads)
{
    const int64_t half = head_size / 2;
#pragma omp parallel for num_threads(threads_for(tokens * num_heads * head_size, num_threads)) \
    schedule(static)
    for (int64_t t = 0; t < tokens; t++) {
        const float *restrict c = cos + t * half;
        const float *restrict s = sin + t * half;
        for (int64_t h = 0; h < num_heads; h++) {
            float *restrict a = x + t * token_stride + h * head_size;
            float *restrict b = a + half;
            for (int64_t i = 0; i < half; i++) {
                const float ai = a[i], bi = b[i];
                a[i] = ai * c[i] - bi * s[i];
                b[i] = bi * c[i] + ai * s[i];
            }
        }
    }
}

/* out[r][i] = silu(x[r][i]) * x[r][inter + i]: the gate and up halves of one projection.
 * out is [rows, inter], contiguous. */
void silu_and_mul(float *out, const float *x, int64_t x_stride, int64_t rows, int64_t inter,
                  int num_threads)
{
#pragma omp parallel for num_threads(threads_for(rows * inter, num_threads)) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *restrict gate = x + r * x_stride;
        const float *restrict up = gate + inter;
        float *restrict o = out + r * inter;
        for (int64_t i = 0; i < inter; i++) o[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
    }
}

/* Stores token t's keys and values (token_numel floats each: all its KV heads) in cache slot
 * slots[t]; a slot outside [0, num_slots) writes nothing (a negative one is padding). The
 * cache is [2, num_slots, token_numel]: keys, then values. */
void write_kv(float *cache, int64_t num_slots, int64_t token_numel, const float *key,
              int64_t key_stride, const float *value, int64_t value_stride, const int64_t *slots,
              int64_t tokens, int num_threads)
{
    float *keys = cache, *values = cache + num_slots * token_numel;
    const size_t bytes = (size_t)token_numel * sizeof(float);
#pragma omp parallel for num_threads(threads_for(2 * tokens * token_numel, num_threads)) \
    schedule(static)
    for (int64_t t = 0; t < tokens; t++) {
        const int64_t slot = slots[t];
        if (slot < 0 || slot >= num_slots) continue;
        memcpy(keys + slot * token_numel, key + t * key_stride, bytes);
        memcpy(values + slot * token_numel, value + t * value_stride, bytes);
    }
}

/* fp32 -> bf16 rounded to nearest even, as torch's .to(torch.bfloat16); a NaN stays a NaN. */
static inline uint16_t to_bf16(float f)
{
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x0040u);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

/* write_kv into a bf16 cache: fp32 keys and values rounded as they are stored. */
void write_kv_bf16(uint16_t *cache, int64_t num_slots, int64_t token_numel, const float *key,
                   int64_t key_stride, const float *value, int64_t value_stride,
                   const int64_t *slots, int64_t tokens, int num_threads)
{
    uint16_t *keys = cache, *values = cache + num_slots * token_numel;
#pragma omp parallel for num_threads(threads_for(2 * tokens * token_numel, num_threads)) \
    schedule(static)
    for (int64_t t = 0; t < tokens; t++) {
        const int64_t slot = slots[t];
        if (slot < 0 || slot >= num_slots) continue;
        uint16_t *restrict k = keys + slot * token_numel, *restrict v = values + slot * token_numel;
        const float *restrict kt = key + t * key_stride, *restrict vt = value + t * value_stride;
        for (int64_t i = 0; i < token_numel; i++) k[i] = to_bf16(kt[i]);
        for (int64_t i = 0; i < token_numel; i++) v[i] = to_bf16(vt[i]);
    }
}

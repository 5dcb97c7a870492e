/* The two ends of an int8 (W8A8) linear layer for the CPU backend (int8.py), one pass each:
 * quantising activation rows to int8 with one scale per row, and turning the int8 GEMM's
 * int32 sums back into floats with the row and column scales and the bias.
 *
 * In PyTorch each end is five to seven operators with an allocation each; at decode sizes
 * that costs more than the arithmetic. The rounding is torch's: x * (127 / absmax) rounded
 * half to even (nearbyintf in the default rounding mode), so both paths give the same ints.
 *
 * Built at run time by native.py with the other kernels.
 */
#include <float.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#define QMAX 127.0f
#define MIN_ELEMENTS_PER_THREAD (1 << 12)

static int threads_for(int64_t elements, int num_threads)
{
    int64_t useful = elements / MIN_ELEMENTS_PER_THREAD;
    if (useful < 1) return 1;
    return useful < num_threads ? (int)useful : num_threads;
}

/* One row: q = round(x * 127 / absmax(x)), returns the scale absmax(x) / 127 and, when sum is
 * not NULL, stores the sum of q (int8_gemm.c takes it off its unsigned-weight sums). An
 * all-zero row gets zeros (absmax is clamped to FLT_MIN, as torch clamps it to finfo.tiny). */
float quantize_row(int8_t *restrict q, const float *restrict x, int64_t cols, int32_t *sum)
{
    float amax = 0.0f;
    for (int64_t i = 0; i < cols; i++) amax = fmaxf(amax, fabsf(x[i]));
    if (amax < FLT_MIN) amax = FLT_MIN;
    const float inv = QMAX / amax;
    int32_t total = 0;
    for (int64_t i = 0; i < cols; i++) {
        float v = nearbyintf(x[i] * inv);
        v = fminf(fmaxf(v, -QMAX), QMAX);
        q[i] = (int8_t)v;
        total += (int32_t)v;
    }
    if (sum) *sum = total;
    return amax / QMAX;
}

/* quantize_row for each row: q is [rows, cols] contiguous, x rows may be strided. */
void quantize_rows(int8_t *q, float *scale, const float *x, int64_t x_stride, int64_t rows,
                   int64_t cols, int num_threads)
{
#pragma omp parallel for num_threads(threads_for(rows * cols, num_threads)) schedule(static)
    for (int64_t r = 0; r < rows; r++)
        scale[r] = quantize_row(q + r * cols, x + r * x_stride, cols, NULL);
}

/* out[r][c] = acc[r][c] * row_scale[r] * col_scale[c] (+ bias[c]); all contiguous; bias may
 * be NULL. */
void dequantize_sums(float *out, const int32_t *acc, const float *row_scale,
                     const float *col_scale, const float *bias, int64_t rows, int64_t cols,
                     int num_threads)
{
#pragma omp parallel for num_threads(threads_for(rows * cols, num_threads)) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const int32_t *restrict a = acc + r * cols;
        float *restrict o = out + r * cols;
        const float s = row_scale[r];
        if (bias) {
            for (int64_t c = 0; c < cols; c++) o[c] = ((float)a[c] * s) * col_scale[c] + bias[c];
        } else {
            for (int64_t c = 0; c < cols; c++) o[c] = ((float)a[c] * s) * col_scale[c];
        }
    }
}

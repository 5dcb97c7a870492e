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
#include <stdint.h>

#define QMAX 127.0f
#define MIN_ELEMENTS_PER_THREAD (1 << 12)

static int threads_for(int64_t elements, int num_threads)
{
    int64_t useful = elements / MIN_ELEMENTS_PER_THREAD;
    if (useful < 1) return 1;
    return useful < num_threads ? (int)useful : num_threads;
}

/* q[r] = round(x[r] * 127 / absmax(x[r])), scale[r] = absmax(x[r]) / 127; q is [rows, cols]
 * contiguous, x rows may be strided. An all-zero row gets zeros (absmax is clamped to
 * FLT_MIN, as torch clamps it to finfo.tiny). */
void quantize_rows(int8_t *q, float *scale, const float *x, int64_t x_stride, int64_t rows,
                   int64_t cols, int num_threads)
{
#pragma omp parallel for num_threads(threads_for(rows * cols, num_threads)) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *restrict xr = x + r * x_stride;
        int8_t *restrict qr = q + r * cols;
        float amax = 0.0f;
        for (int64_t i = 0; i < cols; i++) amax = fmaxf(amax, fabsf(xr[i]));
        if (amax < FLT_MIN) amax = FLT_MIN;
        const float inv = QMAX / amax;
        scale[r] = amax / QMAX;
        for (int64_t i = 0; i < cols; i++) {
            float v = nearbyintf(xr[i] * inv);
            v = fminf(fmaxf(v, -QMAX), QMAX);
            qr[i] = (int8_t)v;
        }
    }
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

/* Native generation kernels for x86-64 CPUs with AVX2 and FMA but no AVX-512 (most laptops
 * and desktops, AMD Zen 2/3): int8 one-token-at-a-time LSTM generation and top-k sampling, the
 * generation half of kernels.c, with the same entry points, the same packed layouts (see
 * kernels.c and native.py) and the same numbers, bit for bit.
 *
 * Why a kernel at all: one generated token of a small LSTM is a few hundred microseconds of
 * arithmetic, but about sixty PyTorch calls, each with its own fixed cost. One call per token
 * removes that, which PyTorch's own int8 matmul cannot (docs/benchmarks.md, "Portable int8").
 *
 * AVX2 has no byte dot product that adds into 32 bits (VNNI). Its byte multiply-add
 * (vpmaddubsw) multiplies unsigned by signed bytes and adds pairs into 16 bits with saturation,
 * so the input is used as signed bytes (q - 128, within ±127), multiplied by |w| with the sign
 * of w moved onto the input: each pair sums to at most 2·127·127 = 32,258, which never
 * saturates. The integer dot products are therefore exact and equal the VNNI kernel's, and the
 * float steps after them run in the same order.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Round n floats to bytes around 128; pad to `padded` with 128 (zero). Returns the scale.
 * The same arithmetic as kernels.c: absmax / 127, then round to nearest even. */
static float quantize(const float *x, int n, int padded, uint8_t *q) {
    float top = 0.0f;
    for (int i = 0; i < n; i++) top = fmaxf(top, fabsf(x[i]));
    const float scale = top > 0.0f ? top / 127.0f : 1.0f;
    const float inv = 1.0f / scale;
    for (int i = 0; i < n; i++) q[i] = (uint8_t)(128 + (int)nearbyintf(x[i] * inv));
    for (int i = n; i < padded; i++) q[i] = 128;
    return scale;
}

/* exp(x) for eight floats, as exp16 in kernels.c: 2^(x·log2 e) split into 2^integer and
 * 2^fraction (a degree-6 polynomial on [-0.5, 0.5]). 2^n is built in the exponent bits; n stays
 * within the normal range for the clamped x, so the product is the same as AVX-512's scalef. */
static inline __m256 exp8(__m256 x) {
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.0f)), _mm256_set1_ps(-87.0f));
    __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f));
    __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 f = _mm256_mul_ps(_mm256_sub_ps(t, n), _mm256_set1_ps(0.693147180559945309f));
    __m256 p = _mm256_set1_ps(1.0f / 720);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

static inline __m256 sigmoid8(__m256 x) {
    const __m256 one = _mm256_set1_ps(1.0f);
    return _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), x))));
}

static inline __m256 tanh8(__m256 x) {  /* 2·sigmoid(2x) - 1 */
    return _mm256_fmsub_ps(_mm256_set1_ps(2.0f), sigmoid8(_mm256_add_ps(x, x)), _mm256_set1_ps(1.0f));
}

/* The exact integer dot products of input bytes q[k0..k1) (offset by 128) with one block of 16
 * weight rows (w: its [column group of 4][16 rows][4 columns] bytes), added into lo (rows 0-7)
 * and hi (rows 8-15). */
static inline void accumulate(const int8_t *w, const uint8_t *q, int k0, int k1,
                              __m256i *lo, __m256i *hi) {
    const __m256i flip = _mm256_set1_epi8((char)0x80), ones = _mm256_set1_epi16(1);
    for (int k = k0; k < k1; k += 4) {
        int32_t four;
        memcpy(&four, q + k, 4);  /* four input bytes, as signed values, in every lane */
        const __m256i x = _mm256_xor_si256(_mm256_set1_epi32(four), flip);
        const __m256i a = _mm256_loadu_si256((const __m256i *)(w + (size_t)k * 16));
        const __m256i b = _mm256_loadu_si256((const __m256i *)(w + (size_t)k * 16 + 32));
        *lo = _mm256_add_epi32(*lo, _mm256_madd_epi16(
            _mm256_maddubs_epi16(_mm256_abs_epi8(a), _mm256_sign_epi8(x, a)), ones));
        *hi = _mm256_add_epi32(*hi, _mm256_madd_epi16(
            _mm256_maddubs_epi16(_mm256_abs_epi8(b), _mm256_sign_epi8(x, b)), ones));
    }
}

/* `accumulate` for four input rows at once (q0, q0 + K, q0 + 2K, q0 + 3K), so that each weight
 * load and its absolute value serve four rows: what a batch of streams is bound by. */
static inline void accumulate4(const int8_t *w, const uint8_t *q0, size_t K, int k0, int k1,
                               __m256i lo[4], __m256i hi[4]) {
    const __m256i flip = _mm256_set1_epi8((char)0x80), ones = _mm256_set1_epi16(1);
    for (int k = k0; k < k1; k += 4) {
        const __m256i a = _mm256_loadu_si256((const __m256i *)(w + (size_t)k * 16));
        const __m256i b = _mm256_loadu_si256((const __m256i *)(w + (size_t)k * 16 + 32));
        const __m256i abs_a = _mm256_abs_epi8(a), abs_b = _mm256_abs_epi8(b);
        for (int r = 0; r < 4; r++) {
            int32_t four;
            memcpy(&four, q0 + r * K + k, 4);
            const __m256i x = _mm256_xor_si256(_mm256_set1_epi32(four), flip);
            lo[r] = _mm256_add_epi32(lo[r], _mm256_madd_epi16(
                _mm256_maddubs_epi16(abs_a, _mm256_sign_epi8(x, a)), ones));
            hi[r] = _mm256_add_epi32(hi[r], _mm256_madd_epi16(
                _mm256_maddubs_epi16(abs_b, _mm256_sign_epi8(x, b)), ones));
        }
    }
}

/* Eight outputs y[n .. n+8) (those below N) from their two segments' dot products d1, d2: the
 * scales and the bias, in kernels.c's order. */
static inline void finish8(__m256i d1, __m256i d2, const float *wscale, const float *bias,
                           const float *qscale, int n, int N, float *y) {
    __m256 v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d2), _mm256_set1_ps(qscale[1]),
                               _mm256_mul_ps(_mm256_cvtepi32_ps(d1), _mm256_set1_ps(qscale[0])));
    v = _mm256_fmadd_ps(v, _mm256_loadu_ps(wscale + n), _mm256_loadu_ps(bias + n));
    if (N - n >= 8) {
        _mm256_storeu_ps(y + n, v);
    } else {
        float tail[8];
        _mm256_storeu_ps(tail, v);
        memcpy(y + n, tail, sizeof(float) * (size_t)(N - n));
    }
}

/* y[b, n] = wscale[n] · Σ_s qscale[b, s] · W[n, seg s] · (q[b, seg s] - 128) + bias[n] for n < N,
 * b < B; y has row stride ldy. Weight rows are taken 64 at a time through every input row, as
 * in kernels.c, and split statically between threads. wscale and bias hold Np entries. */
static void qmatmul(const int8_t *W, const float *wscale, const float *bias, const uint8_t *q,
                    const float *qscale, int B, int K1, int K2, int N, float *y, int ldy,
                    int threads) {
    const size_t K = (size_t)K1 + K2;
    const int groups = (N + 63) / 64;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int g = 0; g < groups; g++) {
        for (int j = 0; j < 4 && g * 64 + j * 16 < N; j++) {
            const int8_t *w = W + (size_t)(g * 4 + j) * 16 * K;
            int b = 0;
            for (; b + 4 <= B; b += 4) {  /* four rows at a time, one segment after the other */
                __m256i lo[4], hi[4], s1[4][2];
                for (int r = 0; r < 4; r++) lo[r] = hi[r] = _mm256_setzero_si256();
                accumulate4(w, q + (size_t)b * K, K, 0, K1, lo, hi);
                for (int r = 0; r < 4; r++) {
                    s1[r][0] = lo[r];
                    s1[r][1] = hi[r];
                    lo[r] = hi[r] = _mm256_setzero_si256();
                }
                accumulate4(w, q + (size_t)b * K, K, K1, (int)K, lo, hi);
                for (int r = 0; r < 4; r++)
                    for (int half = 0; half < 2; half++) {
                        const int n = g * 64 + j * 16 + half * 8;
                        if (n < N)
                            finish8(s1[r][half], half ? hi[r] : lo[r], wscale, bias,
                                    qscale + 2 * (b + r), n, N, y + (size_t)(b + r) * ldy);
                    }
            }
            for (; b < B; b++) {
                const uint8_t *qb = q + (size_t)b * K;
                __m256i s1[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
                __m256i s2[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
                accumulate(w, qb, 0, K1, &s1[0], &s1[1]);
                accumulate(w, qb, K1, (int)K, &s2[0], &s2[1]);
                for (int half = 0; half < 2; half++) {
                    const int n = g * 64 + j * 16 + half * 8;
                    if (n < N)
                        finish8(s1[half], s2[half], wscale, bias, qscale + 2 * b, n, N,
                                y + (size_t)b * ldy);
                }
            }
        }
    }
}

/* y (B, N) = x (B, K) · Wᵀ + bias, with W packed as one segment of Kp columns. rowsum is not
 * needed here (the input is used signed) but kept in the signature of kernels.c. */
int scriven_linear_i8(const int8_t *W, const int32_t *rowsum, const float *wscale, const float *bias,
                      const float *x, int B, int K, int Kp, int N, float *y, int threads) {
    (void)rowsum;
    uint8_t *q = malloc((size_t)B * Kp);
    float *qscale = malloc(sizeof(float) * 2 * B);
    if (!q || !qscale) { free(q); free(qscale); return 1; }
    for (int b = 0; b < B; b++) {
        qscale[2 * b] = quantize(x + (size_t)b * K, K, Kp, q + (size_t)b * Kp);
        qscale[2 * b + 1] = 0.0f;
    }
    qmatmul(W, wscale, bias, q, qscale, B, Kp, 0, N, y, N, threads);
    free(q);
    free(qscale);
    return 0;
}

/* One LSTM layer, one step, as in kernels.c: gates = W [x; h] + bias in PyTorch's order
 * (input, forget, cell, output), then c' = f·c + i·g and h' = o·tanh(c'). */
int scriven_lstm_step_i8(const int8_t *W, const int32_t *rowsum, const float *wscale, const float *bias,
                         const float *x, const float *h, const float *c, int B, int E, int Ep, int H, int Hp,
                         float *h_out, float *c_out, int threads) {
    (void)rowsum;
    const int K = Ep + Hp;
    uint8_t *q = malloc((size_t)B * K);
    float *qscale = malloc(sizeof(float) * 2 * B);
    float *gates = malloc(sizeof(float) * 4 * (size_t)H * B);
    if (!q || !qscale || !gates) { free(q); free(qscale); free(gates); return 1; }
    for (int b = 0; b < B; b++) {
        qscale[2 * b] = quantize(x + (size_t)b * E, E, Ep, q + (size_t)b * K);
        qscale[2 * b + 1] = quantize(h + (size_t)b * H, H, Hp, q + (size_t)b * K + Ep);
    }
    qmatmul(W, wscale, bias, q, qscale, B, Ep, Hp, 4 * H, gates, 4 * H, threads);
    for (int b = 0; b < B; b++) {
        const float *g = gates + (size_t)b * 4 * H;
        const size_t o = (size_t)b * H;
        for (int j = 0; j < H; j += 8) {
            /* A tail shorter than eight goes through zero-padded copies: the same arithmetic. */
            const int m = H - j < 8 ? H - j : 8;
            float gi[8] = {0}, gf[8] = {0}, gc[8] = {0}, go[8] = {0}, cc[8] = {0}, ho[8], co[8];
            memcpy(gi, g + j, sizeof(float) * m);
            memcpy(gf, g + H + j, sizeof(float) * m);
            memcpy(gc, g + 2 * H + j, sizeof(float) * m);
            memcpy(go, g + 3 * H + j, sizeof(float) * m);
            memcpy(cc, c + o + j, sizeof(float) * m);
            __m256 in = sigmoid8(_mm256_loadu_ps(gi));
            __m256 forget = sigmoid8(_mm256_loadu_ps(gf));
            __m256 cand = tanh8(_mm256_loadu_ps(gc));
            __m256 out = sigmoid8(_mm256_loadu_ps(go));
            __m256 cell = _mm256_fmadd_ps(forget, _mm256_loadu_ps(cc), _mm256_mul_ps(in, cand));
            _mm256_storeu_ps(co, cell);
            _mm256_storeu_ps(ho, _mm256_mul_ps(out, tanh8(cell)));
            memcpy(c_out + o + j, co, sizeof(float) * m);
            memcpy(h_out + o + j, ho, sizeof(float) * m);
        }
    }
    free(q);
    free(qscale);
    free(gates);
    return 0;
}

/* The k largest values of one row of V floats and their indices, sorted from the largest, as
 * topk_row in kernels.c (eight values at a time are compared with the current k-th best). */
static void topk_row(const float *row, int V, int k, float *val, int64_t *idx) {
    int filled = 0;
    for (int i = 0; i < k; i++) { val[i] = -INFINITY; idx[i] = i; }
    for (int i = 0; i < V; i += 8) {
        unsigned above;
        if (i + 8 <= V)
            above = filled < k ? 0xFFu
                               : (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(
                                     _mm256_loadu_ps(row + i), _mm256_set1_ps(val[k - 1]), _CMP_GT_OQ));
        else
            above = (1u << (V - i)) - 1;
        while (above) {
            int j = i + __builtin_ctz(above);
            above &= above - 1;
            float v = row[j];
            if (v != v || (filled == k && !(v > val[k - 1]))) continue;
            int p = filled < k ? filled++ : k - 1;
            while (p > 0 && val[p - 1] < v) { val[p] = val[p - 1]; idx[p] = idx[p - 1]; p--; }
            val[p] = v;
            idx[p] = j;
        }
    }
}

/* Plain sampling's two passes over a row, as in kernels.c: the largest of n floats, then
 * e[i] = exp(x[i] - shift) (0 for x[i] = -inf) with the sum of each chunk of EXP_CHUNK in
 * chunk[], returning their total. A chunk is eight vectors of eight, added as kernels.c adds
 * its four of sixteen (pairwise, then the halves), so both builds draw the same tokens. */
static inline float sum8(__m256 v);  /* kernels_shared.h: the same order in both builds */
#define EXP_CHUNK 64  /* eight vectors of eight; kernels_shared.h walks chunks of it */

static float row_max(const float *x, int n) {
    __m256 m = _mm256_set1_ps(-INFINITY);
    int i = 0;
    for (; i + 8 <= n; i += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(x + i));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    float top = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
    for (; i < n; i++) top = x[i] > top ? x[i] : top;
    return top;
}

/* exp(x - shift) of the first m ≤ 8 floats at x into e, 0 for -inf; the vector, zero past m. */
static inline __m256 scaled_exp8(const float *x, int m, __m256 shv, float *e) {
    float part[8] = {0};
    if (m <= 0) return _mm256_setzero_ps();
    if (m < 8) memcpy(part, x, sizeof(float) * m);
    const __m256 v = _mm256_loadu_ps(m < 8 ? part : x);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256 keep = _mm256_and_ps(_mm256_cmp_ps(v, _mm256_set1_ps(-INFINITY), _CMP_NEQ_OQ),
                                      _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(m), lane)));
    const __m256 ex = _mm256_and_ps(exp8(_mm256_sub_ps(v, shv)), keep);
    if (m < 8) {
        _mm256_storeu_ps(part, ex);
        memcpy(e, part, sizeof(float) * m);
    } else {
        _mm256_storeu_ps(e, ex);
    }
    return ex;
}

static float scaled_exp(const float *x, int n, float shift, float *e, float *chunk) {
    const __m256 shv = _mm256_set1_ps(shift);
    float total = 0.0f;
    for (int i = 0, c = 0; i < n; i += EXP_CHUNK, c++) {
        __m256 lo[4], hi[4];  /* lanes 0-7 and 8-15 of kernels.c's four vectors of sixteen */
        for (int k = 0; k < 4; k++) {
            const int at = i + 16 * k;
            lo[k] = scaled_exp8(x + at, n - at < 8 ? n - at : 8, shv, e + at);
            hi[k] = scaled_exp8(x + at + 8, n - at - 8 < 8 ? n - at - 8 : 8, shv, e + at + 8);
        }
        const __m256 l = _mm256_add_ps(_mm256_add_ps(lo[0], lo[1]), _mm256_add_ps(lo[2], lo[3]));
        const __m256 h = _mm256_add_ps(_mm256_add_ps(hi[0], hi[1]), _mm256_add_ps(hi[2], hi[3]));
        chunk[c] = sum8(_mm256_add_ps(l, h));
        total += chunk[c];
    }
    return total;
}

#include "kernels_shared.h"

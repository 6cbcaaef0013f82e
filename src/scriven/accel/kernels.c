/* Native CPU kernels (x86-64 with AVX-512 VNNI): int8 generation one token at a time, and at
 * the end of this file training kernels (cross-entropy gradient of bf16 logits, dropout, layer
 * norm, short attention, and on AMX a linear layer's weight gradient).
 *
 * A single stream reads every weight once per token, so its speed is the speed at which weight
 * bytes come in and are multiplied. PyTorch's int8 weight-only kernel converts each weight to
 * float before multiplying, which makes it compute-bound; here activations are rounded to 8 bits
 * too (one scale per row, recomputed at every call), so the dot products run on the VNNI
 * instruction that multiplies 64 byte pairs at once, and the kernel is bound by memory instead.
 *
 * Layouts (see scriven/native.py, which packs them):
 *   W       int8 weights of Np output rows (Np a multiple of 64, zero rows past N) and K columns
 *           in up to two segments of K1 and K2 columns (each a multiple of 64, zero-padded),
 *           blocked for VNNI: [row block of 16][column group of 4][16 rows][4 columns], so one
 *           64-byte load holds four columns of sixteen rows, and one instruction adds their
 *           products with four broadcast input bytes into sixteen row sums: no horizontal sums;
 *   rowsum  (2, Np) int32, the sum of each row's weights within each segment;
 *   wscale  (Np,) float: weight ≈ W · wscale;  bias (Np,) float;
 *   q       (B, K1 + K2) uint8: activation ≈ (q - 128) · qscale, one scale per row and segment.
 * Output rows are split statically between threads, so each core keeps reading the same rows,
 * which then often stay in its own cache from one token to the next.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
#ifdef _OPENMP
#include <omp.h>
#endif

static inline int thread_index(void) {  /* this thread's number in its parallel region */
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

static inline int team_size(void) {  /* threads in this parallel region */
#ifdef _OPENMP
    return omp_get_num_threads();
#else
    return 1;
#endif
}

/* Round n floats to bytes around 128; pad to `padded` with 128 (zero). Returns the scale. */
static float quantize(const float *x, int n, int padded, uint8_t *q) {
    __m512 m = _mm512_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(x + i)));
    float top = _mm512_reduce_max_ps(m);
    for (; i < n; i++) top = fmaxf(top, fabsf(x[i]));
    const float scale = top > 0.0f ? top / 127.0f : 1.0f;
    const __m512 inv = _mm512_set1_ps(1.0f / scale);
    const __m512i zero = _mm512_set1_epi32(128);
    for (i = 0; i + 16 <= n; i += 16) {  /* rounds to nearest even, as nearbyintf */
        __m512i v = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + i), inv)), zero);
        _mm_storeu_si128((__m128i *)(q + i), _mm512_cvtepi32_epi8(v));
    }
    for (; i < n; i++) q[i] = (uint8_t)(128 + (int)nearbyintf(x[i] * (1.0f / scale)));
    for (; i < padded; i++) q[i] = 128;
    return scale;
}

/* exp(x) for sixteen floats: 2^(x·log2 e) split into 2^integer (built in the exponent bits) and
 * 2^fraction (a degree-6 polynomial on [-0.5, 0.5]), relative error about 2e-7. */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.0f)), _mm512_set1_ps(-87.0f));
    __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
    __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.693147180559945309f));
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

static inline __m512 sigmoid16(__m512 x) {
    const __m512 one = _mm512_set1_ps(1.0f);
    return _mm512_div_ps(one, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), x))));
}

static inline __m512 tanh16(__m512 x) {  /* 2·sigmoid(2x) - 1 */
    return _mm512_fmsub_ps(_mm512_set1_ps(2.0f), sigmoid16(_mm512_add_ps(x, x)), _mm512_set1_ps(1.0f));
}

/* Add the products of input bytes q[k0..k1) with four row blocks of 16 (starting at w, block
 * stride 16·K bytes) into acc. */
static inline void accumulate(const int8_t *w, size_t K, const uint8_t *q, int k0, int k1,
                              __m512i acc[4]) {
    const size_t stride = 16 * K;
    for (int k = k0; k < k1; k += 4) {
        int32_t four;
        memcpy(&four, q + k, 4);  /* four input bytes, broadcast to all sixteen lanes */
        __m512i x = _mm512_set1_epi32(four);
        const int8_t *p = w + (size_t)k * 16;
        acc[0] = _mm512_dpbusd_epi32(acc[0], x, _mm512_loadu_si512(p));
        acc[1] = _mm512_dpbusd_epi32(acc[1], x, _mm512_loadu_si512(p + stride));
        acc[2] = _mm512_dpbusd_epi32(acc[2], x, _mm512_loadu_si512(p + 2 * stride));
        acc[3] = _mm512_dpbusd_epi32(acc[3], x, _mm512_loadu_si512(p + 3 * stride));
    }
}

/* Sixteen outputs y[n .. n+16) (those below N) of one input row from its two segments' integer
 * dot products d1, d2 (input bytes still offset by 128): the offset, the scales and the bias. */
static inline void finish16(__m512i d1, __m512i d2, const int32_t *rowsum, int Np, const float *wscale,
                            const float *bias, const float *qscale, int n, int N, float *y) {
    const __m512i zero = _mm512_set1_epi32(128);
    d1 = _mm512_sub_epi32(d1, _mm512_mullo_epi32(zero, _mm512_loadu_si512(rowsum + n)));
    d2 = _mm512_sub_epi32(d2, _mm512_mullo_epi32(zero, _mm512_loadu_si512(rowsum + Np + n)));
    __m512 v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d2), _mm512_set1_ps(qscale[1]),
                               _mm512_mul_ps(_mm512_cvtepi32_ps(d1), _mm512_set1_ps(qscale[0])));
    v = _mm512_fmadd_ps(v, _mm512_loadu_ps(wscale + n), _mm512_loadu_ps(bias + n));
    __mmask16 keep = N - n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (N - n)) - 1);
    _mm512_mask_storeu_ps(y + n, keep, v);
}

/* y[b, n] = wscale[n] · Σ_s qscale[b, s] · (W[n, seg s] · q[b, seg s] - 128 · rowsum[s, n]) + bias[n]
 * for n < N, b < B; y has row stride ldy. 64 weight rows at a time are taken through every
 * input row, so a batch of a few rows reads the weights once. */
static void qmatmul_vnni(const int8_t *W, const int32_t *rowsum, const float *wscale, const float *bias,
                    const uint8_t *q, const float *qscale, int B, int K1, int K2, int N,
                    float *y, int ldy, int threads) {
    const size_t K = (size_t)K1 + K2;
    const int groups = (N + 63) / 64, Np = groups * 64;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int g = 0; g < groups; g++) {
        const int8_t *w = W + (size_t)g * 64 * K;
        for (int b = 0; b < B; b++) {
            const uint8_t *qb = q + (size_t)b * K;
            __m512i s1[4], s2[4];
            for (int j = 0; j < 4; j++) s1[j] = s2[j] = _mm512_setzero_si512();
            accumulate(w, K, qb, 0, K1, s1);
            accumulate(w, K, qb, K1, (int)K, s2);
            for (int j = 0; j < 4 && g * 64 + j * 16 < N; j++)
                finish16(s1[j], s2[j], rowsum, Np, wscale, bias, qscale + 2 * b, g * 64 + j * 16, N,
                         y + (size_t)b * ldy);
        }
    }
}

/* The same product on the AMX tile units, for batches: a tile multiply takes 16 input rows ×
 * 64 columns (bytes) against 64 columns × 16 output rows, and the weight layout above is
 * already the one AMX wants for its second operand (four columns of sixteen rows per 64-byte
 * row). q must hold a multiple of 16 rows (padding rows of 128); K1 and K2 are multiples of 64.
 * Each thread takes whole groups of 64 output rows; tiles 0-3 accumulate one group's four
 * blocks of 16 for one segment, tile 4 holds input bytes, tile 5 weights. */
static int amx_enabled = 0;  /* set once by scriven_amx_init(): the CPU has AMX and Linux allows it */

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* Configure this thread's first n tiles as full 16 rows × 64 bytes. */
__attribute__((target("amx-tile")))
static void load_full_tiles(int n) {
    tile_config cfg = {0};
    cfg.palette = 1;
    for (int t = 0; t < n; t++) { cfg.rows[t] = 16; cfg.colsb[t] = 64; }
    _tile_loadconfig(&cfg);
}

__attribute__((target("amx-tile,amx-int8")))
static void qmatmul_amx(const int8_t *W, const int32_t *rowsum, const float *wscale, const float *bias,
                        const uint8_t *q, const float *qscale, int B, int K1, int K2, int N,
                        float *y, int ldy, int threads) {
    const size_t K = (size_t)K1 + K2;
    const int groups = (N + 63) / 64, Np = groups * 64, Bp = (B + 15) / 16 * 16;
    #pragma omp parallel num_threads(threads)
    {
        load_full_tiles(6);
        int32_t dots[2][16][64];  /* [segment][input row][output row in the group] */
        #pragma omp for schedule(static)
        for (int g = 0; g < groups; g++) {
            const int8_t *w = W + (size_t)g * 64 * K;
            for (int m = 0; m < Bp; m += 16) {
                for (int s = 0; s < 2; s++) {
                    const int k0 = s ? K1 : 0, k1 = s ? (int)K : K1;
                    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
                    for (int k = k0; k < k1; k += 64) {
                        _tile_loadd(4, q + (size_t)m * K + k, K);
                        const int8_t *wk = w + (size_t)k * 16;
                        _tile_loadd(5, wk, 64);
                        _tile_dpbusd(0, 4, 5);
                        _tile_loadd(5, wk + 16 * K, 64);
                        _tile_dpbusd(1, 4, 5);
                        _tile_loadd(5, wk + 32 * K, 64);
                        _tile_dpbusd(2, 4, 5);
                        _tile_loadd(5, wk + 48 * K, 64);
                        _tile_dpbusd(3, 4, 5);
                    }
                    _tile_stored(0, &dots[s][0][0], 256);
                    _tile_stored(1, &dots[s][0][16], 256);
                    _tile_stored(2, &dots[s][0][32], 256);
                    _tile_stored(3, &dots[s][0][48], 256);
                }
                for (int r = 0; r < 16 && m + r < B; r++)
                    for (int j = 0; j < 4 && g * 64 + j * 16 < N; j++)
                        finish16(_mm512_loadu_si512(&dots[0][r][j * 16]), _mm512_loadu_si512(&dots[1][r][j * 16]),
                                 rowsum, Np, wscale, bias, qscale + 2 * (m + r), g * 64 + j * 16, N,
                                 y + (size_t)(m + r) * ldy);
            }
        }
        _tile_release();
    }
}

/* Ask Linux for the AMX tile state (it is off for a process until asked); 1 if AMX can run. */
int scriven_amx_init(void) {
    const long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    amx_enabled = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
    return amx_enabled;
}

/* Batches of at least this many rows go to the tile units when they are enabled (measured: 8
 * rows padded to 16 are faster there than on the VNNI kernel). */
#define AMX_MIN_ROWS 8

static void qmatmul(const int8_t *W, const int32_t *rowsum, const float *wscale, const float *bias,
                    const uint8_t *q, const float *qscale, int B, int K1, int K2, int N,
                    float *y, int ldy, int threads) {
    if (amx_enabled && B >= AMX_MIN_ROWS)
        qmatmul_amx(W, rowsum, wscale, bias, q, qscale, B, K1, K2, N, y, ldy, threads);
    else
        qmatmul_vnni(W, rowsum, wscale, bias, q, qscale, B, K1, K2, N, y, ldy, threads);
}

/* y (B, N) = x (B, K) · Wᵀ + bias, with W packed as one segment of Kp columns. */
int scriven_linear_i8(const int8_t *W, const int32_t *rowsum, const float *wscale, const float *bias,
                      const float *x, int B, int K, int Kp, int N, float *y, int threads) {
    uint8_t *q = malloc((size_t)(B + 15) / 16 * 16 * Kp);
    float *qscale = malloc(sizeof(float) * 2 * B);
    if (!q || !qscale) { free(q); free(qscale); return 1; }
    memset(q + (size_t)B * Kp, 128, (size_t)((B + 15) / 16 * 16 - B) * Kp);
    for (int b = 0; b < B; b++) {
        qscale[2 * b] = quantize(x + (size_t)b * K, K, Kp, q + (size_t)b * Kp);
        qscale[2 * b + 1] = 0.0f;
    }
    qmatmul(W, rowsum, wscale, bias, q, qscale, B, Kp, 0, N, y, N, threads);
    free(q);
    free(qscale);
    return 0;
}

/* One LSTM layer, one step: gates = W [x; h] + bias in PyTorch's order (input, forget, cell,
 * output), then c' = f·c + i·g and h' = o·tanh(c'). W is packed as segments [x | h] of
 * Ep and Hp columns. x (B, E), h and c (B, H) -> h_out, c_out (B, H). */
int scriven_lstm_step_i8(const int8_t *W, const int32_t *rowsum, const float *wscale, const float *bias,
                         const float *x, const float *h, const float *c, int B, int E, int Ep, int H, int Hp,
                         float *h_out, float *c_out, int threads) {
    const int K = Ep + Hp;
    uint8_t *q = malloc((size_t)(B + 15) / 16 * 16 * K);
    float *qscale = malloc(sizeof(float) * 2 * B);
    float *gates = malloc(sizeof(float) * 4 * (size_t)H * B);
    if (!q || !qscale || !gates) { free(q); free(qscale); free(gates); return 1; }
    memset(q + (size_t)B * K, 128, (size_t)((B + 15) / 16 * 16 - B) * K);
    for (int b = 0; b < B; b++) {
        qscale[2 * b] = quantize(x + (size_t)b * E, E, Ep, q + (size_t)b * K);
        qscale[2 * b + 1] = quantize(h + (size_t)b * H, H, Hp, q + (size_t)b * K + Ep);
    }
    qmatmul(W, rowsum, wscale, bias, q, qscale, B, Ep, Hp, 4 * H, gates, 4 * H, threads);
    for (int b = 0; b < B; b++) {
        const float *g = gates + (size_t)b * 4 * H;
        const size_t o = (size_t)b * H;
        for (int j = 0; j < H; j += 16) {
            __mmask16 m = H - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (H - j)) - 1);
            __m512 in = sigmoid16(_mm512_maskz_loadu_ps(m, g + j));
            __m512 forget = sigmoid16(_mm512_maskz_loadu_ps(m, g + H + j));
            __m512 cand = tanh16(_mm512_maskz_loadu_ps(m, g + 2 * H + j));
            __m512 out = sigmoid16(_mm512_maskz_loadu_ps(m, g + 3 * H + j));
            __m512 cell = _mm512_fmadd_ps(forget, _mm512_maskz_loadu_ps(m, c + o + j), _mm512_mul_ps(in, cand));
            _mm512_mask_storeu_ps(c_out + o + j, m, cell);
            _mm512_mask_storeu_ps(h_out + o + j, m, _mm512_mul_ps(out, tanh16(cell)));
        }
    }
    free(q);
    free(qscale);
    free(gates);
    return 0;
}

/* The k largest values of one row of V floats and their indices, sorted from the largest. One
 * pass: sixteen values at a time are compared with the current k-th best, and only those above
 * it are inserted. NaN is never taken. For small k (the caller keeps k ≤ 64). */
static void topk_row(const float *row, int V, int k, float *val, int64_t *idx) {
    int filled = 0;
    for (int i = 0; i < k; i++) { val[i] = -INFINITY; idx[i] = i; }
    for (int i = 0; i < V; i += 16) {
        __mmask16 above;
        if (i + 16 <= V)
            above = filled < k ? (__mmask16)0xFFFF
                               : _mm512_cmp_ps_mask(_mm512_loadu_ps(row + i), _mm512_set1_ps(val[k - 1]), _CMP_GT_OQ);
        else
            above = (__mmask16)((1u << (V - i)) - 1);
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

/* Plain sampling's two passes over a row (see scriven_sample_plain in kernels_shared.h): the
 * largest of n floats, then e[i] = exp(x[i] - shift) (0 for x[i] = -inf) with the sum of each
 * chunk of EXP_CHUNK (64) in chunk[], returning their total. kernels_avx2.c adds each chunk in
 * the same order (four vectors pairwise, the halves of eight, then sum8), so both builds draw
 * the same tokens. */
static inline float sum8(__m256 v);  /* kernels_shared.h: the same order in both builds */
#define EXP_CHUNK 64  /* four vectors of sixteen; kernels_shared.h walks chunks of it */

static float row_max(const float *x, int n) {
    __m512 m = _mm512_set1_ps(-INFINITY);
    int i = 0;
    for (; i + 16 <= n; i += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(x + i));
    if (i < n) m = _mm512_max_ps(m, _mm512_mask_loadu_ps(m, (__mmask16)((1u << (n - i)) - 1), x + i));
    return _mm512_reduce_max_ps(m);
}

static float scaled_exp(const float *x, int n, float shift, float *e, float *chunk) {
    const __m512 shv = _mm512_set1_ps(shift), ninf = _mm512_set1_ps(-INFINITY);
    float total = 0.0f;
    for (int i = 0, c = 0; i < n; i += EXP_CHUNK, c++) {
        __m512 ex[4];  /* four independent vectors a chunk: one reduction each, and overlap */
        for (int k = 0; k < 4; k++) {
            const int at = i + 16 * k;
            const __mmask16 in = at + 16 <= n ? (__mmask16)0xFFFF
                                 : at < n ? (__mmask16)((1u << (n - at)) - 1) : (__mmask16)0;
            const __m512 v = _mm512_maskz_loadu_ps(in, x + at);
            const __mmask16 live = _mm512_mask_cmp_ps_mask(in, v, ninf, _CMP_NEQ_OQ);
            ex[k] = _mm512_maskz_mov_ps(live, exp16(_mm512_sub_ps(v, shv)));
            _mm512_mask_storeu_ps(e + at, in, ex[k]);
        }
        const __m512 sum = _mm512_add_ps(_mm512_add_ps(ex[0], ex[1]), _mm512_add_ps(ex[2], ex[3]));
        const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(sum), 1));
        chunk[c] = sum8(_mm256_add_ps(_mm512_castps512_ps256(sum), hi));
        total += chunk[c];
    }
    return total;
}

#include "kernels_shared.h"

/* ---- Training: label-smoothed cross-entropy of bf16 logits, turned into its gradient ---- */

static inline __m512 load_bf16(const uint16_t *p) {  /* sixteen bf16 → float */
    __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}

static inline void store_bf16(uint16_t *p, __m512 x) {  /* round to nearest even, as PyTorch */
    __m512i b = _mm512_castps_si512(x);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    b = _mm512_add_epi32(b, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16(_mm512_srli_epi32(b, 16)));
}

static inline float bf16_to_float(uint16_t v) {
    uint32_t b = (uint32_t)v << 16;
    float f;
    memcpy(&f, &b, 4);
    return f;
}

static inline uint16_t float_to_bf16(float f) {
    uint32_t b;
    memcpy(&b, &f, 4);
    b += 0x7FFF + ((b >> 16) & 1);
    return (uint16_t)(b >> 16);
}

/* For each row r of z (B, V) bf16 logits (plus bias (V,) when given): loss[r] = lse - keep·z[y]
 * - spread·Σz (label smoothing ε: keep = 1 - ε, spread = ε / V), and z[r] is overwritten with
 * d loss / d z = scale · (softmax(z) - keep·onehot(y) - spread). With bias_grad (threads, V)
 * each thread adds its rows' gradients into its own row of it; scratch (threads, V) is fp32
 * work space. Returns the first row whose label is out of range plus one, or 0. */
int scriven_xent_grad_bf16(uint16_t *z, int B, int V, const int64_t *labels, const float *bias,
                           float keep, float spread, float scale, float *loss, float *bias_grad,
                           float *scratch, int threads) {
    int bad = 0;
    #pragma omp parallel num_threads(B > 1 ? threads : 1)
    {
        const int t = thread_index();
        float *bg = bias_grad ? bias_grad + (size_t)t * V : NULL;
        float *ex_row = scratch + (size_t)t * V;
        #pragma omp for schedule(static)
        for (int r = 0; r < B; r++) {
            uint16_t *row = z + (size_t)r * V;
            const int64_t y = labels[r];
            if (y < 0 || y >= V) {
                #pragma omp critical
                if (!bad || r + 1 < bad) bad = r + 1;
                loss[r] = 0.0f;
                continue;
            }
            __m512 m = _mm512_set1_ps(-INFINITY), s = _mm512_setzero_ps();
            float mt = -INFINITY, st = 0.0f;
            int i = 0;
            for (; i + 16 <= V; i += 16) {
                __m512 x = load_bf16(row + i);
                if (bias) x = _mm512_add_ps(x, _mm512_loadu_ps(bias + i));
                m = _mm512_max_ps(m, x);
                s = _mm512_add_ps(s, x);
            }
            for (; i < V; i++) {
                float x = bf16_to_float(row[i]) + (bias ? bias[i] : 0.0f);
                mt = fmaxf(mt, x);
                st += x;
            }
            const float top = fmaxf(_mm512_reduce_max_ps(m), mt);
            const float sum = _mm512_reduce_add_ps(s) + st;
            /* exp(z - top) once per element, kept in fp32 for the gradient pass (a row of
             * 8,000 is 32 KB: it stays in L1), which then needs no second exp. */
            __m512 e = _mm512_setzero_ps();
            float et = 0.0f;
            const __m512 topv = _mm512_set1_ps(top);
            for (i = 0; i + 16 <= V; i += 16) {
                __m512 x = load_bf16(row + i);
                if (bias) x = _mm512_add_ps(x, _mm512_loadu_ps(bias + i));
                const __m512 ex = exp16(_mm512_sub_ps(x, topv));
                _mm512_storeu_ps(ex_row + i, ex);
                e = _mm512_add_ps(e, ex);
            }
            for (; i < V; i++) {
                ex_row[i] = expf(bf16_to_float(row[i]) + (bias ? bias[i] : 0.0f) - top);
                et += ex_row[i];
            }
            const float total = _mm512_reduce_add_ps(e) + et;
            const float lse = top + logf(total);
            const float zy = bf16_to_float(row[y]) + (bias ? bias[y] : 0.0f);
            loss[r] = lse - keep * zy - spread * sum;
            const __m512 sp = _mm512_set1_ps(spread), sc = _mm512_set1_ps(scale),
                         inv = _mm512_set1_ps(1.0f / total);  /* softmax = exp(z - top) / total */
            for (i = 0; i + 16 <= V; i += 16) {
                __m512 p = _mm512_mul_ps(_mm512_loadu_ps(ex_row + i), inv);
                __m512 g = _mm512_mul_ps(_mm512_sub_ps(p, sp), sc);
                if (y >= i && y < i + 16) {
                    float tmp[16];
                    _mm512_storeu_ps(tmp, g);
                    tmp[y - i] -= keep * scale;
                    g = _mm512_loadu_ps(tmp);
                }
                if (bg) _mm512_storeu_ps(bg + i, _mm512_add_ps(_mm512_loadu_ps(bg + i), g));
                store_bf16(row + i, g);
            }
            for (; i < V; i++) {
                float g = (ex_row[i] / total - spread) * scale - (i == y ? keep * scale : 0.0f);
                if (bg) bg[i] += g;
                row[i] = float_to_bf16(g);
            }
        }
    }
    return bad;
}

/* ---- Training: dropout with a counter-based mask ----
 * Element i of a call with seeds (a, b) is kept when mix(i·m + a) ≥ p · 2^32, with m = b | 1
 * odd: the backward pass rebuilds the forward's mask from the seeds instead of storing it, and
 * any thread can draw any element. mix is one round of a 32-bit xor-shift-multiply mixer; the
 * per-call multiplier keeps the masks of two calls from being shifted copies of one sequence.
 * dropout.py computes the same numbers with PyTorch ops where these kernels are not available. */
static inline __m512i mix16(__m512i x) {
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
    x = _mm512_mullo_epi32(x, _mm512_set1_epi32(0x7feb352d));
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
    x = _mm512_mullo_epi32(x, _mm512_set1_epi32((int)0x846ca68bu));
    return _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
}

static inline uint32_t mix1(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    return x ^ (x >> 16);
}

static inline int drop_kept(int64_t i, uint32_t threshold, uint32_t seed_a, uint32_t seed_b) {
    return mix1((uint32_t)i * (seed_b | 1u) + seed_a) >= threshold;
}

/* l · m for the sixteen lanes l, m = seed_b | 1: what drop_kept16 adds to i · m (hoisted out of
 * loops by the caller; the compiler does not move the multiply out of an OpenMP loop itself). */
static inline __m512i drop_steps(uint32_t seed_b) {
    return _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                              _mm512_set1_epi32((int)(seed_b | 1u)));
}

/* drop_kept for elements i .. i+15 as a lane mask, (i + l) · m = i · m + l · m. */
static inline __mmask16 drop_kept16(int64_t i, __m512i steps, uint32_t threshold,
                                    uint32_t seed_a, uint32_t seed_b) {
    const __m512i h = mix16(_mm512_add_epi32(
        _mm512_set1_epi32((int)((uint32_t)i * (seed_b | 1u) + seed_a)), steps));
    return _mm512_cmpge_epu32_mask(h, _mm512_set1_epi32((int)threshold));
}

static inline __m512 load16(const void *p, int64_t i, int bf16) {
    return bf16 ? load_bf16((const uint16_t *)p + i) : _mm512_loadu_ps((const float *)p + i);
}

static inline void store16(void *p, int64_t i, __m512 x, int bf16) {
    if (bf16) store_bf16((uint16_t *)p + i, x);
    else _mm512_storeu_ps((float *)p + i, x);
}

static inline float load1(const void *p, int64_t i, int bf16) {
    return bf16 ? bf16_to_float(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void store1(void *p, int64_t i, float x, int bf16) {
    if (bf16) ((uint16_t *)p)[i] = float_to_bf16(x);
    else ((float *)p)[i] = x;
}

/* out[i] = kept(i) ? x[i] · scale : 0, for n bf16 (is_bf16) or float values, computed in float
 * and rounded once. x and out may be the same. threshold = p · 2^32 (elements with hash <
 * threshold drop). */
void scriven_dropout(const void *x, void *out, int64_t n, int is_bf16, uint32_t threshold,
                     float scale, uint32_t seed_a, uint32_t seed_b, int threads) {
    const int64_t blocks = (n + 15) / 16;
    const __m512i steps = drop_steps(seed_b);
    #pragma omp parallel for schedule(static) num_threads(n >= (1 << 16) ? threads : 1)
    for (int64_t blk = 0; blk < blocks; blk++) {
        const int64_t i = blk * 16;
        if (i + 16 <= n) {
            const __mmask16 keep = drop_kept16(i, steps, threshold, seed_a, seed_b);
            store16(out, i, _mm512_maskz_mul_ps(keep, load16(x, i, is_bf16), _mm512_set1_ps(scale)),
                    is_bf16);
        } else {
            for (int64_t j = i; j < n; j++)
                store1(out, j, drop_kept(j, threshold, seed_a, seed_b) ? load1(x, j, is_bf16) * scale
                                                                        : 0.0f, is_bf16);
        }
    }
}

/* ---- Training: attention over short sequences, heads read in place ----
 * q (B, Tq, H·Dh), k and v (B, Tk, H·Dh), out (B, Tq, H·Dh): contiguous, bf16 (is_bf16) or
 * float, so the heads are read where the projections wrote them, with no transposes. One
 * (batch row, head) pair per task: scores, softmax, dropout and the weighted sum of values for
 * each query row in one pass, in float. mask (uint8, 1 = may attend) has element (b, i, j) at
 * b·m_bs + i·m_rs + j (a stride 0 broadcasts); NULL allows everything. lse (B, H, Tq) keeps
 * each row's log-sum-exp for the backward pass, +inf for a row that may attend to nothing
 * (its output is zero). Weight (b, h, i, j) is dropped when the hash of its index in
 * (B, H, Tq, Tk) order is below threshold, as scriven_dropout draws masks; kept weights are
 * multiplied by keep_scale = 1 / (1 - p). */
#define ATTN_MAX_T 256
#define ATTN_MAX_D 256

static inline void load_row(float *dst, const void *src, int64_t at, int Dh, float scale, int bf16) {
    for (int d = 0; d < Dh; d += 16)
        _mm512_storeu_ps(dst + d, _mm512_mul_ps(load16(src, at + d, bf16), _mm512_set1_ps(scale)));
}

static inline int round16(int n) { return (n + 15) & ~15; }

static inline __mmask16 lanes_below(int n) {  /* the first min(n, 16) lanes */
    return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1);
}

/* out[d] = Σ_{r < n} w[r · w_step] · rows[r · Dh + d]: sixteen columns at a time, summed in
 * registers (two chains for the FMA latency), not read and written back once per row. */
static inline void weighted_sum(const float *w, int64_t w_step, const float *rows, int n, int Dh,
                                float *out) {
    for (int d = 0; d < Dh; d += 16) {
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        int r = 0;
        for (; r + 1 < n; r += 2) {
            a0 = _mm512_fmadd_ps(_mm512_set1_ps(w[r * w_step]),
                                 _mm512_loadu_ps(rows + (int64_t)r * Dh + d), a0);
            a1 = _mm512_fmadd_ps(_mm512_set1_ps(w[(r + 1) * w_step]),
                                 _mm512_loadu_ps(rows + (int64_t)(r + 1) * Dh + d), a1);
        }
        if (r < n)
            a0 = _mm512_fmadd_ps(_mm512_set1_ps(w[r * w_step]),
                                 _mm512_loadu_ps(rows + (int64_t)r * Dh + d), a0);
        _mm512_storeu_ps(out + d, _mm512_add_ps(a0, a1));
    }
}

/* One past the last nonzero of w[0 .. Tk) (causal rows end early). */
static inline int used_length(const float *w, int Tk) {
    for (int j0 = round16(Tk) - 16; j0 >= 0; j0 -= 16) {
        const __mmask16 nz = _mm512_cmp_ps_mask(_mm512_loadu_ps(w + j0), _mm512_setzero_ps(),
                                                _CMP_NEQ_UQ) & lanes_below(Tk - j0);
        if (nz) return j0 + 32 - __builtin_clz((unsigned)nz);
    }
    return 0;
}

static inline void store_row(void *dst, int64_t at, const float *src, int Dh, int bf16) {
    for (int d = 0; d < Dh; d += 16) store16(dst, at + d, _mm512_loadu_ps(src + d), bf16);
}

/* Up to ATTN_DOT_MAX_T keys, one dot product per key with the rows costs less than a pass over
 * the 16-key columns (per head, forward and backward: 0.8x the time at 6 keys, equal at 14, 1.5x
 * at 30; bf16, head size 32). */
#define ATTN_DOT_MAX_T 12

/* One head's Tk rows of x as floats: rows (Tk × Dh) and, when cols is given, also transposed
 * (Dh × round16(Tk), zero past Tk), so that a query's scores against 16 keys are Dh vector
 * multiply-adds rather than 16 dot products, each ending in a horizontal sum. */
static void load_head(const void *x, int64_t x0, int64_t ld, int Tk, int Dh, float *rows,
                      float *cols, int bf16) {
    const int Tkp = round16(Tk);
    if (Tk <= ATTN_DOT_MAX_T) cols = NULL;  /* row_products reads the rows */
    if (cols)
        for (int64_t e = 0; e < (int64_t)Dh * Tkp; e += 16)
            _mm512_storeu_ps(cols + e, _mm512_setzero_ps());
    const __m512i stride = _mm512_mullo_epi32(_mm512_set1_epi32(Tkp),
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    for (int j = 0; j < Tk; j++)
        for (int d = 0; d < Dh; d += 16) {
            const __m512 r = load16(x, x0 + j * ld + d, bf16);
            _mm512_storeu_ps(rows + (int64_t)j * Dh + d, r);
            if (cols) _mm512_i32scatter_ps(cols + (int64_t)d * Tkp + j, stride, r, 4);
        }
}

/* The 16 products of row a (Dh floats) with columns j..j+15 of cols (Dh × Tkp). */
static inline __m512 row_times_cols(const float *a, const float *cols, int j, int Tkp, int Dh) {
    __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;  /* four chains: FMA latency */
    for (int d = 0; d < Dh; d += 4) {
        const float *c = cols + (int64_t)d * Tkp + j;
        s0 = _mm512_fmadd_ps(_mm512_set1_ps(a[d]), _mm512_loadu_ps(c), s0);
        s1 = _mm512_fmadd_ps(_mm512_set1_ps(a[d + 1]), _mm512_loadu_ps(c + Tkp), s1);
        s2 = _mm512_fmadd_ps(_mm512_set1_ps(a[d + 2]), _mm512_loadu_ps(c + 2 * Tkp), s2);
        s3 = _mm512_fmadd_ps(_mm512_set1_ps(a[d + 3]), _mm512_loadu_ps(c + 3 * Tkp), s3);
    }
    return _mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3));
}

/* Products of row a with keys j..j+15 (rows: Tk × Dh; cols: their transpose, used past
 * ATTN_DOT_MAX_T keys), zero past Tk. */
static inline __m512 row_products(const float *a, const float *rows, const float *cols, int j,
                                  int Tk, int Dh) {
    if (Tk > ATTN_DOT_MAX_T) return row_times_cols(a, cols, j, round16(Tk), Dh);
    float s[16];
    for (int jj = 0; jj < Tk; jj++) {
        __m512 acc = _mm512_setzero_ps();
        for (int d = 0; d < Dh; d += 16)
            acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + d),
                                  _mm512_loadu_ps(rows + (int64_t)jj * Dh + d), acc);
        s[jj] = _mm512_reduce_add_ps(acc);
    }
    return _mm512_maskz_loadu_ps(lanes_below(Tk), s);
}

/* Scores of query row qf (already × scale) against Tk keys into s[0 .. round16(Tk)), -inf where
 * masked or past Tk; returns their maximum (-inf when every key is masked). */
static inline float attn_scores(const float *qf, const float *kf, const float *kt, int Tk, int Dh,
                                const uint8_t *allowed, float *s) {
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    __m512 top = ninf;
    for (int j = 0; j < Tk; j += 16) {
        __mmask16 ok = lanes_below(Tk - j);
        if (allowed)  /* masked loads do not touch bytes past the row */
            ok &= (__mmask16)_mm512_mask_cmpneq_epi8_mask(
                ok, _mm512_maskz_loadu_epi8(ok, allowed + j), _mm512_setzero_si512());
        const __m512 x = _mm512_mask_mov_ps(ninf, ok, row_products(qf, kf, kt, j, Tk, Dh));
        _mm512_storeu_ps(s + j, x);
        top = _mm512_max_ps(top, x);
    }
    return _mm512_reduce_max_ps(top);
}

/* s[j] ← exp(s[j] - shift) (0 where s[j] is -inf) over round16(Tk) values; returns their sum. */
static inline float attn_exp(float *s, int Tk, float shift) {
    __m512 sum = _mm512_setzero_ps();
    const __m512 sh = _mm512_set1_ps(shift), ninf = _mm512_set1_ps(-INFINITY);
    for (int j = 0; j < Tk; j += 16) {
        const __m512 x = _mm512_loadu_ps(s + j);
        const __mmask16 real = _mm512_cmp_ps_mask(x, ninf, _CMP_NEQ_OQ);
        const __m512 e = _mm512_maskz_mov_ps(real, exp16(_mm512_sub_ps(x, sh)));
        _mm512_storeu_ps(s + j, e);
        sum = _mm512_add_ps(sum, e);
    }
    return _mm512_reduce_add_ps(sum);
}

/* Dropout keep bits of the 16 weights at flat indices index..index+15 (threshold 0: no
 * dropout, all kept). */
static inline __mmask16 attn_kept16(int64_t index, __m512i steps, uint32_t threshold,
                                    uint32_t seed_a, uint32_t seed_b) {
    return threshold == 0 ? (__mmask16)0xFFFF
                          : drop_kept16(index, steps, threshold, seed_a, seed_b);
}

/* scratch: Dh·round16(Tk) + 2·Tk·Dh floats */
static inline __attribute__((always_inline)) void attn_fwd_item(
        int b, int h, const void *q, const void *k, const void *v, void *out, float *lse,
        const uint8_t *mask, int64_t m_bs, int64_t m_rs, int H, int Tq, int Tk, int Dh,
        float scale, uint32_t threshold, float keep_scale, uint32_t seed_a, uint32_t seed_b,
        float *scratch, int bf16) {
    float qf[ATTN_MAX_D], acc[ATTN_MAX_D], s[ATTN_MAX_T + 16];
    const int64_t ld = (int64_t)H * Dh;
    const int64_t q0 = (int64_t)b * Tq * ld + (int64_t)h * Dh, k0 = (int64_t)b * Tk * ld + (int64_t)h * Dh;
    float *kt = scratch, *kf = kt + (int64_t)Dh * round16(Tk), *vf = kf + (int64_t)Tk * Dh;
    load_head(k, k0, ld, Tk, Dh, kf, kt, bf16);
    load_head(v, k0, ld, Tk, Dh, vf, NULL, bf16);
    const __m512i steps = drop_steps(seed_b);
    for (int i = 0; i < Tq; i++) {
        const int64_t qi = q0 + i * ld;
        float *row_lse = lse + ((int64_t)b * H + h) * Tq + i;
        const uint8_t *allowed = mask ? mask + b * m_bs + i * m_rs : NULL;
        load_row(qf, q, qi, Dh, scale, bf16);
        const float top = attn_scores(qf, kf, kt, Tk, Dh, allowed, s);
        if (top == -INFINITY) {  /* nothing to attend to: zero output */
            *row_lse = INFINITY;
            memset(acc, 0, sizeof(float) * Dh);
            store_row(out, qi, acc, Dh, bf16);
            continue;
        }
        const float total = attn_exp(s, Tk, top);
        *row_lse = top + logf(total);
        const __m512 norm = _mm512_set1_ps(keep_scale / total);
        const int64_t base = (((int64_t)b * H + h) * Tq + i) * Tk;
        for (int j = 0; j < Tk; j += 16)  /* weights after dropout */
            _mm512_storeu_ps(s + j, _mm512_maskz_mul_ps(attn_kept16(base + j, steps, threshold, seed_a, seed_b),
                                                        _mm512_loadu_ps(s + j), norm));
        weighted_sum(s, 1, vf, used_length(s, Tk), Dh, acc);
        store_row(out, qi, acc, Dh, bf16);
    }
}

int scriven_attention_fwd(const void *q, const void *k, const void *v, void *out, float *lse,
                          const uint8_t *mask, int64_t m_bs, int64_t m_rs, int B, int H, int Tq,
                          int Tk, int Dh, int is_bf16, float scale, uint32_t threshold,
                          float keep_scale, uint32_t seed_a, uint32_t seed_b, int threads) {
    if (Tk > ATTN_MAX_T || Dh > ATTN_MAX_D || Dh % 16) return 1;
    const size_t per_thread = (size_t)Dh * round16(Tk) + 2 * (size_t)Tk * Dh;
    float *scratch = malloc(sizeof(float) * per_thread * threads);
    if (!scratch) return 2;
    #pragma omp parallel num_threads(threads)
    {
        const int t = thread_index();
        float *mine = scratch + (size_t)t * per_thread;
        #pragma omp for schedule(static)
        for (int item = 0; item < B * H; item++) {
            if (is_bf16)
                attn_fwd_item(item / H, item % H, q, k, v, out, lse, mask, m_bs, m_rs, H, Tq, Tk,
                              Dh, scale, threshold, keep_scale, seed_a, seed_b, mine, 1);
            else
                attn_fwd_item(item / H, item % H, q, k, v, out, lse, mask, m_bs, m_rs, H, Tq, Tk,
                              Dh, scale, threshold, keep_scale, seed_a, seed_b, mine, 0);
        }
    }
    free(scratch);
    return 0;
}

/* Gradients of scriven_attention_fwd for grad_out (B, Tq, H·Dh): with P the softmax, Pd the
 * weights after dropout and dPd = grad_out · vᵀ, dV = Pdᵀ grad_out, dP = dPd · keep mask ·
 * keep_scale, dS = P (dP - Σ_j P dP) (Σ_j P dP = Σ_j Pd dPd), dQ = scale · dS K and dK = scale ·
 * dSᵀ Q. Per task, in float: k's and v's rows (and transposes), q · scale and grad_out's rows,
 * and dS and Pd, so that dK and dV are weighted sums over query rows
 * (scratch: 2·Dh·round16(Tk) + 2·Tk·Dh + 2·Tq·Dh + 2·Tq·round16(Tk) floats). */
static inline __attribute__((always_inline)) void attn_bwd_item(
        int b, int h, const void *q, const void *k, const void *v, const void *gout,
        const float *lse, const uint8_t *mask, int64_t m_bs, int64_t m_rs, void *dq, void *dk,
        void *dv, float *scratch, int H, int Tq, int Tk, int Dh, float scale, uint32_t threshold,
        float keep_scale, uint32_t seed_a, uint32_t seed_b, int bf16) {
    float acc[ATTN_MAX_D];
    const int64_t ld = (int64_t)H * Dh;
    const int64_t q0 = (int64_t)b * Tq * ld + (int64_t)h * Dh, k0 = (int64_t)b * Tk * ld + (int64_t)h * Dh;
    const int Tkp = round16(Tk);
    float *kt = scratch, *vt = kt + (int64_t)Dh * Tkp, *kf = vt + (int64_t)Dh * Tkp;
    float *vf = kf + (int64_t)Tk * Dh, *qs = vf + (int64_t)Tk * Dh, *gs = qs + (int64_t)Tq * Dh;
    float *ds = gs + (int64_t)Tq * Dh, *w = ds + (int64_t)Tq * Tkp;
    load_head(k, k0, ld, Tk, Dh, kf, kt, bf16);
    load_head(v, k0, ld, Tk, Dh, vf, vt, bf16);
    const __m512 ninf = _mm512_set1_ps(-INFINITY), keep = _mm512_set1_ps(keep_scale);
    const __m512i steps = drop_steps(seed_b);
    for (int i = 0; i < Tq; i++) {
        const int64_t qi = q0 + i * ld;
        const float row_lse = lse[((int64_t)b * H + h) * Tq + i];
        float *qs_i = qs + (int64_t)i * Dh, *gs_i = gs + (int64_t)i * Dh;
        float *ds_i = ds + (int64_t)i * Tkp, *w_i = w + (int64_t)i * Tkp;
        if (row_lse == INFINITY) {  /* attended to nothing: no gradient anywhere */
            memset(qs_i, 0, sizeof(float) * Dh);
            memset(gs_i, 0, sizeof(float) * Dh);
            memset(ds_i, 0, sizeof(float) * Tkp);
            memset(w_i, 0, sizeof(float) * Tkp);
            store_row(dq, qi, qs_i, Dh, bf16);
            continue;
        }
        const uint8_t *allowed = mask ? mask + b * m_bs + i * m_rs : NULL;
        load_row(qs_i, q, qi, Dh, scale, bf16);  /* × scale, as in the forward pass */
        load_row(gs_i, gout, qi, Dh, 1.0f, bf16);
        attn_scores(qs_i, kf, kt, Tk, Dh, allowed, ds_i);  /* scores, then P, then dS */
        const int64_t base = (((int64_t)b * H + h) * Tq + i) * Tk;
        const __m512 lse_v = _mm512_set1_ps(row_lse);
        __m512 sum_v = _mm512_setzero_ps();
        for (int j = 0; j < Tkp; j += 16) {
            const __m512 x = _mm512_loadu_ps(ds_i + j);
            const __mmask16 real = _mm512_cmp_ps_mask(x, ninf, _CMP_NEQ_OQ);
            const __mmask16 kept = real & attn_kept16(base + j, steps, threshold, seed_a, seed_b);
            const __m512 pj = _mm512_maskz_mov_ps(real, exp16(_mm512_sub_ps(x, lse_v)));
            const __m512 dpj = _mm512_maskz_mul_ps(kept, row_products(gs_i, vf, vt, j, Tk, Dh), keep);
            _mm512_storeu_ps(ds_i + j, pj);
            _mm512_storeu_ps(w_i + j, dpj);  /* dP until P · (dP - Σ P dP) needs the sum */
            sum_v = _mm512_fmadd_ps(pj, dpj, sum_v);
        }
        const __m512 sum = _mm512_set1_ps(_mm512_reduce_add_ps(sum_v));
        for (int j = 0; j < Tkp; j += 16) {
            const __m512 pj = _mm512_loadu_ps(ds_i + j), dpj = _mm512_loadu_ps(w_i + j);
            const __mmask16 kept = attn_kept16(base + j, steps, threshold, seed_a, seed_b);
            _mm512_storeu_ps(ds_i + j, _mm512_mul_ps(pj, _mm512_sub_ps(dpj, sum)));
            _mm512_storeu_ps(w_i + j, _mm512_maskz_mul_ps(kept, pj, keep));  /* Pd */
        }
        weighted_sum(ds_i, 1, kf, used_length(ds_i, Tk), Dh, acc);
        for (int d = 0; d < Dh; d += 16)
            _mm512_storeu_ps(acc + d, _mm512_mul_ps(_mm512_loadu_ps(acc + d), _mm512_set1_ps(scale)));
        store_row(dq, qi, acc, Dh, bf16);
    }
    for (int j = 0; j < Tk; j++) {  /* dK = dSᵀ (q · scale), dV = Pdᵀ grad_out */
        weighted_sum(ds + j, Tkp, qs, Tq, Dh, acc);
        store_row(dk, k0 + j * ld, acc, Dh, bf16);
        weighted_sum(w + j, Tkp, gs, Tq, Dh, acc);
        store_row(dv, k0 + j * ld, acc, Dh, bf16);
    }
}

int scriven_attention_bwd(const void *q, const void *k, const void *v, const void *gout,
                          const float *lse, const uint8_t *mask, int64_t m_bs, int64_t m_rs,
                          void *dq, void *dk, void *dv, int B, int H, int Tq, int Tk, int Dh,
                          int is_bf16, float scale, uint32_t threshold, float keep_scale,
                          uint32_t seed_a, uint32_t seed_b, int threads) {
    if (Tk > ATTN_MAX_T || Dh > ATTN_MAX_D || Dh % 16) return 1;
    const size_t per_thread = 2 * (size_t)Dh * round16(Tk) + 2 * (size_t)Tk * Dh
                              + 2 * (size_t)Tq * Dh + 2 * (size_t)Tq * round16(Tk);
    float *scratch = malloc(sizeof(float) * per_thread * threads);
    if (!scratch) return 2;
    #pragma omp parallel num_threads(threads)
    {
        const int t = thread_index();
        float *mine = scratch + (size_t)t * per_thread;
        #pragma omp for schedule(static)
        for (int item = 0; item < B * H; item++) {
            if (is_bf16)
                attn_bwd_item(item / H, item % H, q, k, v, gout, lse, mask, m_bs, m_rs, dq, dk, dv,
                              mine, H, Tq, Tk, Dh, scale, threshold, keep_scale, seed_a, seed_b, 1);
            else
                attn_bwd_item(item / H, item % H, q, k, v, gout, lse, mask, m_bs, m_rs, dq, dk, dv,
                              mine, H, Tq, Tk, Dh, scale, threshold, keep_scale, seed_a, seed_b, 0);
        }
    }
    free(scratch);
    return 0;
}

/* ---- Training: layer norm over rows of D values (D a multiple of 16, at most LN_MAX_D) ----
 * y = (x - mean) · rstd · gamma + beta, each row in float; mean and rstd (N,) are kept for the
 * backward pass. x, y, gamma, beta: bf16 (is_bf16) or float. */
#define LN_MAX_D 1024

void scriven_layer_norm_fwd(const void *x, const void *gamma, const void *beta, void *y,
                            float *mean, float *rstd, int64_t N, int D, float eps, int is_bf16,
                            int threads) {
    #pragma omp parallel for schedule(static) num_threads(N * D >= (1 << 15) ? threads : 1)
    for (int64_t r = 0; r < N; r++) {
        const int64_t at = r * D;
        __m512 row[LN_MAX_D / 16];
        __m512 sum = _mm512_setzero_ps();
        for (int c = 0; c < D / 16; c++) {
            row[c] = load16(x, at + 16 * c, is_bf16);
            sum = _mm512_add_ps(sum, row[c]);
        }
        const float mu = _mm512_reduce_add_ps(sum) / D;
        const __m512 muv = _mm512_set1_ps(mu);
        __m512 sq = _mm512_setzero_ps();
        for (int c = 0; c < D / 16; c++) {
            row[c] = _mm512_sub_ps(row[c], muv);
            sq = _mm512_fmadd_ps(row[c], row[c], sq);
        }
        const float rs = 1.0f / sqrtf(_mm512_reduce_add_ps(sq) / D + eps);
        const __m512 rsv = _mm512_set1_ps(rs);
        for (int c = 0; c < D / 16; c++)
            store16(y, at + 16 * c, _mm512_fmadd_ps(_mm512_mul_ps(row[c], rsv),
                                                   load16(gamma, 16 * c, is_bf16),
                                                   load16(beta, 16 * c, is_bf16)), is_bf16);
        mean[r] = mu;
        rstd[r] = rs;
    }
}

/* With xhat = (x - mean) · rstd and g' = dy · gamma per row:
 * dx = rstd · (g' - mean(g') - xhat · mean(g' · xhat)); dgamma = Σ dy · xhat, dbeta = Σ dy over
 * rows, each thread summing its rows into its own row of part (threads, 2, D) float. */
void scriven_layer_norm_bwd(const void *x, const void *gamma, const float *mean,
                            const float *rstd, const void *dy, void *dx, float *part, int64_t N,
                            int D, int is_bf16, int threads) {
    const int used = N * D >= (1 << 15) ? threads : 1;
    memset(part, 0, sizeof(float) * (size_t)threads * 2 * D);
    #pragma omp parallel num_threads(used)
    {
        float *dgamma = part + (size_t)thread_index() * 2 * D, *dbeta = dgamma + D;
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < N; r++) {
            const int64_t at = r * D;
            __m512 xh[LN_MAX_D / 16], gg[LN_MAX_D / 16];
            const __m512 muv = _mm512_set1_ps(mean[r]), rsv = _mm512_set1_ps(rstd[r]);
            __m512 s1 = _mm512_setzero_ps(), s2 = _mm512_setzero_ps();
            for (int c = 0; c < D / 16; c++) {
                const __m512 g = load16(dy, at + 16 * c, is_bf16);
                xh[c] = _mm512_mul_ps(_mm512_sub_ps(load16(x, at + 16 * c, is_bf16), muv), rsv);
                gg[c] = _mm512_mul_ps(g, load16(gamma, 16 * c, is_bf16));
                s1 = _mm512_add_ps(s1, gg[c]);
                s2 = _mm512_fmadd_ps(gg[c], xh[c], s2);
                _mm512_storeu_ps(dgamma + 16 * c, _mm512_fmadd_ps(g, xh[c],
                                                                  _mm512_loadu_ps(dgamma + 16 * c)));
                _mm512_storeu_ps(dbeta + 16 * c, _mm512_add_ps(g, _mm512_loadu_ps(dbeta + 16 * c)));
            }
            const __m512 m1 = _mm512_set1_ps(_mm512_reduce_add_ps(s1) / D);
            const __m512 m2 = _mm512_set1_ps(_mm512_reduce_add_ps(s2) / D);
            for (int c = 0; c < D / 16; c++)
                store16(dx, at + 16 * c, _mm512_mul_ps(rsv, _mm512_sub_ps(
                    _mm512_sub_ps(gg[c], m1), _mm512_mul_ps(xh[c], m2))), is_bf16);
        }
    }
}

/* ---- Training: a linear layer's weight gradient on the AMX tile units ----
 * out (M, N) bf16 = aᵀ · b, summed over T rows: a (T, M) is the output gradient, b (T, N) the
 * input, each with its own row stride. oneDNN runs this transposed product at half to 3/4 of
 * the speed of its plain ones (its first operand is strided); here both operands are repacked in
 * chunks of WG_KC rows, which is cheap next to the product.
 *
 * A tile multiply adds A (16 rows × 32 k) · B (32 k × 16 columns) into 16 × 16 floats, with B
 * stored as pairs of k: row p of a B tile holds (b[2p][n], b[2p+1][n]) for 16 columns n. The
 * same pairing of a's rows, read as 32-bit values and transposed 16 × 16, is an A tile, so one
 * transposition per A tile is the only extra work. Threads split the rows, so each packs only
 * its own rows (nothing twice, no waiting) into a partial product of its own; the partials are
 * summed at the end. A thread's 2 × 2 tile blocks accumulate over a chunk in tiles 0-3 (A in 4-5,
 * B in 6-7) and are kept in float between chunks. */
#define WG_KC 512

/* Rows r and r + 1 of x (16 bf16 from column c; zeros from row `end`) paired: 16 32-bit values. */
static inline __m512i paired_rows(const uint16_t *x, int64_t ld, int64_t r, int64_t end, int c) {
    const __m512i pairs = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9,
                                           40, 8, 39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1,
                                           32, 0);
    const __m256i lo = r < end ? _mm256_loadu_si256((const __m256i *)(x + r * ld + c))
                               : _mm256_setzero_si256();
    const __m256i hi = r + 1 < end ? _mm256_loadu_si256((const __m256i *)(x + (r + 1) * ld + c))
                                   : _mm256_setzero_si256();
    return _mm512_permutex2var_epi16(_mm512_castsi256_si512(lo), pairs, _mm512_castsi256_si512(hi));
}

/* Transpose 16 × 16 32-bit values held in 16 registers, in place. */
static inline void transpose16x16(__m512i r[16]) {
    __m512i t[16], u[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int g = 0; g < 16; g += 4) {
        u[g] = _mm512_unpacklo_epi64(t[g], t[g + 2]);
        u[g + 1] = _mm512_unpackhi_epi64(t[g], t[g + 2]);
        u[g + 2] = _mm512_unpacklo_epi64(t[g + 1], t[g + 3]);
        u[g + 3] = _mm512_unpackhi_epi64(t[g + 1], t[g + 3]);
    }
    for (int j = 0; j < 4; j++) {  /* u[4g + j], 128-bit lane L: rows 4g..4g+3 of column 4L + j */
        const __m512i v01 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0x44);
        const __m512i v23 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0xEE);
        const __m512i w01 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0x44);
        const __m512i w23 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0xEE);
        r[j] = _mm512_shuffle_i32x4(v01, w01, 0x88);
        r[4 + j] = _mm512_shuffle_i32x4(v01, w01, 0xDD);
        r[8 + j] = _mm512_shuffle_i32x4(v23, w23, 0x88);
        r[12 + j] = _mm512_shuffle_i32x4(v23, w23, 0xDD);
    }
}

/* Per thread: a partial product (M rows of N + 16 floats: a row stride off powers of two, so
 * tile rows do not share cache sets) and the packed chunk of both operands. */
static size_t weight_grad_part(int M, int N) {
    return (size_t)M * (N + 16) * 4 + (size_t)(M + N) * WG_KC * 2;
}

/* Bytes of scratch (64-byte aligned) that scriven_weight_grad_bf16 needs. */
int64_t scriven_weight_grad_scratch(int M, int N, int threads) {
    return (int64_t)threads * (int64_t)weight_grad_part(M, N);
}

/* M and N multiples of 32. Needs scriven_amx_init() to have succeeded. */
__attribute__((target("amx-tile,amx-bf16,avx512bf16")))
void scriven_weight_grad_bf16(const uint16_t *a, int64_t lda, const uint16_t *b, int64_t ldb,
                              int64_t T, int M, int N, uint16_t *out, void *scratch, int threads) {
    const int64_t share = ((T + threads - 1) / threads + 31) / 32 * 32;  /* rows per thread */
    threads = (int)((T + share - 1) / share);
    const int ld = N + 16, steps = WG_KC / 32;
    const size_t part = weight_grad_part(M, N);
    #pragma omp parallel num_threads(threads)
    {
        load_full_tiles(8);
        /* One share of rows each (more if OpenMP gave fewer threads than asked for). */
        for (int sh = thread_index(); sh < threads; sh += team_size()) {
            float *acc = (float *)((char *)scratch + part * sh);  /* (M, ld) */
            uint16_t *ap = (uint16_t *)(acc + (size_t)M * ld);  /* [M/16][steps][16][32] */
            uint16_t *bp = ap + (size_t)M * WG_KC;              /* [N/16][steps][16][32] */
            const int64_t first = share * sh, end = first + share < T ? first + share : T;
            for (int64_t k0 = first; k0 < end; k0 += WG_KC) {
                const int ks = (int)(((end - k0 < WG_KC ? end - k0 : WG_KC) + 31) / 32);
                for (int s = 0; s < ks; s++) {  /* rows in order: each row's columns read together */
                    const int64_t r = k0 + 32 * s;
                    for (int i = 0; i < M / 16; i++) {
                        __m512i v[16];
                        for (int p = 0; p < 16; p++) v[p] = paired_rows(a, lda, r + 2 * p, end, 16 * i);
                        transpose16x16(v);
                        uint16_t *dst = ap + ((size_t)i * steps + s) * 512;
                        for (int m = 0; m < 16; m++) _mm512_store_si512(dst + 32 * m, v[m]);
                    }
                    for (int j = 0; j < N / 16; j++) {
                        uint16_t *dst = bp + ((size_t)j * steps + s) * 512;
                        for (int p = 0; p < 16; p++)
                            _mm512_store_si512(dst + 32 * p, paired_rows(b, ldb, r + 2 * p, end, 16 * j));
                    }
                }
                for (int i = 0; i < M / 16; i += 2)
                    for (int j = 0; j < N / 16; j += 2) {
                        float *c = acc + (size_t)16 * i * ld + 16 * j;
                        if (k0 == first) {
                            _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
                        } else {
                            _tile_loadd(0, c, ld * 4); _tile_loadd(1, c + 16, ld * 4);
                            _tile_loadd(2, c + 16 * ld, ld * 4); _tile_loadd(3, c + 16 * ld + 16, ld * 4);
                        }
                        const uint16_t *a0 = ap + (size_t)i * steps * 512, *a1 = a0 + steps * 512;
                        const uint16_t *b0 = bp + (size_t)j * steps * 512, *b1 = b0 + steps * 512;
                        for (int s = 0; s < ks; s++) {
                            _tile_loadd(4, a0 + 512 * s, 64);
                            _tile_loadd(6, b0 + 512 * s, 64);
                            _tile_dpbf16ps(0, 4, 6);
                            _tile_loadd(7, b1 + 512 * s, 64);
                            _tile_dpbf16ps(1, 4, 7);
                            _tile_loadd(5, a1 + 512 * s, 64);
                            _tile_dpbf16ps(2, 5, 6);
                            _tile_dpbf16ps(3, 5, 7);
                        }
                        _tile_stored(0, c, ld * 4); _tile_stored(1, c + 16, ld * 4);
                        _tile_stored(2, c + 16 * ld, ld * 4); _tile_stored(3, c + 16 * ld + 16, ld * 4);
                    }
            }
        }
        _tile_release();
        #pragma omp barrier
        /* Sum the partial products and round to bf16 (nearest even), rows split between threads. */
        #pragma omp for schedule(static)
        for (int m = 0; m < M; m++)
            for (int n = 0; n < N; n += 16) {
                __m512 x = _mm512_loadu_ps((float *)scratch + (size_t)m * ld + n);
                for (int t = 1; t < threads; t++)
                    x = _mm512_add_ps(x, _mm512_loadu_ps((float *)((char *)scratch + part * t)
                                                         + (size_t)m * ld + n));
                _mm256_storeu_si256((__m256i *)(out + (size_t)m * N + n), (__m256i)_mm512_cvtneps_pbh(x));
            }
    }
}

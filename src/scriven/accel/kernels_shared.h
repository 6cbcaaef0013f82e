/* Shared by kernels.c and kernels_avx2.c, included by each after it defines its own
 * scriven_lstm_step_i8, scriven_linear_i8, topk_row, row_max and scaled_exp: the parts of
 * generation that are plain C (and sum8, in AVX2 instructions both builds have), so both builds
 * run them alike. */

/* A whole step of an LSTM language model in one call: the embedding rows of token ids (B,)
 * from table (rows of E[0] floats), L layers of hidden size H (layer k's weights at W[k] etc.,
 * its input size E[k]), then the output layer (V rows). h, c (L, B, H) -> h_out, c_out
 * (L, B, H) and logits (B, V). Returns 0, 1 when out of memory, 2 for an id outside the table. */
int scriven_lstm_lm_step_i8(int L, const int8_t *const *W, const int32_t *const *rowsum,
                            const float *const *wscale, const float *const *bias, const int *E, int H,
                            const int8_t *headW, const int32_t *head_rowsum, const float *head_scale,
                            const float *head_bias, int V, const float *table, int vocab, const int64_t *ids,
                            const float *h, const float *c, int B, float *h_out, float *c_out,
                            float *logits, int threads) {
    const int Hp = (H + 63) / 64 * 64;
    for (int b = 0; b < B; b++)
        if (ids[b] < 0 || ids[b] >= vocab) return 2;
    float *x = malloc(sizeof(float) * (size_t)B * E[0]);
    if (!x) return 1;
    for (int b = 0; b < B; b++) memcpy(x + (size_t)b * E[0], table + (size_t)ids[b] * E[0], sizeof(float) * E[0]);
    const float *in = x;
    for (int k = 0; k < L; k++) {
        const size_t at = (size_t)k * B * H;
        if (scriven_lstm_step_i8(W[k], rowsum[k], wscale[k], bias[k], in, h + at, c + at, B, E[k],
                                 (E[k] + 63) / 64 * 64, H, Hp, h_out + at, c_out + at, threads)) {
            free(x);
            return 1;
        }
        in = h_out + at;
    }
    free(x);
    return scriven_linear_i8(headW, head_rowsum, head_scale, head_bias, in, B, H, Hp, V, logits, threads);
}

/* Top-k sampling at a temperature, one token per row of x (B, V), as sampling.py does it: the
 * k[b] best logits, softmax of them / temperature[b], then the first index whose running total
 * passes uniform[b] · total. Each row has its own k and temperature (a server's batch holds many
 * requests). Writes the token ids (B,) and their probabilities (B,). */
void scriven_sample_top_k(const float *x, int B, int V, const int32_t *k, const float *temperature,
                          const float *uniform, int64_t *ids, float *probs, int threads) {
    #pragma omp parallel for schedule(static) num_threads(B > 1 ? threads : 1)
    for (int b = 0; b < B; b++) {
        const int kb = k[b];
        if (kb < 1 || kb > 64 || kb > V) continue;  /* the binding refuses these first */
        float val[64], cdf[64] = {0};  /* zeroed: the compiler cannot see k >= 1 here */
        int64_t idx[64];
        topk_row(x + (size_t)b * V, V, kb, val, idx);
        const float t = temperature[b], top = val[0] / t;
        float total = 0.0f;
        for (int i = 0; i < kb; i++) {
            total += expf(val[i] / t - top);
            cdf[i] = total;
        }
        const float target = uniform[b] * total;
        int pick = 0;
        while (pick < kb - 1 && !(cdf[pick] > target)) pick++;
        ids[b] = idx[pick];
        probs[b] = (cdf[pick] - (pick ? cdf[pick - 1] : 0.0f)) / total;
    }
}

/* The sum of eight floats, always in this order: both builds' scaled_exp add a chunk of
 * EXP_CHUNK (each build's, the same) with it, so their totals, and so their picks, are the same
 * bit for bit. */
static inline float sum8(__m256 v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

/* Sampling from the whole vocabulary, one token per row of x (B, V) (logits already divided by
 * the temperature), by sampling.py's rule for plain draws: the softmax of x, then the first
 * index whose running total passes uniform[b] · total. A row is read twice: once for its largest logit,
 * once for the exponentials (kept, with the sum of each chunk of EXP_CHUNK); the running total
 * then walks the chunk sums and the tokens of one chunk. Writes the token ids (B,) and their
 * probabilities (B,). Returns 0, or 1 when out of memory. */
int scriven_sample_plain(const float *x, int B, int V, const float *uniform,
                         int64_t *ids, float *probs, int threads) {
    const int chunks = (V + EXP_CHUNK - 1) / EXP_CHUNK;
    int failed = 0;
    #pragma omp parallel num_threads(B > 1 ? threads : 1) reduction(| : failed)
    {
        float *e = malloc(sizeof(float) * ((size_t)V + chunks));
        failed = e == NULL;
        #pragma omp for schedule(static)
        for (int b = 0; b < B; b++) {
            if (!e) continue;
            float *chunk = e + V;
            const float *row = x + (size_t)b * V;
            const float total = scaled_exp(row, V, row_max(row, V), e, chunk);
            const float target = uniform[b] * total;
            float run = 0.0f;
            int c = 0;
            while (c < chunks - 1 && !(run + chunk[c] > target)) run += chunk[c++];
            int i = c * EXP_CHUNK;
            const int end = c == chunks - 1 ? V : i + EXP_CHUNK;
            while (i < end - 1 && !(run + e[i] > target)) run += e[i++];
            ids[b] = i;
            probs[b] = e[i] / total;
        }
        free(e);
    }
    return failed;
}

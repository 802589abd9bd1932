/* One forward pass of a Llama model's layers for generated tokens on CPU (AVX-512 + VNNI).

   Replaces, for passes of one or a few tokens per row, the PyTorch path of
   plait/backends/models/llama.py (LlamaBlock.forward: RMSNorm, fused QKV projection, rotary
   embedding, cached GQA attention, output projection, SwiGLU MLP, residuals) and the output head
   (RMSNorm + lm_head). At a few tokens a pass PyTorch spends most of the step launching ~500 small
   ops; here the whole pass is one call, one OpenMP team, and every matrix is read once a pass.

   Numerics (the "int4" precision of the embedded model):
   - linear layers: 4-bit weights in 32-wide blocks, w = d * q + m (q in 0..15; the GGUF Q4_1
     grid), times activations quantised to int8 per 32-wide block (x ~ s * a, round to nearest);
     one block's dot product is exact in int32 (VPDPBUSD), the blocks are summed in fp32:
     sum(w * s * a) = d * s * sum(q * a) + m * s * sum(a). The min's term takes the quantised
     sum, not the exact one: W times the quantised x keeps the rounding errors on w's own
     scale, where the exact sum would weigh them by w - m, all of one sign (measured: 2.3x the
     error of a layer's output on SmolLM2).
   - output head: int8 weights with one fp32 scale per 32-block (the GGUF's Q8_0 grid; stored
     offset by 128, as VNNI's unsigned operand), times the normed activations quantised like the
     linear layers' inputs.
   - residual stream, norms, rotary embedding, softmax and attention: fp32; K/V cache: bf16.
   Every output element is summed in a fixed order that does not depend on how many rows or tokens
   share the pass, so a token's result is bitwise the same alone, batched or in a verify pass.
   `plait_prompt_attention` gives the model's bf16 prompt passes the same property for their
   attention (see its section).
*/
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 32
#define PAIR 64

typedef struct {
    const uint8_t *nibbles; /* [n, k/2]: per pair of blocks, byte j = q[2p][j] | q[2p+1][j] << 4 */
    const uint16_t *scales; /* [n, k/32] d, fp16 (as GGUF stores them) */
    const uint16_t *mins;   /* [n, k/32] m, fp16 */
    int n, k;
} Q4Matrix;

typedef struct {
    const float *attn_norm, *mlp_norm; /* [hidden] */
    Q4Matrix qkv, o, gate_up, down;
} Layer;

typedef struct {
    int layers, hidden, heads, kv_heads, head_dim, intermediate, vocab;
    float eps;
    const float *cos, *sin; /* [max_positions, head_dim/2] */
    int max_positions;
    const float *final_norm;
    const uint8_t *head;      /* [vocab, hidden]: int8 weight + 128 */
    const uint16_t *head_scales; /* [vocab, hidden/32] fp16 */
    Layer *layer;
} Model;

/* Activations of a pass, quantised for the Q4 matrices: int8 values, per block the sum of the
   quantised values (s * sum(a)), and each pair's two scales spread over 16 lanes (0-7, 8-15). */
typedef struct {
    int8_t *q;
    float *sums, *spread;
    int rows, k;
} Quantized;

/* ---- small vector helpers ------------------------------------------------------------------ */

static inline __m512 exp512(__m512 x) {
    /* e^x = 2^n * 2^f, n = round(x log2 e), |f| <= 1/2; 2^f by its degree-6 Taylor polynomial
       in f ln 2 (relative error < 2e-7). Inputs below -87 give 0 (softmax's masked tail). */
    const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 t = _mm512_mul_ps(x, log2e);
    __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.69314718055994531f));
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

static inline __m512 load_bf16(const uint16_t *src) {
    __m256i raw = _mm256_loadu_si256((const __m256i *)src);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

static inline uint16_t to_bf16(float value) { /* round to nearest even, as torch's .to(bfloat16) */
    uint32_t bits;
    memcpy(&bits, &value, 4);
    bits += 0x7FFF + ((bits >> 16) & 1);
    return (uint16_t)(bits >> 16);
}

/* ---- the pieces of a layer ----------------------------------------------------------------- */

static void rms_norm_row(const float *x, const float *weight, float *out, int n, float eps) {
    __m512 acc = _mm512_setzero_ps();
    for (int i = 0; i < n; i += 16) {
        __m512 v = _mm512_loadu_ps(x + i);
        acc = _mm512_fmadd_ps(v, v, acc);
    }
    float inv = 1.0f / sqrtf(_mm512_reduce_add_ps(acc) / n + eps);
    __m512 scale = _mm512_set1_ps(inv);
    for (int i = 0; i < n; i += 16)
        _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(x + i), scale),
                                                _mm512_loadu_ps(weight + i)));
}

static void quantize_row(const float *x, Quantized *qa, int row) {
    int k = qa->k, blocks = k / BLOCK;
    int8_t *q = qa->q + (size_t)row * k;
    float *sums = qa->sums + (size_t)row * blocks, *spread = qa->spread + (size_t)row * blocks * 8;
    for (int b = 0; b < blocks; b++) {
        __m512 lo = _mm512_loadu_ps(x + b * BLOCK), hi = _mm512_loadu_ps(x + b * BLOCK + 16);
        float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
        float scale = amax / 127.0f, inverse = amax > 0 ? 127.0f / amax : 0.0f;
        __m512 iv = _mm512_set1_ps(inverse);
        __m512i ilo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, iv)), ihi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, iv));
        _mm_storeu_si128((__m128i *)(q + b * BLOCK), _mm512_cvtsepi32_epi8(ilo));
        _mm_storeu_si128((__m128i *)(q + b * BLOCK + 16), _mm512_cvtsepi32_epi8(ihi));
        sums[b] = scale * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(ilo, ihi));
        for (int lane = 0; lane < 8; lane++) spread[b * 8 + lane] = scale;
    }
}

#define ROWS 4 /* rows that share one unpacking of a weight row */

/* A pair of blocks' two fp16 scales spread over 16 lanes: the first over lanes 0-7, the second
   over 8-15, as VPDPBUSD's sums of the pair lie. */
static inline __m512 pair_scales(const uint16_t *at) {
    const __m512i pick = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    uint32_t bits;
    memcpy(&bits, at, 4);
    return _mm512_permutexvar_ps(pick, _mm512_castps128_ps512(_mm_cvtph_ps(_mm_cvtsi32_si128((int)bits))));
}
#define INLINE static inline __attribute__((always_inline))
#define AHEAD 4 /* weight rows fetched ahead */

#define WROWS 2 /* weight rows that share each load of a quantised row */

/* One pair of blocks of weight rows n .. n+wrows-1 times `count` quantised rows into their
   sums: each weight row is unpacked once for all the rows, each row's activations loaded once
   for all the weight rows. */
INLINE void q4_pair(const Q4Matrix *w, int n, const int wrows, const Quantized *qa, int r0, const int count, int p,
                    __m512 sums[WROWS][ROWS]) {
    const __m256i low_mask = _mm256_set1_epi8(0x0F);
    const int k = qa->k, blocks = k / BLOCK;
    __m512i wq[WROWS];
    __m512 ds[WROWS];
    for (int i = 0; i < wrows; i++) {
        __m256i packed = _mm256_loadu_si256((const __m256i *)(w->nibbles + (size_t)(n + i) * (k / 2) + 32 * p));
        __m256i lo = _mm256_and_si256(packed, low_mask);
        __m256i hi = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low_mask);
        wq[i] = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
        const uint16_t *d = w->scales + (size_t)(n + i) * blocks + 2 * p;
        ds[i] = pair_scales(d);
    }
    for (int j = 0; j < count; j++) {
        const int r = r0 + j;
        __m512i a = _mm512_loadu_si512(qa->q + (size_t)r * k + PAIR * p);
        __m512 spread = _mm512_loadu_ps(qa->spread + ((size_t)r * blocks + 2 * p) * 8);
        for (int i = 0; i < wrows; i++) {
            __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wq[i], a);
            sums[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(ds[i], spread), sums[i][j]);
        }
    }
}

/* out[r, n + i] (+)= W[n + i] . x_r for rows r0 .. r0+count-1 and weight rows i < wrows. `count`
   and `wrows` are constants where this is inlined, so the sums stay in registers. Each output's
   sum runs in the same order whatever `count` and `wrows` are, so a row's result does not
   depend on its neighbours. */
INLINE void q4_rows(const Q4Matrix *w, int n, const int wrows, const Quantized *qa, int r0, const int count,
                    float *out, int ld, int accumulate) {
    const int k = w->k, pairs = k / PAIR, blocks = k / BLOCK;
    if (n + AHEAD < w->n) { /* the stream of rows is long and read once: fetch ahead of use */
        const char *next = (const char *)(w->nibbles + (size_t)(n + AHEAD) * (k / 2));
        for (int offset = 0; offset < wrows * k / 2; offset += 64) _mm_prefetch(next + offset, _MM_HINT_T0);
        _mm_prefetch((const char *)(w->scales + (size_t)(n + AHEAD) * blocks), _MM_HINT_T0);
        _mm_prefetch((const char *)(w->mins + (size_t)(n + AHEAD) * blocks), _MM_HINT_T0);
    }
    __m512 even[WROWS][ROWS], odd[WROWS][ROWS]; /* two sums per output: pairs alternate */
    for (int i = 0; i < wrows; i++)
        for (int j = 0; j < count; j++) even[i][j] = odd[i][j] = _mm512_setzero_ps();
    int p = 0;
    for (; p + 1 < pairs; p += 2) {
        q4_pair(w, n, wrows, qa, r0, count, p, even);
        q4_pair(w, n, wrows, qa, r0, count, p + 1, odd);
    }
    if (p < pairs) q4_pair(w, n, wrows, qa, r0, count, p, even);
    for (int i = 0; i < wrows; i++) {
        const uint16_t *m = w->mins + (size_t)(n + i) * blocks;
        for (int j = 0; j < count; j++) {
            const float *sums = qa->sums + (size_t)(r0 + j) * blocks;
            __m512 mins = _mm512_setzero_ps();
            for (int b = 0; b < blocks; b += 16) {
                __mmask16 keep = blocks - b >= 16 ? 0xFFFF : (__mmask16)((1u << (blocks - b)) - 1);
                __m512 lows = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(keep, m + b));
                mins = _mm512_fmadd_ps(lows, _mm512_maskz_loadu_ps(keep, sums + b), mins);
            }
            float y = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(even[i][j], odd[i][j]), mins));
            float *target = out + (size_t)(r0 + j) * ld + n + i;
            *target = accumulate ? *target + y : y;
        }
    }
}

/* Every row of `qa` times weight rows n .. n+wrows-1, ROWS rows at a time. */
INLINE void q4_columns(const Q4Matrix *w, int n, const int wrows, const Quantized *qa, float *out, int ld,
                       int accumulate) {
    int r = 0;
    for (; r + ROWS <= qa->rows; r += ROWS) q4_rows(w, n, wrows, qa, r, ROWS, out, ld, accumulate);
    switch (qa->rows - r) {
    case 3: q4_rows(w, n, wrows, qa, r, 3, out, ld, accumulate); break;
    case 2: q4_rows(w, n, wrows, qa, r, 2, out, ld, accumulate); break;
    case 1: q4_rows(w, n, wrows, qa, r, 1, out, ld, accumulate); break;
    }
}

/* out[r, n] = W x_r (accumulate: +=), the output columns split across the team. */
static void q4_matmul(const Q4Matrix *w, const Quantized *qa, float *out, int ld, int accumulate) {
#pragma omp for schedule(static) nowait
    for (int n = 0; n < w->n; n += WROWS) {
        if (n + 1 < w->n)
            q4_columns(w, n, WROWS, qa, out, ld, accumulate);
        else
            q4_columns(w, n, 1, qa, out, ld, accumulate);
    }
}

static void rotate(float *x, const float *cos, const float *sin, int half) {
    for (int i = 0; i < half; i++) {
        float a = x[i], b = x[i + half];
        x[i] = a * cos[i] - b * sin[i];
        x[i + half] = b * cos[i] + a * sin[i];
    }
}

/* One query row of one head over keys 0..last of its slot's cache. */
static void attend(const float *q, const uint16_t *keys, const uint16_t *values, int last, int head_dim,
                   float *scores, float *out) {
    const float scale = 1.0f / sqrtf((float)head_dim);
    float best = -INFINITY;
    for (int j = 0; j <= last; j++) {
        const uint16_t *key = keys + (size_t)j * head_dim;
        __m512 acc = _mm512_setzero_ps();
        for (int i = 0; i < head_dim; i += 16)
            acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), load_bf16(key + i), acc);
        scores[j] = _mm512_reduce_add_ps(acc) * scale;
        if (scores[j] > best) best = scores[j];
    }
    __m512 total = _mm512_setzero_ps(), shift = _mm512_set1_ps(best);
    int count = last + 1;
    for (int j = 0; j < count; j += 16) {
        __mmask16 keep = count - j >= 16 ? 0xFFFF : (__mmask16)((1u << (count - j)) - 1);
        __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(keep, scores + j), shift));
        e = _mm512_maskz_mov_ps(keep, e);
        _mm512_mask_storeu_ps(scores + j, keep, e);
        total = _mm512_add_ps(total, e);
    }
    float inverse = 1.0f / _mm512_reduce_add_ps(total);
    __m512 acc[8]; /* head_dim <= 128 */
    int chunks = head_dim / 16;
    for (int c = 0; c < chunks; c++) acc[c] = _mm512_setzero_ps();
    for (int j = 0; j < count; j++) {
        __m512 weight = _mm512_set1_ps(scores[j]);
        const uint16_t *value = values + (size_t)j * head_dim;
        for (int c = 0; c < chunks; c++) acc[c] = _mm512_fmadd_ps(weight, load_bf16(value + 16 * c), acc[c]);
    }
    for (int c = 0; c < chunks; c++) _mm512_storeu_ps(out + 16 * c, _mm512_mul_ps(acc[c], _mm512_set1_ps(inverse)));
}

/* h = silu(gate) * up = gate / (1 + e^-gate) * up */
static void swiglu(const float *gate, const float *up, float *h, int n) {
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int i = 0; i < n; i += 16) {
        __m512 g = _mm512_loadu_ps(gate + i);
        __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), g));
        _mm512_storeu_ps(h + i, _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(one, e)), _mm512_loadu_ps(up + i)));
    }
}

/* ---- the team's meeting point ------------------------------------------------------------- */

typedef struct {
    atomic_int arrived, phase;
} Meeting;

/* Every thread of the pass's team waits here for the others. libgomp's own barriers sleep on a
   futex once a process holds more OpenMP threads than cores (torch's pools count), ~20 us a wake:
   with ~150 meetings a pass, two threads were slower than one. This one spins, then yields. */
static void meet(Meeting *m, int team) {
    if (team == 1) return;
    int phase = atomic_load_explicit(&m->phase, memory_order_acquire);
    if (atomic_fetch_add_explicit(&m->arrived, 1, memory_order_acq_rel) == team - 1) {
        atomic_store_explicit(&m->arrived, 0, memory_order_relaxed);
        atomic_store_explicit(&m->phase, phase + 1, memory_order_release);
        return;
    }
    for (long spins = 0; atomic_load_explicit(&m->phase, memory_order_acquire) == phase; spins++) {
        if (spins < 200000)
            _mm_pause();
        else
            sched_yield(); /* the other thread lost its core: give ours up meanwhile */
    }
}

/* ---- the pass ------------------------------------------------------------------------------ */

typedef struct {
    float *normed, *qkv, *attn, *gate_up, *hidden, *scores;
    Quantized by_hidden, by_intermediate;
} Scratch;

static void *grab(size_t bytes) { return aligned_alloc(64, (bytes + 63) / 64 * 64); }

static void quantized_alloc(Quantized *qa, int rows, int k) {
    qa->rows = rows, qa->k = k;
    qa->q = grab((size_t)rows * k);
    qa->sums = grab(sizeof(float) * rows * (k / BLOCK));
    qa->spread = grab(sizeof(float) * rows * (k / BLOCK) * 8);
}

static void quantized_free(Quantized *qa) { free(qa->q), free(qa->sums), free(qa->spread); }

/* ---- prompt tokens' attention ------------------------------------------------------------

   Replaces, for the bf16 prompt passes of the same model, PyTorch's scaled_dot_product_attention
   over the cache (plait/backends/models/attention.py, Attention._attend_cached): softmax(q K^T /
   sqrt(d)) V over keys 0..position of the token's own row. PyTorch's CPU kernel sums in an order
   that follows the pass's key length (the longest row, padding included) and its query count, so
   a prompt token's output changed, in its last bits, with how its prompt was split into passes,
   what it was batched with, and whether its prefix came back from the prefix cache; greedy
   answers then changed with them. Here every sum runs over its own terms only, in one fixed
   order: a score over the head's dimensions in order, the softmax's total and the output over
   keys 0..position in order. Sixteen query tokens of one row and head share a job, one per
   vector lane, so each lane's arithmetic is the same whichever tokens fill the other lanes. */

enum { LANES = 16, KEYS_AT_ONCE = 6 };

/* Tokens t0 .. t0+count-1 (count <= 16) of one row and head: q [tokens][head_dim] at a stride
   of `q_stride` floats between tokens, keys/values [capacity][head_dim] bf16 of the head's
   group, the first token at `position`. scores: (position + count) * 16 floats of scratch. */
static void attend_tile(const float *q, size_t q_stride, const uint16_t *keys, const uint16_t *values,
                        int position, int count, int head_dim, float *scores, float *out, size_t out_stride) {
    const float scale = 1.0f / sqrtf((float)head_dim);
    const int keys_seen = position + count; /* the last lane sees keys 0 .. position + count - 1 */
    float q_by_dim[128 * LANES], key[KEYS_AT_ONCE * 128] = {0}; /* q transposed: 16 lanes a dimension */
    for (int i = 0; i < head_dim; i++)
        for (int lane = 0; lane < LANES; lane++)
            q_by_dim[i * LANES + lane] = lane < count ? q[(size_t)lane * q_stride + i] : 0.0f;
    __m512i lane_position = _mm512_add_epi32(_mm512_set1_epi32(position),
                                             _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    __m512 best = _mm512_set1_ps(-INFINITY);
    for (int j0 = 0; j0 < keys_seen; j0 += KEYS_AT_ONCE) {
        /* a few keys' dot products at once: independent chains keep the FMA units busy, and each
           key's chain still adds the dimensions in order */
        const int n = keys_seen - j0 < KEYS_AT_ONCE ? keys_seen - j0 : KEYS_AT_ONCE;
        for (int k = 0; k < n; k++)
            for (int i = 0; i < head_dim; i += 16)
                _mm512_storeu_ps(key + k * 128 + i, load_bf16(keys + (size_t)(j0 + k) * head_dim + i));
        __m512 acc[KEYS_AT_ONCE];
        for (int k = 0; k < KEYS_AT_ONCE; k++) acc[k] = _mm512_setzero_ps();
        for (int i = 0; i < head_dim; i++) {
            __m512 qi = _mm512_loadu_ps(q_by_dim + i * LANES);
            for (int k = 0; k < KEYS_AT_ONCE; k++) acc[k] = _mm512_fmadd_ps(qi, _mm512_set1_ps(key[k * 128 + i]), acc[k]);
        }
        for (int k = 0; k < n; k++) {
            __mmask16 sees = _mm512_cmp_epi32_mask(_mm512_set1_epi32(j0 + k), lane_position, _MM_CMPINT_LE);
            __m512 score = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), sees, _mm512_mul_ps(acc[k], _mm512_set1_ps(scale)));
            _mm512_storeu_ps(scores + (size_t)(j0 + k) * LANES, score);
            best = _mm512_max_ps(best, score);
        }
    }
    __m512 total = _mm512_setzero_ps();
    for (int j = 0; j < keys_seen; j++) { /* unseen keys: e^-inf = 0, a sum unchanged */
        __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(scores + (size_t)j * LANES), best));
        __mmask16 sees = _mm512_cmp_epi32_mask(_mm512_set1_epi32(j), lane_position, _MM_CMPINT_LE);
        e = _mm512_maskz_mov_ps(sees, e);
        _mm512_storeu_ps(scores + (size_t)j * LANES, e);
        total = _mm512_add_ps(total, e);
    }
    float totals[LANES];
    _mm512_storeu_ps(totals, total);
    const int chunks = head_dim / 16;
    /* Four lanes at a time share each value row's load; a lane's sum runs over keys 0 .. its own
       position in order, and the keys past it add weights of exactly 0. */
    for (int lane0 = 0; lane0 < count; lane0 += 4) {
        const int group = count - lane0 < 4 ? count - lane0 : 4;
        __m512 acc[4][8]; /* head_dim <= 128 */
        for (int l = 0; l < group; l++)
            for (int c = 0; c < chunks; c++) acc[l][c] = _mm512_setzero_ps();
        for (int j = 0; j <= position + lane0 + group - 1; j++) {
            const uint16_t *value = values + (size_t)j * head_dim;
            __m512 v[8];
            for (int c = 0; c < chunks; c++) v[c] = load_bf16(value + 16 * c);
            for (int l = 0; l < group; l++) {
                __m512 weight = _mm512_set1_ps(scores[(size_t)j * LANES + lane0 + l]);
                for (int c = 0; c < chunks; c++) acc[l][c] = _mm512_fmadd_ps(weight, v[c], acc[l][c]);
            }
        }
        for (int l = 0; l < group; l++) {
            __m512 inverse = _mm512_set1_ps(1.0f / totals[lane0 + l]);
            float *row = out + (size_t)(lane0 + l) * out_stride;
            for (int c = 0; c < chunks; c++) _mm512_storeu_ps(row + 16 * c, _mm512_mul_ps(acc[l][c], inverse));
        }
    }
}

/* q [rows, heads, steps, head_dim] fp32 -> out, the same shape: row r's token t sits at position
   cache_lens[r] + t, its keys and values already in the cache ([slots, kv_heads, capacity,
   head_dim] bf16, row r in slot first_slot + r). Returns -1 for a position past the cache. */
int plait_prompt_attention(const float *q, const uint16_t *keys, const uint16_t *values, const int64_t *cache_lens,
                           int rows, int steps, int heads, int kv_heads, int head_dim, int capacity, float *out,
                           int threads) {
    if (head_dim % 16 || head_dim > 128 || heads % kv_heads) return -1;
    int longest = 0;
    for (int r = 0; r < rows; r++) {
        int64_t end = cache_lens[r] + steps;
        if (end > capacity) return -1;
        if (end > longest) longest = (int)end;
    }
    const int tiles = (steps + LANES - 1) / LANES, group = heads / kv_heads;
    const size_t head_stride = (size_t)capacity * head_dim, slot_stride = (size_t)kv_heads * head_stride;
#pragma omp parallel num_threads(threads)
    {
        float *scores = grab(sizeof(float) * (size_t)(longest + LANES) * LANES);
#pragma omp for schedule(dynamic)
        for (int job = 0; job < rows * heads * tiles; job++) {
            int r = job / (heads * tiles), h = job / tiles % heads, t0 = job % tiles * LANES;
            int count = steps - t0 < LANES ? steps - t0 : LANES;
            size_t at = (size_t)r * slot_stride + (size_t)(h / group) * head_stride;
            size_t first = (((size_t)r * heads + h) * steps + t0) * head_dim;
            attend_tile(q + first, head_dim, keys + at, values + at, (int)cache_lens[r] + t0, count, head_dim,
                        scores, out + first, head_dim);
        }
        free(scores);
    }
    return 0;
}

/* x: [tokens, hidden] fp32 embeddings in, hidden states out. Row r of `rows` has `steps` tokens
   at positions cache_lens[r] .. cache_lens[r] + steps - 1, its K/V in slot first_slot + r of
   every layer's cache (keys[l], values[l]: [slots, kv_heads, capacity, head_dim] bf16). */
int plait_llama_layers(const Model *model, float *x, int rows, int steps, const int64_t *cache_lens,
                       uint16_t **keys, uint16_t **values, int first_slot, int capacity, int threads) {
    const int tokens = rows * steps, hidden = model->hidden, hd = model->head_dim, half = hd / 2;
    const int heads = model->heads, kvh = model->kv_heads, group = heads / kvh;
    const int qkv_width = (heads + 2 * kvh) * hd, inter = model->intermediate;
    int longest = 0;
    for (int r = 0; r < rows; r++) {
        int64_t end = cache_lens[r] + steps;
        if (end > capacity || end > model->max_positions) return -1;
        if (end > longest) longest = (int)end;
    }
    Scratch s;
    s.normed = grab(sizeof(float) * tokens * hidden);
    s.qkv = grab(sizeof(float) * tokens * qkv_width);
    s.attn = grab(sizeof(float) * tokens * heads * hd);
    s.gate_up = grab(sizeof(float) * tokens * 2 * inter);
    s.hidden = grab(sizeof(float) * tokens * inter);
    s.scores = grab(sizeof(float) * (size_t)tokens * heads * (longest + 16));
    quantized_alloc(&s.by_hidden, tokens, hidden);
    quantized_alloc(&s.by_intermediate, tokens, inter);
    const size_t slot_stride = (size_t)kvh * capacity * hd, head_stride = (size_t)capacity * hd;

    Meeting meeting = {0, 0};
#pragma omp parallel num_threads(threads)
    {
        const int team = omp_get_num_threads();
        for (int l = 0; l < model->layers; l++) {
            const Layer *layer = &model->layer[l];
#pragma omp for schedule(static) nowait
            for (int t = 0; t < tokens; t++) {
                rms_norm_row(x + (size_t)t * hidden, layer->attn_norm, s.normed + (size_t)t * hidden, hidden, model->eps);
                quantize_row(s.normed + (size_t)t * hidden, &s.by_hidden, t);
            }
            meet(&meeting, team);
            q4_matmul(&layer->qkv, &s.by_hidden, s.qkv, qkv_width, 0);
            meet(&meeting, team);
#pragma omp for schedule(static) nowait
            for (int t = 0; t < tokens; t++) { /* rotate q and k, write k and v to the cache */
                int r = t / steps, position = (int)cache_lens[r] + t % steps;
                const float *cos = model->cos + (size_t)position * half, *sin = model->sin + (size_t)position * half;
                float *row = s.qkv + (size_t)t * qkv_width;
                for (int h = 0; h < heads + kvh; h++) rotate(row + h * hd, cos, sin, half);
                size_t at = (size_t)(first_slot + r) * slot_stride + (size_t)position * hd;
                for (int g = 0; g < kvh; g++) {
                    const float *k = row + (heads + g) * hd, *v = row + (heads + kvh + g) * hd;
                    uint16_t *kc = keys[l] + at + g * head_stride, *vc = values[l] + at + g * head_stride;
                    for (int i = 0; i < hd; i++) kc[i] = to_bf16(k[i]), vc[i] = to_bf16(v[i]);
                }
            }
            meet(&meeting, team);
#pragma omp for schedule(static) nowait
            for (int job = 0; job < tokens * heads; job++) {
                int t = job / heads, h = job % heads, r = t / steps, position = (int)cache_lens[r] + t % steps;
                size_t at = (size_t)(first_slot + r) * slot_stride + (size_t)(h / group) * head_stride;
                attend(s.qkv + (size_t)t * qkv_width + h * hd, keys[l] + at, values[l] + at, position, hd,
                       s.scores + (size_t)job * (longest + 16), s.attn + (size_t)t * heads * hd + h * hd);
            }
            meet(&meeting, team);
#pragma omp for schedule(static) nowait
            for (int t = 0; t < tokens; t++) quantize_row(s.attn + (size_t)t * heads * hd, &s.by_hidden, t);
            meet(&meeting, team);
            q4_matmul(&layer->o, &s.by_hidden, x, hidden, 1);
            meet(&meeting, team);
#pragma omp for schedule(static) nowait
            for (int t = 0; t < tokens; t++) {
                rms_norm_row(x + (size_t)t * hidden, layer->mlp_norm, s.normed + (size_t)t * hidden, hidden, model->eps);
                quantize_row(s.normed + (size_t)t * hidden, &s.by_hidden, t);
            }
            meet(&meeting, team);
            q4_matmul(&layer->gate_up, &s.by_hidden, s.gate_up, 2 * inter, 0);
            meet(&meeting, team);
#pragma omp for schedule(static) nowait
            for (int t = 0; t < tokens; t++) {
                const float *gate = s.gate_up + (size_t)t * 2 * inter, *up = gate + inter;
                float *h = s.hidden + (size_t)t * inter;
                swiglu(gate, up, h, inter);
                quantize_row(h, &s.by_intermediate, t);
            }
            meet(&meeting, team);
            q4_matmul(&layer->down, &s.by_intermediate, x, hidden, 1);
            meet(&meeting, team);
        }
    }
    free(s.normed), free(s.qkv), free(s.attn), free(s.gate_up), free(s.hidden), free(s.scores);
    quantized_free(&s.by_hidden), quantized_free(&s.by_intermediate);
    return 0;
}

/* Per row and pair of blocks, -128 * (the sum of each 4 int8 activations a VNNI lane reads): the
   start of that lane's sum, which makes VPDPBUSD's (w + 128) . a the signed w . a. */
static void offset_corrections(const Quantized *qa, int row, int32_t *out) {
    const __m512i offset = _mm512_set1_epi8((char)0x80);
    for (int p = 0; p < qa->k / PAIR; p++) {
        __m512i a = _mm512_loadu_si512(qa->q + (size_t)row * qa->k + PAIR * p);
        __m512i lanes = _mm512_dpbusd_epi32(_mm512_setzero_si512(), offset, a);
        _mm512_storeu_si512(out + 16 * p, _mm512_sub_epi32(_mm512_setzero_si512(), lanes));
    }
}

/* logits[r0 .. r0+count-1] of head rows n .. n+wrows-1: each 64-weight pair loaded once for
   `count` rows, each row's activations once for `wrows` head rows (as in q4_rows). */
INLINE void head_rows(const Model *model, int n, const int wrows, const Quantized *qa, const int32_t *corrections,
                      int r0, const int count, float *logits) {
    const int hidden = model->hidden, pairs = hidden / PAIR, blocks = hidden / BLOCK;
    __m512 even[WROWS][ROWS], odd[WROWS][ROWS]; /* two sums per output, as in q4_rows */
    for (int i = 0; i < wrows; i++)
        for (int j = 0; j < count; j++) even[i][j] = odd[i][j] = _mm512_setzero_ps();
    for (int p = 0; p < pairs; p++) {
        __m512i wq[WROWS];
        __m512 ds[WROWS];
        for (int i = 0; i < wrows; i++) {
            wq[i] = _mm512_loadu_si512(model->head + (size_t)(n + i) * hidden + PAIR * p);
            const uint16_t *d = model->head_scales + (size_t)(n + i) * blocks + 2 * p;
            ds[i] = pair_scales(d);
        }
        for (int j = 0; j < count; j++) {
            const int r = r0 + j;
            __m512i start = _mm512_loadu_si512(corrections + ((size_t)r * pairs + p) * 16);
            __m512i a = _mm512_loadu_si512(qa->q + (size_t)r * hidden + PAIR * p);
            __m512 spread = _mm512_loadu_ps(qa->spread + ((size_t)r * blocks + 2 * p) * 8);
            for (int i = 0; i < wrows; i++) {
                __m512 dot = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(start, wq[i], a));
                if (p & 1)
                    odd[i][j] = _mm512_fmadd_ps(dot, _mm512_mul_ps(ds[i], spread), odd[i][j]);
                else
                    even[i][j] = _mm512_fmadd_ps(dot, _mm512_mul_ps(ds[i], spread), even[i][j]);
            }
        }
    }
    for (int i = 0; i < wrows; i++)
        for (int j = 0; j < count; j++)
            logits[(size_t)(r0 + j) * model->vocab + n + i] = _mm512_reduce_add_ps(_mm512_add_ps(even[i][j], odd[i][j]));
}

/* Every row's logits of head rows n .. n+wrows-1, ROWS rows at a time. */
INLINE void head_columns(const Model *model, int n, const int wrows, const Quantized *qa, const int32_t *corrections,
                         int rows, float *logits) {
    int r = 0;
    for (; r + ROWS <= rows; r += ROWS) head_rows(model, n, wrows, qa, corrections, r, ROWS, logits);
    switch (rows - r) {
    case 3: head_rows(model, n, wrows, qa, corrections, r, 3, logits); break;
    case 2: head_rows(model, n, wrows, qa, corrections, r, 2, logits); break;
    case 1: head_rows(model, n, wrows, qa, corrections, r, 1, logits); break;
    }
}

/* logits[r] = head . rms_norm(x[r]) for `rows` hidden states. */
void plait_llama_head(const Model *model, const float *x, int rows, float *logits, int threads) {
    const int hidden = model->hidden;
    float *normed = grab(sizeof(float) * hidden);
    Quantized qa;
    quantized_alloc(&qa, rows, hidden);
    int32_t *corrections = grab(sizeof(int32_t) * rows * (hidden / PAIR) * 16);
    for (int r = 0; r < rows; r++) {
        rms_norm_row(x + (size_t)r * hidden, model->final_norm, normed, hidden, model->eps);
        quantize_row(normed, &qa, r);
        offset_corrections(&qa, r, corrections + (size_t)r * (hidden / PAIR) * 16);
    }
    if (rows == 1) { /* one row: pairing head rows only slows the weight stream (measured) */
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int n = 0; n < model->vocab; n++) head_columns(model, n, 1, &qa, corrections, rows, logits);
    } else {
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int n = 0; n < model->vocab; n += WROWS) {
            if (n + 1 < model->vocab)
                head_columns(model, n, WROWS, &qa, corrections, rows, logits);
            else
                head_columns(model, n, 1, &qa, corrections, rows, logits);
        }
    }
    free(normed), free(corrections);
    quantized_free(&qa);
}

/* ---- the model handle ---------------------------------------------------------------------- */

/* dims: layers, hidden, heads, kv_heads, head_dim, intermediate, vocab, max_positions.
   tensors: cos, sin, final_norm, head, head_scales, then per layer attn_norm, mlp_norm and
   (nibbles, scales, mins) of qkv, o, gate_up, down: 5 + 14 * layers pointers. */
Model *plait_llama_new(const int *dims, float eps, const void **tensors) {
    Model *m = calloc(1, sizeof(Model));
    m->layers = dims[0], m->hidden = dims[1], m->heads = dims[2], m->kv_heads = dims[3];
    m->head_dim = dims[4], m->intermediate = dims[5], m->vocab = dims[6], m->max_positions = dims[7];
    m->eps = eps;
    m->cos = tensors[0], m->sin = tensors[1], m->final_norm = tensors[2];
    m->head = tensors[3], m->head_scales = tensors[4];
    m->layer = calloc(m->layers, sizeof(Layer));
    const int qkv = (m->heads + 2 * m->kv_heads) * m->head_dim;
    const int shapes[4][2] = {{qkv, m->hidden}, {m->hidden, m->heads * m->head_dim},
                              {2 * m->intermediate, m->hidden}, {m->hidden, m->intermediate}};
    for (int l = 0; l < m->layers; l++) {
        const void **t = tensors + 5 + 14 * l;
        Layer *layer = &m->layer[l];
        layer->attn_norm = t[0], layer->mlp_norm = t[1];
        Q4Matrix *mats[4] = {&layer->qkv, &layer->o, &layer->gate_up, &layer->down};
        for (int i = 0; i < 4; i++) {
            mats[i]->nibbles = t[2 + 3 * i], mats[i]->scales = t[3 + 3 * i], mats[i]->mins = t[4 + 3 * i];
            mats[i]->n = shapes[i][0], mats[i]->k = shapes[i][1];
        }
    }
    return m;
}

void plait_llama_free(Model *m) {
    if (m) free(m->layer), free(m);
}

/* A BERT encoder's forward pass for a batch of short sequences on CPU (AVX-512 + AVX512-BF16).

   Replaces, for query encoding, `BertModel.forward` of plait/retrievers/bert.py (embeddings,
   post-LayerNorm layers with exact-erf GELU, no pooler) followed by the L2 normalisation of
   `ColBERTEncoder._forward`. A query is ~20 tokens: PyTorch's fp32 GEMMs run such a batch at
   ~70% of the fp32 FMA rate and a query alone far below it; VDPBF16PS multiplies bf16 pairs at
   twice the fp32 rate and the bf16 weights are half the bytes.

   Numerics:
   - the six linear maps of a layer: weights rounded once to bf16 (round to nearest even),
     activations rounded to bf16 as they enter the product, products summed in fp32;
   - everything else in fp32: embeddings, residual stream, LayerNorms, attention (scores,
     softmax, weighted sum of values), GELU (erf to 1.5e-7), the final normalisation.
   Each output element is summed in one fixed order (over the input dimension, pair after pair;
   attention over the keys, key after key), whatever the batch holds, so a sequence's result is
   bitwise the same alone and among others. Sequences are packed, tokens only, as bert.py runs
   them; a sequence attends to its first `attended` tokens (ColBERT's [MASK] expansion).
*/
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LANES 16
#define ROWS 6   /* rows of a product's register tile */
#define COLS 4   /* 16-column groups of a product's register tile */

typedef struct {
    const __m512bh *w; /* bf16 pairs, [n/16][k/2][16 columns][2] */
    const float *b;    /* [n] */
    int n, k;
} Linear;

typedef struct {
    Linear qkv, out, up, down; /* qkv: query, key and value stacked, [3 hidden, hidden] */
    const float *attn_norm_w, *attn_norm_b, *out_norm_w, *out_norm_b;
} Layer;

typedef struct {
    int layers, hidden, heads, head_dim, inter, positions;
    float eps;
    const float *word, *position, *type0, *emb_norm_w, *emb_norm_b;
    Layer *layer;
} Bert;

/* ---- vector helpers ------------------------------------------------------------------------ */

static inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

static inline __m512 vexp(__m512 x) {
    /* e^x = 2^n e^r with n = round(x / ln 2) and r = x - n ln 2 (ln 2 split in two, so r is
       exact to fp32), |r| <= ln 2 / 2; e^r by its Taylor series to r^7 (error < 2e-8). */
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.0f)), _mm512_set1_ps(-88.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040);
    static const float taylor[] = {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f};
    for (int i = 0; i < 7; i++) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(taylor[i]));
    return _mm512_scalef_ps(p, n);
}

static inline __m512 vgelu(__m512 x) {
    /* x/2 (1 + erf(x / sqrt 2)); erf by Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7). */
    const __m512 z = _mm512_mul_ps(x, _mm512_set1_ps(0.70710678118654752f));
    const __m512 a = _mm512_abs_ps(z);
    const __m512 t = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_fmadd_ps(a, _mm512_set1_ps(0.3275911f), _mm512_set1_ps(1.0f)));
    __m512 p = _mm512_set1_ps(1.061405429f);
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.453152027f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.421413741f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.284496736f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.254829592f));
    p = _mm512_mul_ps(p, t);
    __m512 erf_abs = _mm512_fnmadd_ps(p, vexp(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), a), a)), _mm512_set1_ps(1.0f));
    __m512 erf = _mm512_mask_sub_ps(erf_abs, _mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_LT_OQ), _mm512_setzero_ps(), erf_abs);
    return _mm512_mul_ps(_mm512_mul_ps(x, _mm512_set1_ps(0.5f)), _mm512_add_ps(erf, _mm512_set1_ps(1.0f)));
}

/* Round a row of fp32 to bf16 (nearest even); n is a multiple of 16. */
static void to_bf16(const float *x, uint16_t *out, int n) {
    for (int i = 0; i < n; i += LANES)
        _mm256_storeu_si256((__m256i *)(out + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + i)));
}

/* LayerNorm of one row in place: the mean, then the mean square of the deviations, each summed
   16 lanes wide in order and the lanes reduced last. */
static void layer_norm(float *x, const float *w, const float *b, int n, float eps) {
    __m512 s = _mm512_setzero_ps();
    for (int i = 0; i < n; i += LANES) s = _mm512_add_ps(s, _mm512_loadu_ps(x + i));
    const __m512 mean = _mm512_set1_ps(hsum(s) / n);
    __m512 q = _mm512_setzero_ps();
    for (int i = 0; i < n; i += LANES) {
        __m512 d = _mm512_sub_ps(_mm512_loadu_ps(x + i), mean);
        q = _mm512_fmadd_ps(d, d, q);
    }
    const __m512 inv = _mm512_set1_ps(1.0f / sqrtf(hsum(q) / n + eps));
    for (int i = 0; i < n; i += LANES) {
        __m512 d = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(x + i), mean), inv);
        _mm512_storeu_ps(x + i, _mm512_fmadd_ps(d, _mm512_loadu_ps(w + i), _mm512_loadu_ps(b + i)));
    }
}

/* ---- products -------------------------------------------------------------------------------- */

/* One register tile: `rows` (<= ROWS) rows of x times COLS * 16 columns of the weight, summed
   over all k/2 pairs in order, then the bias (and `res`, when given) added. */
static inline __attribute__((always_inline)) void tile(const int rows, const uint32_t *x, int kp,
                                                       const __m512bh *w, float *y, int ldy,
                                                       const float *bias, const float *res) {
    __m512 acc[ROWS][COLS];
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < COLS; c++) acc[r][c] = _mm512_setzero_ps();
    for (int p = 0; p < kp; p++) {
        __m512bh b[COLS];
        for (int c = 0; c < COLS; c++) b[c] = w[(size_t)c * kp + p];
        for (int r = 0; r < rows; r++) {
            const __m512bh a = (__m512bh)_mm512_set1_epi32((int)x[(size_t)r * kp + p]);
            for (int c = 0; c < COLS; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], a, b[c]);
        }
    }
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < COLS; c++) {
            __m512 v = _mm512_add_ps(acc[r][c], _mm512_loadu_ps(bias + c * LANES));
            if (res) v = _mm512_add_ps(v, _mm512_loadu_ps(res + (size_t)r * ldy + c * LANES));
            _mm512_storeu_ps(y + (size_t)r * ldy + c * LANES, v);
        }
}

/* y[m, n] = x[m, k] (bf16) W^T + b (+ res[m, n]). Column panels outside, row tiles inside: a
   panel of the weight (k x 64 bf16) stays in cache while every row passes it. */
static void linear(const Linear *L, const uint16_t *x, int m, float *y, const float *res) {
    const int kp = L->k / 2;
    const uint32_t *xp = (const uint32_t *)x;
    for (int n0 = 0; n0 < L->n; n0 += COLS * LANES) {
        const __m512bh *w = L->w + (size_t)(n0 / LANES) * kp;
        for (int m0 = 0; m0 < m; m0 += ROWS) {
            const uint32_t *xr = xp + (size_t)m0 * kp;
            float *yr = y + (size_t)m0 * L->n + n0;
            const float *rr = res ? res + (size_t)m0 * L->n + n0 : NULL;
            switch (m - m0 < ROWS ? m - m0 : ROWS) {
            case 1: tile(1, xr, kp, w, yr, L->n, L->b + n0, rr); break;
            case 2: tile(2, xr, kp, w, yr, L->n, L->b + n0, rr); break;
            case 3: tile(3, xr, kp, w, yr, L->n, L->b + n0, rr); break;
            case 4: tile(4, xr, kp, w, yr, L->n, L->b + n0, rr); break;
            case 5: tile(5, xr, kp, w, yr, L->n, L->b + n0, rr); break;
            default: tile(ROWS, xr, kp, w, yr, L->n, L->b + n0, rr); break;
            }
        }
    }
}

/* ---- attention ------------------------------------------------------------------------------- */

/* One sequence's self-attention, every head: qkv [len, 3 hidden] -> ctx [len, hidden]. Keys
   past `attended` are masked. Scores of 16 keys at a time from the keys transposed (kt);
   softmax in fp32; each output the probabilities' weighted sum of values, key after key. */
static void attention(const Bert *m, const float *qkv, int len, int attended, float *ctx, float *kt,
                      float *probs) {
    const int h = m->hidden, hd = m->head_dim, width = (attended + LANES - 1) / LANES * LANES;
    const float scale = 1.0f / sqrtf((float)hd);
    for (int head = 0; head < m->heads; head++) {
        for (int d = 0; d < hd; d++) {
            for (int j = 0; j < attended; j++) kt[d * width + j] = qkv[(size_t)j * 3 * h + h + head * hd + d];
            for (int j = attended; j < width; j++) kt[d * width + j] = 0.0f;
        }
        for (int i = 0; i < len; i++) {
            const float *q = qkv + (size_t)i * 3 * h + head * hd;
            __m512 best = _mm512_set1_ps(-INFINITY);
            for (int j0 = 0; j0 < width; j0 += LANES) {
                __m512 s = _mm512_setzero_ps();
                for (int d = 0; d < hd; d++) s = _mm512_fmadd_ps(_mm512_set1_ps(q[d]), _mm512_loadu_ps(kt + d * width + j0), s);
                s = _mm512_mul_ps(s, _mm512_set1_ps(scale));
                const __mmask16 live = attended - j0 >= LANES ? 0xFFFF : (__mmask16)((1u << (attended - j0)) - 1);
                s = _mm512_mask_blend_ps(live, _mm512_set1_ps(-INFINITY), s);
                best = _mm512_max_ps(best, s);
                _mm512_storeu_ps(probs + j0, s);
            }
            const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(best));
            __m512 total = _mm512_setzero_ps();
            for (int j0 = 0; j0 < width; j0 += LANES) {
                const __mmask16 live = attended - j0 >= LANES ? 0xFFFF : (__mmask16)((1u << (attended - j0)) - 1);
                __m512 e = _mm512_maskz_mov_ps(live, vexp(_mm512_sub_ps(_mm512_loadu_ps(probs + j0), top)));
                total = _mm512_add_ps(total, e);
                _mm512_storeu_ps(probs + j0, e);
            }
            const float inv = 1.0f / hsum(total);
            float *out = ctx + (size_t)i * h + head * hd;
            for (int d0 = 0; d0 < hd; d0 += LANES) {
                __m512 acc = _mm512_setzero_ps();
                for (int j = 0; j < attended; j++)
                    acc = _mm512_fmadd_ps(_mm512_set1_ps(probs[j]),
                                          _mm512_loadu_ps(qkv + (size_t)j * 3 * h + 2 * h + head * hd + d0), acc);
                _mm512_storeu_ps(out + d0, _mm512_mul_ps(acc, _mm512_set1_ps(inv)));
            }
        }
    }
}

/* ---- the model ------------------------------------------------------------------------------- */

/* 64-byte aligned memory of at least `bytes` (aligned_alloc wants a multiple of the alignment). */
static void *scratch(size_t bytes) { return aligned_alloc(64, (bytes + 63) / 64 * 64); }

static Linear make_linear(void **ptr, int n, int k) {
    Linear L = {(const __m512bh *)ptr[0], (const float *)ptr[1], n, k};
    return L;
}

/* dims: layers, hidden, heads, intermediate, positions. ptrs: word, position, token type 0,
   embedding norm weight, bias; then per layer: qkv w, b; out w, b; attention norm w, b;
   intermediate w, b; output w, b; output norm w, b. */
void *plait_bert_new(const int *dims, float eps, void **ptrs) {
    Bert *m = calloc(1, sizeof(Bert));
    if (!m) return NULL;
    m->layers = dims[0], m->hidden = dims[1], m->heads = dims[2], m->inter = dims[3], m->positions = dims[4];
    m->head_dim = m->hidden / m->heads;
    m->eps = eps;
    m->word = ptrs[0], m->position = ptrs[1], m->type0 = ptrs[2];
    m->emb_norm_w = ptrs[3], m->emb_norm_b = ptrs[4];
    m->layer = calloc((size_t)m->layers, sizeof(Layer));
    if (!m->layer) {
        free(m);
        return NULL;
    }
    void **p = ptrs + 5;
    for (int l = 0; l < m->layers; l++, p += 12) {
        Layer *L = &m->layer[l];
        L->qkv = make_linear(p, 3 * m->hidden, m->hidden);
        L->out = make_linear(p + 2, m->hidden, m->hidden);
        L->attn_norm_w = p[4], L->attn_norm_b = p[5];
        L->up = make_linear(p + 6, m->inter, m->hidden);
        L->down = make_linear(p + 8, m->hidden, m->inter);
        L->out_norm_w = p[10], L->out_norm_b = p[11];
    }
    return m;
}

void plait_bert_free(void *model) {
    Bert *m = model;
    if (m) free(m->layer);
    free(m);
}

/* Encode `seqs` sequences packed in `ids` (lengths[s] tokens each, the first attended[s]
   attended to) into out [tokens, hidden]: the last hidden states, L2-normalised when
   `normalize`. Returns 0, or -1 when a sequence is longer than the position table or scratch
   memory is short. */
int plait_bert_forward(void *model, const int64_t *ids, const int32_t *lengths, const int32_t *attended,
                       int seqs, float *out, int normalize) {
    const Bert *m = model;
    const int h = m->hidden;
    int tokens = 0, longest = 0;
    for (int s = 0; s < seqs; s++) {
        if (lengths[s] > m->positions || attended[s] > lengths[s] || attended[s] < 1) return -1;
        tokens += lengths[s];
        longest = lengths[s] > longest ? lengths[s] : longest;
    }
    const int width = (longest + LANES - 1) / LANES * LANES;
    float *qkv = scratch((size_t)tokens * 3 * h * sizeof(float));
    float *ctx = scratch((size_t)tokens * m->inter * sizeof(float));
    uint16_t *xb = scratch((size_t)tokens * m->inter * sizeof(uint16_t));
    float *kt = scratch(((size_t)m->head_dim + 1) * width * sizeof(float));
    int status = (qkv && ctx && xb && kt) ? 0 : -1;
    if (status == 0) {
        float *x = out, *probs = kt + (size_t)m->head_dim * width;
        for (int s = 0, t = 0; s < seqs; s++)
            for (int i = 0; i < lengths[s]; i++, t++) {
                const float *word = m->word + (size_t)ids[t] * h, *pos = m->position + (size_t)i * h;
                for (int d = 0; d < h; d++) x[(size_t)t * h + d] = word[d] + pos[d] + m->type0[d];
                layer_norm(x + (size_t)t * h, m->emb_norm_w, m->emb_norm_b, h, m->eps);
            }
        for (int l = 0; l < m->layers; l++) {
            const Layer *L = &m->layer[l];
            for (int t = 0; t < tokens; t++) to_bf16(x + (size_t)t * h, xb + (size_t)t * h, h);
            linear(&L->qkv, xb, tokens, qkv, NULL);
            for (int s = 0, t = 0; s < seqs; t += lengths[s], s++)
                attention(m, qkv + (size_t)t * 3 * h, lengths[s], attended[s], ctx + (size_t)t * h, kt, probs);
            for (int t = 0; t < tokens; t++) to_bf16(ctx + (size_t)t * h, xb + (size_t)t * h, h);
            linear(&L->out, xb, tokens, x, x);
            for (int t = 0; t < tokens; t++) layer_norm(x + (size_t)t * h, L->attn_norm_w, L->attn_norm_b, h, m->eps);
            for (int t = 0; t < tokens; t++) to_bf16(x + (size_t)t * h, xb + (size_t)t * h, h);
            linear(&L->up, xb, tokens, ctx, NULL);
            for (size_t i = 0; i < (size_t)tokens * m->inter; i += LANES)
                _mm256_storeu_si256((__m256i *)(xb + i), (__m256i)_mm512_cvtneps_pbh(vgelu(_mm512_loadu_ps(ctx + i))));
            linear(&L->down, xb, tokens, x, x);
            for (int t = 0; t < tokens; t++) layer_norm(x + (size_t)t * h, L->out_norm_w, L->out_norm_b, h, m->eps);
        }
        for (int t = 0; normalize && t < tokens; t++) {
            float *row = x + (size_t)t * h;
            __m512 q = _mm512_setzero_ps();
            for (int d = 0; d < h; d += LANES) q = _mm512_fmadd_ps(_mm512_loadu_ps(row + d), _mm512_loadu_ps(row + d), q);
            const float norm = fmaxf(sqrtf(hsum(q)), 1e-12f);
            for (int d = 0; d < h; d++) row[d] /= norm;
        }
    }
    free(qkv), free(ctx), free(xb), free(kt);
    return status;
}

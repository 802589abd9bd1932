/* Centroid scores of a batch of query tokens, and the centroid candidates of one query
   (PLAID-style probe, then refine), on CPU.

   `plait_centroid_scores` replaces the fp32 product tokens @ centroids^T of
   `CentroidStage.scores` (PyTorch's GEMM: 0.8-1.0 ms a 20-token query in batches of 5-16 on
   one Zen 4 core; this ~0.6): each score is one fp32 sum over the dimensions in order, so a
   token's scores do not depend on its batch; they differ from PyTorch's by ~1e-7 (all 1,009
   SciFact queries: the same candidates at n = 10 and 50).

   Replaces `CentroidStage.candidates` of plait/retrievers/centroids.py (torch.topk, then numpy:
   a lexsort of every probed posting, np.add.at, a gather of centroid scores per candidate
   token, a max per document; ~1.5 ms a SciFact query): here each posting is visited once and
   each candidate token's scores are one contiguous vector, ~0.3 ms.

   Given the query's centroid scores qc [tokens, centroids] (fp32):
   1. probe: each query token's `nprobe` best centroids (ties: the lower index first); a
      document's score is the sum, token after token from 0 in fp32, of the best score among
      the token's probed centroids whose posting list holds the document (none: nothing
      added). Documents whose score is not 0 are found.
   2. shortlist: the `n * refine_factor` best found documents; if that is at most `n`, they
      are the answer.
   3. refine: each shortlisted document's centroid interaction, the sum over query tokens
      (in order, fp32) of the token's best score over the codes of the document's tokens;
      the `n` best are the answer.
   "Best" orders by score, descending, then by document index, ascending: the answer depends
   on the data alone. Sums are added in the order the numpy code adds them, so scores agree
   bitwise; answers can differ only where documents tie at a cut (the shortlist's or the
   answer's last place), among which numpy's argpartition picks in an order of its own
   (SciFact's 300 test queries: the same documents for all, at n = 10 and 50).
*/
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_ranking.h"

#define MAX_TOKENS 32
#define PANEL 64 /* centroids a packed panel holds: 4 zmm */
#define PROWS 6  /* tokens a product tile holds */

/* PROWS (or fewer) tokens times one panel, summed over the dimensions in order. */
static inline __attribute__((always_inline)) void score_tile(int rows, const float *tokens, int dim,
                                                             const float *panel, float *out, int ldo) {
    __m512 acc[PROWS][PANEL / 16];
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < PANEL / 16; c++) acc[r][c] = _mm512_setzero_ps();
    for (int k = 0; k < dim; k++) {
        __m512 b[PANEL / 16];
        for (int c = 0; c < PANEL / 16; c++) b[c] = _mm512_load_ps(panel + (size_t)k * PANEL + c * 16);
        for (int r = 0; r < rows; r++) {
            const __m512 x = _mm512_set1_ps(tokens[(size_t)r * dim + k]);
            for (int c = 0; c < PANEL / 16; c++) acc[r][c] = _mm512_fmadd_ps(x, b[c], acc[r][c]);
        }
    }
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < PANEL / 16; c++) _mm512_storeu_ps(out + (size_t)r * ldo + c * 16, acc[r][c]);
}

/* out[m, centroids] = tokens[m, dim] @ centroids^T, the centroids packed by panels of 64:
   packed[p][k][j] = centroid (64 p + j)'s k-th value (64-byte aligned; centroids a multiple
   of 64, the caller checks). A panel (dim x 64) stays in cache while every token passes it. */
void plait_centroid_scores(const float *tokens, int m, int dim, const float *packed, int centroids, float *out) {
    for (int p = 0; p < centroids / PANEL; p++) {
        const float *panel = packed + (size_t)p * dim * PANEL;
        for (int m0 = 0; m0 < m; m0 += PROWS) {
            const float *t = tokens + (size_t)m0 * dim;
            float *o = out + (size_t)m0 * centroids + (size_t)p * PANEL;
            switch (m - m0 < PROWS ? m - m0 : PROWS) {
            case 1: score_tile(1, t, dim, panel, o, centroids); break;
            case 2: score_tile(2, t, dim, panel, o, centroids); break;
            case 3: score_tile(3, t, dim, panel, o, centroids); break;
            case 4: score_tile(4, t, dim, panel, o, centroids); break;
            case 5: score_tile(5, t, dim, panel, o, centroids); break;
            default: score_tile(PROWS, t, dim, panel, o, centroids); break;
            }
        }
    }
}

/* by_code[c * width + i] = qc[i * centroids + c] for i < tokens, 0 for tokens <= i < width:
   each centroid's scores for every query token in one contiguous vector, so that the refine
   reads a row's scores with one or two loads. 16 x 16 blocks are transposed in registers
   (a scalar loop took 0.19 ms a SciFact query; this ~0.02). */
static void by_centroid(const float *qc, int tokens, int centroids, int width, float *by_code) {
    int c0 = 0;
    for (; c0 + 16 <= centroids; c0 += 16)
        for (int i0 = 0; i0 < width; i0 += 16) {
            __m512 r[16], t[16];
            for (int i = 0; i < 16; i++)
                r[i] = i0 + i < tokens ? _mm512_loadu_ps(qc + (size_t)(i0 + i) * centroids + c0) : _mm512_setzero_ps();
            for (int k = 0; k < 8; k++) {
                t[2 * k] = _mm512_unpacklo_ps(r[2 * k], r[2 * k + 1]);
                t[2 * k + 1] = _mm512_unpackhi_ps(r[2 * k], r[2 * k + 1]);
            }
            for (int k = 0; k < 4; k++)
                for (int h = 0; h < 2; h++) {
                    const __m512d a = _mm512_castps_pd(t[4 * k + h]), b = _mm512_castps_pd(t[4 * k + h + 2]);
                    r[4 * k + 2 * h] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
                    r[4 * k + 2 * h + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
                }
            for (int k = 0; k < 2; k++)
                for (int j = 0; j < 4; j++) {
                    t[8 * k + j] = _mm512_shuffle_f32x4(r[8 * k + j], r[8 * k + 4 + j], 0x88);
                    t[8 * k + 4 + j] = _mm512_shuffle_f32x4(r[8 * k + j], r[8 * k + 4 + j], 0xdd);
                }
            for (int j = 0; j < 8; j++) {
                r[j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88);
                r[8 + j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xdd);
            }
            for (int j = 0; j < 16; j++) _mm512_store_ps(by_code + (size_t)(c0 + j) * width + i0, r[j]);
        }
    for (; c0 < centroids; c0++)
        for (int i = 0; i < width; i++) by_code[(size_t)c0 * width + i] = i < tokens ? qc[(size_t)i * centroids + c0] : 0.0f;
}

/* Writes up to n document indices, best first, to out; returns how many, or -1 when scratch
   memory is short. codes[row]: the centroid of token row; doc_offsets[d]:doc_offsets[d + 1]:
   document d's rows; ivf_offsets[c]:ivf_offsets[c + 1]: centroid c's postings in ivf_docs.
   tokens <= 32, 1 <= nprobe <= centroids (the caller checks). */
int plait_centroid_candidates(const float *qc, int tokens, int centroids, int nprobe, int n, int refine_factor,
                              const int32_t *ivf_docs, const int64_t *ivf_offsets, const int32_t *codes,
                              const int64_t *doc_offsets, int num_docs, int64_t *out) {
    if (tokens < 1 || tokens > MAX_TOKENS || nprobe < 1 || nprobe > centroids) return -1;
    float *approx = calloc((size_t)num_docs, sizeof(float));
    int32_t *seen = malloc((size_t)num_docs * sizeof(int32_t));   /* the last token that added to a doc */
    int32_t *touched = malloc((size_t)num_docs * sizeof(int32_t)); /* docs in first-touch order */
    Ranked *probes = malloc((size_t)nprobe * sizeof(Ranked));
    Ranked *ranked = malloc((size_t)num_docs * sizeof(Ranked));
    float *by_code = NULL; /* qc transposed and padded: [centroids][16 or 32] */
    int status = (approx && seen && touched && probes && ranked) ? 0 : -1;
    int found = 0;
    if (status == 0) {
        memset(seen, 0xff, (size_t)num_docs * sizeof(int32_t));
        for (int i = 0; i < tokens; i++) {
            best_of(qc + (size_t)i * centroids, centroids, nprobe, probes);
            for (int p = 0; p < nprobe; p++) /* best first: a doc's first posting holds its best */
                for (int64_t k = ivf_offsets[probes[p].doc]; k < ivf_offsets[probes[p].doc + 1]; k++) {
                    const int32_t d = ivf_docs[k];
                    if (seen[d] == i) continue;
                    if (seen[d] < 0) touched[found++] = d;
                    seen[d] = i;
                    approx[d] += probes[p].score;
                }
        }
        int count = 0;
        for (int t = 0; t < found; t++)
            if (approx[touched[t]] != 0.0f) ranked[count++] = (Ranked){approx[touched[t]], touched[t]};
        const int64_t wide = (int64_t)n * refine_factor;
        const int shortlist = keep_best(ranked, count, wide < count ? (int)wide : count);
        int result = shortlist;
        const int width = tokens <= 16 ? 16 : 32;
        if (shortlist > n) {
            by_code = aligned_alloc(64, (size_t)centroids * width * sizeof(float));
            if (!by_code) status = -1;
        }
        if (by_code) {
            by_centroid(qc, tokens, centroids, width, by_code);
            for (int s = 0; s < shortlist; s++) {
                const int32_t d = ranked[s].doc;
                float total = 0.0f;
                if (doc_offsets[d + 1] > doc_offsets[d]) {
                    __m512 lo = _mm512_set1_ps(-INFINITY), hi = lo;
                    for (int64_t row = doc_offsets[d]; row < doc_offsets[d + 1]; row++) {
                        const float *v = by_code + (size_t)codes[row] * width;
                        lo = _mm512_max_ps(lo, _mm512_load_ps(v));
                        if (width > 16) hi = _mm512_max_ps(hi, _mm512_load_ps(v + 16));
                    }
                    float best[MAX_TOKENS];
                    _mm512_storeu_ps(best, lo);
                    _mm512_storeu_ps(best + 16, hi);
                    for (int i = 0; i < tokens; i++) total += best[i];
                }
                ranked[s].score = total;
            }
            result = keep_best(ranked, shortlist, n);
        }
        for (int s = 0; s < result && status == 0; s++) out[s] = ranked[s].doc;
        if (status == 0) status = result;
    }
    free(approx), free(seen), free(touched), free(probes), free(ranked), free(by_code);
    return status;
}

/* BM25 score of every document for a query's term ids, summed from the CSC matrix bm25s saves
   (term t's column: documents indices[indptr[t]:indptr[t + 1]], their scores data[...]).
   Replaces the numpy loop of `BM25Stage._score` (plait/retrievers/lexical.py, a fancy-index
   `+=` per term: ~0.03 ms a SciFact query alone, several times that among 16 searching
   threads, each term's slices of the map and temporaries made under the GIL) and adds in its
   order, term after term as given, each document at most once per term, in fp32: the same
   scores, bitwise. The caller checks that every id and index is in range. */
void plait_bm25_scores(const int32_t *ids, int n_ids, const float *data, const int32_t *indices,
                       const int64_t *indptr, int num_docs, float *out) {
    memset(out, 0, (size_t)num_docs * sizeof(float));
    for (int i = 0; i < n_ids; i++) {
        const int64_t end = indptr[ids[i] + 1];
        for (int64_t j = indptr[ids[i]]; j < end; j++) out[indices[j]] += data[j];
    }
}

/* The hybrid stage of one query after its first stages, in one call: BM25's top n, the union
   with the centroid candidates, exact MaxSim of that set (`plait_maxsim`, cpu_maxsim.c),
   z-score fusion and the top k.

   Replaces the numpy glue of `Searcher.hybrid_candidates`, `fusion.fuse` and `_top_k`
   (plait/retrievers/searcher.py and fusion.py: an argpartition over every document's BM25
   score, np.unique of the concatenated candidates, a gather, two z-scores in float64 and a
   lexsort: ~0.25 ms a SciFact query on one thread, under the GIL that 16 searching threads
   share; here lost in the noise of the ~2 ms MaxSim it calls) and computes what it computes:
   1. BM25's top n: the n best scores, the lower document index first among equals at the cut
      (`searcher.best_n`, the numpy path, keeps the same documents).
   2. The candidates: those and the centroid candidates, each document once, in ascending order.
   3. Fusion in float64: z(x) = (x - mean) / std over the candidates (zeros where std < 1e-12),
      mean = sum(x) / n and std = sqrt(sum((x - mean)^2) / n) with numpy's pairwise sum, then
      S = alpha * z(BM25) + (1 - alpha) * z(MaxSim), every product rounded before its sum (no
      FMA): bitwise the doubles numpy's `fuse` gives.
   4. The top k by S, descending, ties by document index, ascending (the lexsort's order).
*/
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "cpu_ranking.h"

int plait_maxsim(const float *query, int tokens, int dim, const uint16_t *matrix, const int64_t *offsets,
                 const int64_t *docs, int ndocs, float *scores, int bf16);

/* numpy's sum of a contiguous float64 array (`pairwise_sum` of its loops_utils.h): blocks of up
   to 128 summed in 8 interleaved accumulators, longer arrays halved at a multiple of 8. */
static double pairwise_sum(const double *x, int64_t n) {
    if (n < 8) {
        double sum = 0.0;
        for (int64_t i = 0; i < n; i++) sum += x[i];
        return sum;
    }
    if (n <= 128) {
        double r[8];
        for (int j = 0; j < 8; j++) r[j] = x[j];
        int64_t i = 8;
        for (; i < n - n % 8; i += 8)
            for (int j = 0; j < 8; j++) r[j] += x[i + j];
        double sum = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for (; i < n; i++) sum += x[i];
        return sum;
    }
    int64_t half = n / 2;
    half -= half % 8;
    return pairwise_sum(x, half) + pairwise_sum(x + half, n - half);
}

#pragma GCC push_options
#pragma GCC optimize("fp-contract=off") /* numpy rounds each product: so must this */

/* z[i] = (x[i] - mean) / std as `fusion.zscore` computes it; z is scratch until the end. */
static void zscore(const double *x, int n, double *z) {
    const double mean = pairwise_sum(x, n) / n;
    for (int i = 0; i < n; i++) z[i] = (x[i] - mean) * (x[i] - mean);
    const double std = sqrt(pairwise_sum(z, n) / n);
    for (int i = 0; i < n; i++) z[i] = std < 1e-12 ? 0.0 : (x[i] - mean) / std;
}

/* sparse[i] = alpha * z(sparse)[i] + (1 - alpha) * z(late)[i]; scratch: 2 n doubles. */
static void fuse(double *sparse, const double *late, int n, double alpha, double *scratch) {
    double *zs = scratch, *zl = scratch + n;
    zscore(sparse, n, zs);
    zscore(late, n, zl);
    for (int i = 0; i < n; i++) sparse[i] = alpha * zs[i] + (1.0 - alpha) * zl[i];
}

#pragma GCC pop_options

typedef struct {
    double score;
    int64_t doc;
} Fused;

static int by_doc(const void *a, const void *b) {
    const int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* score descending, then doc ascending */
static int by_rank(const void *a, const void *b) {
    const Fused *x = a, *y = b;
    if (x->score != y->score) return x->score > y->score ? -1 : 1;
    return (x->doc > y->doc) - (x->doc < y->doc);
}

/* Writes the top k (docs, fused scores) to out_docs and out_scores; returns how many (k or all
   the candidates, if fewer), or -1 when scratch memory is short. sparse[num_docs]: every
   document's BM25 score; n: how many of them (at most num_docs); centroid_docs: the centroid
   stage's documents, each in range; query, tokens, dim, matrix, offsets, bf16: as
   `plait_maxsim` takes them (the caller checks its shapes). */
int plait_hybrid(const float *sparse, int num_docs, int n, const int64_t *centroid_docs, int n_centroid,
                 const float *query, int tokens, int dim, const uint16_t *matrix, const int64_t *offsets,
                 int bf16, double alpha, int k, int64_t *out_docs, double *out_scores) {
    if (n > num_docs) n = num_docs;
    if (n < 0) n = 0;
    const int most = n + n_centroid;
    Ranked *top = malloc(((size_t)n + 1) * sizeof(Ranked));
    int64_t *cands = malloc(((size_t)most + 1) * sizeof(int64_t));
    float *late = malloc(((size_t)most + 1) * sizeof(float));
    double *numbers = malloc(((size_t)most + 1) * 4 * sizeof(double)); /* sparse, late, scratch */
    Fused *ranked = malloc(((size_t)most + 1) * sizeof(Fused));
    int status = top && cands && late && numbers && ranked ? 0 : -1;
    int count = 0;
    if (status == 0 && n > 0) best_of(sparse, num_docs, n, top);
    for (int i = 0; i < n && status == 0; i++) cands[count++] = top[i].doc;
    for (int i = 0; i < n_centroid && status == 0; i++) cands[count++] = centroid_docs[i];
    qsort(cands, count, sizeof(int64_t), by_doc);
    int unique = 0;
    for (int i = 0; i < count; i++)
        if (unique == 0 || cands[i] != cands[unique - 1]) cands[unique++] = cands[i];
    if (status == 0 && unique > 0)
        status = plait_maxsim(query, tokens, dim, matrix, offsets, cands, unique, late, bf16);
    if (status == 0 && unique > 0) {
        double *s = numbers, *l = numbers + unique;
        for (int i = 0; i < unique; i++) s[i] = sparse[cands[i]], l[i] = late[i];
        fuse(s, l, unique, alpha, numbers + 2 * (size_t)unique);
        for (int i = 0; i < unique; i++) ranked[i] = (Fused){s[i], cands[i]};
        qsort(ranked, unique, sizeof(Fused), by_rank);
        status = k < unique ? k : unique;
        for (int i = 0; i < status; i++) out_docs[i] = ranked[i].doc, out_scores[i] = ranked[i].score;
    }
    free(top), free(cands), free(late), free(numbers), free(ranked);
    return status;
}

/* Exact MaxSim of one query against candidate documents read in place from an fp16 matrix.

   Replaces `maxsim` of plait/retrievers/maxsim.py (gather the candidates' rows into a buffer,
   convert them to fp32, one product per block, a max per document, a sum over query tokens)
   for fp16 indexes: here each candidate row is read once, straight from the memory-mapped
   file, converted to fp32 in cache, and multiplied into the dot products of every query token
   at once; nothing is gathered or copied.

   score(q, d) = sum over query tokens i of max over document rows j of <q_i, d_j>, in fp32 as
   the PyTorch path computes it (fp16 -> fp32 is exact). Every dot product is summed over the
   dimensions in order, 0 to dim - 1, in one fp32 accumulator; a document's maxima are summed
   over the query tokens in order. A query's scores therefore never depend on what else is
   searched, nor on how its candidates' rows fall into tiles.

   Layout: the query transposed, (dim, 8-token groups): a lane is a query token, so one FMA
   moves 8 query tokens' dot products with one row by one dimension (ymm: on Zen 4 as fast per
   element as zmm, and a 20-token query wastes 4 lanes instead of 12). A tile is ROWS rows
   (from any documents: each row's maxima go to its own document) times every query group.
*/
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define GROUP 8      /* query tokens per ymm */
#define MAX_GROUPS 4 /* up to 32 query tokens */
#define ROWS 6       /* candidate rows per tile */

/* Dot products of ROWS converted rows (rows[r][dim]) with G query groups (qt[dim][G]), each
   row's result folded into the running maximum of its document (best[slot[r]]). The
   accumulators are named variables, not an array: gcc keeps an array's elements in registers
   but also stores them back on every step. */
#define ACC(r) __m256 a##r##0 = zero, a##r##1 = zero, a##r##2 = zero, a##r##3 = zero
#define STEP(r, G)                                                    \
    do {                                                              \
        const __m256 v = _mm256_broadcast_ss(rows + (r) * dim + d);   \
        a##r##0 = _mm256_fmadd_ps(q0, v, a##r##0);                    \
        if (G > 1) a##r##1 = _mm256_fmadd_ps(q1, v, a##r##1);         \
        if (G > 2) a##r##2 = _mm256_fmadd_ps(q2, v, a##r##2);         \
        if (G > 3) a##r##3 = _mm256_fmadd_ps(q3, v, a##r##3);         \
    } while (0)
#define FOLD(r, G)                                                                  \
    do {                                                                            \
        __m256 *b = best + (size_t)slot[r] * MAX_GROUPS;                             \
        b[0] = _mm256_max_ps(b[0], a##r##0);                                        \
        if (G > 1) b[1] = _mm256_max_ps(b[1], a##r##1);                             \
        if (G > 2) b[2] = _mm256_max_ps(b[2], a##r##2);                             \
        if (G > 3) b[3] = _mm256_max_ps(b[3], a##r##3);                             \
    } while (0)
#define DEFINE_TILE(G)                                                                            \
    static void tile##G(const float *qt, int dim, const float *rows, const int *slot, __m256 *best) { \
        const __m256 zero = _mm256_setzero_ps();                                                  \
        ACC(0); ACC(1); ACC(2); ACC(3); ACC(4); ACC(5);                                          \
        for (int d = 0; d < dim; d++) {                                                           \
            const float *q = qt + (size_t)d * G * GROUP;                                          \
            const __m256 q0 = _mm256_loadu_ps(q);                                                 \
            const __m256 q1 = G > 1 ? _mm256_loadu_ps(q + GROUP) : zero;                          \
            const __m256 q2 = G > 2 ? _mm256_loadu_ps(q + 2 * GROUP) : zero;                      \
            const __m256 q3 = G > 3 ? _mm256_loadu_ps(q + 3 * GROUP) : zero;                      \
            STEP(0, G); STEP(1, G); STEP(2, G); STEP(3, G); STEP(4, G); STEP(5, G);               \
        }                                                                                         \
        FOLD(0, G); FOLD(1, G); FOLD(2, G); FOLD(3, G); FOLD(4, G); FOLD(5, G);                   \
    }
DEFINE_TILE(1)
DEFINE_TILE(2)
DEFINE_TILE(3)
DEFINE_TILE(4)

static void run_tile(int groups, const float *qt, int dim, const float *rows, const int *slot, __m256 *best) {
    switch (groups) {
    case 1: tile1(qt, dim, rows, slot, best); break;
    case 2: tile2(qt, dim, rows, slot, best); break;
    case 3: tile3(qt, dim, rows, slot, best); break;
    default: tile4(qt, dim, rows, slot, best); break;
    }
}

static void to_fp32(const uint16_t *src, float *dst, int dim) {
    for (int d = 0; d < dim; d += 16)
        _mm512_storeu_ps(dst + d, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + d))));
}

/* scores[c] = MaxSim of query [tokens, dim] (fp32) with document docs[c], whose rows are
   matrix[offsets[docs[c]] : offsets[docs[c] + 1]] (fp16); 0 for a document without rows.
   tokens <= 32 and dim a multiple of 16 (the caller checks). Returns 0, or -1 when scratch
   memory is short. */
int plait_maxsim(const float *query, int tokens, int dim, const uint16_t *matrix, const int64_t *offsets,
                 const int64_t *docs, int ndocs, float *scores) {
    const int groups = (tokens + GROUP - 1) / GROUP;
    float *qt = aligned_alloc(64, ((size_t)dim * groups * GROUP * sizeof(float) + 63) / 64 * 64);
    float *rows = aligned_alloc(64, (size_t)ROWS * dim * sizeof(float));
    __m256 *best = aligned_alloc(64, ((size_t)ndocs * MAX_GROUPS * sizeof(__m256) + 63) / 64 * 64);
    int status = (qt && rows && best) ? 0 : -1;
    if (status == 0) {
        for (int d = 0; d < dim; d++)
            for (int i = 0; i < groups * GROUP; i++)
                qt[(size_t)d * groups * GROUP + i] = i < tokens ? query[(size_t)i * dim + d] : 0.0f;
        for (size_t i = 0; i < (size_t)ndocs * MAX_GROUPS; i++) best[i] = _mm256_set1_ps(-INFINITY);
        int slot[ROWS], pending = 0;
        for (int c = 0; c < ndocs; c++)
            for (int64_t row = offsets[docs[c]]; row < offsets[docs[c] + 1]; row++) {
                to_fp32(matrix + (size_t)row * dim, rows + (size_t)pending * dim, dim);
                slot[pending++] = c;
                if (pending == ROWS) {
                    run_tile(groups, qt, dim, rows, slot, best);
                    pending = 0;
                }
            }
        if (pending) { /* fill the tile with copies of its last row: a repeated row leaves a max as it is */
            for (int r = pending; r < ROWS; r++) {
                memcpy(rows + (size_t)r * dim, rows + (size_t)(pending - 1) * dim, (size_t)dim * sizeof(float));
                slot[r] = slot[pending - 1];
            }
            run_tile(groups, qt, dim, rows, slot, best);
        }
        for (int c = 0; c < ndocs; c++) {
            float lanes[MAX_GROUPS * GROUP], total = 0.0f;
            for (int g = 0; g < groups; g++) _mm256_storeu_ps(lanes + g * GROUP, best[(size_t)c * MAX_GROUPS + g]);
            const int empty = offsets[docs[c] + 1] == offsets[docs[c]];
            for (int i = 0; i < tokens && !empty; i++) total += lanes[i];
            scores[c] = total;
        }
    }
    free(qt), free(rows), free(best);
    return status;
}

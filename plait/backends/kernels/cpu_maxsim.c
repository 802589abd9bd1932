/* Exact MaxSim of one query against candidate documents read in place from an fp16 matrix.

   Replaces `maxsim_torch` of plait/retrievers/maxsim.py (gather the candidates' rows into a
   buffer, convert them, one product per block, a max per document, a sum over query tokens)
   for fp16 indexes: here each candidate row is read once, straight from the memory-mapped
   file, converted in cache, and multiplied into the dot products of every query token at once;
   nothing is gathered or copied.

   score(q, d) = sum over query tokens i of max over document rows j of <q_i, d_j>, with the
   products in one of two precisions:
   - fp32 (`plait_maxsim`): as the PyTorch path computes it (fp16 -> fp32 is exact);
   - bf16 (`plait_maxsim_bf16`): the query and each row rounded to bf16 (nearest even), every
     product exact in fp32, summed in fp32 by VDPBF16PS at twice the fp32 FMA rate. The scores
     move by ~1e-3 (SciFact: late and hybrid nDCG@10 / Recall@100 the same to every printed
     decimal as fp32's).
   Every dot product is summed over the dimensions in order, 0 to dim - 1 (bf16: a pair of
   dimensions per step), in one fp32 accumulator; a document's maxima are summed over the
   query tokens in order. A query's scores therefore never depend on what else is searched,
   nor on how its candidates' rows fall into tiles.

   Layout: the query transposed, (dim, 8-token groups) (bf16: (dim / 2, groups, 8 tokens, 2));
   a lane is a query token, so one instruction moves 8 query tokens' dot products with one row
   by one dimension (bf16: two). ymm rather than zmm: on Zen 4 as fast per element, and a
   20-token query wastes 4 lanes instead of 12. A tile is ROWS rows (from any documents: each
   row's maxima go to its own document) times every query group.
*/
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define GROUP 8      /* query tokens per ymm */
#define MAX_GROUPS 4 /* up to 32 query tokens */
#define ROWS 6       /* candidate rows per tile */
#define CHUNK 96     /* rows converted before their tiles run; while they run, the next CHUNK
                        rows are prefetched into L2, so the conversions that follow read cache,
                        not DRAM (SciFact: 2.5 -> 2.0 ms a query with bf16 products) */

/* Dot products of ROWS converted rows with G query groups, each row's result folded into the
   running maximum of its document (best[slot[r]]). The accumulators are named variables, not
   an array: gcc keeps an array's elements in registers but also stores them back on every
   step. MUL(acc, q, v) is one step; ROW(r) the broadcast of row r's value at step d. */
#define ACC(r) __m256 a##r##0 = zero, a##r##1 = zero, a##r##2 = zero, a##r##3 = zero
#define STEP(r, G)                                     \
    do {                                               \
        const VEC v = ROW(r);                          \
        a##r##0 = MUL(a##r##0, q0, v);                 \
        if (G > 1) a##r##1 = MUL(a##r##1, q1, v);      \
        if (G > 2) a##r##2 = MUL(a##r##2, q2, v);      \
        if (G > 3) a##r##3 = MUL(a##r##3, q3, v);      \
    } while (0)
#define FOLD(r, G)                                                      \
    do {                                                                \
        __m256 *b = best + (size_t)slot[r] * MAX_GROUPS;                 \
        b[0] = _mm256_max_ps(b[0], a##r##0);                            \
        if (G > 1) b[1] = _mm256_max_ps(b[1], a##r##1);                 \
        if (G > 2) b[2] = _mm256_max_ps(b[2], a##r##2);                 \
        if (G > 3) b[3] = _mm256_max_ps(b[3], a##r##3);                 \
    } while (0)
/* A tile over `steps` steps; qt holds G group vectors per step, rows `stride` elements each. */
#define DEFINE_TILE(NAME, G, T)                                                                     \
    static void NAME##G(const void *qt_, int steps, const void *rows_, int stride, const int *slot, \
                        __m256 *best) {                                                             \
        const T *qt = qt_, *rows = rows_;                                                          \
        const __m256 zero = _mm256_setzero_ps();                                                   \
        ACC(0); ACC(1); ACC(2); ACC(3); ACC(4); ACC(5);                                           \
        for (int d = 0; d < steps; d++) {                                                          \
            const T *q = qt + (size_t)d * G * GROUP;                                               \
            const VEC q0 = LOAD(q);                                                                \
            const VEC q1 = G > 1 ? LOAD(q + GROUP) : q0;                                           \
            const VEC q2 = G > 2 ? LOAD(q + 2 * GROUP) : q0;                                       \
            const VEC q3 = G > 3 ? LOAD(q + 3 * GROUP) : q0;                                       \
            STEP(0, G); STEP(1, G); STEP(2, G); STEP(3, G); STEP(4, G); STEP(5, G);                \
        }                                                                                          \
        FOLD(0, G); FOLD(1, G); FOLD(2, G); FOLD(3, G); FOLD(4, G); FOLD(5, G);                    \
    }

/* fp32: a step is one dimension. */
#define VEC __m256
#define LOAD(p) _mm256_loadu_ps(p)
#define ROW(r) _mm256_broadcast_ss(rows + (r) * stride + d)
#define MUL(acc, q, v) _mm256_fmadd_ps(q, v, acc)
DEFINE_TILE(tile_f32_, 1, float)
DEFINE_TILE(tile_f32_, 2, float)
DEFINE_TILE(tile_f32_, 3, float)
DEFINE_TILE(tile_f32_, 4, float)
#undef VEC
#undef LOAD
#undef ROW
#undef MUL

/* bf16: a step is a pair of dimensions, one 32-bit element holding both. */
#define VEC __m256bh
#define LOAD(p) ((__m256bh)_mm256_loadu_si256((const __m256i *)(p)))
#define ROW(r) ((__m256bh)_mm256_set1_epi32((int)rows[(r) * stride + d]))
#define MUL(acc, q, v) _mm256_dpbf16_ps(acc, q, v)
DEFINE_TILE(tile_bf16_, 1, uint32_t)
DEFINE_TILE(tile_bf16_, 2, uint32_t)
DEFINE_TILE(tile_bf16_, 3, uint32_t)
DEFINE_TILE(tile_bf16_, 4, uint32_t)

typedef void (*tile_fn)(const void *qt, int steps, const void *rows, int stride, const int *slot, __m256 *best);

static const tile_fn TILES_F32[MAX_GROUPS] = {tile_f32_1, tile_f32_2, tile_f32_3, tile_f32_4};
static const tile_fn TILES_BF16[MAX_GROUPS] = {tile_bf16_1, tile_bf16_2, tile_bf16_3, tile_bf16_4};

/* One fp16 row as the tiles read it: fp32 (4 bytes a dimension) or bf16 pairs (2). */
static void row_to_f32(const uint16_t *src, void *dst, int dim) {
    for (int d = 0; d < dim; d += 16)
        _mm512_storeu_ps((float *)dst + d, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + d))));
}

static void row_to_bf16(const uint16_t *src, void *dst, int dim) {
    for (int d = 0; d < dim; d += 32) {
        const __m512 lo = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + d)));
        const __m512 hi = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + d + 16)));
        _mm512_storeu_si512((uint16_t *)dst + d, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
}

/* fp32 -> bf16 bits, round to nearest even (the query holds no NaN: the caller's vectors are finite). */
static uint32_t bf16_bits(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    return (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
}

/* A place in the stream of candidate rows (document after document), for prefetching. */
typedef struct {
    int c;
    int64_t row;
} Cursor;

/* Moves `at` on by `n` rows, with `fetch` prefetching each row's lines into L2 (into L1 they
   would evict the tile's operands). */
static void run_ahead(Cursor *at, int n, int fetch, const uint16_t *matrix, int dim, const int64_t *offsets,
                      const int64_t *docs, int ndocs) {
    while (n > 0 && at->c < ndocs) {
        if (at->row >= offsets[docs[at->c] + 1]) {
            if (++at->c < ndocs) at->row = offsets[docs[at->c]];
            continue;
        }
        const char *line = (const char *)(matrix + (size_t)at->row * dim);
        for (int b = 0; fetch && b < dim * (int)sizeof(uint16_t); b += 64) _mm_prefetch(line + b, _MM_HINT_T1);
        at->row++, n--;
    }
}

/* The shared driver: `qt` is the packed query (`steps` steps of `groups` vectors); each row is
   converted by `convert` into `steps` 32-bit elements of scratch and scored by `tile`. */
static int maxsim_run(const void *qt, int steps, int groups, int tokens, int dim,
                      void (*convert)(const uint16_t *, void *, int), tile_fn tile, const uint16_t *matrix,
                      const int64_t *offsets, const int64_t *docs, int ndocs, float *scores) {
    const size_t row_bytes = (size_t)steps * sizeof(uint32_t);
    char *rows = aligned_alloc(64, (CHUNK * row_bytes + 63) / 64 * 64);
    __m256 *best = aligned_alloc(64, ((size_t)ndocs * MAX_GROUPS * sizeof(__m256) + 63) / 64 * 64);
    if (!rows || !best) {
        free(rows), free(best);
        return -1;
    }
    for (size_t i = 0; i < (size_t)ndocs * MAX_GROUPS; i++) best[i] = _mm256_set1_ps(-INFINITY);
    int slot[CHUNK], pending = 0;
    Cursor ahead = {0, ndocs ? offsets[docs[0]] : 0};
    run_ahead(&ahead, CHUNK, 0, matrix, dim, offsets, docs, ndocs); /* the first chunk is read now */
    for (int c = 0; c <= ndocs; c++) {
        const int64_t first = c < ndocs ? offsets[docs[c]] : 0, end = c < ndocs ? offsets[docs[c] + 1] : 0;
        for (int64_t row = first; row < end; row++) {
            convert(matrix + (size_t)row * dim, rows + pending * row_bytes, dim);
            slot[pending++] = c;
            if (pending == CHUNK) {
                for (int t = 0; t < CHUNK; t += ROWS) {
                    run_ahead(&ahead, ROWS, 1, matrix, dim, offsets, docs, ndocs);
                    tile(qt, steps, rows + t * row_bytes, steps, slot + t, best);
                }
                pending = 0;
            }
        }
        if (c == ndocs && pending) {
            /* fill the last tile with copies of the last row: a repeated row leaves a max as it is */
            const int filled = (pending + ROWS - 1) / ROWS * ROWS;
            for (int r = pending; r < filled; r++) {
                memcpy(rows + r * row_bytes, rows + (pending - 1) * row_bytes, row_bytes);
                slot[r] = slot[pending - 1];
            }
            for (int t = 0; t < filled; t += ROWS) tile(qt, steps, rows + t * row_bytes, steps, slot + t, best);
        }
    }
    for (int c = 0; c < ndocs; c++) {
        float lanes[MAX_GROUPS * GROUP], total = 0.0f;
        for (int g = 0; g < groups; g++) _mm256_storeu_ps(lanes + g * GROUP, best[(size_t)c * MAX_GROUPS + g]);
        const int empty = offsets[docs[c] + 1] == offsets[docs[c]];
        for (int i = 0; i < tokens && !empty; i++) total += lanes[i];
        scores[c] = total;
    }
    free(rows), free(best);
    return 0;
}

/* scores[c] = MaxSim of query [tokens, dim] (fp32) with document docs[c], whose rows are
   matrix[offsets[docs[c]] : offsets[docs[c] + 1]] (fp16); 0 for a document without rows.
   tokens <= 32 and dim a multiple of 32 (the caller checks). `bf16`: products of bf16-rounded
   operands (see the top of the file), else fp32. Returns 0, or -1 when scratch memory is short
   or tokens is out of range. */
int plait_maxsim(const float *query, int tokens, int dim, const uint16_t *matrix, const int64_t *offsets,
                 const int64_t *docs, int ndocs, float *scores, int bf16) {
    if (tokens < 1 || tokens > MAX_GROUPS * GROUP) return -1;
    const int groups = (tokens + GROUP - 1) / GROUP, width = groups * GROUP;
    const int steps = bf16 ? dim / 2 : dim;
    const tile_fn tile = (bf16 ? TILES_BF16 : TILES_F32)[(groups - 1) & (MAX_GROUPS - 1)];
    uint32_t *qt = aligned_alloc(64, ((size_t)steps * width * sizeof(uint32_t) + 63) / 64 * 64);
    if (!qt) return -1;
    for (int s = 0; s < steps; s++)
        for (int i = 0; i < width; i++) {
            uint32_t *dst = qt + (size_t)s * width + i;
            const float *q = query + (size_t)(i < tokens ? i : 0) * dim;
            if (i >= tokens) *dst = 0;
            else if (bf16) *dst = bf16_bits(q[2 * s]) | bf16_bits(q[2 * s + 1]) << 16;
            else memcpy(dst, q + s, sizeof(float));
        }
    const int status = maxsim_run(qt, steps, groups, tokens, dim, bf16 ? row_to_bf16 : row_to_f32, tile, matrix,
                                  offsets, docs, ndocs, scores);
    free(qt);
    return status;
}

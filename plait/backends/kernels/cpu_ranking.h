/* Ranking by score for the retrieval kernels (`cpu_centroids.c`, `cpu_hybrid.c`).

   "Best" orders by score, descending, then by index, ascending, so that which of several equal
   scores is kept at a cut depends on the data alone (numpy's argpartition picks among equals in
   an order of its own). */
#ifndef PLAIT_CPU_RANKING_H
#define PLAIT_CPU_RANKING_H

#include <stdint.h>

typedef struct {
    float score;
    int32_t doc;
} Ranked;

/* a ranks before b */
static inline int better(Ranked a, Ranked b) { return a.score > b.score || (a.score == b.score && a.doc < b.doc); }

/* Min-heap on "better": the root is the worst of those kept. */
static inline void sift_down(Ranked *heap, int size, int i) {
    for (;;) {
        int worst = i, l = 2 * i + 1, r = l + 1;
        if (l < size && better(heap[worst], heap[l])) worst = l;
        if (r < size && better(heap[worst], heap[r])) worst = r;
        if (worst == i) return;
        const Ranked t = heap[i];
        heap[i] = heap[worst], heap[worst] = t;
        i = worst;
    }
}

/* The best `m` of items[0:count], best first, into items[0:result]; returns result. */
static inline int keep_best(Ranked *items, int count, int m) {
    if (m > count) m = count;
    for (int i = m / 2 - 1; i >= 0; i--) sift_down(items, m, i);
    for (int i = m; i < count; i++)
        if (better(items[i], items[0])) {
            items[0] = items[i];
            sift_down(items, m, 0);
        }
    for (int end = m - 1; end > 0; end--) { /* heap sort: the worst goes last */
        const Ranked t = items[0];
        items[0] = items[end], items[end] = t;
        sift_down(items, end, 0);
    }
    return m;
}

/* The `m` best of scores[0:count] (1 <= m <= count), best first, into out[0:m]: one pass that
   compares most scores with the worst kept only. */
static inline void best_of(const float *scores, int count, int m, Ranked *out) {
    for (int c = 0; c < m; c++) out[c] = (Ranked){scores[c], c};
    for (int i = m / 2 - 1; i >= 0; i--) sift_down(out, m, i);
    for (int c = m; c < count; c++)
        if (scores[c] > out[0].score) { /* a later index never wins a tie */
            out[0] = (Ranked){scores[c], c};
            sift_down(out, m, 0);
        }
    keep_best(out, m, m);
}

#endif

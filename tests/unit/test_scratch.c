/* The CUDA backend's scratch lifetime rule (kernels/cuda/scratch.h) on the
 * CPU: an allocator that poisons what it releases stands in for cudaMalloc
 * and cudaFree, and a "graph" is what a captured CUDA graph is to the
 * scratch buffer, the address it was captured with. A replay after the
 * buffer grew must find its memory allocated and unpoisoned; a capture that
 * needs more scratch than there is fails instead of aborting; retired
 * buffers are released with the last graph. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../kernels/cuda/scratch.h"
#include "test_util.h"

#define POISON  0xDB
#define MAX_BUF 64

/* the fake device: every buffer it ever handed out, and whether it was released */
static struct {
    unsigned char *p;
    size_t bytes;
    int released;
} bufs[MAX_BUF];
static int n_bufs, n_released, out_of_memory;

static void *fake_alloc(void *ctx, size_t bytes)
{
    (void)ctx;
    if (out_of_memory || n_bufs == MAX_BUF)
        return NULL;
    unsigned char *p = malloc(bytes);
    if (p == NULL)
        return NULL;
    memset(p, 0, bytes);
    bufs[n_bufs].p = p;
    bufs[n_bufs].bytes = bytes;
    bufs[n_bufs].released = 0;
    n_bufs++;
    return p;
}

/* released memory is poisoned and kept, so a later use is seen, not UB */
static void fake_release(void *ctx, void *p)
{
    (void)ctx;
    for (int i = 0; i < n_bufs; i++)
        if (bufs[i].p == p) {
            CHECK(!bufs[i].released, "buffer %d released twice", i);
            memset(p, POISON, bufs[i].bytes);
            bufs[i].released = 1;
            n_released++;
            return;
        }
    CHECK(0, "release of a pointer never allocated");
}

static int find(const void *p)
{
    for (int i = 0; i < n_bufs; i++)
        if (bufs[i].p == p)
            return i;
    return -1;
}

/* What a graph does with its scratch when replayed: writes its partials
 * and reads them back; false when the memory was released. */
typedef struct graph {
    unsigned char *scratch;
    size_t used;
} graph_t;

static int replay(const graph_t *g, unsigned char tag)
{
    int i = find(g->scratch);
    if (i < 0 || bufs[i].released)
        return 0;
    memset(g->scratch, tag, g->used);
    for (size_t j = 0; j < g->used; j++)
        if (g->scratch[j] != tag)
            return 0;
    return 1;
}

/* "captures" a step that uses `used` bytes of scratch: NULL when the
 * capture failed (the step then runs op by op) */
static graph_t *capture(tdm_scratch_t *s, size_t used)
{
    tdm_scratch_capture_begin(s);
    unsigned char *p = tdm_scratch_get(s, used);
    if (!tdm_scratch_capture_end(s))
        return NULL;
    graph_t *g = malloc(sizeof(*g));
    g->scratch = p;
    g->used = used;
    tdm_scratch_graph_hold(s);
    return g;
}

static void drop(tdm_scratch_t *s, graph_t *g)
{
    free(g);
    tdm_scratch_graph_drop(s);
}

int main(void)
{
    tdm_scratch_t s;
    tdm_scratch_init(&s, fake_alloc, fake_release, NULL, 1024);

    /* no graphs: growth frees the old buffer at once */
    void *a = tdm_scratch_get(&s, 100);
    CHECK(a != NULL && s.bytes == 1024, "first buffer is the initial size (%zu)", s.bytes);
    CHECK(tdm_scratch_get(&s, 1024) == a, "a request that fits reuses the buffer");
    void *b = tdm_scratch_get(&s, 3000);
    CHECK(b != NULL && b != a && s.bytes == 4096, "growth doubles to fit (%zu)", s.bytes);
    CHECK(bufs[find(a)].released, "without graphs the old buffer is released");

    /* a graph captured on b; the buffer grows; the replay still finds b */
    graph_t *g1 = capture(&s, 2000);
    CHECK(g1 != NULL && g1->scratch == b, "capture within the buffer succeeds");
    CHECK(replay(g1, 1), "replay before growth");
    void *c = tdm_scratch_get(&s, 100000);
    CHECK(c != NULL && c != b, "growth under a graph gives a new buffer");
    CHECK(!bufs[find(b)].released, "the graph's buffer is not released while the graph lives");
    CHECK(replay(g1, 2), "replay after growth uses valid memory (not poisoned, not released)");
    CHECK(tdm_scratch_get(&s, 50) == c, "later ops use the new buffer");

    /* a capture that needs more than there is fails; nothing is allocated */
    int before = n_bufs;
    graph_t *g2 = capture(&s, 1u << 20);
    CHECK(g2 == NULL, "a capture needing more scratch than exists fails (eager fallback)");
    CHECK(n_bufs == before, "no allocation during a capture");
    CHECK(!s.capturing && !s.capture_overflow, "capture state cleared");
    /* the eager step then grows it, still retiring under g1 */
    void *d = tdm_scratch_get(&s, 1u << 20);
    CHECK(d != NULL && !bufs[find(c)].released && !bufs[find(b)].released,
          "eager growth with a graph held retires, never releases");
    graph_t *g3 = capture(&s, 1u << 20);
    CHECK(g3 != NULL && g3->scratch == d, "capture after the eager step succeeds");
    CHECK(replay(g1, 3) && replay(g3, 4), "both graphs replay on valid memory");

    /* the retired buffers go with the last graph, not before */
    drop(&s, g1);
    CHECK(!bufs[find(b)].released, "retired buffers stay while a graph is held");
    CHECK(replay(g3, 5), "the remaining graph replays");
    drop(&s, g3);
    CHECK(bufs[find(b)].released && bufs[find(c)].released,
          "retired buffers released with the last graph");
    CHECK(!bufs[find(d)].released, "the current buffer stays");
    CHECK(s.n_retired == 0 && s.graphs == 0, "no retired buffers or graphs left");

    /* allocation failure is NULL, not a crash; the old buffer stays */
    out_of_memory = 1;
    CHECK(tdm_scratch_get(&s, 1u << 24) == NULL, "out of memory gives NULL");
    CHECK(tdm_scratch_get(&s, 100) == d, "the old buffer stays usable");
    out_of_memory = 0;

    tdm_scratch_fini(&s);
    CHECK(bufs[find(d)].released, "fini releases the buffer");
    for (int i = 0; i < n_bufs; i++)
        CHECK(bufs[i].released, "buffer %d released by the end", i);
    for (int i = 0; i < n_bufs; i++)
        free(bufs[i].p);
    return t_finish();
}

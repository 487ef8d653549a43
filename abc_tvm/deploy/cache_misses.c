/* A qemu-user TCG plugin: a data-cache hierarchy simulated over every guest load and store.
 *
 * Written for the ARM cycle model's memory term (abc_tvm/bench/cycle_model.py): llvm-mca
 * assumes every load hits L1, so a kernel that streams more than the board's caches hold
 * (a Winograd-transformed weight tensor, say) looks as fast as one that lives in L1. This
 * counts, for a board's cache sizes, how many 64-byte lines each level misses and how many
 * dirty lines the last level writes back: (misses + write-backs) x 64 B is the DRAM traffic.
 *
 * Each level is set-associative with LRU replacement, write-allocate; a miss in level i is
 * an access of level i+1. Instruction fetches are not simulated (code is small and hot).
 * Output at exit, one line per level:  L<i> <accesses> <misses> <write-backs>
 *
 * Usage: qemu-aarch64 -plugin ./cache_misses.so,out=FILE,l1=32768:2,l2=1048576:16 prog ...
 * (size in bytes:ways, up to three levels; 64-byte lines). Plugin API version 1, declared
 * here as in block_counts.c.
 */
#include <inttypes.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef uint64_t qemu_plugin_id_t;
typedef uint32_t qemu_plugin_meminfo_t;
typedef struct {
    const char *target_name;
    struct { int min; int cur; } version;
    bool system_emulation;
    union { struct { int smp_vcpus; int max_vcpus; } system; };
} qemu_info_t;
struct qemu_plugin_tb;
struct qemu_plugin_insn;
typedef void (*qemu_plugin_udata_cb_t)(qemu_plugin_id_t id, void *userdata);
typedef void (*qemu_plugin_vcpu_tb_trans_cb_t)(qemu_plugin_id_t id, struct qemu_plugin_tb *tb);
typedef void (*qemu_plugin_vcpu_mem_cb_t)(unsigned int vcpu_index, qemu_plugin_meminfo_t info,
                                          uint64_t vaddr, void *userdata);

void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t id, qemu_plugin_vcpu_tb_trans_cb_t cb);
void qemu_plugin_register_atexit_cb(qemu_plugin_id_t id, qemu_plugin_udata_cb_t cb, void *udata);
size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *tb);
struct qemu_plugin_insn *qemu_plugin_tb_get_insn(const struct qemu_plugin_tb *tb, size_t idx);
void qemu_plugin_register_vcpu_mem_cb(struct qemu_plugin_insn *insn, qemu_plugin_vcpu_mem_cb_t cb,
                                      int flags, int rw, void *userdata);
unsigned int qemu_plugin_mem_size_shift(qemu_plugin_meminfo_t info);
bool qemu_plugin_mem_is_store(qemu_plugin_meminfo_t info);

__attribute__((visibility("default"))) int qemu_plugin_version = 1;

#define LINE_SHIFT 6
#define MAX_LEVELS 3

typedef struct {
    uint64_t sets, ways;
    uint64_t *tag;  /* sets x ways, most recently used first; 0 = empty (tags are line+1) */
    uint8_t *dirty;
    uint64_t accesses, misses, writebacks;
} Level;

static Level levels[MAX_LEVELS];
static int n_levels;
static char out_path[4096] = "cache_misses.txt";

/* Access one line in level i (and below it on a miss). */
static void touch(int i, uint64_t line, bool store)
{
    if (i >= n_levels)
        return;
    Level *c = &levels[i];
    uint64_t set = line % c->sets, key = line + 1;
    uint64_t *t = c->tag + set * c->ways;
    uint8_t *d = c->dirty + set * c->ways;
    c->accesses++;
    uint64_t w;
    for (w = 0; w < c->ways && t[w] != key; w++)
        ;
    bool dirty = store;
    if (w == c->ways) {  /* miss: fetch from below, evict the least recently used */
        c->misses++;
        touch(i + 1, line, false);
        w = c->ways - 1;
        if (t[w] && d[w]) {
            c->writebacks++;
            touch(i + 1, t[w] - 1, true);
        }
    } else {
        dirty = dirty || d[w];
    }
    memmove(t + 1, t, w * sizeof *t);  /* move to front */
    memmove(d + 1, d, w * sizeof *d);
    t[0] = key;
    d[0] = dirty;
}

static void on_mem(unsigned int vcpu, qemu_plugin_meminfo_t info, uint64_t vaddr, void *udata)
{
    (void)vcpu; (void)udata;
    uint64_t size = 1ull << qemu_plugin_mem_size_shift(info);
    bool store = qemu_plugin_mem_is_store(info);
    uint64_t first = vaddr >> LINE_SHIFT, last = (vaddr + size - 1) >> LINE_SHIFT;
    for (uint64_t line = first; line <= last; line++)
        touch(0, line, store);
}

static void on_translate(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    (void)id;
    size_t n = qemu_plugin_tb_n_insns(tb);
    for (size_t i = 0; i < n; i++)
        qemu_plugin_register_vcpu_mem_cb(qemu_plugin_tb_get_insn(tb, i), on_mem,
                                         0 /* QEMU_PLUGIN_CB_NO_REGS */,
                                         3 /* QEMU_PLUGIN_MEM_RW */, NULL);
}

static void on_exit_(qemu_plugin_id_t id, void *udata)
{
    (void)id; (void)udata;
    FILE *f = fopen(out_path, "w");
    if (!f)
        return;
    for (int i = 0; i < n_levels; i++)
        fprintf(f, "L%d %" PRIu64 " %" PRIu64 " %" PRIu64 "\n", i + 1, levels[i].accesses,
                levels[i].misses, levels[i].writebacks);
    fclose(f);
}

__attribute__((visibility("default")))
int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc, char **argv)
{
    (void)info;
    for (int i = 0; i < argc; i++) {
        unsigned long long size, ways;
        int lv;
        if (strncmp(argv[i], "out=", 4) == 0)
            snprintf(out_path, sizeof out_path, "%s", argv[i] + 4);
        else if (sscanf(argv[i], "l%d=%llu:%llu", &lv, &size, &ways) == 3 && lv >= 1
                 && lv <= MAX_LEVELS && ways > 0 && size >= (ways << LINE_SHIFT)) {
            Level *c = &levels[lv - 1];
            c->ways = ways;
            c->sets = (size >> LINE_SHIFT) / ways;
            c->tag = calloc(c->sets * ways, sizeof *c->tag);
            c->dirty = calloc(c->sets * ways, 1);
            if (lv > n_levels)
                n_levels = lv;
        }
    }
    for (int i = 0; i < n_levels; i++)
        if (!levels[i].tag)
            return -1;  /* a gap in the levels */
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_translate);
    qemu_plugin_register_atexit_cb(id, on_exit_, NULL);
    return 0;
}

/* A qemu-user TCG plugin: how often each translated block executed, with its code.
 *
 * Written for the cycle model (abc_tvm/bench/cycle_model.py): qemu's own `-d exec` log
 * writes one line per block execution (gigabytes for one ResNet-18 inference); this counts
 * in place with qemu's inline add and writes one line per block at exit:
 *
 *     <vaddr hex> <executions> <successor vaddr>:<times>,... <instruction words, hex>
 *
 * The successors (up to four per block, the block executed next) let the model cost a loop
 * whose body qemu splits at internal branches as one region, not each piece alone.
 *
 * Usage: qemu-aarch64 -plugin ./block_counts.so,out=FILE prog args...
 * Plugin API version 1 (qemu 7.2 .. 8.x); the few calls used are declared here, they are
 * resolved against the qemu binary when it loads the plugin.
 */
#include <inttypes.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef uint64_t qemu_plugin_id_t;
typedef struct {
    const char *target_name;
    struct { int min; int cur; } version;
    bool system_emulation;
    union { struct { int smp_vcpus; int max_vcpus; } system; };
} qemu_info_t;
struct qemu_plugin_tb;
struct qemu_plugin_insn;
typedef void (*qemu_plugin_udata_cb_t)(qemu_plugin_id_t id, void *userdata);
typedef void (*qemu_plugin_vcpu_udata_cb_t)(unsigned int vcpu_index, void *userdata);
typedef void (*qemu_plugin_vcpu_tb_trans_cb_t)(qemu_plugin_id_t id, struct qemu_plugin_tb *tb);

void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t id, qemu_plugin_vcpu_tb_trans_cb_t cb);
void qemu_plugin_register_vcpu_tb_exec_cb(struct qemu_plugin_tb *tb, qemu_plugin_vcpu_udata_cb_t cb,
                                          int flags, void *userdata);
void qemu_plugin_register_atexit_cb(qemu_plugin_id_t id, qemu_plugin_udata_cb_t cb, void *udata);
size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *tb);
uint64_t qemu_plugin_tb_vaddr(const struct qemu_plugin_tb *tb);
struct qemu_plugin_insn *qemu_plugin_tb_get_insn(const struct qemu_plugin_tb *tb, size_t idx);
const void *qemu_plugin_insn_data(const struct qemu_plugin_insn *insn);
size_t qemu_plugin_insn_size(const struct qemu_plugin_insn *insn);

__attribute__((visibility("default"))) int qemu_plugin_version = 1;

/* One record per translation; records never move (counters are written by address). */
#define SUCCESSORS 4
typedef struct Block {
    uint64_t vaddr, count;
    uint32_t n;
    uint32_t *words;
    struct Block *succ[SUCCESSORS];
    uint64_t succ_n[SUCCESSORS];
    struct Block *next;
} Block;

static Block *blocks, *last;
static char out_path[4096] = "block_counts.txt";

static void on_exec(unsigned int vcpu, void *udata)
{
    (void)vcpu;
    Block *b = udata;
    b->count++;
    if (last) {
        for (int i = 0; i < SUCCESSORS; i++) {
            if (last->succ[i] == b || !last->succ[i]) {
                last->succ[i] = b;
                last->succ_n[i]++;
                break;
            }
        }
    }
    last = b;
}

static void on_translate(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    (void)id;
    size_t n = qemu_plugin_tb_n_insns(tb);
    Block *b = calloc(1, sizeof *b);
    b->vaddr = qemu_plugin_tb_vaddr(tb);
    b->n = (uint32_t)n;
    b->words = calloc(n ? n : 1, sizeof *b->words);
    for (size_t i = 0; i < n; i++) {
        const struct qemu_plugin_insn *insn = qemu_plugin_tb_get_insn(tb, i);
        size_t sz = qemu_plugin_insn_size(insn);
        memcpy(&b->words[i], qemu_plugin_insn_data(insn), sz < 4 ? sz : 4);
    }
    b->next = blocks;
    blocks = b;
    qemu_plugin_register_vcpu_tb_exec_cb(tb, on_exec, 0 /* QEMU_PLUGIN_CB_NO_REGS */, b);
}

static void on_exit_(qemu_plugin_id_t id, void *udata)
{
    (void)id; (void)udata;
    FILE *f = fopen(out_path, "w");
    if (!f)
        return;
    for (Block *b = blocks; b; b = b->next) {
        if (!b->count)
            continue;
        fprintf(f, "%" PRIx64 " %" PRIu64 " ", b->vaddr, b->count);
        int any = 0;
        for (int i = 0; i < SUCCESSORS && b->succ[i]; i++)
            fprintf(f, "%s%" PRIx64 ":%" PRIu64, any++ ? "," : "", b->succ[i]->vaddr,
                    b->succ_n[i]);
        if (!any)
            fputc('-', f);
        for (uint32_t i = 0; i < b->n; i++)
            fprintf(f, " %08" PRIx32, b->words[i]);
        fputc('\n', f);
    }
    fclose(f);
}

__attribute__((visibility("default")))
int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc, char **argv)
{
    (void)info;
    for (int i = 0; i < argc; i++)
        if (strncmp(argv[i], "out=", 4) == 0)
            snprintf(out_path, sizeof out_path, "%s", argv[i] + 4);
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_translate);
    qemu_plugin_register_atexit_cb(id, on_exit_, NULL);
    return 0;
}

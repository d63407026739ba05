/* nvmux classifier interface, context version 1.
 *
 * A classifier is an eBPF program that nvmux runs for each NVMe command of a disk (and,
 * when it asks, again when the command completes). It returns where the command goes.
 * Build with:   clang -O2 -target bpf -c prog.c -o prog.o
 * Load with:    nvmux disk set-classifier DISK prog.o [--section classifier]
 *
 * The full contract (what the router checks, what a program may write, the helpers and
 * their costs) is in docs/classifiers.md. This header is self-contained: it needs no
 * kernel or libbpf headers.
 */
#ifndef NVMUX_CLASSIFIER_H
#define NVMUX_CLASSIFIER_H

typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef unsigned long long __u64;

#define SEC(name) __attribute__((section(name), used))

#define NVMUX_CTX_VERSION 1

/* ctx->event */
#define NVMUX_EV_SUBMIT   0 /* a new command from the guest */
#define NVMUX_EV_COMPLETE 1 /* a path the program chose completed the command */

/* ctx->opcode: NVMe NVM command set opcodes */
#define NVMUX_OP_FLUSH        0x00
#define NVMUX_OP_WRITE        0x01
#define NVMUX_OP_READ         0x02
#define NVMUX_OP_WRITE_ZEROES 0x08
#define NVMUX_OP_DEALLOCATE   0x09

/* ctx->flags */
#define NVMUX_F_FUA 0x01

/* Return value: a route, optionally with NVMUX_HOOK. */
#define NVMUX_CHAIN    0 /* the disk's function chain (qos, crypt) */
#define NVMUX_FAST     1 /* the fast path: skips optional functions (qos), never crypt */
#define NVMUX_EXTERNAL 2 /* the disk's external function process */
#define NVMUX_COMPLETE 3 /* complete now with ctx->status */
/* Run the program again (event NVMUX_EV_COMPLETE) when the chosen path completes. */
#define NVMUX_HOOK 0x100

/* ctx->status: NVMe status, (SCT << 8) | SC. */
#define NVMUX_STATUS(sct, sc) ((__u16)(((sct) << 8) | (sc)))
#define NVMUX_SUCCESS            NVMUX_STATUS(0, 0x00)
#define NVMUX_INVALID_FIELD      NVMUX_STATUS(0, 0x02)
#define NVMUX_INTERNAL_ERROR     NVMUX_STATUS(0, 0x06)
#define NVMUX_NAMESPACE_NOT_READY NVMUX_STATUS(0, 0x82)
#define NVMUX_LBA_OUT_OF_RANGE   NVMUX_STATUS(0, 0x80)
#define NVMUX_WRITE_PROTECTED    NVMUX_STATUS(1, 0x82) /* write to a read-only range */

/* The context: 64 bytes. Fields marked rw may be written; the router validates the
 * command again after the program ran (a rewritten range must lie inside the disk). */
struct nvmux_ctx {
	__u32 version;     /*  0 ro: NVMUX_CTX_VERSION */
	__u32 event;       /*  4 ro: NVMUX_EV_* */
	__u8  opcode;      /*  8 ro: NVMUX_OP_* */
	__u8  flags;       /*  9 rw: NVMUX_F_* */
	__u8  route;       /* 10 ro: at NVMUX_EV_COMPLETE, the route that completed */
	__u8  hops;        /* 11 ro: how many times the program ran before for this command */
	__u32 nsid;        /* 12 ro: namespace id (1 for vhost-user) */
	__u64 slba;        /* 16 rw: first LBA */
	__u32 nlb;         /* 24 rw: number of blocks (0 for flush) */
	__u16 status;      /* 28 rw: at EV_COMPLETE the path's status; the status NVMUX_COMPLETE gives */
	__u16 queue;       /* 30 ro: the disk queue this command came on (0-based) */
	__u64 disk_blocks; /* 32 ro: the disk's size in blocks */
	__u32 block_size;  /* 40 ro: bytes per block */
	__u32 reserved0;   /* 44 ro: 0 */
	__u64 cookie;      /* 48 rw: per-command state kept across hops, sent to and returned by the external function */
	__u64 reserved1;   /* 56 ro: 0 */
};

/* Maps: per-disk state shared by every queue of the disk. Arrays only: key is a __u32
 * index below max_entries. The operator reads and sets them through the API
 * (nvmux disk map-set). */
struct nvmux_map_def {
	__u32 type;        /* NVMUX_MAP_ARRAY */
	__u32 key_size;    /* 4 */
	__u32 value_size;  /* bytes, 1..4096 */
	__u32 max_entries; /* 1..65536 */
	__u32 map_flags;   /* 0 */
};
#define NVMUX_MAP_ARRAY 2 /* the same number as BPF_MAP_TYPE_ARRAY */
#define NVMUX_MAP(name) struct nvmux_map_def SEC("maps") name

/* Helpers (the numbers of the Linux helpers of the same name where one exists). */
static void *(*nvmux_map_lookup)(void *map, const void *key) = (void *)1;
static long (*nvmux_map_update)(void *map, const void *key, const void *value, __u64 flags) = (void *)2;
static __u64 (*nvmux_ktime_ns)(void) = (void *)5;
static __u32 (*nvmux_prandom_u32)(void) = (void *)7;
/* Atomically add to a __u64 inside a map value; returns the old value. */
static __u64 (*nvmux_atomic_add)(__u64 *p, __u64 delta) = (void *)1000;

#endif

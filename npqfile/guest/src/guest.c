/* dirtyguest: a bare x86 guest that dirties its RAM the way npqfile's workload models do.
 *
 * Boots as a 32-bit multiboot kernel (qemu-system-x86_64 -M pc -kernel dirtyguest.elf
 * -initrd params.bin).  Its one multiboot module is the parameter block that
 * npqfile/guest/params.py writes (layout: struct params below, little-endian).  The
 * guest writes pages of the region [region_start, region_start + n_pages * 4096) of
 * guest-physical RAM (which is the memory-backend-file at the same offsets) following
 * one model: idle, uniform, hotset, sequential or zipf, at `rate` page writes per second
 * of guest time, each write changing one byte (+1, as RAMBlock.touch) or `write_bytes`
 * random bytes at a random offset (as RAMBlock.scribble).
 *
 * Pacing: the HPET main counter (QEMU_CLOCK_VIRTUAL: it follows host time while the
 * guest runs and stops while it is stopped) gives guest time.  Two modes (params.catchup):
 *  - CPU-bound (catchup = 0, the simulator's writer and the default): writes fall due only
 *    while the vCPU runs.  The PIT ticks every 1 ms; the time since the previous tick is
 *    credited as running time up to two ticks (one tick of backlog); a longer gap means
 *    the vCPU was descheduled (QEMU's auto-converge throttle sleeps it, cpu-throttle.c),
 *    and the missed budget is dropped, so the throttle lowers the write rate as it
 *    lowers a CPU-bound guest's.
 *  - clock-paced (catchup = 1): every 5 ms PIT tick (npqfile's workload slice) the guest
 *    makes the writes due since it started, catching up after any stall.
 * Either way the writes due (rate x credited time - writes done, at most MAX_BATCH at
 * once, as the simulator's thread does) are made, the counters published, and the guest
 * sleeps in HLT until the next tick.
 *
 * Status block at guest-physical STATUS_ADDR (struct status): a sequence number (odd
 * while an update is in progress), the writes made, the HPET ticks elapsed since pacing
 * began, the HPET frequency, the region, an error code, the PIT interrupts taken and the
 * HPET ticks credited as running time.  The host reads it from the memory-backend-file:
 * achieved rate = writes / (ticks / hpet_hz).
 */
typedef unsigned int u32;
typedef unsigned long long u64;
typedef unsigned char u8;
typedef unsigned short u16;

#define STATUS_ADDR   0x8000u
#define STATUS_MAGIC  0x5351504eu        /* "NPQS" */
#define PARAMS_MAGIC  0x4751504eu        /* "NPQG" */
#define PARAMS_VERSION 2u
#define PAGE          4096u
#define MAX_BATCH     65536u             /* the simulator's MAX_BATCH */
#define PIT_PACED     5966u              /* 1193182 Hz / 5966 = 200 Hz: a 5 ms slice */
#define PIT_CPU       1193u              /* 1193182 Hz / 1193 = 1000 Hz: 1 ms ticks */
#define HPET_BASE     0xFED00000u

enum kind { IDLE, UNIFORM, HOTSET, SEQUENTIAL, ZIPF };
enum state { BOOTING = 0, RUNNING = 1, FAILED = 2 };
enum error { OK = 0, BAD_MAGIC = 1, NO_PARAMS = 2, BAD_PARAMS = 3, REGION = 4, NO_HPET = 5, FAULT = 16 };

struct params {                 /* written by npqfile/guest/params.py */
    u32 magic, version, kind, rate;    /* rate: page writes per second */
    u32 write_bytes;                   /* 1: increment byte 0; more: random bytes */
    u32 region_start, n_pages;         /* bytes, pages */
    u32 hot_pages, share;              /* hotset: hot set size; share of writes * 2^32 */
    u32 perm_mul, perm_add;            /* page = (k * perm_mul + perm_add) % n_pages */
    u32 cursor;                        /* sequential: first page */
    u32 catchup;                       /* 0: CPU-bound (drop time not run), 1: clock-paced */
    u32 seed_lo, seed_hi;              /* xorshift64 state (never 0) */
    u32 table_len;                     /* zipf: quantile table entries that follow (2^16 + 1) */
    u32 table[];                       /* zipf: rank at quantile i / 2^16 */
};

struct status {
    u32 magic, seq, state, error;
    u32 writes_lo, writes_hi, ticks_lo, ticks_hi;
    u32 hpet_hz, region_start, n_pages, timer_ticks;
    u32 run_lo, run_hi;                /* HPET ticks credited as running time */
};

extern volatile u32 timer_ticks;
extern void irq_timer(void), irq_spurious(void);
#define X(n) extern void exc_##n(void);
X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11) X(12) X(13) X(14) X(15)
X(16) X(17) X(18) X(19) X(20) X(21) X(22) X(23) X(24) X(25) X(26) X(27) X(28) X(29) X(30) X(31)
#undef X
static void (*const exceptions[32])(void) = {
    exc_0, exc_1, exc_2, exc_3, exc_4, exc_5, exc_6, exc_7, exc_8, exc_9, exc_10, exc_11, exc_12,
    exc_13, exc_14, exc_15, exc_16, exc_17, exc_18, exc_19, exc_20, exc_21, exc_22, exc_23, exc_24,
    exc_25, exc_26, exc_27, exc_28, exc_29, exc_30, exc_31,
};

static volatile struct status *const status = (volatile struct status *)STATUS_ADDR;
static u64 idt[256];
static u64 rng;

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline u32 mmio_read(u32 addr) { return *(volatile u32 *)addr; }
static inline void mmio_write(u32 addr, u32 v) { *(volatile u32 *)addr = v; }

/* n / d and n % d for a 64-bit n and 32-bit d, with two DIVLs (no libgcc here). */
static u64 divmod64(u64 n, u32 d, u32 *rem)
{
    u32 hi = (u32)(n >> 32), lo = (u32)n, qhi = hi / d, r = hi % d, qlo;
    __asm__("divl %4" : "=a"(qlo), "=d"(r) : "a"(lo), "d"(r), "rm"(d));
    if (rem)
        *rem = r;
    return ((u64)qhi << 32) | qlo;
}

static u64 hpet_now(void)
{
    u32 hi, lo;
    do {                                   /* a carry between the two reads: read again */
        hi = mmio_read(HPET_BASE + 0xF4);
        lo = mmio_read(HPET_BASE + 0xF0);
    } while (hi != mmio_read(HPET_BASE + 0xF4));
    return ((u64)hi << 32) | lo;
}

static u32 next32(void)                    /* xorshift64, high half */
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (u32)(rng >> 32);
}

static u32 below(u32 n) { return (u32)(((u64)next32() * n) >> 32); }

static void publish(u64 writes, u64 ticks, u64 run)
{
    status->seq++;                         /* odd: the host reads again */
    __asm__ volatile("" ::: "memory");
    status->writes_lo = (u32)writes;
    status->writes_hi = (u32)(writes >> 32);
    status->ticks_lo = (u32)ticks;
    status->ticks_hi = (u32)(ticks >> 32);
    status->timer_ticks = timer_ticks;
    status->run_lo = (u32)run;
    status->run_hi = (u32)(run >> 32);
    __asm__ volatile("" ::: "memory");
    status->seq++;
}

static void fail(u32 error)
{
    status->error = error;
    status->state = FAILED;
    for (;;)
        __asm__ volatile("cli; hlt");
}

void guest_fault(u32 vector) { fail(FAULT + vector); }

static void set_gate(u32 vector, void (*handler)(void))
{
    u32 off = (u32)handler;
    idt[vector] = (u64)((off & 0xFFFFu) | (0x08u << 16))
                | ((u64)((off & 0xFFFF0000u) | 0x8E00u) << 32);   /* present, ring 0, 32-bit interrupt gate */
}

static void setup_interrupts(u32 divisor)
{
    struct { u16 limit; u32 base; } __attribute__((packed)) idtr = { sizeof(idt) - 1, (u32)idt };
    for (u32 v = 0; v < 256; v++)
        set_gate(v, v < 32 ? exceptions[v] : irq_spurious);
    set_gate(0x20, irq_timer);
    __asm__ volatile("lidt %0" : : "m"(idtr));
    /* 8259 PICs: vectors 0x20-0x2F, only IRQ0 (the PIT) unmasked */
    outb(0x20, 0x11); outb(0xA0, 0x11);
    outb(0x21, 0x20); outb(0xA1, 0x28);
    outb(0x21, 0x04); outb(0xA1, 0x02);
    outb(0x21, 0x01); outb(0xA1, 0x01);
    outb(0x21, 0xFE); outb(0xA1, 0xFF);
    /* PIT channel 0, mode 2 (rate generator): the tick */
    outb(0x43, 0x34);
    outb(0x40, divisor & 0xFF);
    outb(0x40, divisor >> 8);
}

static u32 hpet_start(void)
{
    u32 period_fs = mmio_read(HPET_BASE + 0x04);      /* counter period in femtoseconds */
    if (period_fs == 0 || period_fs > 100000000u)      /* no HPET there (reads as ones or zeros) */
        fail(NO_HPET);
    mmio_write(HPET_BASE + 0x10, mmio_read(HPET_BASE + 0x10) | 1u);   /* ENABLE_CNF, no legacy routing */
    return (u32)divmod64(1000000000000000ull, period_fs, 0);
}

static u32 permute(const struct params *p, u32 k)
{
    u32 r;
    divmod64((u64)k * p->perm_mul + p->perm_add, p->n_pages, &r);
    return r;
}

static u32 pick(const struct params *p, u32 *cursor)
{
    switch (p->kind) {
    case HOTSET:
        if (next32() < p->share)
            return permute(p, below(p->hot_pages));
        return below(p->n_pages);
    case SEQUENTIAL: {
        u32 page = *cursor;
        *cursor = page + 1 == p->n_pages ? 0 : page + 1;
        return page;
    }
    case ZIPF: {
        /* inverse CDF: the quantile table, linear between its points (the tail is wide) */
        u32 u = next32(), i = u >> 16, lo = p->table[i], hi = p->table[i + 1];
        u32 rank = lo + (u32)(((u64)(hi - lo) * (u & 0xFFFFu)) >> 16);
        return permute(p, (rank - 1) % p->n_pages);
    }
    default:
        return below(p->n_pages);
    }
}

static void write_page(const struct params *p, u32 page)
{
    volatile u8 *base = (volatile u8 *)(p->region_start + page * PAGE);
    if (p->write_bytes <= 1) {
        base[0]++;
        return;
    }
    u32 off = below(PAGE - p->write_bytes + 1);
    for (u32 i = 0; i < p->write_bytes; i++)
        base[off + i] = (u8)next32();
}

struct mb_info { u32 flags, mem_lower, mem_upper, boot_device, cmdline, mods_count, mods_addr; };
struct mb_module { u32 start, end, string, reserved; };

void guest_main(u32 magic, const struct mb_info *mbi)
{
    status->state = BOOTING;
    status->seq = 0;
    status->magic = STATUS_MAGIC;
    if (magic != 0x2BADB002u)
        fail(BAD_MAGIC);
    if (!(mbi->flags & 8) || mbi->mods_count < 1)
        fail(NO_PARAMS);
    const struct mb_module *mod = (const struct mb_module *)mbi->mods_addr;
    const struct params *p = (const struct params *)mod->start;
    if (p->magic != PARAMS_MAGIC || p->version != PARAMS_VERSION || p->n_pages == 0
        || p->write_bytes > PAGE || p->catchup > 1 || (p->kind == ZIPF && p->table_len < 65537u)
        || (p->kind == HOTSET && (p->hot_pages == 0 || p->hot_pages > p->n_pages)))
        fail(BAD_PARAMS);
    u64 region_end = (u64)p->region_start + (u64)p->n_pages * PAGE;
    if (p->region_start < mod->end || (mbi->flags & 1) == 0
        || region_end > 0x100000ull + (u64)mbi->mem_upper * 1024)
        fail(REGION);
    status->region_start = p->region_start;
    status->n_pages = p->n_pages;
    rng = ((u64)p->seed_hi << 32) | p->seed_lo;
    if (!rng)
        rng = 1;
    u32 cursor = p->cursor;

    setup_interrupts(p->catchup ? PIT_PACED : PIT_CPU);
    u32 hz = hpet_start();
    status->hpet_hz = hz;
    /* CPU-bound: a gap over two ticks (one of backlog) was not running time */
    u64 max_gap = divmod64((u64)hz * 2 * PIT_CPU, 1193182u, 0);
    u64 t0 = hpet_now(), writes = 0, run = 0, last = 0;
    status->state = RUNNING;
    for (;;) {
        u64 ticks = hpet_now() - t0, gap = ticks - last;
        last = ticks;
        run += (!p->catchup && gap > max_gap) ? max_gap : gap;
        u32 frac;
        u64 secs = divmod64(run, hz, &frac);             /* rate x running time, without overflow */
        u64 target = secs * p->rate + divmod64((u64)frac * p->rate, hz, 0);
        if (p->kind != IDLE && target > writes) {
            u64 due = target - writes;
            if (due > MAX_BATCH)
                due = MAX_BATCH;
            for (u32 i = 0; i < (u32)due; i++)
                write_page(p, pick(p, &cursor));
            writes += due;
        }
        publish(writes, ticks, run);
        __asm__ volatile("sti; hlt; cli");               /* sleep until the next PIT tick */
    }
}

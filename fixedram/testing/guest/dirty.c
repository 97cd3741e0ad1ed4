/*
 * fixedram test guest: a bare multiboot-v1 ELF32 program with no OS.
 *
 * It stamps a region of RAM with verifiable page patterns at an exact rate, checks every
 * page before it overwrites it, keeps a status block at a fixed physical address and prints
 * a heartbeat line on the first serial port.  See docs/test-guest.md.
 *
 * Parameters (multiboot command line, key=value words):
 *   mib=N   dirty N MiB                  pct=P  dirty P % of the RAM above 4 MiB (default 50)
 *   rate=R  MiB/s from gen 1 on (0=max)  fill=1 whole-page pattern, fill=0 12-byte header only
 *   hb=MS   heartbeat period in ms (default 100)
 *   gens=G  stop stamping once generation G is reached (pages hold G-1, then the guest only
 *           idles and beats); 0 = never stop (default). gens=2: prefill plus one checked pass
 *
 * Page i (at physical 0x400000 + i*4096) holds, for generation g:
 *   w[0] = 0x54524944 ('DIRT'), w[1] = i, w[2] = g, w[k>=3] = (i*0x9E3779B1)^(g*0x85EBCA77)^k
 * Status block at physical 0x3ff000: "MIGSTAT1", then u32 hb, gen, cur, npages, err, rate, fill.
 * The rest of that page holds the guest's other changing state (tick counter, stack) and a
 * one-byte function the main loop calls, so that under TCG it is a code page (see "the hot
 * page" below). After start-up the guest writes no other page outside the workload.
 *
 * Build: gcc -m32 -O2 -ffreestanding -fno-pic -fno-stack-protector -mgeneral-regs-only
 *            -fno-asynchronous-unwind-tables -c dirty.c
 *        ld -m elf_i386 -T mb.ld -z max-page-size=0x1000 --build-id=none dirty.o -o bare.elf
 */

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define MAGIC 0x54524944u
#define PAGE_BASE 0x400000u
#define STATUS_ADDR 0x3ff000u
#define PAGE_WORDS 1024u
#define COM1 0x3f8
#define MAX_BAD_LINES 64u
#define STACK_TOP 0x400000 /* the stack grows down from the end of the status page */
#define STR_(x) #x
#define STR(x) STR_(x)

/* ---- multiboot header and entry ------------------------------------------------------ */

#define MB_MAGIC 0x1BADB002u
#define MB_FLAGS 0x00000002u /* bit 1: ask for memory information */

__attribute__((section(".mbhdr"), used, aligned(4)))
static const u32 mb_header[3] = {MB_MAGIC, MB_FLAGS, (u32)-(MB_MAGIC + MB_FLAGS)};

__attribute__((used, aligned(8)))
const u64 guest_gdt[3] = {0, 0x00CF9A000000FFFFull, 0x00CF92000000FFFFull};

__attribute__((used, aligned(4)))
const struct {
    u16 pad;
    u16 limit;
    u32 base;
} guest_gdt_desc = {0, sizeof(guest_gdt) - 1, (u32)guest_gdt};

__asm__(".section .text.entry,\"ax\"\n"
        ".globl _start\n"
        "_start:\n"
        "  cli\n"
        "  lgdt guest_gdt_desc+2\n"
        "  ljmp $0x08, $1f\n"
        "1: mov $0x10, %ax\n"
        "  mov %ax, %ds\n  mov %ax, %es\n  mov %ax, %ss\n  mov %ax, %fs\n  mov %ax, %gs\n"
        "  mov $" STR(STACK_TOP) ", %esp\n"
        "  push %ebx\n"
        "  call cmain\n"
        "2: cli\n  hlt\n  jmp 2b\n"
        ".text\n");

struct multiboot_info {
    u32 flags, mem_lower, mem_upper, boot_device, cmdline;
};

/* ---- port I/O, serial ------------------------------------------------------------------ */

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) {
    u8 v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

static void serial_init(void) {
    outb(COM1 + 1, 0x00); /* no interrupts */
    outb(COM1 + 3, 0x80); /* DLAB */
    outb(COM1 + 0, 0x01); /* 115200 baud */
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03); /* 8N1 */
    outb(COM1 + 2, 0xC7); /* FIFO */
    outb(COM1 + 4, 0x03);
}

static void putc_(char c) {
    for (u32 spin = 0; spin < 100000 && !(inb(COM1 + 5) & 0x20); spin++) {
    }
    outb(COM1, (u8)c);
}

static void puts_(const char *s) {
    while (*s) putc_(*s++);
}

static void putu(u32 v) {
    char buf[12];
    int n = 0;
    do {
        buf[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n) putc_(buf[--n]);
}

static void putx(u32 v) {
    puts_("0x");
    for (int s = 28; s >= 0; s -= 4) putc_("0123456789abcdef"[(v >> s) & 15]);
}

/* 64-bit unsigned division: -m32 code calls this, and there is no 32-bit libgcc here. */
u64 __udivdi3(u64 n, u64 d) {
    if (d == 0) return 0;
    u64 q = 0, r = 0;
    for (int b = 63; b >= 0; b--) {
        r = (r << 1) | ((n >> b) & 1);
        if (r >= d) {
            r -= d;
            q |= 1ull << b;
        }
    }
    return q;
}

/* ---- interrupts: IDT, PIC, PIT --------------------------------------------------------- */

struct interrupt_frame {
    u32 ip, cs, flags;
};

struct idt_entry {
    u16 off_lo, sel;
    u8 zero, type;
    u16 off_hi;
} __attribute__((packed));

static struct idt_entry idt[256];

/* ---- the hot page ---------------------------------------------------------------------- */

/*
 * Apart from the workload pages, the guest keeps writing only the status page: the status
 * block at its start, this struct after it, and the stack at its end (it needs less than
 * 512 bytes of stack; gcc -fstack-usage: cmain 144, the deepest callee 36, an interrupt frame
 * 20-36). A translated block (the `ret` in anchor[], called on every pass of the main loop)
 * lives in the same page, so QEMU's TCG treats it as a code page and sends every store to it
 * through its slow path, which marks the page dirty for migration on each store.
 *
 * Why: QEMU before 9.0 (7.2 included) does not reset the TLB's "not dirty" flags when a
 * migration bitmap sync clears dirty bits through its word-at-a-time fast path (fixed upstream
 * by 03bfc2188f, "physmem: Fix migration dirty bitmap coherency with TCG memory access").
 * Stores to an ordinary page that the vCPU writes all the time then go unnoticed after a sync,
 * and the migration stream ends with a stale copy of the page (seen with this guest on the
 * stack/tick page and the status page in every 7.2 save that ran 5+ bitmap syncs). A page
 * holding translated code keeps that flag, whatever the bitmap says.
 */
struct hot {
    u8 anchor[16];      /* anchor[0] = 0xC3 (ret) */
    volatile u32 ticks; /* milliseconds since the PIT started */
    u32 bad_lines;      /* BAD lines printed so far */
};

#define HOT_ADDR (STATUS_ADDR + 0x40u)
#define hot ((struct hot *)HOT_ADDR)

static void hot_init(void) {
    hot->anchor[0] = 0xC3;
    hot->ticks = 0;
    hot->bad_lines = 0;
    __asm__ volatile("" ::: "memory");
}

/* Runs the `ret` in the hot page, so TCG keeps (or re-creates) a translated block there. */
static inline void hot_anchor(void) { ((void (*)(void))HOT_ADDR)(); }

__attribute__((interrupt)) static void timer_isr(struct interrupt_frame *f) {
    (void)f;
    hot->ticks++;
    outb(0x20, 0x20);
}

__attribute__((interrupt)) static void irq_isr(struct interrupt_frame *f) {
    (void)f;
    outb(0xA0, 0x20);
    outb(0x20, 0x20);
}

__attribute__((interrupt)) static void fault_isr(struct interrupt_frame *f) {
    puts_("\nFAULT eip=");
    putx(f->ip);
    puts_("\n");
    for (;;) __asm__ volatile("cli; hlt");
}

__attribute__((interrupt)) static void fault_err_isr(struct interrupt_frame *f, u32 code) {
    puts_("\nFAULT code=");
    putx(code);
    puts_(" eip=");
    putx(f->ip);
    puts_("\n");
    for (;;) __asm__ volatile("cli; hlt");
}

static void idt_set(int v, void *handler) {
    u32 a = (u32)handler;
    idt[v].off_lo = (u16)a;
    idt[v].sel = 0x08;
    idt[v].zero = 0;
    idt[v].type = 0x8E; /* present, ring 0, 32-bit interrupt gate */
    idt[v].off_hi = (u16)(a >> 16);
}

static void interrupts_init(void) {
    for (int v = 0; v < 256; v++) {
        int has_err = v == 8 || (v >= 10 && v <= 14) || v == 17 || v == 21;
        idt_set(v, v < 32 ? (has_err ? (void *)fault_err_isr : (void *)fault_isr)
                          : (void *)irq_isr);
    }
    idt_set(0x20, (void *)timer_isr);
    struct {
        u16 limit;
        u32 base;
    } __attribute__((packed)) desc = {sizeof(idt) - 1, (u32)idt};
    __asm__ volatile("lidt %0" ::"m"(desc));

    /* PIC: remap IRQ 0-15 to vectors 0x20-0x2f, unmask only IRQ0 (the PIT). */
    outb(0x20, 0x11);
    outb(0xA0, 0x11);
    outb(0x21, 0x20);
    outb(0xA1, 0x28);
    outb(0x21, 0x04);
    outb(0xA1, 0x02);
    outb(0x21, 0x01);
    outb(0xA1, 0x01);
    outb(0x21, 0xFE);
    outb(0xA1, 0xFF);

    /* PIT channel 0, mode 2, 1193182 Hz / 1193 = 1 kHz. */
    outb(0x43, 0x34);
    outb(0x40, 1193 & 0xFF);
    outb(0x40, 1193 >> 8);
    __asm__ volatile("sti");
}

/* ---- command line ---------------------------------------------------------------------- */

static int word_is(const char *w, const char *key) {
    while (*key)
        if (*w++ != *key++) return 0;
    return *w == '=';
}

static u32 parse_u32(const char *s) {
    u32 v = 0;
    while (*s >= '0' && *s <= '9') v = v * 10 + (u32)(*s++ - '0');
    return v;
}

/* Finds "key=" among space-separated words; returns the value, or dflt when absent. */
static u32 param(const char *cmdline, const char *key, u32 dflt, int *found) {
    const char *p = cmdline;
    while (p && *p) {
        while (*p == ' ') p++;
        if (word_is(p, key)) {
            while (*p != '=') p++;
            if (found) *found = 1;
            return parse_u32(p + 1);
        }
        while (*p && *p != ' ') p++;
    }
    return dflt;
}

/* ---- the workload ---------------------------------------------------------------------- */

struct status {
    char magic[8];
    u32 hb, gen, cur, npages, err, rate, fill;
};

static volatile struct status *const st = (volatile struct status *)STATUS_ADDR;

static inline u32 pattern_base(u32 i, u32 gen) { return (i * 0x9E3779B1u) ^ (gen * 0x85EBCA77u); }

/*
 * Stores gen and cur with one instruction, so a snapshot (taken between two instructions)
 * never sees one without the other. An MMX movq is an ordinary 8-byte store; cmpxchg8b did
 * the same job but is far slower under TCG on a page holding translated code (see "the hot
 * page"): it cut the rate=0 dirty rate by more than half. The compiler never uses MMX here
 * (-mgeneral-regs-only), so mm0/mm1 are free; emms leaves the x87 state as it was.
 */
static inline void set_gen_cur(u32 gen, u32 cur) {
    __asm__ volatile("movd %1, %%mm0\n\t"
                     "movd %2, %%mm1\n\t"
                     "punpckldq %%mm1, %%mm0\n\t"
                     "movq %%mm0, %0\n\t"
                     "emms"
                     : "=m"(*(volatile u64 *)&st->gen)
                     : "r"(gen), "r"(cur)
                     : "memory");
}

static void report_bad(u32 i, u32 gen, u32 word, u32 got, u32 want) {
    st->err++;
    if (hot->bad_lines >= MAX_BAD_LINES) return;
    hot->bad_lines++;
    puts_("BAD page=");
    putu(i);
    puts_(" gen=");
    putu(gen);
    puts_(" word=");
    putu(word);
    puts_(" got=");
    putx(got);
    puts_(" want=");
    putx(want);
    puts_("\n");
}

/* Checks that page i still holds generation gen-1, then stamps generation gen. */
static void stamp(u32 i, u32 gen, u32 fill) {
    u32 *w = (u32 *)(PAGE_BASE + i * 4096u);
    u32 n = fill ? PAGE_WORDS : 3;
    if (gen > 0) {
        u32 pg = gen - 1, b = pattern_base(i, pg);
        if (w[0] != MAGIC) {
            report_bad(i, gen, 0, w[0], MAGIC);
        } else if (w[1] != i) {
            report_bad(i, gen, 1, w[1], i);
        } else if (w[2] != pg) {
            report_bad(i, gen, 2, w[2], pg);
        } else {
            for (u32 k = 3; k < n; k++) {
                if (w[k] != (b ^ k)) {
                    report_bad(i, gen, k, w[k], b ^ k);
                    break;
                }
            }
        }
    }
    u32 b = pattern_base(i, gen);
    w[0] = MAGIC;
    w[1] = i;
    w[2] = gen;
    for (u32 k = 3; k < n; k++) w[k] = b ^ k;
    __asm__ volatile("" ::: "memory"); /* the page is complete before cur moves on */
}

void cmain(struct multiboot_info *mbi) {
    serial_init();
    const char *cmdline = (mbi->flags & 4) ? (const char *)mbi->cmdline : "";
    u32 top = (mbi->flags & 1) ? 0x100000u + mbi->mem_upper * 1024u : 0x800000u;
    u32 avail = top > PAGE_BASE ? (top - PAGE_BASE) / 4096u : 0;

    int have_mib = 0;
    u32 mib = param(cmdline, "mib", 0, &have_mib);
    u32 pct = param(cmdline, "pct", 50, 0);
    u32 rate = param(cmdline, "rate", 0, 0);
    u32 fill = param(cmdline, "fill", 1, 0) ? 1 : 0;
    u32 hb_ms = param(cmdline, "hb", 100, 0);
    u32 gens = param(cmdline, "gens", 0, 0);
    if (hb_ms == 0) hb_ms = 100;
    u32 npages = have_mib ? mib * 256u : (u32)((u64)avail * pct / 100u);
    if (npages > avail) npages = avail;
    if (npages == 0) npages = 1;

    for (int k = 0; k < 8; k++) st->magic[k] = "MIGSTAT1"[k];
    st->hb = 0;
    st->gen = 0;
    st->cur = 0;
    st->npages = npages;
    st->err = 0;
    st->rate = rate;
    st->fill = fill;

    puts_("fixedram guest: npages=");
    putu(npages);
    puts_(" rate=");
    putu(rate);
    puts_(" fill=");
    putu(fill);
    puts_(" hb=");
    putu(hb_ms);
    puts_(" gens=");
    putu(gens);
    puts_(" mem_top=");
    putx(top);
    puts_("\n");

    hot_init();
    interrupts_init();

    u32 pps = rate * 256u;        /* pages per second from gen 1 on; 0 = unlimited */
    u32 credit = 0;               /* in page-milliseconds: 1000 of them buy one page */
    u32 cap = pps * 100u;         /* at most 100 ms of backlog: no burst after a long stop */
    u32 gen = 0, cur = 0, hb = 0;
    u32 last = hot->ticks, hb_last = last, next_hb = last; /* HB 0 right away */
    u32 stamped = 0;              /* pages stamped since the previous heartbeat */

    for (;;) {
        hot_anchor();
        u32 now = hot->ticks;
        if ((int)(now - next_hb) >= 0) {
            u32 el = now - hb_last;
            u32 kibps = el ? (u32)((u64)stamped * 4000u / el) : 0;
            st->hb = hb;
            puts_("HB ");
            putu(hb);
            puts_(" gen=");
            putu(gen);
            puts_(" cur=");
            putu(cur);
            puts_(" err=");
            putu(st->err);
            puts_(" KiBps=");
            putu(kibps);
            puts_("\n");
            hb++;
            stamped = 0;
            hb_last = now;
            next_hb += hb_ms;
            if ((int)(now - next_hb) >= 0) next_hb = now + hb_ms; /* resync after a stall */
        }

        u32 budget;
        if (gen == 0 || pps == 0) {
            budget = 64; /* prefill, or no limit: full speed, look at the clock now and then */
            credit = 0;
        } else {
            u32 dt = now - last;
            if (dt > 100) dt = 100;
            credit += dt * pps;
            if (credit > cap) credit = cap;
            budget = credit / 1000u;
            if (budget > 256) budget = 256;
            credit -= budget * 1000u;
        }
        last = now;
        if (gens && gen >= gens) budget = 0; /* done: idle */

        if (budget == 0) {
            __asm__ volatile("sti; hlt"); /* wait for the next tick */
            continue;
        }
        while (budget--) {
            stamp(cur, gen, fill);
            stamped++;
            cur++;
            if (cur == npages) {
                cur = 0;
                gen++;
            }
            set_gen_cur(gen, cur);
        }
    }
}

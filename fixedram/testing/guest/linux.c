/*
 * fixedram Linux test guest workload: /lxguest in the initramfs of fixedram.testing.guest.linux.
 *
 * It keeps known data in RAM, checks it itself every heartbeat and keeps rewriting other
 * memory, so that a restored guest can say whether its memory survived:
 *   - data: `data=N` MiB of pseudo-random bytes (seeded from getrandom) in a tmpfs file,
 *     mapped shared; its digest is computed once at start and the file is re-hashed before
 *     every heartbeat. A mismatch prints "BAD data digest=<got> want=<want>" and counts in err.
 *   - dirty: `mib=N` MiB of anonymous memory whose pages are stamped at `rate=R` MiB/s (0 = as
 *     fast as possible) with the pattern of the bare guest (dirty.c): page i, generation g:
 *     w[0]='DIRT', w[1]=i, w[2]=g, w[k>=3]=(i*0x9E3779B1)^(g*0x85EBCA77)^k; before writing
 *     generation g the page must hold g-1, else "BAD page=..." and err+1.
 *   - devices: where the guest has them, every heartbeat reads 4 KiB of the virtio disk
 *     /dev/vda (O_DIRECT, a different block each time) and 16 bytes of /dev/hwrng (virtio-rng);
 *     a failed read prints "BAD device ..." and counts in err (a broken device hangs the
 *     heartbeat instead).
 *   - touch: with `touch=N` (MiB, default 0 = off) it also fills N MiB of anonymous memory
 *     with a known pattern at start (page i: w[0]='TUCH', w[1]=i, w[2]=~i) and then does
 *     nothing with it until a 't' arrives on the second serial port (/dev/ttyS1, polled
 *     without blocking): it then reads those three words of every page of the region, in
 *     order, and prints "TOUCH <k> pages=<n> bad=<b> ms=<ms>" (k counts the commands). After
 *     a restore that is "the workload resumes": every page it reads must be in RAM first.
 * Every `hb=MS` ms (default 1000) it prints on stdout (the serial console):
 *   HB <n> gen=<g> cur=<page> err=<e> KiBps=<k> data=<16 hex digits of the digest>
 * Parameters are key=value words of the kernel command line (/proc/cmdline).
 *
 * Build: gcc -static -O2 -o lxguest linux.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define MAGIC 0x54524944u
#define PAGE_WORDS 1024u
#define MAX_BAD_LINES 64u
#define TOUCH_MAGIC 0x48435554u

static char cmdline[4096];
static uint32_t err, bad_lines;
static int disk_fd = -1, rng_fd = -1;
static void *disk_buf;

static void say(const char *s);

/* One read from each device the guest has; failures count as errors. */
static void poke_devices(uint32_t hb) {
    char line[120];
    if (disk_fd >= 0) {
        off_t at = (off_t)(hb % 16384u) * 4096;
        if (pread(disk_fd, disk_buf, 4096, at) != 4096) {
            err++;
            snprintf(line, sizeof line, "BAD device vda read at %lld\n", (long long)at);
            say(line);
        }
    }
    if (rng_fd >= 0) {
        char b[16];
        if (read(rng_fd, b, sizeof b) <= 0) {
            err++;
            snprintf(line, sizeof line, "BAD device hwrng read: %s\n", strerror(errno));
            say(line);
        }
    }
}

static uint32_t param(const char *key, uint32_t dflt) {
    size_t n = strlen(key);
    for (const char *p = cmdline; *p;) {
        while (*p == ' ' || *p == '\n') p++;
        if (!strncmp(p, key, n) && p[n] == '=') return (uint32_t)strtoul(p + n + 1, 0, 10);
        while (*p && *p != ' ') p++;
    }
    return dflt;
}

static uint64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static void say(const char *s) {
    size_t n = strlen(s);
    while (n) {
        ssize_t w = write(1, s, n);
        if (w <= 0) return;
        s += w;
        n -= (size_t)w;
    }
}

/* Four independent lanes (the hash is re-run every heartbeat under TCG: keep it cheap). */
static uint64_t digest(const uint64_t *p, size_t words) {
    uint64_t h[4] = {0x9E3779B97F4A7C15ull, 0xC2B2AE3D27D4EB4Full, 0x165667B19E3779F9ull,
                     0x27D4EB2F165667C5ull};
    for (size_t i = 0; i + 4 <= words; i += 4)
        for (int k = 0; k < 4; k++) {
            h[k] = (h[k] ^ p[i + k]) * 0x100000001B3ull;
            h[k] ^= h[k] >> 29;
        }
    return h[0] ^ (h[1] * 3) ^ (h[2] * 5) ^ (h[3] * 7);
}

static inline uint32_t pattern_base(uint32_t i, uint32_t gen) {
    return (i * 0x9E3779B1u) ^ (gen * 0x85EBCA77u);
}

static void report_bad(uint32_t i, uint32_t gen, uint32_t word, uint32_t got, uint32_t want) {
    char line[160];
    err++;
    if (bad_lines >= MAX_BAD_LINES) return;
    bad_lines++;
    snprintf(line, sizeof line, "BAD page=%u gen=%u word=%u got=%x want=%x\n", i, gen, word,
             got, want);
    say(line);
}

static void stamp(uint32_t *w, uint32_t i, uint32_t gen) {
    if (gen > 0) {
        uint32_t pg = gen - 1, b = pattern_base(i, pg);
        if (w[0] != MAGIC) report_bad(i, gen, 0, w[0], MAGIC);
        else if (w[1] != i) report_bad(i, gen, 1, w[1], i);
        else if (w[2] != pg) report_bad(i, gen, 2, w[2], pg);
        else
            for (uint32_t k = 3; k < PAGE_WORDS; k++)
                if (w[k] != (b ^ k)) {
                    report_bad(i, gen, k, w[k], b ^ k);
                    break;
                }
    }
    uint32_t b = pattern_base(i, gen);
    w[0] = MAGIC;
    w[1] = i;
    w[2] = gen;
    for (uint32_t k = 3; k < PAGE_WORDS; k++) w[k] = b ^ k;
}

/* The touch region: filled once; read page by page on each 't' from the command port. */
static uint32_t *touch_mem;
static uint32_t touch_pages, touches;
static int cmd_fd = -1;

static void touch_setup(uint32_t mib) {
    if (!mib) return;
    touch_pages = mib * 256u;
    touch_mem = mmap(0, (size_t)touch_pages * 4096u, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (touch_mem == MAP_FAILED) {
        say("lxguest: cannot map the touch region\n");
        touch_mem = 0;
        return;
    }
    for (uint32_t i = 0; i < touch_pages; i++) {
        uint32_t *w = touch_mem + (size_t)i * PAGE_WORDS;
        w[0] = TOUCH_MAGIC;
        w[1] = i;
        w[2] = ~i;
    }
    cmd_fd = open("/dev/ttyS1", O_RDWR | O_NOCTTY | O_NONBLOCK);
    struct termios t;
    if (cmd_fd >= 0 && tcgetattr(cmd_fd, &t) == 0) {
        cfmakeraw(&t);
        tcsetattr(cmd_fd, TCSANOW, &t);
    }
}

/* A 't' on the command port: read the region, say how long it took. */
static void touch_poll(void) {
    char c[16], line[120];
    if (cmd_fd < 0 || !touch_mem) return;
    ssize_t n = read(cmd_fd, c, sizeof c);
    for (ssize_t k = 0; k < n; k++) {
        if (c[k] != 't') continue;
        uint64_t t0 = now_ms();
        uint32_t bad = 0;
        for (uint32_t i = 0; i < touch_pages; i++) {
            const volatile uint32_t *w = touch_mem + (size_t)i * PAGE_WORDS;
            if (w[0] != TOUCH_MAGIC || w[1] != i || w[2] != ~i) bad++;
        }
        err += bad;
        snprintf(line, sizeof line, "TOUCH %u pages=%u bad=%u ms=%llu\n", touches++,
                 touch_pages, bad, (unsigned long long)(now_ms() - t0));
        say(line);
    }
}

int main(void) {
    int fd = open("/proc/cmdline", O_RDONLY);
    if (fd >= 0) {
        ssize_t n = read(fd, cmdline, sizeof cmdline - 1);
        if (n > 0) cmdline[n] = 0;
        close(fd);
    }
    uint32_t data_mib = param("data", 16), mib = param("mib", 16);
    uint32_t rate = param("rate", 4), hb_ms = param("hb", 1000), touch_mib = param("touch", 0);
    if (hb_ms == 0) hb_ms = 1000;
    if (mib == 0) mib = 1;
    char line[200];

    /* the known data, in tmpfs */
    size_t dlen = (size_t)data_mib << 20;
    uint64_t *data = 0, want = 0;
    if (dlen) {
        int dfd = open("/data/blob", O_RDWR | O_CREAT | O_TRUNC, 0600);
        if (dfd < 0 || ftruncate(dfd, (off_t)dlen) != 0) {
            say("lxguest: cannot create /data/blob\n");
            return 1;
        }
        data = mmap(0, dlen, PROT_READ | PROT_WRITE, MAP_SHARED, dfd, 0);
        if (data == MAP_FAILED) {
            say("lxguest: cannot map /data/blob\n");
            return 1;
        }
        uint64_t x = 0;
        if (getrandom(&x, sizeof x, 0) != sizeof x) x = now_ms();
        x |= 1;
        for (size_t i = 0; i < dlen / 8; i++) { /* xorshift64* */
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            data[i] = x * 0x2545F4914F6CDD1Dull;
        }
        want = digest(data, dlen / 8);
    }

    uint32_t npages = mib * 256u;
    uint32_t *pages = mmap(0, (size_t)npages * 4096u, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (pages == MAP_FAILED) {
        say("lxguest: cannot map the dirty region\n");
        return 1;
    }
    disk_fd = open("/dev/vda", O_RDONLY | O_DIRECT);
    if (disk_fd >= 0 && posix_memalign(&disk_buf, 4096, 4096) != 0) disk_fd = -1;
    rng_fd = open("/dev/hwrng", O_RDONLY);
    char probe[16];
    if (rng_fd >= 0 && read(rng_fd, probe, sizeof probe) <= 0) { /* no rng device bound */
        close(rng_fd);
        rng_fd = -1;
    }
    touch_setup(touch_mib);
    snprintf(line, sizeof line,
             "fixedram lxguest: data=%u MiB digest=%016llx mib=%u rate=%u hb=%u vda=%d hwrng=%d"
             " touch=%u cmd=%d\n", data_mib, (unsigned long long)want, mib, rate, hb_ms,
             disk_fd >= 0, rng_fd >= 0, touch_mem ? touch_mib : 0, cmd_fd >= 0);
    say(line);

    uint64_t pps = (uint64_t)rate * 256u, credit = 0, cap = pps * 100u;
    uint32_t gen = 0, cur = 0, hb = 0, stamped = 0;
    uint64_t last = now_ms(), hb_last = last, next_hb = last;
    for (;;) {
        touch_poll();
        uint64_t now = now_ms();
        if (now >= next_hb) {
            poke_devices(hb);
            uint64_t got = data ? digest(data, dlen / 8) : 0;
            if (got != want) {
                err++;
                snprintf(line, sizeof line, "BAD data digest=%016llx want=%016llx\n",
                         (unsigned long long)got, (unsigned long long)want);
                say(line);
            }
            uint64_t el = now - hb_last;
            uint64_t kibps = el ? (uint64_t)stamped * 4000u / el : 0;
            snprintf(line, sizeof line, "HB %u gen=%u cur=%u err=%u KiBps=%llu data=%016llx\n",
                     hb, gen, cur, err, (unsigned long long)kibps, (unsigned long long)got);
            say(line);
            hb++;
            stamped = 0;
            hb_last = now;
            next_hb += hb_ms;
            if (now >= next_hb) next_hb = now + hb_ms; /* resync after a stop */
            now = now_ms();
        }
        uint64_t budget;
        if (gen == 0 || pps == 0) {
            budget = 256;
            credit = 0;
        } else {
            uint64_t dt = now - last;
            if (dt > 100) dt = 100;
            credit += dt * pps;
            if (credit > cap) credit = cap;
            budget = credit / 1000u;
            credit -= budget * 1000u;
        }
        last = now;
        if (budget == 0) {
            struct timespec ts = {0, 5 * 1000 * 1000};
            nanosleep(&ts, 0);
            continue;
        }
        while (budget--) {
            stamp(pages + (size_t)cur * PAGE_WORDS, cur, gen);
            stamped++;
            if (++cur == npages) {
                cur = 0;
                gen++;
            }
        }
    }
}

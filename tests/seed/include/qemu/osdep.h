/*
 * Stand-in for QEMU's qemu/osdep.h, just enough to compile the npqfile seed
 * (QEMU 2.10/2.12-era migration/qemu-file.c) as a test library.
 * Written for npqfile's differential tests; not QEMU code.
 */
#ifndef NPQ_STANDIN_OSDEP_H
#define NPQ_STANDIN_OSDEP_H

#define _GNU_SOURCE 1
#include <assert.h>
#include <errno.h>
#include <limits.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>

#ifndef IOV_MAX
#define IOV_MAX 1024
#endif

#ifndef MIN
#define MIN(a, b) (((a) < (b)) ? (a) : (b))
#endif

/* glib allocation helpers: calloc that aborts, as g_new0 does. */
static inline void *npq_alloc0(size_t n)
{
    void *p = calloc(1, n ? n : 1);
    if (!p) {
        abort();
    }
    return p;
}
#define g_new0(type, n) ((type *)npq_alloc0(sizeof(type) * (n)))
#define g_free(p) free(p)

/*
 * qemu_madvise is not really performed: the harness records (address, length)
 * so the tests can compare the pages the seed would release.
 */
#define QEMU_MADV_DONTNEED 4
int qemu_madvise(void *addr, size_t len, int advice);

/* Bitmaps of unsigned long words, as QEMU's qemu/bitmap.h and bitops.h. */
#define BITS_PER_LONG (sizeof(unsigned long) * CHAR_BIT)
#define BITS_TO_LONGS(nr) (((nr) + BITS_PER_LONG - 1) / BITS_PER_LONG)
#define DECLARE_BITMAP(name, bits) unsigned long name[BITS_TO_LONGS(bits)]

static inline void set_bit(long nr, unsigned long *addr)
{
    addr[nr / BITS_PER_LONG] |= 1UL << (nr % BITS_PER_LONG);
}

static inline int test_bit(long nr, const unsigned long *addr)
{
    return (addr[nr / BITS_PER_LONG] >> (nr % BITS_PER_LONG)) & 1;
}

/* Index of the first set bit >= offset, or size when there is none. */
static inline unsigned long find_next_bit(const unsigned long *addr,
                                          unsigned long size,
                                          unsigned long offset)
{
    for (; offset < size; offset++) {
        if (test_bit(offset, addr)) {
            return offset;
        }
    }
    return size;
}

#endif

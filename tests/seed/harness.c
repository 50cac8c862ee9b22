/*
 * Test harness linked with the seed (migration/qemu-file.c, QEMU 2.10/2.12
 * era) into a shared library that npqfile's differential tests load with
 * ctypes.  Written for npqfile; not QEMU code.
 *
 * It provides what the stand-in headers declare but do not define
 * (qemu_madvise, which only records), a recording write backend ("sink"), a
 * chunked read backend ("source"), a backend-less dummy file, and a z_stream
 * constructor for qemu_put_compression_data.
 */
#include "qemu/osdep.h"
#include <zlib.h>
#include "qemu/iov.h"
#include "qemu-file.h"

/* ---- qemu_madvise: record instead of advising ---------------------------- */

#define MADV_LOG_MAX 4096
static uintptr_t madv_addr[MADV_LOG_MAX];
static size_t madv_len[MADV_LOG_MAX];
static size_t madv_after[MADV_LOG_MAX];
static size_t madv_count;
static size_t writev_calls;    /* sink writev calls since the last clear */

int qemu_madvise(void *addr, size_t len, int advice)
{
    assert(advice == QEMU_MADV_DONTNEED);
    if (madv_count < MADV_LOG_MAX) {
        madv_addr[madv_count] = (uintptr_t)addr;
        madv_len[madv_count] = len;
        madv_after[madv_count] = writev_calls;
    }
    madv_count++;
    return 0;
}

/* Number of qemu_madvise calls since the last clear (may exceed the log). */
size_t harness_madv_count(void)
{
    return madv_count;
}

/*
 * Entry i of the log: 0 and fills addr/len and the number of writev calls
 * made before it (since the last clear), or -1 when i is not logged.
 */
int harness_madv_get(size_t i, uintptr_t *addr, size_t *len, size_t *after)
{
    if (i >= madv_count || i >= MADV_LOG_MAX) {
        return -1;
    }
    *addr = madv_addr[i];
    *len = madv_len[i];
    *after = madv_after[i];
    return 0;
}

void harness_madv_clear(void)
{
    madv_count = 0;
    writev_calls = 0;
}

/* ---- write backend: records every writev call --------------------------- */

typedef struct Sink {
    uint8_t *data;          /* bytes accepted by successful (or short) calls */
    size_t len, cap;
    uint64_t *call_bytes;   /* per writev call: bytes requested */
    uint32_t *call_iovcnt;  /* per writev call: iovec count */
    size_t ncalls, calls_cap;
    long fail_call;         /* index of the call that fails; -1 = never */
    long fail_ret;          /* its return value: -errno or a short count */
    int close_calls;
    int close_ret;
} Sink;

static void *grow(void *p, size_t *cap, size_t need, size_t elem)
{
    if (need <= *cap) {
        return p;
    }
    while (*cap < need) {
        *cap = *cap ? *cap * 2 : 64;
    }
    p = realloc(p, *cap * elem);
    if (!p) {
        abort();
    }
    return p;
}

static ssize_t sink_writev(void *opaque, struct iovec *iov, int iovcnt,
                           int64_t pos)
{
    Sink *s = opaque;
    size_t want = iov_size(iov, iovcnt), keep = want, done = 0;
    size_t cap = s->calls_cap;
    ssize_t ret = want;
    int i;

    (void)pos;
    writev_calls++;
    s->call_bytes = grow(s->call_bytes, &cap, s->ncalls + 1,
                         sizeof(*s->call_bytes));
    cap = s->calls_cap;
    s->call_iovcnt = grow(s->call_iovcnt, &cap, s->ncalls + 1,
                          sizeof(*s->call_iovcnt));
    s->calls_cap = cap;
    s->call_bytes[s->ncalls] = want;
    s->call_iovcnt[s->ncalls] = iovcnt;
    if ((long)s->ncalls++ == s->fail_call) {
        ret = s->fail_ret;
        keep = ret < 0 ? 0 : MIN((size_t)ret, want);
    }
    s->data = grow(s->data, &s->cap, s->len + keep, 1);
    for (i = 0; i < iovcnt && done < keep; i++) {
        size_t l = MIN(iov[i].iov_len, keep - done);
        memcpy(s->data + s->len + done, iov[i].iov_base, l);
        done += l;
    }
    s->len += keep;
    return ret;
}

static int sink_close(void *opaque)
{
    Sink *s = opaque;

    s->close_calls++;
    return s->close_ret;
}

static const QEMUFileOps sink_ops = {
    .writev_buffer = sink_writev,
    .close = sink_close,
};

Sink *harness_sink_new(long fail_call, long fail_ret, int close_ret)
{
    Sink *s = npq_alloc0(sizeof(*s));

    s->fail_call = fail_call;
    s->fail_ret = fail_ret;
    s->close_ret = close_ret;
    return s;
}

void harness_sink_free(Sink *s)
{
    free(s->data);
    free(s->call_bytes);
    free(s->call_iovcnt);
    free(s);
}

const uint8_t *harness_sink_data(Sink *s, size_t *len)
{
    *len = s->len;
    return s->data;
}

size_t harness_sink_ncalls(Sink *s)
{
    return s->ncalls;
}

void harness_sink_call(Sink *s, size_t i, uint64_t *bytes, uint32_t *iovcnt)
{
    assert(i < s->ncalls);
    *bytes = s->call_bytes[i];
    *iovcnt = s->call_iovcnt[i];
}

int harness_sink_close_calls(Sink *s)
{
    return s->close_calls;
}

QEMUFile *harness_open_sink(Sink *s)
{
    return qemu_fopen_ops(s, &sink_ops);
}

/* ---- read backend: serves a byte string in programmed chunk sizes ------- */

typedef struct Source {
    uint8_t *data;
    size_t len, off;
    size_t *chunks;         /* cycle of maximum sizes per get_buffer call */
    size_t nchunks, next;
    long end_ret;           /* returned once data is exhausted: 0 or -errno */
    size_t calls, calls_after_end;  /* get_buffer calls: all, after the end */
} Source;

static ssize_t source_get_buffer(void *opaque, uint8_t *buf, int64_t pos,
                                 size_t size)
{
    Source *s = opaque;
    size_t n = size;

    (void)pos;
    s->calls++;
    if (s->off >= s->len) {
        s->calls_after_end++;
        return s->end_ret;
    }
    if (s->nchunks) {
        size_t chunk = s->chunks[s->next++ % s->nchunks];  /* MIN evaluates twice */

        n = MIN(n, chunk);
    }
    n = MIN(n, s->len - s->off);
    memcpy(buf, s->data + s->off, n);
    s->off += n;
    return n;
}

static const QEMUFileOps source_ops = {
    .get_buffer = source_get_buffer,
};

/* chunks: nchunks sizes >= 1, used in a cycle; nchunks 0 = no limit. */
Source *harness_source_new(const uint8_t *data, size_t len,
                           const size_t *chunks, size_t nchunks, long end_ret)
{
    Source *s = npq_alloc0(sizeof(*s));

    s->data = npq_alloc0(len);
    memcpy(s->data, data, len);
    s->len = len;
    s->chunks = npq_alloc0(sizeof(size_t) * nchunks);
    memcpy(s->chunks, chunks, sizeof(size_t) * nchunks);
    s->nchunks = nchunks;
    s->end_ret = end_ret;
    return s;
}

void harness_source_free(Source *s)
{
    free(s->data);
    free(s->chunks);
    free(s);
}

size_t harness_source_calls(Source *s)
{
    return s->calls;
}

size_t harness_source_calls_after_end(Source *s)
{
    return s->calls_after_end;
}

QEMUFile *harness_open_source(Source *s)
{
    return qemu_fopen_ops(s, &source_ops);
}

/* ---- a file with no backend: the compression threads' dummy file -------- */

static const QEMUFileOps empty_ops;

QEMUFile *harness_open_dummy(void)
{
    return qemu_fopen_ops(NULL, &empty_ops);
}

/* ---- read helpers that copy out of the internal buffer ------------------ */

/* qemu_peek_buffer, copying the peeked bytes to out; returns the count. */
size_t harness_peek_buffer(QEMUFile *f, uint8_t *out, size_t size,
                           size_t offset)
{
    uint8_t *src = NULL;
    size_t n = qemu_peek_buffer(f, &src, size, offset);

    if (n) {
        memcpy(out, src, n);
    }
    return n;
}

/* qemu_get_buffer_in_place, copying the result to out; returns the count. */
size_t harness_get_buffer_in_place(QEMUFile *f, uint8_t *out, size_t size)
{
    uint8_t *p = out;
    size_t n = qemu_get_buffer_in_place(f, &p, size);

    if (p != out) {
        memcpy(out, p, n);
    }
    return n;
}

/* ---- compression -------------------------------------------------------- */

/* A deflate stream as QEMU's compression threads set one up, or NULL. */
z_stream *harness_deflate_new(int level)
{
    z_stream *z = npq_alloc0(sizeof(*z));

    if (deflateInit(z, level) != Z_OK) {
        free(z);
        return NULL;
    }
    return z;
}

void harness_deflate_free(z_stream *z)
{
    deflateEnd(z);
    free(z);
}

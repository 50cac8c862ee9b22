/* Stand-in for QEMU's qemu/iov.h (npqfile tests). */
#ifndef NPQ_STANDIN_IOV_H
#define NPQ_STANDIN_IOV_H
#include "qemu/osdep.h"

/* Total length of an iovec array. */
static inline size_t iov_size(const struct iovec *iov, unsigned int iov_cnt)
{
    size_t total = 0;
    unsigned int i;

    for (i = 0; i < iov_cnt; i++) {
        total += iov[i].iov_len;
    }
    return total;
}
#endif

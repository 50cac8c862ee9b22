/* Stand-in for QEMU's qemu-common.h (npqfile tests): the seed needs nothing from it. */
#ifndef NPQ_STANDIN_QEMU_COMMON_H
#define NPQ_STANDIN_QEMU_COMMON_H
#include "qemu/osdep.h"
#endif

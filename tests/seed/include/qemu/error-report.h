/* Stand-in for QEMU's qemu/error-report.h (npqfile tests). */
#ifndef NPQ_STANDIN_ERROR_REPORT_H
#define NPQ_STANDIN_ERROR_REPORT_H
#include <stdarg.h>
#include <stdio.h>

static inline void error_report(const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
}
#endif

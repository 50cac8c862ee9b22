/* Stand-in for the generated trace.h (npqfile tests): tracing is a no-op. */
#ifndef NPQ_STANDIN_TRACE_H
#define NPQ_STANDIN_TRACE_H
static inline void trace_qemu_file_fclose(void)
{
}
#endif

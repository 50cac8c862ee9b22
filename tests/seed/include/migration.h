/* Stand-in for QEMU's migration/migration.h (npqfile tests): nothing the seed needs. */
#ifndef NPQ_STANDIN_MIGRATION_H
#define NPQ_STANDIN_MIGRATION_H
#endif

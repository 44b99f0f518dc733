/*-------------------------------------------------------------------------
 *
 * shmem.h
 *		envelope's shared memory: server-wide counters, locks, and the
 *		region that holds the key cache.
 *
 *-------------------------------------------------------------------------
 */
#ifndef ENVELOPE_SHMEM_H
#define ENVELOPE_SHMEM_H

#include "datatype/timestamp.h"
#include "storage/lwlock.h"

/* Server-wide counters, reported by envelope.cache_stats(). */
typedef enum EnvCounter
{
	CNT_HITS,
	CNT_MISSES,
	CNT_EXPIRATIONS,
	CNT_EVICTIONS,
	CNT_STALE_USES,
	CNT_KMS_KEY_INFO,			/* KMS calls, in KmsOp order */
	CNT_KMS_GENERATE,
	CNT_KMS_WRAP,
	CNT_KMS_UNWRAP,
	CNT_KMS_REWRAP,
	CNT_KMS_ROTATE,
	CNT_KMS_CONFIGURE,
	CNT_KMS_RETRIES,
	CNT_KMS_ERRORS,
	CNT_KMS_CONNECTIONS,
	ENV_NUM_COUNTERS
} EnvCounter;

/* Register the shared memory hooks and the sweeper (from _PG_init). */
extern void env_shmem_register(void);

/* Raise 55000 unless the library was preloaded and shared memory attached. */
extern void env_require_shared(void);

/* Add to a counter; no-op if shared memory is not attached. */
extern void env_count(EnvCounter c, int64 n);
extern uint64 env_counter(EnvCounter c);

/* Count key cache hits of this backend (cheap: a per-backend counter). */
extern void env_count_hits(int64 n);

/* Remember the time of the last failed KMS call. */
extern void env_note_kms_error(void);
extern TimestampTz env_last_kms_error(void);

/* Lock i of envelope's tranche (0: encrypt side; 1..n: cache partitions). */
extern LWLock *env_lock(int i);

/* The key cache's region (page-aligned, locked where possible, not dumped). */
extern void *env_key_region(void);
extern bool env_key_region_locked(void);

#endif							/* ENVELOPE_SHMEM_H */

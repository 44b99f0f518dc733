/*-------------------------------------------------------------------------
 *
 * shmem.c
 *		envelope's shared memory, set up the PostgreSQL 15 way.
 *
 * envelope must be in shared_preload_libraries.  _PG_init registers:
 *	- shmem_request_hook: requests the space (counters plus the key region,
 *	  sized by keycache_shmem_size() from envelope.cache_size) and a named
 *	  LWLock tranche "envelope" with 1 + keycache_partitions() locks;
 *	- shmem_startup_hook: creates or attaches the struct under
 *	  AddinShmemInitLock; in the postmaster, the key region is page-aligned,
 *	  marked MADV_DONTDUMP (inherited by every forked backend, so core dumps
 *	  never contain cached keys) and mlock'ed (the postmaster holds the lock,
 *	  so the pages stay in RAM), and it is wiped at postmaster exit;
 *	- the key cache sweeper background worker (sweeper.c).
 * Previous hook values are saved and always chained.
 *
 * Locking rules:
 *	- counters are atomics and need no lock;
 *	- lock 0 ("encrypt") protects the current data key of each KEK: shared
 *	  to read and count a use (the count itself is atomic), exclusive to
 *	  replace a slot;
 *	- locks 1..n protect one cache partition each: shared to look up (the
 *	  LRU clock of an entry is atomic), exclusive to insert, evict or wipe.
 *	No code path holds two envelope locks at once, and no lock is held
 *	across a KMS call, an ereport or CHECK_FOR_INTERRUPTS.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <sys/mman.h>
#include <unistd.h>

#include "envelope.h"
#include "miscadmin.h"
#include "port/atomics.h"
#include "storage/ipc.h"
#include "storage/proc.h"
#include "storage/shmem.h"
#include "utils/timestamp.h"

#include "audit.h"
#include "crypto.h"
#include "keycache.h"
#include "redact.h"
#include "shmem.h"
#include "sweeper.h"

#define ENV_TRANCHE		"envelope"

typedef struct EnvShared
{
	pg_atomic_uint64 counters[ENV_NUM_COUNTERS];
	pg_atomic_uint64 last_kms_error;
	bool		key_region_locked;
	Size		key_region_offset;	/* from the start of this struct */
	Size		key_region_size;
} EnvShared;

/*
 * Key cache hits, one counter per backend (indexed by pgprocno), each on its
 * own cache line: a hit is counted with a plain store by its only writer
 * instead of an atomic add on a line every backend writes.  Counters are
 * never reset (a new backend in a slot adds to its predecessor's count), so
 * their sum only grows.
 */
typedef union BackendHits
{
	pg_atomic_uint64 hits;
	char		pad[PG_CACHE_LINE_SIZE];
} BackendHits;

static EnvShared *env_shared = NULL;
static LWLockPadded *env_locks = NULL;
static BackendHits *backend_hits = NULL;
static int	backend_hits_n = 0;

static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

/* Bytes requested: the struct, then the key region with page alignment slack. */
static Size
env_shmem_size(void)
{
	Size		page = (Size) sysconf(_SC_PAGESIZE);

	return add_size(add_size(MAXALIGN(sizeof(EnvShared)), keycache_shmem_size()),
					mul_size(page, 2));
}

/* shmem_request_hook: request space and the lock tranche. */
static void
env_shmem_request(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	RequestAddinShmemSpace(env_shmem_size());
	RequestAddinShmemSpace(mul_size(MaxBackends, sizeof(BackendHits)));
	RequestNamedLWLockTranche(ENV_TRANCHE, 1 + keycache_partitions());
	RequestAddinShmemSpace(env_audit_shmem_size());
	env_audit_shmem_request();
	RequestAddinShmemSpace(env_redact_shmem_size());
	env_redact_shmem_request();
}

/* on_shmem_exit callback in the postmaster: wipe cached keys. */
static void
env_shmem_exit(int code, Datum arg)
{
	if (env_shared)
		env_wipe(env_key_region(), env_shared->key_region_size);
}

/* shmem_startup_hook: create or attach the shared struct. */
static void
env_shmem_startup(void)
{
	bool		found;

	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	env_shared = ShmemInitStruct("envelope", env_shmem_size(), &found);
	env_locks = GetNamedLWLockTranche(ENV_TRANCHE);
	if (!found)
	{
		Size		page = (Size) sysconf(_SC_PAGESIZE);
		char	   *base = (char *) env_shared;
		char	   *region = (char *) TYPEALIGN(page, base + MAXALIGN(sizeof(EnvShared)));
		Size		rsize = TYPEALIGN(page, keycache_shmem_size());

		for (int i = 0; i < ENV_NUM_COUNTERS; i++)
			pg_atomic_init_u64(&env_shared->counters[i], 0);
		pg_atomic_init_u64(&env_shared->last_kms_error, 0);
		env_shared->key_region_offset = region - base;
		env_shared->key_region_size = rsize;
#ifdef MADV_DONTDUMP
		(void) madvise(region, rsize, MADV_DONTDUMP);
#endif
		env_shared->key_region_locked = (mlock(region, rsize) == 0);
		memset(region, 0, rsize);
		keycache_shmem_init(region);
	}
	backend_hits = ShmemInitStruct("envelope backend hits",
								   mul_size(MaxBackends, sizeof(BackendHits)), &found);
	backend_hits_n = MaxBackends;
	if (!found)
		for (int i = 0; i < MaxBackends; i++)
			pg_atomic_init_u64(&backend_hits[i].hits, 0);
	env_audit_shmem_init();
	env_redact_shmem_init();
	LWLockRelease(AddinShmemInitLock);

	if (!IsUnderPostmaster)
		on_shmem_exit(env_shmem_exit, (Datum) 0);
}

/* Register the shared memory hooks and the sweeper (from _PG_init). */
void
env_shmem_register(void)
{
	if (!process_shared_preload_libraries_in_progress)
		return;
	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = env_shmem_request;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = env_shmem_startup;
	sweeper_register();
}

/* Raise 55000 unless the library was preloaded and shared memory attached. */
void
env_require_shared(void)
{
	if (env_shared == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("envelope must be loaded via \"shared_preload_libraries\""),
				 errdetail("envelope keeps unwrapped data keys in shared memory."),
				 errhint("Add envelope to shared_preload_libraries in postgresql.conf and restart the server.")));
}

/* Add to a counter; no-op if shared memory is not attached. */
void
env_count(EnvCounter c, int64 n)
{
	if (env_shared && n != 0)
		pg_atomic_fetch_add_u64(&env_shared->counters[c], n);
}

/* Count key cache hits of this backend (its own counter: no shared atomic). */
void
env_count_hits(int64 n)
{
	int			i = MyProc ? MyProc->pgprocno : -1;

	if (backend_hits == NULL || i < 0 || i >= backend_hits_n)
	{
		env_count(CNT_HITS, n);
		return;
	}
	pg_atomic_write_u64(&backend_hits[i].hits,
						pg_atomic_read_u64(&backend_hits[i].hits) + n);
}

/* Read a counter. */
uint64
env_counter(EnvCounter c)
{
	uint64		n;

	if (env_shared == NULL)
		return 0;
	n = pg_atomic_read_u64(&env_shared->counters[c]);
	if (c == CNT_HITS && backend_hits != NULL)
		for (int i = 0; i < backend_hits_n; i++)
			n += pg_atomic_read_u64(&backend_hits[i].hits);
	return n;
}

/* Remember the time of the last failed KMS call. */
void
env_note_kms_error(void)
{
	if (env_shared)
		pg_atomic_write_u64(&env_shared->last_kms_error, (uint64) GetCurrentTimestamp());
}

/* Time of the last failed KMS call, 0 if none. */
TimestampTz
env_last_kms_error(void)
{
	return env_shared ? (TimestampTz) pg_atomic_read_u64(&env_shared->last_kms_error) : 0;
}

/* Lock i of envelope's tranche. */
LWLock *
env_lock(int i)
{
	return &env_locks[i].lock;
}

/* The key cache's region. */
void *
env_key_region(void)
{
	return (char *) env_shared + env_shared->key_region_offset;
}

/* Whether mlock succeeded on the key region. */
bool
env_key_region_locked(void)
{
	return env_shared && env_shared->key_region_locked;
}

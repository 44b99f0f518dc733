/*-------------------------------------------------------------------------
 *
 * keycache.c
 *		The shared key cache.
 *
 * Two tables live in the key region of shared memory (shmem.c), which is
 * excluded from core dumps and locked in RAM where the platform allows:
 *
 *	- the decrypt cache: SHA-256(provider, key_ref, KEK version, wrapped DEK)
 *	  -> DEK.  It is split into partitions of up to 64 entries, each with its
 *	  own LWLock; the first bytes of the digest choose the partition.  A hit
 *	  takes only its partition's lock in shared mode and bumps the entry's
 *	  LRU stamp atomically.  Inserting takes the partition's lock exclusively
 *	  and, when the partition is full, evicts its least recently used entry.
 *	  envelope.cache_size bounds the total.  Entries expire after
 *	  envelope.cache_ttl seconds; an expired entry is kept for
 *	  envelope.kms_outage_grace more seconds (default 0), usable only while
 *	  the KMS is unreachable, and then wiped by the sweeper.
 *	- the current data key of each KEK for encryption (MAX_CURRENT_DEKS
 *	  slots), under lock 0.  Each use is counted with an atomic increment
 *	  under the shared lock, so envelope.dek_max_uses and dek_max_age hold
 *	  across all backends.  When the key runs out, one backend fetches the
 *	  next one through the KMS with no lock held (marking the slot
 *	  "generating") while the others wait on a condition variable, then
 *	  installs it under the exclusive lock.
 *
 * Keys are copied out under the lock and the lock released before anything
 * that can raise an error.  Entries are wiped (OPENSSL_cleanse) on expiry,
 * eviction, flush and postmaster exit.
 *
 * The rewrap memo (old wrapped DEK -> new wrapped DEK) holds no secrets and
 * stays in backend memory.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "miscadmin.h"
#include "port/atomics.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"
#include "utils/elog.h"
#include "access/xact.h"
#include "pgstat.h"
#include "storage/condition_variable.h"
#include "storage/ipc.h"
#include "storage/procarray.h"

#include "crypto.h"
#include "envelope.h"
#include "format.h"
#include "keycache.h"
#include "shmem.h"

#define DIGEST_LEN			32
#define MAX_CURRENT_DEKS	64
#define MAX_PARTITIONS		256
#define PARTITION_TARGET	64		/* entries per partition, ideally */
#define MAX_REWRAP_MEMO		256

/* A cached unwrapped data key. */
typedef struct DekEntry
{
	bool		used;
	uint8		digest[DIGEST_LEN];
	char		kek_name[NAMEDATALEN];
	TimestampTz expires_at;
	pg_atomic_uint64 last_used;
	int			pending_pid;	/* non-zero: this backend is unwrapping it */
	TimestampTz pending_since;
	uint8		dek[ENV_KEY_LEN];
} DekEntry;

/* A generated and verified data key not used yet (the rest of a batch). */
typedef struct SpareDek
{
	int32		version;
	TimestampTz created_at;
	int			wrapped_len;
	uint8		wrapped[ENV_MAX_WRAPPED_LEN];
	uint8		dek[ENV_KEY_LEN];
} SpareDek;

/* The data key a KEK currently encrypts new values under. */
typedef struct CurrentDek
{
	bool		used;
	char		kek_name[NAMEDATALEN];
	uint8		identity[DIGEST_LEN];	/* provider and key_ref */
	int32		version;
	pg_atomic_uint64 uses;
	TimestampTz created_at;
	TimestampTz generating_since;	/* a backend is asking the KMS for the next key */
	int			generating_pid;
	int			wrapped_len;
	uint8		wrapped[ENV_MAX_WRAPPED_LEN];
	uint8		dek[ENV_KEY_LEN];
	int			nspare;			/* verified keys waiting to become current */
	SpareDek	spare[KMS_BATCH_MAX - 1];
} CurrentDek;

/* The key region's layout. */
typedef struct KeyCacheShared
{
	int			nparts;
	int			part_slots;
	pg_atomic_uint64 clock;		/* LRU stamps */
	pg_atomic_uint64 generation;	/* bumped by flush and retire (keylocal.c) */
	pg_atomic_uint64 coarse_clock;	/* the sweeper's clock, about once a second */
	ConditionVariable dek_ready;	/* broadcast when a new current key is in */
	ConditionVariable unwrapped;	/* broadcast when a pending entry resolves */
	CurrentDek	currents[MAX_CURRENT_DEKS];
	DekEntry	entries[FLEXIBLE_ARRAY_MEMBER];
} KeyCacheShared;

/* Outcome of a cache lookup. */
typedef enum LookupResult
{
	LOOKUP_MISS,
	LOOKUP_HIT,
	LOOKUP_STALE,				/* expired, but within the outage grace */
	LOOKUP_PENDING				/* another backend is unwrapping it now */
} LookupResult;

/* A remembered rewrap result (backend-local). */
typedef struct RewrapMemo
{
	bool		used;
	uint8		from_digest[DIGEST_LEN];
	char		target_name[NAMEDATALEN];
	uint8		target_identity[DIGEST_LEN];	/* provider and key_ref */
	int32		target_latest;
	int32		version;
	uint8	   *wrapped;		/* TopMemoryContext */
	int			wrapped_len;
} RewrapMemo;

static RewrapMemo memo[MAX_REWRAP_MEMO];
static int	memo_next = 0;
static TimestampTz stale_logged_for = 0;	/* statement start we logged for */
static TimestampTz outage_seen_for = 0;	/* statement start that saw the KMS down */

static void keycache_release_claims(int code, Datum arg);

/* Partitions for envelope.cache_size: a power of two, ~64 entries each. */
int
keycache_partitions(void)
{
	int			n = 1;

	while (n * 2 <= MAX_PARTITIONS && (n * 2) * PARTITION_TARGET <= envelope_cache_size)
		n *= 2;
	return n;
}

/* Bytes of the key region. */
Size
keycache_shmem_size(void)
{
	int			nparts = keycache_partitions();
	int			slots = envelope_cache_size / nparts;

	return add_size(offsetof(KeyCacheShared, entries),
					mul_size(mul_size(nparts, slots), sizeof(DekEntry)));
}

/* Initialise the key region (postmaster, once). */
void
keycache_shmem_init(void *region)
{
	KeyCacheShared *kc = (KeyCacheShared *) region;
	int			n;

	kc->nparts = keycache_partitions();
	kc->part_slots = envelope_cache_size / kc->nparts;
	n = kc->nparts * kc->part_slots;
	pg_atomic_init_u64(&kc->clock, 1);
	pg_atomic_init_u64(&kc->generation, 1);
	pg_atomic_init_u64(&kc->coarse_clock, 0);
	ConditionVariableInit(&kc->dek_ready);
	ConditionVariableInit(&kc->unwrapped);
	for (int i = 0; i < MAX_CURRENT_DEKS; i++)
		pg_atomic_init_u64(&kc->currents[i].uses, 0);
	for (int i = 0; i < n; i++)
		pg_atomic_init_u64(&kc->entries[i].last_used, 0);
}

/* The key region, or an error if envelope is not preloaded. */
static KeyCacheShared *
cache(void)
{
	static bool exit_hook = false;

	env_require_shared();
	if (!exit_hook)
	{
		before_shmem_exit(keycache_release_claims, (Datum) 0);
		exit_hook = true;
	}
	return (KeyCacheShared *) env_key_region();
}

/* SHA-256 over the identity of a wrapped key: provider, key_ref, version, bytes. */
static void
wrapped_digest(const KekInfo *kek, const KmsWrapped *w, uint8 *digest)
{
	uint8		vbuf[4] = {0, 0, 0, 0};
	const uint8 *parts[4];
	size_t		lens[4];

	if (w)
	{
		vbuf[0] = (uint8) (w->version >> 24);
		vbuf[1] = (uint8) (w->version >> 16);
		vbuf[2] = (uint8) (w->version >> 8);
		vbuf[3] = (uint8) w->version;
	}
	/* NUL terminators separate the names, so the encoding is unambiguous. */
	parts[0] = (const uint8 *) kek->provider_name;
	lens[0] = strlen(kek->provider_name) + 1;
	parts[1] = (const uint8 *) kek->key_ref;
	lens[1] = strlen(kek->key_ref) + 1;
	parts[2] = vbuf;
	lens[2] = 4;
	parts[3] = w ? w->data : vbuf;
	lens[3] = w ? (size_t) w->len : 0;
	env_sha256(parts, lens, 4, digest);
}

/* The partition a digest belongs to. */
static int
partition_of(KeyCacheShared *kc, const uint8 *digest)
{
	uint32		h = ((uint32) digest[0] << 24) | ((uint32) digest[1] << 16) |
		((uint32) digest[2] << 8) | digest[3];

	return (int) (h % (uint32) kc->nparts);
}

/* Grace period in microseconds. */
static TimestampTz
grace_usecs(void)
{
	return (TimestampTz) envelope_kms_outage_grace * USECS_PER_SEC;
}

/* How long others wait for a backend that is unwrapping a key. */
static TimestampTz
pending_limit_usecs(void)
{
	/* Each attempt, two calls (generate and verify), plus at most 2 s of backoff per retry. */
	return (TimestampTz) (2 * envelope_kms_timeout * (envelope_kms_retries + 1) +
						  2000 * envelope_kms_retries + 1000) * 1000;
}

/* True if a pending entry's owner is gone or took too long. */
static bool
pending_abandoned(const DekEntry *e, TimestampTz now)
{
	return now - e->pending_since >= pending_limit_usecs() ||
		BackendPidGetProc(e->pending_pid) == NULL;
}

/* True if an entry may be wiped: expired past the grace, or an abandoned claim. */
static bool
entry_dead(const DekEntry *e, TimestampTz now)
{
	if (!e->used)
		return false;
	if (e->pending_pid != 0)
		return now - e->pending_since >= pending_limit_usecs();
	return e->expires_at <= now && now - e->expires_at >= grace_usecs();
}

/* Wipe one decrypt entry (caller holds its partition lock exclusively). */
static void
entry_clear(DekEntry *e)
{
	e->used = false;
	env_wipe(e->digest, sizeof(e->digest));
	env_wipe(e->kek_name, sizeof(e->kek_name));
	env_wipe(e->dek, sizeof(e->dek));
	e->expires_at = 0;
	e->pending_pid = 0;
	e->pending_since = 0;
	pg_atomic_write_u64(&e->last_used, 0);
}

/*
 * Look up a digest under the partition's shared lock; *expires_at receives
 * the entry's expiry on a hit (also when stale).
 */
static LookupResult
cache_lookup(KeyCacheShared *kc, const uint8 *digest, uint8 *dek, TimestampTz *expires_at)
{
	int			part = partition_of(kc, digest);
	DekEntry   *e = &kc->entries[part * kc->part_slots];
	TimestampTz now = GetCurrentTimestamp();
	LookupResult result = LOOKUP_MISS;

	LWLockAcquire(env_lock(1 + part), LW_SHARED);
	for (int i = 0; i < kc->part_slots; i++, e++)
	{
		if (!e->used || memcmp(e->digest, digest, DIGEST_LEN) != 0)
			continue;
		if (e->pending_pid != 0)
		{
			if (e->pending_pid != MyProcPid && !pending_abandoned(e, now))
				result = LOOKUP_PENDING;
		}
		else if (e->expires_at > now)
		{
			memcpy(dek, e->dek, ENV_KEY_LEN);
			*expires_at = e->expires_at;
			pg_atomic_write_u64(&e->last_used, pg_atomic_fetch_add_u64(&kc->clock, 1));
			result = LOOKUP_HIT;
		}
		else if (now - e->expires_at < grace_usecs())
		{
			memcpy(dek, e->dek, ENV_KEY_LEN);
			*expires_at = e->expires_at;
			result = LOOKUP_STALE;
		}
		break;
	}
	LWLockRelease(env_lock(1 + part));
	return result;
}

/* Put an unwrapped, verified data key into the cache. */
void
keycache_put(const KekInfo *kek, const KmsWrapped *wrapped, const uint8 *dek)
{
	KeyCacheShared *kc = cache();
	uint8		digest[DIGEST_LEN];
	TimestampTz now;
	int			part;
	DekEntry   *first;
	DekEntry   *slot = NULL;
	DekEntry   *victim = NULL;
	int64		expired = 0;
	int64		evicted = 0;

	if (envelope_cache_ttl <= 0)
		return;
	wrapped_digest(kek, wrapped, digest);
	part = partition_of(kc, digest);
	first = &kc->entries[part * kc->part_slots];
	now = GetCurrentTimestamp();

	LWLockAcquire(env_lock(1 + part), LW_EXCLUSIVE);
	for (int i = 0; i < kc->part_slots; i++)
	{
		DekEntry   *e = &first[i];

		if (e->used && memcmp(e->digest, digest, DIGEST_LEN) == 0)
		{
			slot = e;
			break;
		}
		if (entry_dead(e, now))
		{
			if (e->pending_pid == 0)
				expired++;
			entry_clear(e);
		}
		if (!e->used)
		{
			if (slot == NULL)
				slot = e;
		}
		else if (e->pending_pid == 0 &&
				 (victim == NULL ||
				  pg_atomic_read_u64(&e->last_used) < pg_atomic_read_u64(&victim->last_used)))
			victim = e;
	}
	if (slot == NULL && victim == NULL)
	{
		/* Every entry is an unwrap in flight: do not cache this one. */
		LWLockRelease(env_lock(1 + part));
		return;
	}
	if (slot == NULL)
	{
		slot = victim;
		entry_clear(slot);
		evicted++;
	}
	slot->used = true;
	memcpy(slot->digest, digest, DIGEST_LEN);
	strlcpy(slot->kek_name, kek->name, NAMEDATALEN);
	slot->pending_pid = 0;
	slot->pending_since = 0;
	slot->expires_at = now + (TimestampTz) envelope_cache_ttl * USECS_PER_SEC;
	pg_atomic_write_u64(&slot->last_used, pg_atomic_fetch_add_u64(&kc->clock, 1));
	memcpy(slot->dek, dek, ENV_KEY_LEN);
	LWLockRelease(env_lock(1 + part));
	ConditionVariableBroadcast(&kc->unwrapped);

	env_count(CNT_EXPIRATIONS, expired);
	env_count(CNT_EVICTIONS, evicted);
}

/*
 * Claim a missing key: put a pending entry in its partition so that other
 * backends wait for our KMS call instead of making their own.  Returns
 * false if, under the exclusive lock, the key turned out to be there or
 * pending after all.
 */
static bool
claim_pending(KeyCacheShared *kc, const KekInfo *kek, const uint8 *digest)
{
	int			part = partition_of(kc, digest);
	DekEntry   *first = &kc->entries[part * kc->part_slots];
	TimestampTz now = GetCurrentTimestamp();
	DekEntry   *slot = NULL;
	DekEntry   *victim = NULL;
	bool		claimed = true;
	int64		evicted = 0;

	LWLockAcquire(env_lock(1 + part), LW_EXCLUSIVE);
	for (int i = 0; i < kc->part_slots; i++)
	{
		DekEntry   *e = &first[i];

		if (e->used && memcmp(e->digest, digest, DIGEST_LEN) == 0)
		{
			if ((e->pending_pid != 0 && e->pending_pid != MyProcPid && !pending_abandoned(e, now)) ||
				(e->pending_pid == 0 && e->expires_at > now))
				claimed = false;	/* someone else got there first */
			slot = e;
			break;
		}
		if (!e->used)
		{
			if (slot == NULL)
				slot = e;
		}
		else if (e->pending_pid == 0 &&
				 (victim == NULL ||
				  pg_atomic_read_u64(&e->last_used) < pg_atomic_read_u64(&victim->last_used)))
			victim = e;
	}
	if (claimed && slot == NULL && victim != NULL)
	{
		entry_clear(victim);
		evicted++;
		slot = victim;
	}
	if (claimed && slot != NULL)
	{
		/* An expired entry kept for the grace period is replaced too. */
		entry_clear(slot);
		slot->used = true;
		memcpy(slot->digest, digest, DIGEST_LEN);
		strlcpy(slot->kek_name, kek->name, NAMEDATALEN);
		slot->pending_pid = MyProcPid;
		slot->pending_since = now;
	}
	LWLockRelease(env_lock(1 + part));
	env_count(CNT_EVICTIONS, evicted);
	return claimed;
}

/* Give up a pending claim (the KMS call failed, or the key was refused). */
void
keycache_abandon(const KekInfo *kek, const KmsWrapped *wrapped)
{
	KeyCacheShared *kc = cache();
	uint8		digest[DIGEST_LEN];
	int			part;
	DekEntry   *e;

	wrapped_digest(kek, wrapped, digest);
	part = partition_of(kc, digest);
	e = &kc->entries[part * kc->part_slots];
	LWLockAcquire(env_lock(1 + part), LW_EXCLUSIVE);
	for (int i = 0; i < kc->part_slots; i++, e++)
	{
		if (e->used && e->pending_pid == MyProcPid &&
			memcmp(e->digest, digest, DIGEST_LEN) == 0)
		{
			entry_clear(e);
			break;
		}
	}
	LWLockRelease(env_lock(1 + part));
	ConditionVariableBroadcast(&kc->unwrapped);
}

/* True for the errors that mean "the KMS cannot be reached right now". */
static bool
is_outage(int sqlerrcode)
{
	return sqlerrcode == ERRCODE_SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION ||
		sqlerrcode == ERRCODE_CONNECTION_FAILURE;
}

/*
 * Unwrap through the KMS, but during an outage fall back on the stale key.
 * Catching the error without a subtransaction is safe here: the KMS path
 * holds no locks, buffers or other resources when it raises (http.c
 * detaches its transfer in PG_FINALLY), and anything but an outage
 * (including query cancel) is re-thrown unchanged.
 */
static bool
unwrap_or_stale(const KekInfo *kek, const KmsWrapped *wrapped, uint8 *dek,
				const uint8 *stale, TimestampTz expired_at)
{
	MemoryContext ctx = CurrentMemoryContext;
	volatile bool used_stale = false;

	/* Once this statement has found the KMS down, do not wait for it per row. */
	if (outage_seen_for == GetCurrentStatementStartTimestamp())
	{
		memcpy(dek, stale, ENV_KEY_LEN);
		env_count(CNT_STALE_USES, 1);
		return false;
	}

	PG_TRY();
	{
		kms_unwrap(kek->provider, kek->key_ref, wrapped, dek);
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(ctx);
		edata = CopyErrorData();
		if (!is_outage(edata->sqlerrcode))
		{
			env_wipe((void *) stale, ENV_KEY_LEN);
			PG_RE_THROW();
		}
		FlushErrorState();
		memcpy(dek, stale, ENV_KEY_LEN);
		used_stale = true;
		outage_seen_for = GetCurrentStatementStartTimestamp();
		env_count(CNT_STALE_USES, 1);
		if (stale_logged_for != GetCurrentStatementStartTimestamp())
		{
			stale_logged_for = GetCurrentStatementStartTimestamp();
			ereport(LOG,
					(errmsg("using a data key of KEK \"%s\" that expired %ld s ago because the KMS is unavailable",
							kek->name, (long) ((GetCurrentTimestamp() - expired_at) / USECS_PER_SEC)),
					 errdetail("envelope.kms_outage_grace allows expired keys for %d s during a KMS outage. The KMS error was: %s.",
							   envelope_kms_outage_grace, edata->message)));
		}
		FreeErrorData(edata);
	}
	PG_END_TRY();
	return !used_stale;
}

/* Unwrap a key this backend claimed; the claim is given up if the KMS fails. */
static void
unwrap_claimed(const KekInfo *kek, const KmsWrapped *wrapped, uint8 *dek)
{
	PG_TRY();
	{
		kms_unwrap(kek->provider, kek->key_ref, wrapped, dek);
	}
	PG_CATCH();
	{
		if (envelope_cache_ttl > 0)
			keycache_abandon(kek, wrapped);
		PG_RE_THROW();
	}
	PG_END_TRY();
}

/*
 * The plaintext of a wrapped data key; true if it came from the KMS (not
 * cached).  On a miss, one backend claims the key and calls the KMS while
 * others that need the same key wait for it (a parallel scan makes one
 * unwrap per data key, not one per worker).  The claimer must resolve the
 * claim: keycache_put() once the key is verified, keycache_abandon() if not.
 */
bool
keycache_unwrap(const KekInfo *kek, const KmsWrapped *wrapped, uint8 *dek)
{
	TimestampTz hit_expires;

	return keycache_unwrap_ex(kek, wrapped, dek, &hit_expires);
}

/* keycache_unwrap(), also giving a fresh hit's expiry (else 0) in *hit_expires. */
bool
keycache_unwrap_ex(const KekInfo *kek, const KmsWrapped *wrapped, uint8 *dek,
				   TimestampTz *hit_expires)
{
	KeyCacheShared *kc = cache();
	uint8		digest[DIGEST_LEN];
	uint8		stale[ENV_KEY_LEN];
	TimestampTz expired_at = 0;
	LookupResult r;
	bool		from_kms;
	bool		counted = false;

	*hit_expires = 0;
	wrapped_digest(kek, wrapped, digest);
	for (;;)
	{
		CHECK_FOR_INTERRUPTS();
		r = cache_lookup(kc, digest, stale, &expired_at);
		if (r == LOOKUP_HIT)
		{
			ConditionVariableCancelSleep();
			memcpy(dek, stale, ENV_KEY_LEN);
			env_wipe(stale, sizeof(stale));
			env_count_hits(1);
			*hit_expires = expired_at;
			return false;
		}
		if (!counted)
		{
			env_count(CNT_MISSES, 1);
			counted = true;
		}
		if (r == LOOKUP_PENDING)
		{
			(void) ConditionVariableTimedSleep(&kc->unwrapped, 100, PG_WAIT_EXTENSION);
			continue;
		}
		if (r == LOOKUP_STALE || envelope_cache_ttl <= 0 || claim_pending(kc, kek, digest))
			break;
	}
	ConditionVariableCancelSleep();

	if (r == LOOKUP_MISS)
	{
		unwrap_claimed(kek, wrapped, dek);
		return true;
	}
	from_kms = unwrap_or_stale(kek, wrapped, dek, stale, expired_at);
	env_wipe(stale, sizeof(stale));
	return from_kms;
}

/*
 * Generate n data keys (one KMS round trip where the provider batches) and,
 * if envelope.kms_verify, check that each unwraps to itself (one more).
 * On any error every key is wiped and nothing is used.
 */
static void
generate_checked(const KekInfo *kek, int n, uint8 *deks, KmsWrapped *wrapped)
{
	uint8		check[KMS_BATCH_MAX * ENV_KEY_LEN];
	bool		same;

	PG_TRY();
	{
		kms_generate_deks(kek->provider, kek->key_ref, n, deks, wrapped);
		for (int i = 0; i < n; i++)
		{
			if (wrapped[i].version < kek->latest_version)
				ereport(ERROR,
						(errcode(ERRCODE_PROTOCOL_VIOLATION),
						 errmsg("KMS wrapped a new data key with an old version of key \"%s\"", kek->key_ref),
						 errdetail("The KMS used version %d; KEK \"%s\" is at version %d.",
								   wrapped[i].version, kek->name, kek->latest_version)));
			if (wrapped[i].len > ENV_MAX_WRAPPED_LEN)
				ereport(ERROR,
						(errcode(ERRCODE_PROTOCOL_VIOLATION),
						 errmsg("KMS returned a wrapped data key of %d bytes for key \"%s\"",
								wrapped[i].len, kek->key_ref),
						 errdetail("envelope stores wrapped keys of at most %d bytes.", ENV_MAX_WRAPPED_LEN)));
		}
		if (envelope_kms_verify)
			kms_unwrap_many(kek->provider, kek->key_ref, n, wrapped, check);
	}
	PG_CATCH();
	{
		env_wipe(deks, n * ENV_KEY_LEN);
		env_wipe(check, sizeof(check));
		PG_RE_THROW();
	}
	PG_END_TRY();
	if (!envelope_kms_verify)
		return;
	same = env_equal_ct(deks, check, n * ENV_KEY_LEN);
	env_wipe(check, sizeof(check));
	if (!same)
	{
		env_wipe(deks, n * ENV_KEY_LEN);
		ereport(ERROR,
				(errcode(ERRCODE_PROTOCOL_VIOLATION),
				 errmsg("KMS returned a data key that does not match its wrapped form"),
				 errdetail("Unwrapping the new data key with key \"%s\" gave different bytes; nothing was encrypted with it.",
						   kek->key_ref)));
	}
}

/* The slot of a KEK's current data key, or NULL (caller holds lock 0). */
static CurrentDek *
current_slot(KeyCacheShared *kc, const char *kek_name)
{
	for (int i = 0; i < MAX_CURRENT_DEKS; i++)
		if (kc->currents[i].used && strcmp(kc->currents[i].kek_name, kek_name) == 0)
			return &kc->currents[i];
	return NULL;
}

/*
 * Try to take one use of the KEK's current data key (caller holds lock 0 in
 * any mode); true if it is fresh enough and had a use left.
 */
static bool
take_use(CurrentDek *c, const KekInfo *kek, const uint8 *identity, TimestampTz now,
		 int want, uint8 *dek, KmsWrapped *wrapped, int *granted, TimestampTz *created_at)
{
	uint64		before;

	if (c == NULL || memcmp(c->identity, identity, DIGEST_LEN) != 0 ||
		c->version < kek->latest_version ||
		now - c->created_at >= (TimestampTz) envelope_dek_max_age * USECS_PER_SEC)
		return false;
	before = pg_atomic_fetch_add_u64(&c->uses, want);
	if (before >= (uint64) envelope_dek_max_uses)
		return false;
	*granted = (int) Min((uint64) want, (uint64) envelope_dek_max_uses - before);
	*created_at = c->created_at;
	memcpy(dek, c->dek, ENV_KEY_LEN);
	wrapped->version = c->version;
	wrapped->len = c->wrapped_len;
	memcpy(wrapped->data, c->wrapped, c->wrapped_len);
	return true;
}

/* True if another backend is fetching the KEK's next key (caller holds lock 0). */
static bool
someone_generating(CurrentDek *c)
{
	return c != NULL && c->generating_since != 0 &&
		c->generating_pid != MyProcPid &&
		BackendPidGetProc(c->generating_pid) != NULL &&
		GetCurrentTimestamp() - c->generating_since < pending_limit_usecs();
}

/* Wipe a slot's spare keys (caller holds lock 0 exclusively). */
static void
clear_spares(CurrentDek *c)
{
	for (int i = 0; i < c->nspare; i++)
		env_wipe(c->spare[i].dek, sizeof(c->spare[i].dek));
	c->nspare = 0;
}

/*
 * Make the oldest usable spare the KEK's current key (caller holds lock 0
 * exclusively); spares under an older KEK version, too old, or of another
 * KMS key are wiped.  False if there was none.
 */
static bool
promote_spare(CurrentDek *c, const KekInfo *kek, const uint8 *identity, TimestampTz now)
{
	while (c->nspare > 0)
	{
		SpareDek	sp = c->spare[0];

		memmove(&c->spare[0], &c->spare[1], sizeof(SpareDek) * (c->nspare - 1));
		c->nspare--;
		/* the old last slot still holds a copy */
		env_wipe(c->spare[c->nspare].dek, sizeof(c->spare[c->nspare].dek));
		if (memcmp(c->identity, identity, DIGEST_LEN) != 0 ||
			sp.version < kek->latest_version ||
			now - sp.created_at >= (TimestampTz) envelope_dek_max_age * USECS_PER_SEC)
		{
			env_wipe(sp.dek, sizeof(sp.dek));
			continue;
		}
		env_wipe(c->dek, sizeof(c->dek));
		c->version = sp.version;
		c->created_at = sp.created_at;
		c->wrapped_len = sp.wrapped_len;
		memcpy(c->wrapped, sp.wrapped, sp.wrapped_len);
		memcpy(c->dek, sp.dek, ENV_KEY_LEN);
		pg_atomic_write_u64(&c->uses, 0);
		env_wipe(sp.dek, sizeof(sp.dek));
		return true;
	}
	return false;
}

/* A slot for a KEK: its own, a free one, or the oldest (caller holds lock 0 exclusively). */
static CurrentDek *
claim_slot(KeyCacheShared *kc, const KekInfo *kek)
{
	CurrentDek *c = current_slot(kc, kek->name);
	CurrentDek *oldest = NULL;

	for (int i = 0; i < MAX_CURRENT_DEKS && c == NULL; i++)
	{
		if (!kc->currents[i].used)
			c = &kc->currents[i];
		else if (oldest == NULL || kc->currents[i].created_at < oldest->created_at)
			oldest = &kc->currents[i];
	}
	if (c == NULL)
		c = oldest;
	if (!c->used || strcmp(c->kek_name, kek->name) != 0)
	{
		/* A placeholder that take_use() refuses until the key is installed. */
		env_wipe(c->dek, sizeof(c->dek));
		clear_spares(c);
		c->used = true;
		strlcpy(c->kek_name, kek->name, NAMEDATALEN);
		memset(c->identity, 0, sizeof(c->identity));
		c->version = 0;
		c->created_at = 0;
		c->wrapped_len = 0;
		pg_atomic_write_u64(&c->uses, PG_UINT64_MAX / 2);
	}
	return c;
}

/* Clear a KEK's "generating" mark and wake the waiters. */
static void
end_generating(KeyCacheShared *kc, const char *kek_name)
{
	CurrentDek *c;

	LWLockAcquire(env_lock(0), LW_EXCLUSIVE);
	c = current_slot(kc, kek_name);
	if (c && c->generating_pid == MyProcPid)
	{
		c->generating_since = 0;
		c->generating_pid = 0;
	}
	LWLockRelease(env_lock(0));
	ConditionVariableBroadcast(&kc->dek_ready);
}

/*
 * The data key to encrypt the next values under kek: up to want uses are
 * reserved (*granted says how many, at least 1), counted across backends.
 *
 * When the current key is exhausted, one backend asks the KMS for the next
 * one (with no lock held) while the others wait on a condition variable for
 * it, so a key rollover costs one KMS call however many sessions write.
 */
void
keycache_current_dek(const KekInfo *kek, int want, uint8 *dek, KmsWrapped *wrapped,
					 int *granted, TimestampTz *created_at)
{
	KeyCacheShared *kc = cache();
	uint8		identity[DIGEST_LEN];
	uint8		fresh[KMS_BATCH_MAX * ENV_KEY_LEN];
	KmsWrapped	fresh_wrapped[KMS_BATCH_MAX];
	int			nfresh;
	bool		ok;
	bool		wait;
	bool		promoted = false;
	CurrentDek *c;

	wrapped_digest(kek, NULL, identity);
	wrapped->data = palloc(ENV_MAX_WRAPPED_LEN);

	for (;;)
	{
		LWLockAcquire(env_lock(0), LW_SHARED);
		c = current_slot(kc, kek->name);
		ok = take_use(c, kek, identity, GetCurrentTimestamp(), want, dek, wrapped,
					  granted, created_at);
		wait = !ok && someone_generating(c);
		LWLockRelease(env_lock(0));
		if (ok)
		{
			ConditionVariableCancelSleep();
			return;
		}
		if (wait)
		{
			(void) ConditionVariableTimedSleep(&kc->dek_ready, 100, PG_WAIT_EXTENSION);
			continue;
		}

		/* Nobody is fetching a key: claim the job, unless someone beat us. */
		LWLockAcquire(env_lock(0), LW_EXCLUSIVE);
		c = current_slot(kc, kek->name);
		ok = take_use(c, kek, identity, GetCurrentTimestamp(), want, dek, wrapped,
					  granted, created_at);
		wait = !ok && someone_generating(c);
		if (!ok && !wait)
		{
			/* A key left from the last batch: no KMS call. */
			c = claim_slot(kc, kek);
			if (promote_spare(c, kek, identity, GetCurrentTimestamp()))
			{
				ok = take_use(c, kek, identity, GetCurrentTimestamp(), want, dek, wrapped,
							  granted, created_at);
				promoted = ok;
			}
			if (!ok)
			{
				c->generating_since = GetCurrentTimestamp();
				c->generating_pid = MyProcPid;
			}
		}
		LWLockRelease(env_lock(0));
		if (ok)
		{
			ConditionVariableCancelSleep();
			if (promoted)
			{
				/* Readers of what we write find the key in the cache. */
				keycache_put(kek, wrapped, dek);
			}
			return;
		}
		if (!wait)
			break;
	}
	ConditionVariableCancelSleep();

	/*
	 * Ours to fetch, with no lock held; wake the waiters whatever happens.
	 * One batch makes the current key and KMS_BATCH_MAX - 1 spares, which
	 * later key changes promote without a KMS call (while they are younger
	 * than envelope.dek_max_age and their KEK version is the latest).
	 */
	nfresh = KMS_BATCH_MAX;
	PG_TRY();
	{
		generate_checked(kek, nfresh, fresh, fresh_wrapped);
	}
	PG_CATCH();
	{
		end_generating(kc, kek->name);
		PG_RE_THROW();
	}
	PG_END_TRY();

	LWLockAcquire(env_lock(0), LW_EXCLUSIVE);
	c = claim_slot(kc, kek);
	env_wipe(c->dek, sizeof(c->dek));
	memcpy(c->identity, identity, DIGEST_LEN);
	c->version = fresh_wrapped[0].version;
	*granted = Max(1, Min(want, envelope_dek_max_uses));
	pg_atomic_write_u64(&c->uses, *granted);
	c->created_at = GetCurrentTimestamp();
	*created_at = c->created_at;
	c->generating_since = 0;
	c->generating_pid = 0;
	c->wrapped_len = fresh_wrapped[0].len;
	memcpy(c->wrapped, fresh_wrapped[0].data, fresh_wrapped[0].len);
	memcpy(c->dek, fresh, ENV_KEY_LEN);
	clear_spares(c);
	for (int i = 1; i < nfresh; i++)
	{
		SpareDek   *sp = &c->spare[c->nspare++];

		sp->version = fresh_wrapped[i].version;
		sp->created_at = c->created_at;
		sp->wrapped_len = fresh_wrapped[i].len;
		memcpy(sp->wrapped, fresh_wrapped[i].data, fresh_wrapped[i].len);
		memcpy(sp->dek, fresh + i * ENV_KEY_LEN, ENV_KEY_LEN);
	}
	LWLockRelease(env_lock(0));
	ConditionVariableBroadcast(&kc->dek_ready);

	memcpy(dek, fresh, ENV_KEY_LEN);
	wrapped->version = fresh_wrapped[0].version;
	wrapped->len = fresh_wrapped[0].len;
	memcpy(wrapped->data, fresh_wrapped[0].data, fresh_wrapped[0].len);

	/* Readers of what we write find the key in the cache. */
	keycache_put(kek, &fresh_wrapped[0], fresh);
	env_wipe(fresh, sizeof(fresh));
}

/* Forget the current encryption data key of a KEK (NULL: all), server-wide. */
void
keycache_retire_current(const char *kek_name)
{
	KeyCacheShared *kc = cache();

	LWLockAcquire(env_lock(0), LW_EXCLUSIVE);
	for (int i = 0; i < MAX_CURRENT_DEKS; i++)
	{
		CurrentDek *c = &kc->currents[i];

		if (c->used && (kek_name == NULL || strcmp(c->kek_name, kek_name) == 0))
		{
			c->used = false;
			env_wipe(c->dek, sizeof(c->dek));
			clear_spares(c);
			env_wipe(c->kek_name, sizeof(c->kek_name));
			c->created_at = 0;
			c->generating_since = 0;
			c->wrapped_len = 0;
			pg_atomic_write_u64(&c->uses, 0);
		}
	}
	pg_atomic_fetch_add_u64(&kc->generation, 1);
	LWLockRelease(env_lock(0));
	ConditionVariableBroadcast(&kc->dek_ready);
}

/* The sweeper's clock (0 until it ran): behind the real time by up to a second. */
TimestampTz
keycache_coarse_clock(void)
{
	return (TimestampTz) pg_atomic_read_u64(&cache()->coarse_clock);
}

/*
 * Where the flush generation and the sweeper's clock live, for callers that
 * read them on every use (keylocal.c): two words written about once a
 * second at most, so reading them is a plain load of a shared cache line.
 */
void
keycache_watch(pg_atomic_uint64 **generation, pg_atomic_uint64 **coarse_clock)
{
	KeyCacheShared *kc = cache();

	*generation = &kc->generation;
	*coarse_clock = &kc->coarse_clock;
}

/* Look up a remembered rewrap of wrapped to target's current version. */
bool
keycache_rewrap_lookup(const KekInfo *from, const KmsWrapped *wrapped,
					   const KekInfo *target, KmsWrapped *out)
{
	uint8		digest[DIGEST_LEN];
	uint8		identity[DIGEST_LEN];

	wrapped_digest(from, wrapped, digest);
	wrapped_digest(target, NULL, identity);
	for (int i = 0; i < MAX_REWRAP_MEMO; i++)
	{
		RewrapMemo *m = &memo[i];

		if (m->used && m->target_latest == target->latest_version &&
			strcmp(m->target_name, target->name) == 0 &&
			memcmp(m->target_identity, identity, DIGEST_LEN) == 0 &&
			memcmp(m->from_digest, digest, DIGEST_LEN) == 0)
		{
			out->version = m->version;
			out->len = m->wrapped_len;
			out->data = palloc(m->wrapped_len);
			memcpy(out->data, m->wrapped, m->wrapped_len);
			return true;
		}
	}
	return false;
}

/* Remember the result of a rewrap (oldest memo entry replaced). */
void
keycache_rewrap_store(const KekInfo *from, const KmsWrapped *wrapped,
					  const KekInfo *target, const KmsWrapped *out)
{
	RewrapMemo *m = &memo[memo_next];

	memo_next = (memo_next + 1) % MAX_REWRAP_MEMO;
	if (m->wrapped)
		pfree(m->wrapped);
	memset(m, 0, sizeof(*m));
	wrapped_digest(from, wrapped, m->from_digest);
	wrapped_digest(target, NULL, m->target_identity);
	strlcpy(m->target_name, target->name, NAMEDATALEN);
	m->target_latest = target->latest_version;
	m->version = out->version;
	m->wrapped = MemoryContextAlloc(TopMemoryContext, out->len);
	memcpy(m->wrapped, out->data, out->len);
	m->wrapped_len = out->len;
	m->used = true;
}

/* Wipe all entries, or those of one KEK; returns how many were removed. */
int
keycache_flush(const char *kek_name)
{
	KeyCacheShared *kc = cache();
	int			n = 0;

	for (int part = 0; part < kc->nparts; part++)
	{
		DekEntry   *e = &kc->entries[part * kc->part_slots];

		LWLockAcquire(env_lock(1 + part), LW_EXCLUSIVE);
		for (int i = 0; i < kc->part_slots; i++, e++)
		{
			if (e->used && (kek_name == NULL || strcmp(e->kek_name, kek_name) == 0))
			{
				entry_clear(e);
				n++;
			}
		}
		LWLockRelease(env_lock(1 + part));
	}
	keycache_retire_current(kek_name);
	for (int i = 0; i < MAX_REWRAP_MEMO; i++)
	{
		if (memo[i].used && (kek_name == NULL || strcmp(memo[i].target_name, kek_name) == 0))
		{
			pfree(memo[i].wrapped);
			memset(&memo[i], 0, sizeof(memo[i]));
		}
	}
	return n;
}

/*
 * At backend exit, give up unwraps and key generation this backend claimed
 * (an ERROR resolves them itself; this covers FATAL and termination).
 */
static void
keycache_release_claims(int code, Datum arg)
{
	KeyCacheShared *kc = (KeyCacheShared *) env_key_region();
	bool		any = false;

	for (int part = 0; part < kc->nparts; part++)
	{
		DekEntry   *e = &kc->entries[part * kc->part_slots];

		LWLockAcquire(env_lock(1 + part), LW_EXCLUSIVE);
		for (int i = 0; i < kc->part_slots; i++, e++)
		{
			if (e->used && e->pending_pid == MyProcPid)
			{
				entry_clear(e);
				any = true;
			}
		}
		LWLockRelease(env_lock(1 + part));
	}
	LWLockAcquire(env_lock(0), LW_EXCLUSIVE);
	for (int i = 0; i < MAX_CURRENT_DEKS; i++)
	{
		if (kc->currents[i].generating_pid == MyProcPid)
		{
			kc->currents[i].generating_pid = 0;
			kc->currents[i].generating_since = 0;
			any = true;
		}
	}
	LWLockRelease(env_lock(0));
	if (any)
	{
		ConditionVariableBroadcast(&kc->unwrapped);
		ConditionVariableBroadcast(&kc->dek_ready);
	}
}

/*
 * Wipe encryption keys past envelope.dek_max_age (the sweeper's value):
 * a KEK's current key and its spares, so an idle server does not keep
 * keys it will never use again.  A slot being refilled is left alone.
 */
static void
sweep_currents(KeyCacheShared *kc, TimestampTz now)
{
	TimestampTz max_age = (TimestampTz) envelope_dek_max_age * USECS_PER_SEC;
	bool		any = false;

	LWLockAcquire(env_lock(0), LW_SHARED);
	for (int i = 0; i < MAX_CURRENT_DEKS && !any; i++)
	{
		CurrentDek *c = &kc->currents[i];

		any = c->used && c->generating_since == 0 &&
			((c->created_at != 0 && now - c->created_at >= max_age) ||
			 (c->nspare > 0 && now - c->spare[0].created_at >= max_age));
	}
	LWLockRelease(env_lock(0));
	if (!any)
		return;

	LWLockAcquire(env_lock(0), LW_EXCLUSIVE);
	for (int i = 0; i < MAX_CURRENT_DEKS; i++)
	{
		CurrentDek *c = &kc->currents[i];
		int			keep = 0;

		if (!c->used || c->generating_since != 0)
			continue;
		if (c->created_at != 0 && now - c->created_at >= max_age)
		{
			/* take_use() refuses it from now on; the next enc() replaces it */
			env_wipe(c->dek, sizeof(c->dek));
			c->created_at = 0;
			pg_atomic_write_u64(&c->uses, PG_UINT64_MAX / 2);
		}
		for (int j = 0; j < c->nspare; j++)
			if (now - c->spare[j].created_at < max_age && keep++ != j)
				c->spare[keep - 1] = c->spare[j];
		/* wipe what is no longer kept, moved copies included */
		for (int j = keep; j < c->nspare; j++)
			env_wipe(c->spare[j].dek, sizeof(c->spare[j].dek));
		c->nspare = keep;
	}
	LWLockRelease(env_lock(0));
}

/* Wipe entries past their time, grace included (the sweeper). */
void
keycache_sweep(void)
{
	KeyCacheShared *kc = (KeyCacheShared *) env_key_region();
	TimestampTz now = GetCurrentTimestamp();
	int64		expired = 0;

	pg_atomic_write_u64(&kc->coarse_clock, (uint64) now);
	sweep_currents(kc, now);

	for (int part = 0; part < kc->nparts; part++)
	{
		DekEntry   *first = &kc->entries[part * kc->part_slots];
		bool		any = false;

		/* Look under the shared lock first, so readers rarely wait. */
		LWLockAcquire(env_lock(1 + part), LW_SHARED);
		for (int i = 0; i < kc->part_slots && !any; i++)
			any = entry_dead(&first[i], now);
		LWLockRelease(env_lock(1 + part));
		if (!any)
			continue;

		LWLockAcquire(env_lock(1 + part), LW_EXCLUSIVE);
		for (int i = 0; i < kc->part_slots; i++)
		{
			DekEntry   *e = &first[i];

			if (entry_dead(e, now))
			{
				if (e->pending_pid == 0)
					expired++;
				entry_clear(e);
			}
		}
		LWLockRelease(env_lock(1 + part));
	}
	env_count(CNT_EXPIRATIONS, expired);
}

/* Occupancy of the cache. */
void
keycache_stats(KeyCacheStats *stats)
{
	KeyCacheShared *kc = cache();

	memset(stats, 0, sizeof(*stats));
	stats->capacity = kc->nparts * kc->part_slots;
	for (int part = 0; part < kc->nparts; part++)
	{
		DekEntry   *e = &kc->entries[part * kc->part_slots];

		LWLockAcquire(env_lock(1 + part), LW_SHARED);
		for (int i = 0; i < kc->part_slots; i++, e++)
			if (e->used)
				stats->entries++;
		LWLockRelease(env_lock(1 + part));
	}
	stats->locked = env_key_region_locked();
}

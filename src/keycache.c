/*-------------------------------------------------------------------------
 *
 * keycache.c
 *		Unwrapped data keys held for a short time (per backend, for now).
 *
 * Three tables, all private to the backend until the shared-memory cache
 * replaces them:
 *
 *	- the decrypt cache: SHA-256(provider, key_ref, KEK version, wrapped DEK)
 *	  -> DEK, for envelope.cache_ttl seconds, at most envelope.cache_size
 *	  entries, least recently used evicted first;
 *	- the current data key of each KEK for encryption, used for at most
 *	  envelope.dek_max_uses values and envelope.dek_max_age seconds, and
 *	  never after the KEK has a newer version;
 *	- a memo of rewrap results (old wrapped DEK -> new wrapped DEK), so
 *	  rewrapping rows that share a data key costs one KMS call per key.
 *
 * Key bytes live in one anonymous mapping that is locked in RAM where the
 * platform allows (mlock) and excluded from core dumps (MADV_DONTDUMP).
 * Entries are wiped with OPENSSL_cleanse on expiry, eviction and flush.
 * Wrapped keys are not secret and live in TopMemoryContext.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <sys/mman.h>

#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "crypto.h"
#include "envelope.h"
#include "keycache.h"

#define DIGEST_LEN			32
#define MAX_CURRENT_DEKS	32
#define MAX_REWRAP_MEMO		256

/* A cached unwrapped data key. */
typedef struct DekEntry
{
	bool		used;
	uint8		digest[DIGEST_LEN];
	char		kek_name[NAMEDATALEN];
	TimestampTz expires_at;
	uint64		last_used;
	uint8		dek[ENV_KEY_LEN];
} DekEntry;

/* The data key a KEK currently encrypts new values under. */
typedef struct CurrentDek
{
	bool		used;
	char		kek_name[NAMEDATALEN];
	uint8		identity[DIGEST_LEN];	/* provider and key_ref */
	int32		version;
	int64		uses;
	TimestampTz created_at;
	uint8	   *wrapped;		/* TopMemoryContext */
	int			wrapped_len;
	uint8		dek[ENV_KEY_LEN];
} CurrentDek;

/* A remembered rewrap result. */
typedef struct RewrapMemo
{
	bool		used;
	uint8		from_digest[DIGEST_LEN];
	char		target_name[NAMEDATALEN];
	int32		target_latest;	/* target's registry version when stored */
	int32		version;
	uint8	   *wrapped;		/* TopMemoryContext */
	int			wrapped_len;
} RewrapMemo;

/* The locked mapping: decrypt entries followed by current keys. */
static DekEntry *entries = NULL;
static CurrentDek *currents = NULL;
static int	capacity = 0;
static bool memory_locked = false;
static uint64 use_clock = 0;
static int	last_hit = -1;

static RewrapMemo memo[MAX_REWRAP_MEMO];
static int	memo_next = 0;

static int64 n_hits = 0;
static int64 n_misses = 0;
static int64 n_expirations = 0;
static int64 n_evictions = 0;

/* Map, lock and exclude from core dumps the memory that holds keys. */
static void
keycache_init(void)
{
	Size		size;
	void	   *p;

	if (entries != NULL)
		return;
	capacity = envelope_cache_size;
	size = sizeof(DekEntry) * capacity + sizeof(CurrentDek) * MAX_CURRENT_DEKS;
	p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("could not allocate memory for the key cache: %m")));
#ifdef MADV_DONTDUMP
	(void) madvise(p, size, MADV_DONTDUMP);
#endif
	memory_locked = (mlock(p, size) == 0);
	memset(p, 0, size);
	entries = (DekEntry *) p;
	currents = (CurrentDek *) ((char *) p + sizeof(DekEntry) * capacity);
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

/* Wipe one decrypt entry. */
static void
entry_clear(DekEntry *e)
{
	env_wipe(e, sizeof(*e));
}

/* Find a live entry for a digest, expiring it if its time is up. */
static DekEntry *
entry_find(const uint8 *digest, TimestampTz now)
{
	int			start = (last_hit >= 0) ? last_hit : 0;

	for (int k = 0; k < capacity; k++)
	{
		int			i = (start + k) % capacity;
		DekEntry   *e = &entries[i];

		if (!e->used || memcmp(e->digest, digest, DIGEST_LEN) != 0)
			continue;
		if (e->expires_at <= now)
		{
			entry_clear(e);
			n_expirations++;
			return NULL;
		}
		last_hit = i;
		e->last_used = ++use_clock;
		return e;
	}
	return NULL;
}

/* Put an unwrapped data key into the cache. */
void
keycache_put(const KekInfo *kek, const KmsWrapped *wrapped, const uint8 *dek)
{
	uint8		digest[DIGEST_LEN];
	TimestampTz now;
	DekEntry   *slot = NULL;
	DekEntry   *oldest = NULL;

	if (envelope_cache_ttl <= 0)
		return;
	keycache_init();
	now = GetCurrentTimestamp();
	wrapped_digest(kek, wrapped, digest);
	if ((slot = entry_find(digest, now)) == NULL)
	{
		for (int i = 0; i < capacity && slot == NULL; i++)
		{
			DekEntry   *e = &entries[i];

			if (e->used && e->expires_at <= now)
			{
				entry_clear(e);
				n_expirations++;
			}
			if (!e->used)
				slot = e;
			else if (oldest == NULL || e->last_used < oldest->last_used)
				oldest = e;
		}
		if (slot == NULL)
		{
			entry_clear(oldest);
			n_evictions++;
			slot = oldest;
		}
	}
	slot->used = true;
	memcpy(slot->digest, digest, DIGEST_LEN);
	strlcpy(slot->kek_name, kek->name, NAMEDATALEN);
	slot->expires_at = now + (TimestampTz) envelope_cache_ttl * USECS_PER_SEC;
	slot->last_used = ++use_clock;
	memcpy(slot->dek, dek, ENV_KEY_LEN);
}

/* The plaintext of a wrapped data key; true if it came from the KMS (not cached). */
bool
keycache_unwrap(const KekInfo *kek, const KmsWrapped *wrapped, uint8 *dek)
{
	if (envelope_cache_ttl > 0)
	{
		uint8		digest[DIGEST_LEN];
		DekEntry   *e;

		keycache_init();
		wrapped_digest(kek, wrapped, digest);
		e = entry_find(digest, GetCurrentTimestamp());
		if (e != NULL)
		{
			n_hits++;
			memcpy(dek, e->dek, ENV_KEY_LEN);
			return false;
		}
	}
	n_misses++;
	kms_unwrap(kek->provider, kek->key_ref, wrapped, dek);
	return true;
}

/* Generate a data key and, if envelope.kms_verify, check it unwraps to itself. */
static void
generate_checked(const KekInfo *kek, uint8 *dek, KmsWrapped *wrapped)
{
	uint8		check[ENV_KEY_LEN];
	bool		same;

	kms_generate_dek(kek->provider, kek->key_ref, dek, wrapped);
	if (wrapped->version < kek->latest_version)
	{
		env_wipe(dek, ENV_KEY_LEN);
		ereport(ERROR,
				(errcode(ERRCODE_PROTOCOL_VIOLATION),
				 errmsg("KMS wrapped a new data key with an old version of key \"%s\"", kek->key_ref),
				 errdetail("The KMS used version %d; KEK \"%s\" is at version %d.",
						   wrapped->version, kek->name, kek->latest_version)));
	}
	if (!envelope_kms_verify)
		return;
	PG_TRY();
	{
		kms_unwrap(kek->provider, kek->key_ref, wrapped, check);
	}
	PG_CATCH();
	{
		env_wipe(dek, ENV_KEY_LEN);
		PG_RE_THROW();
	}
	PG_END_TRY();
	same = env_equal_ct(dek, check, ENV_KEY_LEN);
	env_wipe(check, sizeof(check));
	if (!same)
	{
		env_wipe(dek, ENV_KEY_LEN);
		ereport(ERROR,
				(errcode(ERRCODE_PROTOCOL_VIOLATION),
				 errmsg("KMS returned a data key that does not match its wrapped form"),
				 errdetail("Unwrapping the new data key with key \"%s\" gave different bytes; nothing was encrypted with it.",
						   kek->key_ref)));
	}
}

/* The data key to encrypt the next value under kek; one use is consumed. */
void
keycache_current_dek(const KekInfo *kek, uint8 *dek, KmsWrapped *wrapped)
{
	uint8		identity[DIGEST_LEN];
	TimestampTz now = GetCurrentTimestamp();
	CurrentDek *slot = NULL;
	CurrentDek *oldest = NULL;

	keycache_init();
	wrapped_digest(kek, NULL, identity);
	for (int i = 0; i < MAX_CURRENT_DEKS; i++)
	{
		CurrentDek *c = &currents[i];

		if (c->used && strcmp(c->kek_name, kek->name) == 0)
		{
			slot = c;
			break;
		}
	}

	if (slot != NULL &&
		memcmp(slot->identity, identity, DIGEST_LEN) == 0 &&
		slot->version >= kek->latest_version &&
		slot->uses < envelope_dek_max_uses &&
		now - slot->created_at < (TimestampTz) envelope_dek_max_age * USECS_PER_SEC)
	{
		slot->uses++;
		memcpy(dek, slot->dek, ENV_KEY_LEN);
		wrapped->version = slot->version;
		wrapped->len = slot->wrapped_len;
		wrapped->data = palloc(slot->wrapped_len);
		memcpy(wrapped->data, slot->wrapped, slot->wrapped_len);
		return;
	}

	/* A new data key, then remember it for the next values and for reads. */
	generate_checked(kek, dek, wrapped);
	keycache_put(kek, wrapped, dek);

	if (slot == NULL)
	{
		for (int i = 0; i < MAX_CURRENT_DEKS && slot == NULL; i++)
		{
			if (!currents[i].used)
				slot = &currents[i];
			else if (oldest == NULL || currents[i].created_at < oldest->created_at)
				oldest = &currents[i];
		}
		if (slot == NULL)
			slot = oldest;
	}
	if (slot->wrapped)
		pfree(slot->wrapped);
	env_wipe(slot, sizeof(*slot));
	slot->used = true;
	strlcpy(slot->kek_name, kek->name, NAMEDATALEN);
	memcpy(slot->identity, identity, DIGEST_LEN);
	slot->version = wrapped->version;
	slot->uses = 1;
	slot->created_at = now;
	slot->wrapped = MemoryContextAlloc(TopMemoryContext, wrapped->len);
	memcpy(slot->wrapped, wrapped->data, wrapped->len);
	slot->wrapped_len = wrapped->len;
	memcpy(slot->dek, dek, ENV_KEY_LEN);
}

/* Forget the current encryption data key of a KEK (after rotation). */
void
keycache_retire_current(const char *kek_name)
{
	if (currents == NULL)
		return;
	for (int i = 0; i < MAX_CURRENT_DEKS; i++)
	{
		CurrentDek *c = &currents[i];

		if (c->used && (kek_name == NULL || strcmp(c->kek_name, kek_name) == 0))
		{
			if (c->wrapped)
				pfree(c->wrapped);
			env_wipe(c, sizeof(*c));
		}
	}
}

/* Look up a remembered rewrap of wrapped to target's current version. */
bool
keycache_rewrap_lookup(const KekInfo *from, const KmsWrapped *wrapped,
					   const KekInfo *target, KmsWrapped *out)
{
	uint8		digest[DIGEST_LEN];

	wrapped_digest(from, wrapped, digest);
	for (int i = 0; i < MAX_REWRAP_MEMO; i++)
	{
		RewrapMemo *m = &memo[i];

		if (m->used && m->target_latest == target->latest_version &&
			strcmp(m->target_name, target->name) == 0 &&
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
	int			n = 0;

	if (entries == NULL)
		return 0;
	for (int i = 0; i < capacity; i++)
	{
		if (entries[i].used &&
			(kek_name == NULL || strcmp(entries[i].kek_name, kek_name) == 0))
		{
			entry_clear(&entries[i]);
			n++;
		}
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
	last_hit = -1;
	return n;
}

/* Counters and occupancy of the cache. */
void
keycache_stats(KeyCacheStats *stats)
{
	memset(stats, 0, sizeof(*stats));
	stats->capacity = envelope_cache_size;
	if (entries != NULL)
	{
		stats->capacity = capacity;
		for (int i = 0; i < capacity; i++)
			if (entries[i].used)
				stats->entries++;
	}
	stats->hits = n_hits;
	stats->misses = n_misses;
	stats->expirations = n_expirations;
	stats->evictions = n_evictions;
	stats->locked = memory_locked;
}

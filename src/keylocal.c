/*-------------------------------------------------------------------------
 *
 * keylocal.c
 *		Backend-local copies of hot data keys, in front of the shared cache.
 *
 * A hit in the shared cache (keycache.c) costs a SHA-256 of the wrapped
 * key, a partition LWLock and two shared atomics: more than decrypting a
 * short value.  Each backend therefore keeps up to LOCAL_SLOTS keys that
 * came from the shared cache, each with its EnvDekState (the AES key
 * schedule for per-value keys and the key commitment, crypto.c), plus a
 * reservation of uses of each KEK's current encryption key.
 *
 * Rules that keep the shared cache's guarantees (docs/design.md):
 *	- a local copy is made only from a fresh shared hit and carries that
 *	  entry's expiry; keys straight from the KMS (not yet verified) and
 *	  stale keys used during an outage are never kept;
 *	- at the first use in each statement, and every KEYLOCAL_RECHECK uses
 *	  within one, the shared generation (bumped by envelope.cache_flush(),
 *	  KEK rotation and retirement) and the clock are checked: copies from an
 *	  older generation or past their expiry are wiped.  So TTL, flush and
 *	  retirement take effect for every new statement;
 *	- authorization (authz.c) is checked by the callers before a key is
 *	  looked up, for every value, hit or miss, local or shared;
 *	- uses of a current encryption key are reserved from the shared counter
 *	  in batches (1, then doubling up to RESERVE_MAX within a statement), so
 *	  envelope.dek_max_uses still bounds the values sealed under a key
 *	  server-wide.  Uses a statement reserved but did not need stay with
 *	  the backend for its later statements (while the key is current
 *	  enough: dek_max_age, KEK version, no flush); those left at exit are
 *	  lost, never counted twice;
 *	- copies are wiped on eviction, expiry, generation change and backend
 *	  exit.  Raw keys live in pages excluded from core dumps
 *	  (MADV_DONTDUMP) and locked in RAM where the platform allows, together
 *	  with their AES round keys (src/aesgcm.c); with OpenSSL, the schedules
 *	  in its contexts are overwritten at the end of every transaction, so
 *	  between transactions the keys exist only in these pages;
 *	- within a statement, every use also compares the shared generation and
 *	  the sweeper's coarse clock (about a second behind) with the earliest
 *	  expiry of the copies: a flush or an expiry takes effect within about a
 *	  second even inside a long statement, DO block or procedure;
 *	- a backend that goes idle does not keep copies past their expiry: at
 *	  the end of each transaction a timer is set for the earliest expiry,
 *	  then every second, and its handler (signal context: it only
 *	  overwrites bytes in these pages and clears flags) wipes the expired
 *	  copies if no transaction is using keys; inside one it leaves that to
 *	  the checks above.
 *
 * Locking: none; everything here is backend-local.  The timer handler
 * touches only the secret bytes and the valid flags of copies.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <sys/mman.h>

#include "access/xact.h"
#include "miscadmin.h"
#include "storage/ipc.h"
#include "utils/memutils.h"
#include "utils/timeout.h"
#include "utils/timestamp.h"

#include "audit.h"
#include "crypto.h"
#include "envelope.h"
#include "keycache.h"
#include "shmem.h"

#define LOCAL_SLOTS			16		/* data keys for decryption */
#define LOCAL_CURRENTS		8		/* KEKs with a reservation for encryption */
#define KEYLOCAL_RECHECK	4096	/* uses between checks within a statement */
#define RESERVE_MAX			256		/* largest reservation of uses */

/* A local copy of a cached data key. */
typedef struct LocalDek
{
	bool		used;
	int32		version;
	int			wrapped_len;
	uint8	   *wrapped;		/* TopMemoryContext */
	char	   *provider;		/* TopMemoryContext */
	char	   *key_ref;		/* TopMemoryContext */
	TimestampTz expires_at;		/* the shared entry's */
	uint64		last_use;		/* LRU stamp */
	EnvDekState state;
} LocalDek;

/* Uses of a KEK's current data key reserved by this backend. */
typedef struct LocalCurrent
{
	bool		used;
	char		kek_name[NAMEDATALEN];
	char	   *provider;		/* TopMemoryContext */
	char	   *key_ref;		/* TopMemoryContext */
	int32		version;
	TimestampTz created_at;
	int			left;			/* reserved uses not yet consumed */
	int			batch;			/* size of the last reservation */
	uint64		batch_statement;	/* statement that made it */
	int			wrapped_len;
	uint8	   *wrapped;		/* TopMemoryContext, ENV_MAX_WRAPPED_LEN */
	EnvDekState state;
} LocalCurrent;

/* Everything holding key material, in its own protected pages. */
typedef struct LocalKeys
{
	LocalDek	deks[LOCAL_SLOTS];
	LocalCurrent currents[LOCAL_CURRENTS];
	EnvDekState scratch;		/* a key not kept: from the KMS, or stale */
} LocalKeys;

static LocalKeys *lk = NULL;
static uint64 lk_generation = 0;
static uint64 lk_checked_statement = 0;
static bool lk_checked = false;
static uint32 uses_since_check = 0;
static uint64 lk_clock = 0;
static volatile sig_atomic_t lk_in_xact = false;	/* a transaction used keys */
static TimeoutId lk_timeout = MAX_TIMEOUTS;
static TimestampTz lk_timer_at = 0;
static TimestampTz lk_deadline = 0;	/* earliest expiry of a copy; 0: none */
static pg_atomic_uint64 *shared_generation = NULL;	/* keycache_watch() */
static pg_atomic_uint64 *shared_clock = NULL;

static void keylocal_exit(int code, Datum arg);
static void keylocal_xact_cb(XactEvent event, void *arg);
static void keylocal_timer(void);

/* Map the protected pages for local keys on first use. */
static void
local_setup(void)
{
	Size		size;
	void	   *p;

	if (lk != NULL)
		return;
	size = TYPEALIGN(8192, sizeof(LocalKeys));
	p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("out of memory"),
				 errdetail("Could not map %zu bytes for the backend's key copies: %m.", size)));
#ifdef MADV_DONTDUMP
	(void) madvise(p, size, MADV_DONTDUMP);
#endif
	(void) mlock(p, size);
	lk = (LocalKeys *) p;
	keycache_watch(&shared_generation, &shared_clock);
	before_shmem_exit(keylocal_exit, (Datum) 0);
	RegisterXactCallback(keylocal_xact_cb, NULL);
	lk_timeout = RegisterTimeout(USER_TIMEOUT, keylocal_timer);
}

/* When a copy stops being usable: its expiry, or its reservation's age limit. */
static TimestampTz
current_expiry(const LocalCurrent *c)
{
	return c->created_at + (TimestampTz) envelope_dek_max_age * USECS_PER_SEC;
}

/*
 * Timer handler (signal context): overwrite the secret bytes of expired
 * copies, unless a transaction is using keys (then the statement-level
 * checks and the transaction's end take care of them).  Only memory in the
 * protected pages is written; the copies' other fields are tidied up by
 * local_check() later.
 */
static void
keylocal_timer(void)
{
	TimestampTz now;

	if (lk == NULL || lk_in_xact)
		return;
	now = GetCurrentTimestamp();
	for (int i = 0; i < LOCAL_SLOTS; i++)
	{
		LocalDek   *d = &lk->deks[i];

		if (d->used && d->state.valid && d->expires_at <= now)
		{
			env_dek_state_wipe_bytes(&d->state);
		}
	}
	for (int i = 0; i < LOCAL_CURRENTS; i++)
	{
		LocalCurrent *c = &lk->currents[i];

		if (c->used && c->state.valid && current_expiry(c) <= now)
		{
			env_dek_state_wipe_bytes(&c->state);
			c->left = 0;
		}
	}
}

/* Set the timer for the earliest expiry of the copies kept (none: no timer). */
static void
arm_timer(void)
{
	TimestampTz earliest = 0;

	for (int i = 0; i < LOCAL_SLOTS; i++)
		if (lk->deks[i].used && lk->deks[i].state.valid &&
			(earliest == 0 || lk->deks[i].expires_at < earliest))
			earliest = lk->deks[i].expires_at;
	for (int i = 0; i < LOCAL_CURRENTS; i++)
		if (lk->currents[i].used && lk->currents[i].state.valid &&
			(earliest == 0 || current_expiry(&lk->currents[i]) < earliest))
			earliest = current_expiry(&lk->currents[i]);
	if (earliest == 0)
	{
		if (get_timeout_active(lk_timeout))
			disable_timeout(lk_timeout, false);
		lk_timer_at = 0;
		return;
	}
	if (earliest == lk_timer_at && get_timeout_active(lk_timeout))
		return;
	lk_timer_at = earliest;
	/* then every second: copies that expire later are wiped as they expire */
	enable_timeout_every(lk_timeout, earliest, 1000);
}

/* Transaction end: keys are idle from now on until the next one uses them. */
static void
keylocal_xact_cb(XactEvent event, void *arg)
{
	switch (event)
	{
		case XACT_EVENT_COMMIT:
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PREPARE:
			if (lk == NULL)
				break;
			if (lk_in_xact)
			{
				env_dek_state_clear(&lk->scratch);
				pg_compiler_barrier();
				lk_in_xact = false;
			}
			/* (error recovery disables every timeout: set it again) */
			arm_timer();
			break;
		default:
			break;
	}
}

/* Free a string or buffer kept in TopMemoryContext. */
static void
free_kept(void *p)
{
	if (p != NULL)
		pfree(p);
}

/* Copy a string into TopMemoryContext. */
static char *
keep_string(const char *s)
{
	return MemoryContextStrdup(TopMemoryContext, s);
}

/* Wipe one local copy. */
static void
dek_clear(LocalDek *d)
{
	env_dek_state_clear(&d->state);
	free_kept(d->wrapped);
	free_kept(d->provider);
	free_kept(d->key_ref);
	d->wrapped = NULL;
	d->provider = NULL;
	d->key_ref = NULL;
	d->used = false;
}

/* Wipe one reservation (its unused uses are lost). */
static void
current_clear(LocalCurrent *c)
{
	env_dek_state_clear(&c->state);
	free_kept(c->provider);
	free_kept(c->key_ref);
	c->provider = NULL;
	c->key_ref = NULL;
	c->left = 0;
	c->used = false;
}

/* Wipe this backend's local copies and reservations. */
void
keycache_forget_local(void)
{
	if (lk == NULL)
		return;
	for (int i = 0; i < LOCAL_SLOTS; i++)
		if (lk->deks[i].used)
			dek_clear(&lk->deks[i]);
	for (int i = 0; i < LOCAL_CURRENTS; i++)
		if (lk->currents[i].used)
			current_clear(&lk->currents[i]);
	env_dek_state_clear(&lk->scratch);
}

/* Backend exit: wipe keys. */
static void
keylocal_exit(int code, Datum arg)
{
	keycache_forget_local();
}

/*
 * Drop copies the shared cache no longer vouches for: all of them after a
 * flush or retirement (generation change), else those past their expiry,
 * and reservations past envelope.dek_max_age.
 */
static void
local_check(bool new_statement)
{
	uint64		generation = pg_atomic_read_u64(shared_generation);

	/* A statement's first check goes by its start time (no clock read). */
	TimestampTz now = new_statement ? GetCurrentStatementStartTimestamp() :
		GetCurrentTimestamp();

	if (generation != lk_generation)
	{
		keycache_forget_local();
		lk_generation = generation;
	}
	else
	{
		for (int i = 0; i < LOCAL_SLOTS; i++)
			if (lk->deks[i].used &&
				(!lk->deks[i].state.valid || lk->deks[i].expires_at <= now))
				dek_clear(&lk->deks[i]);
		for (int i = 0; i < LOCAL_CURRENTS; i++)
			if (lk->currents[i].used &&
				(!lk->currents[i].state.valid || current_expiry(&lk->currents[i]) <= now))
				current_clear(&lk->currents[i]);
	}
	lk_deadline = 0;
	for (int i = 0; i < LOCAL_SLOTS; i++)
		if (lk->deks[i].used && (lk_deadline == 0 || lk->deks[i].expires_at < lk_deadline))
			lk_deadline = lk->deks[i].expires_at;
	for (int i = 0; i < LOCAL_CURRENTS; i++)
		if (lk->currents[i].used &&
			(lk_deadline == 0 || current_expiry(&lk->currents[i]) < lk_deadline))
			lk_deadline = current_expiry(&lk->currents[i]);
	lk_checked_statement = env_statement_id;
	lk_checked = true;
	uses_since_check = 0;
}

/* Check at the first use in a statement and every KEYLOCAL_RECHECK uses. */
static inline void
local_maybe_check(void)
{
	local_setup();
	if (!lk_in_xact)
	{
		/* A transaction's first use: by the clock (the timer keeps off now). */
		lk_in_xact = true;
		pg_compiler_barrier();
		local_check(false);
	}
	else if (!lk_checked || lk_checked_statement != env_statement_id)
		local_check(true);
	else if (++uses_since_check >= KEYLOCAL_RECHECK ||
			 pg_atomic_read_u64(shared_generation) != lk_generation ||
			 (lk_deadline != 0 &&
			  (TimestampTz) pg_atomic_read_u64(shared_clock) >= lk_deadline))
	{
		/* within a long statement: a flush, or a copy at its expiry */
		local_check(false);
	}
}

/* Is d the local copy of this wrapped key? */
static inline bool
local_matches(const LocalDek *d, const KekInfo *kek, const KmsWrapped *wrapped)
{
	return d->used && d->state.valid && d->version == wrapped->version &&
		d->wrapped_len == wrapped->len &&
		memcmp(d->wrapped, wrapped->data, wrapped->len) == 0 &&
		strcmp(d->key_ref, kek->key_ref) == 0 &&
		strcmp(d->provider, kek->provider_name) == 0;
}

/* The local copy of a wrapped key, or NULL (the last one found first). */
static LocalDek *
local_find(const KekInfo *kek, const KmsWrapped *wrapped)
{
	static int	last = 0;

	if (local_matches(&lk->deks[last], kek, wrapped))
		return &lk->deks[last];
	for (int i = 0; i < LOCAL_SLOTS; i++)
	{
		if (local_matches(&lk->deks[i], kek, wrapped))
		{
			last = i;
			return &lk->deks[i];
		}
	}
	return NULL;
}

/* Keep a copy of a key from a fresh shared hit (evicting the LRU copy). */
static LocalDek *
local_install(const KekInfo *kek, const KmsWrapped *wrapped, const uint8 *dek,
			  TimestampTz expires_at)
{
	LocalDek   *d = NULL;

	for (int i = 0; i < LOCAL_SLOTS && (d == NULL || d->used); i++)
		if (d == NULL || !lk->deks[i].used || lk->deks[i].last_use < d->last_use)
			d = &lk->deks[i];
	if (d->used)
		dek_clear(d);
	d->wrapped = MemoryContextAlloc(TopMemoryContext, wrapped->len);
	memcpy(d->wrapped, wrapped->data, wrapped->len);
	d->wrapped_len = wrapped->len;
	d->version = wrapped->version;
	d->provider = keep_string(kek->provider_name);
	d->key_ref = keep_string(kek->key_ref);
	d->expires_at = expires_at;
	d->last_use = ++lk_clock;
	env_dek_state_init(&d->state, dek);
	d->used = true;
	if (lk_deadline == 0 || expires_at < lk_deadline)
		lk_deadline = expires_at;
	return d;
}

/* The state of the data key that unwraps wrapped: local, shared or KMS. */
EnvDekState *
keycache_get(const KekInfo *kek, const KmsWrapped *wrapped, bool *from_kms)
{
	uint8		dek[ENV_KEY_LEN];
	TimestampTz hit_expires = 0;
	LocalDek   *d;
	EnvDekState *result;
	volatile bool claimed = false;

	*from_kms = false;
	local_maybe_check();
	d = local_find(kek, wrapped);
	if (d != NULL)
	{
		d->last_use = ++lk_clock;
		env_count_hits(1);
		return &d->state;
	}

	PG_TRY();
	{
		claimed = keycache_unwrap_ex(kek, wrapped, dek, &hit_expires);
		if (!claimed && hit_expires != 0)
			result = &local_install(kek, wrapped, dek, hit_expires)->state;
		else
		{
			/* Unverified (from the KMS) or stale: used once, not kept. */
			env_dek_state_init(&lk->scratch, dek);
			result = &lk->scratch;
		}
	}
	PG_CATCH();
	{
		env_wipe(dek, sizeof(dek));
		if (claimed)
			keycache_abandon(kek, wrapped);
		PG_RE_THROW();
	}
	PG_END_TRY();
	env_wipe(dek, sizeof(dek));
	*from_kms = claimed;
	return result;
}

/* A KEK's reservation slot: its own, a free one, or the oldest. */
static LocalCurrent *
current_slot(const KekInfo *kek)
{
	LocalCurrent *c = NULL;

	for (int i = 0; i < LOCAL_CURRENTS; i++)
		if (lk->currents[i].used && strcmp(lk->currents[i].kek_name, kek->name) == 0)
			return &lk->currents[i];
	for (int i = 0; i < LOCAL_CURRENTS; i++)
		if (c == NULL || !lk->currents[i].used ||
			(c->used && lk->currents[i].created_at < c->created_at))
			c = &lk->currents[i];
	if (c->used)
		current_clear(c);
	strlcpy(c->kek_name, kek->name, NAMEDATALEN);
	return c;
}

/* Reserve uses of the KEK's current data key from the shared cache. */
static void
current_refill(LocalCurrent *c, const KekInfo *kek)
{
	uint8		dek[ENV_KEY_LEN];
	KmsWrapped	w;
	volatile int want;
	int			granted = 0;
	TimestampTz created_at = 0;

	/* 1 for a statement's first value, then doubling: few uses are lost. */
	want = (c->used && c->batch_statement == env_statement_id) ?
		Min(c->batch * 2, RESERVE_MAX) : 1;
	/* Never more than a sixteenth of a key: other sessions share it. */
	want = Max(1, Min(want, envelope_dek_max_uses / 16));
	current_clear(c);
	PG_TRY();
	{
		keycache_current_dek(kek, want, dek, &w, &granted, &created_at);
		if (c->wrapped == NULL)
			c->wrapped = MemoryContextAlloc(TopMemoryContext, ENV_MAX_WRAPPED_LEN);
		memcpy(c->wrapped, w.data, w.len);
		c->wrapped_len = w.len;
		c->version = w.version;
		c->provider = keep_string(kek->provider_name);
		c->key_ref = keep_string(kek->key_ref);
		c->created_at = created_at;
		c->batch = want;
		c->batch_statement = env_statement_id;
		env_dek_state_init(&c->state, dek);
		c->left = granted;
		c->used = true;
		if (lk_deadline == 0 || current_expiry(c) < lk_deadline)
			lk_deadline = current_expiry(c);
	}
	PG_FINALLY();
	{
		env_wipe(dek, sizeof(dek));
	}
	PG_END_TRY();
	pfree(w.data);
}

/* The state of the data key for the next value under kek; one use consumed. */
EnvDekState *
keycache_current(const KekInfo *kek, KmsWrapped *wrapped)
{
	LocalCurrent *c;

	local_maybe_check();
	c = current_slot(kek);
	if (!c->used || !c->state.valid || c->left <= 0 || c->version < kek->latest_version ||
		strcmp(c->provider, kek->provider_name) != 0 ||
		strcmp(c->key_ref, kek->key_ref) != 0)
		current_refill(c, kek);
	c->left--;
	wrapped->version = c->version;
	wrapped->data = c->wrapped;
	wrapped->len = c->wrapped_len;
	return &c->state;
}

/*
 * The state of a data key unwrapped by the KMS now, bypassing every cache
 * (values on a retired KEK version: the KMS decides).  Valid until the next
 * call of this or keycache_get().
 */
EnvDekState *
keycache_get_uncached(const KekInfo *kek, const KmsWrapped *wrapped)
{
	uint8		dek[ENV_KEY_LEN];

	local_setup();
	lk_in_xact = true;			/* the scratch key is wiped at transaction end */
	PG_TRY();
	{
		kms_unwrap(kek->provider, kek->key_ref, wrapped, dek);
		env_dek_state_init(&lk->scratch, dek);
	}
	PG_FINALLY();
	{
		env_wipe(dek, sizeof(dek));
	}
	PG_END_TRY();
	return &lk->scratch;
}

/*-------------------------------------------------------------------------
 *
 * keycache.h
 *		The shared key cache: unwrapped data keys held for a short time,
 *		and the current data key of each KEK for encryption.
 *
 *-------------------------------------------------------------------------
 */
#ifndef ENVELOPE_KEYCACHE_H
#define ENVELOPE_KEYCACHE_H

#include "datatype/timestamp.h"
#include "port/atomics.h"

#include "crypto.h"
#include "kek.h"
#include "kms.h"

typedef struct KeyCacheStats
{
	int			entries;
	int			capacity;
	bool		locked;			/* key memory is locked in RAM */
} KeyCacheStats;

/* Shared memory sizing and setup (shmem.c). */
extern Size keycache_shmem_size(void);
extern int	keycache_partitions(void);
extern void keycache_shmem_init(void *region);

/* Wipe entries past their time (the sweeper, about once a second). */
extern void keycache_sweep(void);

/*
 * The data key to encrypt the next values under kek: up to want uses are
 * reserved (*granted, at least 1; counted across all backends, so
 * envelope.dek_max_uses holds), generating a new key through the KMS when
 * the current one is exhausted, too old, or under an older KEK version.
 * dek receives a copy the caller wipes; wrapped->data is palloc'd;
 * *created_at is when the key was generated.
 */
extern void keycache_current_dek(const KekInfo *kek, int want, uint8 *dek,
								 KmsWrapped *wrapped, int *granted,
								 TimestampTz *created_at);

/*
 * The plaintext of a wrapped data key, from the cache or the KMS.  Returns
 * true if it came from the KMS: the caller then checks it against a value's
 * key commitment and only then calls keycache_put(), so a wrong key from a
 * faulty KMS is never cached.  During a KMS outage, a key that expired less
 * than envelope.kms_outage_grace seconds ago is used instead (and logged).
 */
extern bool keycache_unwrap(const KekInfo *kek, const KmsWrapped *wrapped, uint8 *dek);

/* keycache_unwrap(), also giving a fresh hit's expiry (else 0) in *hit_expires. */
extern bool keycache_unwrap_ex(const KekInfo *kek, const KmsWrapped *wrapped,
							   uint8 *dek, TimestampTz *hit_expires);

/* The sweeper's clock, updated about once a second (0 before it ran). */
extern TimestampTz keycache_coarse_clock(void);

/*
 * Pointers to the flush generation (changes whenever keys are flushed or
 * retired on purpose, not on expiry) and the sweeper's clock, for per-use
 * checks.
 */
extern void keycache_watch(pg_atomic_uint64 **generation, pg_atomic_uint64 **coarse_clock);

/* Put an unwrapped, verified data key into the cache (resolves a claim). */
extern void keycache_put(const KekInfo *kek, const KmsWrapped *wrapped, const uint8 *dek);

/* Give up the claim keycache_unwrap() took when the key came from the KMS. */
extern void keycache_abandon(const KekInfo *kek, const KmsWrapped *wrapped);

/*
 * Look up / remember the result of rewrapping a data key to target's
 * current version (per backend); lookup returns false if unknown.
 */
extern bool keycache_rewrap_lookup(const KekInfo *from, const KmsWrapped *wrapped,
								   const KekInfo *target, KmsWrapped *out);
extern void keycache_rewrap_store(const KekInfo *from, const KmsWrapped *wrapped,
								  const KekInfo *target, const KmsWrapped *out);

/* Forget the current encryption data key of a KEK (NULL: all), server-wide. */
extern void keycache_retire_current(const char *kek_name);

/* Wipe all entries, or those of one KEK; returns how many were removed. */
extern int	keycache_flush(const char *kek_name);

extern void keycache_stats(KeyCacheStats *stats);

/*
 * Backend-local front of the cache (keylocal.c): copies of hot keys used
 * with no shared lock.  Checked against the shared cache's generation and
 * their expiry at the first use in each statement and every
 * KEYLOCAL_RECHECK uses, so TTL, flush and retirement take effect for new
 * statements.
 */

/*
 * The state of the data key that unwraps wrapped (local copy, shared cache
 * or KMS).  *from_kms as for keycache_unwrap(): the caller checks the key
 * against the value's commitment and resolves the claim with
 * keycache_put() or keycache_abandon() (state->dek is the key).  The state
 * stays valid until the next call.
 */
extern EnvDekState *keycache_get(const KekInfo *kek, const KmsWrapped *wrapped,
									   bool *from_kms);

/* The same for a key the KMS must unwrap now, bypassing every cache. */
extern EnvDekState *keycache_get_uncached(const KekInfo *kek,
												const KmsWrapped *wrapped);

/*
 * The state of the data key to encrypt the next value under kek, one use
 * consumed; *wrapped points at backend memory valid until the next call.
 */
extern EnvDekState *keycache_current(const KekInfo *kek, KmsWrapped *wrapped);

/* Wipe this backend's local copies (all, or one KEK's). */
extern void keycache_forget_local(void);

#endif							/* ENVELOPE_KEYCACHE_H */

/*-------------------------------------------------------------------------
 *
 * keycache.h
 *		Unwrapped data keys held for a short time, and the current data key
 *		of each KEK for encryption.
 *
 *-------------------------------------------------------------------------
 */
#ifndef ENVELOPE_KEYCACHE_H
#define ENVELOPE_KEYCACHE_H

#include "kek.h"
#include "kms.h"

typedef struct KeyCacheStats
{
	int			entries;
	int			capacity;
	int64		hits;
	int64		misses;
	int64		expirations;
	int64		evictions;
	bool		locked;			/* key memory is locked in RAM */
} KeyCacheStats;

/*
 * The data key to encrypt the next value under kek (one use is consumed),
 * generating a new one through the KMS when the current one is exhausted,
 * too old, or under an older KEK version.  dek receives a copy the caller
 * wipes; wrapped->data is palloc'd.
 */
extern void keycache_current_dek(const KekInfo *kek, uint8 *dek, KmsWrapped *wrapped);

/*
 * The plaintext of a wrapped data key, from the cache or the KMS.  Returns
 * true if it came from the KMS: the caller then checks it against a value's
 * key commitment and only then calls keycache_put(), so a wrong key from a
 * faulty KMS is never cached.
 */
extern bool keycache_unwrap(const KekInfo *kek, const KmsWrapped *wrapped, uint8 *dek);

/*
 * Look up / remember the result of rewrapping a data key to target's
 * current version; lookup returns false if unknown.
 */
extern bool keycache_rewrap_lookup(const KekInfo *from, const KmsWrapped *wrapped,
								   const KekInfo *target, KmsWrapped *out);
extern void keycache_rewrap_store(const KekInfo *from, const KmsWrapped *wrapped,
								  const KekInfo *target, const KmsWrapped *out);

/* Put an unwrapped data key into the cache. */
extern void keycache_put(const KekInfo *kek, const KmsWrapped *wrapped, const uint8 *dek);

/* Forget the current encryption data key of a KEK (after rotation). */
extern void keycache_retire_current(const char *kek_name);

/* Wipe all entries, or those of one KEK; returns how many were removed. */
extern int	keycache_flush(const char *kek_name);

extern void keycache_stats(KeyCacheStats *stats);

#endif							/* ENVELOPE_KEYCACHE_H */

/*-------------------------------------------------------------------------
 *
 * kek.h
 *		The KEK registry: envelope.kek, cached per backend.
 *
 *-------------------------------------------------------------------------
 */
#ifndef ENVELOPE_KEK_H
#define ENVELOPE_KEK_H

#include "format.h"
#include "kms.h"

/* A registered KEK, copied out of the registry. */
typedef struct KekInfo
{
	char		name[NAMEDATALEN];
	char		provider_name[NAMEDATALEN];
	const KmsProvider *provider;
	char		key_ref[ENV_MAX_KEYREF_LEN + 1];
	int32		latest_version;
	int32		min_decryption_version; /* versions below are retired */
} KekInfo;

/* Look up a KEK by name into *out; false (or an error) if it is not registered. */
extern bool kek_lookup(const char *name, KekInfo *out, bool missing_ok);

/* The KEK a value names, checked against the registry (raises on mismatch). */
extern void kek_for_value(const EnvKekRef *ref, KekInfo *out);

/* kek_lookup() as a pointer into the registry, valid until the next lookup. */
extern const KekInfo *kek_find(const char *name);

/*
 * The same as a pointer into the registry (no copy), valid until the next
 * lookup or kek_for_value() call.
 */
extern const KekInfo *kek_of_value(const EnvKekRef *ref);

/* Register the relcache callback that drops the cached registry. */
extern void kek_init(void);

#endif							/* ENVELOPE_KEK_H */

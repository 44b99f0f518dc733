/*-------------------------------------------------------------------------
 *
 * kms.c
 *		Provider lookup and the counted wrappers around provider operations.
 *
 * The counters are server-wide (shmem.c); envelope.cache_stats() reports
 * them.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "envelope.h"
#include "utils/timestamp.h"

#include "crypto.h"
#include "kms.h"
#include "shmem.h"

/* Every provider this build knows; add new ones here. */
static const KmsProvider *const providers[] = {
	&kms_vault_provider,
};

const char *const kms_op_names[KMS_NUM_OPS] = {
	"key_info", "generate", "wrap", "unwrap", "rewrap", "rotate", "configure"
};


/* Find a provider by name; NULL (or an error) if there is none. */
const KmsProvider *
kms_provider(const char *name, bool missing_ok)
{
	for (size_t i = 0; i < lengthof(providers); i++)
		if (strcmp(providers[i]->name, name) == 0)
			return providers[i];
	if (!missing_ok)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("KMS provider \"%s\" does not exist", name),
				 errhint("The providers in this build are: \"vault\".")));
	return NULL;
}

/* KMS calls this backend has made (audit records count them per use). */
uint64		env_backend_kms_calls = 0;

/*
 * Run a provider operation, counting the call and, if it raises, the error.
 * The macro keeps the counting in one place for every operation.
 */
#define COUNTED_CALL(op, call) \
	do { \
		env_count(CNT_KMS_KEY_INFO + (op), 1); \
		env_backend_kms_calls++; \
		PG_TRY(); \
		{ \
			call; \
		} \
		PG_CATCH(); \
		{ \
			env_count(CNT_KMS_ERRORS, 1); \
			env_note_kms_error(); \
			PG_RE_THROW(); \
		} \
		PG_END_TRY(); \
	} while (0)

/* Describe a key. */
void
kms_key_info(const KmsProvider *p, const char *key_ref, KmsKeyInfo *info)
{
	COUNTED_CALL(KMS_OP_KEY_INFO, p->key_info(key_ref, info));
}

/* New data key, in plaintext and wrapped. */
void
kms_generate_dek(const KmsProvider *p, const char *key_ref,
				 uint8 *dek, KmsWrapped *wrapped)
{
	COUNTED_CALL(KMS_OP_GENERATE, p->generate_dek(key_ref, dek, wrapped));
}

/* n new data keys, wrapped in one call where the provider can. */
void
kms_generate_deks(const KmsProvider *p, const char *key_ref, int n,
				  uint8 *deks, KmsWrapped *wrapped)
{
	Assert(n >= 1 && n <= KMS_BATCH_MAX);
	if (n > 1 && p->wrap_batch != NULL)
	{
		env_random_bytes(deks, n * ENV_KEY_LEN);
		COUNTED_CALL(KMS_OP_GENERATE, p->wrap_batch(key_ref, n, deks, wrapped));
		return;
	}
	for (int i = 0; i < n; i++)
		kms_generate_dek(p, key_ref, deks + i * ENV_KEY_LEN, &wrapped[i]);
}

/* Unwrap n data keys, in one call where the provider can. */
void
kms_unwrap_many(const KmsProvider *p, const char *key_ref, int n,
				const KmsWrapped *wrapped, uint8 *deks)
{
	Assert(n >= 1 && n <= KMS_BATCH_MAX);
	if (n > 1 && p->unwrap_batch != NULL)
	{
		COUNTED_CALL(KMS_OP_UNWRAP, p->unwrap_batch(key_ref, n, wrapped, deks));
		return;
	}
	for (int i = 0; i < n; i++)
		kms_unwrap(p, key_ref, &wrapped[i], deks + i * ENV_KEY_LEN);
}

/* Wrap a data key under the latest version. */
void
kms_wrap(const KmsProvider *p, const char *key_ref, const uint8 *dek, KmsWrapped *wrapped)
{
	COUNTED_CALL(KMS_OP_WRAP, p->wrap(key_ref, dek, wrapped));
}

/* Unwrap a data key. */
void
kms_unwrap(const KmsProvider *p, const char *key_ref, const KmsWrapped *wrapped, uint8 *dek)
{
	COUNTED_CALL(KMS_OP_UNWRAP, p->unwrap(key_ref, wrapped, dek));
}

/* Re-wrap under the latest version. */
void
kms_rewrap(const KmsProvider *p, const char *key_ref, const KmsWrapped *in, KmsWrapped *out)
{
	COUNTED_CALL(KMS_OP_REWRAP, p->rewrap(key_ref, in, out));
}

/* Create a new key version. */
void
kms_rotate(const KmsProvider *p, const char *key_ref)
{
	COUNTED_CALL(KMS_OP_ROTATE, p->rotate(key_ref));
}

/* Retire the versions below min_version. */
void
kms_set_min_decryption_version(const KmsProvider *p, const char *key_ref, int32 min_version)
{
	COUNTED_CALL(KMS_OP_CONFIGURE, p->set_min_decryption_version(key_ref, min_version));
}

/*-------------------------------------------------------------------------
 *
 * kms.h
 *		The KMS provider interface.
 *
 * A provider holds key-encryption keys (KEKs) that never leave the KMS and
 * wraps and unwraps 32-byte data keys with them.  A wrapped data key is an
 * opaque byte string plus the KEK version that produced it; the provider
 * alone knows its encoding (Vault: the raw bytes behind "vault:vN:<base64>").
 * Adding a provider (AWS KMS, KMIP) means one new kms_<name>.c implementing
 * KmsProvider and one line in kms.c; the value format, the crypto and the
 * SQL functions do not change.
 *
 * Every operation raises an error on failure, with a clear message that
 * never contains credentials or key bytes.  Callers call the kms_* wrappers
 * below, which count calls and errors, rather than the provider directly.
 *
 *-------------------------------------------------------------------------
 */
#ifndef ENVELOPE_KMS_H
#define ENVELOPE_KMS_H

#include "datatype/timestamp.h"

#include "envelope.h"

/* Most data keys one batched call wraps or unwraps. */
#define KMS_BATCH_MAX	4

/* A data key wrapped by a KEK version; data is palloc'd. */
typedef struct KmsWrapped
{
	int32		version;
	uint8	   *data;
	int			len;
} KmsWrapped;

/* What the KMS says about a key. */
typedef struct KmsKeyInfo
{
	int32		latest_version;
	int32		min_decryption_version;
} KmsKeyInfo;

typedef struct KmsProvider
{
	const char *name;

	/* Describe a key; raises if it does not exist or cannot be used. */
	void		(*key_info) (const char *key_ref, KmsKeyInfo *info);

	/* New random data key, in plaintext and wrapped by the latest version. */
	void		(*generate_dek) (const char *key_ref, uint8 *dek, KmsWrapped *wrapped);

	/* Wrap a data key given in plaintext under the latest version. */
	void		(*wrap) (const char *key_ref, const uint8 *dek, KmsWrapped *wrapped);

	/* Unwrap a data key. */
	void		(*unwrap) (const char *key_ref, const KmsWrapped *wrapped, uint8 *dek);
	/* Optional: wrap n (<= KMS_BATCH_MAX) data keys in one call. */
	void		(*wrap_batch) (const char *key_ref, int n, const uint8 *deks,
							   KmsWrapped *wrapped);
	/* Optional: unwrap n (<= KMS_BATCH_MAX) data keys in one call. */
	void		(*unwrap_batch) (const char *key_ref, int n, const KmsWrapped *wrapped,
								 uint8 *deks);

	/* Re-wrap under the latest version without exposing the data key. */
	void		(*rewrap) (const char *key_ref, const KmsWrapped *in, KmsWrapped *out);

	/* Create a new version of the key. */
	void		(*rotate) (const char *key_ref);

	/* Refuse to decrypt with versions below min_version (retire them). */
	void		(*set_min_decryption_version) (const char *key_ref, int32 min_version);
} KmsProvider;

/* KMS operations, for counting. */
typedef enum KmsOp
{
	KMS_OP_KEY_INFO,
	KMS_OP_GENERATE,
	KMS_OP_WRAP,
	KMS_OP_UNWRAP,
	KMS_OP_REWRAP,
	KMS_OP_ROTATE,
	KMS_OP_CONFIGURE,
	KMS_NUM_OPS
} KmsOp;

extern const char *const kms_op_names[KMS_NUM_OPS];

/* KMS calls made by this backend so far (audit records count them). */
extern uint64 env_backend_kms_calls;

/* Find a provider by name; NULL (or an error) if there is none. */
extern const KmsProvider *kms_provider(const char *name, bool missing_ok);

/* Counted wrappers around the provider operations. */
extern void kms_key_info(const KmsProvider *p, const char *key_ref, KmsKeyInfo *info);
extern void kms_generate_dek(const KmsProvider *p, const char *key_ref,
							 uint8 *dek, KmsWrapped *wrapped);
extern void kms_wrap(const KmsProvider *p, const char *key_ref,
					 const uint8 *dek, KmsWrapped *wrapped);

/*
 * n new data keys (n <= KMS_BATCH_MAX) in deks (n * 32 bytes), wrapped by
 * the latest version: generated here (RAND_bytes) and wrapped in one call
 * where the provider can, else one generate call per key.  Counted as
 * generate calls.
 */
extern void kms_generate_deks(const KmsProvider *p, const char *key_ref, int n,
							  uint8 *deks, KmsWrapped *wrapped);

/* Unwrap n data keys, in one call where the provider can. */
extern void kms_unwrap_many(const KmsProvider *p, const char *key_ref, int n,
							const KmsWrapped *wrapped, uint8 *deks);
extern void kms_unwrap(const KmsProvider *p, const char *key_ref,
					   const KmsWrapped *wrapped, uint8 *dek);
extern void kms_rewrap(const KmsProvider *p, const char *key_ref,
					   const KmsWrapped *in, KmsWrapped *out);
extern void kms_rotate(const KmsProvider *p, const char *key_ref);
extern void kms_set_min_decryption_version(const KmsProvider *p, const char *key_ref,
										   int32 min_version);

/* The providers. */
extern const KmsProvider kms_vault_provider;

#endif							/* ENVELOPE_KMS_H */

/*-------------------------------------------------------------------------
 *
 * format.h
 *		The enc_bytea value layout, version 1 (docs/format.md).
 *
 *-------------------------------------------------------------------------
 */
#ifndef ENVELOPE_FORMAT_H
#define ENVELOPE_FORMAT_H

#define ENV_FORMAT_V1		1
#define ENV_ALGO_AES256GCM_HKDF_SHA256_COMMIT 1	/* read only (0.1.0, 0.2.0) */
#define ENV_ALGO_AES256GCM_AESKDF_COMMIT 2	/* written since 0.3.0 */
#define ENV_ALGO_CURRENT	ENV_ALGO_AES256GCM_AESKDF_COMMIT

#define ENV_SALT_LEN		32
#define ENV_NONCE_LEN		12
#define ENV_COMMIT_LEN		32
#define ENV_TAG_LEN			16

/* Fixed, authenticated header: version .. commitment. */
#define ENV_HEADER_LEN		(1 + 1 + 2 + 8 + ENV_SALT_LEN + ENV_NONCE_LEN + ENV_COMMIT_LEN)

/* Flag bits (header bytes 2-3). */
#define ENV_FLAG_CONTEXT	0x0001	/* a non-empty context was bound */
#define ENV_FLAG_TEXT		0x0002	/* plaintext came from enc(text) */
#define ENV_FLAGS_KNOWN		(ENV_FLAG_CONTEXT | ENV_FLAG_TEXT)

#define ENV_MAX_NAME_LEN	255		/* KEK name and provider name */
#define ENV_MAX_KEYREF_LEN	1024
#define ENV_MAX_WRAPPED_LEN	4096

/*
 * The KEK section: which KEK wraps the data key, and the wrapped key itself.
 * rewrap() replaces this section and nothing else.
 */
typedef struct EnvKekRef
{
	const char *kek_name;		/* registry name (envelope.kek.name) */
	int			kek_name_len;
	const char *provider;		/* provider name, e.g. "vault" */
	int			provider_len;
	const char *key_ref;		/* the key's name in the KMS */
	int			key_ref_len;
	uint32		kek_version;
	const uint8 *wrapped;		/* provider's wrapped data key */
	int			wrapped_len;
} EnvKekRef;

/* A parsed value: pointers into the buffer it was parsed from. */
typedef struct EnvValue
{
	uint8		version;
	uint8		algo;
	uint16		flags;
	int64		created_at;		/* microseconds since 1970-01-01 UTC */
	const uint8 *header;		/* ENV_HEADER_LEN bytes, the AAD prefix */
	const uint8 *salt;
	const uint8 *nonce;
	const uint8 *commit;
	EnvKekRef	kek;
	const uint8 *ciphertext;
	int			ciphertext_len;
	const uint8 *tag;
} EnvValue;

/* Parse a buffer; returns NULL on success or a sentence saying what is wrong. */
extern const char *env_parse(const uint8 *buf, Size len, EnvValue *out);

/* Parse the data of a stored enc_bytea datum, raising XX001 if it is damaged. */
extern void env_parse_datum(struct varlena *datum, EnvValue *out);

/* Size of the KEK section for a given reference. */
extern Size env_kek_section_len(const EnvKekRef *kek);

/* Write the fixed header into dst (ENV_HEADER_LEN bytes). */
extern void env_write_header(uint8 *dst, uint8 algo, uint16 flags, int64 created_at,
							 const uint8 *salt, const uint8 *nonce,
							 const uint8 *commit);

/* Write the KEK section into dst; returns the bytes written. */
extern Size env_write_kek_section(uint8 *dst, const EnvKekRef *kek);

#endif							/* ENVELOPE_FORMAT_H */

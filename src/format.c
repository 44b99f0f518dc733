/*-------------------------------------------------------------------------
 *
 * format.c
 *		The enc_bytea type: its binary layout and its text and wire forms.
 *
 * A value is a varlena whose data is, in order (docs/format.md has the byte
 * table):
 *
 *		header		version, algorithm, flags, created_at, salt, nonce,
 *					key commitment (fixed size; authenticated as GCM AAD)
 *		KEK section	KEK name, provider, key_ref, KEK version, wrapped DEK
 *					(variable size; replaced by rewrap)
 *		ciphertext	AES-256-GCM output, as long as the plaintext
 *		tag			16 bytes
 *
 * The text form is "enc:" followed by the standard base64 of those bytes,
 * and the binary (send/recv) form is the bytes themselves, so COPY, pg_dump
 * and drivers round-trip values exactly.  Every input path validates the
 * whole structure, so the rest of the extension may trust a stored value's
 * lengths; a stored value that fails to parse can only be on-disk damage.
 *
 * The type has no comparison operators on purpose: two encryptions of the
 * same plaintext differ, and equality on ciphertext would mislead.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "common/base64.h"
#include "fmgr.h"
#include "lib/stringinfo.h"
#include "libpq/pqformat.h"
#include "mb/pg_wchar.h"

#include "envelope.h"
#include "format.h"

#define ENV_TEXT_PREFIX		"enc:"
#define ENV_TEXT_PREFIX_LEN	4

PG_FUNCTION_INFO_V1(enc_bytea_in);
PG_FUNCTION_INFO_V1(enc_bytea_out);
PG_FUNCTION_INFO_V1(enc_bytea_recv);
PG_FUNCTION_INFO_V1(enc_bytea_send);

/* Read a big-endian 16-bit integer. */
static inline uint16
get_u16(const uint8 *p)
{
	return (uint16) ((p[0] << 8) | p[1]);
}

/* Read a big-endian 32-bit integer. */
static inline uint32
get_u32(const uint8 *p)
{
	return ((uint32) p[0] << 24) | ((uint32) p[1] << 16) |
		((uint32) p[2] << 8) | (uint32) p[3];
}

/* Write a big-endian 16-bit integer. */
static inline void
put_u16(uint8 *p, uint16 v)
{
	p[0] = (uint8) (v >> 8);
	p[1] = (uint8) v;
}

/* Write a big-endian 32-bit integer. */
static inline void
put_u32(uint8 *p, uint32 v)
{
	p[0] = (uint8) (v >> 24);
	p[1] = (uint8) (v >> 16);
	p[2] = (uint8) (v >> 8);
	p[3] = (uint8) v;
}

/* True if the bytes are printable ASCII with no NUL (names and key refs). */
static bool
valid_name_bytes(const uint8 *p, int len)
{
	for (int i = 0; i < len; i++)
		if (p[i] < 0x20 || p[i] > 0x7e)
			return false;
	return true;
}

/* Parse a buffer; returns NULL on success or a sentence saying what is wrong. */
const char *
env_parse(const uint8 *buf, Size len, EnvValue *out)
{
	const uint8 *p = buf;
	const uint8 *end = buf + len;
	uint64		ts;

	memset(out, 0, sizeof(*out));
	if (len < 1)
		return "The value is empty.";
	out->version = p[0];
	if (out->version != ENV_FORMAT_V1)
		return psprintf("Format version %u is not supported; this build reads version %d.",
						out->version, ENV_FORMAT_V1);
	if (len < ENV_HEADER_LEN)
		return "The value is shorter than its header.";
	out->algo = p[1];
	if (out->algo != ENV_ALGO_AES256GCM_HKDF_SHA256_COMMIT &&
		out->algo != ENV_ALGO_AES256GCM_AESKDF_COMMIT)
		return psprintf("Algorithm %u is not supported.", out->algo);
	out->flags = get_u16(p + 2);
	if (out->flags & ~ENV_FLAGS_KNOWN)
		return "The value has unknown flag bits set.";
	ts = ((uint64) get_u32(p + 4) << 32) | get_u32(p + 8);
	out->created_at = (int64) ts;
	out->header = p;
	p += 12;
	out->salt = p;
	p += ENV_SALT_LEN;
	out->nonce = p;
	p += ENV_NONCE_LEN;
	out->commit = p;
	p += ENV_COMMIT_LEN;

	/* KEK section */
#define NEED(n, what) \
	do { if ((Size) (end - p) < (Size) (n)) return "The value is truncated in its " what "."; } while (0)
	NEED(1, "KEK name");
	out->kek.kek_name_len = *p++;
	NEED(out->kek.kek_name_len, "KEK name");
	if (out->kek.kek_name_len == 0 || !valid_name_bytes(p, out->kek.kek_name_len))
		return "The value's KEK name is not valid.";
	out->kek.kek_name = (const char *) p;
	p += out->kek.kek_name_len;

	NEED(1, "provider name");
	out->kek.provider_len = *p++;
	NEED(out->kek.provider_len, "provider name");
	if (out->kek.provider_len == 0 || !valid_name_bytes(p, out->kek.provider_len))
		return "The value's provider name is not valid.";
	out->kek.provider = (const char *) p;
	p += out->kek.provider_len;

	NEED(2, "key reference");
	out->kek.key_ref_len = get_u16(p);
	p += 2;
	NEED(out->kek.key_ref_len, "key reference");
	if (out->kek.key_ref_len == 0 || out->kek.key_ref_len > ENV_MAX_KEYREF_LEN ||
		!valid_name_bytes(p, out->kek.key_ref_len))
		return "The value's key reference is not valid.";
	out->kek.key_ref = (const char *) p;
	p += out->kek.key_ref_len;

	NEED(4, "KEK version");
	out->kek.kek_version = get_u32(p);
	p += 4;
	if (out->kek.kek_version == 0 || out->kek.kek_version > INT32_MAX)
		return "The value's KEK version is not valid.";

	NEED(2, "wrapped data key");
	out->kek.wrapped_len = get_u16(p);
	p += 2;
	NEED(out->kek.wrapped_len, "wrapped data key");
	if (out->kek.wrapped_len == 0 || out->kek.wrapped_len > ENV_MAX_WRAPPED_LEN)
		return "The value's wrapped data key is not valid.";
	out->kek.wrapped = p;
	p += out->kek.wrapped_len;

	NEED(ENV_TAG_LEN, "authentication tag");
#undef NEED
	out->ciphertext = p;
	out->ciphertext_len = (int) (end - p) - ENV_TAG_LEN;
	out->tag = end - ENV_TAG_LEN;
	return NULL;
}

/* Parse the data of a stored enc_bytea datum, raising XX001 if it is damaged. */
void
env_parse_datum(struct varlena *datum, EnvValue *out)
{
	const char *problem = env_parse((const uint8 *) VARDATA_ANY(datum),
									VARSIZE_ANY_EXHDR(datum), out);

	if (problem)
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("enc_bytea value is corrupted"),
				 errdetail_internal("%s", problem)));
}

/* Size of the KEK section for a given reference. */
Size
env_kek_section_len(const EnvKekRef *kek)
{
	return 1 + kek->kek_name_len + 1 + kek->provider_len +
		2 + kek->key_ref_len + 4 + 2 + kek->wrapped_len;
}

/* Write the fixed header into dst (ENV_HEADER_LEN bytes). */
void
env_write_header(uint8 *dst, uint8 algo, uint16 flags, int64 created_at,
				 const uint8 *salt, const uint8 *nonce, const uint8 *commit)
{
	uint64		ts = (uint64) created_at;

	dst[0] = ENV_FORMAT_V1;
	dst[1] = algo;
	put_u16(dst + 2, flags);
	put_u32(dst + 4, (uint32) (ts >> 32));
	put_u32(dst + 8, (uint32) ts);
	memcpy(dst + 12, salt, ENV_SALT_LEN);
	memcpy(dst + 12 + ENV_SALT_LEN, nonce, ENV_NONCE_LEN);
	memcpy(dst + 12 + ENV_SALT_LEN + ENV_NONCE_LEN, commit, ENV_COMMIT_LEN);
}

/* Write the KEK section into dst; returns the bytes written. */
Size
env_write_kek_section(uint8 *dst, const EnvKekRef *kek)
{
	uint8	   *p = dst;

	Assert(kek->kek_name_len > 0 && kek->kek_name_len <= ENV_MAX_NAME_LEN);
	Assert(kek->provider_len > 0 && kek->provider_len <= ENV_MAX_NAME_LEN);
	Assert(kek->key_ref_len > 0 && kek->key_ref_len <= ENV_MAX_KEYREF_LEN);
	Assert(kek->wrapped_len > 0 && kek->wrapped_len <= ENV_MAX_WRAPPED_LEN);

	*p++ = (uint8) kek->kek_name_len;
	memcpy(p, kek->kek_name, kek->kek_name_len);
	p += kek->kek_name_len;
	*p++ = (uint8) kek->provider_len;
	memcpy(p, kek->provider, kek->provider_len);
	p += kek->provider_len;
	put_u16(p, (uint16) kek->key_ref_len);
	p += 2;
	memcpy(p, kek->key_ref, kek->key_ref_len);
	p += kek->key_ref_len;
	put_u32(p, kek->kek_version);
	p += 4;
	put_u16(p, (uint16) kek->wrapped_len);
	p += 2;
	memcpy(p, kek->wrapped, kek->wrapped_len);
	p += kek->wrapped_len;
	return p - dst;
}

/* Text input: "enc:" followed by base64 of the binary form. */
Datum
enc_bytea_in(PG_FUNCTION_ARGS)
{
	char	   *str = PG_GETARG_CSTRING(0);
	Size		len = strlen(str);
	int			maxlen;
	int			declen;
	bytea	   *result;
	EnvValue	v;
	const char *problem;

	if (len < ENV_TEXT_PREFIX_LEN || strncmp(str, ENV_TEXT_PREFIX, ENV_TEXT_PREFIX_LEN) != 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_TEXT_REPRESENTATION),
				 errmsg("invalid input syntax for type %s", "enc_bytea"),
				 errdetail("Values must start with \"%s\".", ENV_TEXT_PREFIX),
				 errhint("enc_bytea values are made by enc(); to encrypt a literal, call enc('...').")));

	maxlen = pg_b64_dec_len((int) (len - ENV_TEXT_PREFIX_LEN));
	result = (bytea *) palloc(VARHDRSZ + maxlen);
	declen = pg_b64_decode(str + ENV_TEXT_PREFIX_LEN, (int) (len - ENV_TEXT_PREFIX_LEN),
						   VARDATA(result), maxlen);
	if (declen < 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_TEXT_REPRESENTATION),
				 errmsg("invalid input syntax for type %s", "enc_bytea"),
				 errdetail("The text after \"%s\" is not valid base64.", ENV_TEXT_PREFIX)));
	SET_VARSIZE(result, VARHDRSZ + declen);

	problem = env_parse((const uint8 *) VARDATA(result), declen, &v);
	if (problem)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_TEXT_REPRESENTATION),
				 errmsg("invalid input syntax for type %s", "enc_bytea"),
				 errdetail_internal("%s", problem)));
	PG_RETURN_BYTEA_P(result);
}

/* Text output: "enc:" followed by base64 of the binary form. */
Datum
enc_bytea_out(PG_FUNCTION_ARGS)
{
	bytea	   *value = PG_GETARG_BYTEA_PP(0);
	int			len = VARSIZE_ANY_EXHDR(value);
	int			enclen = pg_b64_enc_len(len);
	char	   *result = palloc(ENV_TEXT_PREFIX_LEN + enclen + 1);
	int			n;

	memcpy(result, ENV_TEXT_PREFIX, ENV_TEXT_PREFIX_LEN);
	n = pg_b64_encode(VARDATA_ANY(value), len, result + ENV_TEXT_PREFIX_LEN, enclen);
	if (n < 0)
		elog(ERROR, "could not encode enc_bytea value as base64");
	result[ENV_TEXT_PREFIX_LEN + n] = '\0';
	PG_RETURN_CSTRING(result);
}

/* Binary input: the raw bytes, fully validated. */
Datum
enc_bytea_recv(PG_FUNCTION_ARGS)
{
	StringInfo	buf = (StringInfo) PG_GETARG_POINTER(0);
	int			len = buf->len - buf->cursor;
	bytea	   *result;
	EnvValue	v;
	const char *problem;

	result = (bytea *) palloc(VARHDRSZ + len);
	SET_VARSIZE(result, VARHDRSZ + len);
	pq_copymsgbytes(buf, VARDATA(result), len);

	problem = env_parse((const uint8 *) VARDATA(result), len, &v);
	if (problem)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_BINARY_REPRESENTATION),
				 errmsg("invalid binary representation for type %s", "enc_bytea"),
				 errdetail_internal("%s", problem)));
	PG_RETURN_BYTEA_P(result);
}

/* Binary output: the raw bytes. */
Datum
enc_bytea_send(PG_FUNCTION_ARGS)
{
	bytea	   *value = PG_GETARG_BYTEA_P_COPY(0);

	PG_RETURN_BYTEA_P(value);
}

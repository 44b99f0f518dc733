/*-------------------------------------------------------------------------
 *
 * funcs.c
 *		SQL-facing functions: enc, dec, dec_text, rewrap, metadata, and the
 *		key cache's flush and statistics.
 *
 * enc:	 current DEK of the KEK (keycache) -> fresh salt and nonce ->
 *		 HKDF value key + commitment (crypto) -> AES-256-GCM with AAD =
 *		 header || len(context) || context -> value (format).
 * dec:	 parse -> KEK from the registry, checked against the value ->
 *		 DEK (keycache or KMS) -> value key, commitment compared in constant
 *		 time -> GCM open.  Errors never quote plaintext or key bytes.
 * rewrap: replace the KEK section only; the header, ciphertext and tag are
 *		 copied byte for byte.  The new wrapped key is verified against the
 *		 value's key commitment before it is used.
 *
 * Key material on the stack is wiped on every path, errors included
 * (PG_FINALLY).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "common/base64.h"
#include "common/int.h"
#include "datatype/timestamp.h"
#include "fmgr.h"
#include "funcapi.h"
#include "lib/stringinfo.h"
#include "mb/pg_wchar.h"
#include "utils/builtins.h"
#include "utils/datetime.h"
#include "utils/json.h"
#include "utils/jsonb.h"
#include "utils/timestamp.h"

#include "audit.h"
#include "authz.h"
#include "crypto.h"
#include "envelope.h"
#include "format.h"
#include "kek.h"
#include "keycache.h"
#include "kms.h"
#include "redact.h"
#include "shmem.h"

PG_FUNCTION_INFO_V1(envelope_enc);
PG_FUNCTION_INFO_V1(envelope_enc_text);
PG_FUNCTION_INFO_V1(envelope_dec);
PG_FUNCTION_INFO_V1(envelope_dec_text);
PG_FUNCTION_INFO_V1(envelope_rewrap);
PG_FUNCTION_INFO_V1(envelope_metadata);
PG_FUNCTION_INFO_V1(envelope_cache_flush);
PG_FUNCTION_INFO_V1(envelope_cache_stats);
PG_FUNCTION_INFO_V1(envelope_kek_of);
PG_FUNCTION_INFO_V1(envelope_kek_version_of);
PG_FUNCTION_INFO_V1(envelope_needs_rewrap);

#define UNIX_EPOCH_OFFSET_USECS \
	((int64) (POSTGRES_EPOCH_JDATE - UNIX_EPOCH_JDATE) * USECS_PER_DAY)

/* The KEK named by argument argno, or envelope.default_kek. */
static const KekInfo *
kek_from_arg(FunctionCallInfo fcinfo, int argno)
{
	char	   *name;

	if (PG_NARGS() > argno && !PG_ARGISNULL(argno))
		name = text_to_cstring(PG_GETARG_TEXT_PP(argno));
	else if (envelope_default_kek != NULL && envelope_default_kek[0] != '\0')
		name = envelope_default_kek;
	else
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("no KEK given and envelope.default_kek is not set"),
				 errhint("Pass a KEK name to enc(), or set envelope.default_kek.")));
	return kek_find(name);
}

/* The context argument as bytes (NULL means empty). */
static void
context_arg(FunctionCallInfo fcinfo, int argno, const uint8 **ctx, int *ctx_len)
{
	if (PG_NARGS() > argno && !PG_ARGISNULL(argno))
	{
		bytea	   *c = PG_GETARG_BYTEA_PP(argno);

		*ctx = (const uint8 *) VARDATA_ANY(c);
		*ctx_len = VARSIZE_ANY_EXHDR(c);
	}
	else
	{
		*ctx = NULL;
		*ctx_len = 0;
	}
}

/*
 * The time to record as a value's created_at (microseconds since 1970):
 * the clock, read again at each statement's first value, every 64th, and when
 * the sweeper's clock says a second passed.
 */
static int64
seal_time(void)
{
	static uint64 statement = 0;
	static int	uses = 0;
	static TimestampTz when = 0;

	/* also when a second passed by the sweeper's clock (long statements) */
	if (statement != env_statement_id || ++uses >= 64 || when == 0 ||
		keycache_coarse_clock() >= when + USECS_PER_SEC)
	{
		statement = env_statement_id;
		uses = 0;
		when = GetCurrentTimestamp();
	}
	return when + UNIX_EPOCH_OFFSET_USECS;
}

/* Encrypt len bytes of plaintext into a new enc_bytea value. */
static bytea *
encrypt_value(FunctionCallInfo fcinfo, const uint8 *plaintext, int len, uint16 type_flag)
{
	const KekInfo *kek;
	KmsWrapped	wrapped;
	EnvKekRef	ref;
	EnvDekState *ks;
	const uint8 *ctx;
	int			ctx_len;
	uint8		value_key[ENV_KEY_LEN];
	uint8		fresh[ENV_SALT_LEN + ENV_NONCE_LEN];	/* salt, then nonce */
	uint8	   *salt = fresh;
	uint8	   *nonce = fresh + ENV_SALT_LEN;
	uint8		commit[ENV_COMMIT_LEN];
	Size		total;
	bytea	   *result;
	uint8	   *p;
	uint16		flags;
	uint64		calls_before = env_backend_kms_calls;

	env_require_shared();
	env_redact_note_use();
	kek = kek_from_arg(fcinfo, 1);
	env_authorize(kek, ENV_PRIV_ENCRYPT, kek->latest_version);
	context_arg(fcinfo, 2, &ctx, &ctx_len);
	flags = type_flag | (ctx_len > 0 ? ENV_FLAG_CONTEXT : 0);

	memset(&ref, 0, sizeof(ref));
	ref.kek_name = kek->name;
	ref.kek_name_len = strlen(kek->name);
	ref.provider = kek->provider_name;
	ref.provider_len = strlen(kek->provider_name);
	ref.key_ref = kek->key_ref;
	ref.key_ref_len = strlen(kek->key_ref);

	/* The text form (base64, 4/3 larger) must fit in 1 GB too, for COPY and pg_dump. */
	total = (Size) ENV_HEADER_LEN + 1 + ref.kek_name_len + 1 + ref.provider_len +
		2 + ref.key_ref_len + 4 + 2 + ENV_MAX_WRAPPED_LEN + (Size) len + ENV_TAG_LEN;
	if (total > ((Size) MaxAllocSize - 16) / 4 * 3)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("value is too large to encrypt"),
				 errdetail("The plaintext has %d bytes; enc_bytea values are limited to about 760 MB so that their text form fits in 1 GB.", len)));

	/* The key state stays in the key cache: nothing to wipe if this fails. */
	ks = keycache_current(kek, &wrapped);
	ref.kek_version = (uint32) wrapped.version;
	ref.wrapped = wrapped.data;
	ref.wrapped_len = wrapped.len;
	total = ENV_HEADER_LEN + env_kek_section_len(&ref) + (Size) len + ENV_TAG_LEN;
	result = (bytea *) palloc(VARHDRSZ + total);

	PG_TRY();
	{
		env_fresh_bytes(fresh, sizeof(fresh));
		env_value_key(ks, ENV_ALGO_CURRENT, salt, value_key, commit);

		p = (uint8 *) VARDATA(result);
		env_write_header(p, ENV_ALGO_CURRENT, flags, seal_time(),
						 salt, nonce, commit);
		p += ENV_HEADER_LEN;
		p += env_write_kek_section(p, &ref);
		env_seal(value_key, nonce, (const uint8 *) VARDATA(result), ctx, ctx_len,
				 plaintext, len, p, p + len);
		p += len + ENV_TAG_LEN;
		SET_VARSIZE(result, VARHDRSZ + (p - (uint8 *) VARDATA(result)));
	}
	PG_FINALLY();
	{
		env_wipe(value_key, sizeof(value_key));
	}
	PG_END_TRY();
	env_audit_use(ENV_USE_ENCRYPT, kek->name, (int32) ref.kek_version,
				  (int64) (env_backend_kms_calls - calls_before), NULL, 0);
	return result;
}

/* enc(plaintext bytea, kek text, context bytea) */
Datum
envelope_enc(PG_FUNCTION_ARGS)
{
	bytea	   *pt;

	if (PG_ARGISNULL(0))
		PG_RETURN_NULL();
	pt = PG_GETARG_BYTEA_PP(0);
	PG_RETURN_BYTEA_P(encrypt_value(fcinfo, (const uint8 *) VARDATA_ANY(pt),
									VARSIZE_ANY_EXHDR(pt), 0));
}

/* enc(plaintext text, kek text, context bytea) */
Datum
envelope_enc_text(PG_FUNCTION_ARGS)
{
	text	   *pt;

	if (PG_ARGISNULL(0))
		PG_RETURN_NULL();
	pt = PG_GETARG_TEXT_PP(0);
	PG_RETURN_BYTEA_P(encrypt_value(fcinfo, (const uint8 *) VARDATA_ANY(pt),
									VARSIZE_ANY_EXHDR(pt), ENV_FLAG_TEXT));
}

/* The value's wrapped data key as a KmsWrapped (pointing into the value). */
static void
value_wrapped(const EnvValue *v, KmsWrapped *w)
{
	w->version = (int32) v->kek.kek_version;
	w->data = (uint8 *) v->kek.wrapped;
	w->len = v->kek.wrapped_len;
}

/* Decrypt a value into a new bytea (text and bytea share the layout). */
static bytea *
decrypt_value(FunctionCallInfo fcinfo)
{
	struct varlena *stored = (struct varlena *) PG_GETARG_POINTER(0);
	struct varlena *datum = PG_GETARG_VARLENA_PP(0);
	uint8	   *out;
	EnvValue	v;
	const KekInfo *kek;
	KmsWrapped	wrapped;
	EnvDekState *ks;
	const uint8 *ctx;
	int			ctx_len;
	uint8		value_key[ENV_KEY_LEN];
	uint8		commit[ENV_COMMIT_LEN];
	bytea	   *result;
	bool		claimed;
	volatile bool committed = false;
	volatile bool opened = false;
	volatile bool from_kms = false;
	uint64		calls_before = env_backend_kms_calls;

	env_require_shared();
	env_redact_note_use();
	env_parse_datum(datum, &v);
	context_arg(fcinfo, 1, &ctx, &ctx_len);
	kek = kek_of_value(&v.kek);
	env_authorize(kek, ENV_PRIV_DECRYPT, (int32) v.kek.kek_version);
	value_wrapped(&v, &wrapped);

	/*
	 * A value that was detoasted is a private copy: decrypt it into its own
	 * front (env_open allows the output to start before the input), instead
	 * of writing a second buffer (large values).  A value read straight from
	 * a buffer page gets a new result, and so does every value when
	 * envelope.audit = value (its record fingerprints the stored bytes).
	 */
	if (datum != stored && !VARATT_IS_SHORT(datum) && envelope_audit != ENV_AUDIT_VALUE)
		result = (bytea *) datum;
	else
		result = (bytea *) palloc(VARHDRSZ + v.ciphertext_len);
	out = (uint8 *) VARDATA(result);

	PG_TRY();
	{
		/*
		 * A value on a retired version never uses the cache: the KMS decides
		 * (it refuses, unless the retirement was rolled back there).  This
		 * also holds on a standby, where the trigger that wipes retired keys
		 * from the cache does not run.
		 */
		if ((int32) v.kek.kek_version < kek->min_decryption_version)
			ks = keycache_get_uncached(kek, &wrapped);
		else
		{
			ks = keycache_get(kek, &wrapped, &claimed);
			from_kms = claimed;
		}
		env_value_key(ks, v.algo, v.salt, value_key, commit);
		committed = env_equal_ct(commit, v.commit, ENV_COMMIT_LEN);
		/* Cache a key from the KMS only once the commitment vouches for it. */
		if (from_kms)
		{
			if (committed)
				keycache_put(kek, &wrapped, ks->dek);
			else
				keycache_abandon(kek, &wrapped);
			from_kms = false;
		}
		if (committed)
			opened = env_open(value_key, v.nonce, v.header, ctx, ctx_len,
							  v.ciphertext, v.ciphertext_len, v.tag, out);
	}
	PG_FINALLY();
	{
		env_wipe(value_key, sizeof(value_key));
		if (from_kms)
			keycache_abandon(kek, &wrapped);
	}
	PG_END_TRY();

	if (!committed)
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("could not decrypt value"),
				 errdetail("The key commitment does not match: the value's wrapped data key or salt was modified, or the KMS returned a wrong key.")));
	if (!opened)
	{
		bool		bound = (v.flags & ENV_FLAG_CONTEXT) != 0;

		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("could not decrypt value"),
				 errdetail("Authentication failed: the value was modified, or the context does not match the one it was encrypted with."),
				 (bound && ctx_len == 0) ?
				 errhint("The value was encrypted with a context; pass the same context to dec().") :
				 (!bound && ctx_len > 0) ?
				 errhint("The value was encrypted without a context.") : 0));
	}
	env_audit_use(ENV_USE_DECRYPT, kek->name, (int32) v.kek.kek_version,
				  (int64) (env_backend_kms_calls - calls_before),
				  (Pointer) result == (Pointer) datum ? NULL : VARDATA_ANY(datum),
				  VARSIZE_ANY_EXHDR(datum));
	SET_VARSIZE(result, VARHDRSZ + v.ciphertext_len);
	return result;
}

/* dec(value enc_bytea, context bytea) returns bytea */
Datum
envelope_dec(PG_FUNCTION_ARGS)
{
	if (PG_ARGISNULL(0))
		PG_RETURN_NULL();
	PG_RETURN_BYTEA_P(decrypt_value(fcinfo));
}

/* dec_text(value enc_bytea, context bytea) returns text, checked for encoding */
Datum
envelope_dec_text(PG_FUNCTION_ARGS)
{
	bytea	   *b;

	if (PG_ARGISNULL(0))
		PG_RETURN_NULL();
	b = decrypt_value(fcinfo);

	/* Do not let the encoding error quote the bytes: that would leak plaintext. */
	if (!pg_verifymbstr(VARDATA(b), VARSIZE(b) - VARHDRSZ, true))
	{
		env_wipe(VARDATA(b), VARSIZE(b) - VARHDRSZ);
		ereport(ERROR,
				(errcode(ERRCODE_CHARACTER_NOT_IN_REPERTOIRE),
				 errmsg("decrypted value is not valid text in encoding \"%s\"",
						GetDatabaseEncodingName()),
				 errhint("Use dec() to read the value as bytea.")));
	}
	PG_RETURN_TEXT_P((text *) b);
}

/* Key state for checking commitments while rewrapping (wiped after each use). */
static EnvDekState rewrap_state;

/* A new wrapped form of the value's data key under target's latest version. */
static void
rewrap_key(const EnvValue *v, const KekInfo *from, const KekInfo *target, KmsWrapped *out)
{
	KmsWrapped	in;
	uint8		dek[ENV_KEY_LEN];
	EnvDekState *ks = &rewrap_state;
	uint8		value_key[ENV_KEY_LEN];
	uint8		commit[ENV_COMMIT_LEN];
	volatile bool ok = true;
	volatile bool claimed = false;	/* a cache claim keycache_unwrap() left us */
	bool		same_kek = strcmp(from->name, target->name) == 0;

	value_wrapped(v, &in);
	if (keycache_rewrap_lookup(from, &in, target, out))
		return;

	PG_TRY();
	{
		if (same_kek)
			kms_rewrap(from->provider, from->key_ref, &in, out);
		else
		{
			/* A retired version is the KMS's call, never the cache's. */
			if ((int32) in.version < from->min_decryption_version)
				kms_unwrap(from->provider, from->key_ref, &in, dek);
			else
				claimed = keycache_unwrap(from, &in, dek);

			/* Never wrap a wrong key under the target: check it first. */
			env_dek_state_init(ks, dek);
			env_value_key(ks, v->algo, v->salt, value_key, commit);
			if (!env_equal_ct(commit, v->commit, ENV_COMMIT_LEN))
				ereport(ERROR,
						(errcode(ERRCODE_DATA_CORRUPTED),
						 errmsg("could not rewrap value"),
						 errdetail("The key commitment does not match: the value's wrapped data key or salt was modified, or the KMS returned a wrong key.")));
			if (claimed)
			{
				keycache_put(from, &in, dek);
				claimed = false;
			}
			kms_wrap(target->provider, target->key_ref, dek, out);
		}
		if (out->version < target->latest_version ||
			(same_kek && out->version <= in.version))
			ereport(ERROR,
					(errcode(ERRCODE_PROTOCOL_VIOLATION),
					 errmsg("KMS rewrapped a data key to an unexpected version of key \"%s\"",
							target->key_ref),
					 errdetail("The KMS returned version %d; KEK \"%s\" is at version %d.",
							   out->version, target->name, target->latest_version)));

		/*
		 * Check the new wrapped key against the value's commitment before any
		 * row is written with it: a KMS that returned garbage would otherwise
		 * make values undecryptable.
		 */
		if (envelope_kms_verify)
		{
			kms_unwrap(target->provider, target->key_ref, out, dek);
			env_dek_state_init(ks, dek);
			env_value_key(ks, v->algo, v->salt, value_key, commit);
			ok = env_equal_ct(commit, v->commit, ENV_COMMIT_LEN);
			if (ok)
				keycache_put(target, out, dek);
		}
	}
	PG_FINALLY();
	{
		env_wipe(dek, sizeof(dek));
		env_wipe(value_key, sizeof(value_key));
		env_dek_state_clear(ks);
		if (claimed)
			keycache_abandon(from, &in);
	}
	PG_END_TRY();

	if (!ok)
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("could not verify the rewrapped data key"),
				 errdetail("The new wrapped key does not match the value's key commitment: the value was modified, or the KMS returned a different key. Nothing was changed.")));
	keycache_rewrap_store(from, &in, target, out);
}

/* rewrap(value enc_bytea, kek text) returns enc_bytea */
Datum
envelope_rewrap(PG_FUNCTION_ARGS)
{
	struct varlena *datum;
	EnvValue	v;
	KekInfo		from;
	KekInfo		target;
	KmsWrapped	out;
	EnvKekRef	ref;
	Size		tail;
	Size		total;
	bytea	   *result;
	uint8	   *p;
	uint64		calls_before = env_backend_kms_calls;

	if (PG_ARGISNULL(0))
		PG_RETURN_NULL();
	env_require_shared();
	env_redact_note_use();
	datum = PG_GETARG_VARLENA_PP(0);
	env_parse_datum(datum, &v);
	kek_for_value(&v.kek, &from);
	if (PG_ARGISNULL(1))
		target = from;
	else
		kek_lookup(text_to_cstring(PG_GETARG_TEXT_PP(1)), &target, false);
	env_authorize(&from, ENV_PRIV_REWRAP, (int32) v.kek.kek_version);
	if (strcmp(from.name, target.name) != 0)
	{
		/*
		 * Moving a value to another KEK hands it to whoever may decrypt under
		 * that KEK: it takes decrypt on the source as well as rewrap on both.
		 */
		env_authorize(&from, ENV_PRIV_DECRYPT, (int32) v.kek.kek_version);
		env_authorize(&target, ENV_PRIV_REWRAP, target.latest_version);
	}

	/* Already under the target's latest version: nothing to do. */
	if (strcmp(from.name, target.name) == 0 &&
		(int32) v.kek.kek_version >= target.latest_version)
	{
		env_audit_use(ENV_USE_REWRAP, target.name, (int32) v.kek.kek_version, 0, NULL, 0);
		PG_RETURN_POINTER(PG_DETOAST_DATUM_COPY(PG_GETARG_DATUM(0)));
	}

	rewrap_key(&v, &from, &target, &out);

	memset(&ref, 0, sizeof(ref));
	ref.kek_name = target.name;
	ref.kek_name_len = strlen(target.name);
	ref.provider = target.provider_name;
	ref.provider_len = strlen(target.provider_name);
	ref.key_ref = target.key_ref;
	ref.key_ref_len = strlen(target.key_ref);
	ref.kek_version = (uint32) out.version;
	ref.wrapped = out.data;
	ref.wrapped_len = out.len;

	tail = v.ciphertext_len + ENV_TAG_LEN;
	total = ENV_HEADER_LEN + env_kek_section_len(&ref) + tail;
	result = (bytea *) palloc(VARHDRSZ + total);
	SET_VARSIZE(result, VARHDRSZ + total);
	p = (uint8 *) VARDATA(result);
	memcpy(p, v.header, ENV_HEADER_LEN);
	p += ENV_HEADER_LEN;
	p += env_write_kek_section(p, &ref);
	memcpy(p, v.ciphertext, tail);
	env_audit_use(ENV_USE_REWRAP, target.name, out.version,
				  (int64) (env_backend_kms_calls - calls_before), NULL, 0);
	PG_RETURN_BYTEA_P(result);
}

/* Append "key": "<base64>" to a JSON object under construction. */
static void
json_b64(StringInfo buf, const char *key, const uint8 *data, int len)
{
	int			enclen = pg_b64_enc_len(len);
	char	   *b64 = palloc(enclen + 1);
	int			n = pg_b64_encode((const char *) data, len, b64, enclen);

	b64[n < 0 ? 0 : n] = '\0';
	appendStringInfo(buf, ", \"%s\": \"%s\"", key, b64);
	pfree(b64);
}

/* Append "key": "<string>" with JSON escaping. */
static void
json_str(StringInfo buf, const char *key, const char *s, int len)
{
	appendStringInfo(buf, ", \"%s\": ", key);
	escape_json(buf, pnstrdup(s, len));
}

/* envelope.metadata(enc_bytea) returns jsonb: everything but the ciphertext. */
Datum
envelope_metadata(PG_FUNCTION_ARGS)
{
	struct varlena *datum = PG_GETARG_VARLENA_PP(0);
	EnvValue	v;
	StringInfoData buf;
	struct pg_tm tm;
	fsec_t		fsec;
	Timestamp	ts;

	env_require_shared();
	env_parse_datum(datum, &v);
	initStringInfo(&buf);
	appendStringInfo(&buf, "{\"format_version\": %d", v.version);
	/* env_parse_datum accepted the algorithm: 1 (HKDF-SHA256) or 2 (AES-256). */
	appendStringInfo(&buf, ", \"algorithm\": %d, \"algo\": \"AES-256-GCM\", \"kdf\": \"%s\", \"key_commitment\": true",
					 v.algo,
					 v.algo == ENV_ALGO_AES256GCM_AESKDF_COMMIT ? "AES-256" : "HKDF-SHA256");
	json_str(&buf, "kek_id", v.kek.kek_name, v.kek.kek_name_len);
	json_str(&buf, "kek_provider", v.kek.provider, v.kek.provider_len);
	json_str(&buf, "kek_key_ref", v.kek.key_ref, v.kek.key_ref_len);
	appendStringInfo(&buf, ", \"kek_version\": %u", v.kek.kek_version);
	json_b64(&buf, "wrapped_dek_b64", v.kek.wrapped, v.kek.wrapped_len);
	json_b64(&buf, "salt_b64", v.salt, ENV_SALT_LEN);
	json_b64(&buf, "nonce_b64", v.nonce, ENV_NONCE_LEN);
	json_b64(&buf, "commitment_b64", v.commit, ENV_COMMIT_LEN);
	json_b64(&buf, "auth_tag_b64", v.tag, ENV_TAG_LEN);
	appendStringInfo(&buf, ", \"ciphertext_length\": %d", v.ciphertext_len);
	appendStringInfo(&buf, ", \"context_bound\": %s",
					 (v.flags & ENV_FLAG_CONTEXT) ? "true" : "false");
	appendStringInfo(&buf, ", \"plaintext_type\": \"%s\"",
					 (v.flags & ENV_FLAG_TEXT) ? "text" : "bytea");

	if (!pg_sub_s64_overflow(v.created_at, UNIX_EPOCH_OFFSET_USECS, &ts) &&
		IS_VALID_TIMESTAMP(ts) &&
		timestamp2tm(ts, NULL, &tm, &fsec, NULL, NULL) == 0)
		appendStringInfo(&buf, ", \"created_at\": \"%04d-%02d-%02dT%02d:%02d:%02d.%06dZ\"",
						 tm.tm_year, tm.tm_mon, tm.tm_mday,
						 tm.tm_hour, tm.tm_min, tm.tm_sec, (int) fsec);
	else
		appendStringInfoString(&buf, ", \"created_at\": null");
	appendStringInfoChar(&buf, '}');

	PG_RETURN_DATUM(DirectFunctionCall1(jsonb_in, CStringGetDatum(buf.data)));
}

/* envelope.kek_of(enc_bytea) returns text: the value's KEK name */
Datum
envelope_kek_of(PG_FUNCTION_ARGS)
{
	EnvValue	v;

	env_parse_datum(PG_GETARG_VARLENA_PP(0), &v);
	PG_RETURN_TEXT_P(cstring_to_text_with_len(v.kek.kek_name, v.kek.kek_name_len));
}

/* envelope.kek_version_of(enc_bytea) returns int: the value's KEK version */
Datum
envelope_kek_version_of(PG_FUNCTION_ARGS)
{
	EnvValue	v;

	env_parse_datum(PG_GETARG_VARLENA_PP(0), &v);
	PG_RETURN_INT32((int32) v.kek.kek_version);
}

/*
 * envelope.needs_rewrap(enc_bytea, target text) returns bool: true if the
 * value is not on the latest version of its KEK, or, with a target, not on
 * the latest version of the target.  No KMS call; reads the registry.
 */
Datum
envelope_needs_rewrap(PG_FUNCTION_ARGS)
{
	EnvValue	v;
	KekInfo		target;
	char	   *name;

	if (PG_ARGISNULL(0))
		PG_RETURN_NULL();
	env_require_shared();
	env_parse_datum(PG_GETARG_VARLENA_PP(0), &v);
	if (PG_ARGISNULL(1))
		name = pnstrdup(v.kek.kek_name, v.kek.kek_name_len);
	else
		name = text_to_cstring(PG_GETARG_TEXT_PP(1));
	kek_lookup(name, &target, false);
	PG_RETURN_BOOL(strlen(target.name) != (size_t) v.kek.kek_name_len ||
				   memcmp(target.name, v.kek.kek_name, v.kek.kek_name_len) != 0 ||
				   (int32) v.kek.kek_version < target.latest_version);
}

/* envelope.cache_flush(kek text) returns int: entries wiped */
Datum
envelope_cache_flush(PG_FUNCTION_ARGS)
{
	char	   *kek = PG_ARGISNULL(0) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(0));

	env_require_shared();
	env_require_admin("flush the key cache");
	keycache_forget_local();
	PG_RETURN_INT32(keycache_flush(kek));
}

/* envelope.cache_stats() returns one row of server-wide counters. */
Datum
envelope_cache_stats(PG_FUNCTION_ARGS)
{
	TupleDesc	tupdesc;
	Datum		values[19];
	bool		nulls[19];
	KeyCacheStats st;
	int			i = 0;

	env_require_shared();
	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");
	keycache_stats(&st);
	memset(nulls, 0, sizeof(nulls));
	values[i++] = Int32GetDatum(st.entries);
	values[i++] = Int32GetDatum(st.capacity);
	values[i++] = Int64GetDatum((int64) env_counter(CNT_HITS));
	values[i++] = Int64GetDatum((int64) env_counter(CNT_MISSES));
	values[i++] = Int64GetDatum((int64) env_counter(CNT_EXPIRATIONS));
	values[i++] = Int64GetDatum((int64) env_counter(CNT_EVICTIONS));
	values[i++] = Int64GetDatum((int64) env_counter(CNT_STALE_USES));
	for (int op = 0; op < KMS_NUM_OPS; op++)
		values[i++] = Int64GetDatum((int64) env_counter(CNT_KMS_KEY_INFO + op));
	values[i++] = Int64GetDatum((int64) env_counter(CNT_KMS_RETRIES));
	values[i++] = Int64GetDatum((int64) env_counter(CNT_KMS_ERRORS));
	nulls[i] = env_last_kms_error() == 0;
	values[i] = TimestampTzGetDatum(env_last_kms_error());
	i++;
	values[i++] = Int64GetDatum((int64) env_counter(CNT_KMS_CONNECTIONS));
	values[i++] = BoolGetDatum(st.locked);
	Assert(i == tupdesc->natts);
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls)));
}

/*-------------------------------------------------------------------------
 *
 * kms_vault.c
 *		KMS provider for HashiCorp Vault and OpenBao Transit.
 *
 * Endpoints (relative to <envelope.vault_addr>/v1/<envelope.vault_mount>/):
 *		GET  keys/:name					key_info
 *		POST datakey/plaintext/:name	generate_dek (plaintext + wrapped)
 *		POST encrypt/:name				wrap (move a data key to another KEK);
 *										with batch_input: wrap_batch (new data keys)
 *		POST decrypt/:name				unwrap; with batch_input: unwrap_batch
 *		POST rewrap/:name				rewrap to the latest version
 *		POST keys/:name/rotate			rotate
 *		POST keys/:name/config			set_min_decryption_version
 *
 * Vault's ciphertext "vault:v<N>:<base64>" is stored in values as the KEK
 * version N plus the raw bytes behind the base64, and rebuilt for each call.
 * Storing the raw bytes makes values smaller and makes every stored byte
 * significant: a changed version or byte makes Vault's authenticated
 * decryption fail instead of being silently normalised.
 *
 * Connect errors, HTTP 429 and 5xx are retried envelope.kms_retries times
 * with exponential backoff and jitter; the waits are interruptible, so
 * statement_timeout bounds the whole call.
 *
 * The token is read from the file named by envelope.vault_token_file at each
 * call (so a rotated token is picked up without a reload), sent only in the
 * X-Vault-Token header, and wiped afterwards.  No message ever includes it.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <fcntl.h>
#include <unistd.h>

#include "common/base64.h"
#include "common/pg_prng.h"
#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "storage/latch.h"
#include "mb/pg_wchar.h"
#include "utils/builtins.h"
#include "utils/timestamp.h"

#include "crypto.h"
#include "envelope.h"
#include "format.h"
#include "http.h"
#include "jsonx.h"
#include "kms.h"
#include "shmem.h"

#define VAULT_PREFIX		"vault:v"
#define VAULT_MAX_TOKEN		4096
#define VAULT_ERROR_MAX		200

/* One call's answer: HTTP status and the extracted fields. */
typedef struct VaultAnswer
{
	long		status;
	JsonxField	fields[KMS_BATCH_MAX + 2];	/* caller's fields, then "errors.0" last */
	int			nfields;
} VaultAnswer;

/* Reject key names that could change the request path. */
static void
check_key_ref(const char *key_ref)
{
	if (key_ref[0] == '\0' || strcmp(key_ref, ".") == 0 || strcmp(key_ref, "..") == 0 ||
		strspn(key_ref, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-") != strlen(key_ref))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid Vault key name \"%s\"", key_ref),
				 errdetail("Vault Transit key names used by envelope consist of letters, digits, \"_\", \".\" and \"-\".")));
}

/* Read the token from envelope.vault_token_file into a palloc'd string. */
static char *
read_token(void)
{
	char	   *buf;
	int			fd;
	ssize_t		n;
	int			len;

	if (envelope_vault_token_file == NULL || envelope_vault_token_file[0] == '\0')
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("envelope.vault_token_file is not set"),
				 errhint("Set envelope.vault_token_file to a file, readable by the server, that holds the Vault token.")));

	fd = open(envelope_vault_token_file, O_RDONLY | PG_BINARY, 0);
	if (fd < 0)
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not open Vault token file \"%s\": %m", envelope_vault_token_file)));
	buf = palloc0(VAULT_MAX_TOKEN + 1);
	n = read(fd, buf, VAULT_MAX_TOKEN + 1);
	close(fd);
	if (n < 0)
	{
		pfree(buf);
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not read Vault token file \"%s\": %m", envelope_vault_token_file)));
	}
	if (n > VAULT_MAX_TOKEN)
	{
		env_wipe(buf, VAULT_MAX_TOKEN + 1);
		pfree(buf);
		ereport(ERROR,
				(errcode(ERRCODE_CONFIG_FILE_ERROR),
				 errmsg("Vault token file \"%s\" is too large", envelope_vault_token_file)));
	}
	len = (int) n;
	while (len > 0 && (buf[len - 1] == '\n' || buf[len - 1] == '\r' ||
					   buf[len - 1] == ' ' || buf[len - 1] == '\t'))
		buf[--len] = '\0';
	if (len == 0 || strpbrk(buf, "\r\n") != NULL)
	{
		env_wipe(buf, VAULT_MAX_TOKEN + 1);
		pfree(buf);
		ereport(ERROR,
				(errcode(ERRCODE_CONFIG_FILE_ERROR),
				 errmsg("Vault token file \"%s\" does not hold a token", envelope_vault_token_file),
				 errdetail("The file must contain the token on a single line.")));
	}
	return buf;
}

/* The first error string of an answer (not NULL), shortened. */
static const char *
answer_error_text(const VaultAnswer *a)
{
	const char *e = a->fields[a->nfields - 1].value;

	char	   *t;
	int			len = strlen(e);

	if (len > VAULT_ERROR_MAX)
		len = pg_mbcliplen(e, len, VAULT_ERROR_MAX);
	t = pnstrdup(e, len);
	/* The detail adds its own period. */
	while (len > 0 && (t[len - 1] == '.' || t[len - 1] == ' '))
		t[--len] = '\0';
	return t;
}

/* "Vault answered HTTP n: message." or "Vault answered HTTP n." */
static int
answer_detail(const VaultAnswer *a)
{
	const char *e = a->fields[a->nfields - 1].value;

	if (e == NULL || e[0] == '\0')
		return errdetail("Vault answered HTTP %ld.", a->status);
	return errdetail("Vault answered HTTP %ld: %s.", a->status, answer_error_text(a));
}

/* True if the answer's error text contains needle. */
static bool
answer_error_has(const VaultAnswer *a, const char *needle)
{
	const char *e = a->fields[a->nfields - 1].value;

	return e != NULL && strstr(e, needle) != NULL;
}

/* Raise the error for a non-success answer. */
static void
vault_fail(const VaultAnswer *a, const char *key_ref, int32 version)
{
	long		st = a->status;

	if (st == 401 || st == 403)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION),
				 errmsg("KMS denied access to key \"%s\"", key_ref),
				 answer_detail(a),
				 errhint("Check the token in the file named by envelope.vault_token_file and its Vault policy.")));
	if (st == 404 || (st == 400 && answer_error_has(a, "not found")))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("key \"%s\" does not exist in the KMS", key_ref),
				 answer_detail(a)));
	if (st == 400 && answer_error_has(a, "disallowed by policy"))
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("version %d of KMS key \"%s\" is retired", version, key_ref),
				 answer_detail(a),
				 errhint("The KMS's minimum decryption version is above this value's KEK version; it can only be read after lowering min_decryption_version.")));
	if (st == 400 && (answer_error_has(a, "authentication failed") ||
					  answer_error_has(a, "invalid ciphertext") ||
					  answer_error_has(a, "invalid key version")))
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("KMS could not unwrap the data key with version %d of key \"%s\"", version, key_ref),
				 answer_detail(a),
				 errhint("The wrapped data key stored in the value was modified or belongs to another key.")));
	if (st == 429 || st >= 500)
		ereport(ERROR,
				(errcode(ERRCODE_CONNECTION_FAILURE),
				 errmsg("KMS is unavailable"),
				 answer_detail(a)));
	ereport(ERROR,
			(errcode(ERRCODE_EXTERNAL_ROUTINE_EXCEPTION),
			 errmsg("KMS request for key \"%s\" failed", key_ref),
			 answer_detail(a)));
}

/*
 * Sleep before retry number attempt+1: exponential backoff from 100 ms,
 * capped at 2 s, with jitter (a random time between half and all of it).
 * The wait ends early on any interrupt, so statement_timeout and cancel
 * bound the whole retry loop.
 */
static void
backoff_sleep(int attempt)
{
	long		delay_ms = Min(2000L, 100L << Min(attempt, 5));
	TimestampTz end;

	delay_ms = delay_ms / 2 + (long) (pg_prng_double(&pg_global_prng_state) * (delay_ms / 2));
	end = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), delay_ms);
	for (;;)
	{
		long		remaining = TimestampDifferenceMilliseconds(GetCurrentTimestamp(), end);

		CHECK_FOR_INTERRUPTS();
		if (remaining <= 0)
			break;
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 remaining, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}
}

static void vault_malformed(const char *key_ref, const char *detail) pg_attribute_noreturn();

/* Raise "malformed answer" with a detail sentence. */
static void
vault_malformed(const char *key_ref, const char *detail)
{
	ereport(ERROR,
			(errcode(ERRCODE_PROTOCOL_VIOLATION),
			 errmsg("KMS returned a malformed answer for key \"%s\"", key_ref),
			 errdetail_internal("%s", detail)));
}

/* Buffers of one call that may hold secrets, wiped whatever happens. */
typedef struct VaultSecrets
{
	char	   *token;
	char	   *token_header;
	Size		token_header_len;
} VaultSecrets;

/*
 * Send one request (with retries) and extract the answer's fields; returns
 * the extraction problem, if any.  Separate from vault_call() so that the
 * latter's PG_TRY block stays trivial.
 */
static pg_noinline const char *
vault_exchange(const char *method, const char *op, const char *key_ref, const char *suffix,
			   StringInfo body, const char *const *paths, int npaths,
			   VaultAnswer *a, VaultSecrets *sec, HttpResponse *resp)
{
	HttpRequest req;
	HttpError	herr;
	StringInfoData url;
	bool		ok = false;
	int			addrlen;

	check_key_ref(key_ref);
	if (envelope_vault_addr == NULL || envelope_vault_addr[0] == '\0')
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("envelope.vault_addr is not set"),
				 errhint("Set envelope.vault_addr to the Vault server's address, for example \"https://vault.example.com:8200\".")));

	addrlen = strlen(envelope_vault_addr);
	while (addrlen > 0 && envelope_vault_addr[addrlen - 1] == '/')
		addrlen--;
	initStringInfo(&url);
	appendStringInfo(&url, "%.*s/v1/%s/%s/%s%s", addrlen, envelope_vault_addr,
					 envelope_vault_mount, op, key_ref, suffix ? suffix : "");

	/* Build the header in one exact-size buffer: no partial copies. */
	sec->token = read_token();
	sec->token_header_len = strlen("X-Vault-Token: ") + strlen(sec->token) + 1;
	sec->token_header = palloc(sec->token_header_len);
	snprintf(sec->token_header, sec->token_header_len, "X-Vault-Token: %s", sec->token);

	memset(&req, 0, sizeof(req));
	req.method = method;
	req.url = url.data;
	req.body = body ? body->data : NULL;
	req.body_len = body ? body->len : 0;
	req.ca_file = envelope_vault_ca_file;
	req.timeout_ms = envelope_kms_timeout;
	req.headers[req.nheaders++] = sec->token_header;
	req.headers[req.nheaders++] = "Content-Type: application/json";
	if (envelope_vault_namespace && envelope_vault_namespace[0])
		req.headers[req.nheaders++] = psprintf("X-Vault-Namespace: %s", envelope_vault_namespace);

	for (int attempt = 0;; attempt++)
	{
		bool		retry;

		ok = http_try(&req, resp, &herr);
		retry = ok ? (resp->status == 429 || resp->status >= 500) : http_error_retryable(&herr);
		if (!retry || attempt >= envelope_kms_retries)
			break;
		env_count(CNT_KMS_RETRIES, 1);
		http_wipe();
		backoff_sleep(attempt);
	}
	if (!ok)
		http_raise(&herr, &req);

	a->status = resp->status;
	for (int i = 0; i < npaths; i++)
		a->fields[i].path = paths[i];
	a->fields[npaths].path = "errors.0";
	a->nfields = npaths + 1;
	return jsonx_extract(resp->body, resp->body_len, a->fields, a->nfields);
}

/* Wipe what one call may have left: answer buffer, token, request body. */
static void
wipe_call(VaultSecrets *sec, StringInfo body)
{
	http_wipe();
	if (sec->token)
		env_wipe(sec->token, strlen(sec->token));
	if (sec->token_header)
		env_wipe(sec->token_header, sec->token_header_len);
	if (body)
		env_wipe(body->data, body->len);
}

/*
 * Call Vault: method on <mount>/<op>/<key_ref><suffix> with an optional JSON
 * body.  paths names the fields to extract; on a 2xx answer they are in
 * a->fields, on anything else the call raises.  The body (which may hold a
 * data key), the token and the answer buffer are wiped on every path.
 */
static void
vault_call(const char *method, const char *op, const char *key_ref, const char *suffix,
		   StringInfo body, const char *const *paths, int npaths,
		   int32 version, VaultAnswer *a)
{
	VaultSecrets sec;
	HttpResponse resp;
	const char *volatile problem = NULL;

	Assert(npaths < lengthof(a->fields));
	memset(a, 0, sizeof(*a));
	memset(&sec, 0, sizeof(sec));
	memset(&resp, 0, sizeof(resp));

	PG_TRY();
	{
		problem = vault_exchange(method, op, key_ref, suffix, body, paths, npaths,
								 a, &sec, &resp);
	}
	PG_CATCH();
	{
		wipe_call(&sec, body);
		PG_RE_THROW();
	}
	PG_END_TRY();
	wipe_call(&sec, body);

	if (a->status < 200 || a->status > 299)
	{
		if (problem)
			a->fields[npaths].value = NULL;
		vault_fail(a, key_ref, version);
	}
	if (problem && resp.body_len > 0)
		vault_malformed(key_ref, problem);
}

/* Field i of an answer as a string; raises if it is missing. */
static const char *
answer_string(VaultAnswer *a, int i, const char *key_ref)
{
	if (a->fields[i].value == NULL || !a->fields[i].is_string)
	{
		const char *path = a->fields[i].path;

		jsonx_wipe(a->fields, a->nfields);
		vault_malformed(key_ref, psprintf("The answer has no string \"%s\".", path));
	}
	return a->fields[i].value;
}

/* Field i of an answer as a positive int32; raises if it is missing. */
static int32
answer_int(VaultAnswer *a, int i, const char *key_ref)
{
	const char *v = a->fields[i].value;
	char	   *end;
	long		n;

	if (v == NULL)
		vault_malformed(key_ref, psprintf("The answer has no \"%s\".", a->fields[i].path));
	errno = 0;
	n = strtol(v, &end, 10);
	if (errno != 0 || *end != '\0' || n < 0 || n > PG_INT32_MAX)
		vault_malformed(key_ref, psprintf("The answer's \"%s\" is not a valid version.", a->fields[i].path));
	return (int32) n;
}

/* Parse "vault:v<N>:<base64>" into a KmsWrapped. */
static void
parse_ciphertext(const char *s, const char *key_ref, KmsWrapped *out)
{
	const char *p;
	char	   *end;
	long		version;
	int			b64len;
	int			maxlen;

	if (strncmp(s, VAULT_PREFIX, strlen(VAULT_PREFIX)) != 0)
		vault_malformed(key_ref, "The ciphertext does not start with \"vault:v\".");
	p = s + strlen(VAULT_PREFIX);
	errno = 0;
	version = strtol(p, &end, 10);
	if (errno != 0 || end == p || *end != ':' || version < 1 || version > PG_INT32_MAX)
		vault_malformed(key_ref, "The ciphertext has no valid key version.");
	p = end + 1;
	b64len = strlen(p);
	if (b64len == 0 || b64len > 4 * ENV_MAX_WRAPPED_LEN)
		vault_malformed(key_ref, "The ciphertext has an invalid length.");
	maxlen = pg_b64_dec_len(b64len);
	out->data = palloc(maxlen);
	out->len = pg_b64_decode(p, b64len, (char *) out->data, maxlen);
	if (out->len <= 0 || out->len > ENV_MAX_WRAPPED_LEN)
		vault_malformed(key_ref, "The ciphertext is not valid base64.");
	out->version = (int32) version;
}

/* Build "vault:v<N>:<base64>" for a wrapped key, appended as a JSON string. */
static void
append_ciphertext(StringInfo buf, const KmsWrapped *w)
{
	int			enclen = pg_b64_enc_len(w->len);
	char	   *b64 = palloc(enclen + 1);
	int			n = pg_b64_encode((const char *) w->data, w->len, b64, enclen);

	if (n < 0)
		elog(ERROR, "could not encode wrapped data key");
	b64[n] = '\0';
	appendStringInfo(buf, "\"%s%d:%s\"", VAULT_PREFIX, w->version, b64);
	pfree(b64);
}

/* Decode a base64 data key into dek; raises unless it is exactly 32 bytes. */
static void
decode_dek(const char *b64, const char *key_ref, uint8 *dek)
{
	char		buf[64];
	int			len = strlen(b64);
	int			n;

	if (len > 60)
		vault_malformed(key_ref, "The data key has the wrong length.");
	n = pg_b64_decode(b64, len, buf, sizeof(buf));
	if (n != ENV_KEY_LEN)
	{
		env_wipe(buf, sizeof(buf));
		vault_malformed(key_ref, "The data key has the wrong length.");
	}
	memcpy(dek, buf, ENV_KEY_LEN);
	env_wipe(buf, sizeof(buf));
}

/* key_info: GET keys/:name */
static void
vault_key_info(const char *key_ref, KmsKeyInfo *info)
{
	static const char *const paths[] = {"data.latest_version", "data.min_decryption_version"};
	VaultAnswer a;

	vault_call("GET", "keys", key_ref, NULL, NULL, paths, 2, 0, &a);
	info->latest_version = answer_int(&a, 0, key_ref);
	info->min_decryption_version = a.fields[1].value ? answer_int(&a, 1, key_ref) : 1;
	if (info->latest_version < 1)
		vault_malformed(key_ref, "The key's latest version is not positive.");
	jsonx_wipe(a.fields, a.nfields);
}

/* generate_dek: POST datakey/plaintext/:name */
static void
vault_generate_dek(const char *key_ref, uint8 *dek, KmsWrapped *wrapped)
{
	static const char *const paths[] = {"data.plaintext", "data.ciphertext"};
	VaultAnswer a;
	StringInfoData body;

	initStringInfo(&body);
	appendStringInfoString(&body, "{\"bits\": 256}");
	vault_call("POST", "datakey/plaintext", key_ref, NULL, &body, paths, 2, 0, &a);
	PG_TRY();
	{
		decode_dek(answer_string(&a, 0, key_ref), key_ref, dek);
		parse_ciphertext(answer_string(&a, 1, key_ref), key_ref, wrapped);
	}
	PG_FINALLY();
	{
		jsonx_wipe(a.fields, a.nfields);
	}
	PG_END_TRY();
}

/* wrap: POST encrypt/:name with the data key as plaintext */
static void
vault_wrap(const char *key_ref, const uint8 *dek, KmsWrapped *wrapped)
{
	static const char *const paths[] = {"data.ciphertext"};
	VaultAnswer a;
	StringInfoData body;
	char		b64[64];
	int			n;

	n = pg_b64_encode((const char *) dek, ENV_KEY_LEN, b64, sizeof(b64) - 1);
	if (n < 0)
		elog(ERROR, "could not encode data key");
	b64[n] = '\0';
	initStringInfo(&body);
	appendStringInfo(&body, "{\"plaintext\": \"%s\"}", b64);
	env_wipe(b64, sizeof(b64));
	vault_call("POST", "encrypt", key_ref, NULL, &body, paths, 1, 0, &a);
	parse_ciphertext(answer_string(&a, 0, key_ref), key_ref, wrapped);
	jsonx_wipe(a.fields, a.nfields);
}

/*
 * wrap_batch: POST encrypt/:name with batch_input, one item per data key;
 * every item must come back with its ciphertext (an item's error makes the
 * answer malformed for us, and nothing is used).
 */
static void
vault_wrap_batch(const char *key_ref, int n, const uint8 *deks, KmsWrapped *wrapped)
{
	const char *paths[KMS_BATCH_MAX] = {0};
	VaultAnswer a;
	StringInfoData body;
	char		b64[64];

	initStringInfo(&body);
	appendStringInfoString(&body, "{\"batch_input\": [");
	for (int i = 0; i < n; i++)
	{
		int			len = pg_b64_encode((const char *) deks + i * ENV_KEY_LEN, ENV_KEY_LEN,
										b64, sizeof(b64) - 1);

		if (len < 0)
			elog(ERROR, "could not encode data key");
		b64[len] = '\0';
		appendStringInfo(&body, "%s{\"plaintext\": \"%s\"}", i ? ", " : "", b64);
		paths[i] = psprintf("data.batch_results.%d.ciphertext", i);
	}
	env_wipe(b64, sizeof(b64));
	appendStringInfoString(&body, "]}");
	vault_call("POST", "encrypt", key_ref, NULL, &body, paths, n, 0, &a);
	for (int i = 0; i < n; i++)
		parse_ciphertext(answer_string(&a, i, key_ref), key_ref, &wrapped[i]);
	jsonx_wipe(a.fields, a.nfields);
}

/* unwrap_batch: POST decrypt/:name with batch_input. */
static void
vault_unwrap_batch(const char *key_ref, int n, const KmsWrapped *wrapped, uint8 *deks)
{
	const char *paths[KMS_BATCH_MAX] = {0};
	VaultAnswer a;
	StringInfoData body;

	initStringInfo(&body);
	appendStringInfoString(&body, "{\"batch_input\": [");
	for (int i = 0; i < n; i++)
	{
		appendStringInfoString(&body, i ? ", {\"ciphertext\": " : "{\"ciphertext\": ");
		append_ciphertext(&body, &wrapped[i]);
		appendStringInfoChar(&body, '}');
		paths[i] = psprintf("data.batch_results.%d.plaintext", i);
	}
	appendStringInfoString(&body, "]}");
	vault_call("POST", "decrypt", key_ref, NULL, &body, paths, n, wrapped[0].version, &a);
	PG_TRY();
	{
		for (int i = 0; i < n; i++)
			decode_dek(answer_string(&a, i, key_ref), key_ref, deks + i * ENV_KEY_LEN);
	}
	PG_FINALLY();
	{
		jsonx_wipe(a.fields, a.nfields);
	}
	PG_END_TRY();
}

/* unwrap: POST decrypt/:name */
static void
vault_unwrap(const char *key_ref, const KmsWrapped *wrapped, uint8 *dek)
{
	static const char *const paths[] = {"data.plaintext"};
	VaultAnswer a;
	StringInfoData body;

	initStringInfo(&body);
	appendStringInfoString(&body, "{\"ciphertext\": ");
	append_ciphertext(&body, wrapped);
	appendStringInfoChar(&body, '}');
	vault_call("POST", "decrypt", key_ref, NULL, &body, paths, 1, wrapped->version, &a);
	PG_TRY();
	{
		decode_dek(answer_string(&a, 0, key_ref), key_ref, dek);
	}
	PG_FINALLY();
	{
		jsonx_wipe(a.fields, a.nfields);
	}
	PG_END_TRY();
}

/* rewrap: POST rewrap/:name */
static void
vault_rewrap(const char *key_ref, const KmsWrapped *in, KmsWrapped *out)
{
	static const char *const paths[] = {"data.ciphertext"};
	VaultAnswer a;
	StringInfoData body;

	initStringInfo(&body);
	appendStringInfoString(&body, "{\"ciphertext\": ");
	append_ciphertext(&body, in);
	appendStringInfoChar(&body, '}');
	vault_call("POST", "rewrap", key_ref, NULL, &body, paths, 1, in->version, &a);
	parse_ciphertext(answer_string(&a, 0, key_ref), key_ref, out);
	jsonx_wipe(a.fields, a.nfields);
}

/* rotate: POST keys/:name/rotate */
static void
vault_rotate(const char *key_ref)
{
	VaultAnswer a;
	StringInfoData body;

	initStringInfo(&body);
	appendStringInfoString(&body, "{}");
	vault_call("POST", "keys", key_ref, "/rotate", &body, NULL, 0, 0, &a);
	jsonx_wipe(a.fields, a.nfields);
}

/* set_min_decryption_version: POST keys/:name/config */
static void
vault_set_min_decryption_version(const char *key_ref, int32 min_version)
{
	VaultAnswer a;
	StringInfoData body;

	initStringInfo(&body);
	appendStringInfo(&body, "{\"min_decryption_version\": %d}", min_version);
	vault_call("POST", "keys", key_ref, "/config", &body, NULL, 0, 0, &a);
	jsonx_wipe(a.fields, a.nfields);
}

const KmsProvider kms_vault_provider = {
	.name = "vault",
	.key_info = vault_key_info,
	.generate_dek = vault_generate_dek,
	.wrap = vault_wrap,
	.unwrap = vault_unwrap,
	.wrap_batch = vault_wrap_batch,
	.unwrap_batch = vault_unwrap_batch,
	.rewrap = vault_rewrap,
	.rotate = vault_rotate,
	.set_min_decryption_version = vault_set_min_decryption_version,
};

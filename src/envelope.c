/*-------------------------------------------------------------------------
 *
 * envelope.c
 *		Module load: settings (GUCs) and subsystem initialisation.
 *
 * envelope seals column values with AES-256-GCM under per-value keys
 * derived from data keys (DEKs) that a KMS wraps with key-encryption keys
 * (KEKs) that never leave it.  The subsystems, one file each:
 *		format.c	the enc_bytea type and its byte layout
 *		crypto.c	AES-256-GCM, HKDF, key commitment (OpenSSL)
 *		keycache.c	unwrapped data keys, held briefly in locked memory
 *		kek.c		the KEK registry and its management functions
 *		kms.c		provider dispatch; kms_vault.c the Vault/OpenBao provider
 *		http.c		interruptible keep-alive HTTPS (libcurl); jsonx.c JSON
 *		funcs.c		enc, dec, dec_text, rewrap, metadata, cache functions
 *		shmem.c		shared memory and locks; sweeper.c expiry worker
 *		authz.c		per-KEK privileges, checked on every key use
 *		audit.c		audit records (HMAC-chained) and the statement hooks
 *		redact.c	the emit_log_hook that keeps plaintext out of the log
 *
 * Settings that name credentials are superuser-only; KMS settings reload
 * with SIGHUP.  The library must be in shared_preload_libraries: the key
 * cache lives in shared memory.  Loaded otherwise (CREATE EXTENSION, or a
 * dump restored into a server without it), only the type's input and output
 * work; every function raises 55000 with a hint.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <curl/curl.h>

#include "fmgr.h"
#include "miscadmin.h"
#include "utils/guc.h"

#include "audit.h"
#include "crypto.h"
#include "envelope.h"
#include "redact.h"
#include "kek.h"
#include "shmem.h"

PG_MODULE_MAGIC;

/* Settings. */
char	   *envelope_default_kek = NULL;
char	   *envelope_vault_addr = NULL;
char	   *envelope_vault_token_file = NULL;
char	   *envelope_vault_ca_file = NULL;
char	   *envelope_vault_namespace = NULL;
char	   *envelope_vault_mount = NULL;
int			envelope_kms_timeout = 5000;
int			envelope_cache_ttl = 60;
int			envelope_cache_size = 1024;
int			envelope_dek_max_uses = 100000;
int			envelope_dek_max_age = 300;
bool		envelope_kms_verify = true;
int			envelope_kms_retries = 2;
int			envelope_kms_outage_grace = 0;
static char *envelope_crypto_implementation = NULL;

static const struct config_enum_entry crypto_backend_options[] = {
	{"auto", ENV_CRYPTO_AUTO, false},
	{"openssl", ENV_CRYPTO_OPENSSL, false},
	{NULL, 0, false}
};

void		_PG_init(void);

/*
 * Check hook for envelope.vault_addr: an https URL, or plain http to a
 * loopback address only (a Vault agent on the same host).  The URL is
 * parsed the way libcurl will use it, so "http://localhost@evil" is seen
 * for what it is; user information and query strings are refused.
 */
static bool
check_vault_addr(char **newval, void **extra, GucSource source)
{
	CURLU	   *u;
	char	   *scheme = NULL;
	char	   *host = NULL;
	char	   *user = NULL;
	char	   *query = NULL;
	bool		ok = false;

	if (*newval == NULL || (*newval)[0] == '\0')
		return true;
	u = curl_url();
	if (u == NULL)
		return false;
	if (curl_url_set(u, CURLUPART_URL, *newval, 0) != CURLUE_OK ||
		curl_url_get(u, CURLUPART_SCHEME, &scheme, 0) != CURLUE_OK ||
		curl_url_get(u, CURLUPART_HOST, &host, 0) != CURLUE_OK)
		GUC_check_errdetail("The address is not a valid URL.");
	else if (curl_url_get(u, CURLUPART_USER, &user, 0) == CURLUE_OK ||
			 curl_url_get(u, CURLUPART_QUERY, &query, 0) == CURLUE_OK)
		GUC_check_errdetail("The address must not contain user information or a query.");
	else if (strcmp(scheme, "https") == 0)
		ok = true;
	else if (strcmp(scheme, "http") == 0 &&
			 (strcmp(host, "127.0.0.1") == 0 || strcmp(host, "localhost") == 0 ||
			  strcmp(host, "[::1]") == 0))
		ok = true;
	else
		GUC_check_errdetail("The address must start with \"https://\"; plain \"http://\" is accepted only for 127.0.0.1, ::1 and localhost.");
	curl_free(scheme);
	curl_free(host);
	curl_free(user);
	curl_free(query);
	curl_url_cleanup(u);
	return ok;
}

/* Check hook for envelope.vault_namespace: no characters that break a header. */
static bool
check_vault_namespace(char **newval, void **extra, GucSource source)
{
	const char *s = *newval;

	if (s != NULL && strspn(s, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-/") != strlen(s))
	{
		GUC_check_errdetail("The namespace consists of letters, digits, \"_\", \".\", \"-\" and \"/\".");
		return false;
	}
	return true;
}

/* Check hook for envelope.vault_mount: a path without "..", "?" or "#". */
static bool
check_vault_mount(char **newval, void **extra, GucSource source)
{
	const char *s = *newval;

	if (s == NULL || s[0] == '\0' || s[0] == '/' || strstr(s, "..") != NULL ||
		strspn(s, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-/") != strlen(s))
	{
		GUC_check_errdetail("The mount path consists of letters, digits, \"_\", \".\", \"-\" and \"/\", and does not start with \"/\".");
		return false;
	}
	return true;
}

/* Module load: define settings and register callbacks. */
void
_PG_init(void)
{
	/*
	 * Without shared_preload_libraries there is no shared memory for the key
	 * cache (and postmaster settings cannot be defined): define nothing, so
	 * the type's input and output still work (restoring a dump, COPY) and
	 * every function fails with a clear error (env_require_shared).
	 */
	if (!process_shared_preload_libraries_in_progress)
		return;

	DefineCustomStringVariable("envelope.default_kek",
							   "KEK used by enc() when none is given.",
							   NULL,
							   &envelope_default_kek,
							   "",
							   PGC_USERSET, 0,
							   NULL, NULL, NULL);

	DefineCustomStringVariable("envelope.vault_addr",
							   "Address of the Vault or OpenBao server, for example https://vault:8200.",
							   NULL,
							   &envelope_vault_addr,
							   "",
							   PGC_SIGHUP, 0,
							   check_vault_addr, NULL, NULL);

	DefineCustomStringVariable("envelope.vault_token_file",
							   "File that holds the Vault token.",
							   "The token itself is never a setting.",
							   &envelope_vault_token_file,
							   "",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY,
							   NULL, NULL, NULL);

	DefineCustomStringVariable("envelope.vault_ca_file",
							   "CA certificates that verify the Vault server (empty: the system's).",
							   NULL,
							   &envelope_vault_ca_file,
							   "",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY,
							   NULL, NULL, NULL);

	DefineCustomStringVariable("envelope.vault_namespace",
							   "Vault Enterprise / OpenBao namespace (empty: none).",
							   NULL,
							   &envelope_vault_namespace,
							   "",
							   PGC_SIGHUP, 0,
							   check_vault_namespace, NULL, NULL);

	DefineCustomStringVariable("envelope.vault_mount",
							   "Mount path of the Transit secrets engine.",
							   NULL,
							   &envelope_vault_mount,
							   "transit",
							   PGC_SIGHUP, 0,
							   check_vault_mount, NULL, NULL);

	DefineCustomIntVariable("envelope.kms_timeout",
							"Time limit for one KMS request.",
							"statement_timeout and query cancel also interrupt KMS requests.",
							&envelope_kms_timeout,
							5000, 100, 600000,
							PGC_SIGHUP, GUC_UNIT_MS,
							NULL, NULL, NULL);

	DefineCustomIntVariable("envelope.cache_ttl",
							"How long an unwrapped data key stays cached (0 disables the cache).",
							"Expired keys are wiped within about a second.",
							&envelope_cache_ttl,
							60, 0, 300,
							PGC_SIGHUP, GUC_UNIT_S,
							NULL, NULL, NULL);

	DefineCustomIntVariable("envelope.cache_size",
							"Maximum number of unwrapped data keys cached in shared memory.",
							NULL,
							&envelope_cache_size,
							1024, 16, 65536,
							PGC_POSTMASTER, 0,
							NULL, NULL, NULL);

	DefineCustomIntVariable("envelope.dek_max_uses",
							"Number of values one data key encrypts before a new one is generated.",
							"1 gives every value its own data key, wrapped by the KMS.",
							&envelope_dek_max_uses,
							100000, 1, 1 << 30,
							PGC_SUSET, 0,
							NULL, NULL, NULL);

	DefineCustomIntVariable("envelope.dek_max_age",
							"Time one data key is used for new values before a new one is generated.",
							NULL,
							&envelope_dek_max_age,
							300, 1, 86400,
							PGC_SUSET, GUC_UNIT_S,
							NULL, NULL, NULL);

	DefineCustomBoolVariable("envelope.kms_verify",
							 "Check every new or rewrapped data key by unwrapping it once.",
							 "Guards against a faulty KMS at the cost of one extra KMS call per data key.",
							 &envelope_kms_verify,
							 true,
							 PGC_SUSET, 0,
							 NULL, NULL, NULL);

	DefineCustomIntVariable("envelope.kms_retries",
							"Retries of a KMS call after a connection error, HTTP 429 or 5xx.",
							"Retries back off exponentially with jitter; statement_timeout bounds them.",
							&envelope_kms_retries,
							2, 0, 10,
							PGC_SIGHUP, 0,
							NULL, NULL, NULL);

	DefineCustomIntVariable("envelope.kms_outage_grace",
							"How long after expiry a cached data key may still be used while the KMS is unavailable.",
							"0 never uses an expired key.",
							&envelope_kms_outage_grace,
							0, 0, 86400,
							PGC_SIGHUP, GUC_UNIT_S,
							NULL, NULL, NULL);

	DefineCustomEnumVariable("envelope.crypto_backend",
							 "AES-256-GCM implementation: auto (the VAES/AVX-512 code when the CPU has it) or openssl.",
							 "Both produce the same bytes; see envelope.crypto_implementation for what auto uses.",
							 &envelope_crypto_backend,
							 ENV_CRYPTO_AUTO, crypto_backend_options,
							 PGC_SUSET, 0,
							 NULL, NULL, NULL);

	/* chosen once here, in the postmaster, after a self-test against OpenSSL */
	DefineCustomStringVariable("envelope.crypto_implementation",
							   "AES-256-GCM implementation that envelope.crypto_backend = auto uses.",
							   NULL,
							   &envelope_crypto_implementation,
							   env_crypto_select(),
							   PGC_INTERNAL, GUC_NOT_IN_SAMPLE | GUC_DISALLOW_IN_FILE,
							   NULL, NULL, NULL);

	env_audit_init();
	env_redact_init();

	MarkGUCPrefixReserved("envelope");

	kek_init();
	env_shmem_register();
}

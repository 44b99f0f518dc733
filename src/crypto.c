/*-------------------------------------------------------------------------
 *
 * crypto.c
 *		AES-256-GCM sealing with per-value keys and key commitment (OpenSSL).
 *
 * Key hierarchy (docs/design.md, docs/format.md):
 *		KEK (in the KMS) --wraps--> DEK (32 bytes, reused within bounds)
 *		algorithm 2 (written): value key = AES-256_DEK(0x01 || salt[0..14]) ||
 *			AES-256_DEK(0x02 || salt[0..14]); commitment = SHA-256(label || DEK)
 *		algorithm 1 (read): HKDF-SHA256(salt, DEK) -> value key || commitment
 * Each value is sealed under its own value key with a random 96-bit nonce.
 * The commitment is stored in the value and compared before decrypting, so
 * a value cannot be made to decrypt under two different data keys (the AWS
 * Encryption SDK's committing suites do the same).  Algorithm 2 does per
 * value only what must be per value: two AES blocks under a key schedule
 * kept with the cached data key (EnvDekState), and GCM itself.
 *
 * Two implementations of the same computation: src/aesgcm.c (VAES,
 * VPCLMULQDQ, AVX-512; per value less than half of OpenSSL 3.0's time) when
 * the CPU has the instructions and the self-test against OpenSSL at server
 * start passed, else OpenSSL's EVP interface.  envelope.crypto_backend =
 * openssl forces OpenSSL; envelope.crypto_implementation shows which one
 * "auto" uses.  Values are the same bytes either way.
 *
 * Resource handling: the OpenSSL algorithms and contexts are fetched and
 * allocated once per backend (crypto_init) and reused, so an ERROR raised in
 * the middle of an operation can never leak one; each operation starts by
 * re-keying the context it uses.  OpenSSL failures are reported by
 * crypto_error(): the one place that turns OpenSSL's error queue into
 * ereport.  With OpenSSL, data key schedules are overwritten at the end of
 * each transaction (EnvDekState); with src/aesgcm.c a data key's round keys
 * live next to the key and are wiped with it.  Contexts are not shared
 * across backends.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <string.h>

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/rand.h>

#include "access/xact.h"
#include "miscadmin.h"

#include "envelope.h"
#include "aesgcm.h"
#include "crypto.h"

#define HKDF_INFO	"envelope v1 AES-256-GCM value key and commitment"
#define COMMIT_LABEL	"envelope v2 AES-256-GCM key commitment"
#define KDF_BLOCK	16			/* AES block size */

static void crypto_error(const char *what) pg_attribute_noreturn();

/* envelope.crypto_backend, and whether src/aesgcm.c passed its self-test */
int			envelope_crypto_backend = ENV_CRYPTO_AUTO;
static bool fast_ok = false;

/* True when this operation uses src/aesgcm.c. */
static inline bool
use_fast(void)
{
	return fast_ok && envelope_crypto_backend == ENV_CRYPTO_AUTO;
}

/* Raise an error for a failed OpenSSL call, with OpenSSL's text as detail. */
static void
crypto_error(const char *what)
{
	unsigned long e = ERR_get_error();
	char		buf[256];

	if (e != 0)
		ERR_error_string_n(e, buf, sizeof(buf));
	else
		strlcpy(buf, "no error reported", sizeof(buf));
	ERR_clear_error();
	ereport(ERROR,
			(errcode(ERRCODE_EXTERNAL_ROUTINE_EXCEPTION),
			 errmsg("could not %s", what),
			 errdetail("OpenSSL: %s.", buf)));
}

/* Wipe key material so the compiler cannot elide it. */
void
env_wipe(void *p, size_t len)
{
	OPENSSL_cleanse(p, len);
}

/* Constant-time comparison of two equal-length buffers. */
bool
env_equal_ct(const uint8 *a, const uint8 *b, int len)
{
	return CRYPTO_memcmp(a, b, len) == 0;
}

/* Fill buf with cryptographically secure random bytes, or raise an error. */
void
env_random_bytes(uint8 *buf, int len)
{
	if (RAND_bytes(buf, len) != 1)
		crypto_error("generate random bytes");
}

/*
 * Per-backend OpenSSL objects, fetched and allocated once.  With OpenSSL 3,
 * implicit fetches (EVP_sha256(), HMAC(), EVP_CIPHER_CTX_new() per call)
 * take global locks and allocate on every call and dominated the per-value
 * cost; reusing prefetched algorithms and contexts removes that.  The
 * contexts are static, so an ERROR can never leak them.  HMAC is computed
 * on the digest context directly (RFC 2104) for the same reason.
 *
 * The GCM contexts are bound to the cipher once; each value only sets its
 * key and nonce (EVP_*Init_ex2 with a NULL cipher), which skips freeing and
 * re-creating the provider's context on every call.
 */
static EVP_MD *sha256_md = NULL;
static EVP_MD_CTX *md_ctx = NULL;
static EVP_CIPHER *gcm_cipher = NULL;
static EVP_CIPHER *ecb_cipher = NULL;
static EVP_CIPHER_CTX *seal_ctx = NULL;
static EVP_CIPHER_CTX *open_ctx = NULL;

/* Data key states whose AES context is keyed (re-keyed with zeros at xact end). */
#define MAX_KEYED	32
static EnvDekState *keyed[MAX_KEYED];
static int	nkeyed = 0;

static void crypto_xact_cb(XactEvent event, void *arg);

/* Fetch the algorithms and allocate the contexts on first use. */
static void
crypto_init(void)
{
	if (open_ctx != NULL)
		return;
	if (sha256_md == NULL)
		sha256_md = EVP_MD_fetch(NULL, "SHA256", NULL);
	if (gcm_cipher == NULL)
		gcm_cipher = EVP_CIPHER_fetch(NULL, "AES-256-GCM", NULL);
	if (ecb_cipher == NULL)
		ecb_cipher = EVP_CIPHER_fetch(NULL, "AES-256-ECB", NULL);
	if (sha256_md == NULL || gcm_cipher == NULL || ecb_cipher == NULL)
		crypto_error("load SHA-256 and AES-256");
	if (md_ctx == NULL && (md_ctx = EVP_MD_CTX_new()) == NULL)
		crypto_error("set up SHA-256");
	if (seal_ctx == NULL)
	{
		seal_ctx = EVP_CIPHER_CTX_new();
		if (seal_ctx == NULL ||
			EVP_EncryptInit_ex2(seal_ctx, gcm_cipher, NULL, NULL, NULL) != 1)
			crypto_error("set up AES-256-GCM");
	}
	open_ctx = EVP_CIPHER_CTX_new();
	if (open_ctx == NULL ||
		EVP_DecryptInit_ex2(open_ctx, gcm_cipher, NULL, NULL, NULL) != 1)
	{
		EVP_CIPHER_CTX_free(open_ctx);
		open_ctx = NULL;
		crypto_error("set up AES-256-GCM");
	}
	RegisterXactCallback(crypto_xact_cb, NULL);
}

/* Overwrite the HMAC state left in the digest context by a key derivation. */
static void
crypto_scrub_md(void)
{
	if (EVP_DigestInit_ex2(md_ctx, sha256_md, NULL) != 1)
		ERR_clear_error();
}

/* Overwrite a data key's schedule in its AES context with a zero key's. */
static void
dek_state_unkey(EnvDekState *state)
{
	static const uint8 zero[ENV_KEY_LEN] = {0};

	if (state->kdf_keyed)
	{
		if (EVP_EncryptInit_ex2(state->kdf, NULL, zero, NULL, NULL) != 1)
			ERR_clear_error();
		state->kdf_keyed = false;
	}
}

/* Unkey every keyed data key state (transaction end, or the list is full). */
static void
crypto_scrub_keyed(void)
{
	for (int i = 0; i < nkeyed; i++)
		dek_state_unkey(keyed[i]);
	nkeyed = 0;
}

/*
 * Transaction end (also in parallel workers): overwrite the data key
 * schedules derived this transaction.  The GCM contexts keep the last value
 * key until the next value: it opens only that value, whose plaintext
 * PostgreSQL's own freed memory holds as long.
 */
static void
crypto_xact_cb(XactEvent event, void *arg)
{
	switch (event)
	{
		case XACT_EVENT_COMMIT:
		case XACT_EVENT_PARALLEL_COMMIT:
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PARALLEL_ABORT:
		case XACT_EVENT_PREPARE:
			crypto_scrub_keyed();
			break;
		default:
			break;
	}
}

/* out = SHA-256(a || b || c) on the reused digest context. */
static bool
sha256_3(const uint8 *a, size_t alen, const uint8 *b, size_t blen,
		 const uint8 *c, size_t clen, uint8 *out)
{
	unsigned int outl = 0;

	return EVP_DigestInit_ex2(md_ctx, sha256_md, NULL) == 1 &&
		EVP_DigestUpdate(md_ctx, a, alen) == 1 &&
		(blen == 0 || EVP_DigestUpdate(md_ctx, b, blen) == 1) &&
		(clen == 0 || EVP_DigestUpdate(md_ctx, c, clen) == 1) &&
		EVP_DigestFinal_ex(md_ctx, out, &outl) == 1 && outl == 32;
}

/*
 * out = HMAC-SHA256(key, a || b) (RFC 2104), for keys of at most 64 bytes,
 * computed on the reused digest context: OpenSSL 3's EVP_MAC allocates and
 * frees on every initialisation, which dominated the per-value cost.
 */
static bool
hmac_sha256(const uint8 *key, size_t keylen, const uint8 *a, size_t alen,
			const uint8 *b, size_t blen, uint8 *out)
{
	uint8		pad[64];
	uint8		inner[32];
	bool		ok;

	Assert(keylen <= sizeof(pad));
	memset(pad, 0x36, sizeof(pad));
	for (size_t i = 0; i < keylen; i++)
		pad[i] ^= key[i];
	ok = sha256_3(pad, sizeof(pad), a, alen, b, blen, inner);
	for (size_t i = 0; i < sizeof(pad); i++)
		pad[i] ^= 0x36 ^ 0x5c;
	ok = ok && sha256_3(pad, sizeof(pad), inner, sizeof(inner), NULL, 0, out);
	env_wipe(pad, sizeof(pad));
	env_wipe(inner, sizeof(inner));
	return ok;
}

/* HMAC-SHA256(key, a || b) for keys of at most 64 bytes (audit chain). */
void
env_hmac_sha256(const uint8 *key, size_t keylen, const uint8 *a, size_t alen,
				const uint8 *b, size_t blen, uint8 *out)
{
	crypto_init();
	if (keylen > 64 || !hmac_sha256(key, keylen, a, alen, b, blen, out))
		crypto_error("compute HMAC-SHA256");
	crypto_scrub_md();
}

/* SHA-256 over several byte strings, concatenated. */
void
env_sha256(const uint8 *const *parts, const size_t *lens, int nparts, uint8 *digest)
{
	unsigned int mdlen = 0;
	bool		ok;

	crypto_init();
	ok = EVP_DigestInit_ex2(md_ctx, sha256_md, NULL) == 1;
	for (int i = 0; ok && i < nparts; i++)
		ok = EVP_DigestUpdate(md_ctx, parts[i], lens[i]) == 1;
	if (!ok || EVP_DigestFinal_ex(md_ctx, digest, &mdlen) != 1 || mdlen != 32)
		crypto_error("compute SHA-256");
}

/*
 * Algorithm 1: the per-value key and key commitment from HKDF-SHA256
 * (RFC 5869) over the data key and the value's salt.
 */
static void
derive_hkdf(const uint8 *dek, const uint8 *salt, uint8 *value_key, uint8 *commit)
{
	static const uint8 info1[] = HKDF_INFO "\x01";
	uint8		info2[sizeof(HKDF_INFO)];
	uint8		prk[32];
	uint8		t1[32];
	size_t		infolen = sizeof(HKDF_INFO) - 1;
	bool		ok;

	memcpy(info2, HKDF_INFO, infolen);
	info2[infolen] = 0x02;

	/* Extract: PRK = HMAC(salt, DEK); T(1) = HMAC(PRK, info || 0x01) */
	ok = hmac_sha256(salt, ENV_SALT_LEN, dek, ENV_KEY_LEN, NULL, 0, prk) &&
		hmac_sha256(prk, 32, info1, infolen + 1, NULL, 0, t1);
	/* T(2) = HMAC(PRK, T(1) || info || 0x02): the commitment */
	if (ok)
		ok = hmac_sha256(prk, 32, t1, 32, info2, infolen + 1, commit);
	if (ok)
		memcpy(value_key, t1, ENV_KEY_LEN);

	env_wipe(prk, sizeof(prk));
	env_wipe(t1, sizeof(t1));
	crypto_scrub_md();
	if (!ok)
	{
		env_wipe(value_key, ENV_KEY_LEN);
		crypto_error("derive the value key");
	}
}

/* Set up state for a data key: the AES-256 key schedule and the commitment. */
void
env_dek_state_init(EnvDekState *state, const uint8 *dek)
{
	static const uint8 label[] = COMMIT_LABEL;
	const uint8 *parts[2] = {label, dek};
	size_t		lens[2] = {sizeof(label) - 1, ENV_KEY_LEN};

	crypto_init();
	env_dek_state_clear(state);
	env_sha256(parts, lens, 2, state->commit);
	memcpy(state->dek, dek, ENV_KEY_LEN);
	/* the round keys live where the data key does, for as long */
	if (use_fast())
	{
		env_aes256_schedule(dek, state->schedule);
		state->schedule_valid = true;
	}
	state->valid = true;
}

/* Key a state's AES context for this transaction (undone at its end). */
static void
dek_state_key(EnvDekState *state)
{
	if (nkeyed == MAX_KEYED)
		crypto_scrub_keyed();
	/* the context is only needed on the OpenSSL path: made on first use */
	if (state->kdf == NULL)
	{
		EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();

		if (ctx == NULL ||
			EVP_EncryptInit_ex2(ctx, ecb_cipher, NULL, NULL, NULL) != 1 ||
			EVP_CIPHER_CTX_set_padding(ctx, 0) != 1)
		{
			EVP_CIPHER_CTX_free(ctx);
			crypto_error("set up AES-256");
		}
		state->kdf = ctx;
	}
	if (EVP_EncryptInit_ex2(state->kdf, NULL, state->dek, NULL, NULL) != 1)
		crypto_error("set up AES-256");
	state->kdf_keyed = true;
	keyed[nkeyed++] = state;
}

/*
 * Wipe a state's key bytes only, without calling OpenSSL: safe in a signal
 * handler.  An OpenSSL context keyed this transaction is not touched (the
 * caller knows no transaction is running, so none is keyed).
 */
void
env_dek_state_wipe_bytes(EnvDekState *state)
{
	explicit_bzero(state->dek, sizeof(state->dek));
	explicit_bzero(state->commit, sizeof(state->commit));
	explicit_bzero(state->schedule, sizeof(state->schedule));
	state->schedule_valid = false;
	state->valid = false;
}

/* Wipe a state's key material; its context is kept for the next key. */
void
env_dek_state_clear(EnvDekState *state)
{
	dek_state_unkey(state);
	env_dek_state_wipe_bytes(state);
}

/*
 * The per-value key and key commitment of a value (docs/format.md).
 *
 * Algorithm 2: value key = AES-256_DEK(0x01 || salt[0..14]) ||
 * AES-256_DEK(0x02 || salt[0..14]), two block encryptions under the data
 * key's cached key schedule (as AES-GCM-SIV derives its per-nonce keys);
 * commitment = SHA-256(label || DEK), computed once per data key.
 * Algorithm 1: HKDF-SHA256, both per value.
 */
void
env_value_key(EnvDekState *state, int algo, const uint8 *salt,
			  uint8 *value_key, uint8 *commit)
{
	uint8		blocks[2 * KDF_BLOCK];
	int			outl = 0;

	Assert(state->valid);
	if (algo == ENV_ALGO_AES256GCM_HKDF_SHA256_COMMIT)
	{
		crypto_init();
		derive_hkdf(state->dek, salt, value_key, commit);
		return;
	}
	Assert(algo == ENV_ALGO_AES256GCM_AESKDF_COMMIT);
	blocks[0] = 0x01;
	memcpy(blocks + 1, salt, KDF_BLOCK - 1);
	blocks[KDF_BLOCK] = 0x02;
	memcpy(blocks + KDF_BLOCK + 1, salt, KDF_BLOCK - 1);
	if (state->schedule_valid && use_fast())
	{
		env_aes256_encrypt2(state->schedule, blocks, value_key);
		memcpy(commit, state->commit, ENV_COMMIT_LEN);
		return;
	}
	crypto_init();
	if (!state->kdf_keyed)
		dek_state_key(state);
	if (EVP_EncryptUpdate(state->kdf, value_key, &outl, blocks, sizeof(blocks)) != 1 ||
		outl != ENV_KEY_LEN)
	{
		env_wipe(value_key, ENV_KEY_LEN);
		crypto_error("derive the value key");
	}
	memcpy(commit, state->commit, ENV_COMMIT_LEN);
}

/*
 * Random bytes for salts and nonces.  RAND_bytes costs about as much per
 * call as sealing a short value, so each backend draws FRESH_POOL bytes at
 * a time and hands them out in order, wiping what it hands out.  The bytes
 * come from the same generator either way; they are public once written
 * into a value.  The buffer is refilled whenever the process is not the one
 * that filled it, so a forked child never reuses its parent's bytes.
 */
#define FRESH_POOL	4096

static uint8 fresh_pool[FRESH_POOL];
static int	fresh_pos = FRESH_POOL;
static int	fresh_pid = 0;

/* Salts and nonces from the per-backend buffer of random bytes. */
void
env_fresh_bytes(uint8 *buf, int len)
{
	if (len > FRESH_POOL / 4)
	{
		env_random_bytes(buf, len);
		return;
	}
	if (fresh_pid != MyProcPid || FRESH_POOL - fresh_pos < len)
	{
		fresh_pos = FRESH_POOL;
		env_random_bytes(fresh_pool, FRESH_POOL);
		fresh_pos = 0;
		fresh_pid = MyProcPid;
	}
	memcpy(buf, fresh_pool + fresh_pos, len);
	memset(fresh_pool + fresh_pos, 0, len);
	fresh_pos += len;
}

/* The AAD prefix: header, then the context's length (big-endian). */
static void
aad_prefix(uint8 *dst, const uint8 *header, int context_len)
{
	memcpy(dst, header, ENV_HEADER_LEN);
	dst[ENV_HEADER_LEN] = (uint8) (context_len >> 24);
	dst[ENV_HEADER_LEN + 1] = (uint8) (context_len >> 16);
	dst[ENV_HEADER_LEN + 2] = (uint8) (context_len >> 8);
	dst[ENV_HEADER_LEN + 3] = (uint8) context_len;
}

/*
 * The whole AAD in one buffer for src/aesgcm.c: the prefix, then the
 * context.  Uses buf (size buflen) when it fits, else palloc'd memory.
 */
static uint8 *
aad_whole(uint8 *buf, size_t buflen, const uint8 *header,
		  const uint8 *context, int context_len)
{
	size_t		need = ENV_HEADER_LEN + 4 + (size_t) context_len;
	uint8	   *aad = need <= buflen ? buf : palloc(need);

	aad_prefix(aad, header, context_len);
	if (context_len > 0)
		memcpy(aad + ENV_HEADER_LEN + 4, context, context_len);
	return aad;
}

#define AAD_BUF		512

/* Encrypt plaintext into ciphertext and tag, authenticating header and context. */
void
env_seal(const uint8 *value_key, const uint8 *nonce,
		 const uint8 *header, const uint8 *context, int context_len,
		 const uint8 *plaintext, int len, uint8 *ciphertext, uint8 *tag)
{
	uint8		aad[AAD_BUF];
	int			outl = 0;
	int			finl = 0;
	int			aadl;

	if (ciphertext > plaintext && ciphertext < plaintext + len)
		elog(ERROR, "env_seal: the ciphertext may not start inside the plaintext");
	if (use_fast())
	{
		uint8	   *whole = aad_whole(aad, sizeof(aad), header, context, context_len);

		env_aesgcm_seal(value_key, nonce, whole, ENV_HEADER_LEN + 4 + (size_t) context_len,
						plaintext, ciphertext, (size_t) len, tag);
		if (whole != aad)
			pfree(whole);
		return;
	}
	crypto_init();
	aad_prefix(aad, header, context_len);
	if (EVP_EncryptInit_ex2(seal_ctx, NULL, value_key, nonce, NULL) != 1 ||
		EVP_EncryptUpdate(seal_ctx, NULL, &aadl, aad, ENV_HEADER_LEN + 4) != 1 ||
		(context_len > 0 &&
		 EVP_EncryptUpdate(seal_ctx, NULL, &aadl, context, context_len) != 1) ||
		(len > 0 && EVP_EncryptUpdate(seal_ctx, ciphertext, &outl, plaintext, len) != 1) ||
		EVP_EncryptFinal_ex(seal_ctx, ciphertext + outl, &finl) != 1 ||
		outl + finl != len ||
		EVP_CIPHER_CTX_ctrl(seal_ctx, EVP_CTRL_GCM_GET_TAG, ENV_TAG_LEN, tag) != 1)
		crypto_error("encrypt value");
}

/* OpenSSL's decrypt-and-verify into out (out == ciphertext or disjoint). */
static bool
openssl_open(const uint8 *value_key, const uint8 *nonce, const uint8 *aad_prefix_buf,
			 const uint8 *context, int context_len,
			 const uint8 *ciphertext, int len, const uint8 *tag, uint8 *out)
{
	uint8		tagcopy[ENV_TAG_LEN];
	OSSL_PARAM	params[2];
	int			outl = 0;
	int			finl = 0;
	int			aadl;

	crypto_init();
	memcpy(tagcopy, tag, ENV_TAG_LEN);
	/* the expected tag goes in with key and nonce: one parameter pass, not two */
	params[0] = OSSL_PARAM_construct_octet_string(OSSL_CIPHER_PARAM_AEAD_TAG,
												  tagcopy, ENV_TAG_LEN);
	params[1] = OSSL_PARAM_construct_end();
	if (EVP_DecryptInit_ex2(open_ctx, NULL, value_key, nonce, params) != 1 ||
		EVP_DecryptUpdate(open_ctx, NULL, &aadl, aad_prefix_buf, ENV_HEADER_LEN + 4) != 1 ||
		(context_len > 0 &&
		 EVP_DecryptUpdate(open_ctx, NULL, &aadl, context, context_len) != 1) ||
		(len > 0 && EVP_DecryptUpdate(open_ctx, out, &outl, ciphertext, len) != 1))
	{
		env_wipe(out, len);
		crypto_error("set up AES-256-GCM decryption");
	}
	if (EVP_DecryptFinal_ex(open_ctx, out + outl, &finl) != 1)
	{
		ERR_clear_error();
		env_wipe(out, len);
		return false;
	}
	return true;
}

/*
 * Decrypt and authenticate; returns false on a bad tag, with no plaintext
 * left anywhere.  plaintext may be ciphertext itself or start before it in
 * the same buffer (decrypting a detoasted copy into its own front).
 */
bool
env_open(const uint8 *value_key, const uint8 *nonce,
		 const uint8 *header, const uint8 *context, int context_len,
		 const uint8 *ciphertext, int len, const uint8 *tag, uint8 *plaintext)
{
	uint8		aad[AAD_BUF];
	uint8		nonce_copy[ENV_NONCE_LEN];
	bool		ok;

	/* the output may start at or before the input, never inside it */
	if (plaintext > ciphertext && plaintext < ciphertext + len)
		elog(ERROR, "env_open: the plaintext may not start inside the ciphertext");
	if (use_fast())
	{
		uint8	   *whole = aad_whole(aad, sizeof(aad), header, context, context_len);

		/* tag first, then decrypt: a forged value never yields plaintext */
		ok = env_aesgcm_open(value_key, nonce, whole, ENV_HEADER_LEN + 4 + (size_t) context_len,
							 ciphertext, plaintext, (size_t) len, tag);
		if (whole != aad)
			pfree(whole);
		return ok;
	}
	/* header, nonce and tag may lie where the plaintext goes: copy them first */
	aad_prefix(aad, header, context_len);
	memcpy(nonce_copy, nonce, ENV_NONCE_LEN);
	if (plaintext == ciphertext || plaintext + len <= ciphertext ||
		ciphertext + len <= plaintext)
		return openssl_open(value_key, nonce_copy, aad, context, context_len,
							ciphertext, len, tag, plaintext);

	/* overlapping, plaintext first: decrypt in place, slide down, wipe the rest */
	ok = openssl_open(value_key, nonce_copy, aad, context, context_len,
					  ciphertext, len, tag, (uint8 *) ciphertext);
	if (ok)
	{
		memmove(plaintext, ciphertext, len);
		env_wipe(plaintext + len, ciphertext - plaintext);
	}
	return ok;
}

/*
 * Compare src/aesgcm.c with OpenSSL on random keys, nonces and inputs of
 * many lengths (seal, open, in place, a forged tag, the data key
 * derivation).  Run once in the postmaster; its result is inherited.
 */
static bool
aesgcm_selftest(bool *openssl_failed)
{
	static const int lens[] = {0, 1, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100,
	127, 128, 129, 255, 256, 257, 300, 1000, 4096, 4100};
	/* envelope's AAD is 92 bytes plus the context: cross the 256-byte windows */
	static const int aad_lens[] = {0, 1, 16, 92, 93, 100, 255, 256, 257, 348, 1000};
	EVP_CIPHER_CTX *c = EVP_CIPHER_CTX_new();
	uint8	   *pt = palloc(4100),
			   *ct1 = palloc(4100),
			   *ct2 = palloc(4100),
			   *buf = palloc(4200);
	uint8		key[ENV_KEY_LEN],
				nonce[ENV_NONCE_LEN],
				aad[1000],
				tag1[ENV_TAG_LEN],
				tag2[ENV_TAG_LEN],
				sched[ENV_AES_SCHEDULE_LEN],
				blk[32],
				b1[32],
				b2[48];
	bool		ok = c != NULL;

	*openssl_failed = false;
	for (int i = 0; ok && i < (int) lengthof(lens); i++)
	{
		int			len = lens[i];
		int			alen = aad_lens[i % lengthof(aad_lens)];
		int			l;

		ok = RAND_bytes(key, sizeof(key)) == 1 && RAND_bytes(nonce, sizeof(nonce)) == 1 &&
			RAND_bytes(aad, sizeof(aad)) == 1 && RAND_bytes(pt, 4100) == 1 &&
			RAND_bytes(blk, sizeof(blk)) == 1;
		/* OpenSSL's seal */
		ok = ok && EVP_EncryptInit_ex(c, EVP_aes_256_gcm(), NULL, key, nonce) == 1 &&
			(alen == 0 || EVP_EncryptUpdate(c, NULL, &l, aad, alen) == 1) &&
			(len == 0 || EVP_EncryptUpdate(c, ct1, &l, pt, len) == 1) &&
			EVP_EncryptFinal_ex(c, ct1 + len, &l) == 1 &&
			EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_GET_TAG, ENV_TAG_LEN, tag1) == 1;
		if (!ok)
		{
			*openssl_failed = true;
			break;
		}
		env_aesgcm_seal(key, nonce, aad, alen, pt, ct2, len, tag2);
		ok = memcmp(ct1, ct2, len) == 0 && memcmp(tag1, tag2, ENV_TAG_LEN) == 0;
		/* open out of place, and from 7 bytes further into its own buffer */
		ok = ok && env_aesgcm_open(key, nonce, aad, alen, ct1, buf, len, tag1) &&
			memcmp(buf, pt, len) == 0;
		memcpy(buf + 7, ct1, len);
		ok = ok && env_aesgcm_open(key, nonce, aad, alen, buf + 7, buf, len, tag1) &&
			memcmp(buf, pt, len) == 0;
		tag1[i % ENV_TAG_LEN] ^= 1;
		memset(buf, 0x5a, len + 1);
		ok = ok && !env_aesgcm_open(key, nonce, aad, alen, ct1, buf, len, tag1) &&
			(len == 0 || buf[0] == 0x5a) && buf[len] == 0x5a;	/* nothing written */
		/* the value key derivation: two AES-256 blocks */
		env_aes256_schedule(key, sched);
		env_aes256_encrypt2(sched, blk, b1);
		ok = ok && EVP_EncryptInit_ex(c, EVP_aes_256_ecb(), NULL, key, NULL) == 1 &&
			EVP_CIPHER_CTX_set_padding(c, 0) == 1 &&
			EVP_EncryptUpdate(c, b2, &l, blk, 32) == 1 && l == 32 &&
			memcmp(b1, b2, 32) == 0;
	}
	ERR_clear_error();
	EVP_CIPHER_CTX_free(c);
	env_wipe(key, sizeof(key));
	env_wipe(sched, sizeof(sched));
	env_wipe(pt, 4100);
	env_wipe(buf, 4200);
	pfree(pt);
	pfree(ct1);
	pfree(ct2);
	pfree(buf);
	return ok;
}

/*
 * At server start (_PG_init in the postmaster): use src/aesgcm.c if the CPU
 * has its instructions and it computes exactly what OpenSSL does.  Returns
 * the name envelope.crypto_implementation shows.
 */
const char *
env_crypto_select(void)
{
	bool		openssl_failed;

	fast_ok = false;
	if (!env_aesgcm_cpu_ok())
		return "openssl";
	if (!aesgcm_selftest(&openssl_failed))
	{
		if (openssl_failed)
			ereport(WARNING,
					(errcode(ERRCODE_EXTERNAL_ROUTINE_EXCEPTION),
					 errmsg("could not run the AES-256-GCM self-test, using OpenSSL"),
					 errdetail("OpenSSL failed while computing the reference values.")));
		else
			ereport(WARNING,
					(errcode(ERRCODE_INTERNAL_ERROR),
					 errmsg("AES-256-GCM self-test failed, using OpenSSL"),
					 errdetail("envelope's VAES/AVX-512 implementation computed something other than OpenSSL on this CPU.")));
		return "openssl";
	}
	fast_ok = true;
	return "vaes-avx512";
}

/*-------------------------------------------------------------------------
 *
 * crypto.c
 *		AES-256-GCM sealing with per-value keys and key commitment (OpenSSL).
 *
 * Key hierarchy (docs/design.md):
 *		KEK (in the KMS) --wraps--> DEK (32 bytes, reused within bounds)
 *		HKDF-SHA256(salt = 32 random bytes, ikm = DEK, info = label)
 *			-> 64 bytes: value key (32) || commitment (32)
 * Each value is sealed under its own value key with a random 96-bit nonce.
 * The commitment is stored in the value and compared before decrypting, so
 * a value cannot be made to decrypt under two different keys (the AWS
 * Encryption SDK's committing suites do the same).
 *
 * Resource handling: the OpenSSL algorithms and contexts are fetched and
 * allocated once per backend (crypto_init) and reused, so an ERROR raised in
 * the middle of an operation can never leak one; each operation starts by
 * re-initialising the context it uses.  OpenSSL failures are reported by
 * crypto_error(): the one place that turns OpenSSL's error queue into
 * ereport.  The GCM key schedule left in the reused context is overwritten
 * by the next operation; contexts are not shared across backends.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <string.h>

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/rand.h>

#include "envelope.h"
#include "crypto.h"

#define HKDF_INFO	"envelope v1 AES-256-GCM value key and commitment"

static void crypto_error(const char *what) pg_attribute_noreturn();

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
 */
static EVP_MD *sha256_md = NULL;
static EVP_MD_CTX *md_ctx = NULL;
static EVP_CIPHER *gcm_cipher = NULL;
static EVP_CIPHER_CTX *gcm_ctx = NULL;

/* Fetch the algorithms and allocate the contexts on first use. */
static void
crypto_init(void)
{
	if (gcm_ctx != NULL)
		return;
	sha256_md = EVP_MD_fetch(NULL, "SHA256", NULL);
	gcm_cipher = EVP_CIPHER_fetch(NULL, "AES-256-GCM", NULL);
	if (sha256_md == NULL || gcm_cipher == NULL)
		crypto_error("load SHA-256 and AES-256-GCM");
	md_ctx = EVP_MD_CTX_new();
	if (md_ctx == NULL)
		crypto_error("set up SHA-256");
	gcm_ctx = EVP_CIPHER_CTX_new();
	if (gcm_ctx == NULL)
		crypto_error("set up AES-256-GCM");
}

/*
 * Overwrite the key state left in the reused contexts, so the last value
 * key and HMAC state do not linger in ordinary heap memory.
 */
static void
crypto_scrub(void)
{
	static const uint8 zero[32] = {0};
	static const uint8 zero_iv[ENV_NONCE_LEN] = {0};

	(void) EVP_DigestInit_ex2(md_ctx, sha256_md, NULL);
	(void) EVP_EncryptInit_ex2(gcm_ctx, gcm_cipher, zero, zero_iv, NULL);
	ERR_clear_error();
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

/* Derive the per-value key and key commitment (HKDF-SHA256, RFC 5869). */
void
env_derive_value_key(const uint8 *dek, const uint8 *salt,
					 uint8 *value_key, uint8 *commit)
{
	static const uint8 info1[] = HKDF_INFO "\x01";
	uint8		info2[sizeof(HKDF_INFO)];
	uint8		prk[32];
	uint8		t1[32];
	size_t		infolen = sizeof(HKDF_INFO) - 1;
	bool		ok;

	crypto_init();
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
	crypto_scrub();
	if (!ok)
	{
		env_wipe(value_key, ENV_KEY_LEN);
		crypto_error("derive the value key");
	}
}

/* Feed the AAD (header, then context length and context) into a GCM context. */
static bool
gcm_aad(EVP_CIPHER_CTX *ctx, bool encrypt, const uint8 *header,
		const uint8 *context, int context_len)
{
	uint8		lenbuf[4];
	int			outl;

	lenbuf[0] = (uint8) (context_len >> 24);
	lenbuf[1] = (uint8) (context_len >> 16);
	lenbuf[2] = (uint8) (context_len >> 8);
	lenbuf[3] = (uint8) context_len;

#define AAD(p, n) \
	(encrypt ? EVP_EncryptUpdate(ctx, NULL, &outl, (p), (n)) : \
			   EVP_DecryptUpdate(ctx, NULL, &outl, (p), (n)))
	if (AAD(header, ENV_HEADER_LEN) != 1 || AAD(lenbuf, 4) != 1)
		return false;
	if (context_len > 0 && AAD(context, context_len) != 1)
		return false;
#undef AAD
	return true;
}

/* Encrypt plaintext into ciphertext and tag, authenticating header and context. */
void
env_seal(const uint8 *value_key, const uint8 *nonce,
		 const uint8 *header, const uint8 *context, int context_len,
		 const uint8 *plaintext, int len, uint8 *ciphertext, uint8 *tag)
{
	EVP_CIPHER_CTX *ctx;
	int			outl = 0;
	int			finl = 0;
	bool		ok;

	crypto_init();
	ctx = gcm_ctx;
	ok = EVP_EncryptInit_ex2(ctx, gcm_cipher, value_key, nonce, NULL) == 1 &&
		gcm_aad(ctx, true, header, context, context_len) &&
		(len == 0 || EVP_EncryptUpdate(ctx, ciphertext, &outl, plaintext, len) == 1) &&
		EVP_EncryptFinal_ex(ctx, ciphertext + outl, &finl) == 1 &&
		outl + finl == len &&
		EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, ENV_TAG_LEN, tag) == 1;

	crypto_scrub();
	if (!ok)
		crypto_error("encrypt value");
}

/* Decrypt and authenticate; returns false (and wipes plaintext) on a bad tag. */
bool
env_open(const uint8 *value_key, const uint8 *nonce,
		 const uint8 *header, const uint8 *context, int context_len,
		 const uint8 *ciphertext, int len, const uint8 *tag, uint8 *plaintext)
{
	EVP_CIPHER_CTX *ctx;
	uint8		tagcopy[ENV_TAG_LEN];
	int			outl = 0;
	int			finl = 0;
	bool		setup;
	bool		verified = false;

	crypto_init();
	ctx = gcm_ctx;
	memcpy(tagcopy, tag, ENV_TAG_LEN);
	setup = EVP_DecryptInit_ex2(ctx, gcm_cipher, value_key, nonce, NULL) == 1 &&
		gcm_aad(ctx, false, header, context, context_len) &&
		(len == 0 || EVP_DecryptUpdate(ctx, plaintext, &outl, ciphertext, len) == 1) &&
		EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, ENV_TAG_LEN, tagcopy) == 1;
	if (setup)
		verified = EVP_DecryptFinal_ex(ctx, plaintext + outl, &finl) == 1;

	crypto_scrub();
	if (!setup)
	{
		env_wipe(plaintext, len);
		crypto_error("set up AES-256-GCM decryption");
	}
	if (!verified)
	{
		ERR_clear_error();
		env_wipe(plaintext, len);
		return false;
	}
	return true;
}

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
 * Resource handling: an EVP_CIPHER_CTX lives only inside env_seal() and
 * env_open(), and nothing between its allocation and its release can raise
 * a PostgreSQL error (no palloc, no ereport, no CHECK_FOR_INTERRUPTS), so no
 * context can leak on ERROR.  OpenSSL failures are recorded and reported by
 * crypto_error() after the context is freed: the one place that turns
 * OpenSSL's error queue into ereport.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <string.h>

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>

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

/* Derive the per-value key and key commitment (HKDF-SHA256, RFC 5869). */
void
env_derive_value_key(const uint8 *dek, const uint8 *salt,
					 uint8 *value_key, uint8 *commit)
{
	uint8		prk[EVP_MAX_MD_SIZE];
	unsigned int prklen = 0;
	uint8		block[EVP_MAX_MD_SIZE + sizeof(HKDF_INFO) + 1];
	uint8		t[EVP_MAX_MD_SIZE];
	unsigned int tlen = 0;
	size_t		infolen = sizeof(HKDF_INFO) - 1;
	bool		ok;

	/* Extract: PRK = HMAC(salt, DEK) */
	ok = HMAC(EVP_sha256(), salt, ENV_SALT_LEN, dek, ENV_KEY_LEN, prk, &prklen) != NULL;

	/* Expand, T(1) = HMAC(PRK, info || 0x01): the value key */
	if (ok)
	{
		memcpy(block, HKDF_INFO, infolen);
		block[infolen] = 0x01;
		ok = HMAC(EVP_sha256(), prk, prklen, block, infolen + 1, t, &tlen) != NULL;
		if (ok)
			memcpy(value_key, t, ENV_KEY_LEN);
	}

	/* T(2) = HMAC(PRK, T(1) || info || 0x02): the commitment */
	if (ok)
	{
		memcpy(block, t, tlen);
		memcpy(block + tlen, HKDF_INFO, infolen);
		block[tlen + infolen] = 0x02;
		ok = HMAC(EVP_sha256(), prk, prklen, block, tlen + infolen + 1, t, &tlen) != NULL;
		if (ok)
			memcpy(commit, t, ENV_COMMIT_LEN);
	}

	env_wipe(prk, sizeof(prk));
	env_wipe(block, sizeof(block));
	env_wipe(t, sizeof(t));
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
	EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
	int			outl = 0;
	int			finl = 0;
	bool		ok;

	ok = ctx != NULL &&
		EVP_EncryptInit_ex(ctx, EVP_aes_256_gcm(), NULL, NULL, NULL) == 1 &&
		EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_IVLEN, ENV_NONCE_LEN, NULL) == 1 &&
		EVP_EncryptInit_ex(ctx, NULL, NULL, value_key, nonce) == 1 &&
		gcm_aad(ctx, true, header, context, context_len) &&
		(len == 0 || EVP_EncryptUpdate(ctx, ciphertext, &outl, plaintext, len) == 1) &&
		EVP_EncryptFinal_ex(ctx, ciphertext + outl, &finl) == 1 &&
		outl + finl == len &&
		EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, ENV_TAG_LEN, tag) == 1;

	EVP_CIPHER_CTX_free(ctx);
	if (!ok)
		crypto_error("encrypt value");
}

/* Decrypt and authenticate; returns false (and wipes plaintext) on a bad tag. */
bool
env_open(const uint8 *value_key, const uint8 *nonce,
		 const uint8 *header, const uint8 *context, int context_len,
		 const uint8 *ciphertext, int len, const uint8 *tag, uint8 *plaintext)
{
	EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
	uint8		tagcopy[ENV_TAG_LEN];
	int			outl = 0;
	int			finl = 0;
	bool		setup;
	bool		verified = false;

	memcpy(tagcopy, tag, ENV_TAG_LEN);
	setup = ctx != NULL &&
		EVP_DecryptInit_ex(ctx, EVP_aes_256_gcm(), NULL, NULL, NULL) == 1 &&
		EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_IVLEN, ENV_NONCE_LEN, NULL) == 1 &&
		EVP_DecryptInit_ex(ctx, NULL, NULL, value_key, nonce) == 1 &&
		gcm_aad(ctx, false, header, context, context_len) &&
		(len == 0 || EVP_DecryptUpdate(ctx, plaintext, &outl, ciphertext, len) == 1) &&
		EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, ENV_TAG_LEN, tagcopy) == 1;
	if (setup)
		verified = EVP_DecryptFinal_ex(ctx, plaintext + outl, &finl) == 1;

	EVP_CIPHER_CTX_free(ctx);
	if (!setup)
	{
		env_wipe(plaintext, len);
		crypto_error("decrypt value");
	}
	if (!verified)
	{
		ERR_clear_error();
		env_wipe(plaintext, len);
		return false;
	}
	return true;
}

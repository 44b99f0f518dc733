/*-------------------------------------------------------------------------
 *
 * crypto.h
 *		AES-256-GCM sealing with per-value keys and key commitment.
 *
 *-------------------------------------------------------------------------
 */
#ifndef ENVELOPE_CRYPTO_H
#define ENVELOPE_CRYPTO_H

#include "envelope.h"
#include "aesgcm.h"
#include "format.h"

/* envelope.crypto_backend */
typedef enum EnvCryptoBackend
{
	ENV_CRYPTO_AUTO,			/* src/aesgcm.c when usable, else OpenSSL */
	ENV_CRYPTO_OPENSSL
} EnvCryptoBackend;

extern int	envelope_crypto_backend;

/*
 * A data key and what is computed from it once, not per value: the key
 * commitment of algorithm 2 and what derives per-value keys: with
 * src/aesgcm.c the AES-256 round keys (schedule, kept next to dek, so in
 * the holder's protected memory and wiped with it); with OpenSSL an EVP
 * context keyed on first use in a transaction and re-keyed with zeros when
 * the transaction ends.  Holders wipe it with env_dek_state_clear().
 */
typedef struct EnvDekState
{
	bool		valid;
	bool		kdf_keyed;		/* kdf holds dek's key schedule */
	uint8		dek[ENV_KEY_LEN];
	uint8		commit[ENV_COMMIT_LEN];	/* algorithm 2's key commitment */
	bool		schedule_valid;
	uint8		schedule[ENV_AES_SCHEDULE_LEN];	/* src/aesgcm.c round keys */
	void	   *kdf;			/* EVP_CIPHER_CTX: AES-256-ECB, made on first OpenSSL use */
} EnvDekState;

/* Fill buf with cryptographically secure random bytes, or raise an error. */
extern void env_random_bytes(uint8 *buf, int len);

/*
 * Random bytes for salts and nonces, served from a per-backend buffer that
 * is refilled from the same generator in large batches (never shared
 * across a fork).
 */
extern void env_fresh_bytes(uint8 *buf, int len);

/* Set up state for a data key (copies it); raises an error on failure. */
extern void env_dek_state_init(EnvDekState *state, const uint8 *dek);

/* Wipe a state's key bytes without calling OpenSSL (signal-safe). */
extern void env_dek_state_wipe_bytes(EnvDekState *state);

/* Wipe a state's key material (the context stays allocated for reuse). */
extern void env_dek_state_clear(EnvDekState *state);

/*
 * The per-value key and key commitment of a value sealed with algorithm
 * algo (format.h) under state's data key and the value's salt.  The caller
 * compares commit with the stored one and wipes value_key when done.
 */
extern void env_value_key(EnvDekState *state, int algo, const uint8 *salt,
						  uint8 *value_key, uint8 *commit);

/*
 * Encrypt plaintext into ciphertext (same length) and tag under value_key,
 * authenticating header (ENV_HEADER_LEN bytes) and context.
 */
extern void env_seal(const uint8 *value_key, const uint8 *nonce,
					 const uint8 *header, const uint8 *context, int context_len,
					 const uint8 *plaintext, int len,
					 uint8 *ciphertext, uint8 *tag);

/*
 * Decrypt and authenticate; returns false when the tag does not verify, with
 * no plaintext left.  plaintext may equal ciphertext or start before it in
 * the same buffer.
 */
extern bool env_open(const uint8 *value_key, const uint8 *nonce,
					 const uint8 *header, const uint8 *context, int context_len,
					 const uint8 *ciphertext, int len, const uint8 *tag,
					 uint8 *plaintext);

/*
 * Choose the AES-GCM implementation (server start): src/aesgcm.c if the CPU
 * can run it and it passes a self-test against OpenSSL.  Returns its name.
 */
extern const char *env_crypto_select(void);

/* SHA-256 over several byte strings, concatenated. */
extern void env_sha256(const uint8 *const *parts, const size_t *lens, int nparts,
					   uint8 *digest);

/* out = HMAC-SHA256(key, a || b), for keys of at most 64 bytes. */
extern void env_hmac_sha256(const uint8 *key, size_t keylen, const uint8 *a, size_t alen,
							const uint8 *b, size_t blen, uint8 *out);

/* Constant-time comparison of two equal-length buffers. */
extern bool env_equal_ct(const uint8 *a, const uint8 *b, int len);

/* Wipe key material so the compiler cannot elide it. */
extern void env_wipe(void *p, size_t len);

#endif							/* ENVELOPE_CRYPTO_H */

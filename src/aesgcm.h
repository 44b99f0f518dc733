/*-------------------------------------------------------------------------
 *
 * aesgcm.h
 *		AES-256 and AES-256-GCM for x86-64 CPUs with VAES, VPCLMULQDQ and
 *		AVX-512 (src/aesgcm.c); crypto.c uses it in place of OpenSSL's
 *		EVP calls when the CPU has these instructions, the self-test against
 *		OpenSSL passed and envelope.crypto_backend allows it.
 *
 * Standalone: no PostgreSQL headers, so test/c/aesgcm_check.c can compare it
 * with OpenSSL outside a server.
 *
 *-------------------------------------------------------------------------
 */
#ifndef ENVELOPE_AESGCM_H
#define ENVELOPE_AESGCM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define ENV_AES_SCHEDULE_LEN	240		/* 15 round keys of AES-256 */

/* True if this CPU (and OS) can run the functions below. */
extern bool env_aesgcm_cpu_ok(void);

/* Expand a 32-byte AES-256 key into its 15 encryption round keys. */
extern void env_aes256_schedule(const uint8_t *key, uint8_t *schedule);

/* Encrypt two 16-byte blocks (in and out: 32 bytes) under a schedule. */
extern void env_aes256_encrypt2(const uint8_t *schedule, const uint8_t *in,
								uint8_t *out);

/*
 * AES-256-GCM with a 96-bit nonce and a 16-byte tag (NIST SP 800-38D).
 * out may equal in, or start before it (out <= in); otherwise the buffers
 * must not overlap.
 */
extern void env_aesgcm_seal(const uint8_t *key, const uint8_t *nonce,
							const uint8_t *aad, size_t aad_len,
							const uint8_t *in, uint8_t *out, size_t len,
							uint8_t *tag);

/*
 * Verify the tag first; only if it matches decrypt in into out (same
 * overlap rules as seal) and return true.  On a mismatch nothing is
 * written.
 */
extern bool env_aesgcm_open(const uint8_t *key, const uint8_t *nonce,
							const uint8_t *aad, size_t aad_len,
							const uint8_t *in, uint8_t *out, size_t len,
							const uint8_t *tag);

#endif							/* ENVELOPE_AESGCM_H */

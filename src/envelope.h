/*-------------------------------------------------------------------------
 *
 * envelope.h
 *		Settings and limits shared by envelope's subsystems.
 *
 * Each subsystem has its own header with a narrow interface:
 *		format.h	the enc_bytea value layout (parse and build)
 *		crypto.h	AES-256-GCM, per-value key derivation, key commitment
 *		keycache.h	unwrapped data keys held for a short time
 *		kek.h		the KEK registry (envelope.kek)
 *		kms.h		the KMS provider interface and its dispatcher
 *		http.h		HTTPS requests that honour query cancel
 *		jsonx.h		extraction of fields from KMS JSON answers
 *
 *-------------------------------------------------------------------------
 */
#ifndef ENVELOPE_H
#define ENVELOPE_H

#include "compat.h"

/*
 * envelope's own message domain: the log hook tells envelope's reports from
 * PostgreSQL's by it (and translations would use it).
 */
#undef TEXTDOMAIN
#define TEXTDOMAIN PG_TEXTDOMAIN("envelope")

/* Size of a data key (DEK) and of every per-value key: AES-256. */
#define ENV_KEY_LEN			32

/* Settings (GUCs), defined in envelope.c. */
extern char *envelope_default_kek;
extern char *envelope_vault_addr;
extern char *envelope_vault_token_file;
extern char *envelope_vault_ca_file;
extern char *envelope_vault_namespace;
extern char *envelope_vault_mount;
extern int	envelope_kms_timeout;		/* milliseconds */
extern int	envelope_cache_ttl;			/* seconds */
extern int	envelope_cache_size;		/* entries */
extern int	envelope_dek_max_uses;
extern int	envelope_dek_max_age;		/* seconds */
extern bool envelope_kms_verify;
extern int	envelope_kms_retries;
extern int	envelope_kms_outage_grace;	/* seconds */

#endif							/* ENVELOPE_H */

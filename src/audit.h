/*-------------------------------------------------------------------------
 *
 * audit.h
 *		The audit trail: tamper-evident log records of key use (per session
 *		and query over a short interval, per statement, or per value) and of
 *		key management.
 *
 *-------------------------------------------------------------------------
 */
#ifndef ENVELOPE_AUDIT_H
#define ENVELOPE_AUDIT_H

#include "fmgr.h"

/* envelope.audit */
typedef enum EnvAuditLevel
{
	ENV_AUDIT_OFF,
	ENV_AUDIT_SUMMARY,
	ENV_AUDIT_STATEMENT,
	ENV_AUDIT_VALUE
} EnvAuditLevel;

/* Key uses that are counted per statement. */
typedef enum EnvAuditUse
{
	ENV_USE_DECRYPT,
	ENV_USE_ENCRYPT,
	ENV_USE_REWRAP
} EnvAuditUse;

extern int	envelope_audit;
extern int	envelope_audit_summary_interval;	/* milliseconds */
extern char *envelope_audit_hmac_key_file;

/* Incremented when a top-level statement starts (any backend-local use). */
extern uint64 env_statement_id;

/* Define the audit settings and install the executor hooks (from _PG_init). */
extern void env_audit_init(void);

/* Shared memory: the record chain and the parallel workers' mailboxes. */
extern void env_audit_shmem_request(void);
extern Size env_audit_shmem_size(void);
extern void env_audit_shmem_init(void);

/*
 * Report a key-management event ("kek_create", "kek_rotate", "kek_retire",
 * "grant", "revoke", ...) for a KEK and version (0: none).  extra is NULL or
 * a JSON object whose fields are added to the record.  Always emitted,
 * whatever envelope.audit says.
 */
extern void env_audit(const char *event, const char *kek, int32 version, const char *extra);

/*
 * Count one successful key use by the current user for this statement's
 * record; kms_calls is how many KMS calls this backend made for it.  With
 * envelope.audit = value, a decrypt is also recorded at once, with the
 * fingerprint of value (the stored enc_bytea bytes).
 */
extern void env_audit_use(EnvAuditUse use, const char *kek, int32 version,
						  int64 kms_calls, const void *value, Size value_len);

/* The sweeper: write pending summaries that are due (idle sessions). */
extern void env_audit_sweep(void);

/* Record a refused key use at once (before the caller raises 42501). */
extern void env_audit_denied(const char *kek, int32 version, const char *privilege);

/* Is the report being emitted one of envelope's audit records? */
extern bool env_audit_emitting(void);

/* The fingerprint of a stored value: 32 hex digits and a NUL in hex. */
extern void env_audit_fingerprint(const void *value, Size len, char *hex);

#endif							/* ENVELOPE_AUDIT_H */

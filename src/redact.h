/*-------------------------------------------------------------------------
 *
 * redact.h
 *		Keeping plaintext out of the server log (emit_log_hook).
 *
 *-------------------------------------------------------------------------
 */
#ifndef ENVELOPE_REDACT_H
#define ENVELOPE_REDACT_H

#include "storage/shmem.h"

/* Install the emit_log_hook (from _PG_init). */
extern void env_redact_init(void);

/*
 * Called on entry to enc(), dec() and rewrap(): remember that the statement
 * being run involves envelope, so everything logged about it is masked even
 * when its text does not name envelope's functions (a wrapper function).
 */
extern void env_redact_note_use(void);

/* Shared memory for the names of decrypting views (from shmem.c). */
extern void env_redact_shmem_request(void);
extern Size env_redact_shmem_size(void);
extern void env_redact_shmem_init(void);

/* A utility statement (DDL) runs in this transaction (ProcessUtility hook). */
extern void env_redact_note_utility(void);

/* At a top-level statement boundary: refresh the names of decrypting views. */
extern void env_redact_refresh(void);

#endif							/* ENVELOPE_REDACT_H */

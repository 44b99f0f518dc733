/*-------------------------------------------------------------------------
 *
 * audit.h
 *		The single place where envelope reports key-management events.
 *
 *-------------------------------------------------------------------------
 */
#ifndef ENVELOPE_AUDIT_H
#define ENVELOPE_AUDIT_H

/*
 * Report an event ("kek_create", "kek_rotate", "kek_retire", "rewrap") for a
 * KEK and version (0: none).  extra is NULL or a JSON object whose fields
 * are added to the record.
 */
extern void env_audit(const char *event, const char *kek, int32 version, const char *extra);

#endif							/* ENVELOPE_AUDIT_H */

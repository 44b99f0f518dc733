/*-------------------------------------------------------------------------
 *
 * authz.h
 *		The one authorization step every key use passes through.
 *
 *-------------------------------------------------------------------------
 */
#ifndef ENVELOPE_AUTHZ_H
#define ENVELOPE_AUTHZ_H

#include "kek.h"
#include "nodes/pg_list.h"

typedef enum EnvPrivilege
{
	ENV_PRIV_ENCRYPT,
	ENV_PRIV_DECRYPT,
	ENV_PRIV_REWRAP
} EnvPrivilege;

/*
 * Check that the current user may use kek for priv (version: the one the
 * value is on, 0 if not known yet); raises 42501 if not.
 * Called on every enc(), dec() and rewrap() call, before the key cache is
 * consulted, so a cache hit never bypasses it.
 */
extern void env_authorize(const KekInfo *kek, EnvPrivilege priv, int32 version);

/* DROP ROLE refuses roles with KEK privileges; DROP OWNED BY removes them. */
extern void env_authz_check_drop_role(List *roles);
extern void env_authz_drop_owned(List *roles);

/* Raise 42501 unless the current user is a superuser or envelope_admin member. */
extern void env_require_admin(const char *what);

/* A hook other modules may set to add checks; it must raise to deny. */
typedef void (*env_authorize_hook_type) (const KekInfo *kek, EnvPrivilege priv);
extern PGDLLIMPORT env_authorize_hook_type env_authorize_hook;

#endif							/* ENVELOPE_AUTHZ_H */

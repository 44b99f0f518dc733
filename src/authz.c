/*-------------------------------------------------------------------------
 *
 * authz.c
 *		The one authorization step every key use passes through.
 *
 * Today every role that can call enc(), dec() and rewrap() may use every
 * registered KEK: access is governed by EXECUTE on the functions and by the
 * privileges on the tables.  Per-KEK privileges (encrypt, decrypt, rewrap)
 * and the audit trail are to be filled in here; the call sites already pass
 * through this function on every call, cache hit or miss.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "authz.h"

env_authorize_hook_type env_authorize_hook = NULL;

/* Check that the current user may use kek for priv; raises 42501 if not. */
void
env_authorize(const KekInfo *kek, EnvPrivilege priv)
{
	if (env_authorize_hook)
		env_authorize_hook(kek, priv);
}

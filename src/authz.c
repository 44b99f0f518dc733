/*-------------------------------------------------------------------------
 *
 * authz.c
 *		Per-KEK privileges: the one authorization step every key use passes
 *		through, and the functions that grant and revoke them.
 *
 * A role may use a KEK to encrypt, decrypt or rewrap if it is a superuser
 * or has the privileges of a role that was granted that privilege on the
 * KEK (envelope.kek_grant, changed through envelope.grant and
 * envelope.revoke).  Being a member of envelope_admin lets a role manage
 * KEKs and grants, not use keys.
 *
 * Each backend keeps a copy of envelope.kek_grant, read with SPI and a fresh
 * snapshot, and drops it when a relcache invalidation for the table arrives
 * (a statement trigger sends one on every change).  At the first key use of
 * each top-level statement the backend processes pending invalidations
 * itself, so a committed revoke applies to the next statement of every
 * session, even inside an open transaction block.  Within a statement the
 * decision for a (role, KEK, privilege) is remembered; role membership is
 * PostgreSQL's own (has_privs_of_role), with its own invalidation.
 *
 * env_authorize() runs before the key cache is consulted, so a key another
 * role put in the shared cache never lets a role without the privilege
 * decrypt.  Refusals are audited before the error is raised.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "envelope.h"
#include "access/heapam.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "access/genam.h"
#include "catalog/indexing.h"
#include "catalog/namespace.h"
#include "catalog/dependency.h"
#include "catalog/pg_depend.h"
#include "commands/extension.h"
#include "catalog/pg_authid.h"
#include "catalog/pg_extension.h"
#include "utils/fmgroids.h"
#include "commands/trigger.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "storage/lmgr.h"
#include "nodes/parsenodes.h"
#include "utils/acl.h"
#include "catalog/pg_type.h"
#include "utils/builtins.h"
#include "utils/json.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"

#include "audit.h"
#include "authz.h"
#include "shmem.h"

PG_FUNCTION_INFO_V1(envelope_grant);
PG_FUNCTION_INFO_V1(envelope_revoke);
PG_FUNCTION_INFO_V1(envelope_kek_grant_changed);

#define ADMIN_ROLE		"envelope_admin"
#define MEMO_SIZE		16

static const char *const priv_names[] = {"encrypt", "decrypt", "rewrap"};

/* One row of envelope.kek_grant. */
typedef struct KekGrant
{
	char		kek[NAMEDATALEN];
	EnvPrivilege priv;
	Oid			grantee;
} KekGrant;

/* A decision already taken in this statement. */
typedef struct AuthzMemo
{
	Oid			userid;
	EnvPrivilege priv;
	char		kek[NAMEDATALEN];
} AuthzMemo;

env_authorize_hook_type env_authorize_hook = NULL;

static KekGrant *grants = NULL;
static int	ngrants = 0;
static bool grants_valid = false;
static Oid	grants_relid = InvalidOid;
static bool callbacks_registered = false;

static AuthzMemo memo[MEMO_SIZE];
static int	nmemo = 0;
static uint64 memo_statement = 0;
static bool memo_started = false;

/* Relcache callback: drop the copy when envelope.kek_grant changes. */
static void
grants_relcache_cb(Datum arg, Oid relid)
{
	if (relid == InvalidOid || relid == grants_relid)
	{
		grants_valid = false;
		nmemo = 0;
	}
}

/*
 * envelope.kek_grant of the envelope extension installed in this database,
 * or InvalidOid: a table of that name that is not the extension's own (any
 * database owner can create a schema "envelope") is never trusted.
 */
static Oid
kek_grant_relation(void)
{
	Oid			ext = get_extension_oid("envelope", true);
	Oid			nsp;
	Oid			relid;

	if (!OidIsValid(ext))
		return InvalidOid;
	nsp = get_namespace_oid("envelope", true);
	relid = OidIsValid(nsp) ? get_relname_relid("kek_grant", nsp) : InvalidOid;
	if (!OidIsValid(relid) || getExtensionOfObject(RelationRelationId, relid) != ext)
		return InvalidOid;
	return relid;
}

/* The privilege named by s, or -1. */
static int
parse_privilege(const char *s)
{
	for (int i = 0; i < (int) lengthof(priv_names); i++)
		if (pg_strcasecmp(s, priv_names[i]) == 0)
			return i;
	return -1;
}

/*
 * (Re)load envelope.kek_grant (absent before ALTER EXTENSION UPDATE: no
 * grants).  The table is read directly with a fresh catalog snapshot, never
 * the transaction's: a REPEATABLE READ transaction must not keep using a
 * grant revoked after it started, and parallel workers (which cannot take
 * query snapshots) must see what their leader sees.
 */
static void
grants_load(void)
{
	KekGrant   *fresh;
	int			n = 0;
	int			cap = 16;
	Relation	rel;
	Snapshot	snap;
	TableScanDesc scan;
	HeapTuple	tup;

	if (!callbacks_registered)
	{
		CacheRegisterRelcacheCallback(grants_relcache_cb, (Datum) 0);
		callbacks_registered = true;
	}
	grants_relid = kek_grant_relation();
	if (!OidIsValid(grants_relid))
	{
		ngrants = 0;
		grants_valid = true;
		return;
	}
	rel = table_open(grants_relid, AccessShareLock);
	{
		TupleDesc	d = RelationGetDescr(rel);

		/* (kek text, grantee regrole, privilege text, ...), as created */
		if (d->natts < 3 || TupleDescAttr(d, 0)->atttypid != TEXTOID ||
			TupleDescAttr(d, 1)->atttypid != REGROLEOID ||
			TupleDescAttr(d, 2)->atttypid != TEXTOID)
			ereport(ERROR,
					(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
					 errmsg("envelope.kek_grant does not have the expected columns")));
	}
	grants_valid = true;		/* an invalidation during the load clears it */
	fresh = MemoryContextAllocZero(TopMemoryContext, sizeof(KekGrant) * cap);
	snap = RegisterSnapshot(GetCatalogSnapshot(grants_relid));
	scan = table_beginscan(rel, snap, 0, NULL);
	while ((tup = heap_getnext(scan, ForwardScanDirection)) != NULL)
	{
		TupleDesc	desc = RelationGetDescr(rel);
		bool		isnull[3];
		Datum		kek = heap_getattr(tup, 1, desc, &isnull[0]);
		Datum		grantee = heap_getattr(tup, 2, desc, &isnull[1]);
		Datum		privilege = heap_getattr(tup, 3, desc, &isnull[2]);
		int			priv;

		if (isnull[0] || isnull[1] || isnull[2])
			continue;
		priv = parse_privilege(TextDatumGetCString(privilege));
		if (priv < 0)
			continue;
		if (n >= cap)
		{
			cap *= 2;
			fresh = repalloc(fresh, sizeof(KekGrant) * cap);
		}
		text_to_cstring_buffer(DatumGetTextPP(kek), fresh[n].kek, NAMEDATALEN);
		fresh[n].priv = (EnvPrivilege) priv;
		fresh[n].grantee = DatumGetObjectId(grantee);
		n++;
	}
	table_endscan(scan);
	UnregisterSnapshot(snap);
	table_close(rel, AccessShareLock);

	if (grants)
		pfree(grants);
	grants = fresh;
	ngrants = n;
}

/* Does userid hold priv on the KEK named kek (directly or through a role)? */
static bool
has_kek_privilege(Oid userid, const char *kek, EnvPrivilege priv)
{
	if (superuser_arg(userid))
		return true;
	if (!grants_valid)
		grants_load();
	for (int i = 0; i < ngrants; i++)
		if (grants[i].priv == priv && strcmp(grants[i].kek, kek) == 0 &&
			has_privs_of_role(userid, grants[i].grantee))
			return true;
	return false;
}

/* Check that the current user may use kek for priv; raises 42501 if not. */
void
env_authorize(const KekInfo *kek, EnvPrivilege priv, int32 version)
{
	Oid			userid = GetUserId();

	/* First use in a statement: apply revokes committed since the last one. */
	if (memo_statement != env_statement_id || !memo_started)
	{
		AcceptInvalidationMessages();
		nmemo = 0;
		memo_statement = env_statement_id;
		memo_started = true;
	}
	for (int i = 0; i < nmemo; i++)
		if (memo[i].userid == userid && memo[i].priv == priv &&
			strcmp(memo[i].kek, kek->name) == 0)
			goto allowed;

	if (!has_kek_privilege(userid, kek->name, priv))
	{
		env_audit_denied(kek->name, version, priv_names[priv]);
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied for KEK \"%s\"", kek->name),
				 errdetail("Role \"%s\" does not have the %s privilege on KEK \"%s\".",
						   GetUserNameFromId(userid, false), priv_names[priv], kek->name),
				 errhint("A superuser or a member of %s can grant it with envelope.grant().",
						 ADMIN_ROLE)));
	}
	if (nmemo < MEMO_SIZE)
	{
		memo[nmemo].userid = userid;
		memo[nmemo].priv = priv;
		strlcpy(memo[nmemo].kek, kek->name, NAMEDATALEN);
		nmemo++;
	}

allowed:
	if (env_authorize_hook)
		env_authorize_hook(kek, priv);
}

/*
 * Before DROP ROLE: refuse to drop a role that holds KEK privileges in this
 * database, as PostgreSQL does for roles with privileges on objects.
 */
void
env_authz_check_drop_role(List *roles)
{
	ListCell   *lc;

	if (!IsTransactionState() || !OidIsValid(kek_grant_relation()))
		return;
	AcceptInvalidationMessages();
	if (!grants_valid)
		grants_load();
	foreach(lc, roles)
	{
		RoleSpec   *spec = lfirst(lc);
		Oid			role;

		if (spec->roletype != ROLESPEC_CSTRING)
			continue;
		role = get_role_oid(spec->rolename, true);
		for (int i = 0; OidIsValid(role) && i < ngrants; i++)
			if (grants[i].grantee == role)
				ereport(ERROR,
						(errcode(ERRCODE_DEPENDENT_OBJECTS_STILL_EXIST),
						 errmsg("role \"%s\" cannot be dropped because it holds privileges on KEK \"%s\"",
								spec->rolename, grants[i].kek),
						 errhint("Revoke them with envelope.revoke() first, or run DROP OWNED BY.")));
	}
}

/* The owner of the envelope extension in this database. */
static Oid
extension_owner(void)
{
	Relation	rel = table_open(ExtensionRelationId, AccessShareLock);
	ScanKeyData key;
	SysScanDesc scan;
	HeapTuple	tup;
	Oid			owner = InvalidOid;

	ScanKeyInit(&key, Anum_pg_extension_extname, BTEqualStrategyNumber,
				F_NAMEEQ, CStringGetDatum("envelope"));
	scan = systable_beginscan(rel, ExtensionNameIndexId, true, NULL, 1, &key);
	if (HeapTupleIsValid(tup = systable_getnext(scan)))
		owner = ((Form_pg_extension) GETSTRUCT(tup))->extowner;
	systable_endscan(scan);
	table_close(rel, AccessShareLock);
	return owner;
}

/* After DROP OWNED BY: drop the roles' KEK privileges in this database too. */
void
env_authz_drop_owned(List *roles)
{
	ListCell   *lc;
	Oid			save_userid;
	int			save_sec;
	Oid			owner;
	Oid		   *oids;
	uint64	   *deleted;
	int			n = 0;

	if (!OidIsValid(kek_grant_relation()) || !OidIsValid(owner = extension_owner()))
		return;
	AcceptInvalidationMessages();
	if (!grants_valid)
		grants_load();

	/* Resolve the roles as the caller (CURRENT_USER means the caller). */
	oids = palloc0(sizeof(Oid) * list_length(roles));
	deleted = palloc0(sizeof(uint64) * list_length(roles));
	foreach(lc, roles)
	{
		Oid			role = get_rolespec_oid(lfirst(lc), true);

		bool		listed = false;

		for (int r = 0; r < n; r++)
			listed |= (oids[r] == role);
		for (int i = 0; OidIsValid(role) && !listed && i < ngrants; i++)
			if (grants[i].grantee == role)
			{
				oids[n++] = role;
				break;
			}
	}
	if (n == 0)
	{
		pfree(oids);
		pfree(deleted);
		return;
	}

	/*
	 * DROP OWNED BY checked that the caller may act for these roles; the
	 * grants are deleted as the extension's owner, since the caller need not
	 * be able to change envelope.kek_grant.
	 */
	GetUserIdAndSecContext(&save_userid, &save_sec);
	SetUserIdAndSecContext(owner, save_sec | SECURITY_LOCAL_USERID_CHANGE |
						   SECURITY_RESTRICTED_OPERATION);
	PG_TRY();
	{
		SPI_connect();
		for (int r = 0; r < n; r++)
		{
			Oid			argtypes[1] = {OIDOID};
			Datum		values[1] = {ObjectIdGetDatum(oids[r])};

			if (SPI_execute_with_args("DELETE FROM envelope.kek_grant "
									  "WHERE grantee OPERATOR(pg_catalog.=) $1::pg_catalog.regrole",
									  1, argtypes, values, NULL, false, 0) < 0)
				elog(ERROR, "could not change envelope.kek_grant");
			deleted[r] = SPI_processed;
		}
		SPI_finish();
	}
	PG_FINALLY();
	{
		SetUserIdAndSecContext(save_userid, save_sec);
	}
	PG_END_TRY();

	/* Audited as the caller. */
	for (int r = 0; r < n; r++)
	{
		StringInfoData extra;

		initStringInfo(&extra);
		appendStringInfoString(&extra, "{\"grantee\": ");
		escape_json(&extra, GetUserNameFromId(oids[r], false));
		appendStringInfo(&extra, ", \"privileges\": " UINT64_FORMAT ", \"by\": \"DROP OWNED\"}",
						 deleted[r]);
		env_audit("revoke", NULL, 0, extra.data);
		pfree(extra.data);
	}
	pfree(oids);
	pfree(deleted);
}

/* Raise 42501 unless the current user may manage KEKs (what: the action). */
void
env_require_admin(const char *what)
{
	Oid			admin = get_role_oid(ADMIN_ROLE, true);

	if (superuser() || (OidIsValid(admin) && has_privs_of_role(GetUserId(), admin)))
		return;
	ereport(ERROR,
			(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
			 errmsg("permission denied to %s", what),
			 errdetail("Only superusers and members of %s manage KEKs and their privileges.",
					   ADMIN_ROLE)));
}

/* Run one statement on envelope.kek_grant for each privilege named by privname. */
static void
change_grant(FunctionCallInfo fcinfo, bool grant)
{
	char	   *kek_name = text_to_cstring(PG_GETARG_TEXT_PP(0));
	Oid			role = PG_GETARG_OID(1);
	char	   *privname = text_to_cstring(PG_GETARG_TEXT_PP(2));
	KekInfo		kek;
	int			first,
				last;
	Oid			argtypes[4] = {TEXTOID, OIDOID, TEXTOID, OIDOID};
	char	   *role_name;
	char	   *changes[lengthof(priv_names)];
	MemoryContext outer;
	Oid			owner;
	Oid			save_userid;
	int			save_sec;

	env_require_shared();
	env_require_admin(grant ? "grant KEK privileges" : "revoke KEK privileges");
	kek_lookup(kek_name, &kek, false);
	role_name = GetUserNameFromId(role, true);
	if (role_name == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("role with OID %u does not exist", role)));
	if (pg_strcasecmp(privname, "all") == 0)
	{
		first = 0;
		last = lengthof(priv_names) - 1;
	}
	else if ((first = last = parse_privilege(privname)) < 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("unrecognized KEK privilege \"%s\"", privname),
				 errhint("Use encrypt, decrypt, rewrap or all.")));
	if (!OidIsValid(kek_grant_relation()) || !OidIsValid(owner = extension_owner()))
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("envelope.kek_grant does not exist"),
				 errhint("Run ALTER EXTENSION envelope UPDATE.")));

	/*
	 * The table is changed as the extension's owner: admins cannot write it
	 * directly, so every change goes through here and is audited.
	 */
	GetUserIdAndSecContext(&save_userid, &save_sec);
	SetUserIdAndSecContext(owner, save_sec | SECURITY_LOCAL_USERID_CHANGE |
						   SECURITY_RESTRICTED_OPERATION);
	outer = CurrentMemoryContext;
	SPI_connect();
	for (int p = first; p <= last; p++)
	{
		Datum		values[4];
		StringInfoData extra;

		values[0] = CStringGetTextDatum(kek.name);
		values[1] = ObjectIdGetDatum(role);
		values[2] = CStringGetTextDatum(priv_names[p]);
		values[3] = ObjectIdGetDatum(save_userid);
		if (SPI_execute_with_args(grant ?
								  "INSERT INTO envelope.kek_grant (kek, grantee, privilege, granted_by) "
								  "VALUES ($1, $2::pg_catalog.regrole, $3, $4::pg_catalog.regrole) "
								  "ON CONFLICT DO NOTHING" :
								  "DELETE FROM envelope.kek_grant WHERE kek OPERATOR(pg_catalog.=) $1 "
								  "AND grantee OPERATOR(pg_catalog.=) $2::pg_catalog.regrole "
								  "AND privilege OPERATOR(pg_catalog.=) $3",
								  grant ? 4 : 3, argtypes, values, NULL, false, 0) < 0)
			elog(ERROR, "could not change envelope.kek_grant");
		initStringInfo(&extra);
		appendStringInfoString(&extra, "{\"grantee\": ");
		escape_json(&extra, role_name);
		appendStringInfo(&extra, ", \"privilege\": \"%s\", \"changed\": %s}",
						 priv_names[p], SPI_processed > 0 ? "true" : "false");
		changes[p] = MemoryContextStrdup(outer, extra.data);	/* (SPI's is freed) */
	}
	SPI_finish();
	SetUserIdAndSecContext(save_userid, save_sec);

	/* Audited as the caller. */
	for (int p = first; p <= last; p++)
	{
		env_audit(grant ? "grant" : "revoke", kek.name, 0, changes[p]);
		pfree(changes[p]);
	}
}

/* envelope.grant(kek text, role regrole, privilege text) */
Datum
envelope_grant(PG_FUNCTION_ARGS)
{
	change_grant(fcinfo, true);
	PG_RETURN_VOID();
}

/* envelope.revoke(kek text, role regrole, privilege text) */
Datum
envelope_revoke(PG_FUNCTION_ARGS)
{
	change_grant(fcinfo, false);
	PG_RETURN_VOID();
}

/* Statement trigger on envelope.kek_grant: every backend drops its copy. */
Datum
envelope_kek_grant_changed(PG_FUNCTION_ARGS)
{
	TriggerData *trigdata = (TriggerData *) fcinfo->context;

	if (!CALLED_AS_TRIGGER(fcinfo))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("envelope.kek_grant_changed() must be called as a trigger")));
	CacheInvalidateRelcacheByRelid(RelationGetRelid(trigdata->tg_relation));
	grants_valid = false;
	nmemo = 0;
	return PointerGetDatum(NULL);
}

/*-------------------------------------------------------------------------
 *
 * kek.c
 *		The KEK registry (envelope.kek) and the functions that manage it.
 *
 * The registry is a small table, marked as extension configuration so
 * pg_dump keeps it.  Each backend reads it once with SPI and keeps a copy
 * until it is invalidated: a statement trigger on envelope.kek calls
 * envelope.kek_changed(), which queues a relcache invalidation for the
 * table; every backend processes it at its next transaction start (and the
 * writing backend at its next command), and our relcache callback drops the
 * copy.  So create_kek and rotate_kek take effect in all sessions for their
 * next transaction without any per-row catalog access.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "catalog/namespace.h"
#include "commands/trigger.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/json.h"
#include "utils/datum.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "access/xact.h"
#include "storage/lmgr.h"

#include "envelope.h"
#include "kek.h"
#include "audit.h"
#include "authz.h"
#include "keycache.h"
#include "shmem.h"

PG_FUNCTION_INFO_V1(envelope_create_kek);
PG_FUNCTION_INFO_V1(envelope_rotate_kek);
PG_FUNCTION_INFO_V1(envelope_kek_changed);
PG_FUNCTION_INFO_V1(envelope_kms_retire);

static KekInfo *registry = NULL;
static int	registry_count = 0;
static bool registry_valid = false;
static bool registry_from_parallel = false;	/* loaded with a query's snapshot */
static Oid	registry_relid = InvalidOid;
static uint64 registry_generation = 0;	/* counts loads */

/* Relcache callback: drop the cached registry when envelope.kek changes. */
static void
kek_relcache_cb(Datum arg, Oid relid)
{
	if (relid == InvalidOid || relid == registry_relid)
		registry_valid = false;
}

/* Transaction end: a registry read with a query's snapshot is not kept. */
static void
kek_xact_cb(XactEvent event, void *arg)
{
	if (registry_from_parallel &&
		(event == XACT_EVENT_COMMIT || event == XACT_EVENT_ABORT ||
		 event == XACT_EVENT_PARALLEL_COMMIT || event == XACT_EVENT_PARALLEL_ABORT))
	{
		registry_valid = false;
		registry_from_parallel = false;
	}
}

/* Register the callbacks that drop the cached registry. */
void
kek_init(void)
{
	CacheRegisterRelcacheCallback(kek_relcache_cb, (Datum) 0);
	RegisterXactCallback(kek_xact_cb, NULL);
}

/* OID of envelope.kek, or an error if the extension is not installed. */
static Oid
registry_table(void)
{
	Oid			nsp = get_namespace_oid("envelope", true);
	Oid			relid = OidIsValid(nsp) ? get_relname_relid("kek", nsp) : InvalidOid;

	if (!OidIsValid(relid))
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("extension \"envelope\" is not installed in this database"),
				 errhint("Run CREATE EXTENSION envelope.")));
	return relid;
}

/*
 * (Re)load the registry into TopMemoryContext.
 *
 * Locking the table first processes pending invalidations, and the rows are
 * read with a fresh snapshot rather than the caller's: otherwise a backend
 * in a long transaction could load rows older than an invalidation it has
 * already processed and keep them for good.
 */
static void
registry_load(void)
{
	KekInfo    *fresh = NULL;
	int			n = 0;
	SPIPlanPtr	plan;

	registry_relid = registry_table();
	LockRelationOid(registry_relid, AccessShareLock);
	registry_valid = true;		/* an invalidation during the load clears it */
	registry_from_parallel = IsInParallelMode();

	SPI_connect();
	PG_TRY();
	{
		plan = SPI_prepare("SELECT name, provider, key_ref, latest_version, min_decryption_version "
						   "FROM envelope.kek",
						   0, NULL);
		if (plan == NULL ||
			SPI_execute_snapshot(plan, NULL, NULL,
								 /* parallel workers share the leader's snapshot */
								 IsInParallelMode() ? GetActiveSnapshot() : GetLatestSnapshot(),
								 InvalidSnapshot,
								 true, false, 0) != SPI_OK_SELECT)
			elog(ERROR, "could not read envelope.kek");
		n = (int) SPI_processed;
		fresh = MemoryContextAllocZero(TopMemoryContext, sizeof(KekInfo) * Max(n, 1));
		for (int i = 0; i < n; i++)
		{
			HeapTuple	tup = SPI_tuptable->vals[i];
			TupleDesc	desc = SPI_tuptable->tupdesc;
			bool		isnull;
			char	   *s;

			s = SPI_getvalue(tup, desc, 1);
			strlcpy(fresh[i].name, s, NAMEDATALEN);
			s = SPI_getvalue(tup, desc, 2);
			strlcpy(fresh[i].provider_name, s, NAMEDATALEN);
			fresh[i].provider = kms_provider(s, true);
			s = SPI_getvalue(tup, desc, 3);
			strlcpy(fresh[i].key_ref, s, sizeof(fresh[i].key_ref));
			fresh[i].latest_version = DatumGetInt32(SPI_getbinval(tup, desc, 4, &isnull));
			fresh[i].min_decryption_version = DatumGetInt32(SPI_getbinval(tup, desc, 5, &isnull));
		}
	}
	PG_CATCH();
	{
		registry_valid = false;
		PG_RE_THROW();
	}
	PG_END_TRY();
	SPI_finish();

	if (registry)
		pfree(registry);
	registry = fresh;
	registry_count = n;
	registry_generation++;
}

/* Look up a KEK by name into *out; false (or an error) if it is not registered. */
bool
kek_lookup(const char *name, KekInfo *out, bool missing_ok)
{
	bool		reloaded = false;

	for (;;)
	{
		if (!registry_valid)
		{
			registry_load();
			reloaded = true;
		}
		for (int i = 0; i < registry_count; i++)
		{
			if (strcmp(registry[i].name, name) == 0)
			{
				*out = registry[i];
				if (out->provider == NULL)
					ereport(ERROR,
							(errcode(ERRCODE_UNDEFINED_OBJECT),
							 errmsg("KMS provider \"%s\" of KEK \"%s\" is not available in this build",
									out->provider_name, name)));
				return true;
			}
		}
		if (reloaded)
			break;

		/*
		 * A name we do not know may have arrived without an invalidation
		 * (rows applied by logical replication fire no triggers): read the
		 * registry again once before giving up.
		 */
		registry_valid = false;
	}
	if (!missing_ok)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("KEK \"%s\" does not exist", name),
				 errhint("Register it with envelope.create_kek(), or see envelope.keks for the registered KEKs.")));
	return false;
}

/* True if a registered KEK has the provider and key the value names. */
static bool
kek_matches(const KekInfo *kek, const EnvKekRef *ref)
{
	return strlen(kek->provider_name) == (size_t) ref->provider_len &&
		memcmp(kek->provider_name, ref->provider, ref->provider_len) == 0 &&
		strlen(kek->key_ref) == (size_t) ref->key_ref_len &&
		memcmp(kek->key_ref, ref->key_ref, ref->key_ref_len) == 0;
}

/* The KEK a value names, checked against the registry (raises on mismatch). */
void
kek_for_value(const EnvKekRef *ref, KekInfo *out)
{
	char		name[ENV_MAX_NAME_LEN + 1];

	memcpy(name, ref->kek_name, ref->kek_name_len);
	name[ref->kek_name_len] = '\0';
	if (!kek_lookup(name, out, true))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("KEK \"%s\" of this value does not exist", name),
				 errhint("Register the KEK with envelope.create_kek() using the provider and key reference shown by envelope.metadata().")));
	if (!kek_matches(out, ref))
	{
		/* The registry may have changed without an invalidation: re-read once. */
		registry_valid = false;
		if (!kek_lookup(name, out, true))
			ereport(ERROR,
					(errcode(ERRCODE_UNDEFINED_OBJECT),
					 errmsg("KEK \"%s\" of this value does not exist", name)));
	}
	if (!kek_matches(out, ref))
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("KMS key of this value does not match KEK \"%s\"", name),
				 errdetail("The value names provider \"%.*s\" and key \"%.*s\"; the registry has provider \"%s\" and key \"%s\".",
						   ref->provider_len, ref->provider, ref->key_ref_len, ref->key_ref,
						   out->provider_name, out->key_ref)));
}

/* A remembered registry entry: valid while the registry is not reloaded. */
typedef struct RegistryMemo
{
	int			index;
	uint64		generation;
} RegistryMemo;

/* The remembered entry, or NULL if there is none or the registry was reloaded. */
static const KekInfo *
memo_entry(const RegistryMemo *m)
{
	if (registry_valid && m->index >= 0 && m->index < registry_count &&
		m->generation == registry_generation)
		return &registry[m->index];
	return NULL;
}

/* The entry named name (just looked up, so present), remembered in m. */
static const KekInfo *
memo_find(RegistryMemo *m, const char *name)
{
	for (int i = 0; i < registry_count; i++)
	{
		if (strcmp(registry[i].name, name) == 0)
		{
			m->index = i;
			m->generation = registry_generation;
			return &registry[i];
		}
	}
	elog(ERROR, "KEK \"%s\" vanished from the registry", name);
	return NULL;				/* keep the compiler quiet */
}

/*
 * The registry entry of the KEK a value names, checked against the value
 * (kek_for_value's checks): a pointer that stays valid until the next
 * lookup.  The entry found last is tried first, so a scan over values of
 * one KEK neither searches nor copies the registry per value.
 */
const KekInfo *
kek_of_value(const EnvKekRef *ref)
{
	static RegistryMemo memo = {-1, 0};
	const KekInfo *e = memo_entry(&memo);
	KekInfo		found;

	if (e != NULL &&
		strncmp(e->name, ref->kek_name, ref->kek_name_len) == 0 &&
		e->name[ref->kek_name_len] == '\0' && kek_matches(e, ref))
		return e;
	kek_for_value(ref, &found);
	return memo_find(&memo, found.name);
}

/*
 * kek_lookup() as a pointer into the registry (no copy), valid until the
 * next lookup; raises an error if the KEK is not registered.
 */
const KekInfo *
kek_find(const char *name)
{
	static RegistryMemo memo = {-1, 0};
	const KekInfo *e = memo_entry(&memo);
	KekInfo		found;

	if (e != NULL && strcmp(e->name, name) == 0)
		return e;
	kek_lookup(name, &found, false);
	return memo_find(&memo, name);
}

/* True if s is a valid KEK name: 1-63 letters, digits, "_", "-", ".". */
static bool
valid_kek_name(const char *s)
{
	size_t		len = strlen(s);

	return len > 0 && len < NAMEDATALEN &&
		strspn(s, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-") == len;
}

/* envelope.create_kek(name, provider, key_ref): check with the KMS, then register. */
Datum
envelope_create_kek(PG_FUNCTION_ARGS)
{
	char	   *name;
	char	   *provider_name;
	char	   *key_ref;
	const KmsProvider *provider;
	KmsKeyInfo	info;
	KekInfo		existing;
	Datum		values[5];
	Oid			types[5] = {TEXTOID, TEXTOID, TEXTOID, INT4OID, INT4OID};

	env_require_shared();
	env_require_admin("create KEKs");
	if (PG_ARGISNULL(0) || PG_ARGISNULL(1) || PG_ARGISNULL(2))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("KEK name, provider and key reference must not be null")));
	name = text_to_cstring(PG_GETARG_TEXT_PP(0));
	provider_name = text_to_cstring(PG_GETARG_TEXT_PP(1));
	key_ref = text_to_cstring(PG_GETARG_TEXT_PP(2));

	if (!valid_kek_name(name))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_NAME),
				 errmsg("invalid KEK name \"%s\"", name),
				 errdetail("KEK names have 1 to %d letters, digits, \"_\", \".\" or \"-\".", NAMEDATALEN - 1)));
	if (strlen(key_ref) == 0 || strlen(key_ref) > ENV_MAX_KEYREF_LEN)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid key reference"),
				 errdetail("Key references have 1 to %d characters.", ENV_MAX_KEYREF_LEN)));
	provider = kms_provider(provider_name, false);
	if (kek_lookup(name, &existing, true))
		ereport(ERROR,
				(errcode(ERRCODE_DUPLICATE_OBJECT),
				 errmsg("KEK \"%s\" already exists", name)));

	kms_key_info(provider, key_ref, &info);

	values[0] = CStringGetTextDatum(name);
	values[1] = CStringGetTextDatum(provider_name);
	values[2] = CStringGetTextDatum(key_ref);
	values[3] = Int32GetDatum(info.latest_version);
	values[4] = Int32GetDatum(info.min_decryption_version);
	SPI_connect();
	if (SPI_execute_with_args("INSERT INTO envelope.kek (name, provider, key_ref, latest_version, min_decryption_version) "
							  "VALUES ($1, $2, $3, $4, $5)",
							  5, types, values, NULL, false, 0) != SPI_OK_INSERT)
		elog(ERROR, "could not insert into envelope.kek");
	SPI_finish();
	{
		StringInfoData extra;

		initStringInfo(&extra);
		appendStringInfoString(&extra, "{\"provider\": ");
		escape_json(&extra, provider_name);
		appendStringInfoString(&extra, ", \"key_ref\": ");
		escape_json(&extra, key_ref);
		appendStringInfoChar(&extra, '}');
		env_audit("kek_create", name, info.latest_version, extra.data);
	}
	PG_RETURN_INT32(info.latest_version);
}

/* envelope.rotate_kek(name): new KEK version in the KMS, used at once. */
Datum
envelope_rotate_kek(PG_FUNCTION_ARGS)
{
	char	   *name = text_to_cstring(PG_GETARG_TEXT_PP(0));
	KekInfo		kek;
	KmsKeyInfo	info;
	Datum		values[3];
	Oid			types[3] = {TEXTOID, INT4OID, INT4OID};

	env_require_shared();
	env_require_admin("rotate KEKs");
	kek_lookup(name, &kek, false);
	kms_rotate(kek.provider, kek.key_ref);
	kms_key_info(kek.provider, kek.key_ref, &info);
	if (info.latest_version <= kek.latest_version)
		ereport(ERROR,
				(errcode(ERRCODE_PROTOCOL_VIOLATION),
				 errmsg("KMS did not create a new version of key \"%s\"", kek.key_ref),
				 errdetail("The latest version was %d before the rotation and is %d after it.",
						   kek.latest_version, info.latest_version)));

	values[0] = CStringGetTextDatum(name);
	values[1] = Int32GetDatum(info.latest_version);
	values[2] = Int32GetDatum(info.min_decryption_version);
	SPI_connect();
	if (SPI_execute_with_args("UPDATE envelope.kek SET latest_version = $2, min_decryption_version = $3, "
							  "rotated_at = pg_catalog.now() WHERE name OPERATOR(pg_catalog.=) $1",
							  3, types, values, NULL, false, 0) != SPI_OK_UPDATE)
		elog(ERROR, "could not update envelope.kek");
	SPI_finish();

	/* The KEK's current data key is now stale, in every backend. */
	keycache_retire_current(name);
	env_audit("kek_rotate", name, info.latest_version, NULL);
	PG_RETURN_INT32(info.latest_version);
}

/*
 * envelope._kms_retire(name, version): make the KMS refuse to decrypt with
 * version and older (min_decryption_version = version + 1), then record it.
 * Called by envelope.retire_kek_version() once no value uses those versions.
 */
Datum
envelope_kms_retire(PG_FUNCTION_ARGS)
{
	char	   *name = text_to_cstring(PG_GETARG_TEXT_PP(0));
	int32		version = PG_GETARG_INT32(1);
	KekInfo		kek;
	KmsKeyInfo	info;
	Datum		values[2];
	Oid			types[2] = {TEXTOID, INT4OID};

	env_require_shared();
	env_require_admin("retire KEK versions");
	kek_lookup(name, &kek, false);
	kms_key_info(kek.provider, kek.key_ref, &info);
	if (version < 1 || version >= info.latest_version)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("cannot retire version %d of KEK \"%s\"", version, name),
				 errdetail("Only versions below the latest (%d) can be retired.", info.latest_version),
				 errhint("Rotate the KEK first with envelope.rotate_kek().")));
	if (version < info.min_decryption_version)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("version %d of KEK \"%s\" is already retired", version, name),
				 errdetail("The KMS decrypts only versions %d and later.", info.min_decryption_version)));

	/*
	 * Record the retirement first and change the KMS last, so that a failed
	 * registry update leaves the KMS untouched.  (The KMS change itself is
	 * not transactional: a later ROLLBACK cannot undo it.)
	 */
	values[0] = CStringGetTextDatum(name);
	values[1] = Int32GetDatum(version + 1);
	SPI_connect();
	if (SPI_execute_with_args("UPDATE envelope.kek SET min_decryption_version = $2, retired_at = pg_catalog.now() "
							  "WHERE name OPERATOR(pg_catalog.=) $1",
							  2, types, values, NULL, false, 0) != SPI_OK_UPDATE)
		elog(ERROR, "could not update envelope.kek");
	SPI_finish();

	kms_set_min_decryption_version(kek.provider, kek.key_ref, version + 1);
	kms_key_info(kek.provider, kek.key_ref, &info);
	if (info.min_decryption_version != version + 1)
		ereport(ERROR,
				(errcode(ERRCODE_PROTOCOL_VIOLATION),
				 errmsg("KMS did not retire version %d of key \"%s\"", version, kek.key_ref),
				 errdetail("Its minimum decryption version is %d after the change.",
						   info.min_decryption_version)));
	env_audit("kek_retire", name, version,
			  psprintf("{\"min_decryption_version\": %d}", version + 1));
	PG_RETURN_INT32(version + 1);
}

/*
 * Trigger on envelope.kek: tell every backend to reload the registry.  For
 * a row deleted or whose identity or minimum version changed, wipe what the
 * key cache holds for that KEK; for a new latest version (rotation), retire
 * only its current encryption key, since older versions still decrypt.
 */
Datum
envelope_kek_changed(PG_FUNCTION_ARGS)
{
	TriggerData *trigdata = (TriggerData *) fcinfo->context;

	if (!CALLED_AS_TRIGGER(fcinfo))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("envelope.kek_changed() must be called as a trigger")));
	CacheInvalidateRelcacheByRelid(RelationGetRelid(trigdata->tg_relation));
	registry_valid = false;

	/* Every change of the registry is audited, also direct DML by an admin. */
	if (TRIGGER_FIRED_FOR_STATEMENT(trigdata->tg_event))
		env_audit("registry_change", NULL, 0,
				  TRIGGER_FIRED_BY_INSERT(trigdata->tg_event) ? "{\"op\": \"INSERT\"}" :
				  TRIGGER_FIRED_BY_UPDATE(trigdata->tg_event) ? "{\"op\": \"UPDATE\"}" :
				  TRIGGER_FIRED_BY_DELETE(trigdata->tg_event) ? "{\"op\": \"DELETE\"}" :
				  "{\"op\": \"TRUNCATE\"}");

	/* TRUNCATE has no row trigger: every KEK's cached keys go. */
	if (TRIGGER_FIRED_BY_TRUNCATE(trigdata->tg_event))
	{
		env_require_shared();
		keycache_flush(NULL);
	}

	if (TRIGGER_FIRED_FOR_ROW(trigdata->tg_event))
	{
		TupleDesc	desc = RelationGetDescr(trigdata->tg_relation);
		bool		isnull;
		char	   *name;
		bool		identity_changed = true;

		name = TextDatumGetCString(heap_getattr(trigdata->tg_trigtuple, 1, desc, &isnull));
		if (TRIGGER_FIRED_BY_UPDATE(trigdata->tg_event))
		{
			/* name, provider, key_ref, latest_version, min_decryption_version */
			identity_changed = false;
			for (int att = 1; att <= 5; att++)
			{
				bool		n1,
							n2;
				Datum		d1 = heap_getattr(trigdata->tg_trigtuple, att, desc, &n1);
				Datum		d2 = heap_getattr(trigdata->tg_newtuple, att, desc, &n2);
				Form_pg_attribute a = TupleDescAttr(desc, att - 1);

				if (att == 4)
					continue;	/* a new latest version only retires the current key */
				if (n1 != n2 || (!n1 && !datumIsEqual(d1, d2, a->attbyval, a->attlen)))
					identity_changed = true;
			}
		}
		env_require_shared();
		if (identity_changed)
			keycache_flush(name);
		else
			keycache_retire_current(name);
	}
	return PointerGetDatum(NULL);
}

/*-------------------------------------------------------------------------
 *
 * audit.c
 *		The audit trail: records of key use and key management, written to
 *		the server log through ereport, chained with an HMAC.
 *
 * Every record is one server log line (LOG_SERVER_ONLY, so it never reaches
 * the client whatever client_min_messages says, and follows log_destination
 * to stderr, csvlog or jsonlog): the prefix "ENVELOPE AUDIT: " and a JSON
 * object, for example
 *
 *	ENVELOPE AUDIT: {"seq": 7, "ts": "2026-11-29T10:00:00.000001Z",
 *	"event": "decrypt", "user": "app", "session_user": "app", "db": "shop",
 *	"app": "psql", "client": "10.0.0.5:51234", "pid": 4242, "query_id": 0,
 *	"kek": "pii", "kek_version": 2, "values": 3, "cache_hits": 3,
 *	"kms_calls": 0, "workers": 0, "outcome": "ok", "hmac": "9f2c..."}
 *
 * Key uses (decrypt, encrypt, rewrap) are counted per top-level statement in
 * backend-local memory, one aggregate per (use, KEK, version, user), and
 * written when the statement ends (outcome "ok") or fails ("error"); the
 * executor and utility hooks below track the nesting level to find the top
 * level, as pg_stat_statements does.  Parallel workers hand their counts to
 * the leader through a mailbox in shared memory (one per backend, indexed by
 * the leader's pgprocno, protected by a spinlock); the leader merges it
 * after its workers have finished.  A worker that fails writes its own
 * record.  With envelope.audit = value each decrypt also writes a record at
 * once, with the value's fingerprint.  Refusals ("denied") and KEK
 * management are written at once, whatever envelope.audit says.
 *
 * Tamper evidence: records carry a server-wide sequence number and, when
 * envelope.audit_hmac_key_file is set, hmac = HMAC-SHA256(key, previous
 * record's hmac in hex || this record up to ", \"hmac\""); the first record
 * after a server start ("audit_start", seq 1) chains to 64 zeros.  The
 * sequence number and the previous HMAC live in shared memory; the
 * "envelope_audit" LWLock is held exclusively while a record is numbered,
 * signed and written, so records reach the log in chain order.  The key is
 * read once, by the postmaster, into shared memory that is excluded from
 * core dumps.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "access/parallel.h"
#include "access/xact.h"
#include "commands/dbcommands.h"
#include "executor/executor.h"
#include "lib/stringinfo.h"
#include "libpq/libpq-be.h"
#include "miscadmin.h"
#include "pgtime.h"
#include "storage/ipc.h"
#include "storage/lwlock.h"
#include "storage/proc.h"
#include "storage/shmem.h"
#include "storage/spin.h"
#include "tcop/utility.h"
#include "utils/backend_status.h"
#include "utils/queryjumble.h"
#include "utils/builtins.h"
#include "utils/datetime.h"
#include "utils/guc.h"
#include "utils/inval.h"
#include "utils/json.h"
#include "utils/syscache.h"
#include "utils/jsonb.h"
#include "utils/timestamp.h"

#include "envelope.h"
#include "audit.h"
#include "authz.h"
#include "crypto.h"
#include "format.h"
#include "redact.h"

PG_FUNCTION_INFO_V1(envelope_audit_event);
PG_FUNCTION_INFO_V1(envelope_fingerprint);

#define AUDIT_TRANCHE		"envelope_audit"
#define AUDIT_PREFIX		"ENVELOPE AUDIT: "
#define AUDIT_MAX_AGGS		32	/* aggregates a backend keeps per statement */
#define AUDIT_SLOT_AGGS		8	/* aggregates a mailbox holds */
#define AUDIT_SLOT_SUMS		8	/* summary aggregates a backend's slot holds */
#define AUDIT_MAX_KEY		64	/* HMAC block size; longer keys are hashed */

int			envelope_audit = ENV_AUDIT_SUMMARY;
int			envelope_audit_summary_interval = 1000;	/* milliseconds */
char	   *envelope_audit_hmac_key_file = NULL;
uint64		env_statement_id = 0;

static const struct config_enum_entry audit_options[] = {
	{"off", ENV_AUDIT_OFF, false},
	{"summary", ENV_AUDIT_SUMMARY, false},
	{"statement", ENV_AUDIT_STATEMENT, false},
	{"value", ENV_AUDIT_VALUE, false},
	{NULL, 0, false}
};

static const char *const use_names[] = {"decrypt", "encrypt", "rewrap"};

/* Counts of one kind of key use within a statement. */
typedef struct AuditAgg
{
	int			use;			/* EnvAuditUse */
	int32		version;
	char		kek[NAMEDATALEN];
	char		user[NAMEDATALEN];
	int64		values;
	int64		hits;
	int64		kms_calls;
	int32		workers;		/* parallel workers whose counts are in it */
	int64		statements;		/* summary: statements counted in it */
	int64		query_id;		/* summary: the statements' query_id */
} AuditAgg;

/* Who a summary record is about: the session fields of add_common(). */
typedef struct AuditWho
{
	char		session_user[NAMEDATALEN];
	char		db[NAMEDATALEN];
	char		app[NAMEDATALEN];
	char		client[128];
	int			pid;
} AuditWho;

/*
 * A backend's slot: the mailbox where its parallel workers leave their
 * counts, and its pending summary (envelope.audit = summary), which the
 * backend or the sweeper writes once it is envelope.audit_summary_interval
 * old.  The spinlock protects both.
 */
typedef struct AuditSlot
{
	slock_t		mutex;
	int			n;
	AuditAgg	agg[AUDIT_SLOT_AGGS];
	int			nsum;
	TimestampTz sum_since;		/* when the oldest pending count was added */
	uint64		who_id;			/* which backend's session fields who holds */
	AuditWho	who;
	AuditAgg	sum[AUDIT_SLOT_SUMS];
} AuditSlot;

typedef struct AuditShared
{
	uint64		seq;			/* last record's number; 0: none yet */
	char		prev[65];		/* last record's hmac, hex */
	bool		have_key;
	int			key_len;
	uint8		key[AUDIT_MAX_KEY];
	int			nslots;
	AuditSlot	slots[FLEXIBLE_ARRAY_MEMBER];
} AuditShared;

static AuditShared *audit_shared = NULL;
static bool audit_emitting = false;	/* true while our own record is reported */
static LWLock *audit_lock = NULL;

static void audit_exit_cb(int code, Datum arg);

/* This backend's counts for the current top-level statement. */
static AuditAgg aggs[AUDIT_MAX_AGGS];
static int	naggs = 0;
static int	last_agg = -1;		/* where the previous use went */
static int	nesting_level = 0;
static bool exit_cb_registered = false;
static bool failed_since_use = false;	/* a subtransaction failed since counting */

/* Names looked up while catalog access works, for records written on abort. */
static Oid	user_oid = InvalidOid;
static char user_name[NAMEDATALEN];
static Oid	session_oid = InvalidOid;
static char session_name[NAMEDATALEN];
static char *db_name = NULL;
static char *client_addr = NULL;

static ExecutorStart_hook_type prev_ExecutorStart = NULL;
static ExecutorRun_hook_type prev_ExecutorRun = NULL;
static ExecutorFinish_hook_type prev_ExecutorFinish = NULL;
static ExecutorEnd_hook_type prev_ExecutorEnd = NULL;
static ProcessUtility_hook_type prev_ProcessUtility = NULL;

/* Request the audit chain's lock (from the shmem_request_hook). */
void
env_audit_shmem_request(void)
{
	RequestNamedLWLockTranche(AUDIT_TRANCHE, 1);
}

/* Size of the shared struct with its mailboxes, plus page-alignment slack. */
Size
env_audit_shmem_size(void)
{
	Size		size = add_size(offsetof(AuditShared, slots),
								mul_size(MaxBackends, sizeof(AuditSlot)));

	return add_size(size, mul_size((Size) sysconf(_SC_PAGESIZE), 2));
}

/* Read the HMAC key file into the shared struct (postmaster, at startup). */
static void
audit_load_key(AuditShared *sh)
{
	const char *path = envelope_audit_hmac_key_file;
	uint8		buf[1024 + 1];
	struct stat st;
	ssize_t		n;
	int			fd;

	if (path == NULL || path[0] == '\0')
	{
		ereport(WARNING,
				(errcode(ERRCODE_WARNING),
				 errmsg("envelope.audit_hmac_key_file is not set: audit records are numbered but not signed"),
				 errhint("Set envelope.audit_hmac_key_file to a file of at least 32 random bytes, readable only by the server, to make the audit trail tamper-evident.")));
		return;
	}
	fd = open(path, O_RDONLY | PG_BINARY, 0);
	if (fd < 0)
		ereport(FATAL,
				(errcode_for_file_access(),
				 errmsg("could not open audit HMAC key file \"%s\": %m", path)));
	if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode))
		ereport(FATAL,
				(errcode(ERRCODE_CONFIG_FILE_ERROR),
				 errmsg("audit HMAC key file \"%s\" is not a regular file", path)));
	if ((st.st_mode & (S_IRWXG | S_IRWXO)) != 0)
		ereport(FATAL,
				(errcode(ERRCODE_CONFIG_FILE_ERROR),
				 errmsg("audit HMAC key file \"%s\" has group or world access", path),
				 errdetail("The file must not be readable by other users: anyone who can read the key can forge audit records."),
				 errhint("Run chmod 0600 on the file.")));
	n = read(fd, buf, sizeof(buf));
	close(fd);
	if (n < 32 || n > 1024)
	{
		env_wipe(buf, sizeof(buf));
		ereport(FATAL,
				(errcode(ERRCODE_CONFIG_FILE_ERROR),
				 errmsg("audit HMAC key file \"%s\" must hold between 32 and 1024 bytes", path)));
	}
	if (n > AUDIT_MAX_KEY)
	{
		/* RFC 2104: a key longer than the block size is hashed first. */
		const uint8 *parts[1] = {buf};
		size_t		lens[1] = {(size_t) n};

		env_sha256(parts, lens, 1, sh->key);
		sh->key_len = 32;
	}
	else
	{
		memcpy(sh->key, buf, n);
		sh->key_len = (int) n;
	}
	env_wipe(buf, sizeof(buf));
	sh->have_key = true;
}

/* Create or attach the shared struct (caller holds AddinShmemInitLock). */
void
env_audit_shmem_init(void)
{
	Size		page = (Size) sysconf(_SC_PAGESIZE);
	bool		found;
	char	   *raw;

	raw = ShmemInitStruct("envelope audit", env_audit_shmem_size(), &found);
	audit_shared = (AuditShared *) TYPEALIGN(page, raw);
	audit_lock = &(GetNamedLWLockTranche(AUDIT_TRANCHE))[0].lock;
	if (!found)
	{
		Size		len = add_size(offsetof(AuditShared, slots),
								   mul_size(MaxBackends, sizeof(AuditSlot)));

		memset(audit_shared, 0, len);
#ifdef MADV_DONTDUMP
		/* The HMAC key is in here: keep it out of core dumps. */
		(void) madvise(audit_shared, TYPEALIGN(page, len), MADV_DONTDUMP);
#endif
		memset(audit_shared->prev, '0', 64);
		audit_shared->nslots = MaxBackends;
		for (int i = 0; i < MaxBackends; i++)
			SpinLockInit(&audit_shared->slots[i].mutex);
		audit_load_key(audit_shared);
	}
}

/* Append ", "key": <JSON string or null>". */
static void
add_str(StringInfo buf, const char *key, const char *value)
{
	appendStringInfo(buf, ", \"%s\": ", key);
	if (value)
		escape_json(buf, value);
	else
		appendStringInfoString(buf, "null");
}

/* Syscache callback: a role changed (renamed): look its name up again. */
static void
audit_role_cb(Datum arg, int cacheid, uint32 hashvalue)
{
	user_oid = InvalidOid;
	session_oid = InvalidOid;
}

/* Remember names of the current and session users (needs catalog access). */
static void
audit_note_users(void)
{
	Oid			uid = GetUserId();
	Oid			sid = GetSessionUserId();

	if (uid != user_oid)
	{
		char	   *n = GetUserNameFromId(uid, true);

		strlcpy(user_name, n ? n : "", NAMEDATALEN);
		user_oid = uid;
	}
	if (sid != session_oid)
	{
		char	   *n = GetUserNameFromId(sid, true);

		strlcpy(session_name, n ? n : "", NAMEDATALEN);
		session_oid = sid;
	}
	if (db_name == NULL && OidIsValid(MyDatabaseId))
	{
		char	   *n = get_database_name(MyDatabaseId);

		if (n)
			db_name = MemoryContextStrdup(TopMemoryContext, n);
	}
	if (client_addr == NULL && MyProcPort && MyProcPort->remote_host)
	{
		const char *port = MyProcPort->remote_port;

		client_addr = MemoryContextStrdup(TopMemoryContext,
										  psprintf(port && port[0] ? "%s:%s" : "%s",
												   MyProcPort->remote_host, port));
	}
}

/*
 * The session fields of records about this backend, rebuilt only when they
 * change (session user, application_name); *id identifies this version of
 * them (pid and a counter), so a slot can tell it holds them.
 */
static const AuditWho *
current_who(uint64 *id)
{
	static AuditWho who;
	static uint64 who_id = 0;
	static const char *who_app = NULL;
	static Oid	who_session = InvalidOid;
	static uint32 version = 0;

	if (who_id == 0 || who_app != application_name || who_session != session_oid ||
		who.pid != MyProcPid)
	{
		memset(&who, 0, sizeof(who));
		strlcpy(who.session_user, session_name, sizeof(who.session_user));
		strlcpy(who.db, db_name ? db_name : "", sizeof(who.db));
		strlcpy(who.app, application_name ? application_name : "", sizeof(who.app));
		strlcpy(who.client, client_addr ? client_addr : (MyProcPort ? "[local]" : ""),
				sizeof(who.client));
		who.pid = MyProcPid;
		who_app = application_name;
		who_session = session_oid;
		who_id = ((uint64) (uint32) MyProcPid << 32) | ++version;
	}
	*id = who_id;
	return &who;
}

/* add_common() for a summary record, from the fields kept in a slot. */
static void
add_common_who(StringInfo buf, const char *event, const char *user,
			   const AuditWho *w, int64 query_id)
{
	appendStringInfoString(buf, "\"event\": ");
	escape_json(buf, event);
	add_str(buf, "user", user);
	add_str(buf, "session_user", w->session_user);
	add_str(buf, "db", w->db[0] ? w->db : NULL);
	add_str(buf, "app", w->app);
	add_str(buf, "client", w->client[0] ? w->client : NULL);
	appendStringInfo(buf, ", \"pid\": %d, \"query_id\": " INT64_FORMAT, w->pid, query_id);
}

/* The fields every record has after "event", up to query_id. */
static void
add_common(StringInfo buf, const char *event, const char *user)
{
	appendStringInfoString(buf, "\"event\": ");
	escape_json(buf, event);
	add_str(buf, "user", user);
	add_str(buf, "session_user", session_name);
	add_str(buf, "db", db_name);
	add_str(buf, "app", application_name);
	add_str(buf, "client", client_addr ? client_addr : (MyProcPort ? "[local]" : NULL));
	appendStringInfo(buf, ", \"pid\": %d", MyProcPid);
	if (IsParallelWorker() && MyProc->lockGroupLeader)
		appendStringInfo(buf, ", \"leader_pid\": %d", MyProc->lockGroupLeader->pid);
	appendStringInfo(buf, ", \"query_id\": " INT64_FORMAT,
					 (int64) pgstat_get_my_query_id());
}

/* Hex of len bytes into out (2 * len + 1 chars), NUL-terminated. */
static void
to_hex(const uint8 *in, int len, char *out)
{
	out[hex_encode((const char *) in, len, out)] = '\0';
}

/* Append a time in UTC as 2026-11-29T10:00:00.000001Z. */
static void
append_utc(StringInfo buf, TimestampTz t)
{
	struct pg_tm tm;
	fsec_t		fsec;

	if (timestamp2tm(t, NULL, &tm, &fsec, NULL, NULL) == 0)
		appendStringInfo(buf, "%04d-%02d-%02dT%02d:%02d:%02d.%06dZ",
						 tm.tm_year, tm.tm_mon, tm.tm_mday,
						 tm.tm_hour, tm.tm_min, tm.tm_sec, (int) fsec);
}

/* Number, sign and write one record; the caller holds audit_lock. */
static void
emit_locked(const char *fields)
{
	StringInfoData rec;
	TimestampTz now = GetCurrentTimestamp();

	initStringInfo(&rec);
	audit_shared->seq++;
	appendStringInfo(&rec, "{\"seq\": " UINT64_FORMAT ", \"ts\": \"", audit_shared->seq);
	append_utc(&rec, now);
	appendStringInfo(&rec, "\", %s", fields);
	if (audit_shared->have_key)
	{
		uint8		mac[32];
		char		hex[65];

		env_hmac_sha256(audit_shared->key, audit_shared->key_len,
						(const uint8 *) audit_shared->prev, 64,
						(const uint8 *) rec.data, rec.len, mac);
		to_hex(mac, 32, hex);
		memcpy(audit_shared->prev, hex, 65);
		appendStringInfo(&rec, ", \"hmac\": \"%s\"}", hex);
	}
	else
		appendStringInfoChar(&rec, '}');

	audit_emitting = true;
	PG_TRY();
	{
		ereport(LOG_SERVER_ONLY,
				(errmsg_internal(AUDIT_PREFIX "%s", rec.data),
				 errhidestmt(true),
				 errhidecontext(true)));
	}
	PG_FINALLY();
	{
		audit_emitting = false;
	}
	PG_END_TRY();
	pfree(rec.data);
}

/* Is the report being emitted one of our records (for the log hook)? */
bool
env_audit_emitting(void)
{
	return audit_emitting;
}

/* Write a record with these fields (everything between "ts" and "hmac"). */
static void
audit_emit(const char *fields)
{
	if (audit_shared == NULL)
		return;					/* not preloaded: no function that audits works */
	LWLockAcquire(audit_lock, LW_EXCLUSIVE);
	if (audit_shared->seq == 0)
	{
		char	   *start = psprintf("\"event\": \"audit_start\", \"pid\": %d, \"signed\": %s",
									 MyProcPid, audit_shared->have_key ? "true" : "false");

		emit_locked(start);
		pfree(start);
	}
	emit_locked(fields);
	LWLockRelease(audit_lock);
}

/* Write one statement-level record for an aggregate. */
static void
emit_agg(const AuditAgg *a, const char *outcome)
{
	StringInfoData buf;

	initStringInfo(&buf);
	add_common(&buf, use_names[a->use], a->user);
	add_str(&buf, "kek", a->kek);
	appendStringInfo(&buf, ", \"kek_version\": %d, \"values\": " INT64_FORMAT
					 ", \"cache_hits\": " INT64_FORMAT ", \"kms_calls\": " INT64_FORMAT
					 ", \"workers\": %d",
					 a->version, a->values, a->hits, a->kms_calls, a->workers);
	add_str(&buf, "outcome", outcome);
	audit_emit(buf.data);
	pfree(buf.data);
}

/* Write and forget this backend's aggregates. */
static void
audit_flush(const char *outcome)
{
	int			n = naggs;

	/* Forget first: a failure while writing must not write them twice. */
	naggs = 0;
	last_agg = -1;
	failed_since_use = false;
	for (int i = 0; i < n; i++)
		emit_agg(&aggs[i], outcome);
}

/* Add counts to a list of aggregates; false if it is full. */
static bool
agg_add(AuditAgg *list, int *n, int max, const AuditAgg *a)
{
	for (int i = 0; i < *n; i++)
	{
		AuditAgg   *e = &list[i];

		if (e->use == a->use && e->version == a->version &&
			strcmp(e->kek, a->kek) == 0 && strcmp(e->user, a->user) == 0)
		{
			e->values += a->values;
			e->hits += a->hits;
			e->kms_calls += a->kms_calls;
			e->workers += a->workers;
			return true;
		}
	}
	if (*n >= max)
		return false;
	list[(*n)++] = *a;
	return true;
}

/* The mailbox of the backend whose statement this process works for. */
static AuditSlot *
audit_slot(bool for_leader)
{
	PGPROC	   *proc = for_leader && MyProc->lockGroupLeader ? MyProc->lockGroupLeader : MyProc;

	if (audit_shared == NULL || proc == NULL || proc->pgprocno < 0 ||
		proc->pgprocno >= audit_shared->nslots)
		return NULL;
	return &audit_shared->slots[proc->pgprocno];
}

/* Parallel worker: hand the counts to the leader; write what does not fit. */
static void
audit_push_to_leader(void)
{
	AuditSlot  *slot = audit_slot(true);
	AuditAgg	left[AUDIT_MAX_AGGS];
	int			nleft = 0;

	if (naggs == 0)
		return;
	if (slot == NULL)
	{
		audit_flush("ok");
		return;
	}
	SpinLockAcquire(&slot->mutex);
	for (int i = 0; i < naggs; i++)
	{
		aggs[i].workers = 1;
		if (!agg_add(slot->agg, &slot->n, AUDIT_SLOT_AGGS, &aggs[i]))
			left[nleft++] = aggs[i];
	}
	SpinLockRelease(&slot->mutex);
	naggs = 0;
	last_agg = -1;
	for (int i = 0; i < nleft; i++)
		emit_agg(&left[i], "ok");
}

/* Leader: merge what the workers left in the mailbox. */
static void
audit_collect_workers(void)
{
	AuditSlot  *slot = audit_slot(false);
	AuditAgg	got[AUDIT_SLOT_AGGS];
	int			ngot;

	if (slot == NULL)
		return;
	/* Workers have exited (or never ran): nothing to wait for, often nothing to take. */
	pg_read_barrier();
	if (slot->n == 0)
		return;
	SpinLockAcquire(&slot->mutex);
	ngot = slot->n;
	memcpy(got, slot->agg, sizeof(AuditAgg) * ngot);
	slot->n = 0;
	SpinLockRelease(&slot->mutex);
	for (int i = 0; i < ngot; i++)
		if (!agg_add(aggs, &naggs, AUDIT_MAX_AGGS, &got[i]))
			emit_agg(&got[i], "ok");
}

/* Write one summary record. */
static void
emit_summary(const AuditAgg *a, const AuditWho *w, TimestampTz since)
{
	StringInfoData buf;

	initStringInfo(&buf);
	add_common_who(&buf, use_names[a->use], a->user, w, a->query_id);
	add_str(&buf, "kek", a->kek);
	appendStringInfo(&buf, ", \"kek_version\": %d, \"statements\": " INT64_FORMAT
					 ", \"values\": " INT64_FORMAT ", \"cache_hits\": " INT64_FORMAT
					 ", \"kms_calls\": " INT64_FORMAT ", \"workers\": %d",
					 a->version, a->statements, a->values, a->hits, a->kms_calls,
					 a->workers);
	appendStringInfoString(&buf, ", \"since\": \"");
	append_utc(&buf, since);
	appendStringInfoChar(&buf, '"');
	add_str(&buf, "outcome", "ok");
	audit_emit(buf.data);
	pfree(buf.data);
}

/*
 * Take a slot's pending summary and write it, if there is one and (unless
 * force) it is envelope.audit_summary_interval old.  The backend (at a
 * statement's end, at exit) and the sweeper both call this; the spinlock
 * makes sure each count is written once.
 */
static void
summary_write(AuditSlot *slot, bool force, TimestampTz now)
{
	AuditAgg	got[AUDIT_SLOT_SUMS];
	AuditWho	who;
	TimestampTz since;
	int			ngot = 0;

	if (slot == NULL || slot->nsum == 0)	/* unlocked peek: a hint only */
		return;
	SpinLockAcquire(&slot->mutex);
	since = slot->sum_since;
	if (slot->nsum > 0 &&
		(force || now - since >=
		 (TimestampTz) envelope_audit_summary_interval * 1000))
	{
		ngot = slot->nsum;
		memcpy(got, slot->sum, sizeof(AuditAgg) * ngot);
		who = slot->who;
		slot->nsum = 0;
	}
	SpinLockRelease(&slot->mutex);
	for (int i = 0; i < ngot; i++)
		emit_summary(&got[i], &who, since);
}

/*
 * Add aggregates to a slot's pending summary (caller holds its spinlock);
 * those that find no room go to left[] (*nleft).
 */
static void
summary_merge(AuditSlot *slot, const AuditAgg *list, int n, int64 query_id,
			  TimestampTz now, const AuditWho *who, uint64 who_id,
			  AuditAgg *left, int *nleft)
{
	if (slot->nsum == 0)
	{
		slot->sum_since = now;
		slot->who = *who;
		slot->who_id = who_id;
	}
	for (int i = 0; i < n; i++)
	{
		const AuditAgg *a = &list[i];
		int			j;

		for (j = 0; j < slot->nsum; j++)
		{
			AuditAgg   *e = &slot->sum[j];

			if (e->use == a->use && e->version == a->version &&
				e->query_id == query_id &&
				strcmp(e->kek, a->kek) == 0 && strcmp(e->user, a->user) == 0)
				break;
		}
		if (j == slot->nsum)
		{
			if (slot->nsum == AUDIT_SLOT_SUMS)
			{
				left[(*nleft)++] = *a;
				continue;
			}
			slot->sum[j] = *a;
			slot->sum[j].values = slot->sum[j].hits = slot->sum[j].kms_calls = 0;
			slot->sum[j].workers = 0;
			slot->sum[j].statements = 0;
			slot->sum[j].query_id = query_id;
			slot->nsum++;
		}
		slot->sum[j].values += a->values;
		slot->sum[j].hits += a->hits;
		slot->sum[j].kms_calls += a->kms_calls;
		slot->sum[j].workers += a->workers;
		slot->sum[j].statements++;
	}
}

/*
 * envelope.audit = summary, when a top-level statement ends (or a procedure
 * commits): add its counts to the backend's pending summary (one aggregate
 * per use, KEK version, user and query_id, in shared memory so the sweeper
 * can write it if the session goes idle), and write the summary once it is
 * envelope.audit_summary_interval old.  A summary that is full, or about
 * other session fields (application_name changed), is written first.
 */
static void
summary_add(void)
{
	AuditSlot  *slot = audit_slot(false);
	const AuditWho *who;
	uint64		who_id;
	AuditAgg	left[AUDIT_MAX_AGGS];
	AuditAgg	rest[AUDIT_MAX_AGGS];
	int			nleft = 0;
	int			nrest = 0;
	int64		query_id = (int64) pgstat_get_my_query_id();
	TimestampTz now = GetCurrentStatementStartTimestamp();
	bool		other_session;
	bool		due;

	if (slot == NULL)
	{
		audit_flush("ok");
		return;
	}
	who = current_who(&who_id);
	SpinLockAcquire(&slot->mutex);
	other_session = slot->nsum > 0 && slot->who_id != who_id;
	if (other_session)
	{
		SpinLockRelease(&slot->mutex);
		summary_write(slot, true, now);
		SpinLockAcquire(&slot->mutex);
	}
	summary_merge(slot, aggs, naggs, query_id, now, who, who_id, left, &nleft);
	due = now - slot->sum_since >= (TimestampTz) envelope_audit_summary_interval * 1000;
	SpinLockRelease(&slot->mutex);
	naggs = 0;
	last_agg = -1;
	failed_since_use = false;

	if (nleft > 0)
	{
		/* No room: write the pending summary and start a new one. */
		summary_write(slot, true, GetCurrentStatementStartTimestamp());
		SpinLockAcquire(&slot->mutex);
		summary_merge(slot, left, nleft, query_id, now, who, who_id, rest, &nrest);
		SpinLockRelease(&slot->mutex);
		/* More kinds of use in one statement than a summary holds: now. */
		for (int i = 0; i < nrest; i++)
			emit_agg(&rest[i], "ok");
	}
	else if (due)
		summary_write(slot, false, now);
}

/* The sweeper: write pending summaries of idle sessions that are due. */
void
env_audit_sweep(void)
{
	TimestampTz now = GetCurrentTimestamp();

	if (audit_shared == NULL)
		return;
	for (int i = 0; i < audit_shared->nslots; i++)
		summary_write(&audit_shared->slots[i], false, now);
}

/*
 * A top-level statement starts: write what an earlier one left behind.  That
 * is a statement that failed inside a savepoint (a subtransaction aborted),
 * or a portal still open when the next one starts (extended protocol).
 */
static void
audit_statement_start(void)
{
	static bool slot_cleared = false;

	/* A mailbox left by a previous backend in this PGPROC slot is not ours. */
	if (!slot_cleared)
	{
		AuditSlot  *slot = audit_slot(false);

		if (slot)
		{
			SpinLockAcquire(&slot->mutex);
			slot->n = 0;
			SpinLockRelease(&slot->mutex);
			/* A summary a previous backend left here is written, not lost. */
			summary_write(slot, true, GetCurrentStatementStartTimestamp());
		}
		slot_cleared = true;
		if (!exit_cb_registered)
		{
			before_shmem_exit(audit_exit_cb, (Datum) 0);
			exit_cb_registered = true;
		}
	}
	/* Names for records written later, maybe where catalogs cannot be read. */
	if (IsTransactionState() && !IsAbortedTransactionBlockState())
		audit_note_users();
	audit_collect_workers();
	if (naggs > 0)
		audit_flush(failed_since_use ? "error" : "ok");
	env_statement_id++;
	env_redact_refresh();
}

/* A top-level statement ended without error. */
static void
audit_statement_end(void)
{
	if (IsParallelWorker())
		audit_push_to_leader();
	else
	{
		audit_collect_workers();
		if (naggs > 0 && envelope_audit == ENV_AUDIT_SUMMARY)
			summary_add();
		else if (naggs > 0)
			audit_flush("ok");
		else if (envelope_audit == ENV_AUDIT_SUMMARY)
			summary_write(audit_slot(false), false, GetCurrentStatementStartTimestamp());
	}
}

/* Transaction end: commit inside procedures, and failures. */
static void
audit_xact_cb(XactEvent event, void *arg)
{
	switch (event)
	{
		case XACT_EVENT_COMMIT:
			/* (a procedure's COMMIT, or the end of a statement's transaction) */
			audit_collect_workers();
			if (naggs > 0 && envelope_audit == ENV_AUDIT_SUMMARY && !IsParallelWorker())
				summary_add();
			else if (naggs > 0)
				audit_flush("ok");
			break;
		case XACT_EVENT_ABORT:
			/* (the hooks' PG_FINALLY blocks unwind nesting_level) */
			audit_collect_workers();
			if (naggs > 0)
				audit_flush("error");
			break;
		case XACT_EVENT_PARALLEL_ABORT:
			/* A failing worker writes its own record (with leader_pid). */
			if (naggs > 0)
				audit_flush("error");
			break;
		default:
			break;
	}
}

/* A subtransaction failed: the statement that used keys may have failed. */
static void
audit_subxact_cb(SubXactEvent event, SubTransactionId mySubid,
				 SubTransactionId parentSubid, void *arg)
{
	if (event == SUBXACT_EVENT_ABORT_SUB)
	{
		/* Workers of the failed statement have exited: take their counts. */
		audit_collect_workers();
		if (naggs > 0)
			failed_since_use = true;
	}
}

/* Backend exit (for example pg_terminate_backend mid-statement). */
static void
audit_exit_cb(int code, Datum arg)
{
	audit_collect_workers();
	if (naggs > 0)
		audit_flush("error");
	if (!IsParallelWorker())
		summary_write(audit_slot(false), true, GetCurrentStatementStartTimestamp());
}

/* ExecutorStart hook: a new top-level statement. */
static void
audit_ExecutorStart(QueryDesc *queryDesc, int eflags)
{
	if (nesting_level == 0 && !IsParallelWorker())
		audit_statement_start();
	if (prev_ExecutorStart)
		prev_ExecutorStart(queryDesc, eflags);
	else
		standard_ExecutorStart(queryDesc, eflags);
}

/* ExecutorRun hook: track the nesting level. */
static void
audit_ExecutorRun(QueryDesc *queryDesc, ScanDirection direction, uint64 count,
				  bool execute_once)
{
	nesting_level++;
	PG_TRY();
	{
		if (prev_ExecutorRun)
			prev_ExecutorRun(queryDesc, direction, count, execute_once);
		else
			standard_ExecutorRun(queryDesc, direction, count, execute_once);
	}
	PG_FINALLY();
	{
		nesting_level--;
	}
	PG_END_TRY();
}

/* ExecutorFinish hook: track the nesting level (AFTER triggers run here). */
static void
audit_ExecutorFinish(QueryDesc *queryDesc)
{
	nesting_level++;
	PG_TRY();
	{
		if (prev_ExecutorFinish)
			prev_ExecutorFinish(queryDesc);
		else
			standard_ExecutorFinish(queryDesc);
	}
	PG_FINALLY();
	{
		nesting_level--;
	}
	PG_END_TRY();
}

/* ExecutorEnd hook: a top-level query is done, its workers too. */
static void
audit_ExecutorEnd(QueryDesc *queryDesc)
{
	nesting_level++;
	PG_TRY();
	{
		if (prev_ExecutorEnd)
			prev_ExecutorEnd(queryDesc);
		else
			standard_ExecutorEnd(queryDesc);
	}
	PG_FINALLY();
	{
		nesting_level--;
	}
	PG_END_TRY();
	if (nesting_level == 0)
		audit_statement_end();
}

/* ProcessUtility hook: utility statements (CALL, EXECUTE, FETCH, DO...). */
static void
audit_ProcessUtility(PlannedStmt *pstmt, const char *queryString,
					 bool readOnlyTree, ProcessUtilityContext context,
					 ParamListInfo params, QueryEnvironment *queryEnv,
					 DestReceiver *dest, QueryCompletion *qc)
{
	volatile bool top = (nesting_level == 0 && !IsParallelWorker());

	if (top)
		audit_statement_start();
	if (!IsA(pstmt->utilityStmt, TransactionStmt) &&
		!IsA(pstmt->utilityStmt, VariableSetStmt) &&
		!IsA(pstmt->utilityStmt, VariableShowStmt))
		env_redact_note_utility();
	if (IsA(pstmt->utilityStmt, DropRoleStmt))
		env_authz_check_drop_role(((DropRoleStmt *) pstmt->utilityStmt)->roles);
	nesting_level++;
	PG_TRY();
	{
		if (prev_ProcessUtility)
			prev_ProcessUtility(pstmt, queryString, readOnlyTree, context,
								params, queryEnv, dest, qc);
		else
			standard_ProcessUtility(pstmt, queryString, readOnlyTree, context,
									params, queryEnv, dest, qc);
	}
	PG_FINALLY();
	{
		nesting_level--;
	}
	PG_END_TRY();
	if (IsA(pstmt->utilityStmt, DropOwnedStmt))
		env_authz_drop_owned(((DropOwnedStmt *) pstmt->utilityStmt)->roles);
	if (top)
		audit_statement_end();
}

/* Define the audit settings and install the executor hooks (from _PG_init). */
void
env_audit_init(void)
{
	DefineCustomEnumVariable("envelope.audit",
							 "Which key uses are written to the server log as audit records.",
							 "off: none (KEK management and refusals are always recorded); "
							 "summary: per session, one record per query, KEK version and user "
							 "every envelope.audit_summary_interval; "
							 "statement: one record per KEK version a statement used; "
							 "value: also one record per decrypted value.",
							 &envelope_audit,
							 ENV_AUDIT_SUMMARY, audit_options,
							 PGC_SUSET, 0,
							 NULL, NULL, NULL);

	DefineCustomIntVariable("envelope.audit_summary_interval",
							"Longest time counts wait in a session's pending summary record.",
							"With envelope.audit = summary; failed statements are written at once.",
							&envelope_audit_summary_interval,
							1000, 100, 3600 * 1000,
							PGC_SIGHUP, GUC_UNIT_MS,
							NULL, NULL, NULL);
	DefineCustomStringVariable("envelope.audit_hmac_key_file",
							   "File holding the key that signs the chain of audit records.",
							   "At least 32 bytes, readable only by the server; read at server start.",
							   &envelope_audit_hmac_key_file,
							   "",
							   PGC_POSTMASTER, GUC_SUPERUSER_ONLY,
							   NULL, NULL, NULL);

	/* Records carry query_id: compute it (compute_query_id = auto). */
	EnableQueryId();

	prev_ExecutorStart = ExecutorStart_hook;
	ExecutorStart_hook = audit_ExecutorStart;
	prev_ExecutorRun = ExecutorRun_hook;
	ExecutorRun_hook = audit_ExecutorRun;
	prev_ExecutorFinish = ExecutorFinish_hook;
	ExecutorFinish_hook = audit_ExecutorFinish;
	prev_ExecutorEnd = ExecutorEnd_hook;
	ExecutorEnd_hook = audit_ExecutorEnd;
	prev_ProcessUtility = ProcessUtility_hook;
	ProcessUtility_hook = audit_ProcessUtility;
	RegisterXactCallback(audit_xact_cb, NULL);
	RegisterSubXactCallback(audit_subxact_cb, NULL);
	CacheRegisterSyscacheCallback(AUTHOID, audit_role_cb, (Datum) 0);
}

/* The fingerprint of a stored value: 128 bits of SHA-256, in hex. */
void
env_audit_fingerprint(const void *value, Size len, char *hex)
{
	const uint8 *parts[1] = {(const uint8 *) value};
	size_t		lens[1] = {len};
	uint8		digest[32];

	env_sha256(parts, lens, 1, digest);
	to_hex(digest, 16, hex);
}

/* Count one successful key use for this statement's record. */
void
env_audit_use(EnvAuditUse use, const char *kek, int32 version,
			  int64 kms_calls, const void *value, Size value_len)
{
	AuditAgg   *a;

	if (envelope_audit == ENV_AUDIT_OFF)
		return;
	audit_note_users();
	if (!exit_cb_registered)
	{
		before_shmem_exit(audit_exit_cb, (Datum) 0);
		exit_cb_registered = true;
	}

	if (use == ENV_USE_DECRYPT && envelope_audit == ENV_AUDIT_VALUE && value)
	{
		StringInfoData buf;
		char		fp[33];

		env_audit_fingerprint(value, value_len, fp);
		initStringInfo(&buf);
		add_common(&buf, "decrypt", user_name);
		add_str(&buf, "kek", kek);
		appendStringInfo(&buf, ", \"kek_version\": %d, \"values\": 1, \"cache_hits\": %d"
						 ", \"kms_calls\": " INT64_FORMAT ", \"fingerprint\": \"%s\"",
						 version, kms_calls == 0 ? 1 : 0, kms_calls, fp);
		add_str(&buf, "outcome", "ok");
		audit_emit(buf.data);
		pfree(buf.data);
	}

	/* Most statements use one KEK version: try the last aggregate first. */
	a = (last_agg >= 0) ? &aggs[last_agg] : NULL;
	if (a == NULL || a->use != (int) use || a->version != version ||
		strcmp(a->kek, kek) != 0 || strcmp(a->user, user_name) != 0)
	{
		AuditAgg	fresh;

		memset(&fresh, 0, sizeof(fresh));
		fresh.use = use;
		fresh.version = version;
		strlcpy(fresh.kek, kek, NAMEDATALEN);
		strlcpy(fresh.user, user_name, NAMEDATALEN);
		if (!agg_add(aggs, &naggs, AUDIT_MAX_AGGS, &fresh))
		{
			/* Full (a statement with very many KEK versions): write now. */
			audit_flush("ok");
			agg_add(aggs, &naggs, AUDIT_MAX_AGGS, &fresh);
		}
		for (last_agg = 0; last_agg < naggs; last_agg++)
			if (aggs[last_agg].use == (int) use && aggs[last_agg].version == version &&
				strcmp(aggs[last_agg].kek, kek) == 0 &&
				strcmp(aggs[last_agg].user, user_name) == 0)
				break;
		a = &aggs[last_agg];
	}
	a->values++;
	if (kms_calls == 0)
		a->hits++;
	a->kms_calls += kms_calls;
}

/* Record a refused key use at once. */
void
env_audit_denied(const char *kek, int32 version, const char *privilege)
{
	StringInfoData buf;

	audit_note_users();
	initStringInfo(&buf);
	add_common(&buf, "denied", user_name);
	add_str(&buf, "kek", kek);
	if (version > 0)
		appendStringInfo(&buf, ", \"kek_version\": %d", version);
	add_str(&buf, "privilege", privilege);
	add_str(&buf, "outcome", "denied");
	audit_emit(buf.data);
	pfree(buf.data);
}

/* Report a key-management event for a KEK and version. */
void
env_audit(const char *event, const char *kek, int32 version, const char *extra)
{
	StringInfoData buf;

	audit_note_users();
	initStringInfo(&buf);
	add_common(&buf, event, user_name);
	add_str(&buf, "kek", kek);
	if (version > 0)
		appendStringInfo(&buf, ", \"kek_version\": %d", version);
	/* extra is a JSON object: splice its fields in. */
	if (extra && extra[0] == '{' && strlen(extra) > 2)
	{
		Size		len = strlen(extra);

		appendStringInfoString(&buf, ", ");
		appendBinaryStringInfo(&buf, extra + 1, len - 2);
	}
	add_str(&buf, "outcome", "ok");
	audit_emit(buf.data);
	pfree(buf.data);
}

/* envelope.audit_event(event, kek, kek_version, detail jsonb), for SQL procedures. */
Datum
envelope_audit_event(PG_FUNCTION_ARGS)
{
	char	   *event;
	char	   *kek = PG_ARGISNULL(1) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(1));
	int32		version = PG_ARGISNULL(2) ? 0 : PG_GETARG_INT32(2);
	char	   *extra = NULL;

	if (PG_ARGISNULL(0))
		PG_RETURN_VOID();
	event = text_to_cstring(PG_GETARG_TEXT_PP(0));
	/*
	 * Only the events envelope's own SQL procedures write: rewrap_column's
	 * progress (anyone may run it).  Records written this way say so.
	 */
	if (strcmp(event, "rewrap") != 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("audit event \"%s\" cannot be written from SQL", event)));
	/* The caller's fields go under "detail": they cannot pose as ours. */
	if (!PG_ARGISNULL(3))
		extra = psprintf("{\"via\": \"audit_event\", \"detail\": %s}",
						 JsonbToCString(NULL, &PG_GETARG_JSONB_P(3)->root,
										VARSIZE(PG_GETARG_JSONB_P(3))));
	env_audit(event, kek, version, extra);
	PG_RETURN_VOID();
}

/* envelope.fingerprint(enc_bytea): the fingerprint audit records give. */
Datum
envelope_fingerprint(PG_FUNCTION_ARGS)
{
	struct varlena *v = PG_GETARG_VARLENA_PP(0);
	char		hex[33];

	env_audit_fingerprint(VARDATA_ANY(v), VARSIZE_ANY_EXHDR(v), hex);
	PG_RETURN_TEXT_P(cstring_to_text(hex));
}

/*-------------------------------------------------------------------------
 *
 * audit.c
 *		The single place where envelope reports key-management events.
 *
 * Each event becomes one server log line, emitted with ereport(LOG) so it
 * follows log_destination (stderr, csvlog, jsonlog) and is never sent to
 * the client: the prefix "ENVELOPE AUDIT: " and a JSON object, for example
 *
 *	ENVELOPE AUDIT: {"event": "kek_rotate", "user": "alice", "session_user":
 *	"alice", "db": "app", "app": "psql", "pid": 4242, "kek": "pii",
 *	"kek_version": 3}
 *
 * The statement text is suppressed (errhidestmt) since it may carry
 * plaintext literals.  The access-control issue will add decrypt records,
 * per-KEK privileges and a tamper-evident chain here.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "commands/dbcommands.h"
#include "fmgr.h"
#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/json.h"
#include "utils/jsonb.h"

#include "audit.h"

PG_FUNCTION_INFO_V1(envelope_audit_event);

extern char *application_name;

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

/* Report an event for a KEK and version, with optional extra JSON fields. */
void
env_audit(const char *event, const char *kek, int32 version, const char *extra)
{
	StringInfoData buf;
	char	   *db = get_database_name(MyDatabaseId);

	initStringInfo(&buf);
	appendStringInfoString(&buf, "{\"event\": ");
	escape_json(&buf, event);
	add_str(&buf, "user", GetUserNameFromId(GetUserId(), true));
	add_str(&buf, "session_user", GetUserNameFromId(GetSessionUserId(), true));
	add_str(&buf, "db", db);
	add_str(&buf, "app", application_name);
	appendStringInfo(&buf, ", \"pid\": %d", MyProcPid);
	add_str(&buf, "kek", kek);
	if (version > 0)
		appendStringInfo(&buf, ", \"kek_version\": %d", version);
	/* extra is a JSON object: splice its fields in. */
	if (extra && extra[0] == '{' && strlen(extra) > 2)
		appendStringInfo(&buf, ", %s", extra + 1);
	else
		appendStringInfoChar(&buf, '}');

	ereport(LOG,
			(errmsg_internal("ENVELOPE AUDIT: %s", buf.data),
			 errhidestmt(true),
			 errhidecontext(true)));
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
	if (!PG_ARGISNULL(3))
		extra = JsonbToCString(NULL, &PG_GETARG_JSONB_P(3)->root, VARSIZE(PG_GETARG_JSONB_P(3)));
	env_audit(event, kek, version, extra);
	PG_RETURN_VOID();
}

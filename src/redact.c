/*-------------------------------------------------------------------------
 *
 * redact.c
 *		Keep plaintext passed to enc() or returned by dec() out of the
 *		server log: an emit_log_hook that masks constants.
 *
 * The log receives statement text in several places: log_statement and
 * log_min_duration_statement lines ("statement: ...", "execute <name>: ...",
 * "duration: ... bind/parse ..."), their DETAIL lines ("parameters: $1 =
 * ..." for bind parameters, "prepare: ..." for EXECUTE), the STATEMENT line
 * printed after an error (debug_query_string), CONTEXT lines (PL/pgSQL's
 * "SQL statement \"...\"", "extended query with parameters: ...") and the
 * QUERY line (internalquery).  For a statement that involves envelope all of
 * these get every literal replaced by '***' (and every number by ***), and
 * errors about data (SQLSTATE classes 22 and 23, whose messages can quote a
 * decrypted value) get their quoted values and detail masked too.
 *
 * A statement involves envelope when
 *	- its text names enc, dec, dec_text, dec_bytea, rewrap, enc_bytea or the
 *	  schema envelope, or a view that decrypts (one whose rules depend on
 *	  envelope's functions, such as a clear view, or on such a view);
 *	- it is EXECUTE of a prepared statement that involves envelope; or
 *	- running it called enc(), dec() or rewrap() (a wrapper function): the
 *	  text's hash is remembered, so later log lines of it and later runs of
 *	  the same text are masked.  Lines logged before execution (log_statement)
 *	  of a text first seen this way cannot be, which is why the names above
 *	  are checked too.
 * Other statements are logged unchanged.
 *
 * The hook must not raise: it runs inside error reporting.  So literals are
 * found by a small scanner of its own (quotes, E'' strings, dollar quotes,
 * comments, numbers) that cannot fail, instead of the core scanner, which
 * raises on malformed input, and it reads no catalogs.  The names of
 * decrypting views are read from the catalogs at statement boundaries and
 * published in shared memory (per database), where the hook of a session
 * that has not run a statement yet finds them under a shared LWLock.
 *
 * Only envelope writes lines that look like audit records: any other report
 * (or statement text) containing "ENVELOPE AUDIT: " has it defused, so a
 * user cannot forge a record with RAISE LOG or a crafted statement.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "envelope.h"
#include "access/genam.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "access/xact.h"
#include "catalog/indexing.h"
#include "catalog/dependency.h"
#include "catalog/pg_class.h"
#include "catalog/pg_depend.h"
#include "catalog/pg_extension.h"
#include "catalog/pg_proc.h"
#include "catalog/pg_rewrite.h"
#include "catalog/pg_type.h"
#include "commands/extension.h"
#include "commands/prepare.h"
#include "common/hashfn.h"
#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "parser/parser.h"
#include "storage/lwlock.h"
#include "storage/proc.h"
#include "storage/shmem.h"
#include "tcop/tcopprot.h"
#include "utils/elog.h"
#include "utils/fmgroids.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/plancache.h"
#include "utils/syscache.h"

#include "audit.h"
#include "redact.h"

#define AUDIT_PREFIX	"ENVELOPE AUDIT: "
#define MASKED_DETAIL	"Values in this message were masked because the statement uses envelope."
#define MAX_SCAN		(64 * 1024 * 1024)	/* longer texts are masked whole */
#define LEARNED_SIZE	256		/* statement texts remembered as involved */
#define MAX_VIEWS		4096	/* decrypting views remembered per backend */
#define MAX_WORDS		8		/* leading words kept (EXECUTE <name>) */

/* Words that make a statement involve envelope. */
static const char *const envelope_words[] = {
	"enc", "dec", "dec_text", "dec_bytea", "rewrap", "enc_bytea", "envelope"
};

static emit_log_hook_type prev_emit_log_hook = NULL;

static uint64 learned[LEARNED_SIZE];
static int	learned_next = 0;
static uint64 noted_statement = 0;
static const char *noted_query = NULL;

static char **view_names = NULL;
static int	nviews = 0;
static bool views_valid = false;
static bool views_loading = false;
static bool views_changed = false;	/* a rule changed since the last read */

static char *masked_query = NULL;	/* debug_query_string, masked, if we swapped it */
static char *masked_orig = NULL;	/* ... and a copy of what it replaced */

/*
 * The decrypting views of every database, in shared memory, so the log hook
 * (which must not read catalogs) knows them in a session that has not yet
 * run a statement.  Published by backends that read the catalogs.
 */
#define REDACT_TRANCHE		"envelope_redact"
#define SHARED_VIEWS		4096

typedef struct SharedView
{
	Oid			db;
	char		name[NAMEDATALEN];
} SharedView;

typedef struct RedactShared
{
	uint64		generation;		/* +1 at every publication */
	int			n;
	SharedView	views[SHARED_VIEWS];
} RedactShared;

static RedactShared *redact_shared = NULL;
static LWLock *redact_lock = NULL;
static bool in_hook = false;

/* What a scan found. */
typedef struct ScanResult
{
	bool		mentions;		/* names envelope or a decrypting view */
	int			nwords;
	char		words[MAX_WORDS][NAMEDATALEN];	/* the first words, normalised */
} ScanResult;

/* Syscache callback: a rule changed, so the decrypting views may have. */
static void
views_inval_cb(Datum arg, int cacheid, uint32 hashvalue)
{
	views_valid = false;
	views_changed = true;
}

/* Is this (normalised) identifier one that makes a statement involved? */
static bool
sensitive_word(const char *w)
{
	for (int i = 0; i < (int) lengthof(envelope_words); i++)
		if (strcmp(w, envelope_words[i]) == 0)
			return true;
	for (int i = 0; i < nviews; i++)
		if (strcmp(w, view_names[i]) == 0)
			return true;
	return false;
}

/* Identifier characters (as the core scanner's ident_cont, plus $). */
static inline bool
ident_start(unsigned char c)
{
	return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c >= 0x80;
}

static inline bool
ident_cont(unsigned char c)
{
	return ident_start(c) || (c >= '0' && c <= '9') || c == '$';
}

/* Note a word (normalised) in the result. */
static void
note_word(ScanResult *r, const char *w, int len, bool fold)
{
	char		buf[NAMEDATALEN];
	int			n = Min(len, NAMEDATALEN - 1);

	for (int i = 0; i < n; i++)
		buf[i] = (fold && w[i] >= 'A' && w[i] <= 'Z') ? w[i] + ('a' - 'A') : w[i];
	buf[n] = '\0';
	if (!r->mentions && sensitive_word(buf))
		r->mentions = true;
	if (r->nwords < MAX_WORDS)
		strlcpy(r->words[r->nwords++], buf, NAMEDATALEN);
}

/* How backslashes in '...' are read. */
typedef enum QuoteEsc
{
	ESC_NONE,					/* standard_conforming_strings */
	ESC_BACKSLASH,				/* E'...', or statement text without it */
	ESC_UNKNOWN					/* either: a backslash masks the rest */
} QuoteEsc;

/* End of a '...' literal starting at s[i] (the quote). */
static int
skip_quoted(const char *s, int i, QuoteEsc esc)
{
	i++;
	while (s[i])
	{
		if (esc == ESC_UNKNOWN && s[i] == '\\')
			return i + strlen(s + i);	/* fail closed */
		if (esc == ESC_BACKSLASH && s[i] == '\\' && s[i + 1])
			i += 2;
		else if (s[i] == '\'')
		{
			if (s[i + 1] == '\'')
				i += 2;
			else
				return i + 1;
		}
		else
			i++;
	}
	return i;
}

/*
 * Scan SQL text: find the words it uses and, if out is not NULL, write a
 * copy with every literal masked.  With dq_text, double quotes are plain
 * text (for messages that quote SQL in double quotes, such as CONTEXT lines),
 * so literals inside them are found.  Never raises.
 */
static void
scan_sql(const char *s, StringInfo out, bool dq_text, bool stmt_text, ScanResult *r)
{
	/*
	 * With dq_text (prose that quotes SQL in double quotes), numbers are
	 * masked only inside the quotes: "line 3" stays, "SQL statement \"...\""
	 * does not.  Without standard_conforming_strings, backslashes escape in
	 * '...' too, as the server read statement text; other text (parameter
	 * values, which are quoted without escaping backslashes) could be read
	 * either way, so a backslash there masks the rest.
	 */
	bool		in_dq = false;
	QuoteEsc	plain_esc = standard_conforming_strings ? ESC_NONE :
		stmt_text ? ESC_BACKSLASH : ESC_UNKNOWN;

	int			i = 0;

	memset(r, 0, sizeof(*r));
	while (s[i])
	{
		unsigned char c = (unsigned char) s[i];
		int			start = i;

		if (c == '-' && s[i + 1] == '-')
		{
			while (s[i] && s[i] != '\n')
				i++;
		}
		else if (c == '/' && s[i + 1] == '*')
		{
			int			depth = 1;

			i += 2;
			while (s[i] && depth > 0)
			{
				if (s[i] == '/' && s[i + 1] == '*')
					depth++, i += 2;
				else if (s[i] == '*' && s[i + 1] == '/')
					depth--, i += 2;
				else
					i++;
			}
		}
		else if (c == '\'')
		{
			i = skip_quoted(s, i, plain_esc);
			if (out)
				appendStringInfoString(out, "'***'");
			continue;
		}
		else if (c == '"' && dq_text)
		{
			in_dq = !in_dq;
			i++;
		}
		else if (c == '"')
		{
			i++;
			while (s[i] && !(s[i] == '"' && s[i + 1] != '"'))
				i += (s[i] == '"') ? 2 : 1;
			note_word(r, s + start + 1, i - start - 1, false);
			if (s[i])
				i++;
		}
		else if (c == '$' && s[i + 1] >= '0' && s[i + 1] <= '9')
		{
			/* A parameter: $1 */
			i++;
			while (s[i] >= '0' && s[i] <= '9')
				i++;
		}
		else if (c == '$' && (s[i + 1] == '$' || ident_start((unsigned char) s[i + 1])) &&
				 (i == 0 || !ident_cont((unsigned char) s[i - 1])))
		{
			/* Perhaps a dollar quote: $tag$ ... $tag$ */
			int			j = i + 1;

			while (s[j] && s[j] != '$' && ident_cont((unsigned char) s[j]))
				j++;
			if (s[j] == '$')
			{
				int			taglen = j - i + 1;
				const char *end = NULL;

				for (int k = j + 1; s[k]; k++)
					if (s[k] == '$' && strncmp(s + k, s + i, taglen) == 0)
					{
						end = s + k;
						break;
					}
				i = end ? (int) (end - s) + taglen : (int) strlen(s);
				if (out)
					appendStringInfoString(out, "'***'");
				continue;
			}
			i++;
		}
		else if ((!dq_text || in_dq) &&
				 ((c >= '0' && c <= '9') ||
				  (c == '.' && s[i + 1] >= '0' && s[i + 1] <= '9')))
		{
			/* (digits inside words were consumed with the word) */
			while (ident_cont((unsigned char) s[i]) || s[i] == '.' ||
				   ((s[i] == '+' || s[i] == '-') && (s[i - 1] == 'e' || s[i - 1] == 'E')))
				i++;
			if (out)
				appendStringInfoString(out, "***");
			continue;
		}
		else if (ident_start(c))
		{
			while (ident_cont((unsigned char) s[i]))
				i++;
			/* A prefixed string: E'...', B'...', X'...', N'...', U&'...' */
			if (s[i] == '\'' && i - start == 1 && strchr("eEbBxXnN", c))
			{
				i = skip_quoted(s, i, (c == 'e' || c == 'E') ? ESC_BACKSLASH : plain_esc);
				if (out)
					appendStringInfoString(out, "'***'");
				continue;
			}
			if (s[i] == '&' && s[i + 1] == '\'' && i - start == 1 && (c == 'u' || c == 'U'))
			{
				i = skip_quoted(s, i + 1, plain_esc);
				if (out)
					appendStringInfoString(out, "'***'");
				continue;
			}
			note_word(r, s + start, i - start, true);
		}
		else
			i++;
		if (out)
			appendBinaryStringInfo(out, s + start, i - start);
	}
}

/* A copy of s with its literals masked (in the current memory context). */
/* What a text to mask is. */
typedef enum MaskMode
{
	MASK_STATEMENT,				/* SQL as the server read it */
	MASK_PARAMS,				/* SQL-like: parameter lists, prepare: lines */
	MASK_PROSE					/* a message quoting SQL in double quotes */
} MaskMode;

static char *
mask_sql(const char *s, MaskMode mode)
{
	StringInfoData out;
	ScanResult	r;
	size_t		len = strlen(s);

	/* (masking can triple a text; a huge one is replaced, failing closed) */
	if (len > MAX_SCAN)
		return psprintf("(%zu bytes masked by envelope)", len);
	initStringInfo(&out);
	scan_sql(s, &out, mode == MASK_PROSE, mode == MASK_STATEMENT, &r);
	return out.data;
}

/* Hash of a statement text. */
static uint64
text_hash(const char *s)
{
	return hash_bytes_extended((const unsigned char *) s, (int) strlen(s), 0);
}

/* Was this text seen calling envelope's functions? */
static bool
learned_text(const char *s)
{
	uint64		h = text_hash(s);

	for (int i = 0; i < LEARNED_SIZE; i++)
		if (learned[i] == h && h != 0)
			return true;
	return false;
}

/* Remember that the running statement involves envelope. */
void
env_redact_note_use(void)
{
	const char *q = debug_query_string;

	if (q == NULL || (noted_statement == env_statement_id && noted_query == q))
		return;
	noted_statement = env_statement_id;
	noted_query = q;
	if (q != masked_query && !learned_text(q))
	{
		learned[learned_next] = text_hash(q);
		learned_next = (learned_next + 1) % LEARNED_SIZE;
	}
}

/* Add a view's name to the list (TopMemoryContext), once. */
static void
add_view(Oid relid, char ***names, int *n)
{
	char	   *name = get_rel_name(relid);

	if (name == NULL || *n >= MAX_VIEWS)
		return;
	for (int i = 0; i < *n; i++)
		if (strcmp((*names)[i], name) == 0)
			return;
	(*names)[(*n)++] = MemoryContextStrdup(TopMemoryContext, name);
}

/* The relation a rule (pg_rewrite OID) belongs to, or InvalidOid. */
static Oid
rule_relation(Oid rule)
{
	Relation	rel = table_open(RewriteRelationId, AccessShareLock);
	ScanKeyData key;
	SysScanDesc scan;
	HeapTuple	tup;
	Oid			result = InvalidOid;

	ScanKeyInit(&key, Anum_pg_rewrite_oid, BTEqualStrategyNumber,
				F_OIDEQ, ObjectIdGetDatum(rule));
	scan = systable_beginscan(rel, RewriteOidIndexId, true, NULL, 1, &key);
	if (HeapTupleIsValid(tup = systable_getnext(scan)))
		result = ((Form_pg_rewrite) GETSTRUCT(tup))->ev_class;
	systable_endscan(scan);
	table_close(rel, AccessShareLock);
	return result;
}

/* A scan of pg_depend for the objects that depend on (classid, objid). */
static SysScanDesc
dependents_scan(Relation depRel, Oid classid, Oid objid)
{
	ScanKeyData key[2];

	/* (systable_beginscan copies the keys) */
	ScanKeyInit(&key[0], Anum_pg_depend_refclassid, BTEqualStrategyNumber,
				F_OIDEQ, ObjectIdGetDatum(classid));
	ScanKeyInit(&key[1], Anum_pg_depend_refobjid, BTEqualStrategyNumber,
				F_OIDEQ, ObjectIdGetDatum(objid));
	return systable_beginscan(depRel, DependReferenceIndexId, true, NULL, 2, key);
}

/* Add an OID to a growing array, once (at most MAX_VIEWS). */
static void
add_oid(Oid **arr, int *n, int *cap, Oid oid)
{
	for (int i = 0; i < *n; i++)
		if ((*arr)[i] == oid)
			return;
	if (*n >= MAX_VIEWS)
		return;
	if (*n >= *cap)
	{
		*cap *= 2;
		*arr = repalloc(*arr, sizeof(Oid) * *cap);
	}
	(*arr)[(*n)++] = oid;
}

/* Relations whose rules depend on the object (classid, objid). */
static void
dependent_views(Relation depRel, Oid classid, Oid objid, Oid **rels, int *nrels, int *cap)
{
	SysScanDesc scan;
	HeapTuple	tup;

	scan = dependents_scan(depRel, classid, objid);
	while (HeapTupleIsValid(tup = systable_getnext(scan)))
	{
		Form_pg_depend d = (Form_pg_depend) GETSTRUCT(tup);
		Oid			ev_class;

		if (d->classid != RewriteRelationId)
			continue;
		ev_class = rule_relation(d->objid);
		if (OidIsValid(ev_class))
			add_oid(rels, nrels, cap, ev_class);
	}
	systable_endscan(scan);
}

/*
 * Relations with a column of one of envelope's types (enc_bytea, domains
 * and arrays over it): statements naming them may carry what is encrypted
 * into them by triggers.
 */
static void
typed_relations(Relation depRel, Oid ext, Oid **rels, int *nrels, int *cap)
{
	Oid		   *types = palloc(sizeof(Oid) * 16);
	int			ntypes = 0;
	int			tcap = 16;
	SysScanDesc scan;
	HeapTuple	tup;

	scan = dependents_scan(depRel, ExtensionRelationId, ext);
	while (HeapTupleIsValid(tup = systable_getnext(scan)))
	{
		Form_pg_depend d = (Form_pg_depend) GETSTRUCT(tup);

		if (d->classid == TypeRelationId && d->deptype == DEPENDENCY_EXTENSION)
			add_oid(&types, &ntypes, &tcap, d->objid);
	}
	systable_endscan(scan);

	for (int t = 0; t < ntypes; t++)
	{
			scan = dependents_scan(depRel, TypeRelationId, types[t]);
		while (HeapTupleIsValid(tup = systable_getnext(scan)))
		{
			Form_pg_depend d = (Form_pg_depend) GETSTRUCT(tup);

			if (d->classid == TypeRelationId)
				add_oid(&types, &ntypes, &tcap, d->objid);	/* domain, array */
			else if (d->classid == RelationRelationId && d->objsubid > 0)
				add_oid(rels, nrels, cap, d->objid);	/* a column */
		}
		systable_endscan(scan);
	}
	pfree(types);
}

/*
 * Read the names of the relations whose statements involve envelope: views
 * whose rules use one of envelope's functions, relations with a column of
 * its types, and views over those.  Needs an open transaction.
 */
static void
views_load(void)
{
	static bool callback_registered = false;
	Oid			ext = get_extension_oid("envelope", true);
	Relation	depRel;
	SysScanDesc scan;
	HeapTuple	tup;
	Oid		   *rels;
	int			nrels = 0;
	int			cap = 64;
	char	  **names;
	int			n = 0;

	if (!callback_registered)
	{
		CacheRegisterSyscacheCallback(RULERELNAME, views_inval_cb, (Datum) 0);
		/* (a column added or dropped: maybe one of envelope's types) */
		CacheRegisterSyscacheCallback(ATTNUM, views_inval_cb, (Datum) 0);
		callback_registered = true;
	}
	for (int i = 0; i < nviews; i++)
		pfree(view_names[i]);
	nviews = 0;
	views_valid = true;
	if (!OidIsValid(ext))
		return;

	rels = palloc(sizeof(Oid) * cap);
	depRel = table_open(DependRelationId, AccessShareLock);

	/* The extension's functions, and the views that call them. */
	scan = dependents_scan(depRel, ExtensionRelationId, ext);
	while (HeapTupleIsValid(tup = systable_getnext(scan)))
	{
		Form_pg_depend d = (Form_pg_depend) GETSTRUCT(tup);

		if (d->classid == ProcedureRelationId && d->deptype == DEPENDENCY_EXTENSION)
		{
			Oid			fn = d->objid;

			/* The scan's tuple is not kept across the nested scan. */
			dependent_views(depRel, ProcedureRelationId, fn, &rels, &nrels, &cap);
		}
	}
	systable_endscan(scan);

	/* Tables with envelope's types, and views over all of those. */
	typed_relations(depRel, ext, &rels, &nrels, &cap);
	for (int i = 0; i < nrels; i++)
		dependent_views(depRel, RelationRelationId, rels[i], &rels, &nrels, &cap);
	table_close(depRel, AccessShareLock);

	if (view_names == NULL)
		view_names = MemoryContextAlloc(TopMemoryContext, sizeof(char *) * MAX_VIEWS);
	names = view_names;
	for (int i = 0; i < nrels; i++)
		add_view(rels[i], &names, &n);
	nviews = n;
	pfree(rels);
}

/* Shared memory: request the lock (from the shmem_request_hook). */
void
env_redact_shmem_request(void)
{
	RequestNamedLWLockTranche(REDACT_TRANCHE, 1);
}

/* Shared memory: size of the list of decrypting views. */
Size
env_redact_shmem_size(void)
{
	return sizeof(RedactShared);
}

/* Shared memory: create or attach (caller holds AddinShmemInitLock). */
void
env_redact_shmem_init(void)
{
	bool		found;

	redact_shared = ShmemInitStruct("envelope redact", sizeof(RedactShared), &found);
	redact_lock = &(GetNamedLWLockTranche(REDACT_TRANCHE))[0].lock;
	if (!found)
		memset(redact_shared, 0, sizeof(RedactShared));
}

/* Replace this database's entries in the shared list by our fresh list. */
static void
views_publish(void)
{
	static bool warned = false;
	bool		overflow = false;
	int			j = 0;

	if (redact_shared == NULL)
		return;
	LWLockAcquire(redact_lock, LW_EXCLUSIVE);
	for (int i = 0; i < redact_shared->n; i++)
		if (redact_shared->views[i].db != MyDatabaseId)
			redact_shared->views[j++] = redact_shared->views[i];
	for (int i = 0; i < nviews; i++, j++)
	{
		if (j >= SHARED_VIEWS)
		{
			overflow = true;
			break;
		}
		redact_shared->views[j].db = MyDatabaseId;
		strlcpy(redact_shared->views[j].name, view_names[i], NAMEDATALEN);
	}
	redact_shared->n = j;
	redact_shared->generation++;
	LWLockRelease(redact_lock);
	if (overflow && !warned)
	{
		warned = true;
		ereport(WARNING,
				(errmsg("too many relations hold or decrypt envelope values to share their names"),
				 errdetail("The log redaction hook of new sessions knows at most %d of them until they run a statement.",
						   SHARED_VIEWS)));
	}
}

/*
 * In the log hook, while this session's own list is not fresh: take the
 * shared list if it changed since we last did.  Never waits: the hook may run
 * where waiting is impossible (after the PGPROC is gone, for the disconnect
 * line), so if the lock is busy the current list is used.
 */
static void
views_from_shared(void)
{
	static uint64 seen_generation = 0;
	int			n = 0;

	if (redact_shared == NULL || MyProc == NULL || !OidIsValid(MyDatabaseId))
		return;
	if (!LWLockConditionalAcquire(redact_lock, LW_SHARED))
		return;
	if (redact_shared->generation != seen_generation)
	{
		if (view_names == NULL)
			view_names = MemoryContextAlloc(TopMemoryContext, sizeof(char *) * MAX_VIEWS);
		for (int i = 0; i < nviews; i++)
			pfree(view_names[i]);
		for (int i = 0; i < redact_shared->n && n < MAX_VIEWS; i++)
			if (redact_shared->views[i].db == MyDatabaseId)
				view_names[n++] = MemoryContextStrdup(TopMemoryContext,
													  redact_shared->views[i].name);
		nviews = n;
		seen_generation = redact_shared->generation;
	}
	LWLockRelease(redact_lock);
}

/*
 * Before a transaction that changed a view commits: read the list again and
 * publish it, so other sessions' log hooks know a new decrypting view before
 * they can use it.
 */
static void
redact_xact_cb(XactEvent event, void *arg)
{
	if (event == XACT_EVENT_PRE_COMMIT && !views_valid && views_changed)
	{
		env_redact_refresh();
		views_changed = false;
	}
}

/* At a statement boundary: refresh the names of decrypting views. */
void
env_redact_refresh(void)
{
	if (views_valid || views_loading || !IsTransactionState() ||
		IsAbortedTransactionBlockState() || !OidIsValid(MyDatabaseId))
		return;
	views_loading = true;
	PG_TRY();
	{
		views_load();
		views_publish();
	}
	PG_FINALLY();
	{
		views_loading = false;
	}
	PG_END_TRY();
}

/* Does the statement text involve envelope? */
static bool
text_involved(const char *q)
{
	ScanResult	r;

	if (q == NULL)
		return false;
	if (q == masked_query || learned_text(q))
		return true;
	scan_sql(q, NULL, false, true, &r);
	if (r.mentions)
		return true;
	/* EXECUTE name: look at the prepared statement's text. */
	if (r.nwords >= 2 && strcmp(r.words[0], "execute") == 0)
	{
		PreparedStatement *ps = FetchPreparedStatement(r.words[1], false);

		if (ps && ps->plansource && ps->plansource->query_string)
		{
			const char *pq = ps->plansource->query_string;

			if (learned_text(pq))
				return true;
			scan_sql(pq, NULL, false, true, &r);
			return r.mentions;
		}
	}
	return false;
}

/*
 * Mask everything from the first double quote to the last one in s: the
 * quoted value of invalid input "..." may itself contain quotes.
 */
static char *
mask_double_quoted(const char *s)
{
	const char *first = strchr(s, '"');
	const char *last = strrchr(s, '"');
	StringInfoData out;

	if (first == NULL || first == last)
		return pstrdup(s);
	initStringInfo(&out);
	appendBinaryStringInfo(&out, s, first - s + 1);
	appendStringInfoString(&out, "***");
	appendStringInfoString(&out, last);
	return out.data;
}

/*
 * Mask one part of a report if it mentions envelope (or always, if
 * involved); prose is text that quotes SQL, such as a CONTEXT line.
 */
static char *
mask_part(char *part, bool involved, bool prose)
{
	ScanResult	r;

	if (part == NULL)
		return NULL;
	if (!involved)
	{
		scan_sql(part, NULL, prose, !prose, &r);
		if (!r.mentions)
			return part;
	}
	return mask_sql(part, prose ? MASK_PROSE : MASK_STATEMENT);
}

/* The masked form of the message: the statement text in it, masked. */
static char *
mask_message(char *msg, const char *q)
{
	const char *at;
	StringInfoData out;

	/* Lines printed from the statement's own text after we swapped ours in. */
	if (q != NULL && q == masked_query && masked_orig != NULL)
		q = masked_orig;
	at = q ? strstr(msg, q) : NULL;
	if (at == NULL)
		return msg;
	initStringInfo(&out);
	appendBinaryStringInfo(&out, msg, at - msg);
	appendStringInfoString(&out, mask_sql(q, MASK_STATEMENT));
	appendStringInfoString(&out, at + strlen(q));
	return out.data;
}

/* Is this one of postgres.c's statement-logging lines (by format string)? */
static bool
statement_log_line(const ErrorData *edata)
{
	static const char *const formats[] = {
		"statement: %s",
		"duration: %s ms  statement: %s",
		"%s %s%s%s: %s",		/* execute <name>: (execute is translated) */
		"duration: %s ms  %s %s%s%s: %s",
		"duration: %s ms  bind %s%s%s: %s",
		"duration: %s ms  parse %s: %s",
	};

	if (edata->message_id == NULL)
		return false;
	for (int i = 0; i < (int) lengthof(formats); i++)
		if (strcmp(edata->message_id, formats[i]) == 0)
			return true;
	return false;
}

/* Was the report raised by PostgreSQL itself (not envelope, not a PL)? */
static bool
core_report(const ErrorData *edata)
{
	return edata->domain == NULL || strncmp(edata->domain, "postgres-", 9) == 0;
}

/* A copy of s with every "ENVELOPE AUDIT: " defused, or s itself if none. */
static char *
defuse_prefix(char *s)
{
	StringInfoData out;
	char	   *p;
	char	   *at;

	if (s == NULL || strstr(s, AUDIT_PREFIX) == NULL)
		return s;
	initStringInfo(&out);
	for (p = s; (at = strstr(p, AUDIT_PREFIX)) != NULL; p = at + strlen(AUDIT_PREFIX))
	{
		appendBinaryStringInfo(&out, p, at - p);
		appendStringInfoString(&out, "ENVELOPE AUDIT (not a record): ");
	}
	appendStringInfoString(&out, p);
	return out.data;
}

/* Swap debug_query_string (the STATEMENT line) for a masked copy. */
static void
swap_statement(const char *q, char *masked)
{
	char	   *m = MemoryContextStrdup(TopMemoryContext, masked);
	char	   *o = MemoryContextStrdup(TopMemoryContext, q);

	debug_query_string = m;
	if (masked_query)
		pfree(masked_query);
	if (masked_orig)
		pfree(masked_orig);
	masked_query = m;
	masked_orig = o;
}

/* The work of the log hook: mask (and defuse) one report in place. */
static void
redact_report(ErrorData *edata)
{
	const char *q = debug_query_string;
	int			class = ERRCODE_TO_CATEGORY(edata->sqlerrcode);
	bool		core_error = edata->elevel >= ERROR && core_report(edata);

	/* A new session knows the decrypting views from shared memory. */
	if (!views_valid)
		views_from_shared();

	if (text_involved(q))
	{
		if (edata->message)
			edata->message = mask_message(edata->message, q);
		if (statement_log_line(edata))
		{
			/* DETAIL: "parameters: $1 = '...'" or "prepare: PREPARE ..." */
			if (edata->detail)
				edata->detail = mask_sql(edata->detail, MASK_PARAMS);
		}
		else if (core_error && class == ERRCODE_INTEGRITY_CONSTRAINT_VIOLATION)
		{
			/* "Failing row contains (...)", "Key (...)=(...)": values. */
			if (edata->detail)
				edata->detail = pstrdup(MASKED_DETAIL);
		}
		else if (core_error &&
				 ((class == ERRCODE_DATA_EXCEPTION &&
				   edata->sqlerrcode != ERRCODE_INVALID_PARAMETER_VALUE &&
				   edata->sqlerrcode != ERRCODE_DIVISION_BY_ZERO) ||
				  ((edata->sqlerrcode == ERRCODE_UNDEFINED_TABLE ||
					edata->sqlerrcode == ERRCODE_UNDEFINED_OBJECT) &&
				   q != NULL && learned_text(q))))
		{
			/*
			 * These quote the offending value (invalid input syntax "...",
			 * JSON data), and so does a lookup by a decrypted value (a value
			 * cast to regclass: only once the statement ran envelope, so a
			 * mistyped table name in create_clear_view stays readable).
			 */
			if (edata->message)
				edata->message = mask_double_quoted(edata->message);
			if (edata->detail)
				edata->detail = pstrdup(MASKED_DETAIL);
			/* (JSON data, line 1: ..., COPY ... column ...: values) */
			if (edata->context)
				edata->context = pstrdup("(context masked by envelope)");
		}
		edata->context = mask_part(edata->context, true, true);
		/* A deadlock report shows the other sessions' statements. */
		edata->detail_log = mask_part(edata->detail_log, true, false);
		edata->internalquery = mask_part(edata->internalquery, true, false);

		/* The STATEMENT line is printed from debug_query_string. */
		if (!edata->hide_stmt && q != NULL && q != masked_query)
			swap_statement(q, defuse_prefix(mask_sql(q, MASK_STATEMENT)));
	}
	else
	{
		/* A PL/pgSQL statement of a function called by an unrelated one. */
		edata->context = mask_part(edata->context, false, true);
		edata->internalquery = mask_part(edata->internalquery, false, false);
		edata->detail_log = mask_part(edata->detail_log, false, false);
		if (!edata->hide_stmt && q != NULL && q != masked_query &&
			strstr(q, AUDIT_PREFIX) != NULL)
			swap_statement(q, defuse_prefix((char *) q));
	}

	/* Only envelope writes lines that look like audit records. */
	edata->message = defuse_prefix(edata->message);
	edata->detail = defuse_prefix(edata->detail);
	edata->detail_log = defuse_prefix(edata->detail_log);
	edata->hint = defuse_prefix(edata->hint);
	edata->context = defuse_prefix(edata->context);
	edata->internalquery = defuse_prefix(edata->internalquery);
}

/*
 * emit_log_hook: mask what a report about an envelope statement would leak.
 * It reads no catalogs and takes only a shared LWLock, so it does not fail
 * but for lack of memory; even then the flag that stops recursion is reset.
 */
static void
redact_emit_log_hook(ErrorData *edata)
{
	if (!in_hook && edata->output_to_server && !env_audit_emitting())
	{
		in_hook = true;
		PG_TRY();
		{
			redact_report(edata);
		}
		PG_FINALLY();
		{
			in_hook = false;
		}
		PG_END_TRY();
	}
	if (prev_emit_log_hook)
		prev_emit_log_hook(edata);
}

/* Install the emit_log_hook (from _PG_init). */
void
env_redact_init(void)
{
	prev_emit_log_hook = emit_log_hook;
	emit_log_hook = redact_emit_log_hook;
	RegisterXactCallback(redact_xact_cb, NULL);
}

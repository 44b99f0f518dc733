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
 *	  schema envelope, or a "sensitive relation": a view whose rules depend
 *	  on envelope's functions (a clear view), a table with a column of
 *	  envelope's types (a trigger may encrypt what is written), or a view
 *	  over those;
 *	- it EXECUTEs (anywhere in its text) a prepared statement that does; or
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
 * raises on malformed input; where it cannot tell how text reads (a
 * backslash without standard_conforming_strings, an unterminated comment)
 * it masks the rest.  It reads no catalogs.  Sensitive relations are read
 * from the catalogs by a session whose transaction changed views or columns
 * (at statement start and before commit) and by the first session of a
 * database after the server started, and appended to an append-only list in
 * shared memory (LWLock "envelope_redact"; names are never removed, which
 * only over-masks); every session's hook takes in what was appended since
 * it last looked.  Until a database's relations were read once, every
 * statement of it is masked (fail closed).
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
#include "access/xlog.h"
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
#define MAX_WORDS		8		/* EXECUTE targets looked at per text */

/* Words that make a statement involve envelope. */
static const char *const envelope_words[] = {
	"enc", "dec", "dec_text", "dec_bytea", "rewrap", "enc_bytea", "envelope"
};

static emit_log_hook_type prev_emit_log_hook = NULL;

static uint64 learned[LEARNED_SIZE];
static int	learned_next = 0;
static uint64 noted_statement = 0;
static const char *noted_query = NULL;

/*
 * The relations whose statements involve envelope, by name: this backend's
 * set (add-only: a dropped relation's name stays, which only over-masks).
 */
typedef struct NameEntry
{
	char		name[NAMEDATALEN];
	bool		in_shared;		/* already in the shared list */
} NameEntry;

static HTAB *names_htab = NULL;
static int	unpublished = 0;	/* entries not yet in the shared list */
static bool db_known = false;	/* this database's relations were read once */
static bool views_loading = false;
static bool scs_at_start = true;	/* standard_conforming_strings then */
static bool scs_ever_off = false;	/* it was off at some point in this session */
static bool ddl_in_xact = false;	/* a utility statement ran in this transaction */
static bool views_changed = false;	/* a rule or a column changed */

static char *masked_query = NULL;	/* debug_query_string, masked, if we swapped it */
static char *masked_orig = NULL;	/* ... and a copy of what it replaced */

/*
 * The same names for every database, in shared memory, append-only, so the
 * log hook (which must not read catalogs) of any session knows them: a
 * session that has not run a statement yet, or one in an open transaction
 * that has not seen another session's new view.  An entry with an empty
 * name says the database's relations were read since the server started.
 */
#define REDACT_TRANCHE		"envelope_redact"
#define SHARED_VIEWS		8192

typedef struct SharedView
{
	Oid			db;
	char		name[NAMEDATALEN];
} SharedView;

typedef struct RedactShared
{
	int			n;				/* entries used; only grows */
	bool		overflowed;		/* a name did not fit: sentinels mean nothing */
	SharedView	views[SHARED_VIEWS];
} RedactShared;

static RedactShared *redact_shared = NULL;
static LWLock *redact_lock = NULL;
static int	shared_read_upto = 0;	/* shared entries already taken */
static bool in_hook = false;

/* What a scan found. */
typedef struct ScanResult
{
	bool		mentions;		/* names envelope or a decrypting view */
	bool		after_execute;	/* the previous word was EXECUTE */
	int			nexec;
	char		exec_names[MAX_WORDS][NAMEDATALEN];	/* EXECUTE <name> targets */
} ScanResult;

/* Syscache callback: a rule or a column changed, so the relations may have. */
static void
views_inval_cb(Datum arg, int cacheid, uint32 hashvalue)
{
	views_changed = true;
}

/* Add a name to this backend's set. */
static void
names_add(const char *name, bool in_shared)
{
	NameEntry  *e;
	bool		found;
	char		key[NAMEDATALEN];

	if (names_htab == NULL)
	{
		HASHCTL		ctl;

		ctl.keysize = NAMEDATALEN;
		ctl.entrysize = sizeof(NameEntry);
		names_htab = hash_create("envelope relation names", 256, &ctl,
								 HASH_ELEM | HASH_STRINGS);
	}
	strlcpy(key, name, NAMEDATALEN);
	e = hash_search(names_htab, key, HASH_ENTER, &found);
	if (!found)
	{
		e->in_shared = in_shared;
		if (!in_shared)
			unpublished++;
	}
	else if (in_shared && !e->in_shared)
	{
		e->in_shared = true;
		unpublished--;
	}
}

/* Is this (normalised) identifier one that makes a statement involved? */
static bool
sensitive_word(const char *w)
{
	for (int i = 0; i < (int) lengthof(envelope_words); i++)
		if (strcmp(w, envelope_words[i]) == 0)
			return true;
	return names_htab != NULL && hash_search(names_htab, w, HASH_FIND, NULL) != NULL;
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
	/* EXECUTE name anywhere (after ;, in EXPLAIN, in CREATE TABLE AS) */
	if (r->after_execute && r->nexec < MAX_WORDS)
		strlcpy(r->exec_names[r->nexec++], buf, NAMEDATALEN);
	r->after_execute = (strcmp(buf, "execute") == 0);
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
	 * does not.  Without standard_conforming_strings (now, or when the
	 * statement started: a function's SET or an earlier statement of the
	 * same string may have changed it), a backslash in '...' could be read
	 * either way (parameter values are quoted without escaping backslashes),
	 * so it masks the rest of the text.
	 */
	bool		in_dq = false;
	QuoteEsc	plain_esc = (standard_conforming_strings && scs_at_start && !scs_ever_off) ?
		ESC_NONE : ESC_UNKNOWN;

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
			if (depth > 0)
			{
				/* unterminated (or cut short): the rest may be anything */
				if (out)
					appendStringInfoString(out, "/* ***");
				continue;
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
			if (!s[i])
			{
				/* unterminated (or cut short): the rest may be anything */
				if (out)
					appendStringInfoString(out, "\"***");
				continue;
			}
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

/* Was a text with this hash seen calling envelope's functions? */
static bool
learned_hash(uint64 h)
{
	static int	last_hit = 0;

	/* A session mostly repeats its last statement: try that slot first. */
	if (h != 0 && learned[last_hit] == h)
		return true;
	for (int i = 0; i < LEARNED_SIZE; i++)
		if (learned[i] == h && h != 0)
		{
			last_hit = i;
			return true;
		}
	return false;
}

/* Was this text seen calling envelope's functions? */
static bool
learned_text(const char *s)
{
	return learned_hash(text_hash(s));
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
	if (q != masked_query)
	{
		uint64		h = text_hash(q);

		if (!learned_hash(h))
		{
			learned[learned_next] = h;
			learned_next = (learned_next + 1) % LEARNED_SIZE;
		}
	}
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

/* OIDs collected while reading the catalogs: an array and a set for dedup. */
typedef struct OidList
{
	Oid		   *oids;
	int			n;
	int			cap;
	HTAB	   *seen;
} OidList;

/* Add an OID to a list, once. */
static void
add_oid(OidList *l, Oid oid)
{
	bool		found;

	hash_search(l->seen, &oid, HASH_ENTER, &found);
	if (found)
		return;
	if (l->n >= l->cap)
	{
		l->cap *= 2;
		l->oids = repalloc(l->oids, sizeof(Oid) * l->cap);
	}
	l->oids[l->n++] = oid;
}

/* A new, empty OID list (in the current memory context). */
static void
oidlist_init(OidList *l)
{
	HASHCTL		ctl;

	ctl.keysize = sizeof(Oid);
	ctl.entrysize = sizeof(Oid);
	ctl.hcxt = CurrentMemoryContext;
	l->seen = hash_create("envelope oids", 256, &ctl, HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
	l->cap = 64;
	l->n = 0;
	l->oids = palloc(sizeof(Oid) * l->cap);
}

/* Relations whose rules depend on the object (classid, objid). */
static void
dependent_views(Relation depRel, Oid classid, Oid objid, OidList *rels)
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
			add_oid(rels, ev_class);
	}
	systable_endscan(scan);
}

/*
 * Relations with a column of one of envelope's types (enc_bytea, domains
 * and arrays over it): statements naming them may carry what is encrypted
 * into them by triggers.
 */
static void
typed_relations(Relation depRel, Oid ext, OidList *rels)
{
	OidList		types;
	SysScanDesc scan;
	HeapTuple	tup;

	oidlist_init(&types);
	scan = dependents_scan(depRel, ExtensionRelationId, ext);
	while (HeapTupleIsValid(tup = systable_getnext(scan)))
	{
		Form_pg_depend d = (Form_pg_depend) GETSTRUCT(tup);

		if (d->classid == TypeRelationId && d->deptype == DEPENDENCY_EXTENSION)
			add_oid(&types, d->objid);
	}
	systable_endscan(scan);

	for (int t = 0; t < types.n; t++)
	{
			scan = dependents_scan(depRel, TypeRelationId, types.oids[t]);
		while (HeapTupleIsValid(tup = systable_getnext(scan)))
		{
			Form_pg_depend d = (Form_pg_depend) GETSTRUCT(tup);

			if (d->classid == TypeRelationId)
				add_oid(&types, d->objid);	/* domain, array */
			else if (d->classid == RelationRelationId && d->objsubid > 0)
				add_oid(rels, d->objid);	/* a column */
		}
		systable_endscan(scan);
	}
}

/*
 * Read the names of the relations whose statements involve envelope: views
 * whose rules use one of envelope's functions, relations with a column of
 * its types, and views over those.  Needs an open transaction.
 */
static void
views_load(void)
{
	Oid			ext = get_extension_oid("envelope", true);
	MemoryContext tmp;
	MemoryContext old;

	/* Changes made after this point are seen by the next load. */
	views_changed = false;
	if (!OidIsValid(ext))
	{
		db_known = true;
		return;
	}

	/* Built aside: an error (lock timeout, cancel) changes nothing. */
	tmp = AllocSetContextCreate(CurrentMemoryContext, "envelope relation names",
								ALLOCSET_DEFAULT_SIZES);
	old = MemoryContextSwitchTo(tmp);
	PG_TRY();
	{
		Relation	depRel = table_open(DependRelationId, AccessShareLock);
		SysScanDesc scan;
		HeapTuple	tup;
		OidList		rels;

		oidlist_init(&rels);

		/* The extension's functions, and the views that call them. */
		scan = dependents_scan(depRel, ExtensionRelationId, ext);
		while (HeapTupleIsValid(tup = systable_getnext(scan)))
		{
			Form_pg_depend d = (Form_pg_depend) GETSTRUCT(tup);

			if (d->classid == ProcedureRelationId && d->deptype == DEPENDENCY_EXTENSION)
				dependent_views(depRel, ProcedureRelationId, d->objid, &rels);
		}
		systable_endscan(scan);

		/* Tables with envelope's types, and views over all of those. */
		typed_relations(depRel, ext, &rels);
		for (int i = 0; i < rels.n; i++)
			dependent_views(depRel, RelationRelationId, rels.oids[i], &rels);
		table_close(depRel, AccessShareLock);

		MemoryContextSwitchTo(old);
		for (int i = 0; i < rels.n; i++)
		{
			char	   *name = get_rel_name(rels.oids[i]);

			if (name)
				names_add(name, false);
		}
		db_known = true;
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(old);
		views_changed = true;	/* try again at the next statement */
		PG_RE_THROW();
	}
	PG_END_TRY();
	MemoryContextDelete(tmp);
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

/*
 * Take the shared entries added since we last looked.  Names are copied out
 * in small batches under the shared lock and added to our set after it is
 * released: nothing that can fail (allocate) runs while the lock is held, so
 * an error can never leave this backend waiting for its own lock.  Returns
 * false if the list could not be read (the lock is ours already, or busy and
 * we must not wait).
 */
#define TAKE_BATCH 64

static bool
views_from_shared(bool may_wait)
{
	if (redact_shared == NULL || MyProc == NULL || !OidIsValid(MyDatabaseId))
		return true;
	for (;;)
	{
		char		batch[TAKE_BATCH][NAMEDATALEN];
		int			nb = 0;
		bool		sentinel = false;
		bool		overflowed;

		pg_read_barrier();
		if (redact_shared->n == shared_read_upto)
			return true;
		if (LWLockHeldByMe(redact_lock))
			return false;
		if (may_wait)
			LWLockAcquire(redact_lock, LW_SHARED);
		else if (!LWLockConditionalAcquire(redact_lock, LW_SHARED))
			return false;
		for (; shared_read_upto < redact_shared->n && nb < TAKE_BATCH; shared_read_upto++)
		{
			SharedView *v = &redact_shared->views[shared_read_upto];

			if (v->db != MyDatabaseId)
				continue;
			if (v->name[0] == '\0')
				sentinel = true;
			else
				memcpy(batch[nb++], v->name, NAMEDATALEN);
		}
		overflowed = redact_shared->overflowed;
		LWLockRelease(redact_lock);

		for (int k = 0; k < nb; k++)
			names_add(batch[k], true);
		/*
		 * A full list misses names: then only our own catalog read counts.
		 * So does it on a standby, whose catalog changes arrive by WAL with
		 * nobody there to publish them: each session reads the catalogs at
		 * its first statement (masking until then).
		 */
		if (sentinel && !overflowed && !RecoveryInProgress())
			db_known = true;
	}
}

/* Append our names that the shared list lacks, then mark the database read. */
static void
views_publish(void)
{
	static bool warned = false;
	bool		overflow = false;
	bool		marked = false;

	if (redact_shared == NULL)
		return;
	(void) views_from_shared(true);

	/* (nothing below allocates: the lock is held) */
	LWLockAcquire(redact_lock, LW_EXCLUSIVE);
	if (unpublished > 0 && names_htab != NULL)
	{
		HASH_SEQ_STATUS st;
		NameEntry  *e;

		hash_seq_init(&st, names_htab);
		while ((e = hash_seq_search(&st)) != NULL)
		{
			if (e->in_shared)
				continue;
			if (redact_shared->n >= SHARED_VIEWS)
			{
				overflow = true;
				continue;
			}
			redact_shared->views[redact_shared->n].db = MyDatabaseId;
			strlcpy(redact_shared->views[redact_shared->n].name, e->name, NAMEDATALEN);
			redact_shared->n++;
			e->in_shared = true;
			unpublished--;
		}
	}
	if (overflow)
		redact_shared->overflowed = true;
	for (int i = 0; i < redact_shared->n && !marked; i++)
		marked = (redact_shared->views[i].db == MyDatabaseId &&
				  redact_shared->views[i].name[0] == '\0');
	/* The database is marked read only once all its names are in. */
	if (!marked && !overflow && redact_shared->n < SHARED_VIEWS)
	{
		redact_shared->views[redact_shared->n].db = MyDatabaseId;
		redact_shared->views[redact_shared->n].name[0] = '\0';
		redact_shared->n++;
	}
	LWLockRelease(redact_lock);
	if (overflow && !warned)
	{
		warned = true;
		ereport(WARNING,
				(errmsg("too many relations hold or decrypt envelope values to share their names"),
				 errdetail("The log redaction hook shares at most %d names; sessions now read the catalogs themselves.",
						   SHARED_VIEWS)));
	}
}

/* Read the catalogs and publish what they show (in a transaction). */
static void
views_refresh_now(void)
{
	if (views_loading || !IsTransactionState() ||
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

/*
 * Must this session read the catalogs now?  When nobody has for this
 * database (or the shared list overflowed and we have not), or when views or
 * columns changed and either this transaction ran DDL (so only it can see
 * the change yet) or this is a standby (whose changes come from the primary,
 * where nobody publishes for it).  Other sessions' invalidations alone do not
 * make a session read: their authors publish.
 */
static bool
views_must_load(void)
{
	if (!db_known)
		return true;
	if (!views_changed)
		return false;
	return ddl_in_xact || RecoveryInProgress();
}

/*
 * Before a transaction that changed views or columns commits (or prepares):
 * read the catalogs and publish, so every session's log hook knows a new
 * relation before it can be used.
 */
static void
redact_xact_cb(XactEvent event, void *arg)
{
	if ((event == XACT_EVENT_PRE_COMMIT || event == XACT_EVENT_PRE_PREPARE) &&
		views_changed && ddl_in_xact)
		views_refresh_now();
	if (event == XACT_EVENT_COMMIT || event == XACT_EVENT_ABORT ||
		event == XACT_EVENT_PREPARE)
		ddl_in_xact = false;
}

/* A utility statement runs in this transaction (from the ProcessUtility hook). */
void
env_redact_note_utility(void)
{
	ddl_in_xact = true;
}

/*
 * At a top-level statement start: take what others published; read the
 * catalogs if views_must_load() says so.
 */
void
env_redact_refresh(void)
{
	static bool callback_registered = false;

	/* Every backend must hear of changes, also one that never reads them. */
	if (!callback_registered)
	{
		CacheRegisterSyscacheCallback(RULERELNAME, views_inval_cb, (Datum) 0);
		/* (a column added or dropped: maybe one of envelope's types) */
		CacheRegisterSyscacheCallback(ATTNUM, views_inval_cb, (Datum) 0);
		names_add("", true);	/* create the set now, not in the hook */
		callback_registered = true;
	}
	scs_at_start = standard_conforming_strings;
	if (!scs_at_start)
		scs_ever_off = true;
	(void) views_from_shared(true);
	if (views_must_load())
		views_refresh_now();
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
	/* EXECUTE name (anywhere): look at the prepared statements' texts. */
	for (int k = 0; k < r.nexec; k++)
	{
		PreparedStatement *ps = FetchPreparedStatement(r.exec_names[k], false);
		ScanResult	pr;

		if (ps == NULL || ps->plansource == NULL || ps->plansource->query_string == NULL)
			continue;
		if (learned_text(ps->plansource->query_string))
			return true;
		scan_sql(ps->plansource->query_string, NULL, false, true, &pr);
		if (pr.mentions)
			return true;
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

/*
 * The masked form of the message: the statement text q in it replaced by
 * masked_q (q already masked, computed once per report).
 */
static char *
mask_message(char *msg, const char *q, const char *masked_q)
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
	appendStringInfoString(&out, masked_q);
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

	bool		involved;
	ScanResult	dr;

	/*
	 * What other sessions published (new relations), if anything.  Not in a
	 * critical section, where only ErrorContext may allocate: there the
	 * report is masked as if the list were unreadable.
	 */
	bool		in_crit = CritSectionCount > 0;
	bool		shared_ok = !in_crit && views_from_shared(false);

	involved = text_involved(q);
	/* EXECUTE's "prepare:" DETAIL shows what the prepared statement does. */
	if (!involved && statement_log_line(edata) && edata->detail)
	{
		scan_sql(edata->detail, NULL, false, true, &dr);
		involved = dr.mentions;
	}
	/* Before this database's relations are known, or unreadable: fail closed. */
	if (!involved && q != NULL && (!db_known || !shared_ok) && OidIsValid(MyDatabaseId))
		involved = true;
	/* A standby's changes come from WAL: until this session read them, mask. */
	if (!involved && q != NULL && views_changed && RecoveryInProgress())
		involved = true;
	if (!standard_conforming_strings)
		scs_ever_off = true;

	if (involved)
	{
		/* (our swapped-in copy is already masked; anything else, once) */
		char	   *masked_q = q == NULL ? NULL :
			q == masked_query ? masked_query : mask_sql(q, MASK_STATEMENT);

		if (edata->message)
			edata->message = mask_message(edata->message, q, masked_q);
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
			/* (COPY t, line 2: "..." shows the input line) */
			if (edata->context)
				edata->context = pstrdup("(context masked by envelope)");
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
		else if (core_error && edata->sqlerrcode == ERRCODE_SYNTAX_ERROR && edata->message)
		{
			/* syntax error at or near "'...": the token may be a literal */
			edata->message = mask_double_quoted(edata->message);
		}
		edata->context = mask_part(edata->context, true, true);
		/* Any report during COPY quotes the input line in its context. */
		if (edata->context && strstr(edata->context, "COPY ") != NULL)
			edata->context = mask_double_quoted(edata->context);
		/* A deadlock report shows the other sessions' statements. */
		edata->detail_log = mask_part(edata->detail_log, true, false);
		edata->internalquery = mask_part(edata->internalquery, true, false);

		/* The STATEMENT line is printed from debug_query_string. */
		if (!edata->hide_stmt && q != NULL && q != masked_query && !in_crit)
			swap_statement(q, defuse_prefix(masked_q));
	}
	else
	{
		/* A PL/pgSQL statement of a function called by an unrelated one. */
		edata->context = mask_part(edata->context, false, true);
		edata->internalquery = mask_part(edata->internalquery, false, false);
		edata->detail_log = mask_part(edata->detail_log, false, false);
		if (!edata->hide_stmt && q != NULL && q != masked_query && !in_crit &&
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

/*-------------------------------------------------------------------------
 *
 * jsonx.c
 *		Extract scalar fields from a JSON document by path.
 *
 * KMS answers are parsed with PostgreSQL's own JSON parser (common/jsonapi),
 * which reports syntax errors as return codes rather than by ereport, so a
 * malformed answer becomes a clear "malformed answer" error in the caller.
 * Only the requested paths are kept; every other scalar is freed at once.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "common/jsonapi.h"
#include "lib/stringinfo.h"
#include "mb/pg_wchar.h"

#include "crypto.h"
#include "envelope.h"
#include "jsonx.h"

#define JSONX_MAX_DEPTH 32

typedef struct JsonxState
{
	StringInfoData path;
	int			saved_len[JSONX_MAX_DEPTH];
	int			array_index[JSONX_MAX_DEPTH];
	int			depth;			/* number of path components pushed */
	int			too_deep;		/* components not pushed because of the limit */
	JsonxField *fields;
	int			nfields;
} JsonxState;

/* Push a path component. */
static void
path_push(JsonxState *st, const char *component)
{
	if (st->depth >= JSONX_MAX_DEPTH)
	{
		st->too_deep++;
		return;
	}
	st->saved_len[st->depth++] = st->path.len;
	if (st->path.len > 0)
		appendStringInfoChar(&st->path, '.');
	appendStringInfoString(&st->path, component);
}

/* Pop a path component. */
static void
path_pop(JsonxState *st)
{
	if (st->too_deep > 0)
	{
		st->too_deep--;
		return;
	}
	st->path.len = st->saved_len[--st->depth];
	st->path.data[st->path.len] = '\0';
}

/* Object field start: push the key. */
static JSON_ACTION_RETURN_TYPE
on_field_start(void *state, char *fname, bool isnull)
{
	path_push((JsonxState *) state, fname);
	pfree(fname);
	JSON_ACTION_RETURN;
}

/* Object field end: pop the key. */
static JSON_ACTION_RETURN_TYPE
on_field_end(void *state, char *fname, bool isnull)
{
	path_pop((JsonxState *) state);
	JSON_ACTION_RETURN;
}

/* Array start: the next element has index 0. */
static JSON_ACTION_RETURN_TYPE
on_array_start(void *state)
{
	JsonxState *st = (JsonxState *) state;

	if (st->depth < JSONX_MAX_DEPTH)
		st->array_index[st->depth] = 0;
	JSON_ACTION_RETURN;
}

/* Array element start: push its index. */
static JSON_ACTION_RETURN_TYPE
on_element_start(void *state, bool isnull)
{
	JsonxState *st = (JsonxState *) state;
	char		buf[16];
	int			idx = 0;

	if (st->depth < JSONX_MAX_DEPTH)
		idx = st->array_index[st->depth]++;
	snprintf(buf, sizeof(buf), "%d", idx);
	path_push(st, buf);
	JSON_ACTION_RETURN;
}

/* Array element end: pop its index. */
static JSON_ACTION_RETURN_TYPE
on_element_end(void *state, bool isnull)
{
	path_pop((JsonxState *) state);
	JSON_ACTION_RETURN;
}

/* Scalar: keep it if its path is wanted, otherwise free it. */
static JSON_ACTION_RETURN_TYPE
on_scalar(void *state, char *token, JsonTokenType tokentype)
{
	JsonxState *st = (JsonxState *) state;

	if (st->too_deep == 0)
	{
		for (int i = 0; i < st->nfields; i++)
		{
			if (strcmp(st->fields[i].path, st->path.data) == 0)
			{
				if (st->fields[i].value)
				{
					env_wipe(st->fields[i].value, strlen(st->fields[i].value));
					pfree(st->fields[i].value);
				}
				st->fields[i].value = token;
				st->fields[i].is_string = (tokentype == JSON_TOKEN_STRING);
				JSON_ACTION_RETURN;
			}
		}
	}
	if (token)
		pfree(token);
	JSON_ACTION_RETURN;
}

/* Parse json and fill fields; returns NULL or a description of the syntax error. */
const char *
jsonx_extract(char *json, int len, JsonxField *fields, int nfields)
{
	JsonLexContext *lex;
	JsonSemAction sem;
	JsonxState	st;
	volatile JsonParseErrorType rc = JSON_SUCCESS;

	for (int i = 0; i < nfields; i++)
		fields[i].value = NULL;

	/* The JSON parser assumes valid encoding; KMS answers must be UTF-8. */
	if (pg_encoding_verifymbstr(PG_UTF8, json, len) != len)
		return "The answer is not valid UTF-8.";

	memset(&st, 0, sizeof(st));
	initStringInfo(&st.path);
	st.fields = fields;
	st.nfields = nfields;

	memset(&sem, 0, sizeof(sem));
	sem.semstate = &st;
	sem.object_field_start = on_field_start;
	sem.object_field_end = on_field_end;
	sem.array_start = on_array_start;
	sem.array_element_start = on_element_start;
	sem.array_element_end = on_element_end;
	sem.scalar = on_scalar;

	lex = envelope_json_lexer(json, len);
	PG_TRY();
	{
		rc = pg_parse_json(lex, &sem);
	}
	PG_FINALLY();
	{
		/* The lexer's string buffer held the last string token: a key, maybe. */
		if (lex->strval != NULL)
			env_wipe(lex->strval->data, lex->strval->maxlen);
	}
	PG_END_TRY();
	pfree(st.path.data);
	if (rc != JSON_SUCCESS)
	{
		/* json_errdetail() quotes the offending token: never pass it on. */
		jsonx_wipe(fields, nfields);
		return (rc == JSON_EXPECTED_MORE) ?
			"The answer is truncated." : "The answer is not valid JSON.";
	}
	return NULL;
}

/* Wipe and free the extracted values (they may hold key material). */
void
jsonx_wipe(JsonxField *fields, int nfields)
{
	for (int i = 0; i < nfields; i++)
	{
		if (fields[i].value)
		{
			env_wipe(fields[i].value, strlen(fields[i].value));
			pfree(fields[i].value);
			fields[i].value = NULL;
		}
	}
}

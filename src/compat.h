/*-------------------------------------------------------------------------
 *
 * compat.h
 *		Version shims: every PG_VERSION_NUM test in envelope lives here.
 *
 * envelope targets PostgreSQL 15 and later.  Code elsewhere uses the macros
 * below instead of testing the server version itself.
 *
 *-------------------------------------------------------------------------
 */
#ifndef ENVELOPE_COMPAT_H
#define ENVELOPE_COMPAT_H

#if PG_VERSION_NUM < 150000
#error "envelope requires PostgreSQL 15 or later"
#endif

/* JSON parser semantic actions return an error code from PostgreSQL 16 on. */
#if PG_VERSION_NUM >= 160000
#define JSON_ACTION_RETURN_TYPE JsonParseErrorType
#define JSON_ACTION_RETURN return JSON_SUCCESS
#else
#define JSON_ACTION_RETURN_TYPE void
#define JSON_ACTION_RETURN return
#endif

/* makeJsonLexContextCstringLen gained a leading "lex" argument in 17. */
#if PG_VERSION_NUM >= 170000
#define envelope_json_lexer(json, len) \
	makeJsonLexContextCstringLen(NULL, (json), (len), PG_UTF8, true)
#else
#define envelope_json_lexer(json, len) \
	makeJsonLexContextCstringLen((json), (len), PG_UTF8, true)
#endif

#endif							/* ENVELOPE_COMPAT_H */

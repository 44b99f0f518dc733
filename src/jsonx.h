/*-------------------------------------------------------------------------
 *
 * jsonx.h
 *		Extract scalar fields from a JSON document by path.
 *
 *-------------------------------------------------------------------------
 */
#ifndef ENVELOPE_JSONX_H
#define ENVELOPE_JSONX_H

/*
 * A field to extract.  Paths join object keys and array indexes with dots:
 * "data.ciphertext", "errors.0".  After jsonx_extract, value is the scalar's
 * text (palloc'd, de-escaped) or NULL if the path was absent or not a scalar.
 */
typedef struct JsonxField
{
	const char *path;
	char	   *value;
	bool		is_string;		/* the scalar was a JSON string */
} JsonxField;

/* Parse json and fill fields; returns NULL or a description of the syntax error. */
extern const char *jsonx_extract(char *json, int len, JsonxField *fields, int nfields);

/* Wipe and free the extracted values (they may hold key material). */
extern void jsonx_wipe(JsonxField *fields, int nfields);

#endif							/* ENVELOPE_JSONX_H */

/*-------------------------------------------------------------------------
 *
 * http.h
 *		HTTPS requests to a KMS that honour query cancel and statement_timeout.
 *
 *-------------------------------------------------------------------------
 */
#ifndef ENVELOPE_HTTP_H
#define ENVELOPE_HTTP_H

#define HTTP_MAX_HEADERS	8

typedef struct HttpRequest
{
	const char *method;			/* "GET" or "POST" */
	const char *url;
	const char *body;			/* NULL for none; may hold key material */
	int			body_len;
	const char *headers[HTTP_MAX_HEADERS];	/* "Name: value" lines */
	int			nheaders;
	const char *ca_file;		/* NULL: the system's CA bundle */
	int			timeout_ms;
} HttpRequest;

typedef struct HttpResponse
{
	long		status;
	char	   *body;			/* NUL-terminated; owned by http.c */
	int			body_len;
} HttpResponse;

/* A transport failure: curl's code and text. */
typedef struct HttpError
{
	int			code;			/* CURLcode */
	bool		overflow;		/* the answer exceeded the size limit */
	char		detail[256];
} HttpError;

/*
 * Perform a request, waiting interruptibly (query cancel and
 * statement_timeout raise as usual).  Returns false on a transport failure
 * (connect, TLS, timeout, oversized answer), described in *err; otherwise
 * true with any HTTP status in *resp.  The response body stays valid until
 * the next request or http_wipe().
 */
extern bool http_try(const HttpRequest *req, HttpResponse *resp, HttpError *err);

/* True if a transport failure is worth retrying (connect-level errors). */
extern bool http_error_retryable(const HttpError *err);

/* Raise the error that matches a transport failure. */
extern void http_raise(const HttpError *err, const HttpRequest *req) pg_attribute_noreturn();

/* Zero the response buffer (it may hold key material). */
extern void http_wipe(void);

#endif							/* ENVELOPE_HTTP_H */

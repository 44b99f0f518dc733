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

/*
 * Perform a request, waiting interruptibly.  Transport failures (connect,
 * TLS, timeout, oversized answer) raise an error; any HTTP status returns.
 * The response body stays valid until the next request or http_wipe().
 */
extern void http_perform(const HttpRequest *req, HttpResponse *resp);

/* Zero the response buffer (it may hold key material). */
extern void http_wipe(void);

/* Count of TCP connections opened by this backend (keep-alive check). */
extern long http_connections_opened(void);

#endif							/* ENVELOPE_HTTP_H */

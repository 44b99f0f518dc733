/*-------------------------------------------------------------------------
 *
 * http.c
 *		HTTPS requests to a KMS with libcurl, interruptible and keep-alive.
 *
 * Each backend keeps one curl multi handle and one easy handle for its whole
 * life, so the TLS connection to the KMS is reused between calls.  A request
 * never blocks in curl_easy_perform(): it is driven with curl_multi_perform()
 * and curl_multi_poll() in slices of at most 100 ms, with CHECK_FOR_INTERRUPTS()
 * between slices, so query cancel, statement_timeout and backend termination
 * take effect within that slice even when the KMS hangs.  If an interrupt
 * raises an error, PG_FINALLY detaches the transfer (the half-used
 * connection is then closed by curl rather than reused).
 *
 * libcurl callbacks never call into PostgreSQL (no palloc, no ereport): the
 * write callback copies into a fixed static buffer and records overflow,
 * which is reported after the transfer.  TLS peer and host verification are
 * always on.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <curl/curl.h>

#include <signal.h>

#include "envelope.h"
#include "libpq/pqsignal.h"
#include "miscadmin.h"

#include "crypto.h"
#include "http.h"
#include "shmem.h"

/* KMS answers are small JSON documents; anything larger is refused. */
#define HTTP_MAX_BODY		(64 * 1024)
#define HTTP_POLL_SLICE_MS	100

static CURLM *multi_handle = NULL;
static CURL *easy_handle = NULL;
static char response_buf[HTTP_MAX_BODY + 1];
static size_t response_len = 0;
static bool response_overflow = false;

/* libcurl write callback: append to the static buffer, never allocate. */
static size_t
write_cb(char *data, size_t size, size_t nmemb, void *userdata)
{
	size_t		n = size * nmemb;

	if (response_len + n > HTTP_MAX_BODY)
	{
		response_overflow = true;
		return 0;				/* makes curl fail with CURLE_WRITE_ERROR */
	}
	memcpy(response_buf + response_len, data, n);
	response_len += n;
	return n;
}

/*
 * curl_multi_perform with signals blocked, so that a resolver thread it
 * starts inherits a blocked mask and PostgreSQL's signal handlers only ever
 * run on the backend's own thread.
 */
static CURLMcode
perform_blocking_signals(int *running)
{
	sigset_t	save;
	CURLMcode	rc;

	sigprocmask(SIG_SETMASK, &BlockSig, &save);
	rc = curl_multi_perform(multi_handle, running);
	sigprocmask(SIG_SETMASK, &save, NULL);
	return rc;
}

/* Create the per-backend curl handles on first use. */
static void
http_init(void)
{
	if (easy_handle != NULL)
		return;
	if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
		ereport(ERROR,
				(errcode(ERRCODE_EXTERNAL_ROUTINE_EXCEPTION),
				 errmsg("could not initialize libcurl")));
	multi_handle = curl_multi_init();
	easy_handle = curl_easy_init();
	if (multi_handle == NULL || easy_handle == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("could not create a libcurl handle")));
}

/* Zero the response buffer (it may hold key material). */
void
http_wipe(void)
{
	env_wipe(response_buf, sizeof(response_buf));
	response_len = 0;
}

/* True if a transport failure is worth retrying (connect-level errors). */
bool
http_error_retryable(const HttpError *err)
{
	switch ((CURLcode) err->code)
	{
		case CURLE_COULDNT_RESOLVE_HOST:
		case CURLE_COULDNT_CONNECT:
		case CURLE_SSL_CONNECT_ERROR:
		case CURLE_GOT_NOTHING:
		case CURLE_SEND_ERROR:
		case CURLE_RECV_ERROR:
			return true;
		default:
			return false;
	}
}

/* Raise the error that matches a transport failure. */
void
http_raise(const HttpError *err, const HttpRequest *req)
{
	const char *detail = err->detail;

	switch ((CURLcode) err->code)
	{
		case CURLE_OPERATION_TIMEDOUT:
			ereport(ERROR,
					(errcode(ERRCODE_CONNECTION_FAILURE),
					 errmsg("KMS request timed out after %d ms", req->timeout_ms),
					 errdetail("curl: %s.", detail),
					 errhint("Check that the KMS is healthy, or raise envelope.kms_timeout.")));
			break;
		case CURLE_PEER_FAILED_VERIFICATION:
		case CURLE_SSL_CACERT_BADFILE:
		case CURLE_SSL_CERTPROBLEM:
			ereport(ERROR,
					(errcode(ERRCODE_SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION),
					 errmsg("could not verify the KMS's TLS certificate"),
					 errdetail("curl: %s.", detail),
					 errhint("Check envelope.vault_ca_file and the name in envelope.vault_addr.")));
			break;
		case CURLE_COULDNT_RESOLVE_HOST:
		case CURLE_COULDNT_CONNECT:
		case CURLE_SSL_CONNECT_ERROR:
		case CURLE_URL_MALFORMAT:
		case CURLE_UNSUPPORTED_PROTOCOL:
			ereport(ERROR,
					(errcode(ERRCODE_SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION),
					 errmsg("could not connect to the KMS"),
					 errdetail("curl: %s.", detail),
					 errhint("Check that the KMS is running and that envelope.vault_addr points to it.")));
			break;
		case CURLE_WRITE_ERROR:
			if (err->overflow)
				ereport(ERROR,
						(errcode(ERRCODE_PROTOCOL_VIOLATION),
						 errmsg("KMS answer is too large"),
						 errdetail("The answer exceeded %d bytes.", HTTP_MAX_BODY)));
			/* FALLTHROUGH */
		default:
			ereport(ERROR,
					(errcode(ERRCODE_CONNECTION_FAILURE),
					 errmsg("could not complete the KMS request"),
					 errdetail("curl: %s.", detail)));
	}
	pg_unreachable();
}

/* Perform a request, waiting interruptibly; false on a transport failure. */
bool
http_try(const HttpRequest *req, HttpResponse *resp, HttpError *err)
{
	struct curl_slist *volatile headers = NULL;
	static char errbuf[CURL_ERROR_SIZE];
	volatile bool attached = false;
	volatile CURLcode result = CURLE_OK;
	volatile bool done = false;
	long		nconn = 0;

	http_init();
	http_wipe();
	response_overflow = false;
	errbuf[0] = '\0';

	for (int i = 0; i < req->nheaders; i++)
	{
		struct curl_slist *h = curl_slist_append(headers, req->headers[i]);

		if (h == NULL)
		{
			curl_slist_free_all(headers);
			ereport(ERROR, (errcode(ERRCODE_OUT_OF_MEMORY),
							errmsg("out of memory")));
		}
		headers = h;
	}

	curl_easy_reset(easy_handle);
	curl_easy_setopt(easy_handle, CURLOPT_URL, req->url);
	curl_easy_setopt(easy_handle, CURLOPT_PROTOCOLS_STR, "https,http");
	curl_easy_setopt(easy_handle, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(easy_handle, CURLOPT_TCP_NODELAY, 1L);
	curl_easy_setopt(easy_handle, CURLOPT_TCP_KEEPALIVE, 1L);
	curl_easy_setopt(easy_handle, CURLOPT_SSL_VERIFYPEER, 1L);
	curl_easy_setopt(easy_handle, CURLOPT_SSL_VERIFYHOST, 2L);
	if (req->ca_file && req->ca_file[0])
		curl_easy_setopt(easy_handle, CURLOPT_CAINFO, req->ca_file);
	curl_easy_setopt(easy_handle, CURLOPT_TIMEOUT_MS, (long) req->timeout_ms);
	curl_easy_setopt(easy_handle, CURLOPT_CONNECTTIMEOUT_MS, (long) req->timeout_ms);
	curl_easy_setopt(easy_handle, CURLOPT_FOLLOWLOCATION, 0L);
	curl_easy_setopt(easy_handle, CURLOPT_HTTPHEADER, headers);
	curl_easy_setopt(easy_handle, CURLOPT_WRITEFUNCTION, write_cb);
	curl_easy_setopt(easy_handle, CURLOPT_ERRORBUFFER, errbuf);
	curl_easy_setopt(easy_handle, CURLOPT_USERAGENT, "envelope-postgresql");
	/* Environment proxies (https_proxy...) would silently reroute KMS traffic. */
	curl_easy_setopt(easy_handle, CURLOPT_PROXY, "");
#if LIBCURL_VERSION_NUM >= 0x075700
	/* Do not wait for a slow DNS lookup when a cancelled transfer is removed. */
	curl_easy_setopt(easy_handle, CURLOPT_QUICK_EXIT, 1L);
#endif
	if (strcmp(req->method, "POST") == 0)
	{
		curl_easy_setopt(easy_handle, CURLOPT_POST, 1L);
		curl_easy_setopt(easy_handle, CURLOPT_POSTFIELDSIZE, (long) req->body_len);
		curl_easy_setopt(easy_handle, CURLOPT_POSTFIELDS, req->body ? req->body : "");
	}
	else
		curl_easy_setopt(easy_handle, CURLOPT_HTTPGET, 1L);

	PG_TRY();
	{
		if (curl_multi_add_handle(multi_handle, easy_handle) != CURLM_OK)
			ereport(ERROR,
					(errcode(ERRCODE_EXTERNAL_ROUTINE_EXCEPTION),
					 errmsg("could not start the KMS request")));
		attached = true;

		while (!done)
		{
			int			running = 0;
			int			queued;
			CURLMsg    *msg;

			CHECK_FOR_INTERRUPTS();
			if (perform_blocking_signals(&running) != CURLM_OK)
				ereport(ERROR,
						(errcode(ERRCODE_EXTERNAL_ROUTINE_EXCEPTION),
						 errmsg("could not drive the KMS request")));
			while ((msg = curl_multi_info_read(multi_handle, &queued)) != NULL)
			{
				if (msg->msg == CURLMSG_DONE && msg->easy_handle == easy_handle)
				{
					result = msg->data.result;
					done = true;
				}
			}
			if (!done && running > 0)
				curl_multi_poll(multi_handle, NULL, 0, HTTP_POLL_SLICE_MS, NULL);
			else if (!done)
				done = true;	/* nothing running and no message: give up */
		}
	}
	PG_FINALLY();
	{
		if (attached)
			curl_multi_remove_handle(multi_handle, easy_handle);
		if (!done)
			http_wipe();		/* a partial answer from an interrupted transfer */
		curl_easy_setopt(easy_handle, CURLOPT_HTTPHEADER, NULL);
		curl_slist_free_all(headers);
	}
	PG_END_TRY();

	if (curl_easy_getinfo(easy_handle, CURLINFO_NUM_CONNECTS, &nconn) == CURLE_OK && nconn > 0)
		env_count(CNT_KMS_CONNECTIONS, nconn);
	if (result != CURLE_OK)
	{
		http_wipe();
		err->code = (int) result;
		err->overflow = response_overflow;
		strlcpy(err->detail, errbuf[0] ? errbuf : curl_easy_strerror(result), sizeof(err->detail));
		return false;
	}

	resp->status = 0;
	curl_easy_getinfo(easy_handle, CURLINFO_RESPONSE_CODE, &resp->status);
	response_buf[response_len] = '\0';
	resp->body = response_buf;
	resp->body_len = (int) response_len;
	return true;
}

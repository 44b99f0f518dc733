/*-------------------------------------------------------------------------
 *
 * sweeper.c
 *		"envelope key cache sweeper": wipes expired cache entries.
 *
 * Cached data keys must not outlive envelope.cache_ttl (plus
 * envelope.kms_outage_grace) even when nobody touches them, so a background
 * worker wakes about once a second and zeroises every entry past its time.
 * It needs shared memory but no database connection.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "envelope.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "utils/guc.h"

#include "audit.h"
#include "keycache.h"
#include "sweeper.h"

#define SWEEP_INTERVAL_MS	1000

PGDLLEXPORT void envelope_sweeper_main(Datum arg);

/* Register the worker (postmaster, while preloading). */
void
sweeper_register(void)
{
	BackgroundWorker worker;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS;
	worker.bgw_start_time = BgWorkerStart_PostmasterStart;
	worker.bgw_restart_time = 1;
	snprintf(worker.bgw_library_name, BGW_MAXLEN, "envelope");
	snprintf(worker.bgw_function_name, BGW_MAXLEN, "envelope_sweeper_main");
	snprintf(worker.bgw_name, BGW_MAXLEN, "envelope key cache sweeper");
	snprintf(worker.bgw_type, BGW_MAXLEN, "envelope key cache sweeper");
	RegisterBackgroundWorker(&worker);
}

/* Worker entry point: sweep once a second until shutdown. */
void
envelope_sweeper_main(Datum arg)
{
	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, SignalHandlerForShutdownRequest);
	BackgroundWorkerUnblockSignals();

	while (!ShutdownRequestPending)
	{
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 Min(SWEEP_INTERVAL_MS, envelope_audit_summary_interval / 2),
						 PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}
		keycache_sweep();
		env_audit_sweep();
	}
	proc_exit(0);
}

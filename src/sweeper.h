/*-------------------------------------------------------------------------
 *
 * sweeper.h
 *		Background worker that wipes expired cache entries.
 *
 *-------------------------------------------------------------------------
 */
#ifndef ENVELOPE_SWEEPER_H
#define ENVELOPE_SWEEPER_H

/* Register the worker (postmaster, while preloading). */
extern void sweeper_register(void);

#endif							/* ENVELOPE_SWEEPER_H */

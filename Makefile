# envelope: PGXS build, tests and developer targets.
#
#   make && sudo make install     build and install into the PostgreSQL found by pg_config
#   make test                     install dependencies, build, install, run every test
#   make installcheck             pg_regress suite against a running dev environment
#   make demo                     dependencies, build, install, dev environment, scripted tour
#   make bench                    benchmarks (ratios against baselines in the same session)

EXTENSION    = envelope
EXTVERSION   = $(shell sed -n "s/^default_version[[:space:]]*=[[:space:]]*'\([^']*\)'.*/\1/p" $(EXTENSION).control)

MODULE_big   = envelope
OBJS         = src/envelope.o src/format.o src/aesgcm.o src/crypto.o src/keycache.o src/keylocal.o \
               src/shmem.o src/sweeper.o src/authz.o src/audit.o \
               src/kek.o src/kms.o src/kms_vault.o src/http.o src/jsonx.o \
               src/funcs.o src/redact.o
DATA         = $(wildcard $(srcdir)/sql/$(EXTENSION)--*.sql)
PG_CPPFLAGS  = -I$(srcdir)/src -Wall -Wextra -Wno-unused-parameter -Wno-missing-field-initializers
SHLIB_LINK   = -lcurl -lcrypto

REGRESS      = setup format roundtrip tamper context rotate rotation_ops clear_view keks privileges errors upgrade
REGRESS_OPTS = --inputdir=$(srcdir) --load-extension=$(EXTENSION)

PG_CONFIG   ?= pg_config
PGXS        := $(shell $(PG_CONFIG) --pgxs)
include $(PGXS)

# PGXS does not track header dependencies: every object depends on every
# header (a changed struct must never leave an object with the old layout).
$(OBJS): $(wildcard src/*.h)

.PHONY: test demo bench regress-keys

# Keys the pg_regress suite uses must exist in the KMS before it runs.
installcheck: regress-keys
regress-keys:
	$(srcdir)/test/devenv kms-key regress_a regress_b regress_rot regress_ret

test:
	bash $(srcdir)/test/run-tests

demo:
	bash $(srcdir)/test/demo

bench:
	bash $(srcdir)/test/bench/run

-- Rotation operations: kek_usage, rewrap_column, retire_kek_version.
-- Error contexts name PL/pgSQL line numbers, which change with the code.
\set SHOW_CONTEXT never
-- Versions are relative to the KEK's version at the start (the test KMS
-- keeps keys between runs).
SELECT envelope.create_kek('regress_ret', 'vault', 'regress_ret') >= 1 AS registered;
CREATE TEMP TABLE rv0 AS SELECT latest_version AS v FROM envelope.keks WHERE name = 'regress_ret';

CREATE TABLE ops (id int PRIMARY KEY, a enc_bytea, b enc_bytea);
INSERT INTO ops SELECT g, enc('a' || g, 'regress_ret'), CASE WHEN g % 2 = 0 THEN enc('b' || g, 'regress_a') END
FROM generate_series(1, 2000) g;
ANALYZE ops;
-- A value kept aside, as if restored later from an old dump.
CREATE TABLE ops_old AS SELECT a::text AS a_text FROM ops WHERE id = 1;

-- Usage per column, KEK and version.
SELECT u.relation, u.column_name, u.kek, u.kek_version = k.latest_version AS on_latest, u.value_count
FROM envelope.kek_usage('ops') u JOIN envelope.keks k ON k.name = u.kek ORDER BY 1, 2, 3, 4;
SELECT count(*) > 0 AS whole_database FROM envelope.kek_usage() WHERE relation = 'ops'::regclass;
SELECT * FROM envelope.kek_usage('ops', 'id');
SELECT * FROM envelope.kek_usage(NULL, 'a');

SELECT envelope.rotate_kek('regress_ret') - (SELECT v FROM rv0) AS rotated_to;

-- Retiring the old version is refused while values use it.
\set VERBOSITY sqlstate
SELECT envelope.retire_kek_version('regress_ret', (SELECT v FROM rv0));
\set VERBOSITY default

-- Rewrap the column online, in batches (NOTICEs show progress).
SET client_min_messages = warning;
SELECT envelope.cache_flush() >= 0 AS flushed;
SELECT mark_stats();
CALL envelope.rewrap_column('ops', 'a', 500);
-- Rows sharing a data key share its rewrap: one KMS rewrap for 2000 rows.
SELECT kms_rewrap FROM since_mark();
RESET client_min_messages;
SELECT relation, column_name, kek, kek_version - (SELECT v FROM rv0) AS rel_version, value_count
FROM envelope.kek_usage('ops', 'a');
SELECT count(*) FILTER (WHERE dec_text(a) = 'a' || id) AS decrypt FROM ops;
SELECT relation, column_name, state, percent, rows_done, rows_left
FROM envelope.rewrap_progress WHERE relation = 'ops' ORDER BY id DESC LIMIT 1;

-- A rerun has nothing left to do.
SET client_min_messages = warning;
CALL envelope.rewrap_column('ops', 'a');
RESET client_min_messages;
SELECT rows_done, rows_left FROM envelope.rewrap_progress WHERE relation = 'ops' ORDER BY id DESC LIMIT 1;

-- Moving a column to another KEK is the same procedure with target_kek.
SET client_min_messages = warning;
CALL envelope.rewrap_column('ops', 'b', 300, 'regress_b');
RESET client_min_messages;
SELECT kek, value_count FROM envelope.kek_usage('ops', 'b');
SELECT count(*) FILTER (WHERE dec_text(b) = 'b' || id) AS decrypt FROM ops WHERE b IS NOT NULL;

-- Now the old version can be retired.
SELECT envelope.retire_kek_version('regress_ret', (SELECT v FROM rv0)) - (SELECT v FROM rv0) AS new_min_relative;
SELECT latest_version - (SELECT v FROM rv0) AS latest, retired_through - (SELECT v FROM rv0) AS retired_through,
	   retired_at IS NOT NULL AS retired
FROM envelope.keks WHERE name = 'regress_ret';
-- Retiring twice, or the latest version: clear errors (their text names
-- absolute versions, so only the SQLSTATE is shown).
\set VERBOSITY sqlstate
SELECT envelope.retire_kek_version('regress_ret', (SELECT v FROM rv0));
SELECT envelope.retire_kek_version('regress_ret', (SELECT latest_version FROM envelope.keks WHERE name = 'regress_ret'));
\set VERBOSITY default

-- The value from the "old dump" no longer decrypts (55000); current ones do.
SELECT envelope.cache_flush() >= 0 AS flushed;
SELECT try_dec(raw(a_text::enc_bytea)) AS old_value FROM ops_old;
SELECT dec_text(a) AS current_value FROM ops WHERE id = 1;

-- Values of a domain over enc_bytea are counted; values inside arrays make
-- retirement refuse (they cannot be counted).
CREATE DOMAIN ops_encd AS enc_bytea;
CREATE TABLE ops_nest (id int, d ops_encd, arr enc_bytea[]);
INSERT INTO ops_nest VALUES (1, enc('d', 'regress_ret')::ops_encd, NULL);
SELECT u.relation, u.column_name, u.kek, u.value_count FROM envelope.kek_usage('ops_nest') u;
INSERT INTO ops_nest VALUES (2, NULL, ARRAY[enc('x', 'regress_ret')]);
\set VERBOSITY sqlstate
SELECT envelope.retire_kek_version('regress_ret', (SELECT v FROM rv0));
\set VERBOSITY default
DROP TABLE ops_nest;
DROP DOMAIN ops_encd;

-- Argument errors.
CALL envelope.rewrap_column('ops', 'id');
CALL envelope.rewrap_column('ops', 'a', 0);
CALL envelope.rewrap_column('ops', 'a', 10, 'no_such_kek');
SELECT envelope.retire_kek_version('no_such_kek', 1);

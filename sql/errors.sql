-- Errors: clear messages with the right SQLSTATE, nothing quoted that is secret.
SET envelope.default_kek = 'regress_a';

-- A value whose KEK is not registered (the registry row removed).
CREATE TABLE errs AS SELECT enc('orphan', 'regress_b') AS v;
BEGIN;
DELETE FROM envelope.kek WHERE name = 'regress_b';
SELECT dec_text(v) FROM errs;
\echo :LAST_ERROR_SQLSTATE
ROLLBACK;
SELECT dec_text(v) FROM errs;

-- A value whose registry entry points at a different KMS key.
BEGIN;
UPDATE envelope.kek SET key_ref = 'some_other_key' WHERE name = 'regress_b';
SELECT dec_text(v) FROM errs;
\echo :LAST_ERROR_SQLSTATE
ROLLBACK;

-- Corrupt value stored through the type's input: rejected at input.
SELECT 'enc:AQEAAAAAAAAAAAAA'::enc_bytea;
\echo :LAST_ERROR_SQLSTATE

-- Expression indexes on dec() are impossible: it is not IMMUTABLE.
CREATE TABLE idx (v enc_bytea);
CREATE INDEX ON idx (dec_text(v));
\echo :LAST_ERROR_SQLSTATE

-- envelope 0.2.0 -> 0.3.0
--
-- Values are now written with algorithm 2 (per-value keys from AES-256
-- under the data key; docs/format.md); algorithm 1 values stay readable.
-- The shared library does that; this script gives the functions costs
-- that reflect their work (about 0.5 us per short value, 40 to 50 times a
-- simple operator), so the planner parallelises large decrypt scans and
-- evaluates cheap filters before decrypting.
\echo Use "ALTER EXTENSION envelope UPDATE TO '0.3.0'" to load this file. \quit

ALTER FUNCTION @extschema@.enc(pg_catalog.bytea, pg_catalog.text, pg_catalog.bytea) COST 50;
ALTER FUNCTION @extschema@.enc(pg_catalog.text, pg_catalog.text, pg_catalog.bytea) COST 50;
ALTER FUNCTION @extschema@.dec(@extschema@.enc_bytea, pg_catalog.bytea) COST 50;
ALTER FUNCTION @extschema@.dec_bytea(@extschema@.enc_bytea, pg_catalog.bytea) COST 50;
ALTER FUNCTION @extschema@.dec_text(@extschema@.enc_bytea, pg_catalog.bytea) COST 50;
ALTER FUNCTION @extschema@.rewrap(@extschema@.enc_bytea, pg_catalog.text) COST 100;

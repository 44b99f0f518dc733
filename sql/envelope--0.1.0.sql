/* envelope 0.1.0: column-level envelope encryption with KEKs in a KMS */

-- complain if script is sourced in psql, rather than via CREATE EXTENSION
\echo Use "CREATE EXTENSION envelope" to load this file. \quit

---------------------------------------------------------------------------
-- The type, in the schema CREATE EXTENSION installs into (public by default)
---------------------------------------------------------------------------

CREATE TYPE @extschema@.enc_bytea;

CREATE FUNCTION @extschema@.enc_bytea_in(pg_catalog.cstring) RETURNS @extschema@.enc_bytea
	AS 'MODULE_PATHNAME', 'enc_bytea_in' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION @extschema@.enc_bytea_out(@extschema@.enc_bytea) RETURNS pg_catalog.cstring
	AS 'MODULE_PATHNAME', 'enc_bytea_out' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION @extschema@.enc_bytea_recv(pg_catalog.internal) RETURNS @extschema@.enc_bytea
	AS 'MODULE_PATHNAME', 'enc_bytea_recv' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION @extschema@.enc_bytea_send(@extschema@.enc_bytea) RETURNS pg_catalog.bytea
	AS 'MODULE_PATHNAME', 'enc_bytea_send' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;

-- No comparison operators on purpose: equal plaintexts never compare equal.
-- STORAGE external: ciphertext does not compress, so do not try.
CREATE TYPE @extschema@.enc_bytea (
	INPUT = @extschema@.enc_bytea_in,
	OUTPUT = @extschema@.enc_bytea_out,
	RECEIVE = @extschema@.enc_bytea_recv,
	SEND = @extschema@.enc_bytea_send,
	INTERNALLENGTH = VARIABLE,
	ALIGNMENT = int4,
	STORAGE = external,
	CATEGORY = 'U'
);
COMMENT ON TYPE @extschema@.enc_bytea IS
	'AES-256-GCM ciphertext with its wrapped data key and KEK identity (envelope)';

---------------------------------------------------------------------------
-- Encrypt, decrypt, rewrap
---------------------------------------------------------------------------

CREATE FUNCTION @extschema@.enc(plaintext pg_catalog.bytea, kek pg_catalog.text DEFAULT NULL,
								context pg_catalog.bytea DEFAULT NULL)
	RETURNS @extschema@.enc_bytea
	AS 'MODULE_PATHNAME', 'envelope_enc' LANGUAGE C VOLATILE PARALLEL SAFE;
COMMENT ON FUNCTION @extschema@.enc(pg_catalog.bytea, pg_catalog.text, pg_catalog.bytea) IS
	'encrypt bytes under a KEK (default: envelope.default_kek), binding an optional context';

CREATE FUNCTION @extschema@.enc(plaintext pg_catalog.text, kek pg_catalog.text DEFAULT NULL,
								context pg_catalog.bytea DEFAULT NULL)
	RETURNS @extschema@.enc_bytea
	AS 'MODULE_PATHNAME', 'envelope_enc_text' LANGUAGE C VOLATILE PARALLEL SAFE;
COMMENT ON FUNCTION @extschema@.enc(pg_catalog.text, pg_catalog.text, pg_catalog.bytea) IS
	'encrypt text under a KEK (default: envelope.default_kek), binding an optional context';

-- STABLE, never IMMUTABLE: an expression index on dec() would store plaintext.
CREATE FUNCTION @extschema@.dec(value @extschema@.enc_bytea, context pg_catalog.bytea DEFAULT NULL)
	RETURNS pg_catalog.bytea
	AS 'MODULE_PATHNAME', 'envelope_dec' LANGUAGE C STABLE PARALLEL SAFE;
COMMENT ON FUNCTION @extschema@.dec(@extschema@.enc_bytea, pg_catalog.bytea) IS
	'decrypt a value to bytea';

-- DEC is an SQL keyword (a synonym of DECIMAL), so an unqualified dec(x)
-- is a syntax error; dec_bytea is the same function under a usable name.
CREATE FUNCTION @extschema@.dec_bytea(value @extschema@.enc_bytea, context pg_catalog.bytea DEFAULT NULL)
	RETURNS pg_catalog.bytea
	AS 'MODULE_PATHNAME', 'envelope_dec' LANGUAGE C STABLE PARALLEL SAFE;
COMMENT ON FUNCTION @extschema@.dec_bytea(@extschema@.enc_bytea, pg_catalog.bytea) IS
	'decrypt a value to bytea (the same as dec, callable without quoting)';

CREATE FUNCTION @extschema@.dec_text(value @extschema@.enc_bytea, context pg_catalog.bytea DEFAULT NULL)
	RETURNS pg_catalog.text
	AS 'MODULE_PATHNAME', 'envelope_dec_text' LANGUAGE C STABLE PARALLEL SAFE;
COMMENT ON FUNCTION @extschema@.dec_text(@extschema@.enc_bytea, pg_catalog.bytea) IS
	'decrypt a value to text, checking it is valid in the database encoding';

CREATE FUNCTION @extschema@.rewrap(value @extschema@.enc_bytea, kek pg_catalog.text DEFAULT NULL)
	RETURNS @extschema@.enc_bytea
	AS 'MODULE_PATHNAME', 'envelope_rewrap' LANGUAGE C VOLATILE PARALLEL SAFE;
COMMENT ON FUNCTION @extschema@.rewrap(@extschema@.enc_bytea, pg_catalog.text) IS
	'wrap a value''s data key under the latest version of its KEK, or under another KEK; the ciphertext is unchanged';

---------------------------------------------------------------------------
-- Management schema: registry, metadata, cache
---------------------------------------------------------------------------

CREATE SCHEMA envelope;
GRANT USAGE ON SCHEMA envelope TO PUBLIC;

CREATE TABLE envelope.kek (
	name					pg_catalog.text PRIMARY KEY
		CHECK (name OPERATOR(pg_catalog.~) '^[A-Za-z0-9_.-]{1,63}$'),
	provider				pg_catalog.text NOT NULL
		CHECK (provider OPERATOR(pg_catalog.~) '^[a-z0-9_]{1,63}$'),
	key_ref					pg_catalog.text NOT NULL
		CHECK (pg_catalog.length(key_ref) OPERATOR(pg_catalog.<=) 1024
			   AND key_ref OPERATOR(pg_catalog.~) '^[\x21-\x7e]+$'),
	latest_version			pg_catalog.int4 NOT NULL CHECK (latest_version >= 1),
	min_decryption_version	pg_catalog.int4 NOT NULL DEFAULT 1,
	created_at				pg_catalog.timestamptz NOT NULL DEFAULT pg_catalog.now(),
	rotated_at				pg_catalog.timestamptz,
	UNIQUE (provider, key_ref)
);
COMMENT ON TABLE envelope.kek IS 'registered key-encryption keys (envelope); change through envelope.create_kek and envelope.rotate_kek';
-- Keep the registry in dumps, so a restored database decrypts.
SELECT pg_catalog.pg_extension_config_dump('envelope.kek', '');
-- Every backend reads the registry to decrypt; it holds no secrets.
GRANT SELECT ON envelope.kek TO PUBLIC;

CREATE FUNCTION envelope.kek_changed() RETURNS trigger
	AS 'MODULE_PATHNAME', 'envelope_kek_changed' LANGUAGE C;
CREATE TRIGGER kek_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON envelope.kek
	FOR EACH STATEMENT EXECUTE FUNCTION envelope.kek_changed();
CREATE TRIGGER kek_row_changed AFTER UPDATE OR DELETE ON envelope.kek
	FOR EACH ROW EXECUTE FUNCTION envelope.kek_changed();

CREATE VIEW envelope.keks AS
	SELECT name, provider, key_ref, latest_version, min_decryption_version,
		   created_at, rotated_at
	FROM envelope.kek;
GRANT SELECT ON envelope.keks TO PUBLIC;

CREATE FUNCTION envelope.create_kek(name pg_catalog.text, provider pg_catalog.text, key_ref pg_catalog.text)
	RETURNS pg_catalog.int4
	AS 'MODULE_PATHNAME', 'envelope_create_kek' LANGUAGE C VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION envelope.create_kek(pg_catalog.text, pg_catalog.text, pg_catalog.text) IS
	'check a key with the KMS and register it as a KEK; returns its latest version';

CREATE FUNCTION envelope.rotate_kek(name pg_catalog.text)
	RETURNS pg_catalog.int4
	AS 'MODULE_PATHNAME', 'envelope_rotate_kek' LANGUAGE C STRICT VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION envelope.rotate_kek(pg_catalog.text) IS
	'create a new KEK version in the KMS and use it for new values at once; returns it';

CREATE FUNCTION envelope.metadata(value @extschema@.enc_bytea)
	RETURNS pg_catalog.jsonb
	AS 'MODULE_PATHNAME', 'envelope_metadata' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION envelope.metadata(@extschema@.enc_bytea) IS
	'everything a value carries except its ciphertext, as jsonb';

CREATE FUNCTION envelope.cache_flush(kek pg_catalog.text DEFAULT NULL)
	RETURNS pg_catalog.int4
	AS 'MODULE_PATHNAME', 'envelope_cache_flush' LANGUAGE C VOLATILE PARALLEL RESTRICTED;
COMMENT ON FUNCTION envelope.cache_flush(pg_catalog.text) IS
	'wipe cached data keys (all, or one KEK''s); returns how many';

CREATE FUNCTION envelope.cache_stats(
	OUT entries pg_catalog.int4, OUT capacity pg_catalog.int4,
	OUT hits pg_catalog.int8, OUT misses pg_catalog.int8,
	OUT expirations pg_catalog.int8, OUT evictions pg_catalog.int8,
	OUT stale_uses pg_catalog.int8, OUT kms_key_info pg_catalog.int8, OUT kms_generate pg_catalog.int8,
	OUT kms_wrap pg_catalog.int8, OUT kms_unwrap pg_catalog.int8,
	OUT kms_rewrap pg_catalog.int8, OUT kms_rotate pg_catalog.int8,
	OUT kms_retries pg_catalog.int8, OUT kms_errors pg_catalog.int8, OUT last_kms_error pg_catalog.timestamptz,
	OUT kms_connections pg_catalog.int8, OUT memory_locked pg_catalog.bool)
	RETURNS record
	AS 'MODULE_PATHNAME', 'envelope_cache_stats' LANGUAGE C VOLATILE PARALLEL RESTRICTED;
COMMENT ON FUNCTION envelope.cache_stats() IS
	'key cache occupancy and server-wide cache and KMS counters since the server started';

REVOKE ALL ON FUNCTION envelope.create_kek(pg_catalog.text, pg_catalog.text, pg_catalog.text) FROM PUBLIC;
REVOKE ALL ON FUNCTION envelope.rotate_kek(pg_catalog.text) FROM PUBLIC;
REVOKE ALL ON FUNCTION envelope.cache_flush(pg_catalog.text) FROM PUBLIC;
REVOKE ALL ON FUNCTION envelope.kek_changed() FROM PUBLIC;

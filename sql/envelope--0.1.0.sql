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
	retired_at				pg_catalog.timestamptz,
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
		   CASE WHEN min_decryption_version OPERATOR(pg_catalog.>) 1
				THEN min_decryption_version OPERATOR(pg_catalog.-) 1 END AS retired_through,
		   created_at, rotated_at, retired_at
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
	OUT kms_configure pg_catalog.int8, OUT kms_retries pg_catalog.int8, OUT kms_errors pg_catalog.int8, OUT last_kms_error pg_catalog.timestamptz,
	OUT kms_connections pg_catalog.int8, OUT memory_locked pg_catalog.bool)
	RETURNS record
	AS 'MODULE_PATHNAME', 'envelope_cache_stats' LANGUAGE C VOLATILE PARALLEL RESTRICTED;
COMMENT ON FUNCTION envelope.cache_stats() IS
	'key cache occupancy and server-wide cache and KMS counters since the server started';

REVOKE ALL ON FUNCTION envelope.create_kek(pg_catalog.text, pg_catalog.text, pg_catalog.text) FROM PUBLIC;
REVOKE ALL ON FUNCTION envelope.rotate_kek(pg_catalog.text) FROM PUBLIC;
REVOKE ALL ON FUNCTION envelope.cache_flush(pg_catalog.text) FROM PUBLIC;
REVOKE ALL ON FUNCTION envelope.kek_changed() FROM PUBLIC;

---------------------------------------------------------------------------
-- Rotation operations: usage, online rewrap of a column, retirement
---------------------------------------------------------------------------

CREATE FUNCTION envelope.kek_of(value @extschema@.enc_bytea) RETURNS pg_catalog.text
	AS 'MODULE_PATHNAME', 'envelope_kek_of' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION envelope.kek_of(@extschema@.enc_bytea) IS 'the KEK a value is wrapped under';

CREATE FUNCTION envelope.kek_version_of(value @extschema@.enc_bytea) RETURNS pg_catalog.int4
	AS 'MODULE_PATHNAME', 'envelope_kek_version_of' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION envelope.kek_version_of(@extschema@.enc_bytea) IS 'the KEK version a value is wrapped under';

CREATE FUNCTION envelope.needs_rewrap(value @extschema@.enc_bytea, target_kek pg_catalog.text DEFAULT NULL)
	RETURNS pg_catalog.bool
	AS 'MODULE_PATHNAME', 'envelope_needs_rewrap' LANGUAGE C STABLE PARALLEL SAFE;
COMMENT ON FUNCTION envelope.needs_rewrap(@extschema@.enc_bytea, pg_catalog.text) IS
	'true if the value is not on the latest version of its KEK (or of target_kek)';

CREATE FUNCTION envelope.audit_event(event pg_catalog.text, kek pg_catalog.text,
									 kek_version pg_catalog.int4, detail pg_catalog.jsonb)
	RETURNS void
	AS 'MODULE_PATHNAME', 'envelope_audit_event' LANGUAGE C VOLATILE PARALLEL RESTRICTED;
COMMENT ON FUNCTION envelope.audit_event(pg_catalog.text, pg_catalog.text, pg_catalog.int4, pg_catalog.jsonb) IS
	'write an ENVELOPE AUDIT record to the server log (used by envelope''s procedures)';

CREATE FUNCTION envelope._kms_retire(name pg_catalog.text, version pg_catalog.int4) RETURNS pg_catalog.int4
	AS 'MODULE_PATHNAME', 'envelope_kms_retire' LANGUAGE C STRICT VOLATILE PARALLEL UNSAFE;

CREATE FUNCTION envelope.kek_usage(tbl pg_catalog.regclass DEFAULT NULL, col pg_catalog.name DEFAULT NULL)
	RETURNS TABLE (relation pg_catalog.regclass, column_name pg_catalog.name, kek pg_catalog.text,
				   kek_version pg_catalog.int4, value_count pg_catalog.int8)
	LANGUAGE plpgsql STABLE
	SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	r record;
BEGIN
	IF col IS NOT NULL AND tbl IS NULL THEN
		RAISE EXCEPTION 'a column name needs a table'
			USING ERRCODE = 'invalid_parameter_value',
				  HINT = 'Call envelope.kek_usage(table, column).';
	END IF;
	FOR r IN
		SELECT a.attrelid::pg_catalog.regclass AS rel, a.attname AS att
		FROM pg_catalog.pg_attribute a
		JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) a.attrelid
		WHERE a.atttypid OPERATOR(pg_catalog.=) '@extschema@.enc_bytea'::pg_catalog.regtype
		  AND a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped
		  AND c.relkind IN ('r', 'm')
		  AND (tbl IS NULL OR c.oid OPERATOR(pg_catalog.=) tbl
			   OR c.oid IN (SELECT t.relid FROM pg_catalog.pg_partition_tree(tbl) t))
		  AND (col IS NULL OR a.attname OPERATOR(pg_catalog.=) col)
		ORDER BY 1, a.attnum
	LOOP
		RETURN QUERY EXECUTE pg_catalog.format(
			'SELECT %L::pg_catalog.regclass, %L::pg_catalog.name, envelope.kek_of(%I), '
			'envelope.kek_version_of(%I), pg_catalog.count(*) FROM %s WHERE %I IS NOT NULL '
			'GROUP BY 3, 4 ORDER BY 3, 4',
			r.rel, r.att, r.att, r.att, r.rel, r.att);
	END LOOP;
	IF col IS NOT NULL AND NOT FOUND AND NOT EXISTS (
		SELECT 1 FROM pg_catalog.pg_attribute a
		WHERE a.attrelid OPERATOR(pg_catalog.=) tbl AND a.attname OPERATOR(pg_catalog.=) col
		  AND a.atttypid OPERATOR(pg_catalog.=) '@extschema@.enc_bytea'::pg_catalog.regtype
		  AND NOT a.attisdropped) THEN
		RAISE EXCEPTION 'column "%" of relation "%" is not an enc_bytea column', col, tbl
			USING ERRCODE = 'undefined_column';
	END IF;
END
$$;
COMMENT ON FUNCTION envelope.kek_usage(pg_catalog.regclass, pg_catalog.name) IS
	'how many values of each enc_bytea column (all, or one table or column) sit on each KEK version';

-- Progress of rewrap_column runs, readable from other sessions.
CREATE TABLE envelope.rewrap_run (
	id				pg_catalog.int8 GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
	relid			pg_catalog.oid NOT NULL,
	relation		pg_catalog.text NOT NULL,
	column_name		pg_catalog.name NOT NULL,
	target_kek		pg_catalog.text,
	pid				pg_catalog.int4 NOT NULL,
	state			pg_catalog.text NOT NULL DEFAULT 'running',
	started_at		pg_catalog.timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
	updated_at		pg_catalog.timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
	finished_at		pg_catalog.timestamptz,
	blocks_total	pg_catalog.int8 NOT NULL,
	blocks_done		pg_catalog.int8 NOT NULL DEFAULT 0,
	rows_to_do		pg_catalog.int8 NOT NULL,
	rows_done		pg_catalog.int8 NOT NULL DEFAULT 0,
	rows_left		pg_catalog.int8,
	rows_per_second	pg_catalog.float8
);

CREATE VIEW envelope.rewrap_progress AS
	SELECT r.id, r.relation, r.column_name, r.target_kek, r.pid,
		   CASE WHEN r.state OPERATOR(pg_catalog.=) 'running' AND NOT EXISTS (
					SELECT 1 FROM pg_catalog.pg_stat_activity a
					WHERE a.pid OPERATOR(pg_catalog.=) r.pid AND a.state OPERATOR(pg_catalog.=) 'active')
				THEN 'interrupted' ELSE r.state END AS state,
		   r.started_at, r.updated_at, r.finished_at,
		   r.blocks_done, r.blocks_total,
		   pg_catalog.round(100.0 * r.blocks_done / GREATEST(r.blocks_total, 1), 1) AS percent,
		   r.rows_done, r.rows_left, pg_catalog.round(r.rows_per_second::pg_catalog.numeric, 1) AS rows_per_second,
		   CASE WHEN r.state OPERATOR(pg_catalog.=) 'running' AND r.rows_per_second OPERATOR(pg_catalog.>) 0
				THEN pg_catalog.make_interval(secs => r.rows_left / r.rows_per_second) END AS eta
	FROM envelope.rewrap_run r;
GRANT SELECT ON envelope.rewrap_progress TO PUBLIC;

CREATE PROCEDURE envelope.rewrap_column(tbl pg_catalog.regclass, col pg_catalog.name,
										batch_size pg_catalog.int4 DEFAULT 10000,
										target_kek pg_catalog.text DEFAULT NULL,
										pause pg_catalog.interval DEFAULT '0')
	LANGUAGE plpgsql
AS $$
DECLARE
	kind		"char";
	leaf		pg_catalog.regclass;
	run_id		pg_catalog.int8;
	bs			pg_catalog.int8 := pg_catalog.current_setting('block_size')::pg_catalog.int8;
	nblocks		pg_catalog.int8;
	blk			pg_catalog.int8 := 0;
	step		pg_catalog.int8;
	density		pg_catalog.float8;
	todo		pg_catalog.int8;
	done		pg_catalog.int8 := 0;
	n			pg_catalog.int8;
	rate		pg_catalog.float8;
	t0			pg_catalog.timestamptz := pg_catalog.clock_timestamp();
	upd			pg_catalog.text;
BEGIN
	IF batch_size IS NULL OR batch_size OPERATOR(pg_catalog.<) 1 THEN
		RAISE EXCEPTION 'batch_size must be at least 1' USING ERRCODE = 'invalid_parameter_value';
	END IF;
	IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
				   WHERE a.attrelid OPERATOR(pg_catalog.=) tbl AND a.attname OPERATOR(pg_catalog.=) col
					 AND NOT a.attisdropped
					 AND a.atttypid OPERATOR(pg_catalog.=) '@extschema@.enc_bytea'::pg_catalog.regtype) THEN
		RAISE EXCEPTION 'column "%" of relation "%" is not an enc_bytea column', col, tbl
			USING ERRCODE = 'undefined_column';
	END IF;
	IF target_kek IS NOT NULL AND NOT EXISTS (SELECT 1 FROM envelope.kek k WHERE k.name OPERATOR(pg_catalog.=) target_kek) THEN
		RAISE EXCEPTION 'KEK "%" does not exist', target_kek USING ERRCODE = 'undefined_object';
	END IF;

	SELECT c.relkind INTO kind FROM pg_catalog.pg_class c WHERE c.oid OPERATOR(pg_catalog.=) tbl;
	IF kind OPERATOR(pg_catalog.=) 'p' THEN
		-- A partitioned table: each partition in turn.
		FOR leaf IN SELECT t.relid FROM pg_catalog.pg_partition_tree(tbl) t WHERE t.isleaf LOOP
			CALL envelope.rewrap_column(leaf, col, batch_size, target_kek, pause);
		END LOOP;
		RETURN;
	END IF;

	-- Work in ranges of blocks (TID range scans), about batch_size rows each;
	-- rows already on the target are skipped, so a rerun resumes cheaply.
	nblocks := pg_catalog.pg_relation_size(tbl) OPERATOR(pg_catalog./) bs;
	SELECT CASE WHEN c.relpages OPERATOR(pg_catalog.>) 0 AND c.reltuples OPERATOR(pg_catalog.>) 0
				THEN c.reltuples OPERATOR(pg_catalog./) c.relpages ELSE 50 END
	  INTO density FROM pg_catalog.pg_class c WHERE c.oid OPERATOR(pg_catalog.=) tbl;
	step := GREATEST(1, pg_catalog.ceil(batch_size OPERATOR(pg_catalog./) density))::pg_catalog.int8;
	EXECUTE pg_catalog.format('SELECT pg_catalog.count(*) FROM %s WHERE envelope.needs_rewrap(%I, $1)', tbl, col)
		INTO todo USING target_kek;

	INSERT INTO envelope.rewrap_run (relid, relation, column_name, target_kek, pid, blocks_total, rows_to_do, rows_left)
		VALUES (tbl, tbl::pg_catalog.text, col, target_kek, pg_catalog.pg_backend_pid(), nblocks, todo, todo)
		RETURNING id INTO run_id;
	RAISE NOTICE 'rewrap_column %.%: % values to rewrap in % blocks, batches of % blocks',
		tbl, col, todo, nblocks, step;
	COMMIT;

	-- The row is re-checked by the UPDATE itself: a row the application
	-- changed meanwhile is seen in its new version (never overwritten with
	-- an older value) and skipped if it no longer needs a rewrap.
	upd := pg_catalog.format(
		'UPDATE %s SET %I = @extschema@.rewrap(%I, $3) '
		'WHERE ctid OPERATOR(pg_catalog.>=) $1 AND ctid OPERATOR(pg_catalog.<) $2 '
		'AND envelope.needs_rewrap(%I, $3)', tbl, col, col, col);
	WHILE blk OPERATOR(pg_catalog.<) nblocks LOOP
		EXECUTE upd USING pg_catalog.format('(%s,0)', blk)::pg_catalog.tid,
						  pg_catalog.format('(%s,0)', blk OPERATOR(pg_catalog.+) step)::pg_catalog.tid,
						  target_kek;
		GET DIAGNOSTICS n = ROW_COUNT;
		done := done OPERATOR(pg_catalog.+) n;
		blk := LEAST(blk OPERATOR(pg_catalog.+) step, nblocks);
		rate := done OPERATOR(pg_catalog./) GREATEST(
			pg_catalog.date_part('epoch', pg_catalog.clock_timestamp() OPERATOR(pg_catalog.-) t0), 0.001);
		UPDATE envelope.rewrap_run
		   SET blocks_done = blk, rows_done = done,
			   rows_left = GREATEST(todo OPERATOR(pg_catalog.-) done, 0),
			   rows_per_second = rate, updated_at = pg_catalog.clock_timestamp()
		 WHERE id OPERATOR(pg_catalog.=) run_id;
		IF n OPERATOR(pg_catalog.>) 0 THEN
			PERFORM envelope.audit_event('rewrap', target_kek, NULL,
				pg_catalog.jsonb_build_object('relation', tbl::pg_catalog.text, 'column', col,
											  'values', n, 'run', run_id,
											  'target', COALESCE(target_kek, 'latest version of each value''s KEK')));
		END IF;
		RAISE NOTICE 'rewrap_column %.%: % rows done, % left, % rows/s (block % of %)',
			tbl, col, done, GREATEST(todo OPERATOR(pg_catalog.-) done, 0),
			pg_catalog.round(rate::pg_catalog.numeric), blk, nblocks;
		COMMIT;
		IF pause OPERATOR(pg_catalog.>) '0'::pg_catalog.interval THEN
			PERFORM pg_catalog.pg_sleep_for(pause);
		END IF;
	END LOOP;

	-- Rows the application moved behind the scan, or wrote under another KEK.
	EXECUTE pg_catalog.format('SELECT pg_catalog.count(*) FROM %s WHERE envelope.needs_rewrap(%I, $1)', tbl, col)
		INTO n USING target_kek;
	UPDATE envelope.rewrap_run
	   SET state = 'done', finished_at = pg_catalog.clock_timestamp(), rows_left = n,
		   updated_at = pg_catalog.clock_timestamp()
	 WHERE id OPERATOR(pg_catalog.=) run_id;
	IF n OPERATOR(pg_catalog.>) 0 THEN
		RAISE NOTICE 'rewrap_column %.%: done, % rows rewrapped; % values still need a rewrap (written during the run); run it again',
			tbl, col, done, n;
	ELSE
		RAISE NOTICE 'rewrap_column %.%: done, % rows rewrapped', tbl, col, done;
	END IF;
	COMMIT;
END
$$;
COMMENT ON PROCEDURE envelope.rewrap_column(pg_catalog.regclass, pg_catalog.name, pg_catalog.int4, pg_catalog.text, pg_catalog.interval) IS
	'rewrap a column online, in committed batches: resumable, safe under concurrent writes';

CREATE FUNCTION envelope.retire_kek_version(kek pg_catalog.text, version pg_catalog.int4)
	RETURNS pg_catalog.int4
	LANGUAGE plpgsql
	SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	n		pg_catalog.int8;
	detail	pg_catalog.text;
BEGIN
	IF NOT EXISTS (SELECT 1 FROM envelope.kek k WHERE k.name OPERATOR(pg_catalog.=) retire_kek_version.kek) THEN
		RAISE EXCEPTION 'KEK "%" does not exist', retire_kek_version.kek USING ERRCODE = 'undefined_object';
	END IF;
	IF retire_kek_version.version OPERATOR(pg_catalog.>=) (
		SELECT k.latest_version FROM envelope.kek k WHERE k.name OPERATOR(pg_catalog.=) retire_kek_version.kek) THEN
		RAISE EXCEPTION 'cannot retire the latest version of KEK "%"', retire_kek_version.kek
			USING ERRCODE = 'invalid_parameter_value',
				  HINT = 'Rotate the KEK first with envelope.rotate_kek(), then rewrap.';
	END IF;
	SELECT pg_catalog.sum(u.value_count),
		   pg_catalog.string_agg(pg_catalog.format('%s.%s has %s values on version %s',
												   u.relation, u.column_name, u.value_count, u.kek_version), '; ')
	  INTO n, detail
	  FROM envelope.kek_usage() u
	 WHERE u.kek OPERATOR(pg_catalog.=) retire_kek_version.kek
	   AND u.kek_version OPERATOR(pg_catalog.<=) retire_kek_version.version;
	IF n OPERATOR(pg_catalog.>) 0 THEN
		RAISE EXCEPTION 'cannot retire version % of KEK "%": % values still use it or an older version',
			retire_kek_version.version, retire_kek_version.kek, n
			USING ERRCODE = 'object_in_use',
				  DETAIL = detail || '.',
				  HINT = 'Rewrap them first, for example with CALL envelope.rewrap_column(''table'', ''column'').';
	END IF;
	RETURN envelope._kms_retire(retire_kek_version.kek, retire_kek_version.version);
END
$$;
COMMENT ON FUNCTION envelope.retire_kek_version(pg_catalog.text, pg_catalog.int4) IS
	'retire a KEK version and older ones in the KMS, once no value in this database uses them; returns the new minimum version';

REVOKE ALL ON FUNCTION envelope._kms_retire(pg_catalog.text, pg_catalog.int4) FROM PUBLIC;
REVOKE ALL ON FUNCTION envelope.retire_kek_version(pg_catalog.text, pg_catalog.int4) FROM PUBLIC;
REVOKE ALL ON FUNCTION envelope.audit_event(pg_catalog.text, pg_catalog.text, pg_catalog.int4, pg_catalog.jsonb) FROM PUBLIC;
REVOKE ALL ON PROCEDURE envelope.rewrap_column(pg_catalog.regclass, pg_catalog.name, pg_catalog.int4, pg_catalog.text, pg_catalog.interval) FROM PUBLIC;

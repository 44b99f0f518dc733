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

-- Columns that hold enc_bytea values: of the type itself or a domain over it
-- ('direct'), or inside arrays or composite types ('nested', not countable
-- by kek_usage).  Other sessions' temporary tables and unpopulated
-- materialized views cannot be read and are left out.
CREATE FUNCTION envelope._enc_columns(tbl pg_catalog.regclass DEFAULT NULL)
	RETURNS TABLE (relid pg_catalog.oid, attname pg_catalog.name, attnum pg_catalog.int2, nested pg_catalog.bool)
	LANGUAGE sql STABLE
	SET search_path = pg_catalog, pg_temp
AS $$
	WITH RECURSIVE holders(typid, nested) AS (
		SELECT '@extschema@.enc_bytea'::pg_catalog.regtype::pg_catalog.oid, false
		UNION
		SELECT x.oid, x.nested
		  FROM holders h, LATERAL (
				-- domains over it
				SELECT t.oid, h.nested FROM pg_catalog.pg_type t
				 WHERE t.typbasetype OPERATOR(pg_catalog.=) h.typid
				UNION ALL
				-- arrays of it
				SELECT t.oid, true FROM pg_catalog.pg_type t
				 WHERE t.typelem OPERATOR(pg_catalog.=) h.typid AND t.typcategory OPERATOR(pg_catalog.=) 'A'
				UNION ALL
				-- composite types with a field of it
				SELECT c.reltype, true
				  FROM pg_catalog.pg_attribute ca JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) ca.attrelid
				 WHERE ca.atttypid OPERATOR(pg_catalog.=) h.typid AND NOT ca.attisdropped
				   AND c.relkind OPERATOR(pg_catalog.=) 'c') x
	)
	SELECT a.attrelid, a.attname, a.attnum, pg_catalog.bool_or(h.nested)
	  FROM pg_catalog.pg_attribute a
	  JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) a.attrelid
	  JOIN holders h ON h.typid OPERATOR(pg_catalog.=) a.atttypid
	 WHERE a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped
	   AND c.relkind IN ('r', 'm') AND c.relispopulated
	   AND NOT pg_catalog.pg_is_other_temp_schema(c.relnamespace)
	   AND (tbl IS NULL OR c.oid OPERATOR(pg_catalog.=) tbl
			OR c.oid IN (SELECT t.relid FROM pg_catalog.pg_partition_tree(tbl) t))
	 GROUP BY 1, 2, 3
$$;

CREATE FUNCTION envelope.kek_usage(tbl pg_catalog.regclass DEFAULT NULL, col pg_catalog.name DEFAULT NULL)
	RETURNS TABLE (relation pg_catalog.regclass, column_name pg_catalog.name, kek pg_catalog.text,
				   kek_version pg_catalog.int4, value_count pg_catalog.int8)
	LANGUAGE plpgsql STABLE
	SET search_path = pg_catalog, pg_temp
	SET row_security = off		-- count every row, or fail: never filter
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
		SELECT e.relid::pg_catalog.regclass AS rel, e.attname AS att
		  FROM envelope._enc_columns(tbl) e
		 WHERE NOT e.nested AND (col IS NULL OR e.attname OPERATOR(pg_catalog.=) col)
		 ORDER BY 1, e.attnum
	LOOP
		-- ONLY: an inheritance parent's children are counted on their own.
		RETURN QUERY EXECUTE pg_catalog.format(
			'SELECT %L::pg_catalog.regclass, %L::pg_catalog.name, envelope.kek_of(%I::@extschema@.enc_bytea), '
			'envelope.kek_version_of(%I::@extschema@.enc_bytea), pg_catalog.count(*) FROM ONLY %s WHERE %I IS NOT NULL '
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
		'UPDATE ONLY %s SET %I = @extschema@.rewrap(%I, $3) '
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
	SET row_security = off
AS $$
DECLARE
	n		pg_catalog.int8;
	detail	pg_catalog.text;
	since	pg_catalog.timestamptz;
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
	-- Values inside arrays or composite types cannot be counted: refuse.
	SELECT pg_catalog.string_agg(pg_catalog.format('%s.%I', e.relid::pg_catalog.regclass, e.attname), ', ')
	  INTO detail FROM envelope._enc_columns() e WHERE e.nested;
	IF detail IS NOT NULL THEN
		RAISE EXCEPTION 'cannot retire version % of KEK "%": some columns hold enc_bytea values inside arrays or composite types',
			retire_kek_version.version, retire_kek_version.kek
			USING ERRCODE = 'feature_not_supported',
				  DETAIL = pg_catalog.format('Columns: %s.', detail),
				  HINT = 'Move those values to enc_bytea columns, or rewrap them yourself and retire the version in the KMS.';
	END IF;
	-- A transaction that began before the rotation may hold values on the
	-- old version that kek_usage() cannot see yet.
	SELECT COALESCE(k.rotated_at, k.created_at) INTO since FROM envelope.kek k
	 WHERE k.name OPERATOR(pg_catalog.=) retire_kek_version.kek;
	SELECT pg_catalog.string_agg(a.pid::pg_catalog.text, ', ') INTO detail
	  FROM pg_catalog.pg_stat_activity a
	 WHERE a.xact_start OPERATOR(pg_catalog.<) since AND a.pid OPERATOR(pg_catalog.<>) pg_catalog.pg_backend_pid();
	IF detail IS NULL THEN
		SELECT pg_catalog.string_agg(p.gid, ', ') INTO detail
		  FROM pg_catalog.pg_prepared_xacts p WHERE p.prepared OPERATOR(pg_catalog.<) since;
	END IF;
	IF detail IS NOT NULL THEN
		RAISE EXCEPTION 'cannot retire version % of KEK "%" yet: transactions that began before its last rotation are still open',
			retire_kek_version.version, retire_kek_version.kek
			USING ERRCODE = 'object_in_use',
				  DETAIL = pg_catalog.format('Open since before the rotation: %s.', detail),
				  HINT = 'They may hold values on the old version that are not visible yet; retry when they have ended.';
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

-- BEGIN clear views (issue 6)
---------------------------------------------------------------------------
-- Clear views: a view of a table with its enc_bytea columns decrypted, and
-- INSTEAD OF triggers that encrypt what is written through it
---------------------------------------------------------------------------

-- Per-column choices read by create_clear_view (set with set_clear_column).
-- A table is recorded by name, which pg_dump keeps, and by OID and owner:
-- a restored table has a new OID, so a row applies to the table with its
-- schema and name when the OID matches or the owner is the same (so a row
-- left behind by another role's dropped table never applies).  No regclass
-- columns, so pg_upgrade works.
CREATE TABLE envelope.clear_view_column (
	relid			pg_catalog.oid NOT NULL,
	relschema		pg_catalog.name NOT NULL,
	relname			pg_catalog.name NOT NULL,
	relowner		pg_catalog.name NOT NULL,
	column_name		pg_catalog.name NOT NULL,
	as_type			pg_catalog.text NOT NULL DEFAULT 'text'
		CHECK (as_type OPERATOR(pg_catalog.=) 'text' OR as_type OPERATOR(pg_catalog.=) 'bytea'),
	context_expr	pg_catalog.text,
	set_at			pg_catalog.timestamptz NOT NULL DEFAULT pg_catalog.now(),
	PRIMARY KEY (relschema, relname, column_name, relowner)
);
COMMENT ON TABLE envelope.clear_view_column IS
	'per-column choices for envelope.create_clear_view (decrypt as text or bytea, row context expression); change through envelope.set_clear_column';
SELECT pg_catalog.pg_extension_config_dump('envelope.clear_view_column', '');

-- May the current user change a configuration row of this table?  Its owner
-- (or a member of the owner role) may; so may the role the row records as
-- owner, for rows whose table is gone or came from a dump.
CREATE FUNCTION envelope._clear_view_may_edit(relid pg_catalog.oid, relowner pg_catalog.name)
	RETURNS pg_catalog.bool
	LANGUAGE plpgsql STABLE
	SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	o	oid;
BEGIN
	SELECT c.relowner INTO o FROM pg_class c WHERE c.oid = _clear_view_may_edit.relid;
	IF FOUND AND pg_has_role(o, 'USAGE') THEN
		RETURN true;
	END IF;
	SELECT r.oid INTO o FROM pg_roles r WHERE r.rolname = _clear_view_may_edit.relowner;
	RETURN FOUND AND pg_has_role(o, 'USAGE');
END
$$;

-- Everyone may write the table, but only rows of tables they own, naming
-- them correctly: a context expression becomes code in the owner's view.
-- Superusers are not checked, so a restore (stale OIDs) works.
CREATE FUNCTION envelope._clear_view_column_check() RETURNS trigger
	LANGUAGE plpgsql
	SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	t	record;
BEGIN
	IF (SELECT r.rolsuper FROM pg_roles r WHERE r.rolname = current_user) THEN
		RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
	END IF;
	IF TG_OP IN ('UPDATE', 'DELETE') AND NOT envelope._clear_view_may_edit(OLD.relid, OLD.relowner) THEN
		RAISE EXCEPTION 'must be owner of table %.%', quote_ident(OLD.relschema), quote_ident(OLD.relname)
			USING ERRCODE = 'insufficient_privilege';
	END IF;
	IF TG_OP = 'DELETE' THEN
		RETURN OLD;
	END IF;
	SELECT n.nspname, c.relname, c.relkind, c.relowner, pg_get_userbyid(c.relowner) AS owner_name
	  INTO t
	  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
	 WHERE c.oid = NEW.relid;
	IF NOT FOUND OR t.relkind NOT IN ('r', 'p') OR NOT pg_has_role(t.relowner, 'USAGE') THEN
		RAISE EXCEPTION 'must be owner of table %', NEW.relid::regclass
			USING ERRCODE = 'insufficient_privilege',
				  HINT = 'Use envelope.set_clear_column().';
	END IF;
	IF NEW.relschema IS DISTINCT FROM t.nspname OR NEW.relname IS DISTINCT FROM t.relname
	   OR NEW.relowner IS DISTINCT FROM t.owner_name THEN
		RAISE EXCEPTION 'relschema, relname and relowner must describe table %', NEW.relid::regclass
			USING ERRCODE = 'invalid_parameter_value',
				  HINT = 'Use envelope.set_clear_column().';
	END IF;
	RETURN NEW;
END
$$;
CREATE TRIGGER clear_view_column_check BEFORE INSERT OR UPDATE OR DELETE ON envelope.clear_view_column
	FOR EACH ROW EXECUTE FUNCTION envelope._clear_view_column_check();
GRANT SELECT, INSERT, UPDATE, DELETE ON envelope.clear_view_column TO PUBLIC;

-- True if text can only be one SQL expression: parentheses balanced outside
-- quoted literals and identifiers, no semicolon, no comment.
CREATE FUNCTION envelope._is_single_expression(expr pg_catalog.text) RETURNS pg_catalog.bool
	LANGUAGE plpgsql IMMUTABLE
	SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	depth	int := 0;
	q		text := NULL;		-- the quote we are inside, if any
	ch		text;
	nxt		text;
BEGIN
	IF expr IS NULL OR btrim(expr) = '' OR position('$' IN expr) > 0 THEN
		RETURN false;
	END IF;
	FOR i IN 1 .. length(expr) LOOP
		ch := substr(expr, i, 1);
		nxt := substr(expr, i + 1, 1);
		IF q IS NOT NULL THEN
			IF ch = q THEN
				q := NULL;		-- a doubled quote reopens at once, which is fine
			END IF;
		ELSIF ch IN ('''', '"') THEN
			q := ch;
		ELSIF ch = ';' OR (ch = '-' AND nxt = '-') OR (ch = '/' AND nxt = '*') THEN
			RETURN false;
		ELSIF ch = '(' THEN
			depth := depth + 1;
		ELSIF ch = ')' THEN
			depth := depth - 1;
			IF depth < 0 THEN
				RETURN false;
			END IF;
		END IF;
	END LOOP;
	RETURN depth = 0 AND q IS NULL;
END
$$;

-- The choices that apply to a table, one row per configured column.
CREATE FUNCTION envelope._clear_view_config(tbl pg_catalog.regclass)
	RETURNS TABLE (column_name pg_catalog.name, as_type pg_catalog.text, context_expr pg_catalog.text)
	LANGUAGE sql STABLE
	SET search_path = pg_catalog, pg_temp
AS $$
	SELECT DISTINCT ON (cf.column_name) cf.column_name, cf.as_type, cf.context_expr
	  FROM envelope.clear_view_column cf, pg_class r, pg_namespace n
	 WHERE r.oid = tbl AND n.oid = r.relnamespace
	   AND (cf.relid = r.oid
			OR (cf.relschema = n.nspname AND cf.relname = r.relname
				AND cf.relowner = pg_get_userbyid(r.relowner)))
	 ORDER BY cf.column_name, (cf.relid = r.oid) DESC, cf.set_at DESC
$$;

CREATE FUNCTION envelope.set_clear_column(tbl pg_catalog.regclass, col pg_catalog.name,
										  as_type pg_catalog.text DEFAULT 'text',
										  context_expr pg_catalog.text DEFAULT NULL)
	RETURNS void
	LANGUAGE plpgsql
	SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	t		record;
	typ		text := lower(btrim(COALESCE(set_clear_column.as_type, 'text')));
	ctx		text := NULLIF(btrim(set_clear_column.context_expr), '');
BEGIN
	SELECT c.oid, n.nspname, c.relname, c.relkind, c.relowner, pg_get_userbyid(c.relowner) AS owner_name
	  INTO t
	  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
	 WHERE c.oid = tbl;
	IF t.relkind NOT IN ('r', 'p') THEN
		RAISE EXCEPTION '"%" is not a table', tbl USING ERRCODE = 'wrong_object_type';
	END IF;
	IF NOT pg_has_role(t.relowner, 'USAGE') THEN
		RAISE EXCEPTION 'must be owner of table %', tbl USING ERRCODE = 'insufficient_privilege';
	END IF;
	IF NOT EXISTS (SELECT 1 FROM pg_attribute a
				   WHERE a.attrelid = tbl AND a.attname = col AND a.attnum > 0 AND NOT a.attisdropped
					 AND a.atttypid = '@extschema@.enc_bytea'::regtype) THEN
		RAISE EXCEPTION 'column "%" of relation "%" is not an enc_bytea column', col, tbl
			USING ERRCODE = 'undefined_column';
	END IF;
	IF typ NOT IN ('text', 'bytea') THEN
		RAISE EXCEPTION 'as_type must be ''text'' or ''bytea'', not ''%''', set_clear_column.as_type
			USING ERRCODE = 'invalid_parameter_value';
	END IF;
	DELETE FROM envelope.clear_view_column cf
	 WHERE cf.relschema = t.nspname AND cf.relname = t.relname AND cf.column_name = col
	   AND (cf.relid = t.oid OR cf.relowner = t.owner_name);
	INSERT INTO envelope.clear_view_column (relid, relschema, relname, relowner, column_name, as_type, context_expr)
		VALUES (t.oid, t.nspname, t.relname, t.owner_name, col, typ, ctx);
END
$$;
COMMENT ON FUNCTION envelope.set_clear_column(pg_catalog.regclass, pg_catalog.name, pg_catalog.text, pg_catalog.text) IS
	'choose how create_clear_view decrypts an enc_bytea column: as text or bytea, and with which row context expression';

-- create_clear_view resolves context expressions with the caller's
-- search_path, like CREATE VIEW would; the work is done with a safe one.
CREATE FUNCTION envelope._create_clear_view(tbl pg_catalog.regclass, view_name pg_catalog.text,
											kek pg_catalog.text, caller_search_path pg_catalog.text)
	RETURNS pg_catalog.regclass
	LANGUAGE plpgsql
	SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	ext			text := '@extschema@';
	enc_type	oid := '@extschema@.enc_bytea'::regtype;
	safe_path	text := 'pg_catalog, pg_temp';
	t			record;
	a			record;
	g			record;
	vname		text;
	base		text;
	fn_ins		text;
	fn_upd		text;
	fn_del		text;
	qtbl		text;		-- "schema"."table"
	qalias		text;		-- "table": how the view and contexts qualify columns
	qview		text;
	fpath		text;		-- the trigger functions' search_path
	kek_lit		text;
	pk			text[];
	plain_cols	text[] := '{}';		-- columns stored as they are (view and contexts see them)
	plain_names	text[] := '{}';		-- the same, as quoted names (concurrent-change check)
	orig_role	text := current_user;
	sel			text[] := '{}';		-- the view's select list
	defaults	text[] := '{}';		-- ALTER VIEW ... SET DEFAULT statements
	ins_pre		text := '';			-- INSERT: checks and identity values
	ins_cols	text[] := '{}';
	ins_vals	text[] := '{}';
	upd_pre		text := '';
	upd_set		text[] := '{}';
	mapback		text := '';			-- copy generated values back into NEW
	decl		text := '';
	ctx_new		text[] := '{}';		-- context expressions, in order
	ctx_vars_n	text[] := '{}';
	ctx_vars_o	text[] := '{}';
	overriding	text := '';
	ctx			text;
	ctx_type	oid;
	ident_seq	text;
	n_enc		int := 0;
	nctx		int := 0;
	msg			text;
	ins_body	text;
	upd_body	text;
	del_body	text;
BEGIN
	SELECT c.oid, n.nspname, c.relname, c.relkind, c.relowner, pg_get_userbyid(c.relowner) AS owner_name
	  INTO t
	  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
	 WHERE c.oid = tbl;
	IF t.relkind NOT IN ('r', 'p') THEN
		RAISE EXCEPTION '"%" is not a table', tbl
			USING ERRCODE = 'wrong_object_type',
				  HINT = 'A clear view is made for a table with enc_bytea columns.';
	END IF;
	IF NOT pg_has_role(t.relowner, 'USAGE') THEN
		RAISE EXCEPTION 'must be owner of table %', tbl USING ERRCODE = 'insufficient_privilege';
	END IF;
	IF kek IS NOT NULL AND NOT EXISTS (SELECT 1 FROM envelope.kek k WHERE k.name = kek) THEN
		RAISE EXCEPTION 'KEK "%" does not exist', kek USING ERRCODE = 'undefined_object';
	END IF;
	kek_lit := CASE WHEN kek IS NULL THEN 'NULL::pg_catalog.text' ELSE format('%L::pg_catalog.text', kek) END;

	vname := COALESCE(view_name, t.relname || '_clear');
	IF vname = '' OR octet_length(vname) > 63 THEN
		RAISE EXCEPTION 'invalid view name "%"', vname
			USING ERRCODE = 'invalid_name',
				  HINT = 'A view name has 1 to 63 bytes; pass one as create_clear_view''s view_name.';
	END IF;
	-- The trigger functions are named after the view.
	base := vname;
	WHILE octet_length(base) > 56 LOOP
		base := left(base, -1);
	END LOOP;
	fn_ins := base || '_insert';
	fn_upd := base || '_update';
	fn_del := base || '_delete';
	qtbl := format('%I.%I', t.nspname, t.relname);
	qalias := format('%I', t.relname);
	qview := format('%I.%I', t.nspname, vname);

	IF EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
			   WHERE n.nspname = t.nspname AND c.relname = vname) THEN
		RAISE EXCEPTION 'relation "%" already exists', qview
			USING ERRCODE = 'duplicate_table',
				  HINT = 'Pass another name as create_clear_view''s view_name, or drop the existing view (envelope.drop_clear_view for a clear view).';
	END IF;
	SELECT p.proname INTO msg FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
	 WHERE n.nspname = t.nspname AND p.proname IN (fn_ins, fn_upd, fn_del) AND p.pronargs = 0
	 LIMIT 1;
	IF FOUND THEN
		RAISE EXCEPTION 'function %.%() already exists', quote_ident(t.nspname), quote_ident(msg)
			USING ERRCODE = 'duplicate_function',
				  HINT = 'Pass another name as create_clear_view''s view_name.';
	END IF;

	SELECT array_agg(format('%I', a2.attname) ORDER BY k.ord) INTO pk
	  FROM pg_constraint con
	 CROSS JOIN LATERAL unnest(con.conkey) WITH ORDINALITY AS k(attnum, ord)
	  JOIN pg_attribute a2 ON a2.attrelid = con.conrelid AND a2.attnum = k.attnum
	 WHERE con.conrelid = tbl AND con.contype = 'p';
	IF pk IS NULL THEN
		RAISE EXCEPTION 'table % has no primary key', tbl
			USING ERRCODE = 'object_not_in_prerequisite_state',
				  HINT = 'The clear view''s triggers find rows by primary key; add one with ALTER TABLE ... ADD PRIMARY KEY.';
	END IF;

	-- The caller's schemas, resolved now, become the trigger functions'
	-- search_path, so a context expression means the same there as in the view.
	PERFORM set_config('search_path', caller_search_path, true);
	SELECT string_agg(quote_ident(s), ', ' ORDER BY o) INTO fpath
	  FROM unnest(current_schemas(false)) WITH ORDINALITY AS u(s, o)
	 WHERE s NOT LIKE 'pg\_temp\_%' AND s NOT LIKE 'pg\_toast\_temp\_%';
	PERFORM set_config('search_path', safe_path, true);
	-- pg_catalog first, so operators in the generated code cannot be
	-- captured by objects in a schema others can write to.
	fpath := CASE WHEN fpath IS NULL THEN 'pg_catalog, pg_temp' ELSE 'pg_catalog, ' || fpath || ', pg_temp' END;

	-- Columns, in order.  Expressions are deparsed with search_path =
	-- pg_catalog, so they come out schema-qualified.
	SELECT COALESCE(array_agg(format('%s.%I', qalias, att.attname) ORDER BY att.attnum), '{}') INTO plain_cols
	  FROM pg_attribute att
	 WHERE att.attrelid = tbl AND att.attnum > 0 AND NOT att.attisdropped AND att.atttypid <> enc_type
	   AND att.attgenerated = '';	-- generated columns are computed after the triggers

	FOR a IN
		SELECT att.attname, att.atttypid, att.attgenerated, att.attidentity,
			   pg_get_expr(d.adbin, d.adrelid) AS default_expr,
			   COALESCE(cf.as_type, 'text') AS as_type, cf.context_expr
		  FROM pg_attribute att
		  LEFT JOIN pg_attrdef d ON d.adrelid = att.attrelid AND d.adnum = att.attnum
		  LEFT JOIN envelope._clear_view_config(tbl) cf ON cf.column_name = att.attname
		 WHERE att.attrelid = tbl AND att.attnum > 0 AND NOT att.attisdropped
		 ORDER BY att.attnum
	LOOP
		IF a.atttypid = enc_type THEN
			------------------------------------------------------------ encrypted
			n_enc := n_enc + 1;
			ctx := NULL;
			IF a.context_expr IS NOT NULL THEN
				-- Check the expression: over the unencrypted columns only (the
				-- triggers see plaintext where the view sees ciphertext), bytea.
				-- The expression is SQL text written by the table's owner: it must
				-- be one expression (balanced parentheses outside literals, no
				-- statement separators or comments), and it is checked with the
				-- owner's privileges, never the caller's.
				IF NOT envelope._is_single_expression(a.context_expr) THEN
					RAISE EXCEPTION 'invalid context expression for column "%"', a.attname
						USING ERRCODE = 'invalid_parameter_value',
							  DETAIL = 'A context expression must be a single expression, with balanced parentheses and no semicolons or comments.';
				END IF;
				PERFORM set_config('search_path', caller_search_path, true);
				BEGIN
					IF t.owner_name <> current_user THEN
						EXECUTE format('SET LOCAL ROLE %I', t.owner_name);
					END IF;
					EXECUTE format('SELECT pg_catalog.pg_typeof(s.x)::pg_catalog.oid FROM (VALUES (1)) AS v(one) '
								   'LEFT JOIN (SELECT (%s) AS x FROM (SELECT %s FROM %s LIMIT 0) AS %s) AS s ON true',
								   a.context_expr, array_to_string(plain_cols, ', '), qtbl, qalias)
						INTO ctx_type;
					IF t.owner_name <> orig_role THEN
						EXECUTE format('SET LOCAL ROLE %I', orig_role);
					END IF;
				EXCEPTION WHEN OTHERS THEN
					GET STACKED DIAGNOSTICS msg = MESSAGE_TEXT;
					PERFORM set_config('search_path', safe_path, true);
					RAISE EXCEPTION 'invalid context expression for column "%": %', a.attname, msg
						USING ERRCODE = 'invalid_parameter_value',
							  HINT = 'A context expression may use only the columns of the table that are stored as they are (not encrypted, not generated), and returns bytea.';
				END;
				PERFORM set_config('search_path', safe_path, true);
				IF ctx_type <> 'bytea'::regtype THEN
					RAISE EXCEPTION 'context expression for column "%" returns %, not bytea', a.attname, ctx_type::regtype
						USING ERRCODE = 'datatype_mismatch',
							  HINT = 'Convert it, for example with convert_to(..., ''UTF8'').';
				END IF;
				nctx := nctx + 1;
				ctx := format('(%s)', a.context_expr);
				ctx_new := ctx_new || ctx;
				ctx_vars_n := ctx_vars_n || format('_env_new_%s', nctx);
				ctx_vars_o := ctx_vars_o || format('_env_old_%s', nctx);
				decl := decl || format(E'\t_env_new_%s pg_catalog.bytea;\n\t_env_old_%s pg_catalog.bytea;\n', nctx, nctx);
			END IF;
			sel := sel || format('%s.%s(%s.%I%s) AS %I', ext,
								 CASE WHEN a.as_type = 'bytea' THEN 'dec_bytea' ELSE 'dec_text' END,
								 qalias, a.attname, COALESCE(', ' || ctx, ''), a.attname);
			IF a.default_expr IS NOT NULL AND a.attgenerated = '' THEN
				-- The view shows plaintext, so its default is the plaintext of
				-- the table's default; the trigger encrypts it again (with the
				-- view's KEK and the row's context).
				defaults := defaults || format('ALTER VIEW %s ALTER COLUMN %I SET DEFAULT %s.%s(%s)', qview, a.attname, ext,
											   CASE WHEN a.as_type = 'bytea' THEN 'dec_bytea' ELSE 'dec_text' END,
											   a.default_expr);
			END IF;
			IF a.attgenerated <> '' THEN
				CONTINUE;
			END IF;
			ins_cols := ins_cols || format('%I', a.attname);
			ins_vals := ins_vals || format('%s.enc(NEW.%I, %s%s)', ext, a.attname, kek_lit,
										   CASE WHEN ctx IS NULL THEN '' ELSE format(', _env_new_%s', nctx) END);
			upd_set := upd_set || format(E'%I = CASE WHEN NEW.%I IS DISTINCT FROM OLD.%I%s\n\t\t\tTHEN %s.enc(NEW.%I, %s%s) ELSE _env_t.%I END',
										 a.attname, a.attname, a.attname,
										 CASE WHEN ctx IS NULL THEN ''
											  ELSE format(' OR _env_new_%s IS DISTINCT FROM _env_old_%s', nctx, nctx) END,
										 ext, a.attname, kek_lit,
										 CASE WHEN ctx IS NULL THEN '' ELSE format(', _env_new_%s', nctx) END,
										 a.attname);
		ELSE
			------------------------------------------------------------ stored as is
			sel := sel || format('%s.%I', qalias, a.attname);
			plain_names := plain_names || format('%I', a.attname);
			mapback := mapback || format(E'\tNEW.%I := _env_r.%I;\n', a.attname, a.attname);
			IF a.attgenerated <> '' THEN
				ins_pre := ins_pre || format(E'\tIF NEW.%I IS NOT NULL THEN\n\t\tRAISE EXCEPTION %L USING ERRCODE = %L, DETAIL = %L;\n\tEND IF;\n',
					a.attname, format('cannot insert a non-DEFAULT value into column "%s"', a.attname), 'generated_always',
					format('Column "%s" is a generated column.', a.attname));
				upd_pre := upd_pre || format(E'\tIF NEW.%I IS DISTINCT FROM OLD.%I THEN\n\t\tRAISE EXCEPTION %L USING ERRCODE = %L, DETAIL = %L;\n\tEND IF;\n',
					a.attname, a.attname, format('column "%s" can only be updated to DEFAULT', a.attname), 'generated_always',
					format('Column "%s" is a generated column.', a.attname));
				CONTINUE;
			END IF;
			IF a.attidentity <> '' THEN
				-- The value is drawn here, so a context expression can use it
				-- and RETURNING shows it (needs USAGE on the sequence, like serial).
				ident_seq := pg_get_serial_sequence(qtbl, a.attname);
				IF a.attidentity = 'a' THEN
					ins_pre := ins_pre || format(E'\tIF NEW.%I IS NOT NULL THEN\n\t\tRAISE EXCEPTION %L USING ERRCODE = %L, DETAIL = %L;\n\tEND IF;\n',
						a.attname, format('cannot insert a non-DEFAULT value into column "%s"', a.attname), 'generated_always',
						format('Column "%s" is an identity column defined as GENERATED ALWAYS.', a.attname));
					upd_pre := upd_pre || format(E'\tIF NEW.%I IS DISTINCT FROM OLD.%I THEN\n\t\tRAISE EXCEPTION %L USING ERRCODE = %L, DETAIL = %L;\n\tEND IF;\n',
						a.attname, a.attname, format('column "%s" can only be updated to DEFAULT', a.attname), 'generated_always',
						format('Column "%s" is an identity column defined as GENERATED ALWAYS.', a.attname));
					overriding := ' OVERRIDING SYSTEM VALUE';
				ELSE
					upd_set := upd_set || format('%I = NEW.%I', a.attname, a.attname);
				END IF;
				ins_pre := ins_pre || format(E'\tIF NEW.%I IS NULL THEN\n\t\tNEW.%I := pg_catalog.nextval(%L::pg_catalog.regclass);\n\tEND IF;\n',
											 a.attname, a.attname, ident_seq);
			ELSE
				IF a.default_expr IS NOT NULL THEN
					defaults := defaults || format('ALTER VIEW %s ALTER COLUMN %I SET DEFAULT %s', qview, a.attname, a.default_expr);
				END IF;
				upd_set := upd_set || format('%I = NEW.%I', a.attname, a.attname);
			END IF;
			ins_cols := ins_cols || format('%I', a.attname);
			ins_vals := ins_vals || format('NEW.%I', a.attname);
		END IF;
	END LOOP;

	-- The view, parsed with the caller's search_path (context expressions).
	PERFORM set_config('search_path', caller_search_path, true);
	EXECUTE format('CREATE VIEW %s WITH (security_invoker = true) AS SELECT %s FROM %s',
				   qview, array_to_string(sel, ', '), qtbl);
	PERFORM set_config('search_path', safe_path, true);
	FOREACH msg IN ARRAY defaults LOOP
		EXECUTE msg;
	END LOOP;
	EXECUTE format('COMMENT ON VIEW %s IS %L', qview,
				   format('%s with its encrypted columns decrypted (made by envelope.create_clear_view; drop with envelope.drop_clear_view)', qtbl));

	-- INSERT: encrypt, insert, return the row as stored (generated values
	-- filled in) with the plaintext that was given.
	ins_body := format(E'\n#variable_conflict use_column\nDECLARE\n\t_env_r record;\n%sBEGIN\n%s', decl, ins_pre);
	IF nctx > 0 THEN
		ins_body := ins_body || format(E'\tSELECT %s INTO %s FROM (SELECT NEW.*) AS %s;\n',
									   array_to_string(ctx_new, ', '), array_to_string(ctx_vars_n, ', '), qalias);
	END IF;
	ins_body := ins_body || format(E'\tINSERT INTO %s (%s)%s\n\t\tVALUES (%s)\n\t\tRETURNING * INTO _env_r;\n%s\tRETURN NEW;\nEND\n',
								   qtbl, array_to_string(ins_cols, ', '), overriding, array_to_string(ins_vals, ', '), mapback);

	-- UPDATE: by primary key; an encrypted column is encrypted again only if
	-- its plaintext or its context changed, otherwise its ciphertext is kept.
	upd_body := format(E'\n#variable_conflict use_column\nDECLARE\n\t_env_r record;\n\t_env_cur record;\n%sBEGIN\n%s', decl, upd_pre);
	-- Lock the row and refuse if another transaction changed it since the
	-- view read it: writing OLD's other columns back would undo that change
	-- (and could re-encrypt under a stale context).
	upd_body := upd_body || format(E'\tSELECT * INTO _env_cur FROM %s AS _env_t WHERE %s FOR UPDATE;\n'
		|| E'\tIF NOT FOUND THEN\n\t\tRETURN NULL;\n\tEND IF;\n',
		qtbl, (SELECT string_agg(format('_env_t.%s = OLD.%s', k, k), ' AND ') FROM unnest(pk) k));
	IF cardinality(plain_names) > 0 THEN
		upd_body := upd_body || format(E'\tIF ROW(%s) IS DISTINCT FROM ROW(%s) THEN\n'
			|| E'\t\tRAISE EXCEPTION %L USING ERRCODE = %L, HINT = %L;\n\tEND IF;\n',
			(SELECT string_agg('_env_cur.' || n, ', ') FROM unnest(plain_names) n),
			(SELECT string_agg('OLD.' || n, ', ') FROM unnest(plain_names) n),
			format('could not update a row of %s: another transaction changed it', qview), 'serialization_failure',
			'Retry the transaction.');
	END IF;
	IF nctx > 0 THEN
		upd_body := upd_body || format(E'\tSELECT %s INTO %s FROM (SELECT NEW.*) AS %s;\n\tSELECT %s INTO %s FROM (SELECT OLD.*) AS %s;\n',
									   array_to_string(ctx_new, ', '), array_to_string(ctx_vars_n, ', '), qalias,
									   array_to_string(ctx_new, ', '), array_to_string(ctx_vars_o, ', '), qalias);
	END IF;
	IF cardinality(upd_set) = 0 THEN
		upd_body := upd_body || E'\tRETURN NULL;\nEND\n';
	ELSE
		upd_body := upd_body || format(E'\tUPDATE %s AS _env_t\n\t   SET %s\n\t WHERE %s\n\t RETURNING _env_t.* INTO _env_r;\n'
									   || E'\tIF NOT FOUND THEN\n\t\tRETURN NULL;\n\tEND IF;\n%s\tRETURN NEW;\nEND\n',
									   qtbl, array_to_string(upd_set, E',\n\t       '),
									   (SELECT string_agg(format('_env_t.%s = OLD.%s', k, k), ' AND ') FROM unnest(pk) k),
									   mapback);
	END IF;

	del_body := format(E'\nBEGIN\n\tDELETE FROM %s AS _env_t WHERE %s;\n\tIF NOT FOUND THEN\n\t\tRETURN NULL;\n\tEND IF;\n\tRETURN OLD;\nEND\n',
					   qtbl, (SELECT string_agg(format('_env_t.%s = OLD.%s', k, k), ' AND ') FROM unnest(pk) k));

	EXECUTE format(E'CREATE FUNCTION %I.%I() RETURNS trigger LANGUAGE plpgsql SET search_path TO %s AS %L',
				   t.nspname, fn_ins, fpath, ins_body);
	EXECUTE format(E'CREATE FUNCTION %I.%I() RETURNS trigger LANGUAGE plpgsql SET search_path TO %s AS %L',
				   t.nspname, fn_upd, fpath, upd_body);
	EXECUTE format(E'CREATE FUNCTION %I.%I() RETURNS trigger LANGUAGE plpgsql SET search_path TO %s AS %L',
				   t.nspname, fn_del, fpath, del_body);
	EXECUTE format('COMMENT ON FUNCTION %I.%I() IS %L', t.nspname, fn_ins, format('INSTEAD OF INSERT trigger of %s (envelope clear view)', qview));
	EXECUTE format('COMMENT ON FUNCTION %I.%I() IS %L', t.nspname, fn_upd, format('INSTEAD OF UPDATE trigger of %s (envelope clear view)', qview));
	EXECUTE format('COMMENT ON FUNCTION %I.%I() IS %L', t.nspname, fn_del, format('INSTEAD OF DELETE trigger of %s (envelope clear view)', qview));
	EXECUTE format('CREATE TRIGGER envelope_clear_insert INSTEAD OF INSERT ON %s FOR EACH ROW EXECUTE FUNCTION %I.%I()',
				   qview, t.nspname, fn_ins);
	EXECUTE format('CREATE TRIGGER envelope_clear_update INSTEAD OF UPDATE ON %s FOR EACH ROW EXECUTE FUNCTION %I.%I()',
				   qview, t.nspname, fn_upd);
	EXECUTE format('CREATE TRIGGER envelope_clear_delete INSTEAD OF DELETE ON %s FOR EACH ROW EXECUTE FUNCTION %I.%I()',
				   qview, t.nspname, fn_del);

	-- The table's owner owns what was made for it; roles with privileges on
	-- the table get the same ones on the view (the table's are still checked:
	-- security_invoker).
	IF NOT EXISTS (SELECT 1 FROM pg_roles r WHERE r.rolname = current_user AND r.oid = t.relowner) THEN
		EXECUTE format('ALTER VIEW %s OWNER TO %I', qview, pg_get_userbyid(t.relowner));
		EXECUTE format('ALTER FUNCTION %I.%I() OWNER TO %I', t.nspname, fn_ins, pg_get_userbyid(t.relowner));
		EXECUTE format('ALTER FUNCTION %I.%I() OWNER TO %I', t.nspname, fn_upd, pg_get_userbyid(t.relowner));
		EXECUTE format('ALTER FUNCTION %I.%I() OWNER TO %I', t.nspname, fn_del, pg_get_userbyid(t.relowner));
	END IF;
	FOR g IN
		SELECT acl.grantee, acl.privilege_type
		  FROM pg_class c, aclexplode(c.relacl) acl
		 WHERE c.oid = tbl AND acl.grantee <> c.relowner
		   AND acl.privilege_type IN ('SELECT', 'INSERT', 'UPDATE', 'DELETE')
		 ORDER BY 1, 2
	LOOP
		EXECUTE format('GRANT %s ON %s TO %s', g.privilege_type, qview,
					   CASE WHEN g.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(g.grantee)) END);
	END LOOP;

	IF n_enc = 0 THEN
		RAISE NOTICE 'table % has no enc_bytea columns; the view shows it as it is', tbl;
	END IF;
	RETURN qview::regclass;
END
$$;

CREATE FUNCTION envelope.create_clear_view(tbl pg_catalog.regclass, view_name pg_catalog.text DEFAULT NULL,
										   kek pg_catalog.text DEFAULT NULL)
	RETURNS pg_catalog.regclass
	LANGUAGE sql
AS $$ SELECT envelope._create_clear_view(tbl, view_name, kek, pg_catalog.current_setting('search_path')) $$;
COMMENT ON FUNCTION envelope.create_clear_view(pg_catalog.regclass, pg_catalog.text, pg_catalog.text) IS
	'create a view of a table with its enc_bytea columns decrypted, whose INSTEAD OF triggers encrypt inserted and updated values';

CREATE FUNCTION envelope.drop_clear_view(view pg_catalog.regclass, keep_config pg_catalog.bool DEFAULT false)
	RETURNS void
	LANGUAGE plpgsql
	SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v		record;
	funcs	regprocedure[];
	f		regprocedure;
	tbl		oid;
BEGIN
	SELECT c.oid, c.relkind, c.relowner INTO v FROM pg_class c WHERE c.oid = view;
	SELECT array_agg(DISTINCT tg.tgfoid::regprocedure) INTO funcs
	  FROM pg_trigger tg
	 WHERE tg.tgrelid = view
	   AND tg.tgname IN ('envelope_clear_insert', 'envelope_clear_update', 'envelope_clear_delete');
	IF v.relkind <> 'v' OR funcs IS NULL THEN
		RAISE EXCEPTION '"%" is not a clear view', view
			USING ERRCODE = 'wrong_object_type',
				  HINT = 'Clear views are made by envelope.create_clear_view().';
	END IF;
	IF NOT pg_has_role(v.relowner, 'USAGE') THEN
		RAISE EXCEPTION 'must be owner of view %', view USING ERRCODE = 'insufficient_privilege';
	END IF;
	-- The table it shows: the relation the view's query reads most columns of.
	SELECT d.refobjid INTO tbl
	  FROM pg_rewrite rw
	  JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = rw.oid
	  JOIN pg_class c ON c.oid = d.refobjid AND c.relkind IN ('r', 'p')
	 WHERE rw.ev_class = view AND d.refclassid = 'pg_class'::regclass AND d.refobjsubid > 0
	 GROUP BY d.refobjid
	 ORDER BY count(*) DESC, d.refobjid
	 LIMIT 1;

	EXECUTE format('DROP VIEW %s', view);
	FOREACH f IN ARRAY funcs LOOP
		EXECUTE format('DROP FUNCTION %s', f);
	END LOOP;

	IF NOT keep_config AND tbl IS NOT NULL AND NOT EXISTS (
		SELECT 1 FROM pg_trigger tg
		  JOIN pg_rewrite rw ON rw.ev_class = tg.tgrelid
		  JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = rw.oid
		 WHERE tg.tgname = 'envelope_clear_insert'
		   AND d.refclassid = 'pg_class'::regclass AND d.refobjid = tbl) THEN
		DELETE FROM envelope.clear_view_column cf
		 USING pg_class r, pg_namespace n
		 WHERE r.oid = tbl AND n.oid = r.relnamespace
		   AND cf.relschema = n.nspname AND cf.relname = r.relname
		   AND (cf.relid = r.oid OR cf.relowner = pg_get_userbyid(r.relowner));
	END IF;
END
$$;
COMMENT ON FUNCTION envelope.drop_clear_view(pg_catalog.regclass, pg_catalog.bool) IS
	'drop a view made by create_clear_view, its trigger functions, and (unless keep_config) its table''s set_clear_column choices';

REVOKE ALL ON FUNCTION envelope._clear_view_column_check() FROM PUBLIC;
-- END clear views (issue 6)

-- Setup shared by the pg_regress suite: KEKs and helpers.
-- The keys regress_a, regress_b and regress_rot exist in the test KMS
-- (make installcheck creates them through test/devenv kms-key).

SELECT envelope.create_kek('regress_a', 'vault', 'regress_a') >= 1 AS registered;
SELECT envelope.create_kek('regress_b', 'vault', 'regress_b') >= 1 AS registered;
SELECT envelope.create_kek('regress_rot', 'vault', 'regress_rot') >= 1 AS registered;
SELECT name, provider, key_ref FROM envelope.keks ORDER BY name;

-- Every later file runs with regress_a as the default KEK.
DO $$ BEGIN
	EXECUTE format('ALTER DATABASE %I SET envelope.default_kek = %L', current_database(), 'regress_a');
END $$;

-- Raw bytes of a value, and a value from raw bytes, through the text form.
CREATE FUNCTION raw(v enc_bytea) RETURNS bytea LANGUAGE sql IMMUTABLE STRICT
	AS $$ SELECT decode(substr(v::text, 5), 'base64') $$;
CREATE FUNCTION from_raw(b bytea) RETURNS enc_bytea LANGUAGE sql IMMUTABLE STRICT
	AS $$ SELECT ('enc:' || translate(encode(b, 'base64'), E'\n', ''))::enc_bytea $$;

-- The ciphertext and tag of a value (everything after the KEK section).
CREATE FUNCTION ct_and_tag(v enc_bytea) RETURNS bytea LANGUAGE sql IMMUTABLE STRICT
	AS $$ SELECT substr(raw(v), length(raw(v)) - (envelope.metadata(v)->>'ciphertext_length')::int - 16 + 1) $$;

-- Server-wide counters since the last mark_stats() (tests run one at a time).
CREATE TABLE stats_mark AS SELECT * FROM envelope.cache_stats();
CREATE FUNCTION mark_stats() RETURNS void LANGUAGE sql AS $$
	DELETE FROM stats_mark;
	INSERT INTO stats_mark SELECT * FROM envelope.cache_stats();
$$;
CREATE FUNCTION since_mark(OUT hits bigint, OUT misses bigint, OUT kms_generate bigint,
						   OUT kms_unwrap bigint, OUT kms_rewrap bigint)
LANGUAGE sql AS $$
	SELECT s.hits - m.hits, s.misses - m.misses, s.kms_generate - m.kms_generate,
		   s.kms_unwrap - m.kms_unwrap, s.kms_rewrap - m.kms_rewrap
	FROM envelope.cache_stats() s, stats_mark m
$$;

-- Try to decrypt; return the SQLSTATE of the error, or 'ok: <plaintext>'.
CREATE FUNCTION try_dec(b bytea, ctx bytea DEFAULT NULL) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
	RETURN 'ok: ' || encode(dec_bytea(from_raw(b), ctx), 'escape');
EXCEPTION WHEN OTHERS THEN
	RETURN SQLSTATE;
END $$;

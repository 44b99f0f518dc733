-- KEK rotation and rewrap.  Versions are compared relative to the KEK's
-- version at the start, since the test KMS keeps its keys between runs.
CREATE TEMP TABLE v0 AS SELECT latest_version AS v FROM envelope.keks WHERE name = 'regress_rot';

CREATE TABLE rot (id int PRIMARY KEY, v enc_bytea);
INSERT INTO rot SELECT g, enc('value ' || g, 'regress_rot') FROM generate_series(1, 50) g;
SELECT count(DISTINCT (envelope.metadata(v)->>'kek_version')::int - (SELECT v FROM v0)) AS versions,
	   min((envelope.metadata(v)->>'kek_version')::int - (SELECT v FROM v0)) AS relative_version
FROM rot;
CREATE TEMP TABLE before AS SELECT id, raw(v) AS b FROM rot;

-- Rotation makes a new version and new writes use it at once.
SELECT envelope.rotate_kek('regress_rot') - (SELECT v FROM v0) AS new_relative_version;
SELECT latest_version - (SELECT v FROM v0) AS registry_relative FROM envelope.keks WHERE name = 'regress_rot';
SELECT (envelope.metadata(enc('new', 'regress_rot'))->>'kek_version')::int - (SELECT v FROM v0) AS new_write_version;

-- Old values still decrypt.
SELECT count(*) FILTER (WHERE dec_text(v) = 'value ' || id) AS old_still_decrypt FROM rot;

-- Rewrap: new version; header, nonce, ciphertext and tag byte-identical.
SELECT envelope.cache_flush() >= 0 AS flushed;
SELECT mark_stats();
UPDATE rot SET v = rewrap(v);
SELECT count(*) FILTER (WHERE (envelope.metadata(v)->>'kek_version')::int - (SELECT v FROM v0) = 1) AS on_new_version,
	   count(*) FILTER (WHERE substr(raw(r.v), 1, 88) = substr(b.b, 1, 88)) AS header_identical,
	   count(*) FILTER (WHERE ct_and_tag(r.v) = ct_and_tag(from_raw(b.b))) AS ciphertext_tag_identical,
	   count(*) FILTER (WHERE envelope.metadata(r.v)->>'wrapped_dek_b64' <> envelope.metadata(from_raw(b.b))->>'wrapped_dek_b64') AS wrapped_key_changed,
	   count(*) FILTER (WHERE dec_text(r.v) = 'value ' || id) AS decrypt_same
FROM rot r JOIN before b USING (id);
-- 50 rows sharing one data key: one rewrap call, plus one unwrap that
-- verifies the new wrapped key (and caches it for the reads above).
SELECT kms_rewrap, kms_unwrap FROM since_mark();

-- Rewrapping a value already on the latest version changes nothing and calls nothing.
SELECT mark_stats();
SELECT count(*) FILTER (WHERE rewrap(v)::text = v::text) AS unchanged FROM rot;
SELECT kms_rewrap FROM since_mark();

-- Rewrap to another KEK: the ciphertext stays, the KEK changes.
SELECT envelope.metadata(rewrap(v, 'regress_b'))->>'kek_id' AS moved_to,
	   ct_and_tag(rewrap(v, 'regress_b')) = ct_and_tag(v) AS ciphertext_tag_identical,
	   dec_text(rewrap(v, 'regress_b')) AS plaintext
FROM rot WHERE id = 7;
-- Rewrap to an unknown KEK.
SELECT rewrap(v, 'no_such_kek') FROM rot WHERE id = 7;

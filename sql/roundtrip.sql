-- Round trips of bytea and text of various sizes, NULL in and out.
SET envelope.default_kek = 'regress_a';

CREATE TABLE rt (id int PRIMARY KEY, b bytea, t text, v enc_bytea);
INSERT INTO rt (id, b) VALUES
	(1, ''::bytea),
	(2, '\x00'::bytea),
	(3, '\xff00ff'::bytea),
	(4, decode(repeat('00ff7f80', 262144), 'hex')),		-- 1 MiB
	(5, NULL);
UPDATE rt SET v = enc(b);
SELECT id, length(b) AS len, dec_bytea(v) IS NOT DISTINCT FROM b AS roundtrip,
	   "dec"(v) IS NOT DISTINCT FROM b AS quoted_dec
FROM rt ORDER BY id;
SELECT length(raw(v)) - length(b) AS overhead FROM rt WHERE id = 4;

INSERT INTO rt (id, t) VALUES
	(10, ''), (11, 'a'), (12, 'naïve café – 東京 – 🙂'), (13, repeat('ж', 100000)), (14, NULL);
UPDATE rt SET v = enc(t) WHERE id >= 10;
SELECT id, length(t) AS chars, dec_text(v) IS NOT DISTINCT FROM t AS roundtrip,
	   envelope.metadata(v)->>'plaintext_type' AS ptype
FROM rt WHERE id >= 10 ORDER BY id;

-- NULL in, NULL out, whatever the other arguments.
SELECT enc(NULL::bytea) IS NULL AS a, enc(NULL::text, 'regress_a') IS NULL AS b,
	   dec_bytea(NULL) IS NULL AS c, dec_text(NULL, '\x01') IS NULL AS d,
	   rewrap(NULL) IS NULL AS e;

-- The same plaintext encrypted twice gives different values (salt, nonce, ciphertext).
WITH two AS (SELECT enc('same') AS x, enc('same') AS y)
SELECT x::text <> y::text AS values_differ,
	   substr(raw(x), 13, 32) <> substr(raw(y), 13, 32) AS salts_differ,
	   substr(raw(x), 45, 12) <> substr(raw(y), 45, 12) AS nonces_differ,
	   dec_text(x) = dec_text(y) AS same_plaintext
FROM two;

-- enc(text) and enc(bytea) of the same bytes decrypt to the same bytes.
SELECT dec_bytea(enc('abc'::text)) = dec_bytea(enc('abc'::bytea)) AS same_bytes;

-- dec_text checks the database encoding, without quoting the bytes.
SELECT dec_text(enc('\xc328'::bytea));
SELECT dec_text(enc('\x00'::bytea));

-- Explicit KEK, and the default KEK.
SELECT envelope.metadata(enc('x', 'regress_b'))->>'kek_id' AS explicit,
	   envelope.metadata(enc('x'))->>'kek_id' AS by_default;

-- One data key serves many values: KMS calls for 1000 rows (one data key,
-- plus one unwrap that verifies it).
SELECT envelope.cache_flush() >= 0 AS flushed;
SELECT mark_stats();
CREATE TABLE bulk AS SELECT g AS id, enc('secret ' || g) AS v FROM generate_series(1, 1000) g;
SELECT kms_generate, kms_unwrap FROM since_mark();
-- Reading back what was written: all from the cache.
SELECT count(*) FILTER (WHERE dec_text(v) = 'secret ' || id) AS decrypted FROM bulk;
SELECT kms_generate, kms_unwrap, hits, misses FROM since_mark();
-- After a flush, one unwrap per distinct data key.
SELECT envelope.cache_flush() >= 1 AS flushed;
SELECT mark_stats();
SELECT count(*) FILTER (WHERE dec_text(v) = 'secret ' || id) AS decrypted FROM bulk;
SELECT kms_unwrap, hits, misses FROM since_mark();
-- envelope.dek_max_uses bounds the values per data key: 10 data keys for
-- 1000 values, generated (wrapped and verified) 4 per KMS call, so 3 calls.
SET envelope.dek_max_uses = 100;
SELECT envelope.cache_flush() >= 0 AS flushed;
SELECT mark_stats();
CREATE TABLE bulk2 AS SELECT g AS id, enc('x' || g) AS v FROM generate_series(1, 1000) g;
SELECT kms_generate, kms_unwrap FROM since_mark();
SELECT count(DISTINCT envelope.metadata(v)->>'wrapped_dek_b64') AS data_keys FROM bulk2;
SET envelope.dek_max_uses = 1;
SELECT count(DISTINCT envelope.metadata(enc('y'))->>'wrapped_dek_b64') AS data_keys FROM generate_series(1, 5);
RESET envelope.dek_max_uses;

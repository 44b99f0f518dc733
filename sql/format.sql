-- The text and binary forms of enc_bytea, and input validation.
SET envelope.default_kek = 'regress_a';

CREATE TABLE fmt (id int PRIMARY KEY, v enc_bytea);
INSERT INTO fmt VALUES (1, enc('format test'));

-- The text form is "enc:" + base64 and round-trips exactly.
SELECT left(v::text, 4) AS prefix FROM fmt;
SELECT (v::text)::enc_bytea::text = v::text AS text_roundtrip FROM fmt;
SELECT dec_text((v::text)::enc_bytea) FROM fmt;

-- Layout: version 1, algorithm 2, 88-byte header, KEK section, ciphertext, tag.
SELECT get_byte(raw(v), 0) AS format_version, get_byte(raw(v), 1) AS algorithm,
	   length(raw(v)) = 88 + (1 + 9) + (1 + 5) + (2 + 9) + 4 + (2 + 60) + 11 + 16 AS length_as_documented
FROM fmt;

-- Metadata carries the documented fields.
SELECT m->>'algo' AS algo, m->>'kek_id' AS kek_id, m->>'kek_provider' AS provider,
	   m->>'kek_key_ref' AS key_ref, (m->>'kek_version')::int >= 1 AS has_version,
	   length(decode(m->>'nonce_b64', 'base64')) AS nonce_len,
	   length(decode(m->>'auth_tag_b64', 'base64')) AS tag_len,
	   length(decode(m->>'salt_b64', 'base64')) AS salt_len,
	   length(decode(m->>'wrapped_dek_b64', 'base64')) AS wrapped_len,
	   m->>'plaintext_type' AS ptype, m->>'context_bound' AS context_bound,
	   (m->>'created_at')::timestamptz BETWEEN now() - interval '1 hour' AND clock_timestamp() AS created_now,
	   (m->>'ciphertext_length')::int AS ct_len
FROM (SELECT envelope.metadata(v) AS m FROM fmt) s;
SELECT envelope.metadata(NULL) IS NULL AS null_metadata;

-- Malformed text input: clear errors.
SELECT 'hello'::enc_bytea;
SELECT 'enc:'::enc_bytea;
SELECT 'enc:!!!!'::enc_bytea;
SELECT 'enc:AQ=='::enc_bytea;
SELECT 'enc:CQEAAA=='::enc_bytea;
SELECT from_raw(set_byte(raw(v), 1, 7)) FROM fmt;
SELECT from_raw(set_byte(raw(v), 3, 128)) FROM fmt;
SELECT from_raw(substr(raw(v), 1, 100)) FROM fmt;
SELECT from_raw(substr(raw(v), 1, length(raw(v)) - 12)) FROM fmt;

-- Binary (COPY BINARY) round trip, then truncated and unknown-version binary input.
COPY fmt TO '/tmp/envelope_regress_fmt.bin' (FORMAT binary);
CREATE TABLE fmt2 (LIKE fmt);
COPY fmt2 FROM '/tmp/envelope_regress_fmt.bin' (FORMAT binary);
SELECT a.v::text = b.v::text AS binary_roundtrip, dec_text(b.v) FROM fmt a JOIN fmt2 b USING (id);
-- a tuple of 2 fields: int4 1 and a 10-byte enc_bytea that stops inside the header
COPY fmt2 FROM PROGRAM $$printf 'PGCOPY\n\377\r\n\0\0\0\0\0\0\0\0\0\0\2\0\0\0\4\0\0\0\2\0\0\0\12\1\1\0\0\0\0\0\0\0\0\377\377'$$ (FORMAT binary);
-- the same with format version 9
COPY fmt2 FROM PROGRAM $$printf 'PGCOPY\n\377\r\n\0\0\0\0\0\0\0\0\0\0\2\0\0\0\4\0\0\0\3\0\0\0\12\11\1\0\0\0\0\0\0\0\0\377\377'$$ (FORMAT binary);
SELECT count(*) AS rows_after_bad_copies FROM fmt2;

-- No comparison operators: equal plaintexts must not compare equal.
SELECT enc('x') = enc('x');
SELECT v FROM fmt ORDER BY v;

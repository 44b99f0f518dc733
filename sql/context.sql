-- The caller's context is bound into GCM authentication.
SET envelope.default_kek = 'regress_a';
CREATE TABLE people (id int PRIMARY KEY, ssn enc_bytea);
INSERT INTO people
	SELECT id, enc('ssn-' || id, NULL, convert_to('people:' || id, 'UTF8'))
	FROM generate_series(1, 3) id;

-- Right context decrypts.
SELECT id, dec_text(ssn, convert_to('people:' || id, 'UTF8')) FROM people ORDER BY id;
SELECT envelope.metadata(ssn)->>'context_bound' AS context_bound FROM people WHERE id = 1;

-- A value copied into another row does not decrypt with that row's context.
UPDATE people SET ssn = (SELECT ssn FROM people WHERE id = 1) WHERE id = 2;
SELECT dec_text(ssn, convert_to('people:' || id, 'UTF8')) FROM people WHERE id = 2;
-- No context, or a wrong one.
SELECT dec_text(ssn) FROM people WHERE id = 3;
SELECT dec_text(ssn, '\x00') FROM people WHERE id = 3;
-- A value without context refuses a context.
SELECT dec_text(enc('plain'), 'people:1');
-- NULL and empty context are the same thing.
SELECT dec_text(enc('plain', NULL, ''), NULL) AS empty_is_null,
	   dec_text(enc('plain', NULL, NULL), '') AS null_is_empty;
-- Rewrap keeps the context binding.
SELECT dec_text(rewrap(ssn, 'regress_b'), convert_to('people:3', 'UTF8')) FROM people WHERE id = 3;

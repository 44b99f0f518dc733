-- Changing any single byte of a stored value makes dec() fail; it never
-- returns data.  Each byte is XORed with 0x01 and then with 0x80.
SET envelope.default_kek = 'regress_a';
CREATE TABLE tamper_src AS SELECT raw(enc('tamper me please')) AS b;

CREATE TEMP TABLE tamper_results AS
SELECT i, mask, try_dec(set_byte(b, i, get_byte(b, i) # mask)) AS outcome
FROM tamper_src, generate_series(0, length(b) - 1) i, (VALUES (1), (128)) m(mask);

-- The untouched value decrypts.
SELECT try_dec(b) FROM tamper_src;
-- Every tampered copy fails.
SELECT count(*) AS attempts, count(*) FILTER (WHERE outcome LIKE 'ok:%') AS decrypted,
	   (SELECT 2 * length(b) FROM tamper_src) AS expected
FROM tamper_results;
-- By region of the value and error.
SELECT CASE WHEN i < 12 THEN '1 version, algorithm, flags, created_at'
			WHEN i < 44 THEN '2 salt'
			WHEN i < 56 THEN '3 nonce'
			WHEN i < 88 THEN '4 commitment'
			WHEN i < (SELECT length(b) - 16 - 16 FROM tamper_src) THEN '5 KEK section'
			WHEN i < (SELECT length(b) - 16 FROM tamper_src) THEN '6 ciphertext'
			ELSE '7 tag' END AS region,
	   outcome, count(*)
FROM tamper_results GROUP BY 1, 2 ORDER BY 1, 2;

-- The messages for the common cases.
SELECT dec_bytea(from_raw(set_byte(b, 20, get_byte(b, 20) # 1))) FROM tamper_src;
SELECT dec_bytea(from_raw(set_byte(b, length(b) - 1, get_byte(b, length(b) - 1) # 1))) FROM tamper_src;
SELECT dec_bytea(from_raw(set_byte(b, 140, get_byte(b, 140) # 1))) FROM tamper_src;

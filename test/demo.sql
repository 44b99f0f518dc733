-- A short tour of envelope: encrypt a table, read it through a view, look
-- at a value's metadata, rotate the KEK, rewrap, and decrypt again.
DO $$ BEGIN
	IF to_regclass('customers_clear') IS NOT NULL THEN
		PERFORM envelope.drop_clear_view('customers_clear');
	END IF;
END $$;
DROP TABLE IF EXISTS customers CASCADE;

SELECT name, provider, key_ref, latest_version FROM envelope.keks;
SHOW envelope.default_kek;

CREATE TABLE customers (id bigint PRIMARY KEY, name text, ssn enc_bytea, photo enc_bytea);
INSERT INTO customers VALUES
	(1, 'Ada',   enc('123-45-6789'), enc('\x00ff'::bytea, 'pii')),
	(2, 'Grace', enc('987-65-4321'), NULL);

-- What is stored: ciphertext only.
SELECT id, name, left(ssn::text, 40) || '...' AS ssn_stored FROM customers;

-- Reading it back (dec_bytea is dec under a name that needs no quoting).
SELECT id, dec_text(ssn) AS ssn, dec_bytea(photo) AS photo FROM customers ORDER BY id;

-- A decrypting, writable view for applications and ORMs.
SELECT envelope.set_clear_column('customers', 'photo', 'bytea');
SELECT envelope.create_clear_view('customers');
INSERT INTO customers_clear (id, name, ssn) VALUES (3, 'Edsger', '111-22-3333');
SELECT * FROM customers_clear ORDER BY id;

-- Every value describes itself.
SELECT jsonb_pretty(envelope.metadata(ssn)) FROM customers WHERE id = 1;

-- Rotate the KEK in the KMS; new values use the new version at once.
SELECT envelope.rotate_kek('pii') AS new_version;
SELECT id, envelope.metadata(ssn)->>'kek_version' AS kek_version FROM customers ORDER BY id;

-- Rewrap: the data keys move to the new version; the ciphertext does not change.
UPDATE customers SET ssn = rewrap(ssn);
SELECT id, envelope.metadata(ssn)->>'kek_version' AS kek_version, dec_text(ssn) AS ssn
FROM customers ORDER BY id;

-- KMS traffic of this session.
SELECT hits, misses, kms_generate, kms_unwrap, kms_rewrap, kms_rotate FROM envelope.cache_stats();

-- Who may decrypt: a role needs the decrypt privilege on the KEK.
DO $$ BEGIN IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'demo_reader') THEN EXECUTE 'DROP OWNED BY demo_reader'; DROP ROLE demo_reader; END IF; END $$;
CREATE ROLE demo_reader;
GRANT SELECT ON customers TO demo_reader;
SET ROLE demo_reader;
\set ON_ERROR_STOP 0
SELECT dec_text(ssn) FROM customers WHERE id = 1;   -- permission denied for KEK "pii"
\set ON_ERROR_STOP 1
RESET ROLE;
SELECT envelope.grant('pii', 'demo_reader', 'decrypt');
SET ROLE demo_reader;
SELECT dec_text(ssn) FROM customers WHERE id = 1;
RESET ROLE;
SELECT * FROM envelope.kek_privileges;
SELECT envelope.revoke('pii', 'demo_reader', 'decrypt');
DROP OWNED BY demo_reader;
DROP ROLE demo_reader;

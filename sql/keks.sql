-- The KEK registry and its management functions.
SELECT name, provider, key_ref, latest_version >= 1 AS has_version,
	   min_decryption_version >= 1 AS has_min
FROM envelope.keks WHERE name LIKE 'regress%' ORDER BY name;

-- Errors when registering.
SELECT envelope.create_kek('regress_a', 'vault', 'regress_a');
SELECT envelope.create_kek('other', 'aws', 'regress_a');
SELECT envelope.create_kek('other', 'vault', 'no_such_key_in_kms');
SELECT envelope.create_kek('bad name!', 'vault', 'regress_a');
SELECT envelope.create_kek('other', 'vault', '../sys/seal');
SELECT envelope.create_kek(NULL, 'vault', 'x');
SELECT envelope.rotate_kek('no_such_kek');

-- The registry is extension configuration, so pg_dump keeps it.
SELECT 'envelope.kek'::regclass = ANY (e.extconfig) AS registry_is_dumped
FROM pg_extension e WHERE e.extname = 'envelope';

-- Unknown KEK, and no KEK at all.
SELECT enc('x', 'no_such_kek');
SET envelope.default_kek = '';
SELECT enc('x');
RESET envelope.default_kek;

-- Management functions are not for PUBLIC.
CREATE ROLE regress_envelope_user;
SET ROLE regress_envelope_user;
SELECT envelope.create_kek('x', 'vault', 'regress_a');
SELECT envelope.rotate_kek('regress_a');
-- but the registry is readable, and values can be decrypted through it
SELECT count(*) >= 3 AS visible FROM envelope.keks;
-- but using a KEK takes a privilege on it
SELECT dec_text(enc('as a plain user', 'regress_a')) AS plain_user_roundtrip;
RESET ROLE;
SELECT envelope.grant('regress_a', 'regress_envelope_user', 'encrypt');
SET ROLE regress_envelope_user;
SELECT enc('as a plain user', 'regress_a') IS NOT NULL AS encrypted;
SELECT dec_text(enc('as a plain user', 'regress_a')) AS plain_user_roundtrip;
RESET ROLE;
SELECT envelope.grant('regress_a', 'regress_envelope_user', 'decrypt');
SET ROLE regress_envelope_user;
SELECT dec_text(enc('as a plain user', 'regress_a')) AS plain_user_roundtrip;
RESET ROLE;
SELECT envelope.revoke('regress_a', 'regress_envelope_user', 'all');
DROP ROLE regress_envelope_user;

-- Volatility and parallel safety as documented.
SELECT p.proname, pg_get_function_identity_arguments(p.oid) AS args, p.provolatile, p.proparallel
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE p.proname IN ('enc', 'dec', 'dec_bytea', 'dec_text', 'rewrap') AND n.nspname = 'public'
ORDER BY 1, 2;

-- Settings are reserved under the envelope prefix.
SET envelope.no_such_setting = 1;
SHOW envelope.vault_mount;
SET envelope.vault_mount = 'other';
SET envelope.dek_max_uses = 0;

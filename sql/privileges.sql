-- Per-KEK privileges: encrypt, decrypt and rewrap, granted per KEK to roles,
-- checked on every use (even when the key is in the shared cache).

CREATE ROLE regress_priv_app;				-- encrypt and decrypt
CREATE ROLE regress_priv_maint;				-- rewrap only
CREATE ROLE regress_priv_group NOLOGIN;		-- granted decrypt
CREATE ROLE regress_priv_member IN ROLE regress_priv_group;
CREATE ROLE regress_priv_noinherit NOINHERIT IN ROLE regress_priv_group;
CREATE ROLE regress_priv_admin IN ROLE envelope_admin;
CREATE ROLE regress_priv_nobody;

CREATE TABLE priv_t (id int PRIMARY KEY, v enc_bytea);
INSERT INTO priv_t VALUES (1, enc('one', 'regress_a')), (2, enc('two', 'regress_a'));
GRANT SELECT, INSERT, UPDATE ON priv_t TO PUBLIC;
-- The superuser's reads put the data key in the shared cache.
SELECT id, dec_text(v) FROM priv_t ORDER BY id;

-- Nobody has privileges on a new KEK; a cached key does not help.
SET ROLE regress_priv_nobody;
SELECT id, dec_text(v) FROM priv_t ORDER BY id;
SELECT enc('x', 'regress_a');
SELECT rewrap(v) FROM priv_t WHERE id = 1;
-- and management is for superusers and envelope_admin
SELECT envelope.grant('regress_a', 'regress_priv_nobody', 'decrypt');
SELECT envelope.rotate_kek('regress_a');
SELECT envelope.cache_flush();
RESET ROLE;

-- envelope_admin members manage grants (without being able to decrypt).
SET ROLE regress_priv_admin;
SELECT envelope.grant('regress_a', 'regress_priv_app', 'encrypt');
SELECT envelope.grant('regress_a', 'regress_priv_app', 'decrypt');
SELECT envelope.grant('regress_a', 'regress_priv_maint', 'rewrap');
SELECT envelope.grant('regress_a', 'regress_priv_group', 'decrypt');
SELECT envelope.grant('regress_a', 'regress_priv_app', 'decrypt');	-- again: no-op
SELECT id, dec_text(v) FROM priv_t ORDER BY id;
RESET ROLE;

-- Admins change grants only through envelope.grant/revoke (audited), never directly.
SET ROLE regress_priv_admin;
INSERT INTO envelope.kek_grant (kek, grantee, privilege, granted_by)
	VALUES ('regress_a', 'regress_priv_admin', 'decrypt', 'regress_priv_app');
DELETE FROM envelope.kek_grant;
RESET ROLE;

-- Bad arguments.
SELECT envelope.grant('no_such_kek', 'regress_priv_app', 'decrypt');
SELECT envelope.grant('regress_a', 'regress_priv_app', 'read');
SELECT envelope.grant('regress_a', 'no_such_role', 'decrypt');

SELECT kek, grantee, privilege, granted_by FROM envelope.kek_privileges
	WHERE grantee::text LIKE 'regress_priv%' ORDER BY 1, 2, 3;

-- encrypt and decrypt
SET ROLE regress_priv_app;
INSERT INTO priv_t VALUES (3, enc('three', 'regress_a'));
SELECT id, dec_text(v) FROM priv_t ORDER BY id;
-- other KEKs stay closed
SELECT enc('x', 'regress_b');
RESET ROLE;

-- rewrap without decrypt
SET ROLE regress_priv_maint;
SELECT envelope.kek_version_of(rewrap(v)) = envelope.kek_version_of(v) AS same_version FROM priv_t WHERE id = 1;
SELECT dec_text(v) FROM priv_t WHERE id = 1;
-- moving to another KEK needs rewrap on both, and decrypt on the source
SELECT rewrap(v, 'regress_b') FROM priv_t WHERE id = 1;
RESET ROLE;
SELECT envelope.grant('regress_a', 'regress_priv_maint', 'decrypt');
SET ROLE regress_priv_maint;
SELECT rewrap(v, 'regress_b') FROM priv_t WHERE id = 1;
RESET ROLE;
SELECT envelope.revoke('regress_a', 'regress_priv_maint', 'decrypt');
SET ROLE regress_priv_maint;
RESET ROLE;

-- through role membership, honouring NOINHERIT
SET ROLE regress_priv_member;
SELECT dec_text(v) FROM priv_t WHERE id = 2;
SET ROLE regress_priv_noinherit;
SELECT dec_text(v) FROM priv_t WHERE id = 2;
RESET ROLE;

-- SECURITY DEFINER: the definer's privileges apply
CREATE FUNCTION priv_read(i int) RETURNS text LANGUAGE sql SECURITY DEFINER
	AS $$ SELECT dec_text(v) FROM priv_t WHERE id = i $$;
ALTER FUNCTION priv_read(int) OWNER TO regress_priv_app;
SET ROLE regress_priv_nobody;
SELECT priv_read(2);
RESET ROLE;

-- revoke takes effect for the next statement
SELECT envelope.revoke('regress_a', 'regress_priv_group', 'decrypt');
SET ROLE regress_priv_member;
SELECT dec_text(v) FROM priv_t WHERE id = 2;
RESET ROLE;
SELECT envelope.revoke('regress_a', 'regress_priv_app', 'all');
SET ROLE regress_priv_app;
SELECT dec_text(v) FROM priv_t WHERE id = 2;
RESET ROLE;
SELECT count(*) AS left_for_regress_priv FROM envelope.kek_privileges WHERE grantee::text LIKE 'regress_priv%';

-- audit settings: only superusers may turn the audit off
SET ROLE regress_priv_app;
SET envelope.audit = off;
RESET ROLE;
SHOW envelope.audit;

-- a role holding KEK privileges cannot be dropped; DROP OWNED BY removes them
DROP ROLE regress_priv_maint;
DROP OWNED BY regress_priv_maint;
SELECT count(*) AS maint_privileges FROM envelope.kek_privileges WHERE grantee::text = 'regress_priv_maint';
DROP FUNCTION priv_read(int);
DROP TABLE priv_t;
DROP ROLE regress_priv_app, regress_priv_maint, regress_priv_member, regress_priv_noinherit,
	regress_priv_group, regress_priv_admin, regress_priv_nobody;

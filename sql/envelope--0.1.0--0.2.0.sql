/* envelope 0.1.0 -> 0.2.0: per-KEK privileges, audit settings, fingerprints */

-- complain if script is sourced in psql, rather than via ALTER EXTENSION
\echo Use "ALTER EXTENSION envelope UPDATE TO '0.2.0'" to load this file. \quit

---------------------------------------------------------------------------
-- KEK administrators
---------------------------------------------------------------------------

-- Members of envelope_admin manage KEKs (create, rotate, retire) and their
-- privileges.  Being an admin grants no use of keys: an admin who needs to
-- decrypt grants that to himself, which is audited.  The role is
-- cluster-wide, so it may exist already (another database's envelope).
DO $$
BEGIN
	IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname OPERATOR(pg_catalog.=) 'envelope_admin') THEN
		CREATE ROLE envelope_admin NOLOGIN;
	END IF;
END
$$;

GRANT EXECUTE ON FUNCTION envelope.create_kek(pg_catalog.text, pg_catalog.text, pg_catalog.text) TO envelope_admin;
GRANT EXECUTE ON FUNCTION envelope.rotate_kek(pg_catalog.text) TO envelope_admin;
GRANT EXECUTE ON FUNCTION envelope.cache_flush(pg_catalog.text) TO envelope_admin;
GRANT EXECUTE ON FUNCTION envelope.retire_kek_version(pg_catalog.text, pg_catalog.int4) TO envelope_admin;
GRANT EXECUTE ON FUNCTION envelope._kms_retire(pg_catalog.text, pg_catalog.int4) TO envelope_admin;
-- rewrap_column needs only the rewrap privilege on the KEKs (checked by
-- rewrap()) and UPDATE on the table: a maintenance role can run it.  It
-- records its progress and writes "rewrap" audit records (audit_event
-- accepts other events from admins only).
GRANT EXECUTE ON FUNCTION envelope.audit_event(pg_catalog.text, pg_catalog.text, pg_catalog.int4, pg_catalog.jsonb) TO PUBLIC;
GRANT EXECUTE ON PROCEDURE envelope.rewrap_column(pg_catalog.regclass, pg_catalog.name, pg_catalog.int4, pg_catalog.text, pg_catalog.interval) TO PUBLIC;
GRANT INSERT, UPDATE ON envelope.rewrap_run TO PUBLIC;
GRANT INSERT, UPDATE ON envelope.kek TO envelope_admin;

---------------------------------------------------------------------------
-- Per-KEK privileges
---------------------------------------------------------------------------

-- Who may use which KEK for what.  Roles are stored as regrole (OIDs, which
-- pg_dump writes as names and pg_upgrade preserves).  Changed only through
-- envelope.grant and envelope.revoke; a statement trigger invalidates every
-- backend's copy, so a change applies to the next statement of every session.
CREATE TABLE envelope.kek_grant (
	kek			pg_catalog.text NOT NULL
		REFERENCES envelope.kek (name) ON UPDATE CASCADE ON DELETE CASCADE,
	grantee		pg_catalog.regrole NOT NULL,
	privilege	pg_catalog.text NOT NULL
		CHECK (privilege OPERATOR(pg_catalog.=) ANY (ARRAY['encrypt', 'decrypt', 'rewrap'])),
	granted_by	pg_catalog.regrole NOT NULL,
	granted_at	pg_catalog.timestamptz NOT NULL DEFAULT pg_catalog.now(),
	PRIMARY KEY (kek, grantee, privilege)
);
COMMENT ON TABLE envelope.kek_grant IS
	'per-KEK privileges (encrypt, decrypt, rewrap); change through envelope.grant and envelope.revoke';
-- Keep grants in dumps, so a restored database has the same access rules.
SELECT pg_catalog.pg_extension_config_dump('envelope.kek_grant', '');
-- Every backend reads the grants to authorize a key use; they hold no secrets.
GRANT SELECT ON envelope.kek_grant TO PUBLIC;
-- No one but the extension's owner writes it: envelope.grant and
-- envelope.revoke (which check envelope_admin) change it as the owner, so
-- every change is audited.

CREATE FUNCTION envelope.kek_grant_changed() RETURNS trigger
	AS 'MODULE_PATHNAME', 'envelope_kek_grant_changed' LANGUAGE C;
REVOKE ALL ON FUNCTION envelope.kek_grant_changed() FROM PUBLIC;
CREATE TRIGGER kek_grant_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON envelope.kek_grant
	FOR EACH STATEMENT EXECUTE FUNCTION envelope.kek_grant_changed();

CREATE VIEW envelope.kek_privileges AS
	SELECT kek, grantee, privilege, granted_by, granted_at
	FROM envelope.kek_grant;
GRANT SELECT ON envelope.kek_privileges TO PUBLIC;

CREATE FUNCTION envelope.grant(kek pg_catalog.text, role pg_catalog.regrole, privilege pg_catalog.text)
	RETURNS void
	AS 'MODULE_PATHNAME', 'envelope_grant' LANGUAGE C STRICT VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION envelope.grant(pg_catalog.text, pg_catalog.regrole, pg_catalog.text) IS
	'allow a role (and its members) to use a KEK to encrypt, decrypt or rewrap (or all)';

CREATE FUNCTION envelope.revoke(kek pg_catalog.text, role pg_catalog.regrole, privilege pg_catalog.text)
	RETURNS void
	AS 'MODULE_PATHNAME', 'envelope_revoke' LANGUAGE C STRICT VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION envelope.revoke(pg_catalog.text, pg_catalog.regrole, pg_catalog.text) IS
	'withdraw a privilege granted with envelope.grant; effective for the next statement of every session';

REVOKE ALL ON FUNCTION envelope.grant(pg_catalog.text, pg_catalog.regrole, pg_catalog.text) FROM PUBLIC;
REVOKE ALL ON FUNCTION envelope.revoke(pg_catalog.text, pg_catalog.regrole, pg_catalog.text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION envelope.grant(pg_catalog.text, pg_catalog.regrole, pg_catalog.text) TO envelope_admin;
GRANT EXECUTE ON FUNCTION envelope.revoke(pg_catalog.text, pg_catalog.regrole, pg_catalog.text) TO envelope_admin;

---------------------------------------------------------------------------
-- Audit
---------------------------------------------------------------------------

CREATE FUNCTION envelope.fingerprint(value @extschema@.enc_bytea) RETURNS pg_catalog.text
	AS 'MODULE_PATHNAME', 'envelope_fingerprint' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION envelope.fingerprint(@extschema@.enc_bytea) IS
	'the fingerprint audit records give for a value (128 bits of SHA-256 of the stored value; reveals nothing of the plaintext)';

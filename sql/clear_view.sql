-- Clear views: envelope.create_clear_view, set_clear_column, drop_clear_view.
-- Error contexts name PL/pgSQL line numbers, which change with the code.
\set SHOW_CONTEXT never
-- Nothing here prints ciphertext or the current time.
SET envelope.default_kek = 'regress_a';

---------------------------------------------------------------------------
-- Defaults: every enc_bytea column decrypted as text, the default KEK
---------------------------------------------------------------------------
CREATE TABLE cv_people (
	id			serial PRIMARY KEY,
	name		text NOT NULL,
	ssn			enc_bytea,
	note		enc_bytea DEFAULT enc('none'),
	created_at	timestamptz NOT NULL DEFAULT now()
);
-- A row written directly, before the view exists.
INSERT INTO cv_people (name, ssn) VALUES ('Ann', enc('111-11-1111'));

SELECT envelope.create_clear_view('cv_people');
SELECT c.relname, c.relkind, c.reloptions, pg_get_userbyid(c.relowner) = current_user AS mine
FROM pg_class c WHERE c.relname = 'cv_people_clear';
SELECT pg_get_viewdef('cv_people_clear'::regclass);
-- The view carries the table's defaults; an encrypted column's default is
-- its plaintext (the trigger encrypts it again).
SELECT attname, format_type(atttypid, atttypmod) AS type, pg_get_expr(adbin, adrelid) AS "default"
FROM pg_attribute LEFT JOIN pg_attrdef ON adrelid = attrelid AND adnum = attnum
WHERE attrelid = 'cv_people_clear'::regclass AND attnum > 0 ORDER BY attnum;
SELECT tgname, tgfoid::regprocedure AS function FROM pg_trigger
WHERE tgrelid = 'cv_people_clear'::regclass ORDER BY tgname;

-- Reading decrypts.
SELECT id, name, ssn, note, created_at IS NOT NULL AS has_created_at FROM cv_people_clear ORDER BY id;

-- Inserting encrypts; omitted columns get the table's defaults (serial id,
-- timestamp, the encrypted column's default), RETURNING shows them.
INSERT INTO cv_people_clear (name, ssn) VALUES ('Bob', '222-22-2222'), ('Cy', NULL)
RETURNING id, name, ssn, note, created_at IS NOT NULL AS has_created_at;
-- Explicit values win over defaults, and an explicit NULL stays NULL.
INSERT INTO cv_people_clear (id, name, ssn, note, created_at)
VALUES (100, 'Dee', '444-44-4444', NULL, '2000-01-01 00:00:00+00')
RETURNING id, name, ssn, note, created_at = '2000-01-01 00:00:00+00' AS given_time;
-- Stored values are ciphertext under the default KEK, with no plaintext in them.
SELECT id, envelope.kek_of(ssn) AS ssn_kek, envelope.kek_of(note) AS note_kek,
	   position(convert_to(dec_text(ssn), 'UTF8') IN raw(ssn)) = 0 AS ssn_hidden,
	   strpos(ssn::text, dec_text(ssn)) = 0 AS ssn_text_hidden,
	   created_at IS NOT NULL AS has_created_at
FROM cv_people ORDER BY id;
SELECT dec_text(ssn) AS ssn, dec_text(note) AS note FROM cv_people WHERE id = 2;

-- COPY into the view goes through the trigger too.
COPY cv_people_clear (name, ssn) FROM stdin;
Eve	555-55-5555
Fay	\N
\.
SELECT v.id, v.name, v.ssn, v.note, envelope.kek_of(p.ssn) AS stored_kek
FROM cv_people_clear v JOIN cv_people p USING (id) WHERE id IN (4, 5) ORDER BY id;

-- Updating: an encrypted column is encrypted again only if its plaintext
-- changed; otherwise its stored ciphertext is kept byte for byte.
CREATE TEMP TABLE cv_before AS SELECT id, ssn::text AS ssn, note::text AS note FROM cv_people;
UPDATE cv_people_clear SET name = 'Bobby' WHERE id = 2 RETURNING id, name, ssn, note;
SELECT p.id, p.ssn::text = b.ssn AS ssn_kept, p.note::text = b.note AS note_kept
FROM cv_people p JOIN cv_before b USING (id) WHERE id = 2;
UPDATE cv_people_clear SET ssn = '333-33-3333' WHERE id = 2 RETURNING id, name, ssn, note;
SELECT p.id, p.ssn::text = b.ssn AS ssn_kept, p.note::text = b.note AS note_kept, dec_text(p.ssn) AS ssn
FROM cv_people p JOIN cv_before b USING (id) WHERE id = 2;
-- Setting the same plaintext again keeps the ciphertext too.
UPDATE cv_people_clear SET ssn = '111-11-1111', note = 'none' WHERE id = 1;
SELECT p.id, p.ssn::text = b.ssn AS ssn_kept, p.note::text = b.note AS note_kept
FROM cv_people p JOIN cv_before b USING (id) WHERE id = 1;
-- To NULL and back.
UPDATE cv_people_clear SET note = NULL WHERE id = 1 RETURNING id, note;
UPDATE cv_people_clear SET note = 'back' WHERE id = 1 RETURNING id, note;
-- No row matched: nothing happens.
UPDATE cv_people_clear SET name = 'nobody' WHERE id = 999 RETURNING id;

-- Deleting, by primary key.
DELETE FROM cv_people_clear WHERE id = 3 RETURNING id, name, ssn, note;
SELECT id, name FROM cv_people ORDER BY id;

---------------------------------------------------------------------------
-- Per-column choices: bytea, a row context, a KEK, a view name
---------------------------------------------------------------------------
CREATE TABLE cv_docs (
	tenant	int,
	doc_id	int,
	title	text,
	body	enc_bytea,
	scan	enc_bytea,
	PRIMARY KEY (tenant, doc_id)
);
SELECT envelope.set_clear_column('cv_docs', 'scan', 'bytea');
SELECT envelope.set_clear_column('cv_docs', 'body', 'text',
	$$convert_to('cv_docs:' || tenant || ':' || doc_id, 'UTF8')$$);
SELECT relschema, relname, relowner = current_user AS mine, column_name, as_type, context_expr
FROM envelope.clear_view_column WHERE relname = 'cv_docs' ORDER BY column_name;
-- Setting a column again replaces its choice.
SELECT envelope.set_clear_column('cv_docs', 'scan', 'BYTEA');
SELECT count(*) FROM envelope.clear_view_column WHERE relname = 'cv_docs';

SELECT envelope.create_clear_view('cv_docs', 'docs', 'regress_b');
SELECT pg_get_viewdef('docs'::regclass);
SELECT tgname, tgfoid::regprocedure AS function FROM pg_trigger WHERE tgrelid = 'docs'::regclass ORDER BY tgname;

INSERT INTO docs VALUES (1, 1, 'one', 'body one', '\xdeadbeef'), (1, 2, 'two', 'body two', '\x00')
RETURNING *;
SELECT * FROM docs ORDER BY tenant, doc_id;
-- Stored under the view's KEK; body is bound to its row, scan is not.
SELECT doc_id, envelope.kek_of(body) AS body_kek, envelope.kek_of(scan) AS scan_kek,
	   envelope.metadata(body)->>'context_bound' AS body_bound,
	   envelope.metadata(scan)->>'context_bound' AS scan_bound
FROM cv_docs ORDER BY doc_id;
SELECT dec_text(body, convert_to('cv_docs:1:1', 'UTF8')) AS body_with_context FROM cv_docs WHERE doc_id = 1;

-- A value copied to another row does not decrypt there through the view...
UPDATE cv_docs SET body = (SELECT body FROM cv_docs WHERE doc_id = 1) WHERE doc_id = 2;
SELECT title, body FROM docs WHERE doc_id = 2;
-- ...while a value without context does (and unselected columns are not decrypted).
UPDATE cv_docs SET scan = (SELECT scan FROM cv_docs WHERE doc_id = 1) WHERE doc_id = 2;
SELECT title, scan FROM docs WHERE doc_id = 2;
UPDATE cv_docs SET body = enc('body two', 'regress_b', convert_to('cv_docs:1:2', 'UTF8')) WHERE doc_id = 2;
SELECT * FROM docs ORDER BY tenant, doc_id;

-- Changing a column of the context re-encrypts with the new context, even
-- though the plaintext did not change.
CREATE TEMP TABLE cv_docs_before AS SELECT doc_id, body::text AS body, scan::text AS scan FROM cv_docs;
UPDATE docs SET doc_id = 3 WHERE doc_id = 2 RETURNING *;
SELECT d.doc_id, d.body::text = b.body AS body_kept, d.scan::text = b.scan AS scan_kept
FROM cv_docs d, cv_docs_before b WHERE d.doc_id = 3 AND b.doc_id = 2;
SELECT * FROM docs ORDER BY tenant, doc_id;
SELECT dec_text(body, convert_to('cv_docs:1:3', 'UTF8')) AS body_with_new_context FROM cv_docs WHERE doc_id = 3;
DELETE FROM docs WHERE tenant = 1 AND doc_id = 3 RETURNING *;

---------------------------------------------------------------------------
-- Identity and generated columns
---------------------------------------------------------------------------
CREATE TABLE cv_ident (
	id			int GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
	label		text,
	label_upper	text GENERATED ALWAYS AS (upper(label)) STORED,
	secret		enc_bytea
);
-- The context can use the generated id: the trigger draws it first.
SELECT envelope.set_clear_column('cv_ident', 'secret', context_expr => $$convert_to('cv_ident:' || id, 'UTF8')$$);
SELECT envelope.create_clear_view('cv_ident');
INSERT INTO cv_ident_clear (label, secret) VALUES ('a', 's1'), ('b', 's2') RETURNING *;
SELECT id, dec_text(secret, convert_to('cv_ident:' || id, 'UTF8')) AS secret FROM cv_ident ORDER BY id;
UPDATE cv_ident_clear SET label = 'c', secret = 's3' WHERE id = 2 RETURNING *;
INSERT INTO cv_ident_clear (id, label) VALUES (10, 'x');
INSERT INTO cv_ident_clear (label, label_upper) VALUES ('x', 'X');
UPDATE cv_ident_clear SET id = 10 WHERE id = 1;
UPDATE cv_ident_clear SET label_upper = 'Z' WHERE id = 1;
SELECT * FROM cv_ident_clear ORDER BY id;

---------------------------------------------------------------------------
-- Privileges: the view is security_invoker, so the table's grants apply
---------------------------------------------------------------------------
CREATE ROLE regress_cv_reader;
CREATE ROLE regress_cv_owner;
-- (and the per-KEK privileges: see the privileges test)
SELECT envelope.grant('regress_a', r, 'all') FROM unnest(ARRAY['regress_cv_reader', 'regress_cv_owner']::regrole[]) r;
GRANT CREATE ON SCHEMA public TO regress_cv_owner;

-- Privileges on the view alone are not enough.
GRANT SELECT ON cv_people_clear TO regress_cv_reader;
SET ROLE regress_cv_reader;
SELECT name, ssn FROM cv_people_clear WHERE id = 1;
RESET ROLE;
GRANT SELECT ON cv_people TO regress_cv_reader;
SET ROLE regress_cv_reader;
SELECT name, ssn FROM cv_people_clear WHERE id = 1;
INSERT INTO cv_people_clear (name) VALUES ('not allowed');
-- Not the owner: cannot make a clear view or change the choices.
SELECT envelope.create_clear_view('cv_people', 'cv_people_mine');
SELECT envelope.set_clear_column('cv_people', 'ssn', 'bytea');
INSERT INTO envelope.clear_view_column (relid, relschema, relname, relowner, column_name, context_expr)
VALUES ('cv_people'::regclass, 'public', 'cv_people', 'regress_cv_reader', 'ssn', 'NULL');
DELETE FROM envelope.clear_view_column WHERE relname = 'cv_docs';
SELECT envelope.drop_clear_view('cv_people_clear');
RESET ROLE;
SELECT count(*) FROM envelope.clear_view_column WHERE relname = 'cv_docs';

-- A table's grants are copied to its new clear view.
CREATE TABLE cv_granted (id int PRIMARY KEY, v enc_bytea);
GRANT SELECT, INSERT ON cv_granted TO regress_cv_reader;
SELECT envelope.create_clear_view('cv_granted');
SELECT p.priv, has_table_privilege('regress_cv_reader', 'cv_granted_clear', p.priv) AS granted
FROM unnest(ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE']) AS p(priv);
SET ROLE regress_cv_reader;
INSERT INTO cv_granted_clear VALUES (1, 'by the reader') RETURNING *;
UPDATE cv_granted_clear SET v = 'no';
RESET ROLE;

-- A non-superuser owner makes and uses its own clear view.
SET ROLE regress_cv_owner;
CREATE TABLE cv_owned (id bigint PRIMARY KEY, secret enc_bytea, raw_secret enc_bytea);
SELECT envelope.set_clear_column('cv_owned', 'raw_secret', 'bytea', $$convert_to(id::text, 'UTF8')$$);
SELECT envelope.create_clear_view('cv_owned');
INSERT INTO cv_owned_clear VALUES (7, 'owned', '\x0102') RETURNING *;
SELECT * FROM cv_owned_clear;
RESET ROLE;
SELECT c.relname, pg_get_userbyid(c.relowner) AS owner FROM pg_class c
WHERE c.relname IN ('cv_owned', 'cv_owned_clear') ORDER BY 1;
SELECT p.proname, pg_get_userbyid(p.proowner) AS owner FROM pg_proc p
WHERE p.proname LIKE 'cv\_owned\_clear\_%' ORDER BY 1;
-- A superuser making a view of someone else's table: the table's owner owns it.
SELECT envelope.create_clear_view('cv_owned', 'cv_owned_clear2');
SELECT c.relname, pg_get_userbyid(c.relowner) AS owner FROM pg_class c WHERE c.relname = 'cv_owned_clear2';

---------------------------------------------------------------------------
-- Errors
---------------------------------------------------------------------------
CREATE TABLE cv_nopk (a int, s enc_bytea);
SELECT envelope.create_clear_view('cv_nopk');
SELECT envelope.create_clear_view('cv_people_clear');
CREATE SEQUENCE cv_seq;
SELECT envelope.create_clear_view('cv_seq');
-- The name is taken: by the existing view, by another relation, by a function.
SELECT envelope.create_clear_view('cv_people');
SELECT envelope.create_clear_view('cv_people', 'cv_docs');
CREATE FUNCTION cv_taken_insert() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$;
SELECT envelope.create_clear_view('cv_people', 'cv_taken');
DROP FUNCTION cv_taken_insert();
SELECT envelope.create_clear_view('cv_people', repeat('x', 64));
SELECT envelope.create_clear_view('cv_people', 'cv_people_2', 'no_such_kek');
SELECT envelope.create_clear_view('no_such_table');
-- Choices that cannot be made.
SELECT envelope.set_clear_column('cv_people', 'name');
SELECT envelope.set_clear_column('cv_people', 'no_such_column');
SELECT envelope.set_clear_column('cv_people', 'ssn', 'json');
SELECT envelope.set_clear_column('cv_people_clear', 'ssn');
-- Context expressions are checked when the view is made.
CREATE TABLE cv_badctx (id int PRIMARY KEY, a enc_bytea, b enc_bytea);
SELECT envelope.set_clear_column('cv_badctx', 'a', context_expr => 'raw(b)');
SELECT envelope.create_clear_view('cv_badctx');
SELECT envelope.set_clear_column('cv_badctx', 'a', context_expr => $$'cv:' || id$$);
SELECT envelope.create_clear_view('cv_badctx');
SELECT envelope.set_clear_column('cv_badctx', 'a', context_expr => 'no_such_column');
SELECT envelope.create_clear_view('cv_badctx');
SELECT envelope.set_clear_column('cv_badctx', 'a', context_expr => 'convert_to(id::text');
SELECT envelope.create_clear_view('cv_badctx');
-- Nothing was left behind by the failed attempts.
SELECT relname FROM pg_class WHERE relname LIKE 'cv\_%' AND relkind = 'v' ORDER BY 1;
SELECT proname FROM pg_proc WHERE proname LIKE 'cv\_%' ORDER BY 1;
-- A table without encrypted columns: a plain view, with a notice.
CREATE TABLE cv_noenc (id int PRIMARY KEY, t text DEFAULT 'dflt');
SELECT envelope.create_clear_view('cv_noenc');
INSERT INTO cv_noenc_clear (id) VALUES (1) RETURNING *;
-- Only clear views can be dropped with drop_clear_view.
CREATE VIEW cv_other AS SELECT 1 AS one;
SELECT envelope.drop_clear_view('cv_other');
SELECT envelope.drop_clear_view('cv_people');
-- The trigger functions are ordinary: the KEK must exist at write time.
SET envelope.default_kek = '';
INSERT INTO cv_people_clear (name, ssn) VALUES ('nokek', 'x');
RESET envelope.default_kek;
SET envelope.default_kek = 'regress_a';

---------------------------------------------------------------------------
-- drop_clear_view
---------------------------------------------------------------------------
SELECT envelope.drop_clear_view('docs');
SELECT count(*) AS views FROM pg_class WHERE relname = 'docs';
SELECT count(*) AS functions FROM pg_proc WHERE proname LIKE 'docs\_%';
SELECT count(*) AS choices FROM envelope.clear_view_column WHERE relname = 'cv_docs';
-- The table and its data are untouched.
SELECT doc_id, title, dec_text(body, convert_to('cv_docs:1:' || doc_id, 'UTF8')) AS body FROM cv_docs;
-- keep_config keeps the choices, so the view can be made again the same way.
SELECT envelope.drop_clear_view('cv_owned_clear2', keep_config => true);
SELECT envelope.drop_clear_view('cv_owned_clear', keep_config => true);
SELECT column_name, as_type FROM envelope.clear_view_column WHERE relname = 'cv_owned';
SELECT envelope.create_clear_view('cv_owned');
SELECT * FROM cv_owned_clear;
-- Dropping the last clear view of a table removes its choices.
SELECT envelope.drop_clear_view('cv_owned_clear');
SELECT count(*) AS choices FROM envelope.clear_view_column WHERE relname = 'cv_owned';

-- Clean up.
SELECT envelope.drop_clear_view('cv_people_clear');
SELECT envelope.drop_clear_view('cv_ident_clear');
SELECT envelope.drop_clear_view('cv_granted_clear');
SELECT envelope.drop_clear_view('cv_noenc_clear');
DROP TABLE cv_people, cv_docs, cv_ident, cv_granted, cv_owned, cv_nopk, cv_badctx, cv_noenc;
DROP VIEW cv_other;
DROP SEQUENCE cv_seq;
REVOKE CREATE ON SCHEMA public FROM regress_cv_owner;
SELECT envelope.revoke('regress_a', r, 'all') FROM unnest(ARRAY['regress_cv_reader', 'regress_cv_owner']::regrole[]) r;
DROP ROLE regress_cv_reader;
DROP ROLE regress_cv_owner;
-- Choices outlive a dropped table (here one that never got a view); a
-- table created later with the same name and owner would use them.
SELECT relname, column_name, context_expr FROM envelope.clear_view_column;
DELETE FROM envelope.clear_view_column WHERE relname = 'cv_badctx';

-- Context expressions are single expressions, checked with the owner's rights.
CREATE TABLE cv_inj (id int PRIMARY KEY, s enc_bytea, g int GENERATED ALWAYS AS (id * 2) STORED);
SELECT envelope.set_clear_column('cv_inj', 's', 'text', $$NULL::bytea) AS x) AS s ON true CROSS JOIN LATERAL (SELECT 1) AS e --$$);
SELECT envelope.create_clear_view('cv_inj');
SELECT envelope.set_clear_column('cv_inj', 's', 'text', $$convert_to('a', 'UTF8'); SELECT 1$$);
SELECT envelope.create_clear_view('cv_inj');
-- Generated columns are computed after the triggers: not usable in a context.
SELECT envelope.set_clear_column('cv_inj', 's', 'text', $$int4send(g)$$);
SELECT envelope.create_clear_view('cv_inj');
-- Renaming the table keeps its choices.
SELECT envelope.set_clear_column('cv_inj', 's', 'text', $$int4send(id)$$);
ALTER TABLE cv_inj RENAME TO cv_inj2;
SELECT envelope.create_clear_view('cv_inj2');
INSERT INTO cv_inj2_clear (id, s) VALUES (1, 'bound to its id');
SELECT dec_text(s, int4send(id)) AS bound FROM cv_inj2;
SELECT envelope.drop_clear_view('cv_inj2_clear');
DROP TABLE cv_inj2;

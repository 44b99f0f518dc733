-- ALTER EXTENSION envelope UPDATE from 0.1.0 to the current version gives
-- the same objects as a fresh install (runs last: it reinstalls).
CREATE TEMP TABLE fresh AS
	SELECT pg_describe_object(classid, objid, objsubid) AS object
	FROM pg_depend WHERE refclassid = 'pg_extension'::regclass AND deptype = 'e'
	  AND refobjid = (SELECT oid FROM pg_extension WHERE extname = 'envelope');
SET client_min_messages = warning;
DROP EXTENSION envelope CASCADE;
RESET client_min_messages;
CREATE EXTENSION envelope VERSION '0.1.0';
SELECT to_regproc('envelope.grant') IS NULL AS no_grant_in_010;
ALTER EXTENSION envelope UPDATE;
SELECT extversion FROM pg_extension WHERE extname = 'envelope';
SELECT object AS missing_after_update FROM fresh
EXCEPT
SELECT pg_describe_object(classid, objid, objsubid)
	FROM pg_depend WHERE refclassid = 'pg_extension'::regclass AND deptype = 'e'
	  AND refobjid = (SELECT oid FROM pg_extension WHERE extname = 'envelope');
SELECT pg_describe_object(classid, objid, objsubid) AS extra_after_update
	FROM pg_depend WHERE refclassid = 'pg_extension'::regclass AND deptype = 'e'
	  AND refobjid = (SELECT oid FROM pg_extension WHERE extname = 'envelope')
EXCEPT
SELECT object FROM fresh;
SELECT rolname FROM pg_roles WHERE rolname = 'envelope_admin';

-- ALTER EXTENSION envelope UPDATE from 0.1.0 to the current version gives
-- the same objects as a fresh install (runs last: it reinstalls).
CREATE TEMP TABLE fresh AS
	SELECT pg_describe_object(classid, objid, objsubid) AS object
	FROM pg_depend WHERE refclassid = 'pg_extension'::regclass AND deptype = 'e'
	  AND refobjid = (SELECT oid FROM pg_extension WHERE extname = 'envelope');
CREATE TEMP TABLE fresh_cost AS
	SELECT p.oid::regprocedure::text AS fn, p.procost
	FROM pg_proc p JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid
	WHERE d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e'
	  AND d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'envelope');
SELECT fn, procost FROM fresh_cost WHERE procost > 1 ORDER BY fn;
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
-- function costs (0.3.0) as a fresh install has them
SELECT fn, procost AS fresh_cost FROM fresh_cost
EXCEPT
SELECT p.oid::regprocedure::text, p.procost
	FROM pg_proc p JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid
	WHERE d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e'
	  AND d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'envelope');
SELECT rolname FROM pg_roles WHERE rolname = 'envelope_admin';

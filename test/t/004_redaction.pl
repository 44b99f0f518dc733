
# Redaction: plaintext given to enc() or returned by dec() never reaches the
# server log.
#
# Every plaintext is a fresh random secret ('SECRET-' and 16 hex digits).
# After each scenario the whole server log must contain no secret (nor its
# hex digits alone, nor its hex encoding as a bytea would show it), and the
# statement line must be there with its constants replaced by '***':
#
#   log_statement = all: INSERT ... enc('...') and SELECT ... WHERE
#     dec_text(v) = '...'
#   log_min_duration_statement = 0 (log_statement = none), also for a
#     statement whose text names no envelope object but that executed enc()
#     inside a PL/pgSQL function
#   errors (log_min_error_statement): enc('...', 'nosuchkek') (the client
#     still gets 42704), dec_text(v)::int of a secret that is no number (the
#     client still gets 22P02), a check constraint failing on a row built from
#     dec_text() ("Failing row contains ...", 23514)
#   PREPARE / EXECUTE, with the DETAIL "prepare: ..." line
#   extended protocol (pgbench -M extended and -M prepared): the DETAIL
#     "parameters: $1 = ..." line with log_parameter_max_length = -1, and a
#     failing statement with log_parameter_max_length_on_error = -1
#   writes and reads through a clear view (envelope.create_clear_view), whose
#     statement text names no envelope function
#   psycopg2: a plain INSERT with enc(%s), PREPARE and EXECUTE q(%s)
#
# Statements that do not involve the extension are logged unchanged: a
# canary 'canary-plain-<random>' appears verbatim with log_statement = all,
# with log_min_duration_statement = 0 and in EXECUTE of a prepared statement
# that does not use envelope.
#
# Run with test/run-tap.  Needs ENVELOPE_ROOT (the repository, for the test
# KMS), envelope installed, pgbench, and Debian's /usr/bin/python3 with
# python3-cryptography and python3-psycopg2.

use strict;
use warnings;

use IPC::Run;
use Time::HiRes qw(time);

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use EnvelopeTAP qw(start_kms kms_create_key envelope_conf psql_verbose stop_kms);

my $t_start = time;

my $tmp = PostgreSQL::Test::Utils::tempdir('redaction');
my $timeout = $PostgreSQL::Test::Utils::timeout_default;

# ---------------------------------------------------------------------------
# The test KMS
# ---------------------------------------------------------------------------

my $kms = start_kms($tmp, '004_redaction');
kms_create_key($kms, 'k');

# ---------------------------------------------------------------------------
# The node
# ---------------------------------------------------------------------------

my $node = PostgreSQL::Test::Cluster->new('main');
$node->init;
$node->append_conf(
	'postgresql.conf', envelope_conf($kms) . qq{envelope.default_kek = 'k'
log_destination = 'stderr'
log_statement = all
log_min_error_statement = error
max_connections = 20
});
$node->start;

my $su = $node->safe_psql('postgres', 'SELECT current_user');

$node->safe_psql('postgres', 'CREATE EXTENSION envelope');
is($node->safe_psql('postgres', q{SELECT envelope.create_kek('k', 'vault', 'k')}),
	'1', 'KEK k registered');
$node->safe_psql(
	'postgres', q{
-- rid: the primary key a clear view needs; the tests write (id, v) only,
-- and pgbench inserts the same id several times.
CREATE TABLE t (id int, v enc_bytea, rid serial PRIMARY KEY);
-- Rows built from plaintext must not start with SECRET-.
CREATE TABLE chk (id int, p text CONSTRAINT p_no_secret CHECK (p NOT LIKE 'SECRET-%'));
-- Calls enc() where the calling statement's text does not show it.
CREATE FUNCTION wrap_enc(p text) RETURNS enc_bytea LANGUAGE plpgsql AS $$BEGIN RETURN enc(p); END$$;
});
is($node->safe_psql('postgres', q{SELECT envelope.create_clear_view('t')}),
	't_clear', 'clear view t_clear created');

# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

sub rand_hex { return join('', map { sprintf '%02x', int rand 256 } 1 .. $_[0]); }

# Every secret used so far; each must never appear in the server log.
my @secrets;
sub new_secret
{
	my $s = 'SECRET-' . rand_hex(8);
	push @secrets, $s;
	return $s;
}

# Sets server-wide logging settings (undef: RESET), reloads, and waits until
# a new session sees every one of them.
sub set_logging
{
	my (%set) = @_;
	my $sql = '';
	for my $k (sort keys %set)
	{
		$sql .= defined $set{$k} ? "ALTER SYSTEM SET $k = '$set{$k}';\n" : "ALTER SYSTEM RESET $k;\n";
	}
	$node->safe_psql('postgres', $sql . 'SELECT pg_reload_conf();');
	my $check = join(' AND ',
		map { "current_setting('$_') = " . (defined $set{$_} ? "'$set{$_}'" : "(SELECT boot_val FROM pg_settings WHERE name = '$_')") }
		  sort keys %set);
	ok($node->poll_query_until('postgres', "SELECT $check"),
		'logging: ' . join(', ', map { "$_ = " . ($set{$_} // 'default') } sort keys %set));
	return;
}

sub log_offset { return -s $node->logfile; }

# The scenario's part of the log.
sub log_since { return slurp_file($node->logfile, $_[0]); }

# Checks that no secret used so far appears in the server log after
# $offset (0: the whole log): not as is, not its random part alone, not
# hex-encoded.  Each scenario checks its own part of the log, so that one
# leak is reported once, by the scenario that caused it.
sub no_secret_in_log
{
	my ($name, $offset) = @_;
	my $log = slurp_file($node->logfile, $offset);
	my @forms;
	for my $s (@secrets)
	{
		my ($hex) = $s =~ /^SECRET-(.*)$/;
		push @forms, $s, $hex, unpack('H*', $s);
	}
	my $re = join('|', map { quotemeta } @forms);
	my @leaks = grep { /$re/i } split /\n/, $log;
	ok(!@leaks, "$name: no secret in the server log")
	  or diag(scalar(@leaks) . " line(s) with a secret, the first ones:\n"
		  . join("\n", @leaks[ 0 .. ($#leaks < 9 ? $#leaks : 9) ]));
	return;
}

# like() on the scenario's log, showing its statement-ish lines on failure.
sub log_like
{
	my ($log, $re, $name) = @_;
	like($log, $re, $name)
	  or diag("log lines:\n" . join("\n", grep { /statement:|STATEMENT:|DETAIL:|CONTEXT:|ERROR:|execute|duration:/ } split /\n/, $log));
	return;
}

my $masked = qr/'\*\*\*'/;
# A masked numeric constant: '***' (as the spec words it) or a bare ***.
my $num = qr/(?:'\*\*\*'|\*\*\*)/;

# ---------------------------------------------------------------------------
# Statements without envelope are logged as they are
# ---------------------------------------------------------------------------

set_logging(log_statement => 'all', log_min_duration_statement => '-1');
{
	my $canary = 'canary-plain-' . rand_hex(8);
	my $off = log_offset();
	my ($rc, $out, $err) = psql_verbose($node, "SELECT '$canary'");
	is($out, $canary, 'canary: the plain statement runs');
	log_like(log_since($off), qr/LOG:  statement: SELECT '\Q$canary\E';?$/m,
		'canary: a statement without envelope is logged verbatim (log_statement = all)');
}

# ---------------------------------------------------------------------------
# log_statement = all
# ---------------------------------------------------------------------------

{
	my $s = new_secret();
	my $off = log_offset();
	my ($rc, $out, $err) = psql_verbose($node, qq{INSERT INTO t VALUES (1, enc('$s'));\nSELECT id FROM t WHERE dec_text(v) = '$s';});
	is($rc, 0, 'log_statement = all: INSERT with enc() and SELECT with dec_text() run') or diag($err);
	is($out, '1', 'log_statement = all: the row is found by its plaintext');
	my $log = log_since($off);
	log_like($log, qr/LOG:  statement: INSERT INTO t VALUES \($num, enc\('\*\*\*'\)\);?$/m,
		'log_statement = all: INSERT logged with its constants masked');
	log_like($log, qr/LOG:  statement: SELECT id FROM t WHERE dec_text\(v\) = '\*\*\*';?$/m,
		'log_statement = all: SELECT logged with its constant masked');
	no_secret_in_log('log_statement = all', $off);
}

# ---------------------------------------------------------------------------
# log_min_duration_statement = 0
# ---------------------------------------------------------------------------

set_logging(log_statement => 'none', log_min_duration_statement => '0');
{
	my $s = new_secret();
	my $canary = 'canary-plain-' . rand_hex(8);
	my $off = log_offset();
	my ($rc, $out, $err) = psql_verbose($node,
		qq{INSERT INTO t VALUES (2, enc('$s'));\nSELECT count(*) FROM t WHERE dec_text(v) = '$s';\nSELECT '$canary';});
	is($rc, 0, 'log_min_duration_statement = 0: statements run') or diag($err);
	is($out, "1\n$canary", 'log_min_duration_statement = 0: results');
	my $log = log_since($off);
	log_like($log, qr/LOG:  duration: [0-9.]+ ms  statement: INSERT INTO t VALUES \($num, enc\('\*\*\*'\)\);?$/m,
		'log_min_duration_statement = 0: INSERT logged masked');
	log_like($log, qr/LOG:  duration: [0-9.]+ ms  statement: SELECT count\(\*\) FROM t WHERE dec_text\(v\) = '\*\*\*';?$/m,
		'log_min_duration_statement = 0: SELECT logged masked');
	log_like($log, qr/LOG:  duration: [0-9.]+ ms  statement: SELECT '\Q$canary\E';?$/m,
		'log_min_duration_statement = 0: the canary logged verbatim');
	unlike($log, qr/LOG:  statement:/, 'log_min_duration_statement = 0: no log_statement lines (log_statement = none)');
	no_secret_in_log('log_min_duration_statement = 0', $off);

	# The text names no envelope function, but the statement executes one
	# (in a PL/pgSQL function, never inlined); logged after it ran.
	$s = new_secret();
	$off = log_offset();
	($rc, $out, $err) = psql_verbose($node, qq{SELECT pg_typeof(wrap_enc('$s'))});
	is($out, 'enc_bytea', 'log_min_duration_statement = 0: the wrapper in a statement that names no envelope object')
	  or diag($err);
	log_like(log_since($off), qr/LOG:  duration: [0-9.]+ ms  statement: SELECT pg_typeof\(wrap_enc\('\*\*\*'\)\);?$/m,
		'log_min_duration_statement = 0: ... is logged masked too (it executed enc())');
	no_secret_in_log('log_min_duration_statement = 0, enc() through a wrapper', $off);
}

# ---------------------------------------------------------------------------
# Errors: the STATEMENT line, and messages carrying decrypted data
# ---------------------------------------------------------------------------

set_logging(log_statement => 'none', log_min_duration_statement => '-1');
{
	my $s = new_secret();
	my $off = log_offset();
	my ($rc, $out, $err) = psql_verbose($node, qq{SELECT enc('$s', 'nosuchkek')});
	isnt($rc, 0, 'error: enc() with an unknown KEK fails');
	like($err, qr/ERROR:\s+42704: KEK "nosuchkek" does not exist/, 'error: the client gets 42704') or diag($err);
	my $log = log_since($off);
	log_like($log, qr/ERROR:  KEK "nosuchkek" does not exist/, 'error: the error is logged');
	log_like($log, qr/STATEMENT:  SELECT enc\('\*\*\*', '\*\*\*'\);?$/m, 'error: the STATEMENT line is masked');
	no_secret_in_log('error in enc()', $off);
}
{
	my $s = new_secret();
	my $off = log_offset();
	$node->safe_psql('postgres', qq{INSERT INTO t VALUES (3, enc('$s'))});
	my ($rc, $out, $err) = psql_verbose($node, q{SELECT dec_text(v)::int FROM t WHERE id = 3});
	isnt($rc, 0, 'error: dec_text(v)::int of a non-number fails');
	like($err, qr/ERROR:\s+22P02: invalid input syntax for type integer/, 'error: the client gets 22P02') or diag($err);
	my $log = log_since($off);
	log_like($log, qr/ERROR:  invalid input syntax for type integer/, 'error: the error is logged');
	log_like($log, qr/STATEMENT:  SELECT dec_text\(v\)::int FROM t WHERE id = $num;?$/m,
		'error: its STATEMENT line is logged, masked');
	no_secret_in_log('invalid input syntax on decrypted text', $off);

	$off = log_offset();
	($rc, $out, $err) = psql_verbose($node, q{INSERT INTO chk SELECT id, dec_text(v) FROM t WHERE id = 3});
	isnt($rc, 0, 'error: a check constraint fails on a row built from dec_text()');
	like($err, qr/ERROR:\s+23514: new row for relation "[^"]*" violates check constraint/,
		'error: the client gets 23514') or diag($err);
	$log = log_since($off);
	log_like($log, qr/ERROR:  new row for relation "[^"]*" violates check constraint/,
		'error: the check violation is logged');
	no_secret_in_log('check constraint failure ("Failing row contains")', $off);
}

# ---------------------------------------------------------------------------
# PREPARE / EXECUTE
# ---------------------------------------------------------------------------

# With log_statement = all the statement is logged before it runs; with
# log_min_duration_statement = 0 (and log_statement = none) after, with its
# duration.  Both add the DETAIL "prepare: ..." line for EXECUTE.
for my $c ([ 'log_statement = all', 'all', '-1', qr/LOG:  statement: / ],
	[ 'log_min_duration_statement = 0', 'none', '0', qr/LOG:  duration: [0-9.]+ ms  statement: / ])
{
	my ($what, $ls, $lmds, $prefix) = @$c;
	set_logging(log_statement => $ls, log_min_duration_statement => $lmds);
	my $s = new_secret();
	my $canary = 'canary-plain-' . rand_hex(8);
	my $off = log_offset();
	my ($rc, $out, $err) = psql_verbose($node,
		qq{PREPARE p AS INSERT INTO t VALUES (\$1, enc(\$2));
EXECUTE p(4, '$s');
PREPARE p3 AS SELECT count(*) FROM t WHERE dec_text(v) = \$1;
EXECUTE p3('$s');
PREPARE pc AS SELECT \$1::text;
EXECUTE pc('$canary');
});
	is($rc, 0, "PREPARE/EXECUTE, $what: statements run") or diag($err);
	is($out, "1\n$canary", "PREPARE/EXECUTE, $what: results");
	my $log = log_since($off);
	log_like($log, qr/${prefix}EXECUTE p\($num, '\*\*\*'\);?\n[^\n]*DETAIL:  prepare: PREPARE p AS INSERT INTO t VALUES \(\$1, enc\(\$2\)\);?$/m,
		"PREPARE/EXECUTE, $what: EXECUTE p(...) logged masked, with its DETAIL prepare: line");
	log_like($log, qr/${prefix}EXECUTE p3\('\*\*\*'\);?$/m,
		"PREPARE/EXECUTE, $what: EXECUTE of a prepared dec_text() lookup logged masked");
	log_like($log, qr/${prefix}EXECUTE pc\('\Q$canary\E'\);?$/m,
		"PREPARE/EXECUTE, $what: EXECUTE of a statement without envelope logged verbatim");
	no_secret_in_log("PREPARE/EXECUTE, $what", $off);
}

# ---------------------------------------------------------------------------
# Extended protocol: bind parameters (pgbench)
# ---------------------------------------------------------------------------

# Runs pgbench with a one-line script; returns (exit code, stdout, stderr).
sub pgbench
{
	my ($script, @args) = @_;
	my $file = "$tmp/script_" . rand_hex(4) . '.sql';
	PostgreSQL::Test::Utils::append_to_file($file, "$script\n");
	my ($out, $err) = ('', '');
	IPC::Run::run(
		[ 'pgbench', '-n', '-h', $node->host, '-p', $node->port, '-f', $file, @args, 'postgres' ],
		'<', '/dev/null', '>', \$out, '2>', \$err, IPC::Run::timeout($timeout));
	return ($? >> 8, $out, $err);
}

# log_statement = all logs "execute <name>: ..." before the run, and
# log_min_duration_statement = 0 "duration: ... ms  execute <name>: ..."
# after it; both with the DETAIL "parameters: $1 = ...".
for my $c (
	[ 'extended', 100, 'all', '-1', qr/LOG:  execute [^:]*: / ],
	[ 'prepared', 200, 'all', '-1', qr/LOG:  execute [^:]*: / ],
	[ 'extended', 300, 'none', '0', qr/LOG:  duration: [0-9.]+ ms  execute [^:]*: / ])
{
	my ($mode, $id, $ls, $lmds, $prefix) = @$c;
	my $what = "pgbench -M $mode, " . ($ls eq 'all' ? 'log_statement = all' : 'log_min_duration_statement = 0');
	set_logging(log_statement => $ls, log_min_duration_statement => $lmds,
		log_parameter_max_length => '-1', log_parameter_max_length_on_error => '0');
	my $s = new_secret();
	my $off = log_offset();
	my ($rc, $out, $err) = pgbench('INSERT INTO t VALUES (:id, enc(:secret));',
		'-M', $mode, '-t', '3', '-D', "secret=$s", '-D', "id=$id");
	is($rc, 0, "$what: 3 transactions") or diag($err);
	is($node->safe_psql('postgres', "SELECT count(*) FROM t WHERE id = $id"), '3', "$what: 3 rows inserted");
	my $log = log_since($off);
	log_like($log, qr/${prefix}INSERT INTO t VALUES \(\$1, enc\(\$2\)\);?\n[^\n]*DETAIL:  parameters: \$1 = '\*\*\*', \$2 = '\*\*\*'$/m,
		"$what: the execute line is logged, its bind parameters masked");
	no_secret_in_log($what, $off);
}

set_logging(log_statement => 'none', log_min_duration_statement => '-1',
	log_parameter_max_length => '-1', log_parameter_max_length_on_error => '-1');
{
	my $s = new_secret();
	my $off = log_offset();
	my ($rc, $out, $err) = pgbench(q{INSERT INTO t VALUES (:id, enc(:secret, 'nosuchkek'));},
		'-M', 'extended', '-t', '1', '-D', "secret=$s", '-D', 'id=400');
	isnt($rc, 0, 'pgbench -M extended, failing statement: pgbench reports the failure');
	like($err, qr/KEK "nosuchkek" does not exist/, '... KEK "nosuchkek" does not exist') or diag($err);
	my $log = log_since($off);
	log_like($log, qr/ERROR:  KEK "nosuchkek" does not exist/, 'failing bind: the error is logged');
	log_like($log, qr/with parameters: \$1 = '\*\*\*', \$2 = '\*\*\*'$/m,
		'failing bind: the parameters logged on error (log_parameter_max_length_on_error = -1) are masked');
	log_like($log, qr/STATEMENT:  INSERT INTO t VALUES \(\$1, enc\(\$2, '\*\*\*'\)\);?$/m,
		'failing bind: the STATEMENT line is masked');
	no_secret_in_log('failing extended-protocol statement', $off);
}

# ---------------------------------------------------------------------------
# A clear view: the statement text names no envelope function
# ---------------------------------------------------------------------------

set_logging(log_statement => 'all', log_min_duration_statement => '-1',
	log_parameter_max_length => undef, log_parameter_max_length_on_error => undef);
{
	my $s = new_secret();
	my $s2 = new_secret();
	my $off = log_offset();
	my ($rc, $out, $err) = psql_verbose($node,
		qq{SELECT 1;
INSERT INTO t_clear VALUES (5, '$s');
SELECT id FROM t_clear WHERE v = '$s';
UPDATE t_clear SET v = '$s2' WHERE id = 5;
SELECT count(*) FROM t_clear WHERE v = '$s2';
});
	is($rc, 0, 'clear view: insert, select, update run') or diag($err);
	is($out, "1\n5\n1", 'clear view: results');
	is($node->safe_psql('postgres', 'SELECT envelope.kek_of(v) FROM t WHERE id = 5'), 'k',
		'clear view: the row is stored encrypted');
	my $log = log_since($off);
	log_like($log, qr/LOG:  statement: SELECT 1;?$/m, 'clear view: the plain statement before is logged verbatim');
	log_like($log, qr/LOG:  statement: INSERT INTO t_clear VALUES \($num, '\*\*\*'\);?$/m,
		'clear view: INSERT INTO t_clear logged masked');
	log_like($log, qr/LOG:  statement: SELECT id FROM t_clear WHERE v = '\*\*\*';?$/m,
		'clear view: SELECT from t_clear logged masked');
	log_like($log, qr/LOG:  statement: UPDATE t_clear SET v = '\*\*\*' WHERE id = $num;?$/m,
		'clear view: UPDATE t_clear logged masked');
	no_secret_in_log('clear view', $off);
}

# ---------------------------------------------------------------------------
# psycopg2
# ---------------------------------------------------------------------------

set_logging(log_statement => 'all', log_min_duration_statement => '0');
{
	my $s = new_secret();
	my $off = log_offset();
	my $py = <<'PY';
import sys
import psycopg2
host, port, user, secret = sys.argv[1:5]
conn = psycopg2.connect(host=host, port=port, dbname="postgres", user=user)
conn.autocommit = True
cur = conn.cursor()
cur.execute("INSERT INTO t VALUES (%s, enc(%s))", (9, secret))
cur.execute("PREPARE q AS SELECT dec_text(v) FROM t WHERE dec_text(v) = $1")
cur.execute("EXECUTE q(%s)", (secret,))
rows = cur.fetchall()
print(len(rows), rows[0][0] == secret)
conn.close()
PY
	my ($out, $err) = ('', '');
	IPC::Run::run([ '/usr/bin/python3', '-c', $py, $node->host, $node->port, $su, $s ],
		'<', '/dev/null', '>', \$out, '2>', \$err, IPC::Run::timeout($timeout));
	is($? >> 8, 0, 'psycopg2: INSERT, PREPARE, EXECUTE run') or diag($err);
	is($out, "1 True\n", 'psycopg2: EXECUTE q finds the row by its plaintext');
	my $log = log_since($off);
	log_like($log, qr/LOG:  statement: INSERT INTO t VALUES \($num, enc\('\*\*\*'\)\);?$/m,
		'psycopg2: INSERT logged masked');
	log_like($log, qr/LOG:  statement: EXECUTE q\('\*\*\*'\);?$/m, 'psycopg2: EXECUTE q logged masked');
	log_like($log, qr/DETAIL:  prepare: PREPARE q AS SELECT dec_text\(v\) FROM t WHERE dec_text\(v\) = \$1;?$/m,
		'psycopg2: the DETAIL prepare: line is there');
	no_secret_in_log('psycopg2', $off);
}

# ---------------------------------------------------------------------------
# Corner cases: a duration line printed after a WARNING swapped the
# statement text; standard_conforming_strings = off; numbers in the DETAIL
# of EXECUTE; a JSON error quoting decrypted data; a forged audit line
# ---------------------------------------------------------------------------

set_logging(log_statement => 'none', log_min_duration_statement => '0');
{
	my $s = new_secret();
	my $off = log_offset();
	my ($rc, $out, $err) = psql_verbose($node, qq{SELECT enc('$s') IS NOT NULL, pg_terminate_backend(0)});
	is($rc, 0, 'a statement that logs a WARNING before its duration line runs') or diag($err);
	my $log = log_since($off);
	log_like($log, qr/duration: [0-9.]+ ms  statement: SELECT enc\('\*\*\*'\) IS NOT NULL/,
		'the duration line printed after it is masked too');
	no_secret_in_log('duration line after a WARNING', $off);

	$s = new_secret();
	$off = log_offset();
	($rc, $out, $err) = psql_verbose($node,
		"SET standard_conforming_strings = off;\nSELECT enc('it\\'s " . $s . "') IS NOT NULL;");
	is($rc, 0, 'standard_conforming_strings = off: a backslash-escaped quote in enc()') or diag($err);
	no_secret_in_log('standard_conforming_strings = off', $off);
}
set_logging(log_statement => 'all', log_min_duration_statement => '-1');
{
	my $card = '4' . join('', map { int rand 10 } 1 .. 15);
	my $off = log_offset();
	my ($rc, $out, $err) = psql_verbose($node,
		"PREPARE pn AS SELECT enc(${card}::text) IS NOT NULL;\nEXECUTE pn;");
	is($rc, 0, 'PREPARE with a numeric constant, EXECUTE') or diag($err);
	my $log = log_since($off);
	log_like($log, qr/DETAIL:  prepare: PREPARE pn AS SELECT enc\(\*\*\*::text\)/, 'EXECUTE: the DETAIL prepare: line masks numbers');
	unlike($log, qr/\Q$card\E/, 'a numeric secret never reaches the log');

	my $s = new_secret();
	$off = log_offset();
	($rc, $out, $err) = psql_verbose($node, qq|SELECT dec_text(enc('{"ssn": "$s", x'))::json|);
	like($err, qr/22P02/, 'a JSON error on decrypted data reaches the client with its SQLSTATE') or diag($err);
	no_secret_in_log('a JSON error quoting decrypted data (CONTEXT: JSON data ...)', $off);

	$off = log_offset();
	psql_verbose($node, q{DO $$BEGIN RAISE LOG 'ENVELOPE AUDIT: {"seq": 1, "event": "forged"}'; END$$});
	$log = log_since($off);
	unlike($log, qr/ENVELOPE AUDIT: \{"seq": 1, "event": "forged"\}/, 'RAISE LOG cannot write a line that looks like an audit record');
	log_like($log, qr/ENVELOPE AUDIT \(not a record\): \{"seq": 1, "event": "forged"\}/, '... it is defused');
}

# ---------------------------------------------------------------------------
# Second review: a decrypting view created while a session is open; a table
# whose trigger encrypts; backslashes in bind parameters without
# standard_conforming_strings; quotes inside an invalid value; a deadlock
# report quoting another session's statement
# ---------------------------------------------------------------------------

set_logging(log_statement => 'all', log_min_duration_statement => '-1');
{
	# A session opened before the view exists knows it before it names it.
	my $bs = $node->background_psql('postgres', on_error_stop => 0);
	$bs->query_safe('SELECT 1');
	$node->safe_psql('postgres',
		q{CREATE VIEW t_late AS SELECT id, dec_text(v) AS p FROM t});
	my $s = new_secret();
	my $off = log_offset();
	$bs->query(qq{SELECT count(*) FROM t_late WHERE p = '$s'});
	log_like(log_since($off), qr/LOG:  statement: SELECT count\(\*\) FROM t_late WHERE p = '\*\*\*'/,
		'a view created after the session started is known at once');
	no_secret_in_log('a decrypting view created while a session is open', $off);
	$bs->quit;

	# A new session whose first statement names a decrypting view.
	$s = new_secret();
	$off = log_offset();
	psql_verbose($node, qq{SELECT count(*) FROM t_late WHERE p = '$s'});
	no_secret_in_log('the first statement of a new session names a decrypting view', $off);

	# A table that a trigger encrypts into: its statements involve envelope.
	$node->safe_psql('postgres', q{
CREATE TABLE trig_t (id int, p text, v enc_bytea);
CREATE FUNCTION trig_t_enc() RETURNS trigger LANGUAGE plpgsql AS
$$BEGIN NEW.v := enc(NEW.p); NEW.p := NULL; RETURN NEW; END$$;
CREATE TRIGGER trig_t_enc BEFORE INSERT ON trig_t FOR EACH ROW EXECUTE FUNCTION trig_t_enc();});
	$s = new_secret();
	$off = log_offset();
	psql_verbose($node, qq{INSERT INTO trig_t (id, p) VALUES (1, '$s')});
	no_secret_in_log('an INSERT into a table whose trigger encrypts', $off);
}
{
	# Bind parameters are quoted without escaping backslashes: with
	# standard_conforming_strings = off a value ending in \ must not expose
	# the next one.
	my $s = new_secret();
	my $off = log_offset();
	my ($rc, $out, $err) = pgbench(q{SELECT enc(:a || :b) IS NOT NULL;},
		'-M', 'extended', '-t', '1', '-D', 'a=ab\\', '-D', "b=$s and more");
	is($rc, 0, 'pgbench with a backslash at the end of a parameter') or diag($err);
	$off = log_offset();
	{
		local $ENV{PGOPTIONS} = '-c standard_conforming_strings=off';
		($rc, $out, $err) = pgbench(q{SELECT enc(:a || :b) IS NOT NULL;},
			'-M', 'extended', '-t', '1', '-D', 'a=ab\\', '-D', "b=$s and more");
	}
	is($rc, 0, '... and with standard_conforming_strings = off') or diag($err);
	no_secret_in_log('bind parameters with a backslash, standard_conforming_strings = off', $off);

	# An invalid value with quotes in it.
	$s = new_secret();
	$off = log_offset();
	($rc, $out, $err) = psql_verbose($node, qq{SELECT dec_text(enc('ab"$s"cd'))::int});
	like($err, qr/22P02/, 'invalid input with quotes in the value: 22P02 on the client') or diag($err);
	no_secret_in_log('invalid input with quotes in the value', $off);
}
{
	# A deadlock report (DETAIL, server log only) quotes the other session's
	# statement.
	$node->safe_psql('postgres', q{
CREATE TABLE dl (id int PRIMARY KEY, v enc_bytea);
INSERT INTO dl VALUES (1, NULL), (2, NULL);
ALTER SYSTEM SET deadlock_timeout = '100ms';
SELECT pg_reload_conf();});
	my ($s1, $s2) = (new_secret(), new_secret());
	my $off = log_offset();
	my $a = $node->background_psql('postgres', on_error_stop => 0);
	my $b = $node->background_psql('postgres', on_error_stop => 0);
	$a->query('BEGIN');
	$b->query('BEGIN');
	$a->query(qq{UPDATE dl SET v = enc('$s1') WHERE id = 1});
	$b->query(qq{UPDATE dl SET v = enc('$s2') WHERE id = 2});
	# a waits for b, then b for a: one of them is chosen as the victim
	$a->{stdin} .= qq{UPDATE dl SET v = enc('$s1') WHERE id = 2;\n};
	$a->{run}->pump_nb;
	sleep 1;
	$b->query(qq{UPDATE dl SET v = enc('$s2') WHERE id = 1});
	$a->query('ROLLBACK');
	$b->query('ROLLBACK');
	$a->quit;
	$b->quit;
	my $log = log_since($off);
	log_like($log, qr/ERROR:  deadlock detected/, 'a deadlock between two envelope statements is logged');
	no_secret_in_log('a deadlock report', $off);
	$node->safe_psql('postgres', q{ALTER SYSTEM RESET deadlock_timeout; SELECT pg_reload_conf();});
}

# ---------------------------------------------------------------------------
# Third review: EXECUTE not at the start; COPY input lines in a CONTEXT; a
# dropped view whose drop was rolled back; a session in an open transaction
# meeting a new view; standard_conforming_strings changed by a function;
# unterminated quoted identifiers; syntax errors quoting a literal
# ---------------------------------------------------------------------------

set_logging(log_statement => 'all', log_min_duration_statement => '-1');
{
	$node->safe_psql('postgres', q{
CREATE TABLE cp_t (id int PRIMARY KEY, p text, v enc_bytea);
CREATE TRIGGER cp_t_enc BEFORE INSERT ON cp_t FOR EACH ROW EXECUTE FUNCTION trig_t_enc();
CREATE FUNCTION scs_off_fail() RETURNS int LANGUAGE sql SET standard_conforming_strings = off
	AS $$SELECT 1 / 0$$;});
	my @s = map { new_secret() } 1 .. 8;
	my $off = log_offset();
	psql_verbose($node, "PREPARE px AS SELECT enc(\$1) IS NOT NULL;\nSELECT 1; EXECUTE px('$s[0]');\n"
		  . "EXPLAIN ANALYZE EXECUTE px('$s[1]');");
	no_secret_in_log('EXECUTE after another statement, and EXPLAIN ANALYZE EXECUTE', $off);

	$off = log_offset();
	my ($rc, $out, $err) = psql_verbose($node, "COPY cp_t (id, p) FROM STDIN;\n1\t$s[2]\n1\t$s[3]\n\\.\n");
	like($err, qr/23505/, 'COPY into a table whose trigger encrypts: duplicate key (23505)') or diag($err);
	no_secret_in_log('COPY input lines in the CONTEXT of an error', $off);

	$off = log_offset();
	psql_verbose($node, "BEGIN;\nDROP VIEW t_late;\nSELECT 1;\nROLLBACK;");
	psql_verbose($node, "SELECT count(*) FROM t_late WHERE p = '$s[4]'");
	no_secret_in_log('a view whose DROP was rolled back', $off);

	my $bs = $node->background_psql('postgres', on_error_stop => 0);
	$bs->query_safe('BEGIN');
	$bs->query_safe('SELECT 1');
	$node->safe_psql('postgres', q{CREATE VIEW t_later AS SELECT id, dec_text(v) AS p FROM t});
	$off = log_offset();
	$bs->query(qq{SELECT count(*) FROM t_later WHERE p = '$s[5]'});
	$bs->query('COMMIT');
	$bs->quit;
	no_secret_in_log('a session in an open transaction meets a view created meanwhile', $off);

	$off = log_offset();
	($rc, $out, $err) = psql_verbose($node, "SELECT 'x\\', enc('$s[6]'), scs_off_fail();");
	like($err, qr/22012/, 'a function that turns standard_conforming_strings off fails (22012)') or diag($err);
	no_secret_in_log('standard_conforming_strings changed by a function', $off);

	$off = log_offset();
	($rc, $out, $err) = psql_verbose($node, qq{SELECT enc('a'), "oops, enc('$s[7]')});
	no_secret_in_log('an unterminated quoted identifier', $off);

	my $s8 = new_secret();
	$off = log_offset();
	($rc, $out, $err) = psql_verbose($node, qq{SELECT enc('a'), 1 '$s8'});
	like($err, qr/42601/, 'a syntax error at a literal (42601)') or diag($err);
	no_secret_in_log('a syntax error quoting a literal', $off);
}

# Fourth review: a WARNING during COPY quotes the input line; a statement
# prepared while standard_conforming_strings was off
{
	$node->safe_psql('postgres', q{
CREATE TABLE cw (s text, e enc_bytea);
CREATE FUNCTION cw_warn() RETURNS trigger LANGUAGE plpgsql AS
$$BEGIN RAISE WARNING 'row seen'; RETURN NEW; END$$;
CREATE TRIGGER cw_warn BEFORE INSERT ON cw FOR EACH ROW EXECUTE FUNCTION cw_warn();
CREATE VIEW cw_v AS SELECT s, enc(s) AS e FROM cw;});
	my $s = new_secret();
	my $off = log_offset();
	psql_verbose($node, "COPY cw (s) FROM STDIN;\nalice $s words\n\\.\nSELECT count(*) FROM cw_v;");
	no_secret_in_log('a WARNING during COPY into a table with an enc_bytea column', $off);

	$s = new_secret();
	$off = log_offset();
	psql_verbose($node, "SET standard_conforming_strings = off;\n"
		  . "PREPARE psc AS SELECT enc('abc\\'$s more words ') IS NOT NULL;\n"
		  . "SET standard_conforming_strings = on;\nSET log_min_duration_statement = 0;\nEXECUTE psc;");
	no_secret_in_log('a statement prepared while standard_conforming_strings was off', $off);
}

# ---------------------------------------------------------------------------

no_secret_in_log('the whole log (' . scalar(@secrets) . ' secrets)', 0);
my $n_masked = () = slurp_file($node->logfile) =~ /$masked/g;
cmp_ok($n_masked, '>', 10, "the log has $n_masked masked constants");

$node->stop;
stop_kms($kms);

note sprintf('total %.1f s', time - $t_start);
done_testing();


# Per-KEK privileges and the audit trail.
#
# Privileges: enc() needs encrypt on the KEK, dec()/dec_text() need decrypt,
# rewrap() needs rewrap on the value's KEK and on the target KEK; denials are
# SQLSTATE 42501 'permission denied for KEK "k"' (the DETAIL names the
# privilege) and return no data, also when a superuser or another role has
# just put the key in the shared cache.  Grants to a group role reach its
# INHERIT members (a NOINHERIT member only after SET ROLE).  A revoke is
# effective for the next statement of a session that is already open, also
# inside its open transaction block.  Only superusers and members of
# envelope_admin may grant, revoke, create or rotate KEKs (42501 otherwise);
# unknown KEK 42704, bad privilege 22023; 'all' is the three privileges.
# kek_create, kek_rotate, kek_retire, grant and revoke are audited.  Grants
# survive pg_dump/pg_restore.
#
# Audit: every record is one "ENVELOPE AUDIT: {json}" LOG line with the
# documented fields in order; a statement gets one decrypt record per KEK
# version with the number of values it decrypted, also through a view, a
# SECURITY DEFINER function (user = the definer, session_user = the caller),
# an AFTER trigger and a parallel scan (workers' counts merged, workers >= 1);
# warm cache: cache_hits = values, kms_calls = 0; denied attempts give
# "denied" records; a failing statement gives outcome "error";
# envelope.audit = off stops decrypt records but not denied and management
# records; envelope.audit = value adds one record per value whose
# fingerprint is envelope.fingerprint(v) (parallel workers' records carry
# leader_pid); records are logged whatever client_min_messages is and never
# reach the client; only superusers may SET envelope.audit.
#
# Tamper evidence: test/audit_verify.py verifies the HMAC chain of the
# node's stderr log (one segment per server start), reports a deleted and an
# edited record at the right line, passes its --self-test, and verifies the
# chain in csvlog and jsonlog files written by the logging collector.
#
# Run with test/run-tap.  Needs ENVELOPE_ROOT (the repository, for the test
# KMS and the verifier), envelope installed, and Debian's /usr/bin/python3
# with python3-cryptography.

use strict;
use warnings;

use IPC::Run;
use JSON::PP;
use List::Util qw(all first);
use Time::HiRes qw(usleep time);

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use EnvelopeTAP qw(envelope_root start_kms kms_create_key envelope_conf stop_kms
  audit_log_records audit_record_keys app_name);

my $t_start = time;
my $nbig = 200_000;

my $verifier = envelope_root() . '/test/audit_verify.py';
-f $verifier or BAIL_OUT("audit verifier not found at $verifier");

my $tmp = PostgreSQL::Test::Utils::tempdir('privaudit');
my $timeout = $PostgreSQL::Test::Utils::timeout_default;
my $json = JSON::PP->new->utf8;

# ---------------------------------------------------------------------------
# The test KMS
# ---------------------------------------------------------------------------

my $kms = start_kms($tmp, '003_privileges_audit');
kms_create_key($kms, $_) for qw(k k2 k3);

# The audit HMAC key: 32 random bytes, mode 0600.
my $hmac_key = "$tmp/audit-hmac.key";
{
	open my $in, '<:raw', '/dev/urandom' or die "/dev/urandom: $!";
	my $n = read($in, my $bytes, 32);
	close $in;
	die "short read from /dev/urandom" unless defined $n && $n == 32;
	open my $out, '>:raw', $hmac_key or die "$hmac_key: $!";
	print $out $bytes;
	close $out or die "$hmac_key: $!";
	chmod(0600, $hmac_key) or die "chmod $hmac_key: $!";
}

# ---------------------------------------------------------------------------
# The node
# ---------------------------------------------------------------------------

my $node = PostgreSQL::Test::Cluster->new('main');
$node->init;
$node->append_conf(
	'postgresql.conf', envelope_conf($kms) . qq{envelope.default_kek = 'k'
envelope.audit_hmac_key_file = '$hmac_key'
# this test checks records per statement (summary records: 005_audit_summary.pl)
envelope.audit = statement
log_destination = 'stderr'
logging_collector = off
compute_query_id = on
max_connections = 20
max_worker_processes = 12
max_parallel_workers = 8
});
$node->start;

my $su = $node->safe_psql('postgres', 'SELECT current_user');

# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


# Runs SQL as $user with application_name $app (a new session); returns
# (exit code, stdout, stderr), errors with their SQLSTATE.  Statements are
# sent one by one; with on_error_stop => 0 psql goes on after an error.
sub psql_as
{
	my ($user, $app, $sql, %opt) = @_;
	my $db = $opt{db} // 'postgres';
	my ($out, $err) = ('', '');
	my $rc = $node->psql(
		$db, $sql,
		connstr => $node->connstr($db) . " user=$user application_name=$app",
		stdout => \$out,
		stderr => \$err,
		timeout => $timeout,
		on_error_stop => $opt{on_error_stop} // 1,
		extra_params => [ '-v', 'VERBOSITY=verbose' ]);
	return ($rc, $out, $err);
}

# Checks that $sql as $user fails with 42501 naming KEK $kek and privilege
# $priv, and returns no rows.
sub denied_ok
{
	my ($name, $user, $app, $sql, $kek, $priv) = @_;
	my ($rc, $out, $err) = psql_as($user, $app, $sql);
	isnt($rc, 0, "$name: fails");
	like($err, qr/ERROR:\s+42501: permission denied for KEK "\Q$kek\E"/,
		"$name: 42501 permission denied for KEK \"$kek\"") or diag($err);
	like($err, qr/DETAIL:.*\b\Q$priv\E\b/, "$name: the DETAIL names the $priv privilege")
	  or diag($err);
	is($out, '', "$name: no data returned");
	return $err;
}

# Checks that $sql as $user succeeds; returns its output.
sub allowed_ok
{
	my ($name, $user, $app, $sql) = @_;
	my ($rc, $out, $err) = psql_as($user, $app, $sql);
	is($rc, 0, $name) or diag($err);
	return $out;
}

sub log_offset { return -s $node->logfile; }

# Every audit record written to the stderr log (or $file) after $offset
# (EnvelopeTAP).
sub audit_records
{
	my ($offset, $file) = @_;
	return audit_log_records($file // $node->logfile, $offset);
}

# Records after $offset with the given field values; 'statement' => 1 keeps
# statement-level records (no fingerprint), 'value' => 1 value records.
sub records
{
	my ($offset, %f) = @_;
	my $stmt = delete $f{statement};
	my $val = delete $f{value};
	return grep {
		my $r = $_;
		(all { defined $r->{$_} && $r->{$_} eq $f{$_} } keys %f)
		  && (!$stmt || !exists $r->{fingerprint})
		  && (!$val || exists $r->{fingerprint})
	} audit_records($offset);
}

# Waits until at least $min records match (records of the step that just
# finished should already be there: a backend writes them before its client
# gets the statement's result; this only guards against slow writes).
sub wait_records
{
	my ($offset, $min, %f) = @_;
	my @r;
	my $deadline = time + 10;
	while (1)
	{
		@r = records($offset, %f);
		last if @r >= $min || time > $deadline;
		usleep(100_000);
	}
	return @r;
}

# The top-level keys of a record, in order (EnvelopeTAP).
sub record_keys { return audit_record_keys($_[0]); }

my @common_keys = qw(seq ts event user session_user db app client pid query_id kek kek_version);

# Checks the layout and the common fields of a record.
sub check_common
{
	my ($name, $r, %exp) = @_;
	my @keys = record_keys($r->{_raw});
	is_deeply([ @keys[ 0 .. $#common_keys ] ], \@common_keys,
		"$name: the first fields are " . join(', ', @common_keys))
	  or diag($r->{_raw});
	is($keys[-1], 'hmac', "$name: hmac is the last field");
	like($r->{hmac} // '', qr/^[0-9a-f]{64}$/, "$name: hmac is 64 lowercase hex digits");
	like($r->{seq} // '', qr/^[1-9][0-9]*$/, "$name: seq is a positive integer");
	like($r->{ts} // '', qr/\d{4}-\d\d-\d\d.\d\d:\d\d:\d\d/, "$name: ts is a timestamp");
	like($r->{_raw}, qr/"query_id": -?\d+[,}]/, "$name: query_id is a number");
	like($r->{pid} // '', qr/^\d+$/, "$name: pid is a number");
	for my $k (sort keys %exp)
	{
		is($r->{$k}, $exp{$k}, "$name: $k = " . ($exp{$k} // 'null'));
	}
	return;
}

# The one statement-level decrypt record of a step, checked.
sub one_decrypt_record
{
	my ($name, $offset, $app, %exp) = @_;
	my @r = wait_records($offset, 1, event => 'decrypt', app => $app, statement => 1);
	is(scalar(@r), 1, "$name: exactly one statement-level decrypt record")
	  or diag(join("\n", map { $_->{_raw} } @r));
	return $r[0] // {};
}

my @plain = map { "$_-" . join('', map { sprintf '%02x', int rand 256 } 1 .. 4) } qw(alpha bravo charlie);
my $plain_sorted = join("\n", @plain);
my $plain_re = join('|', map { quotemeta } @plain);

# ---------------------------------------------------------------------------
# Schema, roles, data
# ---------------------------------------------------------------------------

$node->safe_psql('postgres', 'CREATE EXTENSION envelope');
is($node->safe_psql('postgres', q{SELECT rolcanlogin FROM pg_roles WHERE rolname = 'envelope_admin'}),
	'f', 'CREATE EXTENSION created the NOLOGIN role envelope_admin');
is($node->safe_psql('postgres', 'SHOW envelope.audit'), 'statement', 'envelope.audit is statement (set in postgresql.conf)');

{
	my $off = log_offset();
	is($node->safe_psql('postgres', q{SELECT envelope.create_kek('k', 'vault', 'k')}),
		'1', 'KEK k registered at version 1');
	my @r = wait_records($off, 1, event => 'kek_create', kek => 'k');
	is(scalar(@r), 1, 'one kek_create record for k');
	check_common('kek_create record', $r[0] // {}, user => $su, session_user => $su,
		db => 'postgres', kek_version => 1);
}
{
	my @all = audit_records(0);
	ok(@all >= 2, 'the log has audit records');
	is($all[0]{event}, 'audit_start', 'the first record is audit_start');
	is($all[0]{seq}, 1, '... with seq 1');
	# audit_start is written by whichever process audits first; the fields
	# it has come in the documented order, hmac last.
	my @k = record_keys($all[0]{_raw} // '');
	my %pos;
	@pos{@common_keys} = (0 .. $#common_keys);
	my @known = grep { exists $pos{$_} } @k;
	is_deeply(\@known, [ sort { $pos{$a} <=> $pos{$b} } @known ],
		'audit_start: its fields in the documented order (' . join(', ', @k) . ')');
	is($k[-1], 'hmac', 'audit_start: hmac last');
	is_deeply([ map { $_->{seq} } @all ], [ 1 .. scalar(@all) ], 'seq counts up by one from 1');
}

my $t0 = time;
$node->safe_psql(
	'postgres', qq{
CREATE TABLE t (id int PRIMARY KEY, v enc_bytea);
INSERT INTO t VALUES (1, enc('$plain[0]')), (2, enc('$plain[1]')), (3, enc('$plain[2]'));
CREATE VIEW tv AS SELECT id, dec_text(v) AS p FROM t;
CREATE TABLE r (id int PRIMARY KEY, v enc_bytea);
INSERT INTO r VALUES (1, enc('$plain[0]')), (2, enc('$plain[1]'));
CREATE TABLE big (id int, v enc_bytea);
INSERT INTO big SELECT g, enc('b-' || g) FROM generate_series(1, $nbig) g;
CREATE TABLE big2 (id int, v enc_bytea);
INSERT INTO big2 SELECT g, enc('c-' || g) FROM generate_series(1, 1000) g;
VACUUM ANALYZE big;
VACUUM ANALYZE big2;
-- AFTER INSERT trigger that decrypts the new row.
CREATE TABLE t2 (id int, v enc_bytea);
CREATE TABLE t2log (id int, p text);
CREATE FUNCTION t2_trg() RETURNS trigger LANGUAGE plpgsql AS
\$\$BEGIN INSERT INTO t2log VALUES (NEW.id, convert_from("dec"(NEW.v), 'UTF8')); RETURN NULL; END\$\$;
CREATE TRIGGER t2_after AFTER INSERT ON t2 FOR EACH ROW EXECUTE FUNCTION t2_trg();

CREATE ROLE alice LOGIN;
CREATE ROLE bob LOGIN;
CREATE ROLE grp NOLOGIN;
GRANT grp TO bob;
CREATE ROLE carol LOGIN NOINHERIT;
GRANT grp TO carol;
CREATE ROLE maint LOGIN;
CREATE ROLE dave LOGIN;
CREATE ROLE admin1 LOGIN;
GRANT envelope_admin TO admin1;
CREATE ROLE owner1 NOLOGIN;
GRANT SELECT ON t TO alice, bob, carol, grp, owner1;
GRANT SELECT ON tv TO alice, bob;
GRANT SELECT, UPDATE ON r TO maint;
CREATE TABLE r2 (id int PRIMARY KEY, v enc_bytea);
INSERT INTO r2 VALUES (1, enc('$plain[2]'));
GRANT SELECT ON r2 TO maint;
GRANT SELECT ON big TO bob;

-- A SECURITY DEFINER function owned by a role with decrypt, callable by alice.
CREATE FUNCTION secret_of(i int) RETURNS text LANGUAGE sql STABLE SECURITY DEFINER
	SET search_path = public, pg_temp
	AS \$\$ SELECT dec_text(v) FROM public.t WHERE id = i \$\$;
ALTER FUNCTION secret_of(int) OWNER TO owner1;
REVOKE EXECUTE ON FUNCTION secret_of(int) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION secret_of(int) TO alice;
});
note sprintf('schema and %d + 1005 rows loaded in %.1f s', $nbig, time - $t0);

# ---------------------------------------------------------------------------
# A superuser decrypts (warming the shared cache); the record in detail
# ---------------------------------------------------------------------------

{
	my $app = app_name('su_cold');
	my $off = log_offset();
	my $out = allowed_ok('superuser: SELECT "dec"(v) FROM t', $su, $app,
		qq{SELECT pg_backend_pid();\nSELECT convert_from("dec"(v), 'UTF8') FROM t ORDER BY id;});
	my ($pid, @vals) = split /\n/, $out;
	is(join("\n", @vals), $plain_sorted, 'superuser: all three values decrypt');
	my $r = one_decrypt_record('superuser decrypt', $off, $app);
	check_common('superuser decrypt record', $r,
		event => 'decrypt', kek => 'k', kek_version => 1, values => 3,
		user => $su, session_user => $su, db => 'postgres', app => $app,
		pid => $pid, outcome => 'ok', workers => 0);
	ok(exists $r->{client}, 'superuser decrypt record: has client');
	my %keys = map { $_ => 1 } record_keys($r->{_raw} // '');
	ok((all { $keys{$_} } qw(values cache_hits kms_calls outcome workers)),
		'superuser decrypt record: has values, cache_hits, kms_calls, outcome, workers');
	ok(!exists $r->{fingerprint}, 'superuser decrypt record: no fingerprint (statement level)');
	cmp_ok($r->{cache_hits} // -1, '>=', 0, "cache_hits = " . ($r->{cache_hits} // 'undef') . ' >= 0');
	cmp_ok($r->{cache_hits} // 99, '<=', 3, '... and <= values');
	cmp_ok($r->{kms_calls} // -1, '>=', 0, "kms_calls = " . ($r->{kms_calls} // 'undef') . ' >= 0');
}
{
	my $app = app_name('su_warm');
	my $off = log_offset();
	allowed_ok('superuser: SELECT "dec"(v) FROM t again', $su, $app, q{SELECT "dec"(v) FROM t});
	my $r = one_decrypt_record('warm-cache decrypt', $off, $app);
	is($r->{values}, 3, 'warm-cache decrypt record: values = 3');
	is($r->{cache_hits}, 3, 'warm-cache decrypt record: cache_hits = 3');
	is($r->{kms_calls}, 0, 'warm-cache decrypt record: kms_calls = 0');
}

# ---------------------------------------------------------------------------
# Decrypt privilege
# ---------------------------------------------------------------------------

{
	my $app = app_name('alice_dec');
	my $off = log_offset();
	my $err = denied_ok('alice (no privileges, warm cache): SELECT "dec"(v) FROM t',
		'alice', $app, q{SELECT id, "dec"(v) FROM t}, 'k', 'decrypt');
	my @d = wait_records($off, 1, event => 'denied', app => $app);
	ok(@d >= 1, 'alice: a denied record');
	check_common('denied record', $d[0] // {}, event => 'denied', kek => 'k', user => 'alice',
		session_user => 'alice', privilege => 'decrypt', outcome => 'denied', app => $app);
	($err) = (psql_as('alice', app_name('alice_dec_text'), q{SELECT dec_text(v) FROM t}))[2];
	like($err, qr/42501: permission denied for KEK "k"/, 'alice: dec_text() denied too');
	unlike($err, qr/$plain_re/, '... and no plaintext in the error');
	($err) = (psql_as('alice', app_name('alice_view'), q{SELECT p FROM tv}))[2];
	like($err, qr/42501: permission denied for KEK "k"/, 'alice: decrypting through the view denied');
	unlike(slurp_file($node->logfile, $off), qr/$plain_re/, 'no plaintext in the server log');
}

{
	my $off = log_offset();
	allowed_ok('superuser: grant decrypt on k to grp', $su, app_name('grant_grp'),
		q{SELECT envelope.grant('k', 'grp', 'decrypt')});
	is( $node->safe_psql(
			'postgres',
			q{SELECT kek, grantee::text, privilege, granted_by::text, granted_at IS NOT NULL
			    FROM envelope.kek_privileges WHERE grantee::text = 'grp'}),
		"k|grp|decrypt|$su|t",
		'kek_privileges: (k, grp, decrypt, granted by the superuser, granted_at set)');
	my @g = wait_records($off, 1, event => 'grant', kek => 'k');
	is(scalar(@g), 1, 'one grant record');
	is($g[0]{user}, $su, 'grant record: user is the granting superuser') if @g;
}

is(allowed_ok('bob (member of grp): dec_text works', 'bob', app_name('bob_dec'),
		q{SELECT dec_text(v) FROM t ORDER BY id}),
	$plain_sorted, 'bob: the plaintexts, through grp\'s grant');
denied_ok('alice after grp\'s grant (bob warmed the cache)', 'alice', app_name('alice_dec2'),
	q{SELECT dec_text(v) FROM t}, 'k', 'decrypt');
denied_ok('carol (NOINHERIT member of grp)', 'carol', app_name('carol_dec'),
	q{SELECT dec_text(v) FROM t}, 'k', 'decrypt');
is(allowed_ok('carol after SET ROLE grp', 'carol', app_name('carol_setrole'),
		qq{SET ROLE grp;\nSELECT dec_text(v) FROM t ORDER BY id;}),
	$plain_sorted, 'carol: decrypts after SET ROLE grp');

# ---------------------------------------------------------------------------
# Management: envelope_admin, errors
# ---------------------------------------------------------------------------

for my $c (
	[ 'grant', q{SELECT envelope.grant('k', 'bob', 'decrypt')} ],
	[ 'revoke', q{SELECT envelope.revoke('k', 'grp', 'decrypt')} ],
	[ 'create_kek', q{SELECT envelope.create_kek('k3', 'vault', 'k3')} ],
	[ 'rotate_kek', q{SELECT envelope.rotate_kek('k')} ])
{
	my ($what, $sql) = @$c;
	my ($rc, $out, $err) = psql_as('bob', app_name("bob_$what"), $sql);
	isnt($rc, 0, "bob (not envelope_admin): $what fails");
	like($err, qr/ERROR:\s+42501:/, "... with 42501") or diag($err);
}
is($node->safe_psql('postgres', q{SELECT count(*) FROM envelope.keks WHERE name = 'k3'}),
	'0', 'k3 was not registered');
is($node->safe_psql('postgres', q{SELECT latest_version FROM envelope.keks WHERE name = 'k'}),
	'1', 'k was not rotated');
{
	my ($rc, $out, $err) = psql_as('alice', app_name('alice_set_audit'), q{SET envelope.audit = off});
	isnt($rc, 0, 'alice: SET envelope.audit = off fails');
	like($err, qr/42501/, '... with 42501') or diag($err);
}

{
	my $off = log_offset();
	is(allowed_ok('admin1 (member of envelope_admin): create_kek k2', 'admin1', app_name('admin_create'),
			q{SELECT envelope.create_kek('k2', 'vault', 'k2')}),
		'1', 'admin1: k2 registered at version 1');
	my @c = wait_records($off, 1, event => 'kek_create', kek => 'k2');
	is(scalar(@c), 1, 'kek_create record for k2');
	is($c[0]{user}, 'admin1', 'kek_create record: user admin1') if @c;
	allowed_ok('admin1: grant encrypt on k to alice', 'admin1', app_name('admin_grant'),
		q{SELECT envelope.grant('k', 'alice', 'encrypt')});
	my @g = wait_records($off, 1, event => 'grant', user => 'admin1');
	is(scalar(@g), 1, 'grant record with user admin1');
}

for my $c (
	[ 'grant: unknown KEK', q{SELECT envelope.grant('nosuch', 'bob', 'decrypt')}, '42704' ],
	[ 'grant: bad privilege', q{SELECT envelope.grant('k', 'bob', 'read')}, '22023' ],
	[ 'revoke: unknown KEK', q{SELECT envelope.revoke('nosuch', 'bob', 'decrypt')}, '42704' ],
	[ 'revoke: bad privilege', q{SELECT envelope.revoke('k', 'bob', 'read')}, '22023' ])
{
	my ($what, $sql, $state) = @$c;
	my ($rc, $out, $err) = psql_as($su, app_name('errors'), $sql);
	isnt($rc, 0, "$what fails");
	like($err, qr/ERROR:\s+$state:/, "... with $state") or diag($err);
}

# 'all' is the three privileges.
allowed_ok('grant all on k to dave', $su, app_name('grant_all'), q{SELECT envelope.grant('k', 'dave', 'all')});
is( $node->safe_psql('postgres',
		q{SELECT string_agg(privilege, ',' ORDER BY privilege) FROM envelope.kek_privileges WHERE grantee::text = 'dave'}),
	'decrypt,encrypt,rewrap', 'grant all: dave has decrypt, encrypt, rewrap');
allowed_ok('revoke all on k from dave', $su, app_name('revoke_all'), q{SELECT envelope.revoke('k', 'dave', 'all')});
is( $node->safe_psql('postgres', q{SELECT count(*) FROM envelope.kek_privileges WHERE grantee::text = 'dave'}),
	'0', 'revoke all: dave has nothing left');

# ---------------------------------------------------------------------------
# Encrypt and rewrap privileges
# ---------------------------------------------------------------------------

denied_ok('bob: enc() without encrypt', 'bob', app_name('bob_enc'), q{SELECT enc('x')}, 'k', 'encrypt');
{
	my $app = app_name('alice_enc');
	my $off = log_offset();
	is(allowed_ok('alice (encrypt granted by admin1): enc() works', 'alice', $app,
			q{SELECT envelope.kek_of(enc('x'))}),
		'k', 'alice: enc() gives a value on k');
	my @e = wait_records($off, 1, event => 'encrypt', app => $app, statement => 1);
	is(scalar(@e), 1, 'one encrypt record for alice\'s statement');
	is($e[0]{user}, 'alice', 'encrypt record: user alice') if @e;
}
denied_ok('alice: decrypting her own new value still needs decrypt', 'alice', app_name('alice_own'),
	q{SELECT dec_text(enc('x'))}, 'k', 'decrypt');

allowed_ok('grant rewrap on k to maint', $su, app_name('grant_maint'), q{SELECT envelope.grant('k', 'maint', 'rewrap')});
{
	my $app = app_name('maint_rewrap');
	my $off = log_offset();
	is(allowed_ok('maint (rewrap only): rewrap() works', 'maint', $app,
			q{SELECT envelope.kek_version_of(rewrap(v)) FROM r ORDER BY id}),
		"1\n1", 'maint: rewrap() of both values');
	my @rw = wait_records($off, 1, event => 'rewrap', app => $app, statement => 1);
	is(scalar(@rw), 1, 'one rewrap record for maint\'s statement');
	is($rw[0]{user}, 'maint', 'rewrap record: user maint') if @rw;
}
denied_ok('maint: dec() without decrypt', 'maint', app_name('maint_dec'), q{SELECT "dec"(v) FROM r}, 'k', 'decrypt');
# Moving a value to another KEK hands it to that KEK's readers: it needs
# decrypt on the value's KEK as well as rewrap on both.
denied_ok('maint: moving a value to k2 needs decrypt on its KEK k', 'maint', app_name('maint_move_nodec'),
	q{SELECT rewrap(v, 'k2') FROM r}, 'k', 'decrypt');
allowed_ok('grant decrypt on k to maint (to move values)', $su, app_name('grant_maint_dec'),
	q{SELECT envelope.grant('k', 'maint', 'decrypt')});
denied_ok('maint: rewrap() to k2 without rewrap on k2', 'maint', app_name('maint_k2'),
	q{SELECT rewrap(v, 'k2') FROM r}, 'k2', 'rewrap');
allowed_ok('grant rewrap on k2 to maint', $su, app_name('grant_maint_k2'), q{SELECT envelope.grant('k2', 'maint', 'rewrap')});
is(allowed_ok('maint: UPDATE r SET v = rewrap(v, \'k2\')', 'maint', app_name('maint_to_k2'),
		q{UPDATE r SET v = rewrap(v, 'k2') RETURNING envelope.kek_of(v)}),
	"k2\nk2", 'maint: both values moved to k2');
allowed_ok('revoke rewrap on k from maint', $su, app_name('revoke_maint'), q{SELECT envelope.revoke('k', 'maint', 'rewrap')});
allowed_ok('revoke decrypt on k from maint', $su, app_name('revoke_maint_dec'), q{SELECT envelope.revoke('k', 'maint', 'decrypt')});
denied_ok('maint: rewrap() of a k2 value back to k without decrypt on k2', 'maint',
	app_name('maint_back'), q{SELECT rewrap(v, 'k') FROM r}, 'k2', 'decrypt');
denied_ok('maint: rewrap() of a k value to k2 without rewrap on the value\'s KEK k', 'maint',
	app_name('maint_src'), q{SELECT rewrap(v, 'k2') FROM r2}, 'k', 'rewrap');

# Rotation by an envelope_admin member, and retirement, audited.
{
	my $off = log_offset();
	is(allowed_ok('admin1: rotate_kek k2', 'admin1', app_name('admin_rotate'), q{SELECT envelope.rotate_kek('k2')}),
		'2', 'admin1: k2 rotated to version 2');
	my @r = wait_records($off, 1, event => 'kek_rotate', kek => 'k2');
	is(scalar(@r), 1, 'one kek_rotate record for k2');
	is($r[0]{kek_version}, 2, 'kek_rotate record: kek_version 2') if @r;
	is($r[0]{user}, 'admin1', 'kek_rotate record: user admin1') if @r;
	allowed_ok('superuser: rewrap r to k2 version 2', $su, app_name('su_rewrap'), q{UPDATE r SET v = rewrap(v)});
	$off = log_offset();
	# (As the superuser: retire_kek_version counts the values in every
	# table, which needs SELECT on all of them.)
	is(allowed_ok('superuser: retire_kek_version k2 1', $su, app_name('su_retire'),
			q{SELECT envelope.retire_kek_version('k2', 1)}),
		'2', 'version 1 of k2 retired');
	@r = wait_records($off, 1, event => 'kek_retire', kek => 'k2');
	is(scalar(@r), 1, 'one kek_retire record for k2');
	is($r[0]{user}, $su, 'kek_retire record: user is the superuser') if @r;
}
is($node->safe_psql('postgres', q{SELECT dec_text(v) FROM r ORDER BY id}),
	"$plain[0]\n$plain[1]", 'the rewrapped values still decrypt (superuser)');

# ---------------------------------------------------------------------------
# A schema named "envelope" in a database without the extension is not
# trusted: DROP ROLE and DROP OWNED BY neither crash on its fake kek_grant
# nor run its triggers as a superuser.
# ---------------------------------------------------------------------------

{
	$node->safe_psql('postgres', q{
CREATE ROLE fake_owner LOGIN;
CREATE ROLE fake_grp;
GRANT fake_grp TO fake_owner;
CREATE DATABASE fakedb OWNER fake_owner;});
	my ($rc, $out, $err) = ('', '', '');
	$rc = $node->psql('fakedb', q{
CREATE SCHEMA envelope;
CREATE TABLE envelope.kek_grant (kek int, grantee int, privilege int);
INSERT INTO envelope.kek_grant VALUES (1, 2, 3);
DROP ROLE IF EXISTS no_such_role_here;},
		connstr => $node->connstr('fakedb') . ' user=fake_owner', stdout => \$out, stderr => \$err);
	like($err, qr/permission denied to drop role/,
		'fake envelope.kek_grant with integer columns: DROP ROLE reaches PostgreSQL\'s own check') or diag($err);
	is($node->safe_psql('postgres', 'SELECT 1'), '1', '... and the server is still up');

	$rc = $node->psql('fakedb', q{
DROP TABLE envelope.kek_grant;
CREATE TABLE envelope.kek_grant (kek text, grantee oid, privilege text);
INSERT INTO envelope.kek_grant VALUES ('x', 'fake_grp'::regrole, 'decrypt');
CREATE FUNCTION public.escalate() RETURNS trigger LANGUAGE plpgsql AS
$$BEGIN EXECUTE 'ALTER ROLE fake_owner SUPERUSER'; RETURN OLD; END$$;
CREATE TRIGGER t BEFORE DELETE ON envelope.kek_grant FOR EACH ROW EXECUTE FUNCTION public.escalate();
DROP OWNED BY fake_grp;},
		connstr => $node->connstr('fakedb') . ' user=fake_owner', stdout => \$out, stderr => \$err);
	is($node->safe_psql('postgres', q{SELECT rolsuper FROM pg_roles WHERE rolname = 'fake_owner'}),
		'f', 'DROP OWNED BY in a database with a fake envelope schema does not make anyone superuser');
	$node->safe_psql('postgres', q{DROP DATABASE fakedb; DROP ROLE fake_owner; DROP ROLE fake_grp;});
}

# ---------------------------------------------------------------------------
# A revoke reaches a session that is already open
# ---------------------------------------------------------------------------

{
	my $bs = $node->background_psql(
		'postgres',
		on_error_stop => 0,
		extra_params => [ '-U', 'bob', '-v', 'VERBOSITY=verbose' ]);
	$bs->set_query_timer_restart();
	# One statement in the open session; returns (stdout, stderr).
	my $q = sub {
		my ($sql) = @_;
		$bs->{stderr} = '';
		my $out = $bs->query($sql);
		my $err = $bs->{stderr};
		$bs->{stderr} = '';
		return ($out, $err);
	};
	my $dec1 = q{SELECT dec_text(v) FROM t WHERE id = 1};

	is(($q->('SELECT current_user'))[0], 'bob', 'open session runs as bob');
	my ($out, $err) = $q->($dec1);
	is($out, $plain[0], 'open session: bob decrypts') or diag($err);

	allowed_ok('admin1 revokes decrypt on k from grp', 'admin1', app_name('revoke_grp'),
		q{SELECT envelope.revoke('k', 'grp', 'decrypt')});
	($out, $err) = $q->($dec1);
	like($err, qr/ERROR:\s+42501: permission denied for KEK "k"/,
		'open session: the next statement after the revoke fails with 42501');
	is($out, '', '... returning nothing');

	allowed_ok('admin1 grants it again', 'admin1', app_name('regrant_grp'),
		q{SELECT envelope.grant('k', 'grp', 'decrypt')});
	($out, $err) = $q->($dec1);
	is($out, $plain[0], 'open session: decrypts again after the new grant') or diag($err);

	($out, $err) = $q->('BEGIN');
	is(($q->('SHOW transaction_isolation'))[0], 'read committed', 'open session: in a READ COMMITTED transaction block');
	($out, $err) = $q->($dec1);
	is($out, $plain[0], 'open transaction: bob decrypts') or diag($err);
	allowed_ok('admin1 revokes while bob\'s transaction is open', 'admin1', app_name('revoke_grp_tx'),
		q{SELECT envelope.revoke('k', 'grp', 'decrypt')});
	($out, $err) = $q->($dec1);
	like($err, qr/ERROR:\s+42501: permission denied for KEK "k"/,
		'open transaction: the next statement after the committed revoke fails with 42501');
	is($out, '', '... returning nothing');
	$q->('ROLLBACK');

	# The same in a REPEATABLE READ transaction whose statements run in
	# parallel workers: neither the workers nor the leader may keep using a
	# copy of the grants read with the transaction's old snapshot.
	allowed_ok('decrypt on k granted to grp again', $su, app_name('regrant_grp_rr'),
		q{SELECT envelope.grant('k', 'grp', 'decrypt')});
	$q->($_) for (
		'SET parallel_setup_cost = 0', 'SET parallel_tuple_cost = 0',
		'SET min_parallel_table_scan_size = 0', 'SET max_parallel_workers_per_gather = 2',
		'SET parallel_leader_participation = off');
	$q->('BEGIN ISOLATION LEVEL REPEATABLE READ');
	my $pscan = q{SELECT count(dec_text(v)) FROM big};
	($out, $err) = $q->($pscan);
	is($out, $nbig, 'REPEATABLE READ: bob decrypts in a parallel scan') or diag($err);
	allowed_ok('admin1 revokes while bob\'s REPEATABLE READ transaction is open', 'admin1',
		app_name('revoke_grp_rr'), q{SELECT envelope.revoke('k', 'grp', 'decrypt')});
	($out, $err) = $q->($pscan);
	like($err, qr/ERROR:\s+42501: permission denied for KEK "k"/,
		'REPEATABLE READ: the next parallel scan after the committed revoke fails with 42501');
	is($out, '', '... returning nothing');
	$q->('ROLLBACK');
	$q->('RESET parallel_leader_participation');
	$bs->quit;

	allowed_ok('decrypt on k granted to grp again', $su, app_name('regrant_grp2'),
		q{SELECT envelope.grant('k', 'grp', 'decrypt')});
}

# ---------------------------------------------------------------------------
# Statement records through a view, a SECURITY DEFINER function, a trigger
# and a parallel scan
# ---------------------------------------------------------------------------

{
	my $app = app_name('view');
	my $off = log_offset();
	is(allowed_ok('bob: SELECT p FROM tv (view)', 'bob', $app, q{SELECT p FROM tv ORDER BY id}),
		$plain_sorted, 'bob: the view decrypts');
	my $r = one_decrypt_record('view', $off, $app);
	is($r->{values}, 3, 'view: values = 3');
	is($r->{user}, 'bob', 'view: user bob');
}
allowed_ok('grant decrypt on k to owner1', $su, app_name('grant_owner1'),
	q{SELECT envelope.grant('k', 'owner1', 'decrypt')});
{
	my $app = app_name('definer');
	my $off = log_offset();
	is(allowed_ok('alice: SECURITY DEFINER function owned by owner1', 'alice', $app, q{SELECT secret_of(2)}),
		$plain[1], 'alice: the definer (with decrypt) decrypts for her');
	my $r = one_decrypt_record('SECURITY DEFINER', $off, $app);
	is($r->{user}, 'owner1', 'SECURITY DEFINER record: user = the owner');
	is($r->{session_user}, 'alice', 'SECURITY DEFINER record: session_user = the caller');
	is($r->{values}, 1, 'SECURITY DEFINER record: values = 1');
	is($r->{outcome}, 'ok', 'SECURITY DEFINER record: outcome ok');
	is(scalar(records($off, event => 'denied', app => $app)), 0, 'no denied record');
}
{
	my $app = app_name('trigger');
	my $off = log_offset();
	allowed_ok('INSERT into t2 (AFTER INSERT trigger decrypts NEW.v)', $su, $app,
		qq{INSERT INTO t2 VALUES (1, enc('$plain[0]')), (2, enc('$plain[1]'))});
	is($node->safe_psql('postgres', 'SELECT p FROM t2log ORDER BY id'), "$plain[0]\n$plain[1]",
		'the trigger decrypted both rows');
	my $r = one_decrypt_record('trigger', $off, $app);
	is($r->{values}, 2, 'trigger: values = 2 (the decrypts in the trigger are counted)');
	is($r->{outcome}, 'ok', 'trigger: outcome ok');
	is(scalar(records($off, event => 'encrypt', app => $app, statement => 1)), 1,
		'trigger statement: one encrypt record too');
}

my $parallel_set = q{
SET parallel_setup_cost = 0;
SET parallel_tuple_cost = 0;
SET min_parallel_table_scan_size = 0;
SET max_parallel_workers_per_gather = 2;
};
{
	my $app = app_name('parallel');
	my $off = log_offset();
	my $out = allowed_ok('parallel count("dec"(v)) over big', $su, $app,
		$parallel_set . qq{EXPLAIN (COSTS OFF) SELECT count("dec"(v)) FROM big;\nSELECT count("dec"(v)) FROM big;});
	like($out, qr/Workers Planned: [1-9]/, 'EXPLAIN shows a parallel plan (Workers Planned)') or diag($out);
	like($out, qr/\n$nbig$/, "count = $nbig");
	my $r = one_decrypt_record('parallel scan', $off, $app);
	is($r->{values}, $nbig, "parallel scan: values = $nbig (workers' counts merged)");
	cmp_ok($r->{workers} // 0, '>=', 1, 'parallel scan: workers = ' . ($r->{workers} // 'undef') . ' >= 1');
	is($r->{outcome}, 'ok', 'parallel scan: outcome ok');
}

# A ROLLBACK inside DO must not upset the tracking of statements: the
# session's next statements (parallel, decrypted by workers only) are still
# recorded once each, with all their values, user and database.
{
	my $app = app_name('rollback_in_do');
	my $off = log_offset();
	allowed_ok('DO $$BEGIN ROLLBACK; END$$, then two parallel scans', $su, $app,
		qq{SET parallel_leader_participation = off;\n$parallel_set}
		  . qq{DO \$\$BEGIN ROLLBACK; END\$\$;\nSELECT count("dec"(v)) FROM big;\nSELECT count("dec"(v)) FROM big;});
	my @r = wait_records($off, 2, event => 'decrypt', app => $app, statement => 1);
	is(scalar(@r), 2, 'after ROLLBACK in DO: one record per scan');
	for my $r (@r)
	{
		is($r->{values}, $nbig, "after ROLLBACK in DO: values = $nbig");
		cmp_ok($r->{workers} // 0, '>=', 1, 'after ROLLBACK in DO: workers >= 1');
		is($r->{session_user}, $su, 'after ROLLBACK in DO: session_user set');
		is($r->{db}, 'postgres', 'after ROLLBACK in DO: db set');
	}
}

# ---------------------------------------------------------------------------
# Failing statements, audit off, value level, client_min_messages
# ---------------------------------------------------------------------------

{
	my $app = app_name('fail');
	my $off = log_offset();
	my ($rc, $out, $err) = psql_as($su, $app, q{SELECT "dec"(v), 1 / (id - 2) FROM t});
	isnt($rc, 0, 'a statement that fails after decrypting fails');
	like($err, qr/22012/, '... with division by zero (22012)') or diag($err);
	my $r = one_decrypt_record('failing statement', $off, $app);
	is($r->{outcome}, 'error', 'failing statement: outcome error');
	cmp_ok($r->{values} // 0, '>=', 1, 'failing statement: values >= 1');
}
{
	my $app = app_name('audit_off');
	my $off = log_offset();
	my ($rc, $out, $err) = psql_as(
		$su, $app, qq{SET envelope.audit = off;
SELECT "dec"(v) FROM t;
INSERT INTO t2 VALUES (3, enc('x'));
SELECT envelope.grant('k', 'dave', 'encrypt');
SELECT envelope.revoke('k', 'dave', 'encrypt');
SET ROLE alice;
SELECT "dec"(v) FROM t;
}, on_error_stop => 0);
	like($err, qr/42501: permission denied for KEK "k"/, 'audit off: the SET ROLE alice decrypt is denied');
	my @r = wait_records($off, 1, event => 'denied', app => $app);
	is(scalar(@r), 1, 'audit off: the denied record is still written');
	is($r[0]{user}, 'alice', 'audit off: denied record user alice (after SET ROLE)') if @r;
	is($r[0]{session_user}, $su, 'audit off: denied record session_user is the superuser') if @r;
	ok(scalar(records($off, event => 'grant', app => $app)) == 1
		  && scalar(records($off, event => 'revoke', app => $app)) == 1,
		'audit off: grant and revoke records are still written');
	is(scalar(grep { $_->{event} =~ /^(decrypt|encrypt|rewrap)$/ } records($off, app => $app)),
		0, 'audit off: no decrypt, encrypt or rewrap records');
}
{
	my $app = app_name('audit_value');
	my $off = log_offset();
	allowed_ok('envelope.audit = value: SELECT "dec"(v) FROM t', $su, $app,
		qq{SET envelope.audit = value;\nSELECT "dec"(v) FROM t;});
	my @v = wait_records($off, 3, event => 'decrypt', app => $app, value => 1);
	is(scalar(@v), 3, 'value level: three value records');
	is_deeply([ sort map { $_->{fingerprint} } @v ],
		[ split /\n/, $node->safe_psql('postgres', 'SELECT envelope.fingerprint(v) FROM t ORDER BY 1') ],
		'value level: their fingerprints are envelope.fingerprint(v) of the three rows');
	ok((all { ($_->{fingerprint} // '') =~ /^[0-9a-f]{32}$/ } @v), 'value level: fingerprints are 32 hex digits');
	ok((all { ($_->{values} // 0) == 1 } @v), 'value level: each value record has values = 1');
	ok((all { !exists $_->{workers} } @v), 'value level: value records have no workers field');
	ok((all { ($_->{kek} // '') eq 'k' && ($_->{kek_version} // 0) == 1 } @v), 'value level: kek k version 1');
	check_common('value record', $v[0] // {}, user => $su, app => $app);
	my $r = one_decrypt_record('value level', $off, $app);
	is($r->{values}, 3, 'value level: plus the statement record with values = 3');
}
{
	my $app = app_name('value_parallel');
	my $off = log_offset();
	my $out = allowed_ok('envelope.audit = value with a parallel scan done by workers only', $su, $app,
		qq{SET envelope.audit = value;\nSET parallel_leader_participation = off;\n$parallel_set
EXPLAIN (COSTS OFF) SELECT count("dec"(v)) FROM big2;
SELECT pg_backend_pid();
SELECT count("dec"(v)) FROM big2;});
	like($out, qr/Workers Planned: [1-9]/, 'EXPLAIN shows a parallel plan for big2') or diag($out);
	my ($leader) = $out =~ /^(\d+)\n1000$/m;
	ok(defined $leader, 'leader pid and count 1000') or diag($out);
	my @v = wait_records($off, 1000, event => 'decrypt', app => $app, value => 1);
	is(scalar(@v), 1000, 'value level, parallel: 1000 value records');
	ok((all { defined $_->{leader_pid} && defined $leader && $_->{leader_pid} == $leader } @v),
		'value level, parallel: every value record has leader_pid = the leader');
	ok((all { defined $leader && $_->{pid} != $leader } @v),
		'value level, parallel: ... and its own (worker) pid');
	my $r = one_decrypt_record('value level, parallel', $off, $app);
	is($r->{values}, 1000, 'value level, parallel: statement record values = 1000');
	cmp_ok($r->{workers} // 0, '>=', 1, 'value level, parallel: statement record workers >= 1');
}
for my $level (qw(error log))
{
	my $app = app_name("cmm_$level");
	my $off = log_offset();
	my ($rc, $out, $err) = psql_as($su, $app,
		qq{SET client_min_messages = $level;\nSELECT "dec"(v) FROM t;});
	is($rc, 0, "client_min_messages = $level: decrypt works") or diag($err);
	unlike($err, qr/ENVELOPE AUDIT/, "client_min_messages = $level: no audit record reaches the client");
	my $r = one_decrypt_record("client_min_messages = $level", $off, $app);
	is($r->{values}, 3, "client_min_messages = $level: the record is in the server log");
}

# ---------------------------------------------------------------------------
# The chain: verifier on the stderr log
# ---------------------------------------------------------------------------

# Runs the verifier; returns (exit code, stdout + stderr).
sub verify
{
	my (@args) = @_;
	my ($out, $err) = ('', '');
	IPC::Run::run([ '/usr/bin/python3', $verifier, @args ], '<', '/dev/null', '>', \$out, '2>', \$err,
		IPC::Run::timeout($timeout));
	return ($? >> 8, $out . $err);
}

{
	my ($rc, $out) = verify('--self-test');
	is($rc, 0, 'audit_verify.py --self-test passes') or diag($out);
}

# Audit lines of a log file: [line number, seq].
sub audit_lines
{
	my ($file) = @_;
	my @lines = split /\n/, slurp_file($file), -1;
	my @found;
	for my $i (0 .. $#lines)
	{
		push @found, [ $i + 1, $1 ] if $lines[$i] =~ /\bLOG:  ENVELOPE AUDIT: \{"seq": (\d+)/;
	}
	return (\@lines, \@found);
}

{
	my $n = scalar(audit_records(0));
	my ($rc, $out) = verify('--key-file', $hmac_key, $node->logfile);
	is($rc, 0, 'verifier: the stderr log verifies') or diag($out);
	like($out, qr/^ok: $n records in 1 segment\(s\)/, "verifier: ok: $n records in 1 segment");

	my ($lines, $found) = audit_lines($node->logfile);
	my $mid = int(@$found / 2);
	my ($del_line, $del_seq) = @{ $found->[$mid] };
	my ($next_line, $next_seq) = @{ $found->[ $mid + 1 ] };
	my @copy = @$lines;
	splice(@copy, $del_line - 1, 1);
	my $tampered = "$tmp/deleted.log";
	PostgreSQL::Test::Utils::append_to_file($tampered, join("\n", @copy));
	($rc, $out) = verify('--key-file', $hmac_key, $tampered);
	is($rc, 1, "verifier: a log with record seq $del_seq deleted fails");
	my $want_line = $next_line - 1;
	like($out, qr/line $want_line, seq $next_seq:/,
		"verifier: ... reported at the next record (line $want_line, seq $next_seq)") or diag($out);

	# An edited field.
	my $edit = (first { $lines->[ $_->[0] - 1 ] =~ /"values": 3,/ } @$found) // $found->[-1];
	@copy = @$lines;
	$copy[ $edit->[0] - 1 ] =~ s/"values": 3,/"values": 2,/;
	my $edited = "$tmp/edited.log";
	PostgreSQL::Test::Utils::append_to_file($edited, join("\n", @copy));
	($rc, $out) = verify('--key-file', $hmac_key, $edited);
	is($rc, 1, "verifier: a log with an edited field (seq $edit->[1]) fails");
	like($out, qr/line $edit->[0], seq $edit->[1]: bad hmac/, "verifier: ... reported at that record (line $edit->[0])")
	  or diag($out);
}

# A restart begins a new segment with audit_start, seq 1.
{
	$node->restart;
	my $off = log_offset();
	my $app = app_name('after_restart');
	allowed_ok('decrypt after a restart', $su, $app, q{SELECT "dec"(v) FROM t});
	one_decrypt_record('after restart', $off, $app);
	my @r = audit_records($off);
	is($r[0]{event}, 'audit_start', 'after the restart the first record is audit_start');
	is($r[0]{seq}, 1, '... with seq 1');
	my ($rc, $out) = verify('--key-file', $hmac_key, $node->logfile);
	is($rc, 0, 'verifier: the stderr log verifies across the restart') or diag($out);
	like($out, qr/ in 2 segment\(s\)/, 'verifier: 2 segments');
}

# ---------------------------------------------------------------------------
# csvlog and jsonlog through the logging collector
# ---------------------------------------------------------------------------

{
	$node->append_conf(
		'postgresql.conf', q{
logging_collector = on
log_destination = 'csvlog,jsonlog'
log_directory = 'log'
log_filename = 'audit.log'
log_rotation_age = 0
log_rotation_size = 0
});
	$node->restart;
	my $csv = $node->data_dir . '/log/audit.csv';
	my $jsonf = $node->data_dir . '/log/audit.json';
	my $app = app_name('csvjson');
	allowed_ok('decrypt with csvlog and jsonlog', $su, $app, q{SELECT "dec"(v) FROM t});

	# Finds the app's decrypt record in each file (the collector writes
	# asynchronously).
	my ($from_csv, $from_json);
	my $deadline = time + $timeout;
	while ((!$from_csv || !$from_json) && time < $deadline)
	{
		if (-f $csv && !$from_csv)
		{
			for my $m (slurp_file($csv) =~ /"ENVELOPE AUDIT: ((?:[^"]|"")*)"/g)
			{
				(my $rec = $m) =~ s/""/"/g;
				my $r = eval { $json->decode($rec) } or next;
				$from_csv = $r if ($r->{app} // '') eq $app && $r->{event} eq 'decrypt';
			}
		}
		if (-f $jsonf && !$from_json)
		{
			for my $l (split /\n/, slurp_file($jsonf))
			{
				my $o = eval { $json->decode($l) } or next;
				next unless ($o->{message} // '') =~ /^ENVELOPE AUDIT: (\{.*)$/s;
				my $r = eval { JSON::PP->new->decode($1) } or next;
				$from_json = $r if ($r->{app} // '') eq $app && $r->{event} eq 'decrypt';
			}
		}
		usleep(100_000) if !$from_csv || !$from_json;
	}
	ok($from_csv, 'csvlog: the decrypt record is in audit.csv');
	is($from_csv->{values}, 3, 'csvlog: values = 3') if $from_csv;
	ok($from_json, 'jsonlog: the decrypt record is in audit.json');
	is($from_json->{values}, 3, 'jsonlog: values = 3') if $from_json;

	for my $c ([ $csv, 'csv' ], [ $jsonf, 'json' ])
	{
		my ($file, $fmt) = @$c;
		next unless -f $file;
		my ($rc, $out) = verify('--key-file', $hmac_key, $file);
		is($rc, 0, "verifier: $fmt log verifies (format detected)") or diag($out);
		like($out, qr/^ok: \d+ records in 1 segment\(s\)/, "verifier: $fmt: one segment");
		($rc, $out) = verify('--key-file', $hmac_key, '--format', $fmt, $file);
		is($rc, 0, "verifier: $fmt log verifies with --format $fmt") or diag($out);
	}
}

# ---------------------------------------------------------------------------
# Grants survive pg_dump / pg_restore
# ---------------------------------------------------------------------------

{
	my $dump = "$tmp/db.dump";
	my ($out, $err) = ('', '');
	my $ok = IPC::Run::run(
		[ 'pg_dump', '-Fc', '-T', 'big', '-T', 'big2', '-f', $dump, '-d', $node->connstr('postgres') ],
		'<', '/dev/null', '>', \$out, '2>', \$err, IPC::Run::timeout($timeout));
	ok($ok, 'pg_dump -Fc') or diag($err);
	$node->safe_psql('postgres', 'CREATE DATABASE restored');
	($out, $err) = ('', '');
	$ok = IPC::Run::run([ 'pg_restore', '-d', $node->connstr('restored'), $dump ],
		'<', '/dev/null', '>', \$out, '2>', \$err, IPC::Run::timeout($timeout));
	ok($ok, 'pg_restore into a new database') or diag($err);

	my $priv_sql = q{SELECT kek, grantee::text, privilege, granted_by::text, granted_at
	                   FROM envelope.kek_privileges ORDER BY 1, 2, 3};
	my $before = $node->safe_psql('postgres', $priv_sql);
	my $after = $node->safe_psql('restored', $priv_sql);
	isnt($before, '', 'there are grants to carry over');
	is($after, $before, 'kek_privileges identical after the restore');
	my ($rc, $o, $e) = psql_as('bob', app_name('restored_bob'), q{SELECT dec_text(v) FROM t ORDER BY id}, db => 'restored');
	is($rc, 0, 'restored database: bob decrypts (grp\'s grant restored)') or diag($e);
	is($o, $plain_sorted, 'restored database: bob gets the plaintexts');
	($rc, $o, $e) = psql_as('alice', app_name('restored_alice'), q{SELECT dec_text(v) FROM t}, db => 'restored');
	isnt($rc, 0, 'restored database: alice is still denied');
	like($e, qr/42501: permission denied for KEK "k"/, 'restored database: ... with 42501');
	is($o, '', 'restored database: alice gets nothing');
}

# ---------------------------------------------------------------------------

$node->stop;
stop_kms($kms);

note sprintf('total %.1f s', time - $t_start);
done_testing();


# Summary audit records (envelope.audit = summary, the default).
#
# With envelope.audit left unset the level is "summary" and
# envelope.audit_summary_interval (set to 2 s here; PGC_SIGHUP) says how long
# counts may wait: a session's key uses are merged per (use, KEK version,
# user, query_id) into a pending summary, written as one "ENVELOPE AUDIT:"
# record per aggregate with the extra fields "statements" and "since".
#
# Checked here:
#   1. the default level is summary, the interval 2 s (sighup);
#   2. 50 statements of one query shape in one session give at most 3
#      records that add up to 50 statements / 50 values, all with the same
#      query_id, "since" <= "ts", the session fields, and the backend's pid;
#   3. two query shapes in one session give separate aggregates (different
#      query_ids) with the right statement counts;
#   4. an idle session's summary is written by the sweeper within the
#      interval + ~3 s while the session stays connected (the record's pid is
#      the backend's, the log line's process is the sweeper; query_id equals
#      pg_stat_activity.query_id; ts - since >= interval), and not again at
#      disconnect;
#   5. with the interval at 1 h (ALTER SYSTEM + reload) nothing is written
#      while a session is open (not even by the sweeper), and everything is
#      written promptly when the session ends (by the backend itself);
#   6. a failing statement gives an immediate statement-style record with
#      outcome "error" (no "statements"), not merged into the summary;
#   7. SET application_name splits the summary: the old name's counts are
#      written (forced) at the next statement that uses a key;
#   8. SET envelope.audit = statement in a session gives per-statement
#      records (no "statements") for that session;
#   9. test/audit_verify.py verifies the HMAC chain of the whole log.
#
# Run with test/run-tap.  Needs ENVELOPE_ROOT (the repository, for the test
# KMS and the verifier), envelope installed, and Debian's /usr/bin/python3
# with python3-cryptography.

use strict;
use warnings;

use IPC::Run;
use JSON::PP;
use List::Util qw(all sum0 uniq);
use Time::HiRes qw(usleep time);
use Time::Local qw(timegm);

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use EnvelopeTAP qw(envelope_root start_kms kms_create_key envelope_conf stop_kms
  audit_log_records audit_record_keys app_name);

my $verifier = envelope_root() . '/test/audit_verify.py';
-f $verifier or BAIL_OUT("audit verifier not found at $verifier");

my $tmp = PostgreSQL::Test::Utils::tempdir('auditsum');
my $timeout = $PostgreSQL::Test::Utils::timeout_default;
my $json = JSON::PP->new->utf8;
my $interval = 2.0;    # envelope.audit_summary_interval, seconds

# ---------------------------------------------------------------------------
# The test KMS, the HMAC key, the node
# ---------------------------------------------------------------------------

my $kms = start_kms($tmp, '005_audit_summary');
kms_create_key($kms, 'k');

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

my $node = PostgreSQL::Test::Cluster->new('main');
$node->init;
# envelope.audit is deliberately not set: the default is under test.
$node->append_conf(
	'postgresql.conf', envelope_conf($kms) . qq{envelope.default_kek = 'k'
envelope.audit_hmac_key_file = '$hmac_key'
envelope.audit_summary_interval = 2000
log_destination = 'stderr'
logging_collector = off
compute_query_id = on
max_connections = 20
});
$node->start;

my $su = $node->safe_psql('postgres', 'SELECT current_user');

# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


# Runs SQL with application_name $app in a new session (statements sent one
# by one); returns (exit code, stdout, stderr).
sub psql_app
{
	my ($app, $sql, %opt) = @_;
	my ($out, $err) = ('', '');
	my $rc = $node->psql(
		'postgres', $sql,
		connstr => $node->connstr('postgres') . " application_name=$app",
		stdout => \$out,
		stderr => \$err,
		timeout => $timeout,
		on_error_stop => $opt{on_error_stop} // 1,
		extra_params => [ '-v', 'VERBOSITY=verbose' ]);
	return ($rc, $out, $err);
}

# An open session with application_name $app: (BackgroundPsql, backend pid).
sub bg_session
{
	my ($app) = @_;
	local $ENV{PGAPPNAME} = $app;
	my $bs = $node->background_psql('postgres', on_error_stop => 0);
	$bs->set_query_timer_restart();
	my $pid = $bs->query_safe('SELECT pg_backend_pid()');
	is($bs->query_safe('SHOW application_name'), $app, "open session $app (pid $pid)");
	return ($bs, $pid);
}

sub log_offset { return -s $node->logfile; }

# Every audit record written to the stderr log after $offset (EnvelopeTAP).
sub audit_records { return audit_log_records($node->logfile, $_[0]); }

# Records after $offset with the given field values.
sub records
{
	my ($offset, %f) = @_;
	return grep {
		my $r = $_;
		all { defined $r->{$_} && $r->{$_} eq $f{$_} } keys %f
	} audit_records($offset);
}

# Summary records (with "statements") and statement records (without).
sub summaries { return grep { exists $_->{statements} } @_; }
sub stmt_recs { return grep { !exists $_->{statements} } @_; }
sub statements_of { return sum0(map { $_->{statements} // 0 } @_); }
sub values_of { return sum0(map { $_->{values} // 0 } @_); }

# Polls until the summary records matching %f after $offset add up to at
# least $n statements, or $secs pass; returns (elapsed seconds or undef,
# the records).
sub wait_statements
{
	my ($offset, $n, $secs, %f) = @_;
	my $start = time;
	while (1)
	{
		my @r = summaries(records($offset, %f));
		return (time - $start, @r) if statements_of(@r) >= $n;
		return (undef, @r) if time - $start > $secs;
		usleep(100_000);
	}
}

# The top-level keys of a record, in order (EnvelopeTAP).
sub record_keys { return audit_record_keys($_[0]); }

# 2026-11-29T10:00:00.000001Z -> epoch seconds.
sub ts_epoch
{
	my ($s) = @_;
	return undef
	  unless defined $s && $s =~ /^(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)\.(\d{6})Z$/;
	return timegm($6, $5, $4, $3, $2 - 1, $1) + $7 / 1e6;
}

# Is process $pid the envelope sweeper (its ps title)?  undef if unknown.
sub is_sweeper
{
	my ($pid) = @_;
	return undef unless defined $pid && open(my $fh, '<', "/proc/$pid/cmdline");
	local $/;
	my $cmd = <$fh> // '';
	close $fh;
	$cmd =~ tr/\0/ /;
	return $cmd =~ /envelope key cache sweeper/ ? 1 : 0;
}

sub dump_recs { return join("\n", map { $_->{_line} } @_); }

# Sets envelope.audit_summary_interval with ALTER SYSTEM and reloads; waits
# until new sessions see $show.
sub set_interval
{
	my ($value, $show) = @_;
	$node->safe_psql('postgres',
		defined $value
		? "ALTER SYSTEM SET envelope.audit_summary_interval = '$value'"
		: 'ALTER SYSTEM RESET envelope.audit_summary_interval');
	$node->safe_psql('postgres', 'SELECT pg_reload_conf()');
	my $deadline = time + 10;
	my $got;
	while (1)
	{
		$got = $node->safe_psql('postgres', 'SHOW envelope.audit_summary_interval');
		last if $got eq $show || time > $deadline;
		usleep(100_000);
	}
	is($got, $show, "envelope.audit_summary_interval is now $show (ALTER SYSTEM, reload)");
	# The sweeper rereads the file when the postmaster passes SIGHUP on
	# (its latch is set); give it a moment.
	usleep(300_000);
	return;
}

my @summary_keys = qw(seq ts event user session_user db app client pid query_id kek
  kek_version statements values cache_hits kms_calls workers since outcome hmac);

my $dec_sql = q{SELECT "dec"(v) FROM t WHERE id = %d;};
my $len_sql = q{SELECT length("dec"(v)) FROM t WHERE id = %d;};
sub dec_stmt { return sprintf($dec_sql, 1 + $_[0] % 3); }
sub len_stmt { return sprintf($len_sql, 1 + $_[0] % 3); }
sub dec_q { return dec_stmt(@_) =~ s/;$//r; }    # for BackgroundPsql::query

# What dec() returns for rows 1, 2, 3 (psql's bytea output).
my @plain_hex = ('\x616c706861', '\x627261766f', '\x636861726c6965');

# ---------------------------------------------------------------------------
# Schema and data
# ---------------------------------------------------------------------------

$node->safe_psql('postgres', 'CREATE EXTENSION envelope');
is($node->safe_psql('postgres', q{SELECT envelope.create_kek('k', 'vault', 'k')}),
	'1', 'KEK k registered at version 1');
$node->safe_psql(
	'postgres', q{
CREATE TABLE t (id int PRIMARY KEY, v enc_bytea);
INSERT INTO t VALUES (1, enc('alpha')), (2, enc('bravo')), (3, enc('charlie'));
});
is($node->safe_psql('postgres', 'SELECT count("dec"(v)) FROM t'), '3', 'table t: 3 encrypted rows');

# ---------------------------------------------------------------------------
# 1. The default level and the interval
# ---------------------------------------------------------------------------

is($node->safe_psql('postgres', 'SHOW envelope.audit'), 'summary', 'envelope.audit defaults to summary');
is($node->safe_psql('postgres', q{SELECT source FROM pg_settings WHERE name = 'envelope.audit'}),
	'default', '... and is not set anywhere (source default)');
is($node->safe_psql('postgres', 'SHOW envelope.audit_summary_interval'), '2s',
	'envelope.audit_summary_interval is 2s (postgresql.conf)');
is( $node->safe_psql('postgres',
		q{SELECT context || ' ' || unit FROM pg_settings WHERE name = 'envelope.audit_summary_interval'}),
	'sighup ms', 'envelope.audit_summary_interval: context sighup, unit ms');
{
	my ($rc, $out, $err) = psql_app('interval_set', 'SET envelope.audit_summary_interval = 500');
	isnt($rc, 0, 'envelope.audit_summary_interval cannot be SET in a session');
	like($err, qr/55P02|cannot be changed now/, '... 55P02 cannot be changed now') or diag($err);
}

# ---------------------------------------------------------------------------
# 2. One query shape, 50 statements, one session
# ---------------------------------------------------------------------------

my $dec_qid;
{
	my $app = app_name('fifty');
	my $off = log_offset();
	my $t0 = time;
	my ($rc, $out, $err) =
	  psql_app($app, "SELECT pg_backend_pid();\n" . join("\n", map { dec_stmt($_) } 0 .. 49));
	is($rc, 0, '50 decrypt statements in one session') or diag($err);
	my ($pid, @rows) = split /\n/, $out;
	is(scalar(@rows), 50, '... 50 rows returned');

	my ($el, @r) = wait_statements($off, 50, 10, event => 'decrypt', app => $app);
	ok(defined $el, 'summary records for the 50 statements appear')
	  or diag(dump_recs(records($off, app => $app)));
	my @all = records($off, app => $app);
	is(scalar(stmt_recs(@all)), 0, 'no statement-level records for the session')
	  or diag(dump_recs(@all));
	is(statements_of(@r), 50, 'sum(statements) = 50');
	is(values_of(@r), 50, 'sum(values) = 50');
	cmp_ok(scalar(@r), '>=', 1, 'at least one record');
	cmp_ok(scalar(@r), '<=', 3, 'at most 3 records (' . scalar(@r) . '): the statements were aggregated')
	  or diag(dump_recs(@r));
	is_deeply([ record_keys($r[0]{_raw} // '') ], \@summary_keys,
		'summary record fields: ' . join(', ', @summary_keys))
	  or diag($r[0]{_raw});
	my @qids = uniq(map { $_->{query_id} // 'null' } @r);
	is(scalar(@qids), 1, 'all records have the same query_id');
	$dec_qid = $qids[0];
	like($dec_qid, qr/^-?[1-9][0-9]*$/, "query_id is a nonzero number ($dec_qid)");
	my $now = time;
	for my $i (0 .. $#r)
	{
		my $x = $r[$i];
		my $n = "record " . ($i + 1) . "/" . scalar(@r);
		ok((all { exists $x->{$_} } qw(user session_user db app client pid statements since)),
			"$n: has user, session_user, db, app, client, pid, statements, since");
		is_deeply(
			[ @$x{qw(event kek kek_version user session_user db app pid outcome workers)} ],
			[ 'decrypt', 'k', 1, $su, $su, 'postgres', $app, $pid, 'ok', 0 ],
			"$n: event decrypt, kek k v1, user/session_user $su, db postgres, app, pid = backend pid $pid, outcome ok"
		) or diag($x->{_raw});
		ok(defined $x->{client} && $x->{client} ne '', "$n: client is set ($x->{client})");
		cmp_ok($x->{statements}, '>=', 1, "$n: statements >= 1");
		is($x->{values}, $x->{statements}, "$n: values = statements (one row each)");
		is($x->{cache_hits} + $x->{kms_calls} >= $x->{values} ? 1 : 0, 1,
			"$n: cache_hits + kms_calls >= values");
		like($x->{hmac} // '', qr/^[0-9a-f]{64}$/, "$n: hmac is 64 hex digits");
		my ($since, $ts) = (ts_epoch($x->{since}), ts_epoch($x->{ts}));
		ok(defined $since && defined $ts, "$n: since and ts are timestamps ($x->{since}, $x->{ts})");
		ok(defined $since && $since <= $ts, "$n: since <= ts");
		ok(defined $since && $since >= $t0 - 1 && $ts <= $now + 1, "$n: since and ts lie within the step");
	}
	# One record per due interval: consecutive records' since are >= interval apart.
	for my $i (1 .. $#r)
	{
		cmp_ok(ts_epoch($r[$i]{since}) - ts_epoch($r[ $i - 1 ]{since}),
			'>=', $interval - 0.001, "record " . ($i + 1) . ": since >= the previous since + interval");
	}
}

# ---------------------------------------------------------------------------
# 3. Two query shapes in one session: separate aggregates
# ---------------------------------------------------------------------------

{
	my $app = app_name('two_queries');
	my $off = log_offset();
	my @sql = ((map { dec_stmt($_) } 0 .. 3), (map { len_stmt($_) } 0 .. 2));
	@sql = @sql[ 0, 4, 1, 5, 2, 6, 3 ];    # interleaved: dec, len, dec, len, ...
	my ($rc, $out, $err) = psql_app($app, join("\n", @sql));
	is($rc, 0, '4 dec() and 3 length(dec()) statements interleaved in one session') or diag($err);
	my ($el, @r) = wait_statements($off, 7, 10, event => 'decrypt', app => $app);
	ok(defined $el, 'summary records for the 7 statements appear') or diag(dump_recs(@r));
	my %by_qid;
	push @{ $by_qid{ $_->{query_id} } }, $_ for @r;
	is(scalar(keys %by_qid), 2, 'two query_ids') or diag(dump_recs(@r));
	my ($len_qid) = grep { $_ ne $dec_qid } keys %by_qid;
	ok(exists $by_qid{$dec_qid}, "the dec() aggregate has the same query_id as in step 2 ($dec_qid)");
	ok(defined $len_qid && $len_qid ne $dec_qid, 'the length(dec()) aggregate has another query_id');
	is(statements_of(@{ $by_qid{$dec_qid} // [] }), 4, 'dec(): statements = 4');
	is(values_of(@{ $by_qid{$dec_qid} // [] }), 4, 'dec(): values = 4');
	is(statements_of(@{ $by_qid{ $len_qid // '' } // [] }), 3, 'length(dec()): statements = 3');
	is(values_of(@{ $by_qid{ $len_qid // '' } // [] }), 3, 'length(dec()): values = 3');
	cmp_ok(scalar(@r), '<', 7, 'fewer records (' . scalar(@r) . ') than statements');
}

# ---------------------------------------------------------------------------
# 4. An idle session: the sweeper writes its summary
# ---------------------------------------------------------------------------

{
	my $app = app_name('idle');
	my ($bs, $pid) = bg_session($app);
	my $off = log_offset();
	my $t_first = time;
	is($bs->query_safe(dec_q($_)), $plain_hex[$_], 'open session: decrypt ' . ($_ + 1) . '/3') for 0 .. 2;
	my $t_last = time;
	my @early = records($off, app => $app);
  SKIP:
	{
		skip 'the three statements took longer than 1.5 s', 1 if $t_last - $t_first > 1.5;
		is(scalar(@early), 0, 'no record right after the statements (the interval is not over)')
		  or diag(dump_recs(@early));
	}
	my ($act_qid, $state) = split /\|/,
	  $node->safe_psql('postgres', "SELECT query_id, state FROM pg_stat_activity WHERE pid = $pid");
	is($state, 'idle', 'the session is idle');

	my ($el, @r) = wait_statements($off, 3, $interval + 3, event => 'decrypt', app => $app);
	my $since_last = time - $t_last;
	ok(defined $el, sprintf('summary of the idle session written within interval + 3 s (%.1f s after its last statement)', $since_last))
	  or diag(dump_recs(records($off, app => $app)));
	is($node->safe_psql('postgres', "SELECT state FROM pg_stat_activity WHERE pid = $pid"),
		'idle', '... while the session is still connected and idle');
	is(statements_of(@r), 3, 'statements = 3');
	is(values_of(@r), 3, 'values = 3');
	is(scalar(@r), 1, 'one record');
	my $x = $r[0] // {};
	is($x->{pid}, $pid, 'the record is about the backend (pid)');
	ok(defined $x->{_line_pid}, 'the log line has a process id') or diag($x->{_line});
	isnt($x->{_line_pid}, $pid, "the log line is not the backend's (written by process " . ($x->{_line_pid} // '?') . ')');
  SKIP:
	{
		my $sw = is_sweeper($x->{_line_pid});
		skip 'cannot read /proc/PID/cmdline', 1 unless defined $sw;
		is($sw, 1, '... it is the envelope sweeper');
	}
	is($x->{query_id}, $act_qid, "query_id = pg_stat_activity.query_id of the session ($act_qid)");
	is($x->{query_id}, $dec_qid, '... = the dec() query_id of step 2');
	my $age = ts_epoch($x->{ts} // '') - ts_epoch($x->{since} // '');
	cmp_ok($age, '>=', $interval, sprintf('ts - since = %.2f s >= the interval', $age));
	cmp_ok($age, '<', $interval + 3, '... and < interval + 3 s (the sweeper wakes every 1 s)');

	is($bs->query_safe('SELECT 1'), '1', 'the session still works');
	$bs->quit;
	# Exit writes what is pending: nothing; nothing is written twice.
	my $n_before = scalar(records($off, app => $app));
	my $deadline = time + 1.5;
	usleep(100_000) while time < $deadline;
	my @after = records($off, app => $app);
	is(scalar(@after), $n_before, 'no further record at disconnect (nothing pending, nothing written twice)')
	  or diag(dump_recs(@after));
	is(statements_of(summaries(@after)), 3, 'still 3 statements in all');
}

# ---------------------------------------------------------------------------
# 5. Interval 1 h: written at backend exit, never while open
# ---------------------------------------------------------------------------

set_interval('1h', '1h');
{
	my $app = app_name('exit_flush');
	my $off = log_offset();
	my ($rc, $out, $err) = psql_app($app, "SELECT pg_backend_pid();\n" . join("\n", map { dec_stmt($_) } 0 .. 4));
	is($rc, 0, '5 decrypts in a session that then disconnects') or diag($err);
	my ($pid) = split /\n/, $out;
	my ($el, @r) = wait_statements($off, 5, 10, event => 'decrypt', app => $app);
	ok(defined $el && $el < 5, sprintf('the summary is written promptly at disconnect (%s s)', defined $el ? sprintf('%.1f', $el) : 'not within 10'))
	  or diag(dump_recs(records($off, app => $app)));
	is(scalar(@r), 1, 'one record');
	is($r[0]{statements}, 5, 'statements = 5');
	is($r[0]{values}, 5, 'values = 5');
	is($r[0]{pid}, $pid, 'pid = the backend pid');
	is($r[0]{_line_pid}, $pid, "written by the backend itself (log line's process)");
}
{
	my $app = app_name('open_1h');
	my ($bs, $pid) = bg_session($app);
	my $off = log_offset();
	$bs->query_safe(dec_q($_)) for 0 .. 1;
	# Longer than the old interval plus a sweeper period: the sweeper and
	# the backend must both go by the new interval.
	my $deadline = time + $interval + 1.5;
	usleep(100_000) while time < $deadline;
	my @open = records($off, app => $app);
	is(scalar(@open), 0, sprintf('no record while the session is open (interval 1 h), also after %.1f s', $interval + 1.5))
	  or diag(dump_recs(@open));
	$bs->query_safe('SELECT 1');
	@open = records($off, app => $app);
	is(scalar(@open), 0, '... nor after a statement that uses no key') or diag(dump_recs(@open));
	$bs->quit;
	my ($el, @r) = wait_statements($off, 2, 10, event => 'decrypt', app => $app);
	ok(defined $el, 'written when the session ends');
	is(statements_of(@r), 2, 'statements = 2');
	is(scalar(@r), 1, 'one record');
	is($r[0]{_line_pid}, $pid, 'written by the backend at exit');
}

# ---------------------------------------------------------------------------
# 6. A failing statement: an immediate error record, not in the summary
# ---------------------------------------------------------------------------

{
	my $app = app_name('error');
	my ($bs, $pid) = bg_session($app);
	my $off = log_offset();
	is($bs->query_safe(dec_q(1)), $plain_hex[1], 'a decrypt that succeeds');
	$bs->{stderr} = '';
	my ($out, $ret) = $bs->query(q{SELECT "dec"(v), 1/(id-id) FROM t WHERE id = 1});
	like($bs->{stderr}, qr/division by zero/, 'SELECT "dec"(v), 1/(id-id) fails: division by zero');
	$bs->{stderr} = '';
	my @r = records($off, app => $app);
	my @err = grep { ($_->{outcome} // '') eq 'error' } @r;
	is(scalar(@err), 1, 'one error record, written at once (the session is open, interval 1 h)')
	  or diag(dump_recs(@r));
	my $e = $err[0] // {};
	is_deeply([ @$e{qw(event kek kek_version values pid)} ], [ 'decrypt', 'k', 1, 1, $pid ],
		'error record: decrypt, k v1, values = 1, pid = backend pid')
	  or diag($e->{_raw});
	ok(!exists $e->{statements}, 'error record: no "statements" field');
	ok(!exists $e->{since}, 'error record: no "since" field');
	isnt($e->{query_id}, $dec_qid, 'error record: the failing query\'s query_id');
	is(scalar(summaries(@r)), 0, 'no summary record yet') or diag(dump_recs(@r));
	$bs->quit;
	my ($el, @s) = wait_statements($off, 1, 10, event => 'decrypt', app => $app);
	ok(defined $el, 'the summary is written at disconnect');
	is(scalar(@s), 1, 'one summary record');
	is_deeply([ @{ $s[0] // {} }{qw(statements values query_id outcome)} ], [ 1, 1, $dec_qid, 'ok' ],
		'summary: statements = 1, values = 1 (the failed statement is not in it), outcome ok')
	  or diag($s[0]{_raw});
	is(scalar(grep { ($_->{outcome} // '') eq 'error' } records($off, app => $app)), 1,
		'still exactly one error record');
}

# ---------------------------------------------------------------------------
# 7. application_name changes: the summary is split
# ---------------------------------------------------------------------------

{
	my $app1 = app_name('app_before');
	my $app2 = app_name('app_after');
	my ($bs, $pid) = bg_session($app1);
	my $off = log_offset();
	$bs->query_safe(dec_q($_)) for 0 .. 2;
	$bs->query_safe("SET application_name = '$app2'");
	my @r = records($off, event => 'decrypt');
	is(scalar(grep { $_->{pid} == $pid } @r), 0, 'nothing written by SET application_name (interval 1 h)')
	  or diag(dump_recs(@r));
	$bs->query_safe(dec_q(0));
	my @r1 = summaries(records($off, event => 'decrypt', app => $app1));
	is(statements_of(@r1), 3, "the first key use under $app2 writes $app1\'s summary: statements = 3")
	  or diag(dump_recs(records($off)));
	is(scalar(@r1), 1, "... one record for $app1");
	is($r1[0]{pid}, $pid, '... pid = backend pid');
	is($r1[0]{_line_pid}, $pid, '... written by the backend');
	is(scalar(records($off, event => 'decrypt', app => $app2)), 0, "no record for $app2 yet");
	$bs->query_safe(dec_q(1));
	$bs->quit;
	my ($el, @r2) = wait_statements($off, 2, 10, event => 'decrypt', app => $app2);
	ok(defined $el, "$app2\'s summary is written at disconnect");
	is(statements_of(@r2), 2, "$app2: statements = 2");
	is(values_of(@r2), 2, "$app2: values = 2");
	is(scalar(@r2), 1, "... one record for $app2");
	is($r2[0]{pid}, $pid, '... same backend pid');
	is(statements_of(summaries(records($off, event => 'decrypt', app => $app1))), 3, "$app1 still 3 statements");
	cmp_ok($r1[0]{seq} // 0, '<', $r2[0]{seq} // 0, "$app1\'s record comes before $app2\'s in the chain");
	cmp_ok(ts_epoch($r2[0]{since} // ''), '>', ts_epoch($r1[0]{since} // ''),
		"$app2\'s since is after $app1\'s (a new pending summary)");
}

# ---------------------------------------------------------------------------
# 8. envelope.audit = statement in one session
# ---------------------------------------------------------------------------

{
	my $app = app_name('stmt_level');
	my ($bs, $pid) = bg_session($app);
	my $off = log_offset();
	$bs->query_safe('SET envelope.audit = statement');
	is($bs->query_safe('SHOW envelope.audit'), 'statement', 'a superuser SETs envelope.audit = statement');
	$bs->query_safe(dec_q($_)) for 0 .. 2;
	my @r = records($off, event => 'decrypt', app => $app);
	is(scalar(@r), 3, 'three records at once, one per statement (session open)') or diag(dump_recs(@r));
	ok((all { !exists $_->{statements} && !exists $_->{since} } @r), '... without "statements" or "since"');
	ok((all { ($_->{values} // 0) == 1 && ($_->{outcome} // '') eq 'ok' && ($_->{pid} // 0) == $pid } @r),
		'... each values = 1, outcome ok, pid = backend pid');
	ok((all { ($_->{query_id} // '') eq $dec_qid } @r), '... query_id of the dec() query');
	$bs->quit;
	my $deadline = time + 1.5;
	usleep(100_000) while time < $deadline;
	my @after = records($off, app => $app);
	is(scalar(@after), 3, 'nothing more at disconnect') or diag(dump_recs(@after));
	is(scalar(summaries(@after)), 0, 'no summary record for the session');
}

set_interval(undef, '2s');

# ---------------------------------------------------------------------------
# 9. The chain verifies
# ---------------------------------------------------------------------------

sub verify
{
	my (@args) = @_;
	my ($out, $err) = ('', '');
	IPC::Run::run([ '/usr/bin/python3', $verifier, @args ], '<', '/dev/null', '>', \$out, '2>', \$err,
		IPC::Run::timeout($timeout));
	return ($? >> 8, $out . $err);
}

{
	my @all = audit_records(0);
	my $n = scalar(@all);
	is_deeply([ map { $_->{seq} } @all ], [ 1 .. $n ], "the log's $n records are numbered 1 .. $n");
	cmp_ok(scalar(summaries(@all)), '>=', 8, 'the log has summary records');
	my ($rc, $out) = verify('--key-file', $hmac_key, $node->logfile);
	is($rc, 0, 'audit_verify.py: the chain of the stderr log verifies') or diag($out);
	like($out, qr/^ok: $n records in 1 segment\(s\)/, "audit_verify.py: ok: $n records in 1 segment");
}

$node->stop;
stop_kms($kms);
done_testing();

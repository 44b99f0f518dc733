
# Online KEK rotation under load, with a crash in the middle.
#
# A table of 200,000 enc_bytea values is rewrapped by
# envelope.rewrap_column while another session keeps updating random rows
# (each write also recorded, in the same transaction, in a plaintext shadow
# table).  The backend running rewrap_column is killed with SIGKILL half-way
# (the server goes through crash recovery), the procedure is rerun to the end,
# and then every value must decrypt to its shadow and sit on the new KEK
# version.  retire_kek_version must refuse before the rewrap and succeed after
# it, and a value still on the retired version (kept aside as if restored
# from an old dump) must then fail to decrypt with SQLSTATE 55000.
#
# Run with test/run-tap.  Needs ENVELOPE_ROOT (the repository, for the test
# KMS), envelope installed, and Debian's /usr/bin/python3 with
# python3-cryptography.

use strict;
use warnings;

use IPC::Run;
use Time::HiRes qw(usleep time);

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use EnvelopeTAP qw(start_kms kms_create_key envelope_conf psql_verbose stop_kms);

my $nrows = 200_000;
my $batch_size = 5000;
my $pause = '50ms';
my $t_start = time;

my $tmp = PostgreSQL::Test::Utils::tempdir('rewrap');
# Logs and the background sessions' output go next to the server log, which
# is kept after a failure (the tempdir is not).
my $logdir = $PostgreSQL::Test::Utils::log_path;
my $timeout = $PostgreSQL::Test::Utils::timeout_default;

# ---------------------------------------------------------------------------
# The test KMS
# ---------------------------------------------------------------------------

my $kms = start_kms($tmp, '001_rewrap_online');
kms_create_key($kms, 'k');

# ---------------------------------------------------------------------------
# The node
# ---------------------------------------------------------------------------

my $node = PostgreSQL::Test::Cluster->new('main');
$node->init;
$node->append_conf(
	'postgresql.conf', envelope_conf($kms) . qq{envelope.default_kek = 'k'
# Cluster.pm turns this off; the test needs the server back after the kill.
restart_after_crash = on
log_statement = none
max_connections = 20
});
$node->start;

$node->safe_psql('postgres', 'CREATE EXTENSION envelope');
is($node->safe_psql('postgres', q{SELECT envelope.create_kek('k', 'vault', 'k') > 0}),
	't', 'KEK k registered');

# ---------------------------------------------------------------------------
# Data: 200,000 values on version 1, a plaintext shadow, one value kept aside
# ---------------------------------------------------------------------------

my $t0 = time;
$node->safe_psql(
	'postgres', qq{
CREATE TABLE t (id int PRIMARY KEY, v enc_bytea, pad text);
CREATE TABLE s (id int PRIMARY KEY, plain text NOT NULL);
INSERT INTO t SELECT g, enc('p-' || g), md5(g::text) FROM generate_series(1, $nrows) g;
INSERT INTO s SELECT g, 'p-' || g FROM generate_series(1, $nrows) g;
-- A value as it would come back from an old dump: its text form.
CREATE TABLE old_dump (id int PRIMARY KEY, v text NOT NULL);
INSERT INTO old_dump SELECT id, v::text FROM t WHERE id = 1;
-- Tells the updater sessions to stop.
CREATE TABLE updater_stop (run int PRIMARY KEY);
VACUUM ANALYZE t;
VACUUM ANALYZE s;
});
note sprintf('loaded %d rows in %.1f s', $nrows, time - $t0);

is( $node->safe_psql(
		'postgres',
		q{SELECT kek, kek_version, value_count FROM envelope.kek_usage('t')}),
	"k|1|$nrows",
	'all values on version 1 of k');
is($node->safe_psql('postgres', q{SELECT dec_text(v::enc_bytea) FROM old_dump}),
	'p-1', 'the kept-aside value decrypts before the rotation');

# ---------------------------------------------------------------------------
# Rotate; retiring version 1 must be refused while values use it
# ---------------------------------------------------------------------------

is($node->safe_psql('postgres', q{SELECT envelope.rotate_kek('k')}),
	'2', 'rotate_kek returns version 2');
is($node->safe_psql('postgres', q{SELECT envelope.kek_version_of(enc('probe'))}),
	'2', 'new values use version 2');

{
	my ($rc, $out, $err) = psql_verbose($node, q{SELECT envelope.retire_kek_version('k', 1)});
	isnt($rc, 0, 'retire_kek_version(k, 1) fails while version 1 is in use');
	like($err, qr/ERROR:\s+55006: cannot retire version 1/,
		'... with SQLSTATE 55006 and "cannot retire version 1"');
	like($err, qr/t\.v has $nrows values on version 1/, '... naming t.v in the DETAIL');
}
is( $node->safe_psql('postgres',
		q{SELECT min_decryption_version, retired_through IS NULL FROM envelope.keks WHERE name = 'k'}),
	'1|t',
	'nothing retired after the refusal');

# ---------------------------------------------------------------------------
# Background sessions
# ---------------------------------------------------------------------------

my @psql_base = ('psql', '-XAtq', '-v', 'ON_ERROR_STOP=1', '-v', 'VERBOSITY=verbose',
	'-d', $node->connstr('postgres'));

# Starts psql running $sql in the background; output goes to files (nothing
# to pump).
sub start_psql
{
	my ($name, $sql) = @_;
	my $h = IPC::Run::start(
		[ @psql_base, '-c', $sql ],
		'<', '/dev/null',
		'>', "$logdir/001_rewrap_online_$name.out",
		'2>', "$logdir/001_rewrap_online_$name.err",
		IPC::Run::timeout($timeout));
	return $h;
}

# Waits for a background psql; returns (exit code, stdout, stderr).
sub finish_psql
{
	my ($name, $h) = @_;
	eval { $h->finish; };
	if ($@)
	{
		diag("$name: $@");
		$h->kill_kill;
	}
	my $rc = $h->result(0);
	return ($rc, slurp_file("$logdir/001_rewrap_online_$name.out"),
		slurp_file("$logdir/001_rewrap_online_$name.err"));
}

# The updater: one random row per transaction, the enc_bytea value and its
# shadow written together, until updater_stop has its run number (or a
# deadline passes).  Plaintexts are unique per write: 'u-<run>-<n>-<id>'.
sub updater_sql
{
	my ($run, $max_seconds) = @_;
	return qq{
DO \$\$
DECLARE
	n int := 0;
	x int;
	deadline timestamptz := clock_timestamp() + interval '$max_seconds s';
BEGIN
	WHILE clock_timestamp() < deadline
		  AND NOT EXISTS (SELECT 1 FROM updater_stop WHERE run = $run) LOOP
		n := n + 1;
		x := 1 + floor(random() * $nrows)::int;
		UPDATE t SET v = enc(format('u-%s-%s-%s', $run, n, x)) WHERE id = x;
		UPDATE s SET plain = format('u-%s-%s-%s', $run, n, x) WHERE id = x;
		COMMIT;
		PERFORM pg_sleep(0.004);
	END LOOP;
	RAISE NOTICE 'updater $run: % transactions', n;
END
\$\$;
};
}

sub count_updates
{
	my ($run) = @_;
	return $node->safe_psql('postgres', qq{SELECT count(*) FROM s WHERE plain LIKE 'u-$run-%'});
}

# ---------------------------------------------------------------------------
# Run 1: rewrap under concurrent updates, killed half-way
# ---------------------------------------------------------------------------

my $upd1 = start_psql('updater1', updater_sql(1, 120));
my $rw1 = start_psql('rewrap1',
	"CALL envelope.rewrap_column('t', 'v', $batch_size, NULL, '$pause')");

# Watch progress from a third session until the run is about 30 % done (and
# not finished), having seen blocks_done grow.  Check its table locks on t on
# the way (relation locks only: the UPDATEs also take the relation extension
# lock, locktype 'extend', in ExclusiveLock mode, which blocks no reader or
# writer).
my ($run1_id, $run1_pid, $blocks_total);
my @seen_blocks;
my %lock_modes;
my $killed_at;
my $run1_t0 = time;
{
	my $deadline = time + $timeout;
	while (time < $deadline)
	{
		my $rw1_err = slurp_file("$logdir/001_rewrap_online_rewrap1.err");
		if ($rw1_err =~ /(ERROR|FATAL|PANIC):/)
		{
			diag("run 1 failed before it could be killed:\n$rw1_err");
			last;
		}
		my $row = $node->safe_psql(
			'postgres', q{
SELECT p.id, p.pid, p.state, p.blocks_done, p.blocks_total,
       coalesce((SELECT string_agg(DISTINCT l.mode, ',') FROM pg_locks l
                 WHERE l.pid = p.pid AND l.locktype = 'relation'
                   AND l.relation = 't'::regclass), '')
  FROM envelope.rewrap_progress p ORDER BY p.id DESC LIMIT 1});
		if ($row ne '')
		{
			my ($id, $pid, $state, $done, $total, $modes) = split /\|/, $row, -1;
			$lock_modes{$_} = 1 for grep { $_ ne '' } split /,/, $modes;
			if ($state ne 'running')
			{
				diag("run 1 is $state before it could be killed (blocks $done of $total)");
				last;
			}
			($run1_id, $run1_pid, $blocks_total) = ($id, $pid, $total);
			push @seen_blocks, $done if !@seen_blocks || $seen_blocks[-1] != $done;
			if (@seen_blocks >= 2 && $done > 0 && $done >= 0.3 * $total)
			{
				if ($done < $total)
				{
					# The backend running the CALL, as the server sees it.
					my $act = $node->safe_psql('postgres',
						qq{SELECT query FROM pg_stat_activity WHERE pid = $pid});
					like($act, qr/CALL envelope\.rewrap_column/,
						"pid $pid from rewrap_progress is the rewrap_column backend");
					kill 'KILL', $pid or die "kill -9 $pid: $!";
					$killed_at = $done;
				}
				else
				{
					diag("run 1 scanned its last block between two polls (blocks $done of $total)");
				}
				last;
			}
		}
		usleep(20_000);
	}
}
ok(defined $killed_at, 'rewrap_column backend killed with SIGKILL mid-run')
  or BAIL_OUT('could not kill run 1 mid-run (see the diagnostics above); '
	  . "blocks_done seen: @seen_blocks");
note sprintf('run 1 killed after %.1f s at block %d of %d; blocks_done seen: %s',
	time - $run1_t0, $killed_at, $blocks_total, join(' ', @seen_blocks));
cmp_ok(scalar(@seen_blocks), '>=', 2, 'rewrap_progress showed run 1 running, blocks_done growing');
is_deeply([ grep { !/^(AccessShareLock|RowShareLock|RowExclusiveLock)$/ } sort keys %lock_modes ],
	[], 'run 1 held no lock on t stronger than ROW EXCLUSIVE (seen: '
	  . join(',', sort keys %lock_modes) . ')');

# Both client sessions die with their backends (the server restarts all).
{
	my ($rc, $out, $err) = finish_psql('rewrap1', $rw1);
	isnt($rc, 0, 'run 1 psql ended with an error') or diag($err);
	like($err, qr/server closed the connection unexpectedly|terminat/i,
		'run 1 lost its connection');
	like($err, qr/NOTICE:.*rewrap_column t\.v: \d+ rows done/,
		'run 1 reported batches before the kill');
}
{
	my ($rc, $out, $err) = finish_psql('updater1', $upd1);
	isnt($rc, 0, 'updater 1 was cut off by the crash restart') or diag($err);
}

ok($node->poll_query_until('postgres', 'SELECT 1', '1'), 'server back after crash recovery');
ok( $node->log_contains(qr/server process \(PID $run1_pid\) was terminated by signal 9/),
	'server log shows the SIGKILL of the rewrap backend');
ok($node->log_contains(qr/all server processes terminated; reinitializing/),
	'server went through a crash restart');

my $upd1_count = count_updates(1);
note "updater 1 committed $upd1_count row updates before the crash";
cmp_ok($upd1_count, '>', 0, 'updater 1 committed updates while run 1 ran');

is( $node->safe_psql('postgres',
		qq{SELECT state, blocks_done > 0 AND blocks_done < blocks_total FROM envelope.rewrap_progress WHERE id = $run1_id}),
	'interrupted|t',
	'rewrap_progress shows the killed run as interrupted, part-way');

my $left_after_crash = $node->safe_psql('postgres',
	q{SELECT coalesce(sum(value_count), 0) FROM envelope.kek_usage('t') WHERE kek_version < 2});
note "values still on version 1 after the crash: $left_after_crash";
cmp_ok($left_after_crash, '>', 0, 'some values still on version 1 after the crash');
cmp_ok($left_after_crash, '<', $nrows, 'committed batches of run 1 survived the crash');
is( $node->safe_psql('postgres',
		q{SELECT count(*) FROM t JOIN s USING (id) WHERE dec_text(t.v) = s.plain}),
	$nrows,
	'after the crash every value decrypts to its shadow');

# ---------------------------------------------------------------------------
# Run 2: rerun to completion, with a new updater
# ---------------------------------------------------------------------------

my $upd2 = start_psql('updater2', updater_sql(2, 120));
{
	# Let it get going first.
	my $deadline = time + $timeout;
	usleep(100_000) while count_updates(2) < 20 && time < $deadline && $upd2->pumpable;
}
my $upd2_before = count_updates(2);
my $run2_t0 = time;
my ($rc2, $out2, $err2) = psql_verbose($node,
	"CALL envelope.rewrap_column('t', 'v', $batch_size)");
note sprintf('run 2 took %.1f s', time - $run2_t0);
my $upd2_during = count_updates(2) - $upd2_before;
is($rc2, 0, 'run 2 (rerun) completes') or diag($err2);
like($err2, qr/NOTICE:.*rewrap_column t\.v: done, \d+ rows rewrapped/, 'run 2 reports done');
{
	my @notices = grep { /NOTICE/ } split /\n/, $err2;
	note "run 2 notices (first two, last two of " . scalar(@notices) . "):\n"
	  . join("\n", @notices[ 0, 1, -2, -1 ]);
}

$node->safe_psql('postgres', 'INSERT INTO updater_stop VALUES (2)');
{
	my ($rc, $out, $err) = finish_psql('updater2', $upd2);
	is($rc, 0, 'updater 2 ran without error') or diag($err);
	like($err, qr/NOTICE:.*updater 2: \d+ transactions/, 'updater 2 finished its loop');
}
my $upd2_count = count_updates(2);
note "updater 2: $upd2_during row updates committed during run 2, $upd2_count in all";
cmp_ok($upd2_during, '>', 0, 'updater 2 kept writing during run 2');
cmp_ok($upd1_count + $upd2_count, '>=', 200, 'several hundred concurrent updates in all');

# A row moved behind the scan would still need a rewrap: run again if so.
my $run2_id = $node->safe_psql('postgres', 'SELECT max(id) FROM envelope.rewrap_run');
my $last_run_id = $run2_id;
my $runs_after_kill = 1;
my $left = $node->safe_psql('postgres',
	q{SELECT coalesce(sum(value_count), 0) FROM envelope.kek_usage('t') WHERE kek_version < 2});
if ($left > 0)
{
	note "$left values still on version 1 after run 2; running again";
	my ($rc, $out, $err) = psql_verbose($node, "CALL envelope.rewrap_column('t', 'v', $batch_size)");
	is($rc, 0, 'run 3 completes') or diag($err);
	$last_run_id = $node->safe_psql('postgres', 'SELECT max(id) FROM envelope.rewrap_run');
	$runs_after_kill++;
}

# ---------------------------------------------------------------------------
# Nothing lost, nothing undecryptable, everything on version 2
# ---------------------------------------------------------------------------

is($node->safe_psql('postgres', 'SELECT count(*) FROM t'), $nrows, "t has $nrows rows");
is( $node->safe_psql('postgres',
		q{SELECT count(*) FROM t JOIN s USING (id) WHERE dec_text(t.v) = s.plain}),
	$nrows,
	'every value decrypts to the last write recorded in the shadow');
is( $node->safe_psql('postgres',
		q{SELECT count(*) FROM t JOIN s USING (id) WHERE dec_text(t.v) IS DISTINCT FROM s.plain}),
	'0', 'no value differs from its shadow');
is( $node->safe_psql('postgres',
		q{SELECT kek, kek_version, value_count FROM envelope.kek_usage('t')}),
	"k|2|$nrows",
	'kek_usage(t): every value on version 2');
is( $node->safe_psql('postgres',
		q{SELECT state || ':' || count(*) FROM envelope.rewrap_progress GROUP BY state ORDER BY state}),
	"done:$runs_after_kill\ninterrupted:1",
	'rewrap_progress: one interrupted run, the others done');
is($node->safe_psql('postgres', qq{SELECT state FROM envelope.rewrap_progress WHERE id = $run1_id}),
	'interrupted', 'the killed run is interrupted');
is( $node->safe_psql('postgres',
		qq{SELECT state, rows_left FROM envelope.rewrap_progress WHERE id = $last_run_id}),
	'done|0', 'the last run is done with nothing left');

# ---------------------------------------------------------------------------
# Retire version 1
# ---------------------------------------------------------------------------

{
	my ($rc, $out, $err) = psql_verbose($node, q{SELECT envelope.retire_kek_version('k', 1)});
	is($rc, 0, 'retire_kek_version(k, 1) succeeds once nothing uses version 1') or diag($err);
	is($out, '2', '... and returns the new minimum version 2');
}
is( $node->safe_psql('postgres',
		q{SELECT latest_version, min_decryption_version, retired_through FROM envelope.keks WHERE name = 'k'}),
	'2|2|1',
	'envelope.keks: retired_through = 1');
$node->safe_psql('postgres', 'SELECT envelope.cache_flush()');

is($node->safe_psql('postgres', q{SELECT envelope.kek_version_of(v::enc_bytea) FROM old_dump}),
	'1', 'the value from the old dump is on version 1');
{
	my ($rc, $out, $err) = psql_verbose($node, q{SELECT dec_text(v::enc_bytea) FROM old_dump});
	isnt($rc, 0, 'decrypting the old-dump value fails after retirement');
	like($err, qr/ERROR:\s+55000: .*version 1 of KMS key "k" is retired/,
		'... with SQLSTATE 55000: version 1 of KMS key "k" is retired');
	unlike($out, qr/p-1/, '... and no plaintext');
}
is( $node->safe_psql('postgres',
		q{SELECT count(*) FROM t JOIN s USING (id) WHERE dec_text(t.v) = s.plain}),
	$nrows,
	'current values still decrypt after the retirement');

# ---------------------------------------------------------------------------

$node->stop;
stop_kms($kms);

note sprintf('total %.1f s', time - $t_start);
done_testing();

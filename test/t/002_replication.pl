# Replication: physical streaming to a hot standby, and logical replication
# to a second cluster.
#
# A primary (wal_level = logical) holds a table of enc_bytea values, some of
# them bound to their row by a context.
#
# Streaming hot standby: it decrypts every value read-only (nothing in the
# dec() path writes: on a standby a write would fail with "cannot execute
# ... in a read-only transaction"), with its own key cache and counters
# (envelope.cache_stats() there starts at zero and moves independently of
# the primary's), envelope.cache_flush() works there, rows written on the
# primary later decrypt after catch-up, and after rotate_kek + rewrap on the
# primary the standby sees the new registry (also in a session that was open
# before the rotation: no stale registry) and decrypts the rewrapped values.
#
# Logical replication: a second cluster with envelope configured against the
# same KMS and the KEK registered there by hand (the registry table is not
# published: each database keeps its own envelope.kek).  The subscriber
# receives the ciphertext byte-identical (initial sync and later INSERT,
# UPDATE with a new enc() value, UPDATE with rewrap(), DELETE) and decrypts
# every value with the same KMS.
#
# Run with test/run-tap.  Needs ENVELOPE_ROOT (the repository, for the test
# KMS), envelope installed, and Debian's /usr/bin/python3 with
# python3-cryptography.

use strict;
use warnings;

use Time::HiRes qw(time);

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use EnvelopeTAP qw(start_kms kms_create_key envelope_conf psql_verbose stop_kms);

my $nrows = 1000;
my $t_start = time;

my $tmp = PostgreSQL::Test::Utils::tempdir('replication');

# ---------------------------------------------------------------------------
# The test KMS
# ---------------------------------------------------------------------------

my $kms = start_kms($tmp, '002_replication');
kms_create_key($kms, 'k');

# The same lines serve the primary, the subscriber and (through the base
# backup) the standby.
my $envelope_conf = envelope_conf($kms);

# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

# envelope.cache_stats() of a node as a hash.
sub cache_stats
{
	my ($node) = @_;
	my @cols = qw(entries hits misses kms_generate kms_wrap kms_unwrap kms_rewrap kms_errors);
	my $row = $node->safe_psql('postgres',
		'SELECT ' . join(', ', @cols) . ' FROM envelope.cache_stats()');
	my %h;
	@h{@cols} = split /\|/, $row;
	return \%h;
}

# The checks every reader runs: how many rows, how many decrypt to their
# expected plaintext (p for v; 'c-<id>' for the context-bound c).
my $count_sql = q{
SELECT count(*),
       count(*) FILTER (WHERE dec_text(v) = p),
       count(*) FILTER (WHERE dec_text(c, convert_to('t:' || id, 'UTF8')) = 'c-' || id)
  FROM t};

# The raw stored form of every value, in id order.
my $raw_sql = q{SELECT id, p, v::text, c::text FROM t ORDER BY id};

# Compares the raw rows of two nodes (ciphertext byte-identical).
sub same_raw
{
	my ($a_node, $b_node, $name) = @_;
	my $a = $a_node->safe_psql('postgres', $raw_sql);
	my $b = $b_node->safe_psql('postgres', $raw_sql);
	my $ok = ok($a eq $b, $name);
	if (!$ok)
	{
		my @a = split /\n/, $a;
		my @b = split /\n/, $b;
		diag(sprintf('%s: %d rows, %s: %d rows', $a_node->name, scalar(@a), $b_node->name, scalar(@b)));
		for my $i (0 .. ($#a > $#b ? $#a : $#b))
		{
			my ($x, $y) = ($a[$i] // '(none)', $b[$i] // '(none)');
			next if $x eq $y;
			diag("first difference:\n  " . $a_node->name . ": $x\n  " . $b_node->name . ": $y");
			last;
		}
	}
	return $ok;
}

# ---------------------------------------------------------------------------
# The primary
# ---------------------------------------------------------------------------

my $primary = PostgreSQL::Test::Cluster->new('primary');
$primary->init(allows_streaming => 'logical');
$primary->append_conf('postgresql.conf', $envelope_conf);
$primary->start;

$primary->safe_psql('postgres', 'CREATE EXTENSION envelope');
is($primary->safe_psql('postgres', q{SELECT envelope.create_kek('k', 'vault', 'k')}),
	'1', 'primary: KEK k registered at version 1');
# Stored in pg_db_role_setting, so the physical standby gets it too.
$primary->safe_psql('postgres', q{ALTER DATABASE postgres SET envelope.default_kek = 'k'});

# v uses the default KEK and no context; c names the KEK and is bound to its
# row by the context 't:<id>'.  p is v's expected plaintext.
$primary->safe_psql(
	'postgres', qq{
CREATE TABLE t (id int PRIMARY KEY, p text NOT NULL, v enc_bytea, c enc_bytea);
INSERT INTO t
SELECT g, 'p-' || g, enc('p-' || g), enc('c-' || g, 'k', convert_to('t:' || g, 'UTF8'))
  FROM generate_series(1, $nrows) g;
-- A value on version 1 that is never rewrapped: a probe for the registry
-- (needs_rewrap() answers from the backend's copy of the registry).
CREATE TABLE keep (id int PRIMARY KEY, v enc_bytea);
INSERT INTO keep VALUES (1, enc('kept'));
});
is($primary->safe_psql('postgres', $count_sql),
	"$nrows|$nrows|$nrows", "primary: $nrows rows, all decrypt (v and context-bound c)");

# No write anywhere on the decrypt path, shown on the primary too: after a
# cold-cache decrypt of every value in a fresh session (registry load, KMS
# unwrap, cache insert), the transaction still has no transaction ID.
$primary->safe_psql('postgres', 'SELECT envelope.cache_flush()');
{
	my $stats0 = cache_stats($primary);
	is( $primary->safe_psql(
			'postgres', qq{
BEGIN;
SELECT count(*) FILTER (WHERE dec_text(v) = p AND dec_text(c, convert_to('t:' || id, 'UTF8')) = 'c-' || id) FROM t;
SELECT pg_current_xact_id_if_assigned() IS NULL;
COMMIT;
}),
		"$nrows\nt",
		'primary: a cold-cache decrypt of every value assigns no transaction ID (no write)');
	cmp_ok(cache_stats($primary)->{kms_unwrap}, '>', $stats0->{kms_unwrap},
		'... and it did go to the KMS (cold cache)');
}

# ---------------------------------------------------------------------------
# Streaming hot standby
# ---------------------------------------------------------------------------

$primary->backup('bk');
my $standby = PostgreSQL::Test::Cluster->new('standby');
$standby->init_from_backup($primary, 'bk', has_streaming => 1);
$standby->start;
$primary->wait_for_catchup($standby);

is($standby->safe_psql('postgres', 'SELECT pg_is_in_recovery()'), 't',
	'standby: in recovery (hot standby)');
is($standby->safe_psql('postgres', 'SHOW envelope.vault_token_file'),
	"$kms->{dir}/token-for-pg", 'standby: envelope settings came with the base backup');
{
	my ($rc, $out, $err) = psql_verbose($standby, 'CREATE TABLE standby_write_probe (x int)');
	isnt($rc, 0, 'standby: a write is refused');
	like($err, qr/25006: cannot execute CREATE TABLE in a read-only transaction/,
		'... with SQLSTATE 25006 (read-only transaction)');
}

# The standby's cache and counters are its own: they start empty.
my $p_before = cache_stats($primary);
my $s0 = cache_stats($standby);
is_deeply([ @$s0{qw(entries hits misses kms_generate kms_wrap kms_unwrap kms_rewrap)} ],
	[ 0, 0, 0, 0, 0, 0, 0 ],
	'standby: cache_stats() starts empty (its own shared memory, not the primary\'s)')
  or diag(explain($s0));

# A session on the standby kept open across the rotation below.
my $ssess = $standby->background_psql('postgres');
$ssess->set_query_timer_restart();
is($ssess->query_safe('SELECT pg_is_in_recovery()'), 't', 'standby session open');

# Decrypting every value on the standby: read-only, so a write anywhere on
# the path (registry, cache, counters) would fail the query.
is($ssess->query_safe($count_sql), "$nrows|$nrows|$nrows",
	"standby: all $nrows rows decrypt (v and context-bound c) in a read-only hot standby");
is($ssess->query_safe('SELECT envelope.needs_rewrap(v) FROM keep'), 'f',
	'standby session: the kept value is on the latest version (registry at version 1)');
{
	my $s1 = cache_stats($standby);
	cmp_ok($s1->{kms_unwrap}, '>=', 1, "standby: kms_unwrap = $s1->{kms_unwrap} (>= 1): it unwrapped through its own cache");
	cmp_ok($s1->{misses}, '>=', 1, "standby: misses = $s1->{misses}");
	cmp_ok($s1->{hits}, '>=', 2 * $nrows - $s1->{misses}, "standby: hits = $s1->{hits} (the rest of the values)");
	cmp_ok($s1->{entries}, '>=', 1, "standby: $s1->{entries} cached key(s)");
	is($s1->{kms_generate} + $s1->{kms_wrap} + $s1->{kms_rewrap}, 0,
		'standby: no data key generated, wrapped or rewrapped');
	is($s1->{kms_errors}, 0, 'standby: no KMS errors');
	my $p1 = cache_stats($primary);
	is_deeply([ @$p1{qw(hits misses kms_unwrap)} ], [ @$p_before{qw(hits misses kms_unwrap)} ],
		'primary: its counters did not move while the standby decrypted');
}

# The context binding holds on the standby too.
{
	my ($rc, $out, $err) = psql_verbose($standby,
		q{SELECT dec_text(c, convert_to('t:2', 'UTF8')) FROM t WHERE id = 1});
	isnt($rc, 0, 'standby: a value read with another row\'s context fails');
	like($err, qr/XX001: could not decrypt value/, '... with XX001 "could not decrypt value"');
}

# cache_flush() on the standby: wipes the standby's keys only.
{
	my $p_entries = cache_stats($primary)->{entries};
	my $flushed = $standby->safe_psql('postgres', 'SELECT envelope.cache_flush()');
	cmp_ok($flushed, '>=', 1, "standby: cache_flush() works, wiped $flushed key(s)");
	is(cache_stats($standby)->{entries}, 0, 'standby: cache empty after the flush');
	is(cache_stats($primary)->{entries}, $p_entries, 'primary: its cache untouched by the standby\'s flush');
	my $u0 = cache_stats($standby)->{kms_unwrap};
	is($standby->safe_psql('postgres', $count_sql), "$nrows|$nrows|$nrows",
		'standby: all rows decrypt again after the flush');
	cmp_ok(cache_stats($standby)->{kms_unwrap}, '>', $u0, '... unwrapping again through the KMS');
	is($standby->safe_psql('postgres', q{SELECT envelope.cache_flush('k') >= 1}), 't',
		'standby: cache_flush(\'k\') (one KEK) works too');
}

# Rows written on the primary after the standby started.
$primary->safe_psql(
	'postgres', qq{
INSERT INTO t
SELECT g, 'p-' || g, enc('p-' || g), enc('c-' || g, 'k', convert_to('t:' || g, 'UTF8'))
  FROM generate_series($nrows + 1, $nrows + 100) g;
UPDATE t SET p = 'q-' || id, v = enc('q-' || id) WHERE id <= 10;
});
my $n2 = $nrows + 100;
$primary->wait_for_catchup($standby);
is($ssess->query_safe($count_sql), "$n2|$n2|$n2",
	'standby: rows inserted and updated on the primary since decrypt after catch-up');

# Rotation and rewrap on the primary.
is($primary->safe_psql('postgres', q{SELECT envelope.rotate_kek('k')}), '2',
	'primary: rotate_kek(k) gives version 2');
$primary->safe_psql('postgres', q{UPDATE t SET v = rewrap(v), c = rewrap(c)});
is( $primary->safe_psql('postgres',
		q{SELECT count(*) FROM t WHERE envelope.kek_version_of(v) = 2 AND envelope.kek_version_of(c) = 2}),
	$n2, 'primary: every value rewrapped to version 2');
$primary->wait_for_catchup($standby);

is($standby->safe_psql('postgres', q{SELECT latest_version FROM envelope.keks WHERE name = 'k'}),
	'2', 'standby: envelope.keks shows latest_version 2 after catch-up');
is( $standby->safe_psql('postgres',
		q{SELECT count(*) FROM t WHERE envelope.kek_version_of(v) = 2 AND envelope.kek_version_of(c) = 2}),
	$n2, 'standby: it has the rewrapped values (version 2)');
# The session opened before the rotation must have dropped its registry copy.
is($ssess->query_safe(q{SELECT latest_version FROM envelope.keks WHERE name = 'k'}), '2',
	'standby session (opened before the rotation): envelope.keks latest_version 2');
is($ssess->query_safe('SELECT envelope.needs_rewrap(v) FROM keep'), 't',
	'standby session: needs_rewrap() of the version-1 value is now true (registry reloaded, not stale)');
{
	my $u0 = cache_stats($standby)->{kms_unwrap};
	is($ssess->query_safe($count_sql), "$n2|$n2|$n2",
		'standby session: every rewrapped value decrypts');
	cmp_ok(cache_stats($standby)->{kms_unwrap}, '>', $u0,
		'... unwrapping the version-2 wrapped key through the KMS');
}
is($standby->safe_psql('postgres', $count_sql), "$n2|$n2|$n2",
	'standby, new session: every rewrapped value decrypts');
is($standby->safe_psql('postgres', q{SELECT dec_text(v) FROM keep}), 'kept',
	'standby: the value still on version 1 decrypts');
same_raw($primary, $standby, 'standby: stored values byte-identical to the primary\'s');

# Retirement reaches the standby at once, although the trigger that wipes the
# KEK's cached keys does not fire during replay: a value on a retired version
# never uses the cache, the KMS decides.  The version-1 key is cached on the
# standby now (the read just above).
$primary->safe_psql('postgres',
	q{CREATE TABLE old_dump AS SELECT v::text AS v_text FROM keep; UPDATE keep SET v = rewrap(v);});
is($primary->safe_psql('postgres', q{SELECT envelope.retire_kek_version('k', 1)}), '2',
	'primary: version 1 retired once no value uses it');
$primary->wait_for_catchup($standby);
{
	my ($rc, $out, $err) = psql_verbose($standby, q{SELECT dec_text(v_text::enc_bytea) FROM old_dump});
	isnt($rc, 0, 'standby: a value on the retired version fails although its key was cached');
	like($err, qr/55000.*is retired/s, '... with 55000 "is retired"');
	($rc, $out, $err) = psql_verbose($standby, q{SELECT dec_text(v) FROM keep});
	is($out, 'kept', 'standby: the rewrapped value still decrypts');
}
$ssess->quit;

# ---------------------------------------------------------------------------
# Logical replication to a second cluster
# ---------------------------------------------------------------------------

my $sub = PostgreSQL::Test::Cluster->new('subscriber');
$sub->init;
$sub->append_conf('postgresql.conf', $envelope_conf);
$sub->start;

# The registry is per database and not published: register the same KEK
# (same provider and key reference) by hand.
$sub->safe_psql('postgres', 'CREATE EXTENSION envelope');
is($sub->safe_psql('postgres', q{SELECT envelope.create_kek('k', 'vault', 'k')}),
	'2', 'subscriber: KEK k registered by hand (the KMS is at version 2)');
$sub->safe_psql('postgres',
	q{CREATE TABLE t (id int PRIMARY KEY, p text NOT NULL, v enc_bytea, c enc_bytea)});

$primary->safe_psql('postgres', 'CREATE PUBLICATION pub FOR TABLE t');
my $pub_connstr = $primary->connstr . ' dbname=postgres';
$sub->safe_psql('postgres',
	"CREATE SUBSCRIPTION sub CONNECTION '$pub_connstr' PUBLICATION pub");
$sub->wait_for_subscription_sync($primary, 'sub');

is($sub->safe_psql('postgres', 'SELECT count(*) FROM t'), $n2, "subscriber: initial sync copied $n2 rows");
same_raw($primary, $sub, 'subscriber after the initial sync: ciphertext byte-identical');
{
	my $s0 = cache_stats($sub);
	is($sub->safe_psql('postgres', $count_sql), "$n2|$n2|$n2",
		'subscriber: every value decrypts with the same KMS (v and context-bound c)');
	my $s1 = cache_stats($sub);
	cmp_ok($s1->{kms_unwrap}, '>', $s0->{kms_unwrap}, "subscriber: kms_unwrap went up to $s1->{kms_unwrap}");
}

# Changes on the primary: a rotation to version 3 (not registered on the
# subscriber), new rows, new enc() values, rewrap(), a delete.
is($primary->safe_psql('postgres', q{SELECT envelope.rotate_kek('k')}), '3',
	'primary: rotate_kek(k) gives version 3');
$primary->safe_psql(
	'postgres', qq{
INSERT INTO t
SELECT g, 'p-' || g, enc('p-' || g), enc('c-' || g, 'k', convert_to('t:' || g, 'UTF8'))
  FROM generate_series($n2 + 1, $n2 + 50) g;
UPDATE t SET p = 'r-' || id, v = enc('r-' || id),
             c = enc('c-' || id, 'k', convert_to('t:' || id, 'UTF8'))
 WHERE id BETWEEN 11 AND 30;
UPDATE t SET v = rewrap(v), c = rewrap(c) WHERE id BETWEEN 31 AND 300;
DELETE FROM t WHERE id = 500;
});
my $n3 = $n2 + 50 - 1;
is( $primary->safe_psql('postgres',
		q{SELECT envelope.kek_version_of(v), count(*) FROM t GROUP BY 1 ORDER BY 1}),
	"2|" . ($n3 - 20 - 270 - 50) . "\n3|" . (20 + 270 + 50),
	'primary: values on versions 2 and 3 as expected');
$primary->wait_for_catchup('sub');

is($sub->safe_psql('postgres', 'SELECT count(*) FROM t'), $n3, "subscriber: $n3 rows after the changes");
same_raw($primary, $sub, 'subscriber after INSERT/UPDATE enc()/UPDATE rewrap()/DELETE: ciphertext byte-identical');
is($sub->safe_psql('postgres', $count_sql), "$n3|$n3|$n3",
	'subscriber: every value decrypts, including the version-3 ones');
is($sub->safe_psql('postgres', q{SELECT count(*) FROM t WHERE p LIKE 'r-%' AND dec_text(v) = p}), '20',
	'subscriber: the 20 values re-encrypted on the primary decrypt to their new plaintext');
note 'subscriber registry (registered by hand, not replicated): '
  . $sub->safe_psql('postgres', q{SELECT name, latest_version FROM envelope.keks});

# The standby followed all of that too.
$primary->wait_for_catchup($standby);
same_raw($primary, $standby, 'standby at the end: stored values byte-identical to the primary\'s');
is($standby->safe_psql('postgres', $count_sql), "$n3|$n3|$n3", 'standby at the end: every value decrypts');
is($standby->safe_psql('postgres', q{SELECT latest_version FROM envelope.keks WHERE name = 'k'}),
	'3', 'standby at the end: registry at version 3');

# Log redaction on the standby: a table with an enc_bytea column created on
# the primary after standby sessions have run is known there too (the
# standby reads its catalogs again when WAL replay changes them).
{
	$standby->safe_psql('postgres', 'SELECT 1');
	$primary->safe_psql('postgres', q{CREATE TABLE late_enc (id int, s text, v enc_bytea)});
	$primary->wait_for_catchup($standby);
	my $secret = 'STANDBY-SECRET-' . int(rand(1e9));
	my $off = -s $standby->logfile;
	$standby->psql('postgres', "SET log_statement = 'all'; SELECT count(*) FROM late_enc WHERE s = '$secret'");
	my $log = slurp_file($standby->logfile, $off);
	unlike($log, qr/\Q$secret\E/, 'standby: a statement on a table created after it started is masked in its log');
	like($log, qr/statement: .*late_enc/, '... and it was logged');
}

# ---------------------------------------------------------------------------

$sub->stop;
$standby->stop;
$primary->stop;
stop_kms($kms);

note sprintf('total %.1f s', time - $t_start);
done_testing();


# EnvelopeTAP: helpers shared by the envelope TAP tests in test/t/*.pl: the
# test KMS (test/kms/vault_transit.py) started, keyed and stopped, the
# postgresql.conf lines that point a node at it, and psql with verbose errors.
# test/run-tap copies this file next to the tests and puts it on PERL5LIB.

package EnvelopeTAP;

use strict;
use warnings;

use Cwd qw(abs_path);
use Exporter qw(import);
use File::Basename qw(dirname);
use File::Copy qw(copy);
use IPC::Run;
use JSON::PP;
use Time::HiRes qw(usleep time);

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

our @EXPORT_OK =
  qw(envelope_root start_kms kms_create_key envelope_conf psql_verbose stop_kms
  audit_log_records audit_record_keys app_name);

# Every KMS start_kms started, for the END block below.
my @started;

# The repository: ENVELOPE_ROOT, else two levels above this file.
sub envelope_root
{
	return $ENV{ENVELOPE_ROOT} // abs_path(dirname(__FILE__) . '/../..');
}

# Starts the test KMS in $tmpdir/kms and waits for READY; returns {dir, port, admin_port, log, handle}.
sub start_kms
{
	my ($tmpdir, $test_name) = @_;
	my $script = envelope_root() . '/test/kms/vault_transit.py';
	-f $script or BAIL_OUT("test KMS not found at $script (set ENVELOPE_ROOT)");

	my $kms = {
		dir => "$tmpdir/kms",
		port => PostgreSQL::Test::Cluster::get_free_port(),
		admin_port => PostgreSQL::Test::Cluster::get_free_port(),
		log => "$PostgreSQL::Test::Utils::log_path/${test_name}_kms.log",
		stopped => 0,
	};
	my $out = '';
	my $h = IPC::Run::start(
		[
			'/usr/bin/python3', $script,
			'--dir', $kms->{dir},
			'--port', $kms->{port},
			'--admin-port', $kms->{admin_port}
		],
		'<', '/dev/null', '>', \$out, '2>', $kms->{log});
	$kms->{handle} = $h;
	push @started, $kms;

	my $deadline = time + 30;
	while ($out !~ /^READY /m && time < $deadline && $h->pumpable)
	{
		$h->pump_nb;
		usleep(50_000);
	}
	if ($out !~ /^READY https:\/\/127\.0\.0\.1:$kms->{port}/m)
	{
		diag("KMS output: $out");
		diag("KMS log:\n" . slurp_file($kms->{log})) if -f $kms->{log};
		BAIL_OUT('the test KMS did not start');
	}
	note "test KMS on https://127.0.0.1:$kms->{port} (admin $kms->{admin_port}), log $kms->{log}";
	return $kms;
}

# Stops every KMS not stopped by stop_kms, however the test ends.
END
{
	local $?;
	for my $kms (@started)
	{
		next if $kms->{stopped};
		my $h = $kms->{handle};
		eval { $h->signal('TERM'); $h->finish; 1 } or eval { $h->kill_kill; };
	}
}

# Creates transit key $name in the KMS (one test: "KMS key $name created").
sub kms_create_key
{
	my ($kms, $name) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	my $token = slurp_file("$kms->{dir}/token");
	chomp $token;
	my ($out, $err) = ('', '');
	my $ok = IPC::Run::run(
		[
			'curl', '-sS', '--fail',
			'--cacert', "$kms->{dir}/ca.pem",
			'-H', "X-Vault-Token: $token",
			'-X', 'POST',
			'-d', '{"type":"aes256-gcm96"}',
			"https://127.0.0.1:$kms->{port}/v1/transit/keys/$name"
		],
		'>', \$out, '2>', \$err);
	ok($ok, "KMS key $name created") or diag("curl: $out $err");
	return;
}

# postgresql.conf lines for envelope and the KMS; first copies the token to token-for-pg, 0600.
sub envelope_conf
{
	my ($kms) = @_;
	my $dir = $kms->{dir};
	# The servers' copy of the token.  Every node runs on this host as the
	# same user, so one absolute path serves them all (a standby inherits it
	# with the primary's postgresql.conf in the base backup).
	if (!$kms->{token_for_pg})
	{
		copy("$dir/token", "$dir/token-for-pg") or die "copy token: $!";
		chmod(0600, "$dir/token-for-pg") or die "chmod token: $!";
		$kms->{token_for_pg} = "$dir/token-for-pg";
	}
	return qq{
shared_preload_libraries = 'envelope'
envelope.vault_addr = 'https://127.0.0.1:$kms->{port}'
envelope.vault_token_file = '$kms->{token_for_pg}'
envelope.vault_ca_file = '$dir/ca.pem'
};
}

# Runs SQL on $node in a new session; returns (exit code, stdout, stderr), errors with SQLSTATE.
sub psql_verbose
{
	my ($node, $sql, %opt) = @_;
	my ($out, $err) = ('', '');
	my $rc = $node->psql(
		'postgres', $sql,
		stdout => \$out,
		stderr => \$err,
		timeout => $PostgreSQL::Test::Utils::timeout_default,
		on_error_stop => $opt{on_error_stop} // 1,
		extra_params => [ '-v', 'VERBOSITY=verbose' ]);
	return ($rc, $out, $err);
}

# Stops the KMS with SIGTERM (one test: "test KMS stopped cleanly").
sub stop_kms
{
	my ($kms) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	my $h = $kms->{handle};
	$h->signal('TERM');
	eval { $h->finish; };
	$kms->{stopped} = 1;
	is($h->result(0), 0, 'test KMS stopped cleanly');
	return;
}

# Every audit record in a stderr log file after byte $offset, decoded, with
# its raw JSON text in _raw, its log line in _line and the log line's
# process id (log_line_prefix '%m [%p] ...') in _line_pid.  A line that
# looks like a record but is not a JSON object fails a test.
sub audit_log_records
{
	my ($file, $offset) = @_;
	my $json = JSON::PP->new->utf8;
	my $text = slurp_file($file, $offset // 0);
	my @recs;
	for my $line (split /\n/, $text)
	{
		next unless $line =~ /\bLOG:  ENVELOPE AUDIT: (\{.*)$/;
		my $raw = $1;
		my $r = eval { $json->decode($raw) };
		if (!defined $r || ref $r ne 'HASH')
		{
			fail('audit record is a JSON object');
			diag($line);
			next;
		}
		$r->{_raw} = $raw;
		$r->{_line} = $line;
		$r->{_line_pid} = $line =~ /^[^[]*\[(\d+)\]/ ? $1 : undef;
		push @recs, $r;
	}
	return @recs;
}

# The top-level keys of an audit record's JSON text, in order.
sub audit_record_keys
{
	my ($raw) = @_;
	return ($raw =~ /(?:^\{|, )"([a-z_]+)": /g);
}

# A fresh application_name per test step ("s01_name", "s02_..."), so that a
# step's audit records and log lines can be told apart from the others.
my $step_no = 0;
sub app_name { return sprintf('s%02d_%s', ++$step_no, $_[0]); }

1;

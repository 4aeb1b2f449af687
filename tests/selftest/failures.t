# Self-test of the Test::Nginx subset: wrong expectations must fail.
#
# Runs each fixture in fixtures/ (*.tn, never picked up by prove itself) in
# a child perl with the same @INC, so with whichever Test::Nginx is under
# test, and checks its TAP output: the number of subtests, and exactly which
# of them fail.
use strict;
use warnings;

use FindBin;
use lib $FindBin::Bin;
use SelfTestEnv;

use File::Spec;
use File::Temp qw(tempdir);
use Test::More;

my $fixtures = File::Spec->catdir($FindBin::Bin, 'fixtures');

# Which implementation the children will load (some behaviours differ).
my $is_subset = 0;
for my $dir (@INC) {
    my $f = File::Spec->catfile($dir, 'Test', 'Nginx', 'Util.pm');
    next unless -f $f;
    open my $in, '<', $f or last;
    local $/;
    $is_subset = (<$in> =~ /pdgate's compatible subset/) ? 1 : 0;
    last;
}

my @cases = (
    {
        file  => 'wrong_expectations.tn',
        total => 24,
        fail  => [
            qr/TEST 1: wrong status code - status code ok$/,
            qr/TEST 2: wrong body - response_body - response is expected/,
            qr/TEST 3: .* - header X-A ok$/,
            qr/TEST 3: .* - header Content-Type not present in the raw headers$/,
            qr/TEST 4: .* - pattern "this text is never logged" should match a line in error\.log/,
            qr/TEST 4: .* - pattern "\[error\]" should not match any line in error\.log/,
            qr/TEST 5: .* - response_body_like - response is expected/,
            qr/TEST 6: .* - grep_error_log_out \(req 0\)$/,
            qr/TEST 7: .* - response_body - response is expected \(repeated req 0, req 1\)$/,
            qr/TEST 8: must_die but the configuration is valid - die as expected$/,
            qr/TEST 9: .* - raw resp headers like$/,
        ],
    },
    {
        file  => 'timeout.tn',
        total => 3,
        fail  => [qr/^ERROR: client socket timed out - .*TEST 1: slow response, no abort$/],
    },
    {
        file  => 'start_failure.tn',
        only_subset => 'upstream retries for 30 s, then bails out',
        total => 4,
        fail  => [
            qr/TEST 1: invalid configuration - status code ok$/,
            qr/TEST 1: invalid configuration - response_body - response is expected/,
        ],
    },
    {
        file  => 'load_modules.tn',
        env   => { TEST_NGINX_LOAD_MODULES => '/nonexistent/pdgate_selftest_module.so' },
        total => 2,
        fail  => [],
        pass  => [qr/TEST 1: .* - die as expected$/,
                  qr/TEST 1: .* - pattern "[^"]*pdgate_selftest_module\.so" matches a line in error\.log/],
    },
    {
        file  => 'only.tn',
        total => 2,
        fail  => [],
        pass  => [qr/TEST 2: the only one - status code ok$/],
    },
    {
        file  => 'skip_last.tn',
        total => 4,
        plan  => 4,
        fail  => [],
        pass  => [qr/TEST 1: runs - status code ok$/,
                  qr/TEST 3: runs and is the last one - status code ok$/],
    },
);

# Runs a fixture; returns its combined output and exit status.
sub run_fixture {
    my ($path, $env) = @_;
    my $tmp = tempdir('pdgate-tn-fixture-XXXXXX', TMPDIR => 1, CLEANUP => 1);
    local $ENV{TEST_NGINX_SERVROOT} = "$tmp/servroot";
    local $ENV{TEST_NGINX_PORT} = SelfTestEnv::free_port();
    local $ENV{TEST_NGINX_SERVER_PORT};
    local $ENV{TEST_NGINX_CLIENT_PORT};
    local $ENV{TEST_NGINX_RANDOMIZE};
    local $ENV{PERL5LIB} = join ':', map { File::Spec->rel2abs($_) } grep { !ref } @INC;
    local $ENV{TEST_NGINX_LOAD_MODULES};
    local @ENV{keys %$env} = values %$env if $env;

    STDOUT->flush;
    STDERR->flush;
    pipe my $r, my $w or die "pipe: $!";
    my $pid = fork // die "fork: $!";
    if (!$pid) {
        close $r;
        open STDOUT, '>&', $w or die;
        open STDERR, '>&', $w or die;
        exec $^X, $path or die "exec: $!";
    }
    close $w;
    my $out = do { local $/; <$r> } // '';
    close $r;
    waitpid $pid, 0;
    return ($out, $? >> 8);
}

for my $case (@cases) {
    my $path = File::Spec->catfile($fixtures, $case->{file});

    subtest $case->{file} => sub {
        if ($case->{only_subset} && !$is_subset) {
            plan skip_all => "behaviour specific to the subset ($case->{only_subset})";
        }

        my ($out, $status) = run_fixture($path, $case->{env});

        my (@failed, @passed);
        for my $line (split /\n/, $out) {
            next unless $line =~ /^(not )?ok \d+(?: - (.*?))?(?: # (?:skip|SKIP|TODO).*)?$/;
            push @{ $1 ? \@failed : \@passed }, $2 // '';
        }

        is(@failed + @passed, $case->{total}, 'number of subtests')
            or diag $out;
        if (defined $case->{plan}) {
            like($out, qr/^1\.\.$case->{plan}$/m, 'plan line');
            is($status, 0, 'exit status');
        }

        is(scalar @failed, scalar @{ $case->{fail} }, 'number of failures')
            or diag join "\n", 'failed:', @failed;
        for my $re (@{ $case->{fail} }) {
            is(scalar(grep { $_ =~ $re } @failed), 1, "one failure matches $re");
        }
        for my $re (@{ $case->{pass} || [] }) {
            is(scalar(grep { $_ =~ $re } @passed), 1, "one pass matches $re");
        }
        isnt($status, 0, 'non-zero exit status')
            if @{ $case->{fail} } && $is_subset;
    };
}

done_testing();

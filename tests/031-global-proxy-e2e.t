# scripts/global_proxy.sh end to end: the configuration it generates, started
# by it in front of a 1P1D engine-sim cluster, serves a P/D chat completion
# (the KV really goes from prefill to decode); a second run with the same
# flags leaves it alone, a changed flag reloads it; --stop stops that nginx
# and no other, even when its pid file names another nginx.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/common";
use Pdgate::GlobalProxy qw(run_gp slurp spit dist free_port wait_port);
use File::Temp qw(tempdir);
use HTTP::Tiny;
use JSON::PP qw(decode_json);
use POSIX qw(WNOHANG);
use Test::More;

my $DIST = dist();
my $NGINX = "$DIST/sbin/nginx";
plan skip_all => "no $DIST/bin/engine-sim (./build.sh)" unless -x "$DIST/bin/engine-sim";

my $tmp = tempdir(CLEANUP => 1);
chmod 0755, $tmp;           # nginx workers (nobody) use the temp dirs below
my $http = HTTP::Tiny->new(timeout => 10);
my @sims;
my @nginx_pid_files;

END {
    local $?;   # waitpid below must not become the exit status
    # Only what this test started: the simulators by pid, each nginx by the
    # pid file it wrote.
    for my $f (@nginx_pid_files) {
        my $pid = slurp($f);
        kill 'TERM', $1 if defined $pid && $pid =~ /(\d+)/;
    }
    kill 'TERM', @sims if @sims;
    waitpid($_, 0) for @sims;
}

sub start_sim {
    my ($role, $port) = @_;
    my $pid = fork // die "fork: $!";
    if ($pid == 0) {
        open STDOUT, '>', "$tmp/sim-$role.log";
        open STDERR, '>&', \*STDOUT;
        exec "$DIST/bin/engine-sim", '--role', $role, '--port', $port, '--kv-port', 0,
            '--instant', '--quiet', '--model', 'gp-e2e';
        exit 127;
    }
    push @sims, $pid;
    ok(wait_port($port, 10), "$role simulator on 127.0.0.1:$port") or BAIL_OUT(slurp("$tmp/sim-$role.log") // '');
}

sub alive { my ($pid) = @_; return kill(0, $pid) ? 1 : 0 }

my ($p_port, $d_port) = (free_port(), free_port());
$d_port = free_port() while $d_port == $p_port;
start_sim(prefill => $p_port);
start_sim(decode => $d_port);

my $port = free_port();
my $conf = "$tmp/conf/gp.conf";
my $flags = "-f $conf --prefix $tmp/prefix --nginx-bin $NGINX -c 1 --listen-address 127.0.0.1 -p $port"
    . " --prefill-servers-list 127.0.0.1:$p_port --decode-servers-list 127.0.0.1:$d_port"
    . " --prefill-lb-sdk least_total_load --decode-lb-sdk weighted_least_active";
push @nginx_pid_files, "$tmp/prefix/logs/gp.pid";

my ($rc, $out, $err) = run_gp($flags);
is($rc, 0, 'global_proxy.sh started nginx') or diag("$out$err");
like($out, qr/started nginx (\d+): \Q$conf\E, listening on 127\.0\.0\.1:$port/, 'and says where');
my ($master) = $out =~ /started nginx (\d+)/;
$master //= 0;
ok($master && alive($master), "master $master is running");
ok(-d "$tmp/prefix/logs", 'it made the prefix logs directory');

# A P/D chat completion through the generated configuration.
my $body = '{"model":"gp-e2e","messages":[{"role":"user","content":"Say hello to the global proxy."}],"max_tokens":8}';
my $res = $http->post("http://127.0.0.1:$port/v1/chat/completions",
    { content => $body, headers => { 'Content-Type' => 'application/json' } });
is($res->{status}, 200, 'chat completion: 200') or diag($res->{content});
my $json = eval { decode_json($res->{content}) } // {};
like($json->{choices}[0]{message}{content} // '', qr/\S/, 'with a completion');
my $metrics = $http->get("http://127.0.0.1:$d_port/metrics")->{content} // '';
like($metrics, qr/^engine_sim:kv_transfers_total\S* [1-9]/m, 'decode fetched the KV from the prefill');
like($metrics, qr/^engine_sim:kv_recompute_total\S* 0$/m, 'and recomputed nothing');
my $log = '';
for (1 .. 40) {   # written in the log phase, after the client has its answer
    $log = slurp("$tmp/prefix/logs/access.log") // '';
    last if $log =~ /"status":"200"/;
    select undef, undef, undef, 0.05;
}
like($log, qr/"request_id":"[0-9a-f-]{36}".*"status":"200".*"upstream_addr":"127\.0\.0\.1:$d_port"/,
    'JSON access log line with the request id and the decode peer');
is($http->get("http://127.0.0.1:$port/v1/models")->{status}, 200, '/v1/models answered by the prefill');

# The same flags again: same file, nothing restarted.
my $before = slurp($conf);
($rc, $out, $err) = run_gp($flags);
is($rc, 0, 'second run') or diag($err);
like($out, qr/nginx $master is already running from \Q$conf\E \(unchanged\)/, 'leaves it running');
is(slurp($conf), $before, 'same file');

# A changed flag: new file, same master reloaded.
($rc, $out, $err) = run_gp("$flags --decode-lb-sdk least_conn");
is($rc, 0, 'changed flags') or diag($err);
like($out, qr/reloaded nginx $master/, 'reloads the running master');
like(slurp($conf), qr/^\s+least_conn;$/m, 'with the new balancer');
my $ok = 0;
for (1 .. 40) {   # the new workers take over
    $res = $http->post("http://127.0.0.1:$port/v1/chat/completions",
        { content => $body, headers => { 'Content-Type' => 'application/json' } });
    $ok = 1, last if $res->{status} == 200;
    select undef, undef, undef, 0.05;
}
ok($ok, 'still serves after the reload');

# An unrelated nginx from the same binary.
my $other = "$tmp/other";
mkdir $other; mkdir "$other/logs"; mkdir "$other/conf";
chmod 0755, $other;
my $oport = free_port();
spit("$other/conf/other.conf", <<"EOC");
pid $other/logs/other.pid;
error_log $other/logs/error.log;
worker_processes 1;
events { worker_connections 64; }
http {
    access_log off;
    server { listen 127.0.0.1:$oport; location / { return 200 "other\\n"; } }
}
EOC
push @nginx_pid_files, "$other/logs/other.pid";
system($NGINX, '-p', "$other/", '-c', "$other/conf/other.conf");
ok(wait_port($oport, 10), 'an unrelated nginx runs');
my ($opid) = (slurp("$other/logs/other.pid") // '') =~ /(\d+)/;
$opid //= 0;

# Its pid in our pid file (stale or tampered): --stop must not touch it.
my $saved = slurp("$tmp/prefix/logs/gp.pid");
spit("$tmp/prefix/logs/gp.pid", "$opid\n");
($rc, $out) = run_gp("--stop -f $conf");
is($rc, 0, '--stop with a pid file naming another nginx');
like($out, qr/no nginx is running from \Q$conf\E/, 'treats it as not ours');
ok(alive($opid), 'the other nginx is untouched');
spit("$tmp/prefix/logs/gp.pid", $saved);

($rc, $out, $err) = run_gp("--stop -f $conf");
is($rc, 0, '--stop') or diag($err);
like($out, qr/stopped nginx $master/, 'says which');
ok(!alive($master), 'our nginx is gone');
ok(!wait_port($port, 0.2), 'its port is closed');
ok(alive($opid), 'the other nginx still runs');
is($http->get("http://127.0.0.1:$oport/")->{content}, "other\n", 'and still answers');

($rc, $out) = run_gp("--stop -f $conf");
is($rc, 0, '--stop again');
like($out, qr/no nginx is running/, 'nothing to stop');

# The same flags after --stop: the file is unchanged, nginx starts again.
($rc, $out, $err) = run_gp("$flags --decode-lb-sdk least_conn");
is($rc, 0, 'restart with the file as it is') or diag($err);
like($out, qr/unchanged.*\n.*started nginx \d+/s, 'unchanged, started');
ok(wait_port($port, 5), 'serving again');
($rc, $out) = run_gp("--stop -f $conf");
like($out, qr/stopped nginx/, 'stopped again');

my $script = slurp("$FindBin::Bin/../scripts/global_proxy.sh");
unlike($script, qr/\b(pgrep|pkill|killall|pidof)\b/, 'the script never looks processes up by name');

kill 'QUIT', $opid if $opid;
done_testing();

# scripts/global_proxy.sh end to end: the configuration it generates, started
# by it in front of a 1P1D engine-sim cluster, serves a P/D chat completion
# (the KV really goes from prefill to decode); a second run with the same
# flags leaves it alone, a changed flag reloads it; --stop stops that nginx
# and no other, even when its pid file names another nginx. Then the same
# for SGLang mode (2P1D simulators in SGLang mode: the decode gets the KV
# through the bootstrap room the prefill published) and for E/P/D (an
# encoder simulator in front of vLLM P/D), each serving a chat completion
# and stopped with --stop.
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

# start_sim(role, port, extra engine-sim flags…); the side channel is on any
# free port unless the flags say otherwise.
sub start_sim {
    my ($role, $port, @extra) = @_;
    @extra = ('--kv-port', 0) unless grep { /^--(kv|bootstrap)-port$/ } @extra;
    my $pid = fork // die "fork: $!";
    if ($pid == 0) {
        open STDOUT, '>', "$tmp/sim-$role-$port.log";
        open STDERR, '>&', \*STDOUT;
        exec "$DIST/bin/engine-sim", '--role', $role, '--port', $port,
            '--instant', '--quiet', '--model', 'gp-e2e', @extra;
        exit 127;
    }
    push @sims, $pid;
    ok(wait_port($port, 10), "$role simulator on 127.0.0.1:$port @extra")
        or BAIL_OUT(slurp("$tmp/sim-$role-$port.log") // '');
}

# Ports nothing listens on and no simulator of this test has taken.
my %taken;
sub new_port {
    my $p;
    do { $p = free_port() } while $taken{$p}++;
    return $p;
}

# A counter of a simulator's /metrics.
sub metric {
    my ($port, $name) = @_;
    my $text = $http->get("http://127.0.0.1:$port/metrics")->{content} // '';
    # Summed over its label sets (e.g. vLLM's finished_reason).
    my @v = $text =~ /^\Q$name\E(?:\{[^}]*\})? (\S+)$/mg;
    my $sum = 0;
    $sum += $_ for @v;
    return @v ? $sum : undef;
}

sub chat {
    my ($port, $body) = @_;
    return $http->post("http://127.0.0.1:$port/v1/chat/completions",
        { content => $body, headers => { 'Content-Type' => 'application/json' } });
}

# The access log line of a 200 (written after the client has its answer).
sub log_line_200 {
    my ($file) = @_;
    my $log = '';
    for (1 .. 40) {
        $log = slurp($file) // '';
        last if $log =~ /"status":"200"/;
        select undef, undef, undef, 0.05;
    }
    return $log;
}

sub alive { my ($pid) = @_; return kill(0, $pid) ? 1 : 0 }

my ($p_port, $d_port) = (new_port(), new_port());
start_sim(prefill => $p_port);
start_sim(decode => $d_port);

my $port = new_port();
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
like($out, qr/^global_proxy\.sh: ready: every engine pool has a healthy engine/m, 'and waits until the engines pass their health checks');
my $ready = $http->get("http://127.0.0.1:$port/health");
is($ready->{status}, 200, '/health: ready');
is($ready->{content}, qq({"status":"ready"}\n), 'in JSON');
like($http->get("http://127.0.0.1:$port/internal/health")->{content} // '',
    qr/^upstream decode_servers peer 127\.0\.0\.1:$d_port up eligible=1 probes=[1-9]/m, '/internal/health: the decode engine is up');

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
like($log, qr/"pd_outcome":"ok".*"prefill_status":"200".*"prefill_addr":"127\.0\.0\.1:$p_port".*"ttft":"\d+\.\d{3}"/,
    'and the P/D figures of the prefill module');
is($http->get("http://127.0.0.1:$port/v1/models")->{status}, 200, '/v1/models answered by the prefill');

# Every answer of the completions location carries one X-Request-Id (the
# decode's echo replaced), and nginx's own errors are JSON.
like($res->{headers}{'x-request-id'} // '', qr/^[0-9a-f-]{36}$/, 'the answer carries one X-Request-Id');
my $get = $http->get("http://127.0.0.1:$port/v1/chat/completions");
is($get->{status}, 405, 'a GET on the completions location: 405');
is($get->{headers}{allow}, 'POST', 'with Allow: POST');
like($get->{content}, qr/^\{"error":\{"code":405,"message":"[^"]+","param":null,"type":"BadRequestError"\}\}$/,
    'in JSON');
like($get->{headers}{'x-request-id'} // '', qr/^[0-9a-f-]{36}$/, 'with an X-Request-Id');

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
my $oport = new_port();
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

# --- SGLang mode: 2 prefill simulators (bootstrap side channels on their
# own ports) and a decode, all speaking SGLang's bootstrap protocol.
{
    my @sp = map { new_port() } 1 .. 2;
    my @sb = map { new_port() } 1 .. 2;
    my $sd = new_port();
    start_sim(prefill => $sp[$_], '--engine', 'sglang', '--bootstrap-port', $sb[$_]) for 0 .. 1;
    start_sim(decode => $sd, '--engine', 'sglang', '--kv-port', 0, '--bootstrap-timeout-ms', 5000);
    my $sport = new_port();
    my $sconf = "$tmp/conf/sglang.conf";
    push @nginx_pid_files, "$tmp/prefix/logs/sglang.pid";
    my $sflags = "-f $sconf --prefix $tmp/prefix --nginx-bin $NGINX -c 1 --listen-address 127.0.0.1 -p $sport"
        . " --prefill-servers-list 127.0.0.1:$sp[0],127.0.0.1:$sp[1] --decode-servers-list 127.0.0.1:$sd"
        . " --engine-type sglang --bootstrap-port $sb[0],$sb[1] --decode-lb-sdk least_total_load"
        . " --access-log-file $tmp/prefix/logs/sglang-access.log";
    ($rc, $out, $err) = run_gp($sflags);
    is($rc, 0, 'sglang: global_proxy.sh started nginx') or diag("$out$err");
    like($out, qr/started nginx \d+: \Q$sconf\E, listening on 127\.0\.0\.1:$sport/, 'sglang: and says where');
    like(slurp($sconf) // '', qr/^\s+prefill_refactor \/prefill_internal;$/m, 'sglang: a prefill_refactor configuration');
    for my $stream (0, 1) {
        my $b = '{"model":"gp-e2e","messages":[{"role":"user","content":"Hello over SGLang ' . $stream
            . '."}],"max_tokens":8' . ($stream ? ',"stream":true' : '') . '}';
        $res = chat($sport, $b);
        is($res->{status}, 200, "sglang: chat completion (stream $stream): 200") or diag($res->{content});
        if ($stream) {
            like($res->{content}, qr/data: \[DONE\]/, 'sglang: streamed to the end');
        } else {
            my $j = eval { decode_json($res->{content}) } // {};
            like($j->{choices}[0]{message}{content} // '', qr/\S/, 'sglang: with a completion');
        }
    }
    is(metric($sd, 'engine_sim:kv_transfers_total'), 2, 'sglang: the decode got both KVs through the bootstrap rooms');
    is(metric($sd, 'engine_sim:kv_recompute_total'), 0, 'sglang: and recomputed nothing');
    like(log_line_200("$tmp/prefix/logs/sglang-access.log"),
        qr/"upstream_addr":"127\.0\.0\.1:$sd".*"prefill_server":"127\.0\.0\.1:(\Q$sp[0]\E|\Q$sp[1]\E)","bootstrap_room":"\d+"/,
        'sglang: the access log names the prefill server and the room');
    is($http->get("http://127.0.0.1:$sport/v1/models")->{status}, 200, 'sglang: /v1/models answered');
    ($rc, $out, $err) = run_gp("--stop -f $sconf");
    is($rc, 0, 'sglang: --stop') or diag($err);
    like($out, qr/stopped nginx \d+ \(\Q$sconf\E\)/, 'sglang: stopped');
    ok(!wait_port($sport, 0.2), 'sglang: its port is closed');
}

# --- E/P/D: an encoder simulator, then vLLM P/D.
{
    my ($ep, $pp, $dp) = (new_port(), new_port(), new_port());
    start_sim(encode => $ep);
    start_sim(prefill => $pp);
    start_sim(decode => $dp);
    my $eport = new_port();
    my $econf = "$tmp/conf/epd.conf";
    push @nginx_pid_files, "$tmp/prefix/logs/epd.pid";
    my $eflags = "-f $econf --prefix $tmp/prefix --nginx-bin $NGINX -c 1 --listen-address 127.0.0.1 -p $eport"
        . " --prefill-servers-list 127.0.0.1:$pp --decode-servers-list 127.0.0.1:$dp"
        . " --encode-servers-list 127.0.0.1:$ep --encode-lb-sdk least_conn"
        . " --prefill-lb-sdk round_robin --decode-lb-sdk least_conn --access-log-file off"
        . " --enable-internal-metrics 256k";
    ($rc, $out, $err) = run_gp($eflags);
    is($rc, 0, 'epd: global_proxy.sh started nginx') or diag("$out$err");
    like($out, qr/started nginx \d+: \Q$econf\E/, 'epd: started');
    my $image = '{"type":"image_url","image_url":{"url":"data:image/png;base64,' . ('iVBORw0KGgo' x 40) . '"}}';
    my $b = '{"model":"gp-e2e","messages":[{"role":"user","content":[{"type":"text","text":"What is in these?"},'
        . "$image,$image" . ']}],"max_tokens":8}';
    $res = chat($eport, $b);
    is($res->{status}, 200, 'epd: multimodal chat completion: 200') or diag($res->{content});
    my $j = eval { decode_json($res->{content}) } // {};
    like($j->{choices}[0]{message}{content} // '', qr/\S/, 'epd: with a completion');
    is(metric($ep, 'vllm:request_success_total'), 2, 'epd: the encoder got one request per image');
    is(metric($dp, 'engine_sim:kv_transfers_total'), 1, 'epd: then the decode fetched the KV from the prefill');
    is(metric($dp, 'engine_sim:kv_recompute_total'), 0, 'epd: and recomputed nothing');
    $res = chat($eport, '{"model":"gp-e2e","messages":[{"role":"user","content":"text only"}],"max_tokens":4}');
    is($res->{status}, 200, 'epd: a text-only chat: 200') or diag($res->{content});
    is(metric($ep, 'vllm:request_success_total'), 2, 'epd: without an encoder request');
    my $pm = $http->get("http://127.0.0.1:$eport/internal/metrics");
    is($pm->{status}, 200, 'epd: /internal/metrics answers');
    like($pm->{content} // '', qr/^pdgate_requests_total\{outcome="ok"\} 2$/m, 'epd: and counted both requests');
    my $outside = HTTP::Tiny->new(local_address => '127.0.0.2', timeout => 10);
    is($outside->get("http://127.0.0.1:$eport/internal/metrics")->{status}, 403,
        'epd: /internal/metrics refuses a client other than 127.0.0.1 and ::1');
    ($rc, $out, $err) = run_gp("--stop -f $econf");
    is($rc, 0, 'epd: --stop') or diag($err);
    like($out, qr/stopped nginx \d+ \(\Q$econf\E\)/, 'epd: stopped');
    ok(!wait_port($eport, 0.2), 'epd: its port is closed');
}

# Two workers balance as one: the generated upstreams have a shared zone, so
# round robin's turn is the same in every worker and requests on fresh
# connections (spread over the workers by reuseport) alternate exactly
# between the two decode servers. Each worker on its own turn would break
# the alternation whenever consecutive requests land in different workers.
{
    my $pp = new_port();
    my @dp = (new_port(), new_port());
    start_sim(prefill => $pp);
    start_sim(decode => $_) for @dp;
    my $wport = new_port();
    my $wconf = "$tmp/conf/workers.conf";
    my $wlog = "$tmp/prefix/logs/workers-access.log";
    push @nginx_pid_files, "$tmp/prefix/logs/workers.pid";
    ($rc, $out, $err) = run_gp("-f $wconf --prefix $tmp/prefix --nginx-bin $NGINX -c 2 --listen-address 127.0.0.1"
        . " -p $wport --prefill-servers-list 127.0.0.1:$pp"
        . " --decode-servers-list 127.0.0.1:$dp[0],127.0.0.1:$dp[1]"
        . " --prefill-lb-sdk round_robin --decode-lb-sdk round_robin --access-log-file $wlog"
        . " --access-log-buffer off");   # lines in the order the requests ended
    is($rc, 0, 'two workers: global_proxy.sh started nginx') or diag("$out$err");
    my $n = 12;
    my $ok = 0;
    for (1 .. $n) {
        my $fresh = HTTP::Tiny->new(timeout => 10, keep_alive => 0);
        my $r = $fresh->post("http://127.0.0.1:$wport/v1/chat/completions",
            { content => '{"model":"gp-e2e","messages":[{"role":"user","content":"hi"}],"max_tokens":2}',
              headers => { 'Content-Type' => 'application/json' } });
        $ok++ if $r->{status} == 200;
    }
    is($ok, $n, "two workers: $n completions answered");
    my @addrs;
    for (1 .. 60) {
        @addrs = (slurp($wlog) // '') =~ /"upstream_addr":"127\.0\.0\.1:(\d+)"/g;
        last if @addrs >= $n;
        select undef, undef, undef, 0.1;
    }
    is(scalar @addrs, $n, 'two workers: one log line each');
    my $alternating = @addrs == $n && !grep { $addrs[$_] == $addrs[$_ - 1] } 1 .. $#addrs;
    ok($alternating, 'two workers: the decode servers alternate exactly (one shared round robin)')
        or diag("decode ports in order: @addrs");
    ($rc, $out, $err) = run_gp("--stop -f $wconf");
    is($rc, 0, 'two workers: --stop') or diag($err);
}

my $script = slurp("$FindBin::Bin/../scripts/global_proxy.sh");
unlike($script, qr/\b(pgrep|pkill|killall|pidof)\b/, 'the script never looks processes up by name');

kill 'QUIT', $opid if $opid;
done_testing();

# pd_hold (prefill_refactor_hold in SGLang mode): a P/D request waits in the proxy while its pools have no room
# (requests in flight per server up to the caps), holding no upstream
# connection and no prefill, and is released first in, first out when a
# request ends, from whichever worker; a full queue and a wait past the
# timeout are answered 429/503 JSON with Retry-After; a client that leaves
# while held is forgotten with nothing leaked; a reload keeps held requests.
#
# Requests run at once from forked clients (Test::Nginx's blocks are
# sequential), so this file starts its own nginx (2 workers). Each case
# has its own pools (one server each: room for one request) in front of
# pdgate_echo mocks of this nginx; the decode mock answers after 600 ms.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/common";
use Pdgate::GlobalProxy qw(slurp spit dist free_port wait_port start_nginx nginx_prefix);
use HTTP::Tiny;
use IO::Socket::INET;
use Time::HiRes qw(time sleep);
use POSIX ();
use Test::More;

my $DIST = dist();
my $NGINX = "$DIST/sbin/nginx";
plan skip_all => "no $NGINX (./build.sh)" unless -x $NGINX;

my $tmp = nginx_prefix();
my ($port, $mock) = (free_port(), free_port());
my $mods = "$DIST/modules";

# One case: its pools, its pd_hold, its location /<name>/.
my @cases = (
    [ release => 'queue=8 timeout=10s' ],
    [ order   => 'queue=8 timeout=10s' ],
    [ timeout => 'queue=8 timeout=300ms retry_after=2' ],
    [ full    => 'queue=1 timeout=10s status=429' ],
    [ gone    => 'queue=8 timeout=10s' ],
    [ reload  => 'queue=8 timeout=10s' ],
    [ killed  => 'queue=8 timeout=3s' ],
    [ spf     => 'queue=8 timeout=10s order=spf aging=1' ],
    [ engine  => 'queue=8 timeout=300ms max_waiting=3' ],
    [ epd     => 'queue=8 timeout=10s' ],
);
my $conf = <<"CONF";
load_module $mods/ngx_http_pdgate_echo_module.so;
load_module $mods/ngx_http_prefill_module.so;
load_module $mods/ngx_http_prefill_refactor_module.so;
load_module $mods/ngx_http_upstream_pd_health_module.so;
worker_processes 2;
error_log logs/error.log info;
pid logs/nginx.pid;
events { worker_connections 256; }
http {
    access_log off;
    proxy_http_version 1.1;
    proxy_set_header Connection "";
CONF
for (@cases) {
    my ($name, $params) = @$_;
    # The engine case's pools read the mock's /metrics (5 waiting).
    my $scrape = $name eq 'engine' ? ' pd_engine_metrics interval=100ms timeout=100ms;' : '';
    $conf .= "    upstream p_$name { zone p_$name 64k; server 127.0.0.1:$mock;$scrape }\n";
    $conf .= "    upstream d_$name { zone d_$name 64k; server 127.0.0.1:$mock;$scrape }\n";
}
for my $m (qw(sglang together)) {
    $conf .= "    upstream p_$m { zone p_$m 64k; server 127.0.0.1:$mock; }\n";
    $conf .= "    upstream d_$m { zone d_$m 64k; server 127.0.0.1:$mock; }\n";
}
$conf .= "    server {\n        listen 127.0.0.1:$port;\n";
for (@cases) {
    my ($name, $params) = @$_;
    $conf .= <<"LOC";
        location /$name/ {
            prefill /prefill_$name;
            prefill_encode /encode_$name;
            pd_hold prefill=p_$name:1 decode=d_$name:1 $params;
            add_header X-Queue-Time \$pd_queue_time always;
            proxy_pass http://d_$name/mock/decode/;
        }
        location /encode_$name/ {
            internal;
            rewrite ^/encode_$name/(.*)\$ /mock/encode/\$1 break;
            proxy_pass http://127.0.0.1:$mock;
        }
        location /prefill_$name/ {
            internal;
            rewrite ^/prefill_$name/(.*)\$ /mock/prefill/\$1 break;
            proxy_pass http://p_$name;
            subrequest_output_buffer_size 64k;
        }
LOC
}
$conf .= <<"CONF";
        # SGLang mode: the same holding (its directive has the module's name).
        location /sglang/ {
            prefill_refactor /prefill_sglang;
            prefill_servers_list 127.0.0.1:$mock;
            prefill_refactor_hold prefill=p_sglang:1 decode=d_sglang:1 queue=8 timeout=10s;
            add_header X-Queue-Time \$pd_queue_time always;
            proxy_pass http://d_sglang/mock/decode/;
        }
        location /prefill_sglang/ {
            internal;
            rewrite ^/prefill_sglang/(.*)\$ /mock/prefill/\$1 break;
            proxy_pass http://\$prefill_server;
        }
        # SGLang's parallel flow: prefill and decode at once.
        location /together/ {
            prefill_refactor /prefill_together;
            prefill_servers_list 127.0.0.1:$mock;
            pd_distribution pd_together;
            prefill_refactor_hold prefill=p_together:1 decode=d_together:1 queue=8 timeout=10s;
            add_header X-Queue-Time \$pd_queue_time always;
            proxy_pass http://d_together/mock/decode/;
        }
        location /prefill_together/ {
            internal;
            rewrite ^/prefill_together/(.*)\$ /mock/prefill/\$1 break;
            proxy_pass http://\$prefill_server;
        }
        location = /metrics { pd_metrics; }
    }
    server {
        listen 127.0.0.1:$mock;
        location /mock/prefill/ { pdgate_echo prefill; }
        location /mock/decode/ { pdgate_echo delay=600; }
        location /mock/encode/ { pdgate_echo; }
        location = /metrics { return 200 "vllm:num_requests_running 8\\nvllm:num_requests_waiting 5\\n"; }
    }
}
CONF
spit("$tmp/nginx.conf", $conf);

ok(start_nginx($tmp), 'nginx starts');
ok(wait_port($port, 10), 'and listens');
my $http = HTTP::Tiny->new(timeout => 20);
my $BODY = '{"model":"m","prompt":"hello","max_tokens":3}';

# A request from a forked client: its status, time taken, end time and
# headers land in a file; returns [pid, file].
sub bg {
    my ($path, $body) = @_;
    $body //= $BODY;
    my $out = "$tmp/bg-" . int(rand(1e9));
    my $pid = fork // die "fork: $!";
    if ($pid == 0) {
        my $t0 = time;
        my $r = HTTP::Tiny->new(timeout => 20)->post("http://127.0.0.1:$port$path",
            { content => $body, headers => { 'content-type' => 'application/json' } });
        my $h = $r->{headers};
        spit($out, join("\n", $r->{status}, time - $t0, time, $h->{'x-queue-time'} // '-',
            $h->{'retry-after'} // '-', $r->{content} // ''));
        POSIX::_exit(0);   # no END block in the child (the temp dir would go)
    }
    return [$pid, $out];
}

# Two requests to $path, the second 150 ms after the first (which holds
# the room for its 600 ms decode): their results.
sub one_behind {
    my ($path) = @_;
    my $a = bg($path);
    sleep 0.15;
    my $b = bg($path);
    return (result($a), result($b));
}

sub result {
    my ($bg) = @_;
    waitpid $bg->[0], 0;
    my ($status, $took, $end, $queued, $retry, @body) = split /\n/, slurp($bg->[1]) // '';
    return { status => $status, took => $took, end => $end, queued => $queued,
             retry => $retry, body => join("\n", @body) };
}

# The pids whose parent is $pid, from /proc (no procps on a bare machine).
sub children {
    my ($pid) = @_;
    opendir my $d, '/proc' or return ();
    my @kids;
    for my $p (grep { /^\d+$/ } readdir $d) {
        my $stat = slurp("/proc/$p/stat") // next;
        push @kids, $p if $stat =~ /^\d+ \(.*\) \S (\d+) / && $1 == $pid;
    }
    return @kids;
}

sub metric {
    my ($name, $gate) = @_;
    my $page = $http->get("http://127.0.0.1:$port/metrics")->{content} // '';
    return $page =~ /^\Q$name\E\{location="\Q$gate\E"\} (\d+)$/m ? $1 : undef;
}

subtest 'a request without room waits and is released when one ends' => sub {
    my ($ra, $rb) = one_behind('/release/v1/completions');
    is($ra->{status}, 200, 'the first is served');
    is($ra->{queued}, '0.000', 'at once');
    is($rb->{status}, 200, 'the second is served too');
    cmp_ok($rb->{queued}, '>=', 0.3, "after waiting for the first ($rb->{queued} s)");
    cmp_ok($rb->{end}, '>', $ra->{end}, 'and ends after it');
    is(metric('pdgate_hold_released_total', 'p_release+d_release'), 1, 'one release counted');
    is(metric('pdgate_hold_decode_reserved', 'p_release+d_release'), 0, 'no room left reserved');
};

subtest 'SGLang mode holds the same way' => sub {
    my ($ra, $rb) = one_behind('/sglang/v1/completions');
    is("$ra->{status} $rb->{status}", '200 200', 'both served');
    cmp_ok($rb->{queued}, '>=', 0.3, "the second after waiting ($rb->{queued} s)");
    is(metric('pdgate_hold_released_total', 'p_sglang+d_sglang'), 1, 'one release counted');
};

subtest 'SGLang pd_together (both legs at once) holds the same way' => sub {
    my ($ra, $rb) = one_behind('/together/v1/completions');
    is("$ra->{status} $rb->{status}", '200 200', 'both served');
    cmp_ok($rb->{queued}, '>=', 0.3, "the second after waiting ($rb->{queued} s)");
    is(metric('pdgate_hold_decode_reserved', 'p_together+d_together'), 0, 'no room left reserved');
};

subtest 'held requests go first in, first out' => sub {
    my $a = bg('/order/v1/completions');
    sleep 0.15;
    my $b = bg('/order/v1/completions');
    sleep 0.15;
    my $c = bg('/order/v1/completions');
    my ($ra, $rb, $rc) = (result($a), result($b), result($c));
    is(join(' ', map { $_->{status} } $ra, $rb, $rc), '200 200 200', 'all served');
    cmp_ok($rb->{end}, '<', $rc->{end}, 'the second before the third');
    cmp_ok($rc->{end} - $rb->{end}, '>=', 0.45, 'one decode apart: one at a time');
};

subtest 'order=spf releases the shortest prompt first' => sub {
    my $long = '{"model":"m","prompt":"' . ('long ' x 2000) . '","max_tokens":3}';
    my $a = bg('/spf/v1/completions');
    sleep 0.15;
    my $b = bg('/spf/v1/completions', $long);
    sleep 0.15;
    my $c = bg('/spf/v1/completions');
    my ($ra, $rb, $rc) = (result($a), result($b), result($c));
    is(join(' ', map { $_->{status} } $ra, $rb, $rc), '200 200 200', 'all served');
    cmp_ok($rc->{end}, '<', $rb->{end}, 'the short one, queued later, before the long one');
};

subtest 'E/P/D: a held request runs no encoder either until released' => sub {
    my $chat = '{"model":"m","max_tokens":3,"messages":[{"role":"user","content":['
        . '{"type":"text","text":"what is this"},'
        . '{"type":"image_url","image_url":{"url":"http://x/cat.png"}}]}]}';
    my $encodes = sub { scalar(() = (slurp("$tmp/logs/error.log") // '') =~ m{pdgate_echo: POST /mock/encode/}g) };
    my $before = $encodes->();
    my $a = bg('/epd/v1/chat/completions', $chat);
    sleep 0.15;
    my $b = bg('/epd/v1/chat/completions', $chat);
    sleep 0.2;
    is($encodes->() - $before, 1, 'while the second waits, only the first was encoded');
    my ($ra, $rb) = (result($a), result($b));
    is("$ra->{status} $rb->{status}", '200 200', 'both served');
    cmp_ok($rb->{queued}, '>=', 0.3, "the second after waiting ($rb->{queued} s)");
    is($encodes->() - $before, 2, 'and encoded once released');
};

subtest 'max_waiting: an engine that reports a queue has no room' => sub {
    sleep 0.3;   # the first scrapes
    my $r = result(bg('/engine/v1/completions'));
    is($r->{status}, 503, 'nothing in flight here, but the engines report 5 waiting: held, then 503');
    cmp_ok($r->{took}, '>=', 0.25, "after the timeout ($r->{took} s)");
};

subtest 'a wait past the timeout is answered 503 with Retry-After' => sub {
    my $a = bg('/timeout/v1/completions');
    sleep 0.15;
    my $b = result(bg('/timeout/v1/completions'));
    is($b->{status}, 503, 'answered 503');
    cmp_ok($b->{took}, '>=', 0.25, "after the timeout ($b->{took} s)");
    cmp_ok($b->{took}, '<', 0.55, 'not after the first ended');
    is($b->{retry}, '2', 'Retry-After: 2');
    like($b->{body}, qr/^\{"error":\{"code":503,"message":"no engine could take the request within 300 ms, retry later","param":null,"type":"ServiceUnavailableError"\}\}$/, 'OpenAI-style JSON');
    is(result($a)->{status}, 200, 'the first is served');
    is(metric('pdgate_hold_timed_out_total', 'p_timeout+d_timeout'), 1, 'counted');
    like(slurp("$tmp/logs/error.log"), qr/pd_hold: no engine could take the request within 300 ms, retry later \(held in "p_timeout\+d_timeout"\)/, 'logged');
};

subtest 'a full queue is answered 429 at once' => sub {
    my $a = bg('/full/v1/completions');
    sleep 0.15;
    my $b = bg('/full/v1/completions');
    sleep 0.15;
    my $c = result(bg('/full/v1/completions'));
    is($c->{status}, 429, 'answered 429');
    cmp_ok($c->{took}, '<', 0.2, 'at once');
    is($c->{retry}, '1', 'Retry-After: 1');
    like($c->{body}, qr/"code":429,"message":"the proxy's queue for the engines is full, retry later"/, 'JSON error');
    is(result($a)->{status}, 200, 'the first is served');
    is(result($b)->{status}, 200, 'the queued one too');
    is(metric('pdgate_hold_rejected_full_total', 'p_full+d_full'), 1, 'counted');
};

subtest 'a client that leaves while held is forgotten, nothing leaked' => sub {
    my $a = bg('/gone/v1/completions');
    sleep 0.15;
    my $s = IO::Socket::INET->new(PeerAddr => "127.0.0.1:$port") or die "connect: $!";
    print $s "POST /gone/v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: "
        . length($BODY) . "\r\n\r\n$BODY";
    sleep 0.15;
    is(metric('pdgate_hold_waiting', 'p_gone+d_gone'), 1, 'it waits');
    close $s;
    sleep 0.2;
    is(metric('pdgate_hold_waiting', 'p_gone+d_gone'), 0, 'it left the queue');
    is(metric('pdgate_hold_client_gone_total', 'p_gone+d_gone'), 1, 'counted');
    is(result($a)->{status}, 200, 'the first is served');
    is(metric('pdgate_hold_prefill_reserved', 'p_gone+d_gone') . '/' . metric('pdgate_hold_decode_reserved', 'p_gone+d_gone'),
        '0/0', 'no room stays reserved');
    my $c = result(bg('/gone/v1/completions'));
    is($c->{queued}, '0.000', 'the next request is admitted at once');
};

subtest 'requests held across a reload are served' => sub {
    my $a = bg('/reload/v1/completions');
    sleep 0.15;
    my $b = bg('/reload/v1/completions');
    sleep 0.15;
    is(system($NGINX, '-p', $tmp, '-c', 'nginx.conf', '-s', 'reload'), 0, 'reload');
    my ($ra, $rb) = (result($a), result($b));
    is($ra->{status}, 200, 'the running one is served');
    is($rb->{status}, 200, 'the held one too');
    sleep 0.3;
    my $c = result(bg('/reload/v1/completions'));
    is($c->{status}, 200, 'the new workers serve');
    is($c->{queued}, '0.000', 'with the room the old ones gave back');
};

subtest 'the room of a worker killed while it served is given back' => sub {
    my $a = bg('/killed/v1/completions');
    sleep 0.2;
    is(metric('pdgate_hold_decode_reserved', 'p_killed+d_killed'), 1, 'a request holds the room');
    my ($master) = (slurp("$tmp/logs/nginx.pid") // '') =~ /(\d+)/;
    my @workers = children($master);
    ok(@workers >= 2, 'the workers: ' . join(' ', @workers));
    kill 'KILL', @workers;
    result($a);
    sleep 0.5;
    my $c = result(bg('/killed/v1/completions'));
    is($c->{status}, 200, 'a request after the respawn is served');
    is($c->{queued}, '0.000', 'at once: the dead worker\'s room came back');
    like(slurp("$tmp/logs/error.log"), qr/pd_hold: gave back the room of exited process \d+ in "p_killed\+d_killed" \(prefill 0, decode 1\)/, 'logged (its prefill was over)');
};

unlike(slurp("$tmp/logs/error.log") // '', qr/\[(emerg|crit)\]/, 'no emerg or crit in the error log');

done_testing();

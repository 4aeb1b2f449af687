# DNS SRV records (Kubernetes headless Services name each pod's ports so):
# `server NAME service=http resolve` (nginx >= 1.27.3, upstream zone) under
# a pdgate balancer follows the records' ports as pods come and go, and the
# SGLang mode takes its prefill servers from such an upstream
# (`prefill_servers_upstream`), each prefill's bootstrap port from the
# `_bootstrap._tcp` record of the same address (`bootstrap=`). A small DNS
# server (Pdgate::Dns) answers from a zone file the test rewrites.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/common";
use Pdgate::GlobalProxy qw(slurp spit dist free_port wait_port start_nginx nginx_prefix);
use Pdgate::Dns;
use HTTP::Tiny;
use Test::More;

my $DIST = dist();
my $NGINX = "$DIST/sbin/nginx";
plan skip_all => "no $NGINX (./build.sh)" unless -x $NGINX;
my $v = `$NGINX -v 2>&1`;
my ($maj, $min, $pat) = $v =~ m{nginx/(\d+)\.(\d+)\.(\d+)};
plan skip_all => "nginx $maj.$min.$pat has no upstream resolve (1.27.3+)"
    unless defined $pat && ($maj * 1_000_000 + $min * 1000 + $pat) >= 1_027_003;

my $tmp = nginx_prefix();
my ($port, $d1, $d2, $p1, $p2, $boot1, $boot2) = map { free_port() } 1 .. 7;

# decode.test: the decode pods' HTTP ports; prefill.test: the prefill
# pods' HTTP ports and (service "bootstrap") their bootstrap ports.
my $zone = "$tmp/zone";
sub zone {
    my (%z) = @_;
    my $text = "A pod1.test 127.0.0.1\nA pod2.test 127.0.0.1\n";
    $text .= "SRV _http._tcp.decode.test 10 0 $_ pod1.test\n" for @{ $z{decode} };
    $text .= "SRV _http._tcp.prefill.test 10 0 $_ pod1.test\n" for @{ $z{prefill} };
    $text .= "SRV _bootstrap._tcp.prefill.test 10 0 $_ pod1.test\n" for @{ $z{bootstrap} };
    spit($zone, $text);
}
zone(decode => [$d1], prefill => [$p1], bootstrap => [$boot1]);
my ($dns_port, $dns_pid) = Pdgate::Dns::start($zone);

my $mods = "$DIST/modules";
spit("$tmp/nginx.conf", <<"CONF");
load_module $mods/ngx_http_pdgate_echo_module.so;
load_module $mods/ngx_http_prefill_refactor_module.so;
load_module $mods/ngx_http_upstream_least_total_load_module.so;
worker_processes 2;
error_log logs/error.log info;
pid logs/nginx.pid;
events { worker_connections 256; }
http {
    access_log off;
    resolver 127.0.0.1:$dns_port valid=1s ipv6=off;
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    upstream decode_servers {
        zone decode_servers 64k;
        server decode.test service=http resolve;
        least_total_load on;
    }
    upstream prefill_servers {
        zone prefill_servers 64k;
        server prefill.test service=http resolve;
    }
    upstream prefill_bootstrap {
        zone prefill_bootstrap 64k;
        server prefill.test service=bootstrap resolve;
    }
    server {
        listen 127.0.0.1:$port;
        location = /t { proxy_pass http://decode_servers/echo; }
        location /v1/ {
            prefill_refactor /prefill_internal;
            prefill_servers_upstream prefill_servers bootstrap=prefill_bootstrap;
            pd_distribution p_before_d;
            add_header X-Prefill-Server \$prefill_server always;
            proxy_pass http://decode_servers;
        }
        location /prefill_internal/ {
            internal;
            rewrite ^/prefill_internal(/.*)\$ \$1 break;
            proxy_pass http://\$prefill_server;
        }
    }
    server { listen 127.0.0.1:$d1; add_header X-Backend d1; location / { pdgate_echo; } }
    server { listen 127.0.0.1:$d2; add_header X-Backend d2; location / { pdgate_echo; } }
    server { listen 127.0.0.1:$p1; location / { pdgate_echo prefill; } }
    server { listen 127.0.0.1:$p2; location / { pdgate_echo prefill; } }
}
CONF

END { Pdgate::Dns::stop($dns_pid) }

ok(start_nginx($tmp), 'nginx starts');
ok(wait_port($port, 10), 'and listens');
my $http = HTTP::Tiny->new(timeout => 10);

sub post { $http->post("http://127.0.0.1:$port$_[0]", { content => $_[1] }) }

# The backends of $n requests to $uri, once (within 10 s, the names
# resolving in the background) a request is served by one of @want.
sub backends {
    my ($uri, $body, $header, $n, @want) = @_;
    my %want = map { $_ => 1 } @want;
    for (1 .. 100) {
        last if $want{ post($uri, $body)->{headers}{$header} // '' };
        select undef, undef, undef, 0.1;
    }
    my %seen;
    $seen{ post($uri, $body)->{headers}{$header} // 'none' }++ for 1 .. $n;
    return \%seen;
}

my $seen = backends('/t', '{"prompt":"p"}', 'x-backend', 6, 'd1');
is_deeply($seen, { d1 => 6 }, 'the SRV record\'s port: served by d1') or diag(explain $seen);

zone(decode => [$d1, $d2], prefill => [$p1], bootstrap => [$boot1]);
$seen = backends('/t', '{"prompt":"p"}', 'x-backend', 1, 'd2');
$seen = backends('/t', '{"prompt":"p"}', 'x-backend', 20, 'd1', 'd2');
ok(($seen->{d1} // 0) > 0 && ($seen->{d2} // 0) > 0, 'a second record: both ports take requests')
    or diag(explain $seen);

zone(decode => [$d2], prefill => [$p1], bootstrap => [$boot1]);
sleep 2;
$seen = backends('/t', '{"prompt":"p"}', 'x-backend', 6, 'd2');
is_deeply($seen, { d2 => 6 }, 'the first record gone: only d2') or diag(explain $seen);

# SGLang mode: the prefill server and its bootstrap port from the records.
my $r = post('/v1/completions', '{"model":"m","prompt":"hello"}');
for (1 .. 50) {
    last if $r->{status} == 200;
    select undef, undef, undef, 0.1;
    $r = post('/v1/completions', '{"model":"m","prompt":"hello"}');
}
is($r->{status}, 200, 'SGLang mode over an SRV-resolved prefill upstream: 200') or diag($r->{content});
is($r->{headers}{'x-prefill-server'}, "127.0.0.1:$p1", 'the prefill server is the record\'s');
like($r->{content}, qr/\\?"bootstrap_port\\?":$boot1\b/, 'its bootstrap port is its _bootstrap._tcp record\'s');

zone(decode => [$d2], prefill => [$p2], bootstrap => [$boot2]);
sleep 2;
$seen = backends('/v1/completions', '{"model":"m","prompt":"hello"}', 'x-prefill-server', 3,
    "127.0.0.1:$p2");
is_deeply($seen, { "127.0.0.1:$p2" => 3 }, 'a new prefill pod replaces the old one') or diag(explain $seen);
$r = post('/v1/completions', '{"model":"m","prompt":"hello"}');
like($r->{content}, qr/\\?"bootstrap_port\\?":$boot2\b/, 'with its own bootstrap port');

unlike(slurp("$tmp/logs/error.log") // '', qr/\[(alert|emerg|crit)\]/, 'no alert in the error log');

done_testing();

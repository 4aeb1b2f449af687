# A pdgate balancer over `server NAME resolve` (nginx >= 1.27.3, upstream
# zone): when DNS swaps the one peer for another address (the peer count
# stays 1), the balancer accounts requests to the new peer's slot, not the
# old one's. A small DNS server (Pdgate::Dns) answers A queries for
# pool.test from a file the test rewrites; two pdgate_echo backends listen
# on 127.0.0.1 and 127.0.0.2 (same port).
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/common";
use Pdgate::GlobalProxy qw(slurp spit dist free_port wait_port start_nginx nginx_prefix);
use Pdgate::Dns;
use HTTP::Tiny;
use IO::Socket::INET;
use Test::More;

my $DIST = dist();
my $NGINX = "$DIST/sbin/nginx";
plan skip_all => "no $NGINX (./build.sh)" unless -x $NGINX;
my $v = `$NGINX -v 2>&1`;
my ($maj, $min, $pat) = $v =~ m{nginx/(\d+)\.(\d+)\.(\d+)};
plan skip_all => "nginx $maj.$min.$pat has no upstream resolve (1.27.3+)"
    unless defined $pat && ($maj * 1_000_000 + $min * 1000 + $pat) >= 1_027_003;
plan skip_all => 'no 127.0.0.2 on loopback'
    unless IO::Socket::INET->new(LocalAddr => '127.0.0.2', Proto => 'udp');

my $tmp = nginx_prefix();

# The DNS server: A pool.test -> the address in $zone (TTL 1).
my $zone = "$tmp/zone";
spit($zone, "A pool.test 127.0.0.1\n");
my ($dns_port, $dns_pid) = Pdgate::Dns::start($zone);

my ($port, $bport) = (free_port(), free_port());
my $mods = "$DIST/modules";
spit("$tmp/nginx.conf", <<"CONF");
load_module $mods/ngx_http_pdgate_echo_module.so;
load_module $mods/ngx_http_upstream_least_total_load_module.so;
worker_processes 2;
error_log logs/error.log info;
pid logs/nginx.pid;
events { worker_connections 256; }
http {
    access_log off;
    resolver 127.0.0.1:$dns_port valid=1s ipv6=off;
    upstream pool {
        zone pool 64k;
        server pool.test:$bport resolve;
        least_total_load on;
    }
    server {
        listen 127.0.0.1:$port;
        location = /t { proxy_pass http://pool/echo; }
        location = /status { least_total_load_status; }
    }
    server { listen 127.0.0.1:$bport; add_header X-Backend one; location / { pdgate_echo; } }
    server { listen 127.0.0.2:$bport; add_header X-Backend two; location / { pdgate_echo; } }
}
CONF

END { Pdgate::Dns::stop($dns_pid) }

ok(start_nginx($tmp), 'nginx starts');
ok(wait_port($port, 10), 'and listens');
my $http = HTTP::Tiny->new(timeout => 10);

# Requests until the backend is the one wanted (the name resolves in the
# background), then $n more.
sub served_by {
    my ($want, $n) = @_;
    my $seen = '';
    for (1 .. 100) {
        $seen = $http->post("http://127.0.0.1:$port/t", { content => '{"prompt":"hello"}' })
            ->{headers}{'x-backend'} // '';
        last if $seen eq $want;
        select undef, undef, undef, 0.1;
    }
    return 0 if $seen ne $want;
    my $ok = 0;
    for (1 .. $n) {
        $ok++ if ($http->post("http://127.0.0.1:$port/t", { content => '{"prompt":"hello"}' })
            ->{headers}{'x-backend'} // '') eq $want;
    }
    return $ok;
}

# The status page's lines: "pool <addr> requests tokens cost total".
sub totals {
    my %t;
    for (split /\n/, $http->get("http://127.0.0.1:$port/status")->{content} // '') {
        $t{$1} = $2 if /^pool (\S+) \d+ \d+ \d+ (\d+)$/;
    }
    return \%t;
}

is(served_by('one', 6), 6, 'pool.test at 127.0.0.1: served by backend one');
my $before = totals();
ok(($before->{"127.0.0.1:$bport"} // 0) >= 6, 'its slot counts the requests')
    or diag(explain $before);

spit($zone, "A pool.test 127.0.0.2\n");
is(served_by('two', 6), 6, 'pool.test now at 127.0.0.2 (one peer swapped for another): served by two');
my $after = totals();
ok(($after->{"127.0.0.2:$bport"} // 0) >= 6, 'the new peer has its own slot, counting its requests')
    or diag(explain $after);
is($after->{"127.0.0.1:$bport"} // $before->{"127.0.0.1:$bport"}, $before->{"127.0.0.1:$bport"},
    'and nothing more went to the old peer\'s slot');
unlike(slurp("$tmp/logs/error.log") // '', qr/\[(alert|emerg|crit)\]/, 'no alert in the error log');

done_testing();

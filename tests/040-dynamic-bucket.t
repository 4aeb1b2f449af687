# ngx_http_dynamic_bucket_module: $variable names the upstream for the
# request's length; boundaries split the recent token load equally, shared
# by every worker. The whole file runs with two worker processes.
#
# No repeat_each: each block builds its zone's state request by request
# (a zone name per block, so blocks never share state).
use FindBin;
use lib "$FindBin::Bin/common";
use Pdgate::TestEnv;
use Test::Nginx::Socket 'no_plan';

master_on();
workers(2);
no_shuffle();

# Bodies of n bytes (n/4 tokens by the shared rule).
sub post { my $n = shift; "POST /t\n" . ('x' x $n) }

# A reproducible long-tailed workload: log-uniform lengths, 400 B .. 40 kB.
my $seed = 42;
sub lengths {
    my $n = shift;
    map { $seed = ($seed * 1103515245 + 12345) % 2**31;
          int(400 * 100 ** ($seed / 2**31)) } 1 .. $n;
}
our @MIXED = lengths(256);

# Debug lines exist only in an nginx built --with-debug (./build.sh --debug).
our $DEBUG = `$ENV{TEST_NGINX_BINARY} -V 2>&1` =~ /--with-debug/;

# The workers that decided the requests of the "shared" block.
my %pids;
add_response_body_check(sub {
    my ($block, $body, $i) = @_;
    return unless $block->name =~ /every worker/;
    $pids{$1} = 1 if defined $body && $body =~ /^(?:short|long) (\d+)$/m;
    if ($i == 40) {
        Test::More::cmp_ok(scalar(keys %pids), '>=', 2,
            $block->name . " - decided by both workers");
    }
});

# Token shares of the two buckets from a status page, as "balanced" when
# each is between 40 % and 60 %.
sub balanced {
    my $s = shift;
    my @shares = $s =~ /^bucket \d \S+ requests \d+ tokens \d+ share ([\d.]+)$/mg;
    Test::More::note("token shares: @shares");
    return "shares: @shares\n" unless @shares == 2;
    return (grep { $_ < 0.40 || $_ > 0.60 } @shares) ? "unbalanced: @shares\n" : "balanced\n";
}

sub pool_ok { $_[0] =~ /^(short|long) / ? "ok\n" : $_[0] }

our $POOLS = <<'_EOC_';
    upstream short_pool { server 127.0.0.1:$TEST_NGINX_RAND_PORT_1; }
    upstream long_pool { server 127.0.0.1:$TEST_NGINX_RAND_PORT_2; }
    server { listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1; location / { return 200 "short $http_x_decider\n"; } }
    server { listen 127.0.0.1:$TEST_NGINX_RAND_PORT_2; location / { return 200 "long $http_x_decider\n"; } }
_EOC_
# "$TEST_NGINX_POOLS" in an http_config stands for the two pools above.
add_block_preprocessor(sub {
    my $block = shift;
    my $http = $block->http_config;
    return unless defined $http && $http =~ s/\$TEST_NGINX_POOLS\b/$POOLS/;
    $block->set_value("http_config", $http);
});

run_tests();

__DATA__

=== TEST 1: before the first window is full, every request goes to the first upstream
--- http_config
    dynamic_bucket $len_bucket zone=len1:64k window=4 short_pool long_pool;
    $TEST_NGINX_POOLS
--- config
    location = /t { proxy_pass http://$len_bucket; }
--- request eval
[main::post(40000), main::post(400000), main::post(4)]
--- response_body_like eval
[qr/^short /, qr/^short /, qr/^short /]
--- no_error_log
[error]
[alert]



=== TEST 2: after warm-up, short requests go to the first upstream and long ones to the second
--- http_config
    dynamic_bucket $len_bucket zone=len2:64k alpha=0.5 window=8 short_pool long_pool;
    $TEST_NGINX_POOLS
--- config
    location = /t { proxy_pass http://$len_bucket; }
--- request eval
[(map { main::post($_) } 400, 40000, 800, 20000, 1600, 10000, 3200, 5000,
                         4000, 30000, 600, 15000, 1200, 8000, 2400, 6000),
 main::post(8), main::post(400000), main::post(100), main::post(200000)]
--- response_body_like eval
[(qr/^(short|long) /) x 16, qr/^short /, qr/^long /, qr/^short /, qr/^long /]
--- no_error_log
[error]
[alert]



=== TEST 3: a request of unknown length goes to the first upstream, even after warm-up
--- http_config
    dynamic_bucket $len_bucket zone=len3:64k alpha=1 window=2 short_pool long_pool;
    $TEST_NGINX_POOLS
--- config
    location = /t { proxy_pass http://$len_bucket; }
--- request eval
[main::post(400), main::post(40000), main::post(400000), "GET /t", main::post(4)]
--- response_body_like eval
[qr/^short /, qr/^(short|long) /, qr/^long /, qr/^short /, qr/^short /]
--- no_error_log
[error]
[alert]



=== TEST 4: the state is shared by every worker
Requests reach the deciding server over fresh connections to a reuseport
listener, so the kernel spreads them over both workers; the status page,
whichever worker serves it, has counted all 40.
--- http_config
    dynamic_bucket $len_bucket zone=len4:64k alpha=0.5 window=4 short_pool long_pool;
    $TEST_NGINX_POOLS
    server {
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_3 reuseport;
        location = /t { proxy_set_header X-Decider $pid; proxy_pass http://$len_bucket; }
        location = /status { dynamic_bucket_status; }
    }
--- config
    location = /t { proxy_pass http://127.0.0.1:$TEST_NGINX_RAND_PORT_3; }
    location = /status { proxy_pass http://127.0.0.1:$TEST_NGINX_RAND_PORT_3; }
--- request eval
[(map { main::post($_) } main::lengths(40)), "GET /status"]
--- response_body_like eval
[(qr/^(short|long) \d+$/) x 40, qr/^requests 40 folds 10$/m]
--- no_error_log
[error]
[alert]



=== TEST 5: under a mixed workload each bucket receives about half of the tokens
--- http_config
    dynamic_bucket $len_bucket zone=len5:64k alpha=0.2 window=16 short_pool long_pool;
    $TEST_NGINX_POOLS
--- config
    location = /t { proxy_pass http://$len_bucket; }
    location = /status { dynamic_bucket_status; }
--- request eval
[(map { main::post($_) } @main::MIXED), "GET /status"]
--- response_body_filters eval
[([\&main::pool_ok]) x 256, [\&main::balanced]]
--- response_body eval
[("ok\n") x 256, "balanced\n"]
--- no_error_log
[error]
[alert]



=== TEST 6: three buckets, shortest first, and the status page names them
Equal token mass at 250, 500 and 1000 tokens: the boundaries fall at the
ends of the first two lengths' bins (256 and 512 tokens).
--- http_config
    dynamic_bucket $len_bucket zone=len6:64k alpha=1 window=7 a_pool b_pool c_pool;
    upstream a_pool { server 127.0.0.1:$TEST_NGINX_RAND_PORT_1; }
    upstream b_pool { server 127.0.0.1:$TEST_NGINX_RAND_PORT_1; }
    upstream c_pool { server 127.0.0.1:$TEST_NGINX_RAND_PORT_1; }
    server { listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1; location / { return 200 "$host\n"; } }
--- config
    location = /t { proxy_pass http://$len_bucket; }
    location = /status { dynamic_bucket_status; }
--- request eval
[(map { main::post($_) } 1000, 1000, 1000, 1000, 2000, 2000, 4000, 400, 1200, 8000), "GET /status"]
--- response_body eval
[("a_pool\n") x 6, "c_pool\n", "a_pool\n", "b_pool\n", "c_pool\n",
"dynamic_bucket \$len_bucket zone=len6 alpha=1 window=7
requests 10 folds 1
boundaries 256 512
bucket 1 a_pool requests 7 tokens 2100 share 0.389
bucket 2 b_pool requests 1 tokens 300 share 0.056
bucket 3 c_pool requests 2 tokens 3000 share 0.556
"]
--- no_error_log
[error]
[alert]



=== TEST 7: the prefill leg goes to the pool for the client body's length
--- http_config
    dynamic_bucket $prefill_bucket zone=len7:64k alpha=1 window=3 prefill_short prefill_long;
    upstream prefill_short { server 127.0.0.1:$TEST_NGINX_SERVER_PORT; }
    upstream prefill_long { server 127.0.0.1:$TEST_NGINX_SERVER_PORT; }
    upstream decode_pool { server 127.0.0.1:$TEST_NGINX_SERVER_PORT; }
    client_body_buffer_size 1m;
--- config
    location /v1/ {
        prefill /prefill_internal;
        proxy_pass http://decode_pool/mock/decode/v1/;
    }
    location /prefill_internal/ {
        internal;
        rewrite ^/prefill_internal(/.*)$ /mock/prefill$1 break;
        proxy_pass http://$prefill_bucket;
        subrequest_output_buffer_size 1m;
    }
    location /mock/prefill/ { pdgate_echo prefill; }
    location /mock/decode/ { pdgate_echo; }
--- request eval
[map { "POST /v1/completions\n{\"model\":\"m\",\"max_tokens\":5,\"prompt\":\"" . ('p' x $_) . "\"}" }
     100, 10000, 50, 40000]
--- response_body_like eval
[qr/"prefill_request":\{.*"host":"prefill_short"/,
 qr/"prefill_request":\{.*"host":"prefill_(short|long)"/,
 qr/"prefill_request":\{.*"host":"prefill_short"/,
 qr/"prefill_request":\{.*"host":"prefill_long"/]
--- no_error_log
[error]
[alert]



=== TEST 8: a chunked body counts once read (prefill), and is unknown before
With prefill the body is read before the prefill leg is sent, so a chunked
prompt has its length; a plain proxy_pass decides before reading the body.
--- http_config
    dynamic_bucket $prefill_bucket zone=len_chunked:64k alpha=1 window=2 prefill_short prefill_long;
    upstream prefill_short { server 127.0.0.1:$TEST_NGINX_SERVER_PORT; }
    upstream prefill_long { server 127.0.0.1:$TEST_NGINX_SERVER_PORT; }
    upstream decode_pool { server 127.0.0.1:$TEST_NGINX_SERVER_PORT; }
    client_body_buffer_size 1m;
--- config
    location /v1/ {
        prefill /prefill_internal;
        proxy_pass http://decode_pool/mock/decode/v1/;
    }
    location /prefill_internal/ {
        internal;
        rewrite ^/prefill_internal(/.*)$ /mock/prefill$1 break;
        proxy_pass http://$prefill_bucket;
        subrequest_output_buffer_size 1m;
    }
    location = /plain { proxy_pass http://$prefill_bucket/mock/decode/; }
    location /mock/prefill/ { pdgate_echo prefill; }
    location /mock/decode/ { pdgate_echo; }
--- request eval
my $json = sub { "{\"model\":\"m\",\"max_tokens\":5,\"prompt\":\"" . ('p' x $_[0]) . "\"}" };
my $chunked = sub { sprintf "%x\r\n%s\r\n0\r\n\r\n", length $_[0], $_[0] };
["POST /v1/completions\n" . $json->(400), "POST /v1/completions\n" . $json->(400),
 "POST /v1/completions\n" . $chunked->($json->(40000)), "POST /plain\n" . $chunked->($json->(40000))]
--- more_headers eval
["", "", "Transfer-Encoding: chunked", "Transfer-Encoding: chunked"]
--- response_body_like eval
[qr/"prefill_request":\{.*"host":"prefill_short"/, qr/"prefill_request":\{.*"host":"prefill_short"/,
 qr/"prefill_request":\{.*"host":"prefill_long"/, qr/"host":"prefill_short"/]
--- no_error_log
[error]
[alert]



=== TEST 9: each decision is logged at debug level
--- http_config
    dynamic_bucket $len_bucket zone=len8:64k alpha=1 window=2 short_pool long_pool;
    $TEST_NGINX_POOLS
--- config
    location = /t { proxy_pass http://$len_bucket; }
--- request eval
[main::post(400), main::post(40000), main::post(400000), "GET /t"]
--- response_body_like eval
[qr/^short /, qr/^(short|long) /, qr/^long /, qr/^short /]
--- grep_error_log eval
qr/dynamic_bucket: \$len_bucket length [^,]+, boundaries \[[\d ]*\], bucket \d "\w+"/
--- grep_error_log_out eval
# One line per request (checked after each; the runner indexes arrays by repeat, not request).
$main::DEBUG
? qr/^dynamic_bucket: \$len_bucket (${\ CORE::join('|',
      'length 100 tokens, boundaries \[\], bucket 1 "short_pool"',
      'length 10000 tokens, boundaries \[\d+\], bucket [12] "\w+"',
      'length 100000 tokens, boundaries \[\d+\], bucket 2 "long_pool"',
      'length unknown, boundaries \[\d+\], bucket 1 "short_pool"')})\n$/
: ""
--- no_error_log
[error]
[alert]



=== TEST 10: an unknown parameter
--- http_config
    dynamic_bucket $b zone=z:64k beta=2 short_pool long_pool;
    $TEST_NGINX_POOLS
--- config
--- must_die
--- error_log
"dynamic_bucket" directive invalid parameter "beta=2"



=== TEST 11: alpha must be in (0, 1]
--- http_config
    dynamic_bucket $b zone=z:64k alpha=1.5 short_pool long_pool;
    $TEST_NGINX_POOLS
--- config
--- must_die
--- error_log
"dynamic_bucket" directive invalid alpha "1.5", it must be a number greater than 0 and at most 1



=== TEST 12: the window must be a positive number
--- http_config
    dynamic_bucket $b zone=z:64k window=0 short_pool long_pool;
    $TEST_NGINX_POOLS
--- config
--- must_die
--- error_log
"dynamic_bucket" directive invalid window "0", it must be a positive number of requests



=== TEST 13: at least two upstreams
--- http_config
    dynamic_bucket $b zone=z:64k alpha=0.5 short_pool;
    $TEST_NGINX_POOLS
--- config
--- must_die
--- error_log
"dynamic_bucket" directive needs at least 2 upstreams, one per bucket



=== TEST 14: the zone is required
--- http_config
    dynamic_bucket $b alpha=0.5 short_pool long_pool;
    $TEST_NGINX_POOLS
--- config
--- must_die
--- error_log
"dynamic_bucket" directive must have "zone" parameter



=== TEST 15: a zone needs at least 32k
--- http_config
    dynamic_bucket $b zone=z:8k short_pool long_pool;
    $TEST_NGINX_POOLS
--- config
--- must_die
--- error_log
"dynamic_bucket" directive zone "z" is too small, it must be at least 32k



=== TEST 16: a zone size must be a size
--- http_config
    dynamic_bucket $c zone=y:lots short_pool long_pool;
    $TEST_NGINX_POOLS
--- config
--- must_die
--- error_log
"dynamic_bucket" directive invalid zone size "lots"



=== TEST 17: a variable is declared once
--- http_config
    dynamic_bucket $b zone=z:64k short_pool long_pool;
    dynamic_bucket $b zone=y:64k short_pool long_pool;
    $TEST_NGINX_POOLS
--- config
--- must_die
--- error_log
the duplicate "b" variable



=== TEST 18: the variable cannot also be a map or set variable
--- http_config
    map $uri $b { default x; }
    dynamic_bucket $b zone=z:64k short_pool long_pool;
    $TEST_NGINX_POOLS
--- config
--- must_die
--- error_log
the duplicate "b" variable



=== TEST 19: two bucket sets cannot share a zone
--- http_config
    dynamic_bucket $b zone=z:64k short_pool long_pool;
    dynamic_bucket $c zone=z:64k short_pool long_pool;
    $TEST_NGINX_POOLS
--- config
--- must_die
--- error_log
"dynamic_bucket" directive zone "z" is already used by another dynamic_bucket



=== TEST 20: every name must be an upstream block
--- http_config
    dynamic_bucket $b zone=z:64k short_pool lnog_pool;
    $TEST_NGINX_POOLS
--- config
--- must_die
--- error_log eval
qr/\[emerg\] .*dynamic_bucket \$b: no upstream "lnog_pool" block in .*nginx\.conf:\d+/



=== TEST 21: the directive belongs in http
--- http_config
    $TEST_NGINX_POOLS
--- config
    location = /t { dynamic_bucket $b zone=z:64k short_pool long_pool; }
--- must_die
--- error_log
"dynamic_bucket" directive is not allowed here



=== TEST 22: the variable must be a variable
--- http_config
    dynamic_bucket b zone=z:64k short_pool long_pool;
    $TEST_NGINX_POOLS
--- config
--- must_die
--- error_log
"dynamic_bucket" directive invalid variable name "b"

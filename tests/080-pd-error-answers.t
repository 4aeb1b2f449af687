# The error handling every sample in nginx-conf/ (and every generated
# configuration) ships: each answer of a P/D location is OpenAI-style JSON
# and carries the request's X-Request-Id, including nginx's own errors
# (decode unreachable or timing out, no live decode server, a body over
# client_max_body_size, limit_req, a method other than POST).
#
# The error-handling lines are read from nginx-conf/pdgate-vllm.conf itself
# (the maps, the P/D location's tail and @pd_error), so these blocks prove
# the shipped text; 032 checks that every sample carries the same lines.
# The last blocks run them in SGLang mode (prefill_refactor), and the lines
# scripts/global_proxy.sh writes (its @pd_error sets the request id itself).
use FindBin;
use lib "$FindBin::Bin/common";
use Pdgate::TestEnv;
use Pdgate::GlobalProxy qw(run_gp slurp);
use File::Temp qw(tempdir);
use Test::Nginx::Socket 'no_plan';

my $sample = slurp("$FindBin::Bin/../nginx-conf/pdgate-vllm.conf") // die "pdgate-vllm.conf: $!";
our ($maps) = $sample =~ /^(    # nginx's own errors on the P\/D location.*?^    limit_req_status 429;\n)/ms
    or die "pdgate-vllm.conf: no error maps";
our ($tail) = $sample =~ /^(            # POST only\..*?^            add_header X-Request-Id \$http_x_request_id always;\n)/ms
    or die "pdgate-vllm.conf: no P/D location tail";
our ($unlimited) = $sample =~ /^(            # The client's body was checked by the P\/D location.*?^            client_max_body_size 0;\n)/ms
    or die "pdgate-vllm.conf: no client_max_body_size 0 in /prefill_internal/";
our ($named) = $sample =~ /^(        # The JSON error answers of the P\/D location\..*?^        }\n)/ms
    or die "pdgate-vllm.conf: no \@pd_error";

# --- decode_servers: the decode upstream's server lines
# --- decode_echo: pdgate_echo arguments of the decode mock
# --- pd_extra: more lines in the P/D location
sub config {
    my ($block) = @_;
    my $decho = $block->decode_echo // '';
    my $extra = $block->pd_extra // '';
    chomp $decho;
    return <<"_EOC_";
    set_request_id on;
    location ~ ^/v1/(chat/)?completions\$ {
        prefill /prefill_internal;
        proxy_pass http://decode_pool/mock/decode\$uri;
$extra
$tail    }
$named
    location /prefill_internal/ {
        internal;
        rewrite ^/prefill_internal(/.*)\$ /mock/prefill\$1 break;
        proxy_pass http://prefill_pool;
$unlimited    }
    location /mock/prefill/ { set_request_id off; pdgate_echo prefill; }
    # An engine that echoes an id of its own: the client must see the request's.
    location /mock/decode/ { set_request_id off; add_header X-Request-Id engine-id; pdgate_echo $decho; }
_EOC_
}

# SGLang mode (prefill_refactor, both legs at once); DECODE is replaced by
# the decode server's address.
our $SGLANG = <<"_EOC_";
    set_request_id on;
    location ~ ^/v1/(chat/)?completions\$ {
        prefill_refactor /prefill_internal;
        prefill_servers_list 127.0.0.1:\$TEST_NGINX_SERVER_PORT;
        pd_backend sglang;
        pd_distribution pd_together;
        proxy_pass http://DECODE/mock/decode\$uri;
$tail    }
$named
    location /prefill_internal/ {
        internal;
        rewrite ^/prefill_internal(/.*)\$ /mock/prefill\$1 break;
        proxy_pass http://\$prefill_server;
$unlimited    }
    location /mock/prefill/ { set_request_id off; pdgate_echo; }
    location /mock/decode/ { set_request_id off; add_header X-Request-Id engine-id; pdgate_echo; }
_EOC_

sub http_base {
    my ($dservers) = @_;
    return <<"_EOC_";
    upstream prefill_pool { server 127.0.0.1:\$TEST_NGINX_SERVER_PORT; }
    upstream decode_pool { $dservers }
    limit_req_zone \$connection zone=pd_per_connection:1m rate=1r/m;
_EOC_
}

# A proxy whose server{} sets client_max_body_size, as the samples' http{}
# does (the test server's own is fixed at 30M): the test server forwards
# /v1/ to it and keeps the mocks.
our $LIMITED = http_base("server 127.0.0.1:\$TEST_NGINX_SERVER_PORT;") . $maps . <<"_EOC_";
    server {
        listen 127.0.0.1:\$TEST_NGINX_RAND_PORT_1;
        client_max_body_size 100;
        set_request_id on;
        location ~ ^/v1/(chat/)?completions\$ {
            prefill /prefill_internal;
            proxy_pass http://decode_pool/mock/decode\$uri;
$tail        }
$named
        location /prefill_internal/ {
            internal;
            rewrite ^/prefill_internal(/.*)\$ /mock/prefill\$1 break;
            proxy_pass http://prefill_pool;
$unlimited        }
    }
_EOC_

# What scripts/global_proxy.sh writes: its maps, the completions location's
# tail and @pd_error, run in a server{} without set_request_id (the
# generator sets it per location) and with a small client_max_body_size;
# only answers that reach no leg are asked of it.
our $GENERATED = do {
    my $tmp = tempdir(CLEANUP => 1);
    my ($rc, undef, $err) = run_gp("-f $tmp/gp.conf --prefix $tmp --dry-run"
        . " --prefill-servers-list 127.0.0.1:1 --decode-servers-list 127.0.0.1:1");
    $rc == 0 or die "global_proxy.sh: $err";
    my $gp = slurp("$tmp/gp.conf");
    my ($gmaps) = $gp =~ /^(    # nginx's own errors on the completions location.*?^    limit_req_status 429;\n)/ms
        or die "global_proxy.sh: no error maps";
    my ($gtail) = $gp =~ /^(            # POST only; .*?^            add_header X-Request-Id \$http_x_request_id always;\n)/ms
        or die "global_proxy.sh: no completions location tail";
    my ($gnamed) = $gp =~ /^(        # The JSON error answers of the completions location\..*?^        }\n)/ms
        or die "global_proxy.sh: no \@pd_error";
    http_base("server 127.0.0.1:\$TEST_NGINX_SERVER_PORT;") . $gmaps . <<"_EOC_";
    server {
        listen 127.0.0.1:\$TEST_NGINX_RAND_PORT_1;
        client_max_body_size 16;
        location ~ ^/v1(/chat)?/completions\$ {
            set_request_id on;
            prefill /prefill_internal;
            proxy_pass http://decode_pool/mock/decode\$uri;
$gtail        }
$gnamed
    }
_EOC_
};

add_block_preprocessor(sub {
    my $block = shift;
    my $dservers = $block->decode_servers // "server 127.0.0.1:\$TEST_NGINX_SERVER_PORT;\n";
    $block->set_value("http_config", http_base($dservers) . $maps) unless defined $block->http_config;
    $block->set_value("config", config($block)) unless defined $block->config;
});

repeat_each(2);
no_shuffle();
run_tests();

__DATA__

=== TEST 1: a successful answer carries the request's X-Request-Id, once, in place of the engine's
--- request
POST /v1/completions
{"prompt":"p"}
--- error_code: 200
--- response_headers_like
X-Request-Id: [0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}
--- raw_response_headers_unlike eval
qr/X-Request-Id:.*X-Request-Id:|engine-id/s
--- no_error_log
[error]
[alert]



=== TEST 2: a decode upstream refusing connections: 502 in JSON, with X-Request-Id
--- decode_servers
server 127.0.0.1:1;
--- request
POST /v1/completions
{"prompt":"p"}
--- error_code: 502
--- response_body chomp
{"error":{"code":502,"message":"decode upstream is unreachable or sent an invalid response","param":null,"type":"BadGatewayError"}}
--- response_headers_like
Content-Type: application/json
X-Request-Id: [0-9a-f-]{36}
--- error_log
connect() failed (111: Connection refused) while connecting to upstream
--- no_error_log
[alert]



=== TEST 3: no live decode server (the only one is down): 502 in JSON, with X-Request-Id
--- decode_servers
server 127.0.0.1:1 down;
--- request
POST /v1/completions
{"prompt":"p"}
--- error_code: 502
--- response_body chomp
{"error":{"code":502,"message":"decode upstream is unreachable or sent an invalid response","param":null,"type":"BadGatewayError"}}
--- response_headers_like
X-Request-Id: [0-9a-f-]{36}
--- error_log
no live upstreams while connecting to upstream
--- no_error_log
[alert]



=== TEST 4: a decode timing out: 504 in JSON, with the client's own X-Request-Id
--- decode_echo
delay=2000
--- pd_extra
        proxy_read_timeout 300ms;
--- request
POST /v1/completions
{"prompt":"p"}
--- more_headers
X-Request-Id: client-id-7
--- timeout: 1.5
--- error_code: 504
--- response_body chomp
{"error":{"code":504,"message":"decode upstream timed out","param":null,"type":"GatewayTimeoutError"}}
--- response_headers
Content-Type: application/json
X-Request-Id: client-id-7
--- error_log
upstream timed out (110: Connection timed out) while reading response header from upstream
--- no_error_log
[alert]



=== TEST 5: a body over client_max_body_size: 413 in JSON, with X-Request-Id, and no leg is called
--- pd_extra
        client_max_body_size 16;
--- request
POST /v1/completions
{"prompt":"a prompt longer than sixteen bytes"}
--- error_code: 413
--- response_body chomp
{"error":{"code":413,"message":"request body is larger than client_max_body_size","param":null,"type":"RequestEntityTooLargeError"}}
--- response_headers_like
Content-Type: application/json
X-Request-Id: [0-9a-f-]{36}
--- error_log
client intended to send too large body
--- no_error_log
pdgate_echo:
[alert]



=== TEST 6: a chunked body over client_max_body_size (found while reading it): 413 in JSON, with X-Request-Id
--- pd_extra
        client_max_body_size 16;
--- raw_request eval
"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n2a\r\n{\"prompt\":\"aaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"}\r\n0\r\n\r\n"
--- error_code: 413
--- response_body chomp
{"error":{"code":413,"message":"request body is larger than client_max_body_size","param":null,"type":"RequestEntityTooLargeError"}}
--- response_headers_like
X-Request-Id: [0-9a-f-]{36}
--- error_log
client intended to send too large chunked body
--- no_error_log
pdgate_echo:
[alert]



=== TEST 7: a body just under client_max_body_size reaches both legs, though the prefill's body is larger
--- http_config eval
$main::LIMITED
--- config
    location /v1/ { proxy_pass http://127.0.0.1:$TEST_NGINX_RAND_PORT_1; }
    location /mock/prefill/ { pdgate_echo prefill; }
    location /mock/decode/ { pdgate_echo; }
--- request eval
"POST /v1/completions\n{\"prompt\":\"" . ("x" x 80) . "\"}"
--- error_code: 200
--- response_body_like chomp
"uri":"/mock/decode/v1/completions"
--- error_log
pdgate_echo: POST /mock/prefill/v1/completions
--- no_error_log
[error]



=== TEST 8: limit_req exceeded: 429 in JSON, with X-Request-Id (one request a minute per connection)
--- pd_extra
        limit_req zone=pd_per_connection;
--- pipelined_requests eval
["POST /v1/completions\n{\"prompt\":\"p\"}", "POST /v1/completions\n{\"prompt\":\"p\"}"]
--- error_code eval
[200, 429]
--- response_body_like eval
[qr/"uri":"\/mock\/decode\/v1\/completions"/,
 qr/^\Q{"error":{"code":429,"message":"too many requests, retry later","param":null,"type":"RateLimitError"}}\E$/]
--- response_headers_like eval
["X-Request-Id: [0-9a-f-]{36}", "X-Request-Id: [0-9a-f-]{36}"]
--- no_error_log
[alert]



=== TEST 9: a GET: 405 in JSON with Allow: POST and X-Request-Id, and no leg is called
--- request
GET /v1/chat/completions
--- error_code: 405
--- response_body chomp
{"error":{"code":405,"message":"method not allowed, use POST","param":null,"type":"BadRequestError"}}
--- response_headers_like
Allow: POST
Content-Type: application/json
X-Request-Id: [0-9a-f-]{36}
--- no_error_log
pdgate_echo:
[error]



=== TEST 10: Allow is sent with the 405 only
--- decode_servers
server 127.0.0.1:1;
--- request
POST /v1/completions
{"prompt":"p"}
--- error_code: 502
--- response_headers
!Allow



=== TEST 11: the module's own errors (a refused request) carry X-Request-Id too
--- request
POST /v1/completions
{"prompt":"p","n":2}
--- more_headers
X-Request-Id: client-id-9
--- error_code: 400
--- response_body_like chomp
^\{"error":\{"code":400,"message":"\\"n\\": 2 is not supported
--- response_headers
Content-Type: application/json
X-Request-Id: client-id-9
--- no_error_log
pdgate_echo:



=== TEST 12: SGLang mode: a decode refusing connections is a 502 in JSON, with X-Request-Id
--- config eval
$main::SGLANG =~ s/DECODE/127.0.0.1:1/r
--- request
POST /v1/completions
{"prompt":"p"}
--- error_code: 502
--- response_body chomp
{"error":{"code":502,"message":"decode upstream is unreachable or sent an invalid response","param":null,"type":"BadGatewayError"}}
--- response_headers_like
Content-Type: application/json
X-Request-Id: [0-9a-f-]{36}
--- error_log
connect() failed (111: Connection refused) while connecting to upstream
--- no_error_log
[alert]



=== TEST 13: SGLang mode: a GET is a 405 in JSON with Allow: POST, and no leg is called
--- config eval
$main::SGLANG =~ s/DECODE/127.0.0.1:\$TEST_NGINX_SERVER_PORT/r
--- request
GET /v1/completions
--- error_code: 405
--- response_body chomp
{"error":{"code":405,"message":"method not allowed, use POST","param":null,"type":"BadRequestError"}}
--- response_headers_like
Allow: POST
X-Request-Id: [0-9a-f-]{36}
--- no_error_log
pdgate_echo:
[error]



=== TEST 14: SGLang mode: a successful answer carries the request's X-Request-Id, in place of the engine's
--- config eval
$main::SGLANG =~ s/DECODE/127.0.0.1:\$TEST_NGINX_SERVER_PORT/r
--- request
POST /v1/completions
{"prompt":"p"}
--- error_code: 200
--- response_body_like chomp
"bootstrap_room":\d+
--- response_headers_like
X-Request-Id: [0-9a-f-]{36}
--- raw_response_headers_unlike eval
qr/X-Request-Id:.*X-Request-Id:|engine-id/s
--- no_error_log
[error]



=== TEST 15: SGLang mode: a chunked body over client_max_body_size is a 413 in JSON, with X-Request-Id
--- config eval
$main::SGLANG =~ s/DECODE/127.0.0.1:\$TEST_NGINX_SERVER_PORT/r =~ s/(pd_distribution pd_together;)/$1\n        client_max_body_size 16;/r
--- raw_request eval
"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n2a\r\n{\"prompt\":\"aaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"}\r\n0\r\n\r\n"
--- error_code: 413
--- response_body chomp
{"error":{"code":413,"message":"request body is larger than client_max_body_size","param":null,"type":"RequestEntityTooLargeError"}}
--- response_headers_like
X-Request-Id: [0-9a-f-]{36}
--- no_error_log
pdgate_echo:
[alert]



=== TEST 16: the generated configuration: a body over client_max_body_size is a 413 in JSON, with X-Request-Id
--- http_config eval
$main::GENERATED
--- config
    location /v1/ { proxy_pass http://127.0.0.1:$TEST_NGINX_RAND_PORT_1; }
--- request
POST /v1/completions
{"prompt":"a prompt longer than sixteen bytes"}
--- error_code: 413
--- response_body chomp
{"error":{"code":413,"message":"request body is larger than client_max_body_size","param":null,"type":"RequestEntityTooLargeError"}}
--- response_headers_like
X-Request-Id: [0-9a-f-]{36}
--- no_error_log
[alert]



=== TEST 17: the generated configuration: a GET is a 405 in JSON with Allow: POST and X-Request-Id
--- http_config eval
$main::GENERATED
--- config
    location /v1/ { proxy_pass http://127.0.0.1:$TEST_NGINX_RAND_PORT_1; }
--- request
GET /v1/chat/completions
--- error_code: 405
--- response_body chomp
{"error":{"code":405,"message":"method not allowed, use POST","param":null,"type":"BadRequestError"}}
--- response_headers_like
Allow: POST
X-Request-Id: [0-9a-f-]{36}
--- no_error_log
[error]

# ngx_http_upstream_least_total_load_module: picks the peer whose in-flight
# work drains first, counters shared in a zone, keepalive kept in either
# directive order, retries go to untried peers.
use FindBin;
use lib "$FindBin::Bin/common";
use Pdgate::TestEnv;
use Test::Nginx::Socket 'no_plan';

repeat_each(2);
no_shuffle();
run_tests();

__DATA__

=== TEST 1: an idle pool goes by weight (round robin would alternate)
--- http_config
    upstream pool {
        server 127.0.0.1:$TEST_NGINX_RAND_PORT_1 weight=2;
        server 127.0.0.1:$TEST_NGINX_RAND_PORT_2;
        least_total_load on;
    }
    server { listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1; add_header X-Backend a; location / { pdgate_echo; } }
    server { listen 127.0.0.1:$TEST_NGINX_RAND_PORT_2; add_header X-Backend b; location / { pdgate_echo; } }
--- config
    location = /t { proxy_pass http://pool/echo; }
--- request eval
["POST /t\n{\"prompt\":\"hello\"}", "POST /t\n{\"prompt\":\"hello\"}", "POST /t\n{\"prompt\":\"hello\"}"]
--- response_headers eval
["X-Backend: a", "X-Backend: a", "X-Backend: a"]
--- no_error_log
[error]
[alert]



=== TEST 2: keepalive before the balancer directive still reuses connections
--- http_config
    upstream pool {
        keepalive 4;
        server 127.0.0.1:$TEST_NGINX_RAND_PORT_1;
        least_total_load on;
    }
    server { listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1; location / { pdgate_echo; } }
--- config
    location = /t {
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_pass http://pool/echo;
    }
--- request eval
["GET /t", "GET /t", "GET /t"]
--- response_body_like eval
[qr/"connection_requests":\d+/, qr/"connection_requests":([2-9]|\d\d)/, qr/"connection_requests":([3-9]|\d\d)/]
--- no_error_log
[error]



=== TEST 3: keepalive after the balancer directive reuses connections too
--- http_config
    upstream pool {
        server 127.0.0.1:$TEST_NGINX_RAND_PORT_1;
        least_total_load on;
        keepalive 4;
    }
    server { listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1; location / { pdgate_echo; } }
--- config
    location = /t {
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_pass http://pool/echo;
    }
--- request eval
["GET /t", "GET /t", "GET /t"]
--- response_body_like eval
[qr/"connection_requests":\d+/, qr/"connection_requests":([2-9]|\d\d)/, qr/"connection_requests":([3-9]|\d\d)/]
--- no_error_log
[error]



=== TEST 4: a dead peer is retried on a live one
--- http_config
    upstream pool {
        server 127.0.0.1:1 weight=5 max_fails=0;
        server 127.0.0.1:$TEST_NGINX_RAND_PORT_1;
        least_total_load on;
    }
    server { listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1; add_header X-Backend live; location / { pdgate_echo; } }
--- config
    location = /t {
        proxy_pass http://pool/echo;
        add_header X-Tries $upstream_addr;
    }
--- request
GET /t
--- response_headers_like
X-Backend: live
X-Tries: 127.0.0.1:1, 127.0.0.1:\d+
--- error_log
connect() failed (111: Connection refused) while connecting to upstream
--- no_error_log
[alert]



=== TEST 5: a peer that failed is avoided afterwards
--- http_config
    upstream pool {
        server 127.0.0.1:1 weight=5;
        server 127.0.0.1:$TEST_NGINX_RAND_PORT_1;
        least_total_load on;
    }
    server { listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1; add_header X-Backend live; location / { pdgate_echo; } }
--- config
    location = /t {
        proxy_pass http://pool/echo;
        add_header X-Tries $upstream_addr;
    }
--- request eval
["GET /t", "GET /t", "GET /t"]
--- response_headers_like eval
["X-Backend: live", "X-Tries: 127.0.0.1:\\d+\$", "X-Tries: 127.0.0.1:\\d+\$"]
--- no_error_log
[alert]



=== TEST 6: a down peer is never chosen
--- http_config
    upstream pool {
        server 127.0.0.1:$TEST_NGINX_RAND_PORT_2 weight=9 down;
        server 127.0.0.1:$TEST_NGINX_RAND_PORT_1;
        least_total_load on;
    }
    server { listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1; add_header X-Backend up; location / { pdgate_echo; } }
    server { listen 127.0.0.1:$TEST_NGINX_RAND_PORT_2; add_header X-Backend down; location / { pdgate_echo; } }
--- config
    location = /t {
        proxy_pass http://pool/echo;
    }
--- request eval
["GET /t", "GET /t", "GET /t"]
--- response_headers eval
["X-Backend: up", "X-Backend: up", "X-Backend: up"]
--- no_error_log
[error]



=== TEST 7: off means round robin
--- http_config
    upstream pool {
        server 127.0.0.1:$TEST_NGINX_RAND_PORT_1;
        server 127.0.0.1:$TEST_NGINX_RAND_PORT_2;
        least_total_load off;
    }
    server { listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1; location / { return 200 "a\n"; } }
    server { listen 127.0.0.1:$TEST_NGINX_RAND_PORT_2; location / { return 200 "b\n"; } }
--- config
    location = /t { proxy_pass http://pool; }
--- request eval
["GET /t", "GET /t", "GET /t", "GET /t"]
--- response_body eval
["a\n", "b\n", "a\n", "b\n"]
--- no_error_log
[error]



=== TEST 8: the flag is on or off
--- http_config
    upstream pool { server 127.0.0.1:1; least_total_load yes; }
--- config
    location = /t { return 204; }
--- must_die
--- error_log
invalid value "yes" in "least_total_load" directive, it must be "on" or "off"



=== TEST 9: the batch size must be positive
--- http_config
    upstream pool { server 127.0.0.1:1; least_total_load on; least_total_load_batch_size 0; }
--- config
    location = /t { return 204; }
--- must_die
--- error_log
invalid value "0" in "least_total_load_batch_size" directive, it must be a positive number



=== TEST 10: the directive belongs in an upstream block
--- config
    location = /t { least_total_load on; return 204; }
--- must_die
--- error_log
"least_total_load" directive is not allowed here



=== TEST 11: twice in one upstream is a duplicate
--- http_config
    upstream pool { server 127.0.0.1:1; least_total_load on; least_total_load off; }
--- config
    location = /t { return 204; }
--- must_die
--- error_log
"least_total_load" directive is duplicate



=== TEST 12: upstreams without the balancer, explicit or implicit, are untouched
--- http_config
    upstream plain { server 127.0.0.1:$TEST_NGINX_RAND_PORT_1; }
    server { listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1; location / { return 200 "plain\n"; } }
--- config
    location = /a { proxy_pass http://plain/; }
    location = /b { proxy_pass http://127.0.0.1:$TEST_NGINX_RAND_PORT_1/; }
--- request eval
["GET /a", "GET /b"]
--- response_body eval
["plain\n", "plain\n"]
--- no_error_log
[error]
[alert]



=== TEST 13: an upstream with a shared zone (peers in shared memory) is balanced too
--- http_config
    upstream pool {
        zone pool_zone 64k;
        server 127.0.0.1:$TEST_NGINX_RAND_PORT_1 weight=3;
        server 127.0.0.1:$TEST_NGINX_RAND_PORT_2;
        least_total_load on;
    }
    server { listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1; add_header X-Backend a; location / { pdgate_echo; } }
    server { listen 127.0.0.1:$TEST_NGINX_RAND_PORT_2; add_header X-Backend b; location / { pdgate_echo; } }
--- config
    location = /t { proxy_pass http://pool/echo; }
--- request eval
["GET /t", "GET /t", "GET /t", "GET /t"]
--- response_headers eval
["X-Backend: a", "X-Backend: a", "X-Backend: a", "X-Backend: a"]
--- no_error_log
[error]



=== TEST 14: the status page lists every peer, and the counters are back to zero once requests end
--- http_config
    upstream pool {
        server 127.0.0.1:$TEST_NGINX_RAND_PORT_1;
        server 127.0.0.1:$TEST_NGINX_RAND_PORT_2;
        least_total_load on;
    }
    server { listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1; location / { pdgate_echo; } }
    server { listen 127.0.0.1:$TEST_NGINX_RAND_PORT_2; location / { pdgate_echo; } }
--- config
    location = /t { proxy_pass http://pool/echo; }
    location = /status { least_total_load_status; }
--- request eval
["POST /t\n{\"prompt\":\"a long enough prompt\"}", "POST /t\n{\"prompt\":\"another\"}", "GET /status"]
--- response_body_like eval
[qr/"method":"POST"/, qr/"method":"POST"/, qr/\A# least_total_load upstream peer requests tokens cost total\npool 127\.0\.0\.1:\d+ 0 0 0 \d+\npool 127\.0\.0\.1:\d+ 0 0 0 \d+\n\z/]
--- no_error_log
[error]

# ngx_http_upstream_greedy_timeout_module: the earliest virtual finish time of the work in flight.
use FindBin;
use lib "$FindBin::Bin/common";
use Pdgate::TestEnv;
use Test::Nginx::Socket 'no_plan';

repeat_each(2);
no_shuffle();
run_tests();

__DATA__

=== TEST 1: keepalive declared before the balancer still reuses connections
--- http_config
    upstream pool {
        keepalive 4;
        server 127.0.0.1:$TEST_NGINX_RAND_PORT_1;
        greedy_timeout on;
        greedy_timeout_warmup 10;
        greedy_timeout_exp 1.5;
    }
    server { listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1; location / { pdgate_echo; } }
--- config
    location = /t {
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_pass http://pool/echo;
    }
--- request eval
["POST /t\n{\"prompt\":\"p\"}", "POST /t\n{\"prompt\":\"p\"}"]
--- response_body_like eval
[qr/"connection_requests":\d+/, qr/"connection_requests":([2-9]|\d\d)/]
--- no_error_log
[error]
[alert]



=== TEST 2: a dead peer is retried on a live one
--- http_config
    upstream pool {
        server 127.0.0.1:1 weight=5 max_fails=0;
        server 127.0.0.1:$TEST_NGINX_RAND_PORT_1;
        greedy_timeout on;
        greedy_timeout_warmup 10;
        greedy_timeout_exp 1.5;
    }
    server { listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1; add_header X-Backend live; location / { pdgate_echo; } }
--- config
    location = /t { proxy_pass http://pool/echo; add_header X-Tries $upstream_addr; }
--- request
GET /t
--- response_headers_like
X-Backend: live
X-Tries: 127.0.0.1:1, 127.0.0.1:\d+
--- error_log
connect() failed (111: Connection refused) while connecting to upstream
--- no_error_log
[alert]



=== TEST 3: an idle pool goes by weight (round robin would alternate)
--- http_config
    upstream pool {
        server 127.0.0.1:$TEST_NGINX_RAND_PORT_1 weight=3;
        server 127.0.0.1:$TEST_NGINX_RAND_PORT_2;
        greedy_timeout on;
        greedy_timeout_warmup 10;
        greedy_timeout_exp 1.5;
    }
    server { listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1; add_header X-Backend a; location / { pdgate_echo; } }
    server { listen 127.0.0.1:$TEST_NGINX_RAND_PORT_2; add_header X-Backend b; location / { pdgate_echo; } }
--- config
    location = /t { proxy_pass http://pool/echo; }
--- request eval
["GET /t", "GET /t", "GET /t"]
--- response_headers eval
["X-Backend: a", "X-Backend: a", "X-Backend: a"]
--- no_error_log
[error]



=== TEST 4: off means round robin
--- http_config
    upstream pool {
        server 127.0.0.1:$TEST_NGINX_RAND_PORT_1;
        server 127.0.0.1:$TEST_NGINX_RAND_PORT_2;
        greedy_timeout off;
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



=== TEST 5: the flag is on or off
--- http_config
    upstream pool { server 127.0.0.1:1; greedy_timeout 1; }
--- config
    location = /t { return 204; }
--- must_die
--- error_log
"greedy_timeout" directive invalid value "1", it must be "on" or "off"



=== TEST 6: the exponent is a non-negative number
--- http_config
    upstream pool { server 127.0.0.1:1; greedy_timeout on; greedy_timeout_exp -3; }
--- config
    location = /t { return 204; }
--- must_die
--- error_log
"greedy_timeout_exp" directive invalid value "-3", it must be a non-negative number



=== TEST 7: the warmup once
--- http_config
    upstream pool { server 127.0.0.1:1; greedy_timeout on; greedy_timeout_warmup 1; greedy_timeout_warmup 2; }
--- config
    location = /t { return 204; }
--- must_die
--- error_log
"greedy_timeout_warmup" directive is duplicate



=== TEST 8: the status page shows the cost counters back to zero once requests end
--- http_config
    upstream pool {
        server 127.0.0.1:$TEST_NGINX_RAND_PORT_1;
        greedy_timeout on;
    }
    server { listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1; location / { pdgate_echo; } }
--- config
    location = /t { proxy_pass http://pool/echo; }
    location = /status { greedy_timeout_status; }
--- request eval
["POST /t\n{\"prompt\":\"a prompt of some length\"}", "GET /status"]
--- response_body_like eval
[qr/"method":"POST"/, qr/\A# greedy_timeout upstream peer requests tokens cost total\npool 127\.0\.0\.1:\d+ 0 0 0 [1-9]\d*\n\z/]
--- no_error_log
[error]

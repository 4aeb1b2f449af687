# ngx_http_upstream_prefill_score_balance_module: the least marginal waiting time, with a linear prefill cost.
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
        prefill_score_balance on;
        prefill_score_balance_a 0.05;
        prefill_score_balance_b 100;
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
        prefill_score_balance on;
        prefill_score_balance_a 0.05;
        prefill_score_balance_b 100;
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
        prefill_score_balance on;
        prefill_score_balance_a 0.05;
        prefill_score_balance_b 100;
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
        prefill_score_balance off;
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
    upstream pool { server 127.0.0.1:1; prefill_score_balance 1; }
--- config
    location = /t { return 204; }
--- must_die
--- error_log
"prefill_score_balance" directive invalid value "1", it must be "on" or "off"



=== TEST 6: the cost coefficients are non-negative numbers
--- http_config
    upstream pool { server 127.0.0.1:1; prefill_score_balance on; prefill_score_balance_b -3; }
--- config
    location = /t { return 204; }
--- must_die
--- error_log
"prefill_score_balance_b" directive invalid value "-3", it must be a non-negative number



=== TEST 7: each coefficient once
--- http_config
    upstream pool { server 127.0.0.1:1; prefill_score_balance on; prefill_score_balance_a 1; prefill_score_balance_a 2; }
--- config
    location = /t { return 204; }
--- must_die
--- error_log
"prefill_score_balance_a" directive is duplicate

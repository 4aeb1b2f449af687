# ngx_http_upstream_length_balance_module: the peer that received the least
# recent work (requests + tokens placed, decayed). Its history makes the
# common "idle pool goes by weight" block not apply (a weight-3 peer gets
# three times the history, not every request), so its blocks are here.
use FindBin;
use lib "$FindBin::Bin/common";
use Pdgate::TestEnv;
BEGIN {
    $ENV{TEST_NGINX_BALANCER} = 'length_balance';
    $ENV{TEST_NGINX_BALANCER_ON} = 'length_balance';
    $ENV{TEST_NGINX_BALANCER_VALUES} = '"on" or "off"';
    $ENV{TEST_NGINX_BALANCER_PARAMS} = 'length_balance_merge_threshold 8; length_balance_decay_factor 2; length_balance_req_len_weight 0.5;';
}
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
        $TEST_NGINX_BALANCER_ON; $TEST_NGINX_BALANCER_PARAMS
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
        $TEST_NGINX_BALANCER_ON; $TEST_NGINX_BALANCER_PARAMS
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




=== TEST 3: off means round robin
--- http_config
    upstream pool {
        server 127.0.0.1:$TEST_NGINX_RAND_PORT_1;
        server 127.0.0.1:$TEST_NGINX_RAND_PORT_2;
        $TEST_NGINX_BALANCER off;
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




=== TEST 4: the flag is on or off
--- http_config
    upstream pool { server 127.0.0.1:1; $TEST_NGINX_BALANCER 1; }
--- config
    location = /t { return 204; }
--- must_die
--- error_log eval
qq{invalid value "1" in "$ENV{TEST_NGINX_BALANCER}" directive, it must be $ENV{TEST_NGINX_BALANCER_VALUES}}



=== TEST 5: weights share the history: a weight-3 peer takes 3 of 4 equal requests
--- http_config
    upstream pool {
        server 127.0.0.1:$TEST_NGINX_RAND_PORT_1 weight=3;
        server 127.0.0.1:$TEST_NGINX_RAND_PORT_2;
        length_balance;
        length_balance_req_len_weight 0;
    }
    server { listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1; add_header X-Backend a; location / { pdgate_echo; } }
    server { listen 127.0.0.1:$TEST_NGINX_RAND_PORT_2; add_header X-Backend b; location / { pdgate_echo; } }
--- config
    location = /t { proxy_pass http://pool/echo; }
--- request eval
["GET /t", "GET /t", "GET /t", "GET /t"]
--- response_headers eval
["X-Backend: a", "X-Backend: a", "X-Backend: a", "X-Backend: b"]
--- no_error_log
[error]



=== TEST 6: the bare directive and "on" are the same; parameters are checked
--- http_config
    upstream pool { server 127.0.0.1:1; length_balance; length_balance_decay_factor 0; }
--- config
    location = /t { return 204; }
--- must_die
--- error_log
invalid value "0" in "length_balance_decay_factor" directive, it must be a positive number

# The balancing method of an upstream block: a pdgate balancer given after
# another method (pdgate's or nginx's), or nginx's after a pdgate balancer,
# warns "load balancing method redefined" at startup, as nginx's own
# balancers do; keepalive is not a method. Startup lines are seen by a
# block's first request only, hence one repeat.
use FindBin;
use lib "$FindBin::Bin/common";
use Pdgate::TestEnv;
use Test::Nginx::Socket 'no_plan';

repeat_each(1);
no_shuffle();
run_tests();

__DATA__

=== TEST 1: a second pdgate balancer in one upstream warns that the method is redefined
--- http_config
    upstream pool { server 127.0.0.1:$TEST_NGINX_RAND_PORT_1; least_total_load on; weighted_least_active on; }
    server { listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1; location / { return 200 "up\n"; } }
--- config
    location = /t { proxy_pass http://pool/; }
--- request
GET /t
--- response_body
up
--- error_log
load balancing method redefined



=== TEST 2: a pdgate balancer after nginx's least_conn warns
--- http_config
    upstream pool { server 127.0.0.1:$TEST_NGINX_RAND_PORT_1; least_conn; greedy_timeout on; }
    server { listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1; location / { return 200 "up\n"; } }
--- config
    location = /t { proxy_pass http://pool/; }
--- request
GET /t
--- response_body
up
--- error_log
load balancing method redefined



=== TEST 3: nginx's hash after a pdgate balancer warns (nginx's own check sees it)
--- http_config
    upstream pool { server 127.0.0.1:$TEST_NGINX_RAND_PORT_1; prefill_score_balance on; hash $request_uri; }
    server { listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1; location / { return 200 "up\n"; } }
--- config
    location = /t { proxy_pass http://pool/; }
--- request
GET /t
--- response_body
up
--- error_log
load balancing method redefined



=== TEST 4: keepalive before or after a balancer is not a method
--- http_config
    upstream a { server 127.0.0.1:$TEST_NGINX_RAND_PORT_1; keepalive 4; least_total_load on; }
    upstream b { server 127.0.0.1:$TEST_NGINX_RAND_PORT_1; auto_balance_controller on; keepalive 4; }
    server { listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1; location / { return 200 "up\n"; } }
--- config
    location = /a { proxy_pass http://a/; proxy_http_version 1.1; proxy_set_header Connection ""; }
    location = /b { proxy_pass http://b/; proxy_http_version 1.1; proxy_set_header Connection ""; }
--- request eval
["GET /a", "GET /b"]
--- response_body eval
["up\n", "up\n"]
--- no_error_log
redefined
[error]



=== TEST 5: off does not claim the method
--- http_config
    upstream pool { server 127.0.0.1:$TEST_NGINX_RAND_PORT_1; least_total_load off; least_conn; }
    server { listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1; location / { return 200 "up\n"; } }
--- config
    location = /t { proxy_pass http://pool/; }
--- request
GET /t
--- response_body
up
--- no_error_log
redefined
[error]

# ngx_http_set_request_id_module: X-Request-Id and trace headers on the
# request, so every upstream leg carries them.
use FindBin;
use lib "$FindBin::Bin/common";
use Pdgate::TestEnv;
use Test::Nginx::Socket 'no_plan';

repeat_each(2);
no_shuffle();
run_tests();

__DATA__

=== TEST 1: a request without an id gets a lowercase UUID v4 on the upstream leg
--- config
    set_request_id on;
    location /up/ { proxy_pass http://127.0.0.1:$TEST_NGINX_SERVER_PORT/mock/; }
    location /mock/ { pdgate_echo; }
--- request
GET /up/x
--- response_body_like eval
qr/"x-request-id":"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"/
--- error_log eval
qr/set_request_id: X-Request-Id [0-9a-f-]{36}/
--- no_error_log
[error]
[alert]



=== TEST 2: a client's X-Request-Id is kept, never replaced or doubled
--- config
    set_request_id on;
    location /up/ { proxy_pass http://127.0.0.1:$TEST_NGINX_SERVER_PORT/mock/; }
    location /mock/ { pdgate_echo; }
--- request
GET /up/x
--- more_headers
X-Request-Id: client-id-42
--- response_body_like eval
qr/"x-request-id":"client-id-42"/
--- no_error_log
set_request_id: X-Request-Id
[error]



=== TEST 3: off (the default) adds nothing
--- config
    location /up/ { proxy_pass http://127.0.0.1:$TEST_NGINX_SERVER_PORT/mock/; }
    location /mock/ { pdgate_echo; }
--- request
GET /up/x
--- response_body_unlike
x-request-id
--- no_error_log
[error]



=== TEST 4: a location's off overrides the server's on
--- config
    set_request_id on;
    location /up/ { set_request_id off; proxy_pass http://127.0.0.1:$TEST_NGINX_SERVER_PORT/mock/; }
    location /mock/ { set_request_id off; pdgate_echo; }
--- request
GET /up/x
--- response_body_unlike
x-request-id
--- no_error_log
[error]



=== TEST 5: set_trace_headers_force generates a W3C traceparent and the timing headers
--- http_config
    underscores_in_headers on;
--- config
    set_trace_headers_force on;
    location /up/ { proxy_pass http://127.0.0.1:$TEST_NGINX_SERVER_PORT/mock/; }
    location /mock/ { set_trace_headers_force off; pdgate_echo; }
--- request
GET /up/x
--- response_body_like eval
qr/"start_time_ns":"\d{16,}".*"traceparent":"(00-[0-9a-f]{32}-[0-9a-f]{16}-01)","ttft_start_time":"\d{16,}","ttft_traceparent":"\1"/
--- no_error_log
[error]



=== TEST 6: a client's traceparent is kept and copied to TTFT_traceparent
--- http_config
    underscores_in_headers on;
--- config
    set_request_id on;
    location /up/ { proxy_pass http://127.0.0.1:$TEST_NGINX_SERVER_PORT/mock/; }
    location /mock/ { set_request_id off; pdgate_echo; }
--- request
GET /up/x
--- more_headers
traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01
--- response_body_like eval
qr/"traceparent":"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01","ttft_start_time":"\d+","ttft_traceparent":"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"/
--- no_error_log
[error]



=== TEST 7: without either directive a traceparent is left alone
--- http_config
    underscores_in_headers on;
--- config
    location /up/ { proxy_pass http://127.0.0.1:$TEST_NGINX_SERVER_PORT/mock/; }
    location /mock/ { pdgate_echo; }
--- request
GET /up/x
--- more_headers
traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01
--- response_body_unlike
ttft_traceparent
--- no_error_log
[error]



=== TEST 8: a client X-Request-Id longer than 128 bytes is replaced by a generated one, with a warning
--- config
    set_request_id on;
    location /up/ { proxy_pass http://127.0.0.1:$TEST_NGINX_SERVER_PORT/mock/; }
    location /mock/ { pdgate_echo; }
--- request
GET /up/x
--- more_headers
X-Request-Id: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa
--- response_body_like eval
qr/"x-request-id":"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"/
--- response_body_unlike
aaaaaaaaaaaaaaaaaaaa
--- error_log eval
qr/set_request_id: client X-Request-Id replaced by [0-9a-f-]{36} \(200 bytes long \(at most 128\)\)/
--- no_error_log
[error]



=== TEST 9: a client X-Request-Id with a byte outside [A-Za-z0-9._:-] is replaced
--- config
    set_request_id on;
    location /up/ { proxy_pass http://127.0.0.1:$TEST_NGINX_SERVER_PORT/mock/; }
    location /mock/ { pdgate_echo; }
--- request
GET /up/x
--- more_headers
X-Request-Id: abc<script>
--- response_body_like eval
qr/"x-request-id":"[0-9a-f]{8}-[0-9a-f-]{27}"/
--- response_body_unlike
script
--- error_log
a byte outside [A-Za-z0-9._:-] at offset 3
--- no_error_log
[error]



=== TEST 10: two client X-Request-Id headers become one generated id on the leg
--- config
    set_request_id on;
    location /up/ { proxy_pass http://127.0.0.1:$TEST_NGINX_SERVER_PORT/mock/; }
    location /mock/ { pdgate_echo; }
--- request
GET /up/x
--- more_headers
X-Request-Id: first-id
X-Request-Id: second-id
--- response_body_like eval
qr/"x-request-id":"[0-9a-f]{8}-[0-9a-f-]{27}"/
--- response_body_unlike
first-id|second-id
--- error_log
client X-Request-Id replaced
--- no_error_log
[error]

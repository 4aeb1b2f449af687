# The prefill leg is retried on another prefill server when it fails before
# answering (proxy_next_upstream error timeout non_idempotent, as the
# generator and the samples write it): a peer that closes the connection
# after reading the request (return 444) costs a retry, never the request.
use FindBin;
use lib "$FindBin::Bin/common";
use Pdgate::TestEnv;
use Test::Nginx::Socket 'no_plan';

repeat_each(2);
no_shuffle();
add_block_preprocessor(\&Pdgate::TestEnv::pd_defaults);

run_tests();

__DATA__

=== TEST 1: two prefill peers, one resetting after the request: every request succeeds through the other
--- http_config
    upstream prefill_two {
        server 127.0.0.2:$TEST_NGINX_SERVER_PORT max_fails=0;
        server 127.0.0.1:$TEST_NGINX_SERVER_PORT max_fails=0;
    }
    upstream decode_pool { server 127.0.0.1:$TEST_NGINX_SERVER_PORT; }
    server {
        listen 127.0.0.2:$TEST_NGINX_SERVER_PORT;
        location / { return 444; }
    }
--- config
    set_request_id on;
    location /v1/ {
        prefill /prefill_internal;
        proxy_pass http://decode_pool/mock/decode/v1/;
    }
    location /prefill_internal/ {
        internal;
        rewrite ^/prefill_internal(/.*)$ /mock/prefill$1 break;
        proxy_pass http://prefill_two;
        proxy_next_upstream error timeout non_idempotent;
        proxy_next_upstream_tries 2;
        proxy_next_upstream_timeout 30s;
        subrequest_output_buffer_size 64k;
    }
    location /mock/prefill/ { set_request_id off; pdgate_echo prefill; }
    location /mock/decode/ { set_request_id off; pdgate_echo; }
--- request eval
["POST /v1/completions\n{\"prompt\":\"p\"}",
 "POST /v1/completions\n{\"prompt\":\"p\"}",
 "POST /v1/completions\n{\"prompt\":\"p\"}",
 "POST /v1/completions\n{\"prompt\":\"p\"}"]
--- error_code eval
[200, 200, 200, 200]
--- response_body_like eval
[qr/"uri":"\/mock\/decode\/v1\/completions"/, qr/"uri":"\/mock\/decode\/v1\/completions"/,
 qr/"uri":"\/mock\/decode\/v1\/completions"/, qr/"uri":"\/mock\/decode\/v1\/completions"/]
--- no_error_log
[alert]
[crit]



=== TEST 2: without non_idempotent the same failure is not retried (POST): 502
--- http_config
    upstream prefill_two {
        server 127.0.0.2:$TEST_NGINX_SERVER_PORT max_fails=0;
        server 127.0.0.1:$TEST_NGINX_SERVER_PORT backup;
    }
    upstream decode_pool { server 127.0.0.1:$TEST_NGINX_SERVER_PORT; }
    server {
        listen 127.0.0.2:$TEST_NGINX_SERVER_PORT;
        location / { return 444; }
    }
--- config
    set_request_id on;
    location /v1/ {
        prefill /prefill_internal;
        proxy_pass http://decode_pool/mock/decode/v1/;
    }
    location /prefill_internal/ {
        internal;
        rewrite ^/prefill_internal(/.*)$ /mock/prefill$1 break;
        proxy_pass http://prefill_two;
        proxy_next_upstream error timeout;
        subrequest_output_buffer_size 64k;
    }
    location /mock/prefill/ { set_request_id off; pdgate_echo prefill; }
    location /mock/decode/ { set_request_id off; pdgate_echo; }
--- request
POST /v1/completions
{"prompt":"p"}
--- error_code: 502
--- no_error_log
[alert]
[crit]



=== TEST 3: with non_idempotent the failing peer's backup answers the prefill: 200
--- http_config
    upstream prefill_two {
        server 127.0.0.2:$TEST_NGINX_SERVER_PORT max_fails=0;
        server 127.0.0.1:$TEST_NGINX_SERVER_PORT backup;
    }
    upstream decode_pool { server 127.0.0.1:$TEST_NGINX_SERVER_PORT; }
    server {
        listen 127.0.0.2:$TEST_NGINX_SERVER_PORT;
        location / { return 444; }
    }
--- config
    set_request_id on;
    location /v1/ {
        prefill /prefill_internal;
        proxy_pass http://decode_pool/mock/decode/v1/;
    }
    location /prefill_internal/ {
        internal;
        rewrite ^/prefill_internal(/.*)$ /mock/prefill$1 break;
        proxy_pass http://prefill_two;
        proxy_next_upstream error timeout non_idempotent;
        proxy_next_upstream_tries 2;
        subrequest_output_buffer_size 64k;
    }
    location /mock/prefill/ { set_request_id off; pdgate_echo prefill; }
    location /mock/decode/ { set_request_id off; pdgate_echo; }
--- request
POST /v1/completions
{"prompt":"p"}
--- error_code: 200
--- response_body_like eval
qr/"uri":"\/mock\/decode\/v1\/completions"/
--- error_log eval
qr/upstream prematurely closed connection|recv\(\) failed \(104: Connection reset by peer\)/
--- no_error_log
[alert]
[crit]

# prefill_fallback decode: when the prefill fails (no prefill server
# answered, or one answered 5xx), the request goes to the decode alone, which
# computes the prompt itself, instead of an error; counted in pd_metrics.
# Without it (the default) the same failure is a 502 JSON error.
use FindBin;
use lib "$FindBin::Bin/common";
use Pdgate::TestEnv;
use Test::Nginx::Socket 'no_plan';

no_shuffle();
add_block_preprocessor(\&Pdgate::TestEnv::pd_defaults);
run_tests();

__DATA__

=== TEST 1: no prefill server answers: the decode runs alone, without kv_transfer_params
--- http_config
    upstream prefill_dead { server 127.0.0.2:$TEST_NGINX_SERVER_PORT; }
    upstream decode_pool { server 127.0.0.1:$TEST_NGINX_SERVER_PORT; }
--- config
    location /v1/ {
        prefill /prefill_internal;
        prefill_fallback decode;
        proxy_pass http://decode_pool/mock/decode/v1/;
    }
    location /prefill_internal/ {
        internal;
        rewrite ^/prefill_internal(/.*)$ /mock/prefill$1 break;
        proxy_pass http://prefill_dead;
    }
    location /mock/decode/ { pdgate_echo; }
--- request
POST /v1/completions
{"model":"m","prompt":"p","max_tokens":5,"kv_transfer_params":{"do_remote_prefill":true}}
--- error_code: 200
--- response_body_like eval
qr/^\{"args":"","body":"\{\\"model\\":\\"m\\",\\"prompt\\":\\"p\\",\\"max_tokens\\":5\}",.*"uri":"\/mock\/decode\/v1\/completions"\}$/
--- error_log
prefill_fallback: the decode runs alone and computes the prompt



=== TEST 2: a prefill answering 503 falls back too
--- config
    location /v1/ {
        prefill /prefill_internal;
        prefill_fallback decode;
        proxy_pass http://decode_pool/mock/decode/v1/;
    }
    location /prefill_internal/ {
        internal;
        rewrite ^/prefill_internal(/.*)$ /mock/prefill$1 break;
        proxy_pass http://prefill_pool;
    }
    location /mock/prefill/ { pdgate_echo status=503; }
    location /mock/decode/ { pdgate_echo; }
--- request
POST /v1/chat/completions
{"model":"m","messages":[{"role":"user","content":"hi"}]}
--- error_code: 200
--- response_body_like eval
qr/"uri":"\/mock\/decode\/v1\/chat\/completions"/
--- error_log
the prefill failed (status 503), prefill_fallback



=== TEST 3: a prefill answering 400 is the client's error: passed through, no fallback
--- config
    location /v1/ {
        prefill /prefill_internal;
        prefill_fallback decode;
        proxy_pass http://decode_pool/mock/decode/v1/;
    }
    location /prefill_internal/ {
        internal;
        rewrite ^/prefill_internal(/.*)$ /mock/prefill$1 break;
        proxy_pass http://prefill_pool;
    }
    location /mock/prefill/ { pdgate_echo status=400; }
    location /mock/decode/ { pdgate_echo; }
--- request
POST /v1/completions
{"model":"m","prompt":"p"}
--- error_code: 400
--- no_error_log
prefill_fallback



=== TEST 4: without prefill_fallback the same failure is a 502 JSON error
--- http_config
    upstream prefill_dead { server 127.0.0.2:$TEST_NGINX_SERVER_PORT; }
    upstream decode_pool { server 127.0.0.1:$TEST_NGINX_SERVER_PORT; }
--- config
    location /v1/ {
        prefill /prefill_internal;
        proxy_pass http://decode_pool/mock/decode/v1/;
    }
    location /prefill_internal/ {
        internal;
        rewrite ^/prefill_internal(/.*)$ /mock/prefill$1 break;
        proxy_pass http://prefill_dead;
    }
    location /mock/decode/ { pdgate_echo; }
--- request
POST /v1/completions
{"model":"m","prompt":"p"}
--- error_code: 502
--- response_body_like eval
qr/^\{"error":\{"code":502,"message":"prefill upstream is unreachable"/
--- no_error_log
prefill_fallback



=== TEST 5: a fallback is counted in pd_metrics
--- http_config
    upstream prefill_dead { server 127.0.0.2:$TEST_NGINX_SERVER_PORT; }
    upstream decode_pool { server 127.0.0.1:$TEST_NGINX_SERVER_PORT; }
    pd_metrics_zone 128k;
--- config
    location /v1/ {
        prefill /prefill_internal;
        prefill_fallback decode;
        proxy_pass http://decode_pool/mock/decode/v1/;
    }
    location /prefill_internal/ {
        internal;
        rewrite ^/prefill_internal(/.*)$ /mock/prefill$1 break;
        proxy_pass http://prefill_dead;
    }
    location /mock/decode/ { pdgate_echo; }
    location = /metrics { pd_metrics; }
--- request eval
["POST /v1/completions\n{\"model\":\"m\",\"prompt\":\"p\"}", "GET /metrics"]
--- error_code eval
[200, 200]
--- response_body_like eval
[qr/"uri":"\/mock\/decode\/v1\/completions"/,
 qr/^pdgate_requests_total\{outcome="ok"\} 1\n.*^pdgate_prefill_fallback_total 1\n/ms]



=== TEST 6: a bad value fails the configuration
--- config
    location /v1/ { prefill /prefill_internal; prefill_fallback yes; }
--- must_die
--- error_log
"prefill_fallback" directive invalid value "yes", it must be "decode" or "off"

# ngx_http_prefill_module: every failure answers with a clear status, an
# OpenAI-style JSON error and a log line naming the cause; nothing is sent
# to the decode leg after a failure.
use FindBin;
use lib "$FindBin::Bin/common";
use Pdgate::TestEnv;
use Test::Nginx::Socket 'no_plan';

repeat_each(2);
no_shuffle();
add_block_preprocessor(\&Pdgate::TestEnv::pd_defaults);

run_tests();

__DATA__

=== TEST 1: a body that is not JSON gets 400 and no leg is called
--- request
POST /v1/completions
not json
--- error_code: 400
--- response_body chomp
{"error":{"code":400,"message":"request body is not a JSON object: invalid JSON: expected a JSON value at byte 0","param":null,"type":"BadRequestError"}}
--- response_headers
Content-Type: application/json
--- error_log
request body is not a JSON object: invalid JSON: expected a JSON value at byte 0
--- no_error_log
pdgate_echo:
[alert]



=== TEST 2: a JSON array is not a request object
--- request
POST /v1/completions
[{"prompt":"p"}]
--- error_code: 400
--- response_body_like chomp
"message":"request body is not a JSON object: top-level JSON value is not an object"
--- no_error_log
pdgate_echo:



=== TEST 3: truncated JSON names the byte where it broke
--- request
POST /v1/chat/completions
{"messages":[{"role":"user"
--- error_code: 400
--- response_body_like chomp
expected ',' or '\}' at byte 27
--- error_log
request body is not a JSON object
--- no_error_log
pdgate_echo:



=== TEST 4: an empty body gets 400
--- request
POST /v1/completions
--- more_headers
Content-Length: 0
--- error_code: 400
--- response_body_like chomp
"message":"request body is not a JSON object: body is empty"
--- no_error_log
pdgate_echo:



=== TEST 5: a GET without a body gets 400, not a dropped connection
--- request
GET /v1/completions
--- error_code: 400
--- response_body_like chomp
body is empty
--- no_error_log
[alert]



=== TEST 6: a prefill error answer is passed to the client as it is, and decode is not called
--- config
    location /v1/ {
        prefill /prefill_internal;
        proxy_pass http://decode_pool/mock/decode/v1/;
    }
    location /prefill_internal/ {
        internal;
        rewrite ^/prefill_internal(/.*)$ /mock/prefill$1 break;
        proxy_pass http://prefill_pool;
    }
    location /mock/prefill/ { pdgate_echo status=429; }
    location /mock/decode/ { pdgate_echo; }
--- request
POST /v1/completions
{"prompt":"p"}
--- error_code: 429
--- response_headers
Content-Type: application/json
--- response_body_like chomp
^\{"args":"","body":"\{\\"prompt\\":\\"p\\",\\"stream\\":false,\\"max_tokens\\":1,.*"uri":"/mock/prefill/v1/completions"\}$
--- error_log
prefill answered 429, passing its answer to the client
--- no_error_log
pdgate_echo: POST /mock/decode



=== TEST 7: an unreachable prefill gets 502
--- config
    location /v1/ {
        prefill /prefill_internal;
        proxy_pass http://decode_pool/mock/decode/v1/;
    }
    location /prefill_internal/ {
        internal;
        proxy_pass http://127.0.0.1:1/;
    }
    location /mock/decode/ { pdgate_echo; }
--- request
POST /v1/completions
{"prompt":"p"}
--- error_code: 502
--- response_body chomp
{"error":{"code":502,"message":"prefill upstream is unreachable","param":null,"type":"BadGatewayError"}}
--- error_log
prefill upstream is unreachable
--- no_error_log
pdgate_echo:



=== TEST 8: a prefill that times out gets 504
--- config
    location /v1/ {
        prefill /prefill_internal;
        proxy_pass http://decode_pool/mock/decode/v1/;
    }
    location /prefill_internal/ {
        internal;
        rewrite ^/prefill_internal(/.*)$ /mock/prefill$1 break;
        proxy_read_timeout 200ms;
        proxy_pass http://prefill_pool;
    }
    location /mock/prefill/ { pdgate_echo prefill delay=1000; }
    location /mock/decode/ { pdgate_echo; }
--- request
POST /v1/completions
{"prompt":"p"}
--- error_code: 504
--- response_body chomp
{"error":{"code":504,"message":"prefill upstream timed out","param":null,"type":"GatewayTimeoutError"}}
--- error_log
upstream timed out
prefill upstream timed out
--- no_error_log
pdgate_echo: POST /mock/decode



=== TEST 9: a prefill answer larger than the subrequest buffer gets 502 naming the directive
--- config
    location /v1/ {
        prefill /prefill_internal;
        proxy_pass http://decode_pool/mock/decode/v1/;
    }
    location /prefill_internal/ {
        internal;
        rewrite ^/prefill_internal(/.*)$ /mock/prefill$1 break;
        proxy_pass http://prefill_pool;
        subrequest_output_buffer_size 128;
    }
    location /mock/prefill/ { pdgate_echo prefill; }
    location /mock/decode/ { pdgate_echo; }
--- request
POST /v1/completions
{"prompt":"p"}
--- error_code: 502
--- response_body_like chomp
"message":"prefill answer is larger than the subrequest buffer, raise \\"subrequest_output_buffer_size\\" in the prefill location"
--- error_log
too big subrequest response
prefill answer is larger than the subrequest buffer
--- no_error_log
pdgate_echo: POST /mock/decode



=== TEST 10: a prefill answer without kv_transfer_params is decoded anyway, with a warning
--- config
    location /v1/ {
        prefill /prefill_internal;
        proxy_pass http://decode_pool/mock/decode/v1/;
    }
    location /prefill_internal/ {
        internal;
        rewrite ^/prefill_internal(/.*)$ /mock/prefill$1 break;
        proxy_pass http://prefill_pool;
    }
    location /mock/prefill/ { pdgate_echo; }
    location /mock/decode/ { pdgate_echo; }
--- request
POST /v1/completions
{"prompt":"p"}
--- response_body_like chomp
^\{"args":"","body":"\{\\"prompt\\":\\"p\\"\}",.*"uri":"/mock/decode/v1/completions"\}$
--- error_log
prefill answer has no "kv_transfer_params", decode will recompute the prompt
--- no_error_log
[error]



=== TEST 11: a prefill answer that is not JSON is decoded anyway, with a warning
--- config
    location /v1/ {
        prefill /prefill_internal;
        proxy_pass http://decode_pool/mock/decode/v1/;
    }
    location /prefill_internal/ {
        internal;
        rewrite ^/prefill_internal(/.*)$ /mock/prefill$1 break;
        proxy_pass http://prefill_pool;
    }
    location /mock/prefill/ { return 200 "<html>ok</html>"; }
    location /mock/decode/ { pdgate_echo; }
--- request
POST /v1/completions
{"prompt":"p"}
--- response_body_like chomp
"body":"\{\\"prompt\\":\\"p\\"\}"
--- error_log
prefill answer is not a JSON object
--- no_error_log
[error]



=== TEST 12: a prefill location that does not exist fails with 502, not a hang
--- config
    location /v1/ {
        prefill /nowhere;
        proxy_pass http://decode_pool/mock/decode/v1/;
    }
    location /mock/decode/ { pdgate_echo; }
--- request
POST /v1/completions
{"prompt":"p"}
--- error_code: 502
--- response_body_like chomp
prefill subrequest failed with status 404
--- no_error_log
pdgate_echo:



=== TEST 13: a client that goes away during the prefill gets no decode request
--- config
    location /v1/ {
        prefill /prefill_internal;
        proxy_pass http://decode_pool/mock/decode/v1/;
    }
    location /prefill_internal/ {
        internal;
        rewrite ^/prefill_internal(/.*)$ /mock/prefill$1 break;
        proxy_pass http://prefill_pool;
    }
    location /mock/prefill/ { pdgate_echo prefill delay=500; }
    location /mock/decode/ { pdgate_echo; }
--- request
POST /v1/completions
{"prompt":"p"}
--- timeout: 0.2
--- abort
--- wait: 0.8
--- ignore_response
--- error_log
client prematurely closed connection
--- no_error_log
pdgate_echo: POST /mock/decode
[alert]



=== TEST 14: a prefill answer that stalls after its 2xx header past the read timeout is a failed prefill: 502, no decode
--- config
    location /v1/ {
        prefill /prefill_internal;
        proxy_pass http://decode_pool/mock/decode/v1/;
    }
    location /prefill_internal/ {
        internal;
        rewrite ^/prefill_internal(/.*)$ /mock/prefill$1 break;
        proxy_pass http://prefill_pool;
        proxy_read_timeout 300ms;
    }
    location /mock/prefill/ { limit_rate_after 200; limit_rate 1; pdgate_echo prefill; }
    location /mock/decode/ { pdgate_echo; }
--- request
POST /v1/completions
{"prompt":"p"}
--- error_code: 502
--- response_body_like chomp
"message":"prefill answer was cut off after its header"
--- error_log
prefill: prefill answer was cut off after its header
--- no_error_log
pdgate_echo: POST /mock/decode/
[alert]



=== TEST 15: n given as a string ("2") is refused like the number 2, and no leg is called
--- request
POST /v1/completions
{"prompt":"p","n":"2"}
--- error_code: 400
--- response_body chomp
{"error":{"code":400,"message":"\"n\": \"2\" is not supported through prefill/decode disaggregation, send one request per sample","param":null,"type":"BadRequestError"}}
--- no_error_log
pdgate_echo:
[alert]



=== TEST 16: a prefill kv_transfer_params that is not an object is not forwarded: warning, decode without it
--- config
    location /v1/ {
        prefill /prefill_internal;
        proxy_pass http://decode_pool/mock/decode/v1/;
    }
    location /prefill_internal/ {
        internal;
        rewrite ^/prefill_internal(/.*)$ /mock/prefill$1 break;
        proxy_pass http://prefill_pool;
    }
    location /mock/prefill/ { default_type application/json; return 200 '{"kv_transfer_params":"not-an-object"}'; }
    location /mock/decode/ { pdgate_echo; }
--- request
POST /v1/completions
{"prompt":"p"}
--- error_code: 200
--- response_body_unlike
not-an-object
--- error_log
"kv_transfer_params" is not a JSON object
--- no_error_log
[error]



=== TEST 17: a decode upstream whose every server is down gets 503 JSON before any prefill
--- http_config eval
$Pdgate::TestEnv::HTTP_CONFIG . q{
    upstream decode_down { server 127.0.0.1:$TEST_NGINX_SERVER_PORT down; }
}
--- config
    location /v1/ {
        prefill /prefill_internal;
        proxy_pass http://decode_down/mock/decode/v1/;
    }
    location /prefill_internal/ {
        internal;
        rewrite ^/prefill_internal(/.*)$ /mock/prefill$1 break;
        proxy_pass http://prefill_pool;
    }
    location /mock/prefill/ { pdgate_echo prefill; }
    location /mock/decode/ { pdgate_echo; }
--- request
POST /v1/completions
{"prompt":"p"}
--- error_code: 503
--- response_body_like chomp
"message":"no decode server can take the request now"
--- error_log
prefill: no decode server can take the request now
--- no_error_log
pdgate_echo: POST /mock/prefill/
[alert]



=== TEST 18: once every decode server failed (max_fails), the next request gets 503 before its prefill (the first gets 502, or 503 when repeated)
--- http_config eval
$Pdgate::TestEnv::HTTP_CONFIG . q{
    upstream decode_dead {
        server 127.0.0.1:1 max_fails=1 fail_timeout=30s;
        server 127.0.0.1:2 max_fails=1 fail_timeout=30s;
    }
}
--- config
    location /v1/ {
        prefill /prefill_internal;
        proxy_pass http://decode_dead/mock/decode/v1/;
    }
    location /prefill_internal/ {
        internal;
        rewrite ^/prefill_internal(/.*)$ /mock/prefill$1 break;
        proxy_pass http://prefill_pool;
    }
    location /mock/prefill/ { pdgate_echo prefill; }
--- request eval
["POST /v1/completions\n{\"prompt\":\"p\"}", "POST /v1/completions\n{\"prompt\":\"p\"}"]
--- error_code_like eval
["^50[23]\$", "^503\$"]
--- response_body_like eval
[".", "\"message\":\"no decode server can take the request now\""]
--- no_error_log
[alert]


=== TEST 19: best_of given as a float (2.0) is refused like the integer 2
--- request
POST /v1/chat/completions
{"messages":[],"best_of":2.0}
--- error_code: 400
--- response_body_like chomp
"message":"\\"best_of\\": 2.0 is not supported through prefill/decode disaggregation, send one request per sample"
--- no_error_log
pdgate_echo:



=== TEST 20: a fractional n (1.5) is an invalid n
--- request
POST /v1/completions
{"prompt":"p","n":1.5}
--- error_code: 400
--- response_body_like chomp
"message":"invalid \\"n\\": 1.5, expected a positive integer"
--- no_error_log
pdgate_echo:



=== TEST 21: an n that is not a number ("abc") is an invalid n
--- request
POST /v1/completions
{"prompt":"p","n":"abc"}
--- error_code: 400
--- response_body_like chomp
"message":"invalid \\"n\\": \\"abc\\", expected a positive integer"
--- no_error_log
pdgate_echo:



=== TEST 22: n and best_of equal to 1 in any spelling (1.0, "1") go through both legs
--- request
POST /v1/completions
{"prompt":"p","n":1.0,"best_of":"1"}
--- error_code: 200
--- response_body_like chomp
"body":"\{\\"prompt\\":\\"p\\",\\"n\\":1.0,\\"best_of\\":\\"1\\",\\"kv_transfer_params\\":
--- error_log
pdgate_echo: POST /mock/prefill/v1/completions
--- no_error_log
[error]



=== TEST 23: more than 1024 top-level members get 413 as JSON and no leg is called
--- request eval
"POST /v1/completions\n{" . join(",", map { "\"k$_\":1" } 0..1024) . "}"
--- error_code: 413
--- response_body_like chomp
"message":"request body is not a JSON object: JSON object has more than 1024 members at byte \d+"
--- no_error_log
pdgate_echo:



=== TEST 24: arrays nested deeper than 128 levels get 400 as JSON and no leg is called
--- request eval
"POST /v1/completions\n{\"a\":" . ("[" x 129) . ("]" x 129) . "}"
--- error_code: 400
--- response_body_like chomp
"message":"request body is not a JSON object: JSON nested deeper than 128 levels at byte \d+"
--- no_error_log
pdgate_echo:

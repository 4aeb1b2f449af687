# ngx_http_prefill_module: what each P/D leg receives. The mock prefill and
# decode are pdgate_echo locations of the same server: the decode answers
# with the request it got, and the prefill's kv_transfer_params embed the
# request the prefill got, so one client response shows both legs.
use FindBin;
use lib "$FindBin::Bin/common";
use Pdgate::TestEnv;
use Test::Nginx::Socket 'no_plan';

repeat_each(2);
no_shuffle();
add_block_preprocessor(\&Pdgate::TestEnv::pd_defaults);

run_tests();

__DATA__

=== TEST 1: chat: the prefill gets one token, no stream, the KV flags; the client's own limit is not added
--- request
POST /v1/chat/completions
{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":true}}
--- response_body_like eval
qr/\Q"prefill_request":{"args":"",\E.*\Q"json":{"kv_transfer_params":{"do_remote_decode":true,"do_remote_prefill":false,"remote_block_ids":null,"remote_engine_id":null,"remote_host":null,"remote_port":null},"max_completion_tokens":1,"messages":[{"content":"hi","role":"user"}],"model":"m","stream":false},"method":"POST","uri":"\/mock\/prefill\/v1\/chat\/completions"}\E/
--- no_error_log
[error]
[warn]



=== TEST 2: completions: max_tokens becomes 1 on the prefill, min_tokens is dropped there
--- request
POST /v1/completions
{"model":"m","prompt":"p","max_tokens":50,"min_tokens":5}
--- response_body_like eval
qr/\Q"json":{"kv_transfer_params":{"do_remote_decode":true,"do_remote_prefill":false,"remote_block_ids":null,"remote_engine_id":null,"remote_host":null,"remote_port":null},"max_tokens":1,"model":"m","prompt":"p","stream":false},"method":"POST","uri":"\/mock\/prefill\/v1\/completions"}\E/
--- no_error_log
[error]



=== TEST 3: the decode gets the client's request unchanged plus the prefill's kv_transfer_params
--- request
POST /v1/completions
{"model":"m","prompt":"p","max_tokens":50,"min_tokens":5,"stream":false}
--- response_body_like eval
qr/^\{"args":"","body":"\{\\"model\\":\\"m\\",\\"prompt\\":\\"p\\",\\"max_tokens\\":50,\\"min_tokens\\":5,\\"stream\\":false,\\"kv_transfer_params\\":\{\\"do_remote_decode\\":false,\\"do_remote_prefill\\":true,.*"remote_engine_id":"pdgate-echo","remote_host":"127.0.0.1","remote_port":5600\},"max_tokens":50,"min_tokens":5,"model":"m","prompt":"p","stream":false\},"method":"POST","uri":"\/mock\/decode\/v1\/completions"\}$/
--- no_error_log
[error]



=== TEST 4: a client's kv_transfer_params reach neither leg
--- request
POST /v1/completions
{"kv_transfer_params":{"remote_host":"evil"},"prompt":"p"}
--- response_body_unlike
evil
--- no_error_log
[error]



=== TEST 5: both legs carry the same X-Request-Id
--- request
POST /v1/completions
{"prompt":"p"}
--- response_body_like eval
qr/"headers":\{[^}]*"x-request-id":"([0-9a-f-]{36})"[^}]*\},"json":\{"kv_transfer_params":\{.*"prefill_request":\{"args":"","connection_requests":\d+,"headers":\{[^}]*"x-request-id":"\1"/
--- no_error_log
[error]



=== TEST 6: a client's X-Request-Id is the id of both legs
--- more_headers
X-Request-Id: abc-123
--- request
POST /v1/completions
{"prompt":"p"}
--- response_body_like eval
qr/"x-request-id":"abc-123".*"prefill_request":\{"args":"","connection_requests":\d+,"headers":\{[^}]*"x-request-id":"abc-123"/
--- no_error_log
[error]



=== TEST 7: "stream" and "max_tokens" inside messages are text, not parameters
--- request
POST /v1/chat/completions
{"messages":[{"role":"user","content":"stream"},{"role":"user","content":"max_tokens","max_tokens":7,"stream":true}],"stream":true,"max_tokens":9}
--- response_body_like eval
qr/\Q"prefill_request":{"args":"",\E.*\Q"json":{"kv_transfer_params":{\E[^}]*\Q},"max_tokens":1,"messages":[{"content":"stream","role":"user"},{"content":"max_tokens","max_tokens":7,"role":"user","stream":true}],"stream":false}\E/
--- no_error_log
[error]



=== TEST 8: query arguments and the method reach both legs
--- request
PUT /v1/completions?tenant=a&x=1
{"prompt":"p"}
--- response_body_like eval
qr/^\{"args":"tenant=a&x=1",.*"prefill_request":\{"args":"tenant=a&x=1",.*"method":"PUT","uri":"\/mock\/prefill\/v1\/completions"\}.*"method":"PUT","uri":"\/mock\/decode\/v1\/completions"\}$/
--- no_error_log
[error]



=== TEST 9: a body with whitespace around the object and escapes in strings stays valid on both legs
--- request eval
"POST /v1/completions\n  {\"prompt\" : \"a \\\"q\\\" \\u00e9\\n\" , \"max_tokens\":3 }\n\n"
--- response_body_like eval
qr/"json":\{"kv_transfer_params":\{.*"max_tokens":1,"prompt":"a \\"q\\" \xc3\xa9\\n","stream":false\}.*"max_tokens":3,"prompt":"a \\"q\\" \xc3\xa9\\n"\},"method":"POST"/
--- no_error_log
[error]



=== TEST 10: a body spilled to a temp file (larger than client_body_buffer_size) is handled
--- config
    set_request_id on;
    client_body_buffer_size 1k;
    location /v1/ {
        prefill /prefill_internal;
        proxy_pass http://decode_pool/mock/decode/v1/;
    }
    location /prefill_internal/ {
        internal;
        rewrite ^/prefill_internal(/.*)$ /mock/prefill$1 break;
        proxy_pass http://prefill_pool;
        subrequest_output_buffer_size 1m;
    }
    location /mock/prefill/ { client_body_buffer_size 1m; set_request_id off; pdgate_echo prefill; }
    location /mock/decode/ { client_body_buffer_size 1m; set_request_id off; pdgate_echo; }
--- request eval
"POST /v1/completions\n{\"prompt\":\"" . ("x" x 60000) . "\",\"max_tokens\":5}"
--- response_body_like eval
qr/"max_tokens":1,"prompt":"x{60000}","stream":false\}.*"max_tokens":5,"prompt":"x{60000}"\},"method":"POST","uri":"\/mock\/decode\/v1\/completions"\}$/
--- error_log
a client request body is buffered to a temporary file
--- no_error_log
[error]



=== TEST 11: a location without prefill is untouched
--- config
    set_request_id on;
    location /plain/ { proxy_pass http://127.0.0.1:$TEST_NGINX_SERVER_PORT/mock/; }
    location /mock/ { set_request_id off; pdgate_echo; }
--- request
POST /plain/v1/completions
{"prompt":"p","stream":true,"max_tokens":5}
--- response_body_like eval
qr/^data: \{"echo":\{"args":"","body":"\{\\"prompt\\":\\"p\\",\\"stream\\":true,\\"max_tokens\\":5\}"/
--- no_error_log
[error]



=== TEST 12: prefill_kv_transfer_params off sends no KV flags to the prefill
--- config
    location /v1/ {
        prefill /prefill_internal;
        prefill_kv_transfer_params off;
        proxy_pass http://decode_pool/mock/decode/v1/;
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
--- response_body_like eval
qr/\Q"prefill_request":{"args":"",\E.*\Q"json":{"max_tokens":1,"prompt":"p","stream":false},"method":"POST"\E/
--- no_error_log
[error]



=== TEST 13: prefill set at server level applies to the locations below it
--- config
    prefill /prefill_internal;
    location /v1/ {
        proxy_pass http://decode_pool/mock/decode/v1/;
    }
    location /prefill_internal/ {
        internal;
        rewrite ^/prefill_internal(/.*)$ /mock/prefill$1 break;
        proxy_pass http://prefill_pool;
    }
    location /mock/prefill/ { prefill off; pdgate_echo prefill; }
    location /mock/decode/ { prefill off; pdgate_echo; }
--- request
POST /v1/completions
{"prompt":"p"}
--- response_body_like eval
qr/"remote_engine_id":"pdgate-echo"/
--- no_error_log
[error]



=== TEST 14: both legs reuse their upstream keepalive connections
--- request eval
["POST /v1/completions\n{\"prompt\":\"a\"}", "POST /v1/completions\n{\"prompt\":\"b\"}"]
--- response_body_like eval
[qr/"connection_requests":\d+,/,
 qr/^\{"args":"","body":".*","connection_requests":([2-9]|\d\d+),"headers":.*"prefill_request":\{"args":"","connection_requests":([2-9]|\d\d+),/]
--- no_error_log
[error]



=== TEST 15: a chunked client body reaches both legs with a Content-Length
--- raw_request eval
"POST /v1/completions HTTP/1.1\r
Host: localhost\r
Connection: close\r
Transfer-Encoding: chunked\r
\r
5\r
{\"pro\r
9\r
mpt\":\"p\"}\r
0\r
\r
"
--- response_body_like eval
qr/^\{"args":"","body":"\{\\"prompt\\":\\"p\\",\\"kv_transfer_params\\":.*"headers":\{"content-length":"\d+","host":"decode_pool","x-request-id":"[0-9a-f-]{36}"\},.*"prefill_request":\{"args":"","connection_requests":\d+,"headers":\{"content-length":"\d+","host":"prefill_pool","x-request-id":"[0-9a-f-]{36}"\},"json":\{"kv_transfer_params":\{[^}]*\},"max_tokens":1,"prompt":"p","stream":false\}/
--- no_error_log
[error]



=== TEST 16: the client's usage reports the prefill's cached tokens, not the decode's (JSON answer, length unchanged)
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
    location /mock/prefill/ {
        default_type application/json;
        return 200 '{"usage":{"prompt_tokens":100,"prompt_tokens_details":{"cached_tokens":7},"completion_tokens":1},"kv_transfer_params":{"remote_block_ids":[1]}}';
    }
    location /mock/decode/ {
        default_type application/json;
        return 200 '{"choices":[],"usage":{"prompt_tokens":100,"prompt_tokens_details":{"cached_tokens":99},"total_tokens":104}}';
    }
--- request
POST /v1/completions
{"prompt":"p"}
--- response_body chomp
{"choices":[],"usage":{"prompt_tokens":100,"prompt_tokens_details":{"cached_tokens":7 },"total_tokens":104}}
--- no_error_log
[error]

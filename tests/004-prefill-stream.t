# ngx_http_prefill_module with streaming decode answers: the prefill leg is
# never streamed, the decode's SSE events reach the client as they come.
use FindBin;
use lib "$FindBin::Bin/common";
use Pdgate::TestEnv;
use Test::Nginx::Socket 'no_plan';

repeat_each(2);
no_shuffle();
add_block_preprocessor(\&Pdgate::TestEnv::pd_defaults);

run_tests();

__DATA__

=== TEST 1: an SSE decode answer is passed through event by event, with its content type
--- config
    set_request_id on;
    location /v1/ {
        prefill /prefill_internal;
        proxy_buffering off;
        proxy_pass http://decode_pool/mock/decode/v1/;
    }
    location /prefill_internal/ {
        internal;
        rewrite ^/prefill_internal(/.*)$ /mock/prefill$1 break;
        proxy_pass http://prefill_pool;
    }
    location /mock/prefill/ { set_request_id off; pdgate_echo prefill; }
    location /mock/decode/ { set_request_id off; pdgate_echo sse=3 interval=20; }
--- request
POST /v1/chat/completions
{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":true}}
--- response_headers
Content-Type: text/event-stream
--- response_body_like eval
qr/\A(data: \{"echo":\{"args":"",.*"stream":true,"stream_options":\{"include_usage":true\}\},"method":"POST","uri":"\/mock\/decode\/v1\/chat\/completions"\},"index":0\}\n\ndata: \{"echo":null,"index":1\}\n\ndata: \{"echo":null,"index":2\}\n\ndata: \[DONE\]\n\n)\z/s
--- no_error_log
[error]
[warn]



=== TEST 2: the prefill of a streaming request is not streamed and has no stream_options
--- config
    location /v1/ {
        prefill /prefill_internal;
        proxy_buffering off;
        proxy_pass http://decode_pool/mock/decode/v1/;
    }
    location /prefill_internal/ {
        internal;
        rewrite ^/prefill_internal(/.*)$ /mock/prefill$1 break;
        proxy_pass http://prefill_pool;
    }
    location /mock/prefill/ { pdgate_echo prefill sse=5; }
    location /mock/decode/ { pdgate_echo sse=1; }
--- request
POST /v1/chat/completions
{"messages":[],"stream":true,"stream_options":{"include_usage":true,"continuous_usage_stats":true}}
--- response_body_like eval
qr/"prefill_request":\{"args":"","connection_requests":\d+,"headers":\{[^}]*\},"json":\{"kv_transfer_params":\{[^}]*\},"max_completion_tokens":1,"messages":\[\],"stream":false\}/
--- no_error_log
[error]



=== TEST 3: streamed: the final usage chunk reports the prefill's cached tokens
--- config
    location /v1/ {
        prefill /prefill_internal;
        proxy_buffering off;
        proxy_pass http://decode_pool/mock/decode/v1/;
    }
    location /prefill_internal/ {
        internal;
        rewrite ^/prefill_internal(/.*)$ /mock/prefill$1 break;
        proxy_pass http://prefill_pool;
    }
    location /mock/prefill/ {
        default_type application/json;
        return 200 '{"usage":{"prompt_tokens":1200,"prompt_tokens_details":{"cached_tokens":1024}},"kv_transfer_params":{"remote_block_ids":[1]}}';
    }
    location /mock/decode/ {
        default_type text/event-stream;
        return 200 'data: {"choices":[{"delta":{"content":"a"}}]}\n\ndata: {"choices":[],"usage":{"prompt_tokens":1200,"prompt_tokens_details":{"cached_tokens":1199},"completion_tokens":1}}\n\ndata: [DONE]\n\n';
    }
--- request
POST /v1/chat/completions
{"messages":[],"stream":true,"stream_options":{"include_usage":true}}
--- response_body_like chomp
"prompt_tokens_details":\{"cached_tokens":1024\},"completion_tokens":1\}
--- no_error_log
[error]

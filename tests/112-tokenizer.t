# pd_tokenizer: the model's tokenizer and chat template in the proxy. The
# prompt's tokens ($pd_input_tokens) replace the bytes / 4 estimate; a body
# the model cannot take is the client's error. The model is the small one
# ./build.sh trains (dist/share/test-model, $TEST_NGINX_MODEL_DIR).
use FindBin;
use lib "$FindBin::Bin/common";
use Pdgate::TestEnv;
use Test::Nginx::Socket 'no_plan';

no_shuffle();
add_block_preprocessor(sub {
    my $block = shift;
    $block->set_value("http_config", $Pdgate::TestEnv::HTTP_CONFIG) unless defined $block->http_config;
    return if defined $block->config;
    $block->set_value("config", <<'_EOC_');
    location /v1/ {
        prefill /prefill_internal;
        pd_tokenizer $TEST_NGINX_MODEL_DIR;
        add_header X-Input-Tokens $pd_input_tokens always;
        proxy_pass http://decode_pool/mock/decode/v1/;
    }
    location /prefill_internal/ {
        internal;
        rewrite ^/prefill_internal(/.*)$ /mock/prefill$1 break;
        proxy_pass http://prefill_pool;
    }
    location /mock/prefill/ { pdgate_echo prefill; }
    location /mock/decode/ { pdgate_echo; }
_EOC_
});
run_tests();

__DATA__

=== TEST 1: a prompt of token ids is as many tokens as ids
--- request
POST /v1/completions
{"model":"m","prompt":[11,12,13,14,15,16,17],"max_tokens":5}
--- error_code: 200
--- response_headers
X-Input-Tokens: 7



=== TEST 2: a chat request is counted as its rendered template
--- request
POST /v1/chat/completions
{"model":"m","messages":[{"role":"system","content":"You read the configuration."},{"role":"user","content":"Explain the prefill module."}]}
--- error_code: 200
--- response_headers_like
X-Input-Tokens: ^[1-9][0-9]+$



=== TEST 3: a role the chat template refuses is the client's error
--- request
POST /v1/chat/completions
{"model":"m","messages":[{"role":"wizard","content":"hi"}]}
--- error_code: 400
--- response_body_like eval
qr/^\{"error":\{"code":400,"message":"the prompt cannot be tokenized: the chat template rejected the request: unknown role: wizard","param":null,"type":"BadRequestError"\}\}$/
--- error_log
prefill: the prompt cannot be tokenized



=== TEST 4: a message without a role is the client's error
--- request
POST /v1/chat/completions
{"model":"m","messages":[{"content":"hi"}]}
--- error_code: 400
--- response_body_like eval
qr/"the prompt cannot be tokenized: messages\[0\]\.role is missing"/



=== TEST 5: a multimodal request is not tokenized (sized by bytes / 4)
--- request
POST /v1/chat/completions
{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"what is this?"},{"type":"image_url","image_url":{"url":"data:image/png;base64,iVBORw0KGgo="}}]}]}
--- error_code: 200
--- response_headers
X-Input-Tokens:



=== TEST 6: without pd_tokenizer $pd_input_tokens is empty
--- config
    location /v1/ {
        prefill /prefill_internal;
        add_header X-Input-Tokens "[$pd_input_tokens]" always;
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
{"model":"m","prompt":[1,2,3],"max_tokens":5}
--- error_code: 200
--- response_headers
X-Input-Tokens: []



=== TEST 7: a missing model directory fails nginx -t
--- config
    location /v1/ { prefill /prefill_internal; pd_tokenizer /nonexistent/model; }
--- must_die
--- error_log
"pd_tokenizer" directive "/nonexistent/model/tokenizer.json": cannot read: no such file



=== TEST 8: the pickle-based hashes are refused
--- config
    location /v1/ { prefill /prefill_internal; pd_tokenizer $TEST_NGINX_MODEL_DIR hash=sha256; }
--- must_die
--- error_log
"pd_tokenizer" directive invalid parameter "hash=sha256", it must be "sha256_cbor" or "xxhash_cbor"



=== TEST 9: pd_tokenizer once per location
--- config
    location /v1/ { prefill /prefill_internal; pd_tokenizer $TEST_NGINX_MODEL_DIR; pd_tokenizer $TEST_NGINX_MODEL_DIR; }
--- must_die
--- error_log
"pd_tokenizer" directive is duplicate



=== TEST 10: pd_kv_events takes the engines' port or +N
--- http_config
    upstream p { server 127.0.0.1:1; pd_kv_events port=+0; }
--- config
    location /v1/ { prefill /prefill_internal; }
--- must_die
--- error_log
"pd_kv_events" directive invalid parameter "port=+0", it must be a port from 1 to 65535, or +N for the engine's own port plus N



=== TEST 11: pd_kv_events belongs in an upstream block
--- config
    location /v1/ { prefill /prefill_internal; pd_kv_events; }
--- must_die
--- error_log
"pd_kv_events" directive is not allowed here



=== TEST 12: pd_kv_events once per upstream
--- http_config
    upstream p { server 127.0.0.1:1; pd_kv_events; pd_kv_events port=6000; }
--- config
    location /v1/ { prefill /prefill_internal; }
--- must_die
--- error_log
"pd_kv_events" directive is duplicate

# ngx_http_prefill_module, E/P/D: an encoder failure answers 502 with an
# OpenAI-style error naming the item, logs it, and sends neither a prefill
# nor a decode; too many items is a 400; configuration mistakes fail nginx -t.
use FindBin;
use lib "$FindBin::Bin/common";
use Pdgate::TestEnv;
use Test::Nginx::Socket 'no_plan';

repeat_each(2);
no_shuffle();

our $HTTP_CONFIG = $Pdgate::TestEnv::HTTP_CONFIG . <<'_EOC_';
    upstream encode_pool { server 127.0.0.1:$TEST_NGINX_SERVER_PORT; keepalive 8; }
_EOC_

# The mock encoder fails item 1 (its id ends in -enc1) with a vLLM-style
# error; a slow item (url "slow") takes a second.
our $CONFIG = <<'_EOC_';
    set_request_id on;
    location /v1/ {
        prefill /prefill_internal;
        prefill_encode /encode_internal;
        prefill_encode_max_items 3;
        proxy_pass http://decode_pool/mock/decode/v1/;
    }
    location /encode_internal/ {
        internal;
        rewrite ^/encode_internal(/.*)$ /mock/encode$1 break;
        proxy_pass http://encode_pool;
    }
    location /prefill_internal/ {
        internal;
        rewrite ^/prefill_internal(/.*)$ /mock/prefill$1 break;
        proxy_pass http://prefill_pool;
        subrequest_output_buffer_size 64k;
    }
    location /mock/encode/ {
        set_request_id off;
        if ($http_x_request_id ~ -enc1$) {
            return 503 '{"error":{"message":"no memory for the image","type":"ServiceUnavailableError","param":null,"code":503}}';
        }
        pdgate_echo;
    }
    location /mock/slow_encode/ { set_request_id off; pdgate_echo delay=1000; }
    location /mock/prefill/ { set_request_id off; pdgate_echo prefill; }
    location /mock/decode/ { set_request_id off; pdgate_echo; }
_EOC_

add_block_preprocessor(sub {
    my $block = shift;
    $block->set_value("http_config", $HTTP_CONFIG) unless defined $block->http_config;
    $block->set_value("config", $CONFIG) unless defined $block->config;
});

run_tests();

__DATA__

=== TEST 1: a failing encoder item: 502 naming the item and the encoder's message, no prefill, no decode
--- request
POST /v1/chat/completions
{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"a"}},{"type":"audio_url","audio_url":{"url":"b"}}]}]}
--- error_code: 502
--- response_headers
Content-Type: application/json
--- response_body chomp
{"error":{"code":502,"message":"encoding media item 1 (audio_url) failed: the encoder answered 503: no memory for the image","param":null,"type":"BadGatewayError"}}
--- error_log
encoding media item 1 (audio_url) failed: the encoder answered 503: no memory for the image
--- no_error_log
pdgate_echo: POST /mock/prefill
pdgate_echo: POST /mock/decode
[alert]



=== TEST 2: an unreachable encoder: 502, no prefill, no decode
--- config
    location /v1/ {
        prefill /prefill_internal;
        prefill_encode /encode_internal;
        proxy_pass http://decode_pool/mock/decode/v1/;
    }
    location /encode_internal/ {
        internal;
        proxy_pass http://127.0.0.1:1/;
    }
    location /prefill_internal/ {
        internal;
        rewrite ^/prefill_internal(/.*)$ /mock/prefill$1 break;
        proxy_pass http://prefill_pool;
    }
    location /mock/prefill/ { pdgate_echo prefill; }
    location /mock/decode/ { pdgate_echo; }
--- request
POST /v1/chat/completions
{"messages":[{"role":"user","content":[{"type":"input_audio","input_audio":{"data":"UklG","format":"wav"}}]}]}
--- error_code: 502
--- response_body chomp
{"error":{"code":502,"message":"encoding media item 0 (input_audio) failed: the encoder is unreachable","param":null,"type":"BadGatewayError"}}
--- error_log
connect() failed
encoding media item 0 (input_audio) failed: the encoder is unreachable
--- no_error_log
pdgate_echo: POST
[alert]



=== TEST 3: an encoder that times out: 502 naming the item
--- config
    location /v1/ {
        prefill /prefill_internal;
        prefill_encode /encode_internal;
        proxy_pass http://decode_pool/mock/decode/v1/;
    }
    location /encode_internal/ {
        internal;
        rewrite ^/encode_internal(/.*)$ /mock/slow_encode$1 break;
        proxy_pass http://encode_pool;
        proxy_read_timeout 200ms;
    }
    location /prefill_internal/ {
        internal;
        rewrite ^/prefill_internal(/.*)$ /mock/prefill$1 break;
        proxy_pass http://prefill_pool;
    }
    location /mock/slow_encode/ { pdgate_echo delay=1000; }
    location /mock/prefill/ { pdgate_echo prefill; }
    location /mock/decode/ { pdgate_echo; }
--- request
POST /v1/chat/completions
{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"a"}}]}]}
--- error_code: 502
--- response_body_like chomp
"message":"encoding media item 0 \(image_url\) failed: the encoder timed out"
--- error_log
upstream timed out
encoding media item 0 (image_url) failed: the encoder timed out
--- no_error_log
pdgate_echo: POST /mock/prefill
pdgate_echo: POST /mock/decode
[alert]



=== TEST 4: the first failure answers at once; an item still being encoded is ignored when it ends
--- config
    set_request_id on;
    location /v1/ {
        prefill /prefill_internal;
        prefill_encode /encode_internal;
        proxy_pass http://decode_pool/mock/decode/v1/;
    }
    location /encode_internal/ {
        internal;
        rewrite ^/encode_internal(/.*)$ /mock/encode$1 break;
        proxy_pass http://encode_pool;
    }
    location /prefill_internal/ {
        internal;
        rewrite ^/prefill_internal(/.*)$ /mock/prefill$1 break;
        proxy_pass http://prefill_pool;
    }
    location /mock/encode/ {
        set_request_id off;
        if ($http_x_request_id ~ -enc1$) {
            return 500 '{"message":"bad audio"}';
        }
        pdgate_echo delay=1000;
    }
    location /mock/prefill/ { set_request_id off; pdgate_echo prefill; }
    location /mock/decode/ { set_request_id off; pdgate_echo; }
--- request
POST /v1/chat/completions
{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"slow"}},{"type":"audio_url","audio_url":{"url":"bad"}}]}]}
--- timeout: 700ms
--- error_code: 502
--- response_body_like chomp
"message":"encoding media item 1 \(audio_url\) failed: the encoder answered 500: bad audio"
--- no_error_log
pdgate_echo: POST /mock/prefill
pdgate_echo: POST /mock/decode
[alert]



=== TEST 5: more media items than prefill_encode_max_items: 400, no leg is called
--- request
POST /v1/chat/completions
{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"1"}},{"type":"image_url","image_url":{"url":"2"}},{"type":"image_url","image_url":{"url":"3"}},{"type":"image_url","image_url":{"url":"4"}}]}]}
--- error_code: 400
--- response_body chomp
{"error":{"code":400,"message":"the request has 4 media items, more than the 3 allowed (\"prefill_encode_max_items\")","param":null,"type":"BadRequestError"}}
--- error_log
the request has 4 media items, more than the 3 allowed ("prefill_encode_max_items")
--- no_error_log
pdgate_echo:



=== TEST 6: as many items as allowed pass
--- request
POST /v1/chat/completions
{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"1"}}]},{"role":"user","content":[{"type":"image_url","image_url":{"url":"2"}}]}]}
--- error_code: 502
--- response_body_like chomp
"message":"encoding media item 1 \(image_url\) failed
--- no_error_log
pdgate_echo: POST /mock/prefill



=== TEST 7: an encoder location that does not exist fails the request with 502, not a hang
--- config
    location /v1/ {
        prefill /prefill_internal;
        prefill_encode /nowhere;
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
POST /v1/chat/completions
{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"a"}}]}]}
--- error_code: 502
--- response_body_like chomp
"message":"encoding media item 0 \(image_url\) failed: the encode subrequest failed with status 40\d"
--- no_error_log
pdgate_echo: POST
[alert]



=== TEST 8: with prefill on, a body that is not JSON still gets 400 and no leg is called
--- request
POST /v1/chat/completions
{"messages":
--- error_code: 400
--- response_body_like chomp
"message":"request body is not a JSON object: invalid JSON
--- no_error_log
pdgate_echo:



=== TEST 9: a prefill_encode prefix must be absolute
--- config
    location /v1/ { prefill_encode encode_internal; }
--- must_die
--- error_log
"prefill_encode" directive invalid prefix "encode_internal", it must start with "/"



=== TEST 10: a prefill_encode prefix of "/" would loop
--- config
    location /v1/ { prefill_encode /; }
--- must_die
--- error_log
"prefill_encode" directive the prefix must not be "/"



=== TEST 11: prefill_encode twice in one block is a duplicate
--- config
    location /v1/ { prefill_encode /a; prefill_encode /b; }
--- must_die
--- error_log
"prefill_encode" directive is duplicate



=== TEST 12: prefill_encode takes exactly one argument
--- config
    location /v1/ { prefill_encode /a /b; }
--- must_die
--- error_log
invalid number of arguments in "prefill_encode" directive



=== TEST 13: prefill_encode_max_items is a number from 1 to 1024
--- config
    location /v1/ { prefill_encode_max_items 0; }
--- must_die
--- error_log
"prefill_encode_max_items" directive invalid value "0", it must be a number from 1 to 1024



=== TEST 14: prefill_encode_max_items rejects words and large numbers
--- config
    location /v1/ { prefill_encode_max_items many; }
    location /v2/ { prefill_encode_max_items 5000; }
--- must_die
--- error_log
"prefill_encode_max_items" directive invalid value "many", it must be a number from 1 to 1024



=== TEST 15: prefill_encode_max_items twice in one block is a duplicate
--- config
    location /v1/ { prefill_encode_max_items 4; prefill_encode_max_items 8; }
--- must_die
--- error_log
"prefill_encode_max_items" directive is duplicate



=== TEST 16: a client that leaves while its items are encoded ends them; no prefill, no decode, nothing left behind
--- config
    set_request_id on;
    location /v1/ {
        prefill /prefill_internal;
        prefill_encode /encode_internal;
        proxy_pass http://decode_pool/mock/decode/v1/;
    }
    location /encode_internal/ {
        internal;
        rewrite ^/encode_internal(/.*)$ /mock/slow_encode$1 break;
        proxy_pass http://encode_pool;
    }
    location /prefill_internal/ {
        internal;
        rewrite ^/prefill_internal(/.*)$ /mock/prefill$1 break;
        proxy_pass http://prefill_pool;
    }
    location /mock/slow_encode/ { set_request_id off; pdgate_echo delay=500; }
    location /mock/prefill/ { set_request_id off; pdgate_echo prefill; }
    location /mock/decode/ { set_request_id off; pdgate_echo; }
--- request
POST /v1/chat/completions
{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"a"}},{"type":"image_url","image_url":{"url":"b"}}]}]}
--- timeout: 150ms
--- abort
--- ignore_response
--- wait: 0.8
--- error_log
client prematurely closed connection
--- no_error_log
subrequest: "/prefill_internal
pdgate_echo: POST /mock/decode
[alert]
[crit]

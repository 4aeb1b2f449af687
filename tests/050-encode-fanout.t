# ngx_http_prefill_module, E/P/D: `prefill_encode` sends one encoder request
# per media item of a chat request, all at once, each with the item alone,
# one token, no stream and the request id plus an item suffix; the prefill
# and decode legs then get the client's request as before. Text-only
# requests skip the stage.
#
# The mock encoder is a pdgate_echo location of the test server that writes
# each request it gets to the access log ("ENC <id> <body>"), so the blocks
# can assert every encoder body; the echo's error log line counts the hits.
use FindBin;
use lib "$FindBin::Bin/common";
use Pdgate::TestEnv;
use Test::Nginx::Socket 'no_plan';

repeat_each(2);
worker_connections(512);   # TEST 15: 40 encoder requests, both ends in this nginx
no_shuffle();

our $HTTP_CONFIG = $Pdgate::TestEnv::HTTP_CONFIG . <<'_EOC_';
    upstream encode_pool { server 127.0.0.1:$TEST_NGINX_SERVER_PORT; keepalive 8; }
    log_format enc escape=none 'ENC $http_x_request_id $request_body';
_EOC_

# /v1/: encode, prefill, decode. /pd/: encode, then a combined P/D engine.
our $CONFIG = <<'_EOC_';
    set_request_id on;
    location /v1/ {
        prefill /prefill_internal;
        prefill_encode /encode_internal;
        proxy_pass http://decode_pool/mock/decode/v1/;
    }
    location /pd/ {
        prefill_encode /encode_internal;
        proxy_pass http://decode_pool/mock/decode/;
    }
    location /encode_internal/ {
        internal;
        rewrite ^/encode_internal/(?:pd/)?(.*)$ /mock/encode/$1 break;
        proxy_pass http://encode_pool;
    }
    location /prefill_internal/ {
        internal;
        rewrite ^/prefill_internal(/.*)$ /mock/prefill$1 break;
        proxy_pass http://prefill_pool;
        subrequest_output_buffer_size 64k;
    }
    location /mock/encode/ { set_request_id off; access_log logs/access.log enc; pdgate_echo; }
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

=== TEST 1: three media items: three encoder requests, then one prefill and one decode
--- request
POST /v1/chat/completions
{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"t1"},{"type":"image_url","image_url":{"url":"data:image/png;base64,AAA1"}},{"type":"image_url","image_url":{"url":"http://img/2.png"}}]},{"role":"user","content":[{"type":"audio_url","audio_url":{"url":"http://a/3.wav"}}]}],"max_tokens":9}
--- response_body_like eval
qr/"uri":"\/mock\/prefill\/v1\/chat\/completions".*"uri":"\/mock\/decode\/v1\/chat\/completions"\}$/
--- grep_error_log eval
qr/pdgate_echo: POST \/mock\/\w+/
--- grep_error_log_out
pdgate_echo: POST /mock/encode
pdgate_echo: POST /mock/encode
pdgate_echo: POST /mock/encode
pdgate_echo: POST /mock/prefill
pdgate_echo: POST /mock/decode
--- no_error_log
[error]
[alert]



=== TEST 2: each encoder request holds one item alone (no text), one token, no stream
--- more_headers
X-Request-Id: epd-2
--- request
POST /v1/chat/completions
{"model":"m2","temperature":0.2,"stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"system","content":"sys"},{"role":"user","content":[{"type":"text","text":"what is this"},{"type":"image_url","image_url":{"url":"data:image/png;base64,AAA2"}},{"type":"input_audio","input_audio":{"data":"UklG","format":"wav"}}]}],"max_completion_tokens":50}
--- access_log
ENC epd-2-enc0 {"model":"m2","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"data:image/png;base64,AAA2"}}]}],"stream":false,"max_tokens":1,"max_completion_tokens":1}
ENC epd-2-enc1 {"model":"m2","messages":[{"role":"user","content":[{"type":"input_audio","input_audio":{"data":"UklG","format":"wav"}}]}],"stream":false,"max_tokens":1,"max_completion_tokens":1}
--- no_error_log
[error]



=== TEST 3: the prefill and the decode get the client's request, media included, under the client's id
--- more_headers
X-Request-Id: epd-3
--- request
POST /v1/chat/completions
{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"t"},{"type":"image_url","image_url":{"url":"http://img/3.png"}}]}]}
--- response_body_like eval
qr/^\{"args":"","body":"\{\\"model\\":\\"m\\",\\"messages\\":\[\{\\"role\\":\\"user\\",\\"content\\":\[\{\\"type\\":\\"text\\",\\"text\\":\\"t\\"\},\{\\"type\\":\\"image_url\\",\\"image_url\\":\{\\"url\\":\\"http:\/\/img\/3.png\\"\}\}\]\}\],\\"kv_transfer_params\\":.*"x-request-id":"epd-3".*"prefill_request":\{.*"x-request-id":"epd-3".*"json":\{"kv_transfer_params":\{[^}]*\},"max_completion_tokens":1,"messages":\[\{"content":\[\{"text":"t","type":"text"\},\{"image_url":\{"url":"http:\/\/img\/3.png"\},"type":"image_url"\}\],"role":"user"\}\],"model":"m","stream":false\}/
--- access_log
ENC epd-3-enc0 {"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"http://img/3.png"}}]}],"stream":false,"max_tokens":1,"max_completion_tokens":1}
--- no_error_log
[error]



=== TEST 4: a generated request id gets the item suffix too
--- request
POST /v1/chat/completions
{"model":"id4","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"u4"}}]}]}
--- access_log eval
qr/^ENC [0-9a-f-]{36}-enc0 \{"model":"id4",/
--- no_error_log
[error]



=== TEST 5: a text-only chat request skips the encoder
--- request
POST /v1/chat/completions
{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"image_url"}]},{"role":"user","content":"plain"}]}
--- response_body_like eval
qr/"uri":"\/mock\/decode\/v1\/chat\/completions"\}$/
--- grep_error_log eval
qr/pdgate_echo: POST \/mock\/\w+/
--- grep_error_log_out
pdgate_echo: POST /mock/prefill
pdgate_echo: POST /mock/decode
--- no_error_log
[error]



=== TEST 6: a completions request skips the encoder
--- request
POST /v1/completions
{"prompt":"p","max_tokens":3}
--- response_body_like eval
qr/"uri":"\/mock\/decode\/v1\/completions"\}$/
--- no_error_log
pdgate_echo: POST /mock/encode
[error]



=== TEST 7: the encoder requests run concurrently (4 items of 300 ms each take about 300 ms)
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
        subrequest_output_buffer_size 64k;
    }
    location /mock/encode/ { set_request_id off; pdgate_echo delay=300; }
    location /mock/prefill/ { set_request_id off; pdgate_echo prefill; }
    location /mock/decode/ { set_request_id off; pdgate_echo; }
--- request
POST /v1/chat/completions
{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"a"}},{"type":"image_url","image_url":{"url":"b"}},{"type":"audio_url","audio_url":{"url":"c"}},{"type":"image_url","image_url":{"url":"d"}}]}]}
--- timeout: 550ms
--- response_body_like eval
qr/"uri":"\/mock\/decode\/v1\/chat\/completions"\}$/
--- grep_error_log eval
qr/pdgate_echo: POST \/mock\/encode/
--- grep_error_log_out
pdgate_echo: POST /mock/encode
pdgate_echo: POST /mock/encode
pdgate_echo: POST /mock/encode
pdgate_echo: POST /mock/encode
--- no_error_log
[error]



=== TEST 8: with prefill off the request goes to the combined P/D engine, unchanged, after the encoder
--- more_headers
X-Request-Id: epd-8
--- request
POST /pd/v1/chat/completions
{"model":"m8","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"u8"}},{"type":"text","text":"t"}]}],"stream":false}
--- response_body_like eval
qr/^\{"args":"","body":"\{\\"model\\":\\"m8\\",\\"messages\\":\[\{\\"role\\":\\"user\\",\\"content\\":\[\{\\"type\\":\\"image_url\\",\\"image_url\\":\{\\"url\\":\\"u8\\"\}\},\{\\"type\\":\\"text\\",\\"text\\":\\"t\\"\}\]\}\],\\"stream\\":false\}",.*"x-request-id":"epd-8"\},.*"uri":"\/mock\/decode\/v1\/chat\/completions"\}$/
--- access_log
ENC epd-8-enc0 {"model":"m8","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"u8"}}]}],"stream":false,"max_tokens":1,"max_completion_tokens":1}
--- grep_error_log eval
qr/pdgate_echo: POST \/mock\/\w+/
--- grep_error_log_out
pdgate_echo: POST /mock/encode
pdgate_echo: POST /mock/decode
--- no_error_log
[error]



=== TEST 9: with prefill off a text-only request goes straight to the combined P/D engine
--- request
POST /pd/v1/chat/completions
{"messages":[{"role":"user","content":"hi"}]}
--- response_body_like eval
qr/^\{"args":"","body":"\{\\"messages\\":\[\{\\"role\\":\\"user\\",\\"content\\":\\"hi\\"\}\]\}".*"uri":"\/mock\/decode\/v1\/chat\/completions"\}$/
--- grep_error_log eval
qr/pdgate_echo: POST \/mock\/\w+/
--- grep_error_log_out
pdgate_echo: POST /mock/decode
--- no_error_log
[error]



=== TEST 10: with prefill off a body that is not JSON is the engine's to judge
--- request
POST /pd/v1/chat/completions
not json
--- response_body_like eval
qr/^\{"args":"","body":"not json",.*"uri":"\/mock\/decode\/v1\/chat\/completions"\}$/
--- no_error_log
[error]



=== TEST 11: an encoder answer larger than subrequest_output_buffer_size does not matter (it is not used)
--- config
    set_request_id on;
    location /v1/ {
        prefill_encode /encode_internal;
        proxy_pass http://decode_pool/mock/decode/v1/;
    }
    location /encode_internal/ {
        internal;
        rewrite ^/encode_internal(/.*)$ /mock/encode$1 break;
        proxy_pass http://encode_pool;
        subrequest_output_buffer_size 64;
    }
    location /mock/encode/ { set_request_id off; pdgate_echo; }
    location /mock/decode/ { set_request_id off; pdgate_echo; }
--- request
POST /v1/chat/completions
{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"a"}},{"type":"image_url","image_url":{"url":"b"}}]}]}
--- response_body_like eval
qr/"uri":"\/mock\/decode\/v1\/chat\/completions"\}$/
--- grep_error_log eval
qr/pdgate_echo: POST \/mock\/\w+/
--- grep_error_log_out
pdgate_echo: POST /mock/encode
pdgate_echo: POST /mock/encode
pdgate_echo: POST /mock/decode
--- no_error_log
[alert]



=== TEST 12: prefill_encode is inherited from the server level
--- config
    set_request_id on;
    prefill_encode /encode_internal;
    location /v1/ {
        proxy_pass http://decode_pool/mock/decode/v1/;
    }
    location /plain/ {
        prefill_encode off;
        proxy_pass http://decode_pool/mock/decode/plain/;
    }
    location /encode_internal/ {
        internal;
        rewrite ^/encode_internal(/.*)$ /mock/encode$1 break;
        proxy_pass http://encode_pool;
    }
    location /mock/encode/ { prefill_encode off; set_request_id off; pdgate_echo; }
    location /mock/decode/ { prefill_encode off; set_request_id off; pdgate_echo; }
--- request
POST /v1/chat/completions
{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"a"}}]}]}
--- response_body_like eval
qr/"uri":"\/mock\/decode\/v1\/chat\/completions"\}$/
--- grep_error_log eval
qr/pdgate_echo: POST \/mock\/\w+/
--- grep_error_log_out
pdgate_echo: POST /mock/encode
pdgate_echo: POST /mock/decode
--- no_error_log
[error]



=== TEST 13: "prefill_encode off" turns an inherited stage off
--- config
    set_request_id on;
    prefill_encode /encode_internal;
    location /v1/ {
        proxy_pass http://decode_pool/mock/decode/v1/;
    }
    location /plain/ {
        prefill_encode off;
        proxy_pass http://decode_pool/mock/decode/plain/;
    }
    location /encode_internal/ {
        internal;
        rewrite ^/encode_internal(/.*)$ /mock/encode$1 break;
        proxy_pass http://encode_pool;
    }
    location /mock/encode/ { prefill_encode off; set_request_id off; pdgate_echo; }
    location /mock/decode/ { prefill_encode off; set_request_id off; pdgate_echo; }
--- request
POST /plain/chat/completions
{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"a"}}]}]}
--- response_body_like eval
qr/"uri":"\/mock\/decode\/plain\/chat\/completions"\}$/
--- grep_error_log eval
qr/pdgate_echo: POST \/mock\/\w+/
--- grep_error_log_out
pdgate_echo: POST /mock/decode
--- no_error_log
[error]



=== TEST 14: a body spilled to a temp file is read once and serves every leg
--- config
    set_request_id on;
    client_body_buffer_size 1k;
    location /v1/ {
        prefill /prefill_internal;
        prefill_encode /encode_internal;
        proxy_pass http://decode_pool/mock/decode/v1/;
    }
    location /encode_internal/ {
        internal;
        rewrite ^/encode_internal(/.*)$ /mock/encode$1 break;
        proxy_pass http://encode_pool;
        subrequest_output_buffer_size 1m;
    }
    location /prefill_internal/ {
        internal;
        rewrite ^/prefill_internal(/.*)$ /mock/prefill$1 break;
        proxy_pass http://prefill_pool;
        subrequest_output_buffer_size 1m;
    }
    location /mock/encode/ { client_body_buffer_size 1m; set_request_id off; pdgate_echo; }
    location /mock/prefill/ { client_body_buffer_size 1m; set_request_id off; pdgate_echo prefill; }
    location /mock/decode/ { client_body_buffer_size 1m; set_request_id off; pdgate_echo; }
--- request eval
"POST /v1/chat/completions\n{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"image_url\",\"image_url\":{\"url\":\"data:image/png;base64," . ("A" x 30000) . "\"}},{\"type\":\"text\",\"text\":\"" . ("x" x 30000) . "\"}]}]}"
--- response_body_like eval
qr/"max_completion_tokens":1,"messages":\[\{"content":\[\{"image_url":\{"url":"data:image\/png;base64,A{30000}"\},"type":"image_url"\},\{"text":"x{30000}","type":"text"\}\].*"uri":"\/mock\/decode\/v1\/chat\/completions"\}$/
--- grep_error_log eval
qr/pdgate_echo: POST \/mock\/\w+\/v1\/chat\/completions \(\d+ body bytes\)/
--- grep_error_log_out
pdgate_echo: POST /mock/encode/v1/chat/completions (30164 body bytes)
pdgate_echo: POST /mock/prefill/v1/chat/completions (60334 body bytes)
pdgate_echo: POST /mock/decode/v1/chat/completions (120877 body bytes)
--- error_log
a client request body is buffered to a temporary file
--- no_error_log
[error]



=== TEST 15: forty items: forty encoder requests, all answered, then the decode
--- config
    set_request_id on;
    location /v1/ {
        prefill_encode /encode_internal;
        prefill_encode_max_items 64;
        proxy_pass http://decode_pool/mock/decode/v1/;
    }
    location /encode_internal/ {
        internal;
        rewrite ^/encode_internal(/.*)$ /mock/encode$1 break;
        proxy_pass http://encode_pool;
    }
    location /mock/encode/ { set_request_id off; access_log logs/access.log enc; pdgate_echo delay=50; }
    location /mock/decode/ { set_request_id off; pdgate_echo; }
--- more_headers
X-Request-Id: forty
--- request eval
"POST /v1/chat/completions\n{\"messages\":[{\"role\":\"user\",\"content\":[" . CORE::join(",", map { "{\"type\":\"image_url\",\"image_url\":{\"url\":\"u$_\"}}" } 0..39) . "]}]}"
--- response_body_like eval
qr/"uri":"\/mock\/decode\/v1\/chat\/completions"\}$/
--- access_log eval
[map { qr/^ENC forty-enc$_ \{"messages":\[\{"role":"user","content":\[\{"type":"image_url","image_url":\{"url":"u$_"\}\}\]\}\]/ } 0..39]
--- no_error_log
[error]
[alert]

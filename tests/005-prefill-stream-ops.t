# ngx_http_prefill_module: stream_ops (usage reporting asked of the decode
# leg, merged into the client's own stream_options, never duplicated), the
# keys only the proxy may set, and requests one KV handoff cannot serve.
use FindBin;
use lib "$FindBin::Bin/common";
use Pdgate::TestEnv;
use Test::Nginx::Socket 'no_plan';

repeat_each(2);
no_shuffle();
add_block_preprocessor(\&Pdgate::TestEnv::pd_defaults);

run_tests();

__DATA__

=== TEST 1: set_opt (inherited from http): a streaming request gets usage in every chunk, the client's other options kept
--- http_config eval
$Pdgate::TestEnv::HTTP_CONFIG . "    stream_ops set_opt;\n"
--- request
POST /v1/completions
{"prompt":"p","stream":true,"stream_options":{"include_usage":false,"other":1}}
--- response_body_like eval
qr/\Qdata: {"echo":{"args":"","body":"{\"prompt\":\"p\",\"stream\":true,\"stream_options\":{\"other\":1,\"include_usage\":true,\"continuous_usage_stats\":true},\"kv_transfer_params\":\E/
--- no_error_log
[error]



=== TEST 2: set_opt leaves a non-streaming request as it is
--- http_config eval
$Pdgate::TestEnv::HTTP_CONFIG . "    stream_ops set_opt;\n"
--- request
POST /v1/completions
{"prompt":"p","stream":false}
--- response_body_like eval
qr/^\{"args":"","body":"\{\\"prompt\\":\\"p\\",\\"stream\\":false,\\"kv_transfer_params\\":/
--- response_body_unlike
stream_options
--- no_error_log
[error]



=== TEST 3: add makes a non-streaming request stream, with usage, without a second "stream" key
--- http_config eval
$Pdgate::TestEnv::HTTP_CONFIG . "    stream_ops add;\n"
--- request
POST /v1/chat/completions
{"messages":[{"role":"user","content":"hi"}],"stream":false}
--- response_headers
Content-Type: text/event-stream
--- response_body_like eval
qr/\Qdata: {"echo":{"args":"","body":"{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"stream\":true,\"stream_options\":{\"include_usage\":true,\"continuous_usage_stats\":true},\"kv_transfer_params\":\E/
--- no_error_log
[error]



=== TEST 4: off (the default) forwards the client's options untouched
--- request
POST /v1/completions
{"prompt":"p","stream":true,"stream_options":{"include_usage":true}}
--- response_body_like eval
qr/\Q"body":"{\"prompt\":\"p\",\"stream\":true,\"stream_options\":{\"include_usage\":true},\"kv_transfer_params\":\E/
--- response_body_unlike
continuous_usage_stats
--- no_error_log
[error]



=== TEST 5: a location's own value wins over the inherited one
--- http_config eval
$Pdgate::TestEnv::HTTP_CONFIG . "    stream_ops add;\n"
--- config
    location /v1/ {
        stream_ops off;
        prefill /prefill_internal;
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
--- response_headers
Content-Type: application/json
--- response_body_unlike
stream_options
--- no_error_log
[error]



=== TEST 6: stream_ops takes off, add or set_opt (the original's misspelt key is no value)
--- http_config eval
$Pdgate::TestEnv::HTTP_CONFIG . "    stream_ops stream_option;\n"
--- must_die
--- error_log
"stream_ops" directive invalid value "stream_option", it must be "off", "add" or "set_opt"



=== TEST 7: keys only the proxy may set reach neither leg
--- request
POST /v1/completions
{"prompt":"p","bootstrap_host":"evil-h","bootstrap_port":9,"bootstrap_room":7,"disaggregated_params":{"x":"evil-d"},"migration_request":"evil-m","kv_transfer_params":{"remote_host":"evil-k"}}
--- response_body_unlike
evil
--- response_body_like eval
qr/"remote_host":"127.0.0.1"/
--- no_error_log
[error]



=== TEST 8: n > 1 gets a clear 400 and no leg is called
--- request
POST /v1/completions
{"prompt":"p","n":2}
--- error_code: 400
--- response_body_like chomp
"message":"\\"n\\": 2 is not supported through prefill/decode disaggregation
--- response_headers
Content-Type: application/json
--- error_log
is not supported through prefill/decode disaggregation
--- no_error_log
pdgate_echo:
[alert]



=== TEST 9: a batch of prompts gets a clear 400
--- request
POST /v1/completions
{"prompt":["a","b"]}
--- error_code: 400
--- response_body_like chomp
a batch \\"prompt\\" \(a list of prompts\) is not supported
--- no_error_log
pdgate_echo:

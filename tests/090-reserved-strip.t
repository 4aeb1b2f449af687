# pd_strip_reserved: a location that forwards a client body to an engine
# without a P/D flow still drops the keys only the proxy may set
# (kv_transfer_params, bootstrap_*, disaggregated_params,
# migration_request), whatever the route; everything else goes through as
# sent. The mock engine is a pdgate_echo location that answers with the
# body it got.
use FindBin;
use lib "$FindBin::Bin/common";
use Pdgate::TestEnv;
use Test::Nginx::Socket 'no_plan';

repeat_each(2);
no_shuffle();

our $Config = <<'_EOC_';
    pd_strip_reserved on;
    location /v1/ { proxy_pass http://decode_pool/mock/engine/v1/; }
    location /invocations { proxy_pass http://decode_pool/mock/engine/invocations; }
    location /tokenize { proxy_pass http://decode_pool/mock/engine/tokenize; }
    location /v1/chat/completions {
        prefill /prefill_internal;
        proxy_pass http://decode_pool/mock/engine/v1/chat/completions;
    }
    location /prefill_internal/ {
        internal;
        rewrite ^/prefill_internal(/.*)$ /mock/prefill$1 break;
        proxy_pass http://prefill_pool;
    }
    location /mock/prefill/ { pdgate_echo prefill; }
    location /mock/engine/ { pd_strip_reserved off; pdgate_echo; }
_EOC_

add_block_preprocessor(sub {
    my $block = shift;
    $block->set_value("http_config", $Pdgate::TestEnv::HTTP_CONFIG) unless defined $block->http_config;
    $block->set_value("config", $Config) unless defined $block->config;
});

run_tests();

__DATA__

=== TEST 1: POST /invocations: the client's kv_transfer_params and bootstrap keys do not reach the engine
--- request
POST /invocations
{"model":"m","kv_transfer_params":{"do_remote_prefill":true,"remote_host":"10.0.0.66"},"prompt":"p","bootstrap_host":"evil","bootstrap_room":1}
--- response_body_like eval
qr/\Q"body":"{\"model\":\"m\",\"prompt\":\"p\"}"\E/
--- error_log
reserved keys (kv_transfer_params, bootstrap_*, …) dropped from the request body
--- no_error_log
[error]



=== TEST 2: a trailing slash on the chat route is no way around it
--- request
POST /v1/chat/completions/
{"messages":[],"disaggregated_params":{"x":1},"migration_request":{"y":2}}
--- response_body_unlike
disaggregated_params|migration_request
--- response_body_like eval
qr/"uri":"\/mock\/engine\/v1\/chat\/completions\/"/
--- no_error_log
[error]



=== TEST 3: POST /v1/responses gets the same strip
--- request
POST /v1/responses
{"input":"hi","kv_transfer_params":{"remote_block_ids":[1,2]}}
--- response_body_like eval
qr/\Q"body":"{\"input\":\"hi\"}"\E/
--- no_error_log
[error]



=== TEST 4: a body without reserved keys goes through byte for byte (spaces, key order, duplicates)
--- request
POST /v1/embeddings
{ "input" : "a",  "model":"m", "input":"b" }
--- response_body_like eval
qr/\Q"body":"{ \"input\" : \"a\",  \"model\":\"m\", \"input\":\"b\" }"\E/
--- no_error_log
[error]
reserved keys



=== TEST 5: a body that is not JSON goes through untouched (the engine judges it)
--- request
POST /tokenize
not json at all
--- response_body_like eval
qr/\Q"body":"not json at all"\E/
--- no_error_log
[error]



=== TEST 6: a GET is not read or touched
--- request
GET /v1/models
--- response_body_like eval
qr/\Q"method":"GET","uri":"\/mock\/engine\/v1\/models"\E/
--- no_error_log
[error]



=== TEST 7: a multipart upload is not buffered for a check: it streams to the engine as sent
--- more_headers
Content-Type: multipart/form-data; boundary=XyZ
--- request eval
"POST /v1/audio/transcriptions\n--XyZ\r\nContent-Disposition: form-data; name=\"kv_transfer_params\"\r\n\r\nx\r\n--XyZ--\r\n"
--- response_body_like eval
qr/name=..kv_transfer_params/
--- no_error_log
[error]



=== TEST 8: with the strip on for the whole server, the P/D route still works and strips as before
--- request
POST /v1/chat/completions
{"messages":[],"kv_transfer_params":{"evil":1}}
--- response_body_unlike
evil
--- response_body_like eval
qr/"kv_transfer_params":\{"do_remote_decode":false,"do_remote_prefill":true/
--- no_error_log
[error]



=== TEST 9: pd_strip_reserved takes on or off only
--- config
    location /x { pd_strip_reserved maybe; }
--- must_die
--- error_log
invalid value "maybe" in "pd_strip_reserved" directive, it must be "on" or "off"



=== TEST 10: as the samples ship it: any POST outside the known routes is a 404 in JSON, with the request id; GETs still reach the engine
--- http_config eval
$Pdgate::TestEnv::HTTP_CONFIG . q{
    map $status $pd_error_json {
        404     '{"error":{"code":404,"message":"no such route on this proxy","param":null,"type":"NotFoundError"}}';
        default '{"error":{"code":500,"message":"internal server error","param":null,"type":"InternalServerError"}}';
    }
}
--- config
    set_request_id on;
    pd_strip_reserved on;
    location @pd_error {
        default_type application/json;
        add_header X-Request-Id $http_x_request_id always;
        return 500 $pd_error_json;
    }
    location ~ ^/(tokenize|detokenize|v1/embeddings)$ {
        proxy_pass http://decode_pool/mock/engine$uri;
    }
    # (the samples' "location /", under a prefix: the test server has its own "/")
    location ~ ^/(v1|invocations) {
        if ($request_method = POST) {
            return 404;
        }
        error_page 404 @pd_error;
        proxy_pass http://decode_pool/mock/engine$uri;
    }
    location /mock/engine/ { set_request_id off; pd_strip_reserved off; pdgate_echo; }
--- request eval
["POST /invocations\n{\"prompt\":\"p\",\"kv_transfer_params\":{}}",
 "POST /v1/responses\n{\"input\":\"p\"}",
 "GET /v1/models",
 "POST /v1/embeddings\n{\"input\":\"p\",\"bootstrap_room\":3}"]
--- error_code eval
[404, 404, 200, 200]
--- response_headers_like eval
["X-Request-Id: [0-9a-f-]{36}", "X-Request-Id: [0-9a-f-]{36}", "", ""]
--- response_body_like eval
["^\\{\"error\":\\{\"code\":404,\"message\":\"no such route on this proxy\"",
 "\"type\":\"NotFoundError\"",
 "\"method\":\"GET\"",
 "\"body\":\"\\{\\\\\"input\\\\\":\\\\\"p\\\\\"\\}\""]
--- no_error_log
[error]



=== TEST 11: a body beyond the member bound is refused (413 JSON), never forwarded with its reserved keys unchecked
--- request eval
"POST /invocations\n{\"kv_transfer_params\":{\"evil\":1}," . join(",", map { "\"k$_\":$_" } 0 .. 1099) . "}"
--- error_code: 413
--- response_body_like chomp
"code":413
--- no_error_log
pdgate_echo: POST /mock/engine/
[alert]

# ngx_http_prefill_refactor_module (SGLang bootstrap mode): what each leg
# receives, in both distributions. The decode mock answers with the request
# it got; the prefill mock logs its body to the access log.
use FindBin;
use lib "$FindBin::Bin/common";
use Pdgate::TestEnv;
use Pdgate::Sglang;
use Test::Nginx::Socket 'no_plan';

repeat_each(2);
no_shuffle();
my $pre = Pdgate::Sglang::defaults('pd_together');
add_block_preprocessor(sub { $pre->(@_) });

run_tests();

__DATA__

=== TEST 1: pd_together: the decode gets the client's request plus the bootstrap triple as JSON numbers
--- request
POST /v1/chat/completions
{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":false,"max_tokens":5}
--- response_body_like eval
qr/"json":\{"bootstrap_host":"127\.0\.0\.1","bootstrap_port":8998,"bootstrap_room":\d+,"max_tokens":5,"messages":\[\{"content":"hi","role":"user"\}\],"model":"m","stream":false\},"method":"POST","uri":"\/mock\/decode\/v1\/chat\/completions"\}$/
--- response_headers_like
X-Prefill-Server: 127\.0\.0\.1:\d+
X-Decode-Server: 127\.0\.0\.1:\d+
X-Bootstrap-Room: \d+
--- access_log eval
qr/^prefill body: \{"model":"m","messages":\[\{"role":"user","content":"hi"\}\],"max_tokens":5,"stream":false,"bootstrap_host":"127\.0\.0\.1","bootstrap_port":8998,"bootstrap_room":\d+\}$/
--- no_error_log
[error]
[warn]



=== TEST 2: the room in the body is the room of $bootstrap_room, and a 63-bit number
--- request
POST /v1/completions
{"prompt":"p"}
--- response_body_like eval
qr/"bootstrap_room\\":(\d+)\}.*"bootstrap_room":\1,/
--- no_error_log
[error]



=== TEST 3: a streaming request: the decode keeps "stream":true, the prefill gets "stream":false and no stream_options
--- request
POST /v1/completions
{"prompt":"p","stream":true,"stream_options":{"include_usage":true}}
--- response_body_like eval
qr/^data: .*\\"stream\\":true,\\"stream_options\\":\{\\"include_usage\\":true\},\\"bootstrap_host\\":\\"127.0.0.1\\"/s
--- access_log eval
qr/^prefill body: \{"prompt":"p","stream":false,"bootstrap_host":"127\.0\.0\.1","bootstrap_port":8998,"bootstrap_room":\d+\}$/
--- decode_echo
sse=2
--- no_error_log
[error]



=== TEST 4: client-supplied bootstrap and KV-transfer keys reach neither leg
--- request
POST /v1/completions
{"bootstrap_host":"evil","bootstrap_port":6666,"bootstrap_room":"evil","prompt":"p","kv_transfer_params":{"evil":1},"disaggregated_params":{"evil":1},"migration_request":{"evil":1}}
--- response_body_unlike
evil|6666
--- response_body_like eval
qr/"json":\{"bootstrap_host":"127\.0\.0\.1","bootstrap_port":8998,"bootstrap_room":\d+,"prompt":"p"\}/
--- access_log eval
qr/^prefill body: \{"prompt":"p","stream":false,"bootstrap_host":"127\.0\.0\.1","bootstrap_port":8998,"bootstrap_room":\d+\}$/
--- no_error_log
[error]



=== TEST 5: nested keys of the same names are text and stay
--- request
POST /v1/chat/completions
{"messages":[{"role":"user","content":"bootstrap_room","bootstrap_room":1,"stream":true}],"stream":true}
--- response_body_like eval
qr/"messages":\[\{"bootstrap_room":1,"content":"bootstrap_room","role":"user","stream":true\}\]/
--- decode_echo
sse=1
--- no_error_log
[error]



=== TEST 6: query arguments, the method and X-Request-Id reach both legs
--- more_headers
X-Request-Id: abc-123
--- request
PUT /v1/completions?tenant=a
{"prompt":"p"}
--- response_body_like eval
qr/^\{"args":"tenant=a",.*"x-request-id":"abc-123".*"method":"PUT","uri":"\/mock\/decode\/v1\/completions"\}$/
--- error_log eval
qr/pdgate_echo: PUT \/mock\/prefill\/v1\/completions/
--- no_error_log
[error]



=== TEST 7: a body larger than client_body_buffer_size (in a temp file) is carried on both legs
--- request eval
"POST /v1/completions\n{\"prompt\":\"" . ("x" x 300000) . "\",\"max_tokens\":3}"
--- response_body_like eval
qr/"bootstrap_room":\d+,"max_tokens":3,"prompt":"x+"\}/
--- error_log eval
qr/pdgate_echo: POST \/mock\/prefill\/v1\/completions \(30\d{4} body bytes\)/
--- no_error_log
[error]



=== TEST 8: bootstrap_ports_list gives each prefill server its own port; no list means 8998
--- config
    location /v1/ {
        prefill_refactor /prefill_internal;
        prefill_servers_list 127.0.0.1:$TEST_NGINX_SERVER_PORT;
        decode_servers_list 127.0.0.1:$TEST_NGINX_SERVER_PORT;
        pd_distribution pd_together;
        proxy_pass http://$decode_server/mock/decode$uri;
        location /v1/ports/ {
            bootstrap_ports_list 7001;
            proxy_pass http://$decode_server/mock/decode$uri;
        }
    }
    location /prefill_internal/ {
        internal;
        rewrite ^/prefill_internal(/.*)$ /mock/prefill$1 break;
        proxy_pass http://$prefill_server;
    }
    location /mock/ { pdgate_echo; }
--- request eval
["POST /v1/completions\n{}", "POST /v1/ports/completions\n{}"]
--- response_body_like eval
[qr/"json":\{"bootstrap_host":"127\.0\.0\.1","bootstrap_port":8998,"bootstrap_room":\d+\}/,
 qr/"json":\{"bootstrap_host":"127\.0\.0\.1","bootstrap_port":7001,"bootstrap_room":\d+\}/]
--- no_error_log
[error]

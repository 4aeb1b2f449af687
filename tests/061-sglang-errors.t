# ngx_http_prefill_refactor_module: concurrency of pd_together, sequencing
# of p_before_d, failures of either leg (the other is cancelled, the client
# gets a clear error, nothing hangs) and counters back to zero.
use FindBin;
use lib "$FindBin::Bin/common";
use Pdgate::TestEnv;
use Pdgate::Sglang;
use Test::Nginx::Socket 'no_plan';

no_shuffle();
my $pre = Pdgate::Sglang::defaults('pd_together');
add_block_preprocessor(sub { $pre->(@_) });

run_tests();

__DATA__

=== TEST 1: pd_together runs both legs at once: prefill 500 ms + decode 500 ms answer in well under 1 s
--- prefill_echo
delay=500
--- decode_echo
delay=500
--- request
POST /v1/completions
{"prompt":"p"}
--- timeout: 0.9
--- error_code: 200
--- response_headers_like
X-Elapsed: 0\.[4-7]\d\d
--- error_log eval
[qr/pdgate_echo: POST \/mock\/prefill\/v1\/completions/, qr/pdgate_echo: POST \/mock\/decode\/v1\/completions/]
--- no_error_log
[error]



=== TEST 2: p_before_d runs them one after the other: the decode starts after the 500 ms prefill
--- config eval
Pdgate::Sglang::config('p_before_d', 'delay=500', 'delay=500')
--- request
POST /v1/completions
{"prompt":"p"}
--- error_code: 200
--- response_headers_like
X-Elapsed: (?:0\.9[5-9]\d|1\.\d\d\d)
--- response_body_like eval
qr/"json":\{"bootstrap_host":"127\.0\.0\.1","bootstrap_port":8998,"bootstrap_room":\d+,"prompt":"p"\}/
--- access_log eval
qr/^prefill body: \{"prompt":"p","stream":false,"bootstrap_host":"127\.0\.0\.1","bootstrap_port":8998,"bootstrap_room":\d+\}$/
--- no_error_log
[error]



=== TEST 3: p_before_d: a prefill error answer goes to the client as it is, the decode is never called
--- config eval
Pdgate::Sglang::config('p_before_d', 'status=429', '')
--- request
POST /v1/completions
{"prompt":"p"}
--- error_code: 429
--- response_body_like eval
qr/"json":\{"bootstrap_host":"127\.0\.0\.1","bootstrap_port":8998,"bootstrap_room":\d+,"prompt":"p","stream":false\}/
--- error_log
prefill answered 429, passing its answer to the client
--- no_error_log
pdgate_echo: POST /mock/decode



=== TEST 4: pd_together: a prefill error cancels the waiting decode; the client gets it at once, in JSON
--- prefill_echo
status=503
--- decode_echo
delay=2000
--- request
POST /v1/completions
{"prompt":"p"}
--- timeout: 1
--- error_code: 503
--- response_body_like eval
qr/^\{"error":\{"code":503,"message":"prefill server answered 503","param":null,"type":"ServiceUnavailableError"\}\}$/
--- error_log
prefill_refactor: prefill answered 503, cancelling the decode



=== TEST 5: pd_together: an unreachable prefill cancels the decode with 502
--- prefill_servers
127.0.0.1:1
--- decode_echo
delay=2000
--- request
POST /v1/completions
{"prompt":"p"}
--- timeout: 1
--- error_code: 502
--- response_body_like eval
qr/"message":"prefill upstream is unreachable"/
--- error_log
prefill upstream is unreachable, cancelling the decode



=== TEST 6: pd_together: a decode error cancels the running prefill; the client gets the decode's answer at once
--- prefill_echo
delay=3000
--- decode_echo
status=500
--- request
POST /v1/completions
{"prompt":"p"}
--- timeout: 1
--- error_code: 500
--- response_body_like eval
qr/"method":"POST","uri":"\/mock\/decode\/v1\/completions"/
--- error_log
prefill_refactor: decode answered 500, cancelling the prefill



=== TEST 7: n > 1 is refused with 400 before any leg is called
--- request
POST /v1/chat/completions
{"messages":[],"n":3}
--- error_code: 400
--- response_body_like eval
qr/"message":"\\"n\\": 3 is not supported through prefill\/decode disaggregation, send one request per sample"/
--- no_error_log
pdgate_echo
[error]



=== TEST 8: a batch prompt is refused with 400
--- request
POST /v1/completions
{"prompt":["a","b"]}
--- error_code: 400
--- response_body_like eval
qr/a batch \\"prompt\\" \(a list of prompts\) is not supported/
--- no_error_log
pdgate_echo



=== TEST 9: a body that is not a JSON object gets 400 naming the problem
--- request
POST /v1/completions
{"prompt":
--- error_code: 400
--- response_body_like eval
qr/request body is not a JSON object: invalid JSON: expected a JSON value at byte 10/
--- no_error_log
pdgate_echo



=== TEST 10: a GET without a body gets 400, not a hang
--- request
GET /v1/completions
--- error_code: 400
--- response_body_like eval
qr/request body is not a JSON object: body is empty/



=== TEST 11: counters are back to zero after successes, errors and refusals, in both modes
--- skip_eval: 1: $ENV{TEST_NGINX_USE_HUP}
--- config eval
Pdgate::Sglang::config('pd_together', '', '', undef,
  "location /v1/seq/ { pd_distribution p_before_d; proxy_pass http://\$decode_server/mock/decode\$uri; }")
--- request eval
["POST /v1/completions\n{\"prompt\":\"p\"}",
 "POST /v1/seq/completions\n{\"prompt\":\"p\"}",
 "POST /v1/completions\n{\"n\":2}",
 "POST /v1/completions\n{\"prompt\":\"p\",\"stream\":true}",
 "GET /counters"]
--- error_code eval
[200, 200, 400, 200, 200]
--- response_body_like eval
[qr/bootstrap_room/, qr/bootstrap_room/, qr/not supported/, qr/bootstrap_room/,
 qr/^\{"prefill":\{"127\.0\.0\.1:\d+":\{"active":0,"total":3\}\},"decode":\{"127\.0\.0\.1:\d+":\{"active":0,"total":3\}\}\}$/]
--- no_error_log
[error]



=== TEST 12: with a balancer's policy (prefill_refactor_balance) requests flow and counters return to zero
--- skip_eval: 1: $ENV{TEST_NGINX_USE_HUP}
--- config eval
Pdgate::Sglang::config('pd_together', '', '', undef,
  "prefill_refactor_balance prefill_score_balance;\n location /v1/seq/ { pd_distribution p_before_d; proxy_pass http://\$decode_server/mock/decode\$uri; }")
--- request eval
["POST /v1/completions\n{\"prompt\":\"p\"}",
 "POST /v1/seq/completions\n{\"prompt\":\"p\"}",
 "POST /v1/completions\n{\"prompt\":\"p\",\"stream\":true}",
 "GET /counters"]
--- error_code eval
[200, 200, 200, 200]
--- response_body_like eval
[qr/bootstrap_room/, qr/bootstrap_room/, qr/bootstrap_room/,
 qr/^\{"prefill":\{"127\.0\.0\.1:\d+":\{"active":0,"total":3\}\},"decode":\{"127\.0\.0\.1:\d+":\{"active":0,"total":3\}\}\}$/]
--- no_error_log
[error]



=== TEST 13: p_before_d: a prefill answer that stalls after its 2xx header past the read timeout is a failed prefill: 502, no decode
--- config
    set_request_id on;
    location /v1/ {
        prefill_refactor /prefill_internal;
        prefill_servers_list 127.0.0.1:$TEST_NGINX_SERVER_PORT;
        decode_servers_list 127.0.0.1:$TEST_NGINX_SERVER_PORT;
        pd_distribution p_before_d;
        pd_backend sglang;
        proxy_pass http://$decode_server/mock/decode$uri;
    }
    location /prefill_internal/ {
        internal;
        rewrite ^/prefill_internal(/.*)$ /mock/prefill$1 break;
        proxy_pass http://$prefill_server;
        proxy_read_timeout 300ms;
    }
    location = /counters {
        prefill_servers_list 127.0.0.1:$TEST_NGINX_SERVER_PORT;
        decode_servers_list 127.0.0.1:$TEST_NGINX_SERVER_PORT;
        return 200 "$prefill_refactor_counters\n";
    }
    location /mock/prefill/ { set_request_id off; limit_rate_after 200; limit_rate 1; pdgate_echo; }
    location /mock/decode/ { set_request_id off; pdgate_echo; }
--- request
POST /v1/completions
{"prompt":"p"}
--- error_code: 502
--- response_body_like chomp
"message":"prefill answer was cut off after its header"
--- error_log
prefill_refactor: prefill answer was cut off after its header
--- no_error_log
pdgate_echo: POST /mock/decode/
[alert]



=== TEST 14: pd_together: a prefill still running 5 s after its decode ended is stopped
--- prefill_echo
delay=9000
--- request
POST /v1/completions
{"prompt":"p"}
--- error_code: 200
--- wait: 6
--- timeout: 10
--- error_log
prefill_refactor: prefill still running 5000 ms after its decode ended, stopping it
--- no_error_log
[alert]



=== TEST 15: p_before_d: a prefill server that refuses connections is retried on the other and left out for fail_timeout; every request succeeds
--- skip_eval: 1: $ENV{TEST_NGINX_USE_HUP}
--- config eval
Pdgate::Sglang::config('p_before_d', '', '', '127.0.0.1:1,127.0.0.1:$TEST_NGINX_SERVER_PORT')
--- request eval
["POST /v1/completions\n{\"prompt\":\"p\"}","POST /v1/completions\n{\"prompt\":\"p\"}","POST /v1/completions\n{\"prompt\":\"p\"}","POST /v1/completions\n{\"prompt\":\"p\"}","POST /v1/completions\n{\"prompt\":\"p\"}","POST /v1/completions\n{\"prompt\":\"p\"}","POST /v1/completions\n{\"prompt\":\"p\"}","POST /v1/completions\n{\"prompt\":\"p\"}","POST /v1/completions\n{\"prompt\":\"p\"}","POST /v1/completions\n{\"prompt\":\"p\"}","POST /v1/completions\n{\"prompt\":\"p\"}","POST /v1/completions\n{\"prompt\":\"p\"}","GET /counters"]
--- error_code eval
[200,200,200,200,200,200,200,200,200,200,200,200,200]
--- response_body_like eval
["bootstrap_host","bootstrap_host","bootstrap_host","bootstrap_host","bootstrap_host","bootstrap_host","bootstrap_host","bootstrap_host","bootstrap_host","bootstrap_host","bootstrap_host","bootstrap_host","\"127.0.0.1:1\":\\{\"active\":0,\"total\":1\\},\"127.0.0.1:\\d+\":\\{\"active\":0,"]
--- no_error_log
[alert]


=== TEST 16: n given as a string ("2") is refused like the number 2, in the vLLM mode's words
--- request
POST /v1/completions
{"prompt":"p","n":"2"}
--- error_code: 400
--- response_body chomp
{"error":{"code":400,"message":"\"n\": \"2\" is not supported through prefill/decode disaggregation, send one request per sample","param":null,"type":"BadRequestError"}}
--- no_error_log
pdgate_echo
[error]



=== TEST 17: best_of given as a float (2.0) is refused like the integer 2
--- request
POST /v1/chat/completions
{"messages":[],"best_of":2.0}
--- error_code: 400
--- response_body_like eval
qr/"message":"\\"best_of\\": 2\.0 is not supported through prefill\/decode disaggregation, send one request per sample"/
--- no_error_log
pdgate_echo



=== TEST 18: a fractional n (1.5) is an invalid n
--- request
POST /v1/completions
{"prompt":"p","n":1.5}
--- error_code: 400
--- response_body_like eval
qr/"message":"invalid \\"n\\": 1\.5, expected a positive integer"/
--- no_error_log
pdgate_echo



=== TEST 19: an n that is not a number ("abc") is an invalid n
--- request
POST /v1/completions
{"prompt":"p","n":"abc"}
--- error_code: 400
--- response_body_like eval
qr/"message":"invalid \\"n\\": \\"abc\\", expected a positive integer"/
--- no_error_log
pdgate_echo



=== TEST 20: n and best_of equal to 1 in any spelling (1.0, "1") go through both legs
--- request
POST /v1/completions
{"prompt":"p","n":1.0,"best_of":"1"}
--- error_code: 200
--- response_body_like eval
qr/"json":\{"best_of":"1","bootstrap_host":"127\.0\.0\.1","bootstrap_port":8998,"bootstrap_room":\d+,"n":1\.0,"prompt":"p"\}/
--- error_log eval
[qr/pdgate_echo: POST \/mock\/prefill\/v1\/completions/, qr/pdgate_echo: POST \/mock\/decode\/v1\/completions/]
--- no_error_log
[error]

# pd_health_check: one worker probes every peer of a checked upstream and
# every worker keeps round robin's `down` flags in line with the shared
# results, so traffic skips peers that are not up (refused, 503, not probed
# yet); pd_health_ready answers the proxy's own readiness; pd_health_status
# shows each peer. The first request of a block (/wait, answered after 300
# ms) gives the first probes time to land.
use FindBin;
use lib "$FindBin::Bin/common";
use Pdgate::TestEnv;
use Pdgate::Sglang;
use Test::Nginx::Socket 'no_plan';

no_shuffle();
run_tests();

__DATA__

=== TEST 1: an unknown parameter fails the configuration
--- http_config
    upstream ups { server 127.0.0.1:$TEST_NGINX_SERVER_PORT; pd_health_check bogus=1; }
--- config
    location /t { proxy_pass http://ups; }
--- must_die
--- error_log
"pd_health_check" directive invalid parameter "bogus=1"



=== TEST 2: a timeout longer than the interval fails the configuration
--- http_config
    upstream ups { server 127.0.0.1:$TEST_NGINX_SERVER_PORT; pd_health_check interval=1s timeout=2s; }
--- config
    location /t { proxy_pass http://ups; }
--- must_die
--- error_log
"pd_health_check" directive timeout (2000 ms) is longer than interval (1000 ms)



=== TEST 3: pd_health_check twice in one upstream is a duplicate
--- http_config
    upstream ups { server 127.0.0.1:$TEST_NGINX_SERVER_PORT; pd_health_check; pd_health_check fails=3; }
--- config
    location /t { proxy_pass http://ups; }
--- must_die
--- error_log
"pd_health_check" directive is duplicate



=== TEST 4: pd_health_ready must name a checked upstream
--- http_config
    upstream ups { server 127.0.0.1:$TEST_NGINX_SERVER_PORT; }
--- config
    location = /health { pd_health_ready ups; }
--- must_die
--- error_log
pd_health_ready: upstream "ups" has no pd_health_check



=== TEST 5: a bare pd_health_ready needs some upstream with pd_health_check
--- http_config
    upstream ups { server 127.0.0.1:$TEST_NGINX_SERVER_PORT; }
--- config
    location = /health { pd_health_ready; }
--- must_die
--- error_log
pd_health_ready: no upstream has pd_health_check in



=== TEST 6: a refused peer takes no traffic; the proxy is ready with the other
--- http_config
    upstream ups {
        zone ups 64k;
        server 127.0.0.2:$TEST_NGINX_SERVER_PORT;
        server 127.0.0.1:$TEST_NGINX_SERVER_PORT;
        pd_health_check interval=100ms timeout=100ms fails=1 passes=1 uri=/mock/health;
    }
--- config
    location = /wait { pdgate_echo delay=300; }
    location = /mock/health { return 200 "ok\n"; }
    location /mock/ { pdgate_echo; }
    location /t { proxy_pass http://ups/mock/; }
    location = /health { pd_health_ready ups; }
--- request eval
["GET /wait", "GET /t", "GET /t", "GET /t", "GET /t", "GET /health"]
--- error_code eval
[200, 200, 200, 200, 200, 200]
--- response_body_like eval
[qr/"uri":"\/wait"/, qr/"uri":"\/mock\/"/, qr/"uri":"\/mock\/"/, qr/"uri":"\/mock\/"/, qr/"uri":"\/mock\/"/,
 qr/^\{"status":"ready"\}$/]
--- no_error_log
connect() failed
[alert]
[crit]



=== TEST 7: the status page shows each peer's health and the prober
--- http_config
    upstream ups {
        zone ups 64k;
        server 127.0.0.2:$TEST_NGINX_SERVER_PORT;
        server 127.0.0.1:$TEST_NGINX_SERVER_PORT;
        pd_health_check interval=100ms timeout=100ms fails=1 passes=1 uri=/mock/health;
    }
--- config
    location = /wait { pdgate_echo delay=300; }
    location = /mock/health { return 200 "ok\n"; }
    location = /status { pd_health_status; }
--- request eval
["GET /wait", "GET /status"]
--- response_body_like eval
[qr/"uri":"\/wait"/,
 qr/^prober pid [1-9]\d*\nupstream ups peer 127\.0\.0\.2:\d+ down eligible=0 probes=\d+ bad=\d+ last="connection refused" checked_ago_ms=\d+ latency_us=\d+\nupstream ups peer 127\.0\.0\.1:\d+ up eligible=1 probes=\d+ bad=0 last="status 200"/]



=== TEST 8: every change of a peer's health is logged, and which worker probes
--- http_config
    upstream ups {
        zone ups 64k;
        server 127.0.0.2:$TEST_NGINX_SERVER_PORT;
        server 127.0.0.1:$TEST_NGINX_SERVER_PORT;
        pd_health_check interval=100ms timeout=100ms fails=1 passes=1 uri=/mock/health;
    }
--- config
    location = /wait { pdgate_echo delay=300; }
    location = /mock/health { return 200 "ok\n"; }
--- request
GET /wait
--- error_log
probes for every worker
pd_health_check: upstream "ups" peer 127.0.0.2:
is down (connection refused), was unknown
is up (status 200 after 1 good probes), was unknown



=== TEST 9: an engine answering 503 (SGLang while loading) is down: not ready, no traffic
--- http_config
    upstream ups {
        server 127.0.0.1:$TEST_NGINX_SERVER_PORT;
        pd_health_check interval=100ms timeout=100ms fails=1 uri=/mock/health;
    }
--- config
    location = /wait { pdgate_echo delay=300; }
    location = /mock/health { return 503; }
    location /mock/ { pdgate_echo; }
    location /t { proxy_pass http://ups/mock/; }
    location = /health { pd_health_ready; }
--- request eval
["GET /wait", "GET /t", "GET /health"]
--- error_code eval
[200, 502, 503]
--- response_body_like eval
[qr/"uri":"\/wait"/, qr/502 Bad Gateway/,
 qr/^\{"error":\{"code":503,"message":"no healthy server in upstream \\"ups\\"","param":null,"type":"ServiceUnavailableError"\}\}$/]



=== TEST 10: a peer not probed up yet takes no request: no live upstreams
--- http_config
    upstream ups {
        server 127.0.0.1:$TEST_NGINX_SERVER_PORT;
        pd_health_check interval=100ms timeout=100ms fails=1 uri=/mock/health;
    }
--- config
    location = /mock/health { return 503; }
    location /t { proxy_pass http://ups/mock/; }
--- request
GET /t
--- error_code: 502
--- error_log
no live upstreams while connecting to upstream



=== TEST 11: a server the configuration marks down is neither probed nor turned up
--- http_config
    upstream ups {
        server 127.0.0.1:$TEST_NGINX_SERVER_PORT;
        server 127.0.0.2:$TEST_NGINX_SERVER_PORT down;
        pd_health_check interval=100ms timeout=100ms uri=/mock/health;
    }
--- config
    location = /wait { pdgate_echo delay=300; }
    location = /mock/health { return 200; }
    location = /status { pd_health_status; }
--- request eval
["GET /wait", "GET /status"]
--- response_body_like eval
[qr/"uri":"\/wait"/, qr/peer 127\.0\.0\.1:\d+ up eligible=1 .*\nupstream ups peer 127\.0\.0\.2:\d+ down \(configured\)\n$/s]
--- no_error_log
[alert]
[crit]



=== TEST 12: SGLang mode: prefill_refactor_health keeps its own prefill choice off a refused server
--- http_config
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    log_format pbody escape=none 'prefill body: $request_body';
    upstream prefill_servers {
        zone prefill_servers 64k;
        server 127.0.0.2:$TEST_NGINX_SERVER_PORT;
        server 127.0.0.1:$TEST_NGINX_SERVER_PORT;
        pd_health_check interval=100ms timeout=100ms fails=1 uri=/mock/health;
    }
--- config eval
Pdgate::Sglang::config('pd_together', '', '',
    '127.0.0.2:$TEST_NGINX_SERVER_PORT,127.0.0.1:$TEST_NGINX_SERVER_PORT',
    '        prefill_refactor_health prefill_servers;')
. "    location = /mock/health { return 200; }\n    location = /wait { pdgate_echo delay=300; }\n"
--- request eval
["GET /wait",
 "POST /v1/completions\n{\"prompt\":\"p\"}", "POST /v1/completions\n{\"prompt\":\"p\"}",
 "POST /v1/completions\n{\"prompt\":\"p\"}", "POST /v1/completions\n{\"prompt\":\"p\"}"]
--- error_code eval
[200, 200, 200, 200, 200]
--- no_error_log
connect() failed
no answer
[alert]



=== TEST 13: prefill_refactor_health must name an upstream block
--- http_config
    upstream prefill_servers { server 127.0.0.1:$TEST_NGINX_SERVER_PORT; }
--- config
    location /v1/ {
        prefill_refactor /prefill_internal;
        prefill_servers_list 127.0.0.1:$TEST_NGINX_SERVER_PORT;
        decode_servers_list 127.0.0.1:$TEST_NGINX_SERVER_PORT;
        prefill_refactor_health prefill_servrs;
        proxy_pass http://$decode_server;
    }
--- must_die
--- error_log
"prefill_refactor_health" names no upstream block "prefill_servrs"

# pd_engine_metrics: one worker scrapes each peer's Prometheus /metrics
# into the shared health zone; every balancer adds the engine's own queue
# (another proxy's requests) and KV pressure to what it counts, and
# earliest_start predicts from the rates learned while the engines are
# saturated. The mocks answer vLLM's metric names; `$msec` in a counter
# makes it grow with the clock (`${msec}e4`: 10 000 per second). The
# first request of a block (/wait, answered after 400 ms) gives the first
# scrapes time to land.
use FindBin;
use lib "$FindBin::Bin/common";
use Pdgate::TestEnv;
use Test::Nginx::Socket 'no_plan';

no_shuffle();
run_tests();

__DATA__

=== TEST 1: an unknown parameter fails the configuration
--- http_config
    upstream ups { server 127.0.0.1:$TEST_NGINX_SERVER_PORT; pd_engine_metrics every=1s; }
--- config
    location /t { proxy_pass http://ups; }
--- must_die
--- error_log
"pd_engine_metrics" directive invalid parameter "every=1s"



=== TEST 2: kv_high is a percentage
--- http_config
    upstream ups { server 127.0.0.1:$TEST_NGINX_SERVER_PORT; pd_engine_metrics kv_high=150; }
--- config
    location /t { proxy_pass http://ups; }
--- must_die
--- error_log
"pd_engine_metrics" directive invalid parameter "kv_high=150", it must be a percentage from 1 to 100



=== TEST 3: pd_engine_metrics twice in one upstream is a duplicate
--- http_config
    upstream ups { server 127.0.0.1:$TEST_NGINX_SERVER_PORT; pd_engine_metrics; pd_engine_metrics uri=/m; }
--- config
    location /t { proxy_pass http://ups; }
--- must_die
--- error_log
"pd_engine_metrics" directive is duplicate



=== TEST 4: the status page and pd_metrics show what each engine reports
--- http_config
    upstream ups {
        zone ups 64k;
        server 127.0.0.1:$TEST_NGINX_RAND_PORT_1;
        pd_engine_metrics interval=100ms timeout=100ms;
    }
    server {
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1;
        location = /metrics {
            return 200 "# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{engine=\"0\",model_name=\"m\"} 3\nvllm:num_requests_waiting{engine=\"0\",model_name=\"m\"} 2\nvllm:kv_cache_usage_perc{engine=\"0\",model_name=\"m\"} 0.25\nvllm:prefix_cache_queries_total{engine=\"0\",model_name=\"m\"} 400\nvllm:prefix_cache_hits_total{engine=\"0\",model_name=\"m\"} 100\n";
        }
    }
--- config
    location = /wait { pdgate_echo delay=400; }
    location = /status { pd_health_status; }
    location = /metrics { pd_metrics; }
--- request eval
["GET /wait", "GET /status", "GET /metrics"]
--- response_body_like eval
[qr/"uri":"\/wait"/,
 qr/^prober pid [1-9]\d*\nupstream ups peer 127\.0\.0\.1:\d+ engine running=3 waiting=2 kv=25\.0% prefix_hits=100\/400 rate_tps=0 finish_per_s=0\.000 fresh=1 scraped_ago_ms=\d+ scrapes=\d+ failed=0 latency_us=\d+ placed=0 ended=0\n$/,
 qr/pdgate_engine_requests_running\{upstream="ups",peer="127\.0\.0\.1:\d+"\} 3\n(.|\n)*pdgate_engine_requests_waiting\{upstream="ups",peer="127\.0\.0\.1:\d+"\} 2\n(.|\n)*pdgate_engine_kv_cache_usage_ratio\{upstream="ups",peer="127\.0\.0\.1:\d+"\} 0\.250\n/]
--- no_error_log
[warn]
[alert]



=== TEST 5: a failing scrape is logged once and counted
--- http_config
    upstream ups {
        server 127.0.0.1:$TEST_NGINX_RAND_PORT_1;
        pd_engine_metrics interval=100ms timeout=100ms;
    }
    server { listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1; location = /metrics { return 503; } }
--- config
    location = /wait { pdgate_echo delay=400; }
--- request
GET /wait
--- error_log eval
qr/pd_engine_metrics: upstream "ups" peer 127\.0\.0\.1:\d+: status 503, its metrics age out/
--- no_error_log
[alert]



=== TEST 6: another proxy's queue on an engine steers least_total_load off it
--- http_config
    upstream pool {
        zone pool 64k;
        server 127.0.0.1:$TEST_NGINX_RAND_PORT_1;
        server 127.0.0.1:$TEST_NGINX_RAND_PORT_2;
        least_total_load on;
        pd_engine_metrics interval=100ms timeout=100ms;
    }
    server {
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1;
        add_header X-Backend busy;
        location = /metrics { return 200 "vllm:num_requests_running 16\nvllm:num_requests_waiting 40\n"; }
        location / { pdgate_echo; }
    }
    server {
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_2;
        add_header X-Backend idle;
        location = /metrics { return 200 "vllm:num_requests_running 0\nvllm:num_requests_waiting 0\n"; }
        location / { pdgate_echo; }
    }
--- config
    location = /wait { pdgate_echo delay=400; }
    location = /t { proxy_pass http://pool/echo; }
--- request eval
["GET /wait", "POST /t\n{\"prompt\":\"hello\"}", "POST /t\n{\"prompt\":\"hello\"}",
 "POST /t\n{\"prompt\":\"hello\"}", "POST /t\n{\"prompt\":\"hello\"}", "POST /t\n{\"prompt\":\"hello\"}"]
--- response_headers eval
["", "X-Backend: idle", "X-Backend: idle", "X-Backend: idle", "X-Backend: idle", "X-Backend: idle"]
--- no_error_log
[error]



=== TEST 7: an engine whose KV cache is nearly full comes after the others
--- http_config
    upstream pool {
        zone pool 64k;
        server 127.0.0.1:$TEST_NGINX_RAND_PORT_1 weight=4;
        server 127.0.0.1:$TEST_NGINX_RAND_PORT_2;
        weighted_least_active on;
        pd_engine_metrics interval=100ms timeout=100ms kv_high=90;
    }
    server {
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1;
        add_header X-Backend full;
        location = /metrics { return 200 "vllm:num_requests_running 0\nvllm:kv_cache_usage_perc 0.97\n"; }
        location / { pdgate_echo; }
    }
    server {
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_2;
        add_header X-Backend roomy;
        location = /metrics { return 200 "vllm:num_requests_running 0\nvllm:kv_cache_usage_perc 0.30\n"; }
        location / { pdgate_echo; }
    }
--- config
    location = /wait { pdgate_echo delay=400; }
    location = /t { proxy_pass http://pool/echo; }
--- request eval
["GET /wait", "POST /t\n{\"prompt\":\"hello\"}", "POST /t\n{\"prompt\":\"hello\"}", "POST /t\n{\"prompt\":\"hello\"}"]
--- response_headers eval
["", "X-Backend: roomy", "X-Backend: roomy", "X-Backend: roomy"]
--- no_error_log
[error]



=== TEST 8: earliest_start prefill learns each engine's rate while it queues and picks the faster
--- http_config
    upstream pool {
        zone pool 64k;
        server 127.0.0.1:$TEST_NGINX_RAND_PORT_1 weight=8;
        server 127.0.0.1:$TEST_NGINX_RAND_PORT_2;
        earliest_start prefill;
        pd_engine_metrics interval=100ms timeout=100ms;
    }
    server {
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1;
        add_header X-Backend slow;
        location = /metrics { return 200 "vllm:num_requests_running 1\nvllm:num_requests_waiting 1\nvllm:prompt_tokens_total ${msec}e1\n"; }
        location / { pdgate_echo; }
    }
    server {
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_2;
        add_header X-Backend fast;
        location = /metrics { return 200 "vllm:num_requests_running 1\nvllm:num_requests_waiting 1\nvllm:prompt_tokens_total ${msec}e4\n"; }
        location / { pdgate_echo; }
    }
    server {
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_3;
        location = /status { pd_health_status; }
    }
--- config
    location = /wait { pdgate_echo delay=600; }
    location = /t { proxy_pass http://pool/echo; }
    location = /status { proxy_pass http://127.0.0.1:$TEST_NGINX_RAND_PORT_3; }
--- request eval
["GET /wait", "POST /t\n{\"prompt\":\"hello\"}", "POST /t\n{\"prompt\":\"hello\"}",
 "POST /t\n{\"prompt\":\"hello\"}", "GET /status"]
--- response_headers eval
["", "X-Backend: fast", "X-Backend: fast", "X-Backend: fast", ""]
--- response_body_like eval
[qr/wait/, qr/echo/, qr/echo/, qr/echo/,
 qr/peer 127\.0\.0\.1:\d+ engine running=1 waiting=1 .* rate_tps=\d{1,3} .*\n.*peer 127\.0\.0\.1:\d+ engine running=1 waiting=1 .* rate_tps=\d{4,6} /]



=== TEST 9: earliest_start decode waits for a batch slot where engines finish faster
--- http_config
    upstream pool {
        zone pool 64k;
        server 127.0.0.1:$TEST_NGINX_RAND_PORT_1 weight=8;
        server 127.0.0.1:$TEST_NGINX_RAND_PORT_2;
        earliest_start decode;
        earliest_start_max_num_seqs 2;
        pd_engine_metrics interval=100ms timeout=100ms;
    }
    server {
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1;
        add_header X-Backend slow;
        location = /metrics { return 200 "vllm:num_requests_running 2\nvllm:num_requests_waiting 1\nvllm:request_success_total ${msec}e1\n"; }
        location / { pdgate_echo; }
    }
    server {
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_2;
        add_header X-Backend fast;
        location = /metrics { return 200 "vllm:num_requests_running 2\nvllm:num_requests_waiting 3\nvllm:request_success_total ${msec}e2\n"; }
        location / { pdgate_echo; }
    }
--- config
    location = /wait { pdgate_echo delay=600; }
    location = /t { proxy_pass http://pool/echo; }
--- request eval
["GET /wait", "POST /t\n{\"prompt\":\"hello\"}", "POST /t\n{\"prompt\":\"hello\"}", "POST /t\n{\"prompt\":\"hello\"}"]
--- response_headers eval
["", "X-Backend: fast", "X-Backend: fast", "X-Backend: fast"]
--- no_error_log
[error]



=== TEST 10: earliest_start needs a role
--- http_config
    upstream pool { server 127.0.0.1:$TEST_NGINX_SERVER_PORT; earliest_start on; }
--- config
    location /t { proxy_pass http://pool; }
--- must_die
--- error_log
invalid value "on" in "earliest_start" directive, it must be "prefill", "decode" or "off"



=== TEST 11: earliest_start's batch limit is a positive number
--- http_config
    upstream pool { server 127.0.0.1:1; earliest_start decode; earliest_start_max_num_seqs 0; }
--- config
    location = /t { return 204; }
--- must_die
--- error_log
invalid value "0" in "earliest_start_max_num_seqs" directive, it must be a positive number

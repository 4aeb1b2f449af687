# /internal/metrics as the generator writes it: local clients (127.0.0.1,
# ::1) read it, any other address gets 403. The client address is chosen
# with proxy_bind from a helper location (127.0.0.2 is "outside").
use FindBin;
use lib "$FindBin::Bin/common";
use Pdgate::TestEnv;
use Test::Nginx::Socket 'no_plan';

repeat_each(2);
no_shuffle();

run_tests();

__DATA__

=== TEST 1: a local client reads /internal/metrics
--- http_config
    pd_metrics_zone 64k;
--- config
    location = /internal/metrics {
        allow 127.0.0.1;
        allow ::1;
        deny all;
        pd_metrics;
    }
    location = /from/127.0.0.1 {
        proxy_bind 127.0.0.1;
        proxy_pass http://127.0.0.1:$TEST_NGINX_SERVER_PORT/internal/metrics;
    }
--- request
GET /from/127.0.0.1
--- error_code: 200
--- response_body_like
pdgate_requests_total\{outcome="ok"\} 0
--- no_error_log
[error]
[warn]



=== TEST 2: another address gets 403
--- http_config
    pd_metrics_zone 64k;
--- config
    location = /internal/metrics {
        allow 127.0.0.1;
        allow ::1;
        deny all;
        pd_metrics;
    }
    location = /from/127.0.0.2 {
        proxy_bind 127.0.0.2;
        proxy_pass http://127.0.0.1:$TEST_NGINX_SERVER_PORT/internal/metrics;
    }
--- request
GET /from/127.0.0.2
--- error_code: 403
--- error_log
access forbidden by rule, client: 127.0.0.2
--- no_error_log
[alert]



=== TEST 3: an address of the allow list (--metrics-allow) reads it
--- http_config
    pd_metrics_zone 64k;
--- config
    location = /internal/metrics {
        allow 127.0.0.1;
        allow ::1;
        allow 127.0.0.2/32;
        deny all;
        pd_metrics;
    }
    location = /from/127.0.0.2 {
        proxy_bind 127.0.0.2;
        proxy_pass http://127.0.0.1:$TEST_NGINX_SERVER_PORT/internal/metrics;
    }
--- request
GET /from/127.0.0.2
--- error_code: 200
--- response_body_like
pdgate_requests_total\{outcome="ok"\} 0
--- no_error_log
[error]

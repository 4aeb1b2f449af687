# pd_metrics: the Prometheus text of the P/D requests (cumulative
# histograms, counters by outcome and failing stage, kv_transfer_params
# missing), and the $pd_* variables in an access log line.
#
# Blocks that fetch the metrics before and after P/D requests declare the
# expected change of each counter in --- metrics_delta (every
# pdgate_requests_total / pdgate_stage_failures_total series not named
# must not move); every scrape is checked for cumulative histograms.
use FindBin;
use lib "$FindBin::Bin/common";
use Pdgate::TestEnv;
use Test::Nginx::Socket 'no_plan';

repeat_each(2);
no_shuffle();
add_block_preprocessor(\&Pdgate::TestEnv::pd_defaults);

sub parse_metrics {
    my $text = shift;
    my %m;
    for my $line (split /\n/, $text) {
        next if $line =~ /^#/ || $line !~ /\S/;
        $line =~ /^(\S+) (\S+)$/ or return undef;
        $m{$1} = $2;
    }
    return \%m;
}

# Each histogram: buckets non-decreasing in le order, +Inf == _count.
sub check_histograms {
    my ($name, $text) = @_;
    my (%buckets, %count);
    for my $line (split /\n/, $text) {
        if ($line =~ /^(\w+)_bucket\{le="([^"]+)"\} (\d+)$/) {
            push @{ $buckets{$1} }, [$2, $3];
        } elsif ($line =~ /^(\w+)_count (\d+)$/) {
            $count{$1} = $2;
        }
    }
    my $ok = keys(%buckets) == 5;
    for my $h (keys %buckets) {
        my @b = @{ $buckets{$h} };
        for my $i (1 .. $#b) {
            $ok = 0 if $b[$i][1] < $b[$i - 1][1];
            $ok = 0 if $b[$i][0] ne '+Inf' && $b[$i][0] <= $b[$i - 1][0];
        }
        $ok = 0 unless $b[-1][0] eq '+Inf' && defined $count{$h} && $b[-1][1] == $count{$h};
    }
    Test::More::ok($ok, "$name - histograms are cumulative, +Inf == count");
}

my $prev;
add_response_body_check(sub {
    my ($block, $body, $req_idx, $repeated_req_idx, $dry_run) = @_;
    return if $dry_run || !defined $block->metrics_delta;
    return unless $body =~ /^# HELP pdgate_requests_total/;
    my $name = $block->name;
    check_histograms($name, $body);
    my $now = parse_metrics($body);
    if ($req_idx == 0) {
        $prev = $now;
        return;
    }
    my %want = map { /^(\S+) (-?\d+)$/ ? ($1 => $2) : () } split /\n/, $block->metrics_delta;
    for my $k (sort keys %$now) {
        next unless exists $want{$k} || $k =~ /^pdgate_(requests|stage_failures)_total\{/;
        my $d = $now->{$k} - ($prev->{$k} // 0);
        Test::More::is($d, $want{$k} // 0, "$name - $k moved by " . ($want{$k} // 0));
    }
    for my $k (keys %want) {
        Test::More::ok(exists $now->{$k}, "$name - $k is exported") unless exists $now->{$k};
    }
    $prev = $now;
});

run_tests();

__DATA__

=== TEST 1: an ok non-streamed request moves ok, the latencies and the tokens by one
--- config
    location /v1/ {
        prefill /prefill_internal;
        proxy_pass http://decode_pool/mock/decode/v1/;
    }
    location /prefill_internal/ {
        internal;
        rewrite ^/prefill_internal(/.*)$ /mock/prefill$1 break;
        proxy_pass http://prefill_pool;
    }
    location /mock/prefill/ { pdgate_echo prefill; }
    location /mock/decode/ { pdgate_echo usage; }
    location /internal/metrics { pd_metrics; }
--- request eval
["GET /internal/metrics",
 "POST /v1/chat/completions\n{\"model\":\"m\",\"messages\":[]}",
 "GET /internal/metrics"]
--- response_body_like eval
[qr/^# HELP pdgate_requests_total/, qr/"usage":\{"completion_tokens":3/, qr/^# HELP/]
--- metrics_delta
pdgate_requests_total{outcome="ok"} 1
pdgate_time_to_first_token_seconds_count 1
pdgate_e2e_request_latency_seconds_count 1
pdgate_time_per_output_token_seconds_count 1
pdgate_prefill_time_seconds_count 1
pdgate_prefill_decode_gap_seconds_count 1
pdgate_kv_transfer_params_missing_total 0
pdgate_prefill_fallback_total 0
pdgate_generation_tokens_total 3
--- no_error_log
[error]
[warn]



=== TEST 2: a prefill 503 moves prefill_error and the prefill stage by one
--- config
    location /v1/ {
        prefill /prefill_internal;
        proxy_pass http://decode_pool/mock/decode/v1/;
    }
    location /prefill_internal/ {
        internal;
        rewrite ^/prefill_internal(/.*)$ /mock/prefill$1 break;
        proxy_pass http://prefill_pool;
    }
    location /mock/prefill/ { pdgate_echo prefill status=503; }
    location /mock/decode/ { pdgate_echo; }
    location /internal/metrics { pd_metrics; }
--- request eval
["GET /internal/metrics", "POST /v1/chat/completions\n{\"messages\":[]}", "GET /internal/metrics"]
--- error_code eval
[200, 503, 200]
--- metrics_delta
pdgate_requests_total{outcome="prefill_error"} 1
pdgate_stage_failures_total{stage="prefill"} 1
pdgate_prefill_time_seconds_count 1
pdgate_prefill_decode_gap_seconds_count 0
pdgate_time_to_first_token_seconds_count 0
--- no_error_log
[error]



=== TEST 3: a decode 500 moves decode_error and the decode stage by one
--- config
    location /v1/ {
        prefill /prefill_internal;
        proxy_pass http://decode_pool/mock/decode/v1/;
    }
    location /prefill_internal/ {
        internal;
        rewrite ^/prefill_internal(/.*)$ /mock/prefill$1 break;
        proxy_pass http://prefill_pool;
    }
    location /mock/prefill/ { pdgate_echo prefill; }
    location /mock/decode/ { pdgate_echo status=500; }
    location /internal/metrics { pd_metrics; }
--- request eval
["GET /internal/metrics", "POST /v1/chat/completions\n{\"messages\":[]}", "GET /internal/metrics"]
--- error_code eval
[200, 500, 200]
--- metrics_delta
pdgate_requests_total{outcome="decode_error"} 1
pdgate_stage_failures_total{stage="decode"} 1
pdgate_prefill_decode_gap_seconds_count 1
pdgate_time_to_first_token_seconds_count 0
--- no_error_log
[error]



=== TEST 4: a prefill answer without kv_transfer_params moves the missing counter by one
--- config
    location /v1/ {
        prefill /prefill_internal;
        proxy_pass http://decode_pool/mock/decode/v1/;
    }
    location /prefill_internal/ {
        internal;
        rewrite ^/prefill_internal(/.*)$ /mock/prefill$1 break;
        proxy_pass http://prefill_pool;
    }
    location /mock/prefill/ { pdgate_echo; }
    location /mock/decode/ { pdgate_echo; }
    location /internal/metrics { pd_metrics; }
--- request eval
["GET /internal/metrics", "POST /v1/chat/completions\n{\"messages\":[]}", "GET /internal/metrics"]
--- metrics_delta
pdgate_requests_total{outcome="ok"} 1
pdgate_kv_transfer_params_missing_total 1



=== TEST 5: a body that is not JSON is a client error of no stage
--- config
    location /v1/ {
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
    location /internal/metrics { pd_metrics; }
--- request eval
["GET /internal/metrics", "POST /v1/chat/completions\nnot json", "GET /internal/metrics"]
--- error_code eval
[200, 400, 200]
--- metrics_delta
pdgate_requests_total{outcome="client_error"} 1
pdgate_prefill_time_seconds_count 0



=== TEST 6: the variables in a log line, non-streamed
--- http_config eval
$Pdgate::TestEnv::HTTP_CONFIG . q{
    log_format pd 'pd status=$status ps=$pd_prefill_status pa=$pd_prefill_addr pt=$pd_prefill_time gap=$pd_gap_time ttft=$pd_ttft tpot=$pd_tpot e2e=$pd_e2e in=$pd_prompt_tokens out=$pd_completion_tokens outcome=$pd_outcome stage=$pd_failed_stage';
}
--- config
    location /v1/ {
        access_log logs/access.log pd;
        prefill /prefill_internal;
        proxy_pass http://decode_pool/mock/decode/v1/;
    }
    location /prefill_internal/ {
        internal;
        rewrite ^/prefill_internal(/.*)$ /mock/prefill$1 break;
        proxy_pass http://prefill_pool;
    }
    location /mock/prefill/ { access_log off; pdgate_echo prefill delay=30; }
    location /mock/decode/ { access_log off; pdgate_echo usage sse=5; }
--- request
POST /v1/chat/completions
{"messages":[]}
--- access_log eval
qr/^pd status=200 ps=200 pa=127\.0\.0\.1:\d+ pt=0\.0[3-9]\d gap=0\.00\d ttft=\d+\.\d{3} tpot=\d+\.\d{3} e2e=\d+\.\d{3} in=\d+ out=5 outcome=ok stage=-$/
--- no_error_log
[error]



=== TEST 7: streamed: TTFT is the first event, E2E the last, TPOT between
--- http_config eval
$Pdgate::TestEnv::HTTP_CONFIG . q{
    log_format pd 'pd ttft=$pd_ttft tpot=$pd_tpot e2e=$pd_e2e out=$pd_completion_tokens';
}
--- config
    location /v1/ {
        access_log logs/access.log pd;
        prefill /prefill_internal;
        proxy_buffering off;
        proxy_pass http://decode_pool/mock/decode/v1/;
    }
    location /prefill_internal/ {
        internal;
        rewrite ^/prefill_internal(/.*)$ /mock/prefill$1 break;
        proxy_pass http://prefill_pool;
    }
    location /mock/prefill/ { access_log off; pdgate_echo prefill; }
    location /mock/decode/ { access_log off; pdgate_echo usage sse=5 interval=50; }
--- request
POST /v1/chat/completions
{"messages":[],"stream":true,"stream_options":{"include_usage":true}}
--- response_body_like eval
qr/"completion_tokens":5,/
--- access_log eval
qr/^pd ttft=0\.0[0-4]\d tpot=0\.0(?:4\d|5\d|6\d) e2e=0\.(?:19\d|2\d\d|3\d\d) out=5$/
--- no_error_log
[error]



=== TEST 8: a failed prefill shows in the variables, with no decode times
--- http_config eval
$Pdgate::TestEnv::HTTP_CONFIG . q{
    log_format pd 'pd ps=$pd_prefill_status ttft=$pd_ttft e2e=$pd_e2e outcome=$pd_outcome stage=$pd_failed_stage';
}
--- config
    location /v1/ {
        access_log logs/access.log pd;
        prefill /prefill_internal;
        proxy_pass http://decode_pool/mock/decode/v1/;
    }
    location /prefill_internal/ {
        internal;
        rewrite ^/prefill_internal(/.*)$ /mock/prefill$1 break;
        proxy_pass http://prefill_pool;
    }
    location /mock/prefill/ { access_log off; pdgate_echo prefill status=503; }
    location /mock/decode/ { access_log off; pdgate_echo; }
--- request
POST /v1/chat/completions
{"messages":[]}
--- error_code: 503
--- access_log
pd ps=503 ttft=- e2e=- outcome=prefill_error stage=prefill



=== TEST 9: the metrics are Prometheus text, zero before any request
--- config
    location /internal/metrics { pd_metrics; }
--- request
GET /internal/metrics
--- response_headers
Content-Type: text/plain; version=0.0.4; charset=utf-8
--- response_body_like
^# HELP pdgate_requests_total P/D requests by outcome\.
# TYPE pdgate_requests_total counter
pdgate_requests_total\{outcome="ok"\} 0
(?s:.*)pdgate_time_to_first_token_seconds_bucket\{le="\+Inf"\} 0
(?s:.*)# TYPE pdgate_upstream_requests_in_flight gauge
--- no_error_log
[error]



=== TEST 10: the metrics location answers GET only
--- config
    location /internal/metrics { pd_metrics; }
--- request
POST /internal/metrics
x
--- error_code: 405



=== TEST 11: enable_internal_metrics is accepted once, with a size of at least 8 pages
--- http_config
    enable_internal_metrics 1m;
    enable_internal_metrics 1m;
--- config
--- must_die
--- error_log
"enable_internal_metrics" directive is duplicate



=== TEST 12: a zone smaller than 8 pages is refused
--- http_config
    pd_metrics_zone 4k;
--- config
--- must_die
--- error_log
is too small



=== TEST 13: the balancers' shared counters appear as in-flight gauges, back at zero after the request
--- http_config
    upstream prefill_pool { server 127.0.0.1:$TEST_NGINX_SERVER_PORT; pd_score_balance prefill; keepalive 8; }
    upstream decode_pool { server 127.0.0.1:$TEST_NGINX_SERVER_PORT; least_total_load on; keepalive 8; }
    proxy_http_version 1.1;
    proxy_set_header Connection "";
--- config
    location /v1/ {
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
    location /internal/metrics { pd_metrics; }
--- request eval
["POST /v1/chat/completions\n{\"model\":\"m\",\"messages\":[]}", "GET /internal/metrics"]
--- response_body_like eval
[qr/"kv_transfer_params"/,
 qr/^pdgate_upstream_requests_in_flight\{balancer="least_total_load",upstream="decode_pool",peer="127\.0\.0\.1:\d+"\} 0\n(?s:.*)^pdgate_upstream_tokens_in_flight\{balancer="pd_score_balance",upstream="prefill_pool",peer="127\.0\.0\.1:\d+"\} 0$/m]
--- no_error_log
[error]



=== TEST 14: SGLang mode (prefill_refactor): an ok request moves ok, the prefill and decode times by one
--- http_config eval
$Pdgate::TestEnv::HTTP_CONFIG . q{
    pd_metrics_zone 64k;
}
--- config
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
    }
    location /mock/prefill/ { pdgate_echo; }
    location /mock/decode/ { pdgate_echo usage; }
    location /internal/metrics { pd_metrics; }
--- request eval
["GET /internal/metrics",
 "POST /v1/chat/completions\n{\"model\":\"m\",\"messages\":[]}",
 "GET /internal/metrics"]
--- response_body_like eval
[qr/^# HELP pdgate_requests_total/, qr/"usage":\{"completion_tokens":3/, qr/^# HELP/]
--- metrics_delta
pdgate_requests_total{outcome="ok"} 1
pdgate_time_to_first_token_seconds_count 1
pdgate_e2e_request_latency_seconds_count 1
pdgate_prefill_time_seconds_count 1
pdgate_prefill_decode_gap_seconds_count 1
pdgate_generation_tokens_total 3
--- no_error_log
[error]
[warn]



=== TEST 15: SGLang mode: a failing prefill moves prefill_error and the prefill stage by one
--- http_config eval
$Pdgate::TestEnv::HTTP_CONFIG . q{
    pd_metrics_zone 64k;
}
--- config
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
    }
    location /mock/prefill/ { pdgate_echo status=503; }
    location /mock/decode/ { pdgate_echo; }
    location /internal/metrics { pd_metrics; }
--- request eval
["GET /internal/metrics", "POST /v1/chat/completions\n{\"messages\":[]}", "GET /internal/metrics"]
--- error_code eval
[200, 503, 200]
--- metrics_delta
pdgate_requests_total{outcome="prefill_error"} 1
pdgate_stage_failures_total{stage="prefill"} 1
pdgate_prefill_time_seconds_count 1
pdgate_time_to_first_token_seconds_count 0



=== TEST 16: SGLang mode (pd_together): the $pd_* variables in a log line
--- http_config eval
$Pdgate::TestEnv::HTTP_CONFIG . q{
    log_format pd 'pd $uri status=$status ps=$pd_prefill_status pa=$pd_prefill_addr pt=$pd_prefill_time out=$pd_completion_tokens outcome=$pd_outcome';
}
--- config
    location /v1/ {
        access_log logs/access.log pd;
        prefill_refactor /prefill_internal;
        prefill_servers_list 127.0.0.1:$TEST_NGINX_SERVER_PORT;
        decode_servers_list 127.0.0.1:$TEST_NGINX_SERVER_PORT;
        pd_distribution pd_together;
        pd_backend sglang;
        proxy_pass http://$decode_server/mock/decode$uri;
    }
    location /prefill_internal/ {
        internal;
        rewrite ^/prefill_internal(/.*)$ /mock/prefill$1 break;
        proxy_pass http://$prefill_server;
    }
    location /mock/prefill/ { access_log off; pdgate_echo; }
    location /mock/decode/ { access_log off; pdgate_echo usage sse=4; }
--- request
POST /v1/chat/completions
{"messages":[]}
--- access_log eval
qr{^pd /v1/chat/completions status=200 ps=200 pa=127\.0\.0\.1:\d+ pt=\d+\.\d{3} out=4 outcome=ok$}
--- no_error_log
[error]

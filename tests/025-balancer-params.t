# Parameter directives of the balancer modules: values are checked, each is
# given once, and the status pages report counters back at zero.
use FindBin;
use lib "$FindBin::Bin/common";
use Pdgate::TestEnv;
use Test::Nginx::Socket 'no_plan';

repeat_each(2);
no_shuffle();
run_tests();

__DATA__

=== TEST 1: the batch size is a positive number
--- http_config
    upstream pool { server 127.0.0.1:1; auto_balance_controller on; auto_balance_controller_batch_size many; }
--- config
    location = /t { return 204; }
--- must_die
--- error_log
invalid value "many" in "auto_balance_controller_batch_size" directive, it must be a positive number



=== TEST 2: the cost coefficients are non-negative numbers
--- http_config
    upstream pool { server 127.0.0.1:1; prefill_score_balance on; prefill_score_balance_b -3; }
--- config
    location = /t { return 204; }
--- must_die
--- error_log
invalid value "-3" in "prefill_score_balance_b" directive, it must be a non-negative number



=== TEST 3: each coefficient once
--- http_config
    upstream pool { server 127.0.0.1:1; prefill_score_balance on; prefill_score_balance_a 1; prefill_score_balance_a 2; }
--- config
    location = /t { return 204; }
--- must_die
--- error_log
"prefill_score_balance_a" directive is duplicate



=== TEST 4: the exponent is a non-negative number
--- http_config
    upstream pool { server 127.0.0.1:1; greedy_timeout on; greedy_timeout_exp -3; }
--- config
    location = /t { return 204; }
--- must_die
--- error_log
invalid value "-3" in "greedy_timeout_exp" directive, it must be a non-negative number



=== TEST 5: the warmup once
--- http_config
    upstream pool { server 127.0.0.1:1; greedy_timeout on; greedy_timeout_warmup 1; greedy_timeout_warmup 2; }
--- config
    location = /t { return 204; }
--- must_die
--- error_log
"greedy_timeout_warmup" directive is duplicate



=== TEST 6: the status page shows the cost counters back to zero once requests end
--- http_config
    upstream pool {
        server 127.0.0.1:$TEST_NGINX_RAND_PORT_1;
        greedy_timeout on;
    }
    server { listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1; location / { pdgate_echo; } }
--- config
    location = /t { proxy_pass http://pool/echo; }
    location = /status { greedy_timeout_status; }
--- request eval
["POST /t\n{\"prompt\":\"a prompt of some length\"}", "GET /status"]
--- response_body_like eval
[qr/"method":"POST"/, qr/\A# greedy_timeout upstream peer requests tokens cost total\npool 127\.0\.0\.1:\d+ 0 0 0 [1-9]\d*\n\z/]
--- no_error_log
[error]



=== TEST 7: a parameter out of its type reads as nginx's own message
--- http_config
    upstream pool { server 127.0.0.1:1; length_balance; length_balance_req_len_weight heavy; }
--- config
    location = /t { return 204; }
--- must_die
--- error_log
invalid value "heavy" in "length_balance_req_len_weight" directive, it must be a non-negative number



=== TEST 8: a zone size too small reads the same way
--- http_config
    least_total_load_shm_size 8k;
    upstream pool { server 127.0.0.1:1; least_total_load on; }
--- config
    location = /t { return 204; }
--- must_die
--- error_log
invalid value "8k" in "least_total_load_shm_size" directive, it must be a size of at least 64k

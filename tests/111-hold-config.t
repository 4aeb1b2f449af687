# pd_hold: configuration errors, as nginx -t says them.
use FindBin;
use lib "$FindBin::Bin/common";
use Pdgate::TestEnv;
use Test::Nginx::Socket 'no_plan';

no_shuffle();
run_tests();

__DATA__

=== TEST 1: both pools are required
--- http_config
    upstream p { server 127.0.0.1:1; }
--- config
    location /v1/ { prefill /prefill_internal; pd_hold prefill=p; }
--- must_die
--- error_log
"pd_hold" directive needs prefill=<upstream> and decode=<upstream> (the pools whose room it counts)



=== TEST 2: a pool must be an upstream block
--- http_config
    upstream p { server 127.0.0.1:1; }
--- config
    location /v1/ { prefill /prefill_internal; pd_hold prefill=p decode=decode_servrs; }
--- must_die
--- error_log
"pd_hold" names no upstream block "decode_servrs"



=== TEST 3: the answer of a full queue is 429 or 503
--- http_config
    upstream p { server 127.0.0.1:1; }
--- config
    location /v1/ { prefill /prefill_internal; pd_hold prefill=p decode=p status=500; }
--- must_die
--- error_log
"pd_hold" directive invalid parameter "status=500", it must be 429 or 503



=== TEST 4: the requests per server are a positive number
--- http_config
    upstream p { server 127.0.0.1:1; }
--- config
    location /v1/ { prefill /prefill_internal; pd_hold prefill=p:many decode=p; }
--- must_die
--- error_log
"pd_hold" directive invalid parameter "prefill=p:many", the requests per server after ":" must be a positive number



=== TEST 5: pd_hold once per location
--- http_config
    upstream p { server 127.0.0.1:1; }
--- config
    location /v1/ { prefill /prefill_internal; pd_hold prefill=p decode=p; pd_hold prefill=p decode=p queue=2; }
--- must_die
--- error_log
"pd_hold" directive is duplicate



=== TEST 6: SGLang mode's prefill_refactor_hold checks its pools too
--- http_config
    upstream p { server 127.0.0.1:1; }
--- config
    location /v1/ {
        prefill_refactor /prefill_internal;
        prefill_servers_list 127.0.0.1:1;
        prefill_refactor_hold prefill=p decode=nope;
    }
--- must_die
--- error_log
"prefill_refactor_hold" names no upstream block "nope"

# ngx_http_prefill_refactor_module: configuration errors, as nginx -t says them.
use FindBin;
use lib "$FindBin::Bin/common";
use Pdgate::TestEnv;
use Test::Nginx::Socket 'no_plan';

no_shuffle();
run_tests();

__DATA__

=== TEST 1: p_after_d is refused (the original never resumed the request in that mode)
--- config
    location /v1/ { prefill_refactor /p; prefill_servers_list 127.0.0.1:1; pd_distribution p_after_d; }
--- must_die
--- error_log
"pd_distribution" directive value "p_after_d" is not supported: the decode cannot run before its prefill, use "p_before_d" or "pd_together"



=== TEST 2: an unknown distribution names the allowed ones
--- config
    location /v1/ { pd_distribution both; }
--- must_die
--- error_log
"pd_distribution" directive invalid value "both", it must be one of: p_before_d, pd_together



=== TEST 3: pd_backend vllm points to the prefill directive
--- config
    location /v1/ { pd_backend vllm; }
--- must_die
--- error_log
"pd_backend" directive value "vllm" is not supported: this module speaks SGLang's bootstrap protocol, use the "prefill" directive for vLLM



=== TEST 4: a server without a port
--- config
    location /v1/ { prefill_servers_list "10.0.0.1:8000, 10.0.0.2"; }
--- must_die
--- error_log
"prefill_servers_list" directive invalid server "10.0.0.2", it must be "host:port"



=== TEST 5: a bootstrap port out of range
--- config
    location /v1/ { bootstrap_ports_list 70000; }
--- must_die
--- error_log
"bootstrap_ports_list" directive invalid port "70000", it must be 1-65535



=== TEST 6: as many bootstrap ports as prefill servers, or one, or none
--- config
    location /v1/ {
        prefill_refactor /p;
        prefill_servers_list 127.0.0.1:1,127.0.0.1:2,127.0.0.1:3;
        bootstrap_ports_list 8998,8999;
    }
--- must_die
--- error_log
"bootstrap_ports_list" has 2 ports for 3 prefill servers, it must have none, one, or one per server of "prefill_servers_list"



=== TEST 7: prefill_refactor without prefill servers
--- config
    location /v1/ { prefill_refactor /p; }
--- must_die
--- error_log
"prefill_refactor" needs "prefill_servers_list" or "prefill_servers_upstream"



=== TEST 8: a duplicate directive
--- config
    location /v1/ { pd_distribution pd_together; pd_distribution p_before_d; }
--- must_die
--- error_log
"pd_distribution" directive is duplicate



=== TEST 9: a prefix of "/" is refused
--- config
    location /v1/ { prefill_refactor /; }
--- must_die
--- error_log
"prefill_refactor" directive the prefix must not be "/"



=== TEST 10: lists and ports set at server level are inherited by locations
--- config
    prefill_servers_list 127.0.0.1:$TEST_NGINX_SERVER_PORT;
    bootstrap_ports_list 9100;
    location /v1/ {
        prefill_refactor /prefill_internal;
        pd_distribution pd_together;
        proxy_pass http://127.0.0.1:$TEST_NGINX_SERVER_PORT/mock$uri;
    }
    location /prefill_internal/ { internal; rewrite ^/prefill_internal(/.*)$ /mock$1 break; proxy_pass http://$prefill_server; }
    location /mock/ { pdgate_echo; }
--- request
POST /v1/completions
{}
--- response_body_like eval
qr/"json":\{"bootstrap_host":"127\.0\.0\.1","bootstrap_port":9100,"bootstrap_room":\d+\}/
--- no_error_log
[error]



=== TEST 11: prefill_refactor_balance takes least_active or a balancer's policy
--- config
    location /v1/ { prefill_refactor_balance round_robin; }
--- must_die
--- error_log
"prefill_refactor_balance" directive invalid value "round_robin", it must be least_active, least_total_load, weighted_least_active, auto_balance_controller, prefill_score_balance or pd_score_balance



=== TEST 12: prefill_servers_upstream must name an upstream block
--- config
    location /v1/ { prefill_refactor /p; prefill_servers_upstream prefill_servrs; }
--- must_die
--- error_log
"prefill_servers_upstream" names no upstream block "prefill_servrs"



=== TEST 13: its bootstrap upstream too
--- http_config
    upstream prefill_servers { server 127.0.0.1:1; }
--- config
    location /v1/ { prefill_refactor /p; prefill_servers_upstream prefill_servers bootstrap=boot; }
--- must_die
--- error_log
"prefill_servers_upstream" names no upstream block "boot"



=== TEST 14: the second parameter is bootstrap=<upstream>
--- http_config
    upstream prefill_servers { server 127.0.0.1:1; }
--- config
    location /v1/ { prefill_refactor /p; prefill_servers_upstream prefill_servers 9000; }
--- must_die
--- error_log
"prefill_servers_upstream" directive invalid parameter "9000", it must be bootstrap=<upstream>



=== TEST 15: a server list and an upstream cannot both be the prefill servers
--- http_config
    upstream prefill_servers { server 127.0.0.1:1; }
--- config
    location /v1/ { prefill_refactor /p; prefill_servers_list 127.0.0.1:1; prefill_servers_upstream prefill_servers; }
--- must_die
--- error_log
"prefill_servers_list" and "prefill_servers_upstream" are both set



=== TEST 16: with an upstream, bootstrap_ports_list is one port for every server
--- http_config
    upstream prefill_servers { server 127.0.0.1:1; }
--- config
    location /v1/ { prefill_refactor /p; prefill_servers_upstream prefill_servers; bootstrap_ports_list 1,2; }
--- must_die
--- error_log
"bootstrap_ports_list" takes one port (for every server) with "prefill_servers_upstream"

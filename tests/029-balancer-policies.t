# What the history, look-ahead and prefix balancers decide, through their
# status pages (one nginx per block: repeat_each(1), the counts are exact),
# and their shared-zone size directives.
use FindBin;
use lib "$FindBin::Bin/common";
use Pdgate::TestEnv;
use Test::Nginx::Socket 'no_plan';

repeat_each(1);
no_shuffle();
run_tests();

__DATA__

=== TEST 1: length_balance: a long request keeps the next short ones away from its peer
--- http_config
    upstream pool {
        server 127.0.0.1:$TEST_NGINX_RAND_PORT_1;
        server 127.0.0.1:$TEST_NGINX_RAND_PORT_2;
        length_balance;
    }
    server { listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1; location / { pdgate_echo; } }
    server { listen 127.0.0.1:$TEST_NGINX_RAND_PORT_2; location / { pdgate_echo; } }
--- config
    location = /t { proxy_pass http://pool/echo; }
    location = /status { length_balance_status; }
--- request eval
["POST /t\n{\"prompt\":\"" . ("x" x 4000) . "\"}", "POST /t\n{\"prompt\":\"s\"}", "POST /t\n{\"prompt\":\"s\"}", "GET /status"]
--- response_body_like eval
[qr/"method":"POST"/, qr/"method":"POST"/, qr/"method":"POST"/,
 qr/\A# length_balance upstream peer requests tokens cost total hist_requests hist_tokens\n(pool \S+ 0 0 0 1 1 100\d\npool \S+ 0 0 0 2 2 8\n|pool \S+ 0 0 0 2 2 8\npool \S+ 0 0 0 1 1 100\d\n)\z/]
--- no_error_log
[error]



=== TEST 2: length_balance: the history is divided every merge_threshold placements
--- skip_eval: 1: $ENV{TEST_NGINX_USE_HUP}
--- http_config
    upstream pool {
        server 127.0.0.1:$TEST_NGINX_RAND_PORT_1;
        length_balance;
        length_balance_merge_threshold 4;
        length_balance_decay_factor 4;
        length_balance_req_len_weight 2;
    }
    server { listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1; location / { pdgate_echo; } }
--- config
    location = /t { proxy_pass http://pool/echo; }
    location = /status { length_balance_status; }
--- request eval
["POST /t\n{\"prompt\":\"" . ("x" x 386) . "\"}", "POST /t\n{\"prompt\":\"" . ("x" x 386) . "\"}", "POST /t\n{\"prompt\":\"" . ("x" x 386) . "\"}", "POST /t\n{\"prompt\":\"" . ("x" x 386) . "\"}", "POST /t\n{\"prompt\":\"" . ("x" x 386) . "\"}", "GET /status"]
--- response_body_like eval
[qr/POST/, qr/POST/, qr/POST/, qr/POST/, qr/POST/,
 qr/^pool \S+ 0 0 0 5 2 400$/m]
--- no_error_log
[error]



=== TEST 3: prefix_cache_affinity: the same prompt keeps going to the same peer
--- http_config
    upstream pool {
        server 127.0.0.1:$TEST_NGINX_RAND_PORT_1;
        server 127.0.0.1:$TEST_NGINX_RAND_PORT_2;
        prefix_cache_affinity on;
        prefix_cache_affinity_block_size 16;
    }
    server { listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1; location / { pdgate_echo; } }
    server { listen 127.0.0.1:$TEST_NGINX_RAND_PORT_2; location / { pdgate_echo; } }
--- config
    location = /t { proxy_pass http://pool/echo; }
    location = /status { prefix_cache_affinity_status; }
--- request eval
[("POST /t\n{\"prompt\":\"" . ("p" x 94) . "\"}") x 6, "GET /status"]
--- response_body_like eval
[(qr/POST/) x 6,
 qr/\A# prefix_cache_affinity upstream peer requests tokens cost total\n(pool \S+ 0 0 0 6\npool \S+ 0 0 0 0\n|pool \S+ 0 0 0 0\npool \S+ 0 0 0 6\n)# prefix index entries 6\n\z/]
--- no_error_log
[error]



=== TEST 4: prefix_cache_affinity: a growing conversation follows its earlier turns
--- http_config
    upstream pool {
        server 127.0.0.1:$TEST_NGINX_RAND_PORT_1;
        server 127.0.0.1:$TEST_NGINX_RAND_PORT_2;
        server 127.0.0.1:$TEST_NGINX_RAND_PORT_3;
        prefix_cache_affinity on;
        prefix_cache_affinity_block_size 32;
    }
    server { listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1; location / { pdgate_echo; } }
    server { listen 127.0.0.1:$TEST_NGINX_RAND_PORT_2; location / { pdgate_echo; } }
    server { listen 127.0.0.1:$TEST_NGINX_RAND_PORT_3; location / { pdgate_echo; } }
--- config
    location = /t { proxy_pass http://pool/echo; }
    location = /status { prefix_cache_affinity_status; }
--- request eval
my $u1 = '{"role":"user","content":"' . ("first question " x 8) . '"}';
my $a1 = '{"role":"assistant","content":"' . ("an answer " x 8) . '"}';
my $u2 = '{"role":"user","content":"and a follow-up"}';
my $a2 = '{"role":"assistant","content":"' . ("more " x 20) . '"}';
my $u3 = '{"role":"user","content":"last"}';
["POST /t\n{\"model\":\"m\",\"messages\":[$u1]}",
 "POST /t\n{\"model\":\"m\",\"messages\":[$u1,$a1,$u2]}",
 "POST /t\n{\"model\":\"m\",\"messages\":[$u1,$a1,$u2,$a2,$u3]}",
 "POST /t\n{\"model\":\"m\",\"messages\":[$u1,$a1,$u2,$a2,$u3,$a2,$u3]}",
 "GET /status"]
--- response_body_like eval
[(qr/POST/) x 4,
 qr/\A# prefix_cache_affinity upstream peer requests tokens cost total\n(pool \S+ 0 0 0 [04]\n){3}# prefix index entries \d+\n\z/]
--- no_error_log
[error]



=== TEST 5: pd_score_balance: a P/D request through both roles leaves nothing in flight
--- http_config
    upstream prefill_pool {
        server 127.0.0.1:$TEST_NGINX_RAND_PORT_1;
        server 127.0.0.1:$TEST_NGINX_RAND_PORT_2;
        pd_score_balance prefill;
        pd_score_balance_max_num_seqs 4;
    }
    upstream decode_pool {
        server 127.0.0.1:$TEST_NGINX_RAND_PORT_3;
        pd_score_balance decode;
    }
    server { listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1; location / { pdgate_echo prefill; } }
    server { listen 127.0.0.1:$TEST_NGINX_RAND_PORT_2; location / { pdgate_echo prefill; } }
    server { listen 127.0.0.1:$TEST_NGINX_RAND_PORT_3; location / { pdgate_echo; } }
--- config
    location = /v1/completions { prefill /prefill_internal; proxy_pass http://decode_pool; }
    location /prefill_internal/ {
        internal;
        rewrite ^/prefill_internal(/.*)$ $1 break;
        proxy_pass http://prefill_pool;
    }
    location = /status { pd_score_balance_status; }
--- request eval
["POST /v1/completions\n{\"prompt\":\"p\",\"max_tokens\":3}", "POST /v1/completions\n{\"prompt\":\"q\"}", "GET /status"]
--- response_body_like eval
[qr/"kv_transfer_params"/, qr/"kv_transfer_params"/,
 qr/\A# pd_score_balance upstream peer requests tokens cost total\n(prefill_pool \S+ 0 0 0 [012]\n){2}decode_pool \S+ 0 0 0 2\n# in prefill 0\n\z/]
--- no_error_log
[error]



=== TEST 6: pd_score_balance: the role is prefill, decode or off
--- http_config
    upstream pool { server 127.0.0.1:1; pd_score_balance both; }
--- config
    location = /t { return 204; }
--- must_die
--- error_log
invalid value "both" in "pd_score_balance" directive, it must be "prefill", "decode" or "off"



=== TEST 7: a zone size is a size
--- http_config
    pd_score_balance_shm_size lots;
--- config
    location = /t { return 204; }
--- must_die
--- error_log
invalid value "lots" in "pd_score_balance_shm_size" directive, it must be a size of at least 64k



=== TEST 8: a zone too small for the prefix index is refused, naming what it needs
--- http_config
    prefix_cache_affinity_shm_size 256k;
    upstream pool {
        server 127.0.0.1:1; server 127.0.0.2:1;
        prefix_cache_affinity on;
        prefix_cache_affinity_dict_size 100000;
    }
--- config
    location = /t { return 204; }
--- must_die
--- error_log eval
qr/"prefix_cache_affinity_shm_size" of 256k is too small, at least \d+k are needed \(200000 prefix index entries\)/



=== TEST 9: a zone size that fits is taken; the balancer works in it
--- http_config
    least_total_load_shm_size 512k;
    upstream pool { server 127.0.0.1:$TEST_NGINX_RAND_PORT_1; least_total_load on; }
    server { listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1; location / { return 200 "ok\n"; } }
--- config
    location = /t { proxy_pass http://pool; }
--- request
GET /t
--- response_body
ok
--- no_error_log
[error]
[emerg]



=== TEST 10: the zone size belongs to the http block
--- http_config
    upstream pool { server 127.0.0.1:1; least_total_load on; least_total_load_shm_size 1m; }
--- config
    location = /t { return 204; }
--- must_die
--- error_log
"least_total_load_shm_size" directive is not allowed here

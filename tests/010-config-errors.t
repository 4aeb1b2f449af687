# Configuration mistakes fail `nginx -t` with a message in nginx's style.
use FindBin;
use lib "$FindBin::Bin/common";
use Pdgate::TestEnv;
use Test::Nginx::Socket 'no_plan';

no_shuffle();
run_tests();

__DATA__

=== TEST 1: a prefill prefix must be absolute
--- config
    location /v1/ { prefill prefill_internal; }
--- must_die
--- error_log
"prefill" directive invalid prefix "prefill_internal", it must start with "/"



=== TEST 2: a prefill prefix of "/" would loop
--- config
    location /v1/ { prefill /; }
--- must_die
--- error_log
"prefill" directive the prefix must not be "/"



=== TEST 3: prefill twice in one block is a duplicate
--- config
    location /v1/ { prefill /a; prefill /b; }
--- must_die
--- error_log
"prefill" directive is duplicate



=== TEST 4: prefill takes exactly one argument
--- config
    location /v1/ { prefill /a /b; }
--- must_die
--- error_log
invalid number of arguments in "prefill" directive



=== TEST 5: set_request_id is on or off
--- config
    set_request_id yes;
--- must_die
--- error_log
invalid value "yes" in "set_request_id" directive, it must be "on" or "off"



=== TEST 6: set_trace_headers_force is on or off
--- config
    location /t { set_trace_headers_force 1; }
--- must_die
--- error_log
invalid value "1" in "set_trace_headers_force" directive, it must be "on" or "off"



=== TEST 7: prefill_kv_transfer_params is on or off
--- config
    location /v1/ { prefill_kv_transfer_params maybe; }
--- must_die
--- error_log
invalid value "maybe" in "prefill_kv_transfer_params" directive, it must be "on" or "off"



=== TEST 8: pdgate_echo rejects unknown parameters
--- config
    location /t { pdgate_echo stream; }
--- must_die
--- error_log
"pdgate_echo" directive invalid parameter "stream"



=== TEST 9: pdgate_echo is a location directive
--- http_config
    pdgate_echo;
--- config
    location /t { return 204; }
--- must_die
--- error_log
"pdgate_echo" directive is not allowed here

# Self-test of the Test::Nginx subset: one block per feature of the block
# format (requests, response checks, log checks, server set-up sections).
# Blocks run in file order: TEST 14 reuses the server of TEST 13.
use FindBin;
use lib $FindBin::Bin;
use SelfTestEnv;

use Test::Nginx::Socket 'no_plan';

no_shuffle();
run_tests();

__DATA__

=== TEST 1: more_headers, response_headers (present and absent) and _like
--- config
    location = /h {
        add_header X-Echo "foo=$http_x_foo";
        add_header X-Multi a;
        add_header X-Multi b;
        return 200 "host=$host ua=[$http_user_agent]\n";
    }
--- request
GET /h
--- more_headers
# a comment line is ignored
X-Foo: bar baz
Host: example.com
--- response_headers
X-Echo: foo=bar baz
X-Multi: a, b
Content-Type: text/plain
!X-Missing
--- response_headers_like
X-Echo: foo=\w+ baz
--- raw_response_headers_like: ^HTTP/1\.1 200 OK\r\n.*Connection: close\r\n
--- raw_response_headers_unlike: Transfer-Encoding
--- response_body
host=example.com ua=[]



=== TEST 2: chunked response is de-chunked (several chunks)
--- config
    location = /ssi {
        ssi on;
        ssi_types text/plain;
        root html;
        try_files /page.txt =404;
    }
    location = /part {
        return 200 "<part>";
    }
--- user_files
>>> page.txt
begin <!--# include virtual="/part" --> middle <!--# include virtual="/part" --> end
--- request
GET /ssi
--- response_headers
Transfer-Encoding: chunked
!Content-Length
--- response_body
begin <part> middle <part> end



=== TEST 3: several requests in one block, expectations as arrays
--- config
    location = /a { return 200 "a\n"; }
    location = /b { return 404; }
--- request eval
["GET /a", "GET /b", "GET /a?x=1"]
--- error_code eval
[200, 404, 200]
--- response_body_like eval
["^a\$", "404 Not Found", "^a"]
--- response_headers eval
["Content-Length: 2", "Content-Type: text/html", "!X-Nope"]



=== TEST 4: error_code_like and response_body_unlike
--- config
    location = /r { return 302 /elsewhere; }
--- request
GET /r
--- error_code_like: ^30[12]$
--- response_body_unlike: 200 OK
--- response_headers_like
Location: http://localhost(?::\d+)?/elsewhere



=== TEST 5: binary body via eval
--- config
    location = /bin { alias html/bin.dat; }
--- user_files eval
[["bin.dat" => "\x00\x01\xff\r\n end"]]
--- request
GET /bin
--- response_headers
Content-Length: 9
--- response_body eval
"\x00\x01\xff\r\n end"



=== TEST 6: HEAD request has no body
--- config
    location = /h { return 200 "hello"; }
--- request
HEAD /h
--- response_headers
Content-Length: 5
--- response_body eval
""



=== TEST 7: response_body eval with a qr// and response_body_filters
--- config
    location = /t { return 200 "Hello World\n"; }
--- request
GET /t
--- response_body_filters
uc
--- response_body eval
qr/^HELLO WORLD$/m



=== TEST 8: request split into packets with a delay between them
--- config
    location = /echo {
        proxy_set_header X-Body $request_body;
        proxy_pass http://127.0.0.1:$TEST_NGINX_SERVER_PORT/back;
    }
    location = /back { return 200 "[$http_x_body]\n"; }
--- request eval
[["POST /ec", "ho\nhel", {value => "lo world", delay_before => 0.05}]]
--- response_body eval
["[hello world]\n"]



=== TEST 9: chunked request body via more_headers
--- config
    location = /echo {
        proxy_set_header X-Body $request_body;
        proxy_pass http://127.0.0.1:$TEST_NGINX_SERVER_PORT/back;
    }
    location = /back { return 200 "[$http_x_body]\n"; }
--- more_headers
Transfer-Encoding: chunked
--- request eval
"POST /echo
5\r
hello\r
0\r
\r
"
--- response_body
[hello]



=== TEST 10: pipelined requests on one connection
--- config
    location = /a { return 200 "a\n"; }
    location = /b { return 200 "bb\n"; }
--- pipelined_requests eval
["GET /a", "GET /b", "GET /a"]
--- response_body eval
["a\n", "bb\n", "a\n"]
--- error_code eval
[200, 200, 200]



=== TEST 11: raw_request split into packets
--- config
    location = /a { return 200 "raw $server_protocol\n"; }
--- raw_request eval
["GET /a HTTP/1.0\r\nHo", "st: localhost\r\n\r\n"]
--- response_body
raw HTTP/1.0



=== TEST 12: http09 response
--- config
    location = /a { return 200 "nine\n"; }
--- raw_request eval
"GET /a\r\n"
--- http09
--- response_body
nine



=== TEST 13: error_log, no_error_log and grep_error_log
--- config
    location = /t { return 200 "ok\n"; }
--- request
GET /nonexistent.txt
--- error_code: 404
--- error_log eval
[qr/open\(\) "[^"]+nonexistent\.txt" failed/, "No such file or directory"]
--- no_error_log
[alert]
[crit]
--- grep_error_log chop
No such file or directory
--- grep_error_log_out
No such file or directory



=== TEST 14: block without config reuses the running server (and its error.log)
--- request
GET /t
--- response_body
ok
--- error_log
No such file or directory



=== TEST 15: per-block log_level
--- log_level: warn
--- skip_eval: 4: $ENV{TEST_NGINX_USE_HUP}
--- config
    location = /t { return 200 "ok\n"; }
--- request
GET /t
--- response_body
ok
--- no_error_log
[notice]
[debug]



=== TEST 16: http_config, $TEST_NGINX_RAND_PORT_N and expansion in response_body
--- http_config
    server {
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1;
        location / { return 200 "backend $server_port\n"; }
    }
--- config
    location = /p {
        proxy_pass http://127.0.0.1:$TEST_NGINX_RAND_PORT_1/;
    }
--- request
GET /p
--- response_body
backend $TEST_NGINX_RAND_PORT_1



=== TEST 17: main_config and server_name
--- main_config
worker_rlimit_nofile 1024;
--- server_name: example.org
--- config
    location = /n { return 200 "$server_name\n"; }
--- request
GET /n
--- response_body
example.org



=== TEST 18: user_files (nested, and with a modification time)
--- config
    location /files/ { alias html/; }
--- user_files eval
[["dir/a.txt" => "nested file\n"], ["b.txt" => "dated", 199801171935.33]]
--- request eval
["GET /files/dir/a.txt", "GET /files/b.txt"]
--- response_body eval
["nested file\n", "dated"]
--- response_headers eval
["Content-Length: 12", "Last-Modified: Sat, 17 Jan 1998 19:35:33 GMT"]



=== TEST 19: must_die with an error message
--- config
    location = /t {
        return a b c;
    }
--- request
GET /t
--- must_die
--- error_log
invalid number of arguments in "return" directive
--- no_error_log
[alert]



=== TEST 20: must_die with the exit code
--- main_config
no_such_directive_here on;
--- config
--- must_die: 1
--- error_log
unknown directive "no_such_directive_here"



=== TEST 21: timeout with abort is not a failure
--- config
    location = /slow {
        limit_rate 1k;
        alias html/big.txt;
    }
--- user_files eval
[["big.txt" => "x" x 20000]]
--- request
GET /slow
--- timeout: 300ms
--- abort
--- response_body_like: ^x+$



=== TEST 22: access_log and no_access_log
--- config
    location = /t { return 200 "ok\n"; }
--- request
GET /t?marker=access
--- access_log
GET /t?marker=access
--- no_access_log
GET /nothing-like-this



=== TEST 23: shutdown_error_log is checked once the server is stopped
--- config
    location = /t { return 200 "ok\n"; }
--- request
GET /t
--- response_body
ok
--- shutdown_error_log eval
qr/signal \d+ \(SIG(?:QUIT|TERM)\) received/



=== TEST 24: skip_eval skips the given number of subtests
--- config
    location = /t { return 200 "ok\n"; }
--- request
GET /t
--- skip_eval: 2: 1
--- response_body
this is never compared



=== TEST 25: skip_nginx with a condition that does not hold runs the block
--- config
    location = /t { return 200 "ok\n"; }
--- request
GET /t
--- skip_nginx: 2: < 0.1.0
--- response_body
ok



=== TEST 26: response_body_json_sort
--- config
    location = /j { return 200 '{"b": 2, "a": [1, {"d": 4, "c": 3}]}'; }
--- request
GET /j
--- response_body_json_sort
--- response_body
{"a":[1,{"c":3,"d":4}],"b":2}

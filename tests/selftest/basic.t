# Self-test of the Test::Nginx subset: the classic plan formula with
# repeat_each(), requests with and without a body, default status check.
use FindBin;
use lib $FindBin::Bin;
use SelfTestEnv;

use Test::Nginx::Socket;

repeat_each(2);

plan tests => repeat_each() * (blocks() * 3);

run_tests();

__DATA__

=== TEST 1: plain GET
--- config
    location = /t {
        return 200 "hello\n";
    }
--- request
GET /t
--- response_body
hello
--- no_error_log
[error]



=== TEST 2: POST body is sent with Content-Length and trimmed
--- config
    location = /echo {
        proxy_set_header X-Body $request_body;
        proxy_set_header X-Len $content_length;
        proxy_pass http://127.0.0.1:$TEST_NGINX_SERVER_PORT/back;
    }
    location = /back {
        return 200 "len=$http_x_len body=[$http_x_body]\n";
    }
--- request
POST /echo
hello world
--- response_body
len=11 body=[hello world]
--- no_error_log
[error]



=== TEST 3: request line with query string and HTTP/1.0
--- config
    location = /args {
        return 200 "a=$arg_a b=$arg_b proto=$server_protocol host=$host\n";
    }
--- request
    GET /args?a=1&b=2 HTTP/1.0
--- response_body
a=1 b=2 proto=HTTP/1.0 host=localhost
--- no_error_log
[error]



=== TEST 4: static file from the default root location
--- config
--- request
GET /index.html
--- response_body_like: It works!
--- no_error_log
[error]



=== TEST 5: non-200 status with error_code
--- config
    location = /gone {
        return 410;
    }
--- request
GET /gone
--- error_code: 410
--- response_body_like: 410 Gone
--- no_error_log
[alert]

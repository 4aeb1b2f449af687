# Self-test of the Test::Nginx subset: HUP reload mode (as with
# TEST_NGINX_USE_HUP=1); each block after the first reloads the server.
use FindBin;
use lib $FindBin::Bin;
use SelfTestEnv;

use Test::Nginx::Socket 'no_plan';

use_hup();
no_shuffle();

run_tests();

__DATA__

=== TEST 1: first configuration (fresh start)
--- config
    location = /t {
        return 200 "one\n";
    }
--- request
GET /t
--- response_body
one



=== TEST 2: second configuration (reloaded)
--- config
    location = /t {
        return 200 "two\n";
    }
--- request
GET /t
--- response_body
two
--- no_error_log
[error]



=== TEST 3: user_files are rewritten on reload
--- config
    location /f/ {
        alias html/;
    }
--- user_files
>>> x.txt
three
--- request
GET /f/x.txt
--- response_body
three

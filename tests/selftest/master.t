# Self-test of the Test::Nginx subset: master process with two workers.
use FindBin;
use lib $FindBin::Bin;
use SelfTestEnv;

use Test::Nginx::Socket 'no_plan';

master_on();
workers(2);
log_level('notice');

run_tests();

__DATA__

=== TEST 1: served by a worker of a master process
--- config
    location = /t {
        return 200 "ok\n";
    }
--- request
GET /t
--- response_body
ok
--- error_log
start worker process
--- no_error_log
[debug]
[error]

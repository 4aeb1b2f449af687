# ngx_http_dynamic_bucket_module across `nginx -s reload` (HUP between
# blocks): an unchanged zone keeps its histogram and counters, even when
# the directive's other parameters change; a resized zone starts afresh.
use FindBin;
use lib "$FindBin::Bin/common";
use Pdgate::TestEnv;
use Test::Nginx::Socket 'no_plan';

use_hup();
no_shuffle();

sub post { my $n = shift; "POST /t\n" . ('x' x $n) }

run_tests();

__DATA__

=== TEST 1: six requests fill three windows
--- http_config
    dynamic_bucket $len_bucket zone=kept:64k alpha=1 window=2 short_pool long_pool;
    upstream short_pool { server 127.0.0.1:$TEST_NGINX_RAND_PORT_1; }
    upstream long_pool { server 127.0.0.1:$TEST_NGINX_RAND_PORT_1; }
    server { listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1; location / { return 200 "$host\n"; } }
--- config
    location = /t { proxy_pass http://$len_bucket; }
    location = /status { dynamic_bucket_status; }
--- request eval
[(map { main::post($_) } 400, 4000, 400, 4000, 400, 4000), "GET /status"]
--- response_body_like eval
[(qr/^(short|long)_pool$/) x 6, qr/^requests 6 folds 3\nboundaries \d+\n/m]
--- no_error_log
[error]
[alert]



=== TEST 2: after a reload with other parameters the same zone goes on
--- http_config
    dynamic_bucket $len_bucket zone=kept:64k alpha=0.5 window=4 short_pool long_pool;
    upstream short_pool { server 127.0.0.1:$TEST_NGINX_RAND_PORT_1; }
    upstream long_pool { server 127.0.0.1:$TEST_NGINX_RAND_PORT_1; }
    server { listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1; location / { return 200 "$host\n"; } }
--- config
    location = /t { proxy_pass http://$len_bucket; }
    location = /status { dynamic_bucket_status; }
--- request eval
["GET /status", main::post(40), main::post(400000), "GET /status"]
--- response_body_like eval
[qr/^dynamic_bucket \$len_bucket zone=kept alpha=0.5 window=4\nrequests 6 folds 3\nboundaries \d+\n/,
 qr/^short_pool$/, qr/^long_pool$/, qr/^requests 8 folds 4$/m]
--- no_error_log
[error]
[alert]



=== TEST 3: a zone of another size starts empty
--- http_config
    dynamic_bucket $len_bucket zone=kept:128k alpha=0.5 window=4 short_pool long_pool;
    upstream short_pool { server 127.0.0.1:$TEST_NGINX_RAND_PORT_1; }
    upstream long_pool { server 127.0.0.1:$TEST_NGINX_RAND_PORT_1; }
    server { listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1; location / { return 200 "$host\n"; } }
--- config
    location = /status { dynamic_bucket_status; }
--- request
GET /status
--- response_body_like eval
qr/^dynamic_bucket \$len_bucket zone=kept alpha=0.5 window=4\nrequests 0 folds 0\nboundaries -\n/
--- no_error_log
[error]
[alert]

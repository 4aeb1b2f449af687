# ngx_http_upstream_greedy_timeout_module: the earliest virtual finish time of the work in flight.
# The blocks every balancer passes are in common/balancer-common.tn; the
# module's parameter directives are checked in 025-balancer-params.t.
use FindBin;
use lib "$FindBin::Bin/common";
use Pdgate::TestEnv;
BEGIN {
    $ENV{TEST_NGINX_BALANCER} = 'greedy_timeout';
    $ENV{TEST_NGINX_BALANCER_ON} = 'greedy_timeout on';
    $ENV{TEST_NGINX_BALANCER_VALUES} = '"on" or "off"';
    $ENV{TEST_NGINX_BALANCER_PARAMS} = 'greedy_timeout_warmup 10; greedy_timeout_exp 1.5;';
}
use Test::Nginx::Socket 'no_plan';

repeat_each(2);
no_shuffle();
spec_file("$FindBin::Bin/common/balancer-common.tn");
run_tests();

# ngx_http_upstream_weighted_least_active_module: the fewest requests in flight, then the fewest tokens.
# The blocks every balancer passes are in common/balancer-common.tn; the
# module's parameter directives are checked in 025-balancer-params.t.
use FindBin;
use lib "$FindBin::Bin/common";
use Pdgate::TestEnv;
BEGIN {
    $ENV{TEST_NGINX_BALANCER} = 'weighted_least_active';
    $ENV{TEST_NGINX_BALANCER_ON} = 'weighted_least_active on';
    $ENV{TEST_NGINX_BALANCER_VALUES} = '"on" or "off"';
    $ENV{TEST_NGINX_BALANCER_PARAMS} = '';
}
use Test::Nginx::Socket 'no_plan';

repeat_each(2);
no_shuffle();
spec_file("$FindBin::Bin/common/balancer-common.tn");
run_tests();

# ngx_http_upstream_prefix_cache_affinity_module: see its module doc.
# The blocks every balancer passes are in common/balancer-common.tn; the
# module's parameter directives are checked in 025-balancer-params.t.
use FindBin;
use lib "$FindBin::Bin/common";
use Pdgate::TestEnv;
BEGIN {
    $ENV{TEST_NGINX_BALANCER} = 'prefix_cache_affinity';
    $ENV{TEST_NGINX_BALANCER_ON} = 'prefix_cache_affinity on';
    $ENV{TEST_NGINX_BALANCER_VALUES} = '"on" or "off"';
    $ENV{TEST_NGINX_BALANCER_PARAMS} = 'prefix_cache_affinity_block_size 16; prefix_cache_affinity_dict_size 100;';
}
use Test::Nginx::Socket 'no_plan';

repeat_each(2);
no_shuffle();
spec_file("$FindBin::Bin/common/balancer-common.tn");
run_tests();

# ngx_http_upstream_earliest_start_module: see its module doc; its choices
# on engine metrics are in 101-engine-metrics.t.
# The blocks every balancer passes are in common/balancer-common.tn; its
# parameter directive is checked in 101-engine-metrics.t.
use FindBin;
use lib "$FindBin::Bin/common";
use Pdgate::TestEnv;
BEGIN {
    $ENV{TEST_NGINX_BALANCER} = 'earliest_start';
    $ENV{TEST_NGINX_BALANCER_ON} = 'earliest_start prefill';
    $ENV{TEST_NGINX_BALANCER_VALUES} = '"prefill", "decode" or "off"';
    $ENV{TEST_NGINX_BALANCER_PARAMS} = 'earliest_start_max_num_seqs 4;';
}
use Test::Nginx::Socket 'no_plan';

repeat_each(2);
no_shuffle();
spec_file("$FindBin::Bin/common/balancer-common.tn");
run_tests();

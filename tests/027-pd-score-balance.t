# ngx_http_upstream_pd_score_balance_module: see its module doc.
# The blocks every balancer passes are in common/balancer-common.tn; the
# module's parameter directives are checked in 025-balancer-params.t.
use FindBin;
use lib "$FindBin::Bin/common";
use Pdgate::TestEnv;
BEGIN {
    $ENV{TEST_NGINX_BALANCER} = 'pd_score_balance';
    $ENV{TEST_NGINX_BALANCER_ON} = 'pd_score_balance prefill';
    $ENV{TEST_NGINX_BALANCER_VALUES} = '"prefill", "decode" or "off"';
    $ENV{TEST_NGINX_BALANCER_PARAMS} = 'pd_score_balance_max_num_seqs 4;';
}
use Test::Nginx::Socket 'no_plan';

repeat_each(2);
no_shuffle();
spec_file("$FindBin::Bin/common/balancer-common.tn");
run_tests();

# ngx_http_upstream_prefill_score_balance_module: the least marginal waiting time, with a linear prefill cost.
# The blocks every balancer passes are in common/balancer-common.tn; the
# module's parameter directives are checked in 025-balancer-params.t.
use FindBin;
use lib "$FindBin::Bin/common";
use Pdgate::TestEnv;
BEGIN {
    $ENV{TEST_NGINX_BALANCER} = 'prefill_score_balance';
    $ENV{TEST_NGINX_BALANCER_ON} = 'prefill_score_balance on';
    $ENV{TEST_NGINX_BALANCER_VALUES} = '"on" or "off"';
    $ENV{TEST_NGINX_BALANCER_PARAMS} = 'prefill_score_balance_a 0.05; prefill_score_balance_b 100;';
}
use Test::Nginx::Socket 'no_plan';

repeat_each(2);
no_shuffle();
spec_file("$FindBin::Bin/common/balancer-common.tn");
run_tests();

# ngx_http_upstream_auto_balance_controller_module: fill every peer up to a batch, least tokens first.
# The blocks every balancer passes are in common/balancer-common.tn; the
# module's parameter directives are checked in 025-balancer-params.t.
use FindBin;
use lib "$FindBin::Bin/common";
use Pdgate::TestEnv;
BEGIN {
    $ENV{TEST_NGINX_BALANCER} = 'auto_balance_controller';
    $ENV{TEST_NGINX_BALANCER_ON} = 'auto_balance_controller on';
    $ENV{TEST_NGINX_BALANCER_VALUES} = '"on" or "off"';
    $ENV{TEST_NGINX_BALANCER_PARAMS} = 'auto_balance_controller_batch_size 8;';
}
use Test::Nginx::Socket 'no_plan';

repeat_each(2);
no_shuffle();
spec_file("$FindBin::Bin/common/balancer-common.tn");
run_tests();

# Self-test of the Test::Nginx subset: add_block_preprocessor() supplying
# default sections, with repeat_each() and a plan (blocks run shuffled).
use FindBin;
use lib $FindBin::Bin;
use SelfTestEnv;

use Test::Nginx::Socket;

repeat_each(3);

plan tests => repeat_each() * (blocks() * 2);

add_block_preprocessor(sub {
    my $block = shift;

    if (!defined $block->config) {
        $block->set_value("config", <<'_END_');
    location = /t {
        return 200 "default $arg_a\n";
    }
_END_
    }

    if (!defined $block->request) {
        $block->set_value("request", "GET /t?a=from-preprocessor\n");
    }
});

run_tests();

__DATA__

=== TEST 1: config and request from the preprocessor
--- response_body
default from-preprocessor



=== TEST 2: own request, default config
--- request
GET /t?a=3
--- response_body
default 3



=== TEST 3: own config
--- config
    location = /t {
        return 200 "own $arg_a\n";
    }
--- response_body
own from-preprocessor

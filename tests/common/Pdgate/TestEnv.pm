# Pdgate::TestEnv — what every pdgate .t file shares, for the real
# Test::Nginx::Socket and for the runner in tests/lib alike.
#
#   use FindBin; use lib "$FindBin::Bin/common"; use Pdgate::TestEnv;
#   use Test::Nginx::Socket 'no_plan';
#   add_block_preprocessor(\&Pdgate::TestEnv::pd_defaults);   # P/D suites
#
# Loading it (before Test::Nginx::Socket) defaults TEST_NGINX_BINARY and
# TEST_NGINX_LOAD_MODULES (every module in dist/modules) to this checkout's
# dist/ (./build.sh).
package Pdgate::TestEnv;

use strict;
use warnings;
use Cwd qw(abs_path);
use File::Basename qw(dirname);

my $dist = abs_path(dirname(__FILE__) . '/../../../dist');
$ENV{TEST_NGINX_BINARY} ||= "$dist/sbin/nginx";
$ENV{TEST_NGINX_LOAD_MODULES} ||= join ' ', sort glob("$dist/modules/*.so");
# The small test model (tokenizer and chat template) ./build.sh writes.
$ENV{TEST_NGINX_MODEL_DIR} ||= "$dist/share/test-model";

# Mock prefill and decode are pdgate_echo locations of the test server
# itself, behind keepalive upstreams.
our $HTTP_CONFIG = <<'_EOC_';
    upstream prefill_pool { server 127.0.0.1:$TEST_NGINX_SERVER_PORT; keepalive 8; }
    upstream decode_pool { server 127.0.0.1:$TEST_NGINX_SERVER_PORT; keepalive 8; }
    proxy_http_version 1.1;
    proxy_set_header Connection "";
_EOC_

# The P/D locations: /v1/ runs the prefill through /prefill_internal/ and
# decodes at /mock/decode/; the prefill mock returns kv_transfer_params
# that embed the request it got.
our $CONFIG = <<'_EOC_';
    set_request_id on;
    location /v1/ {
        prefill /prefill_internal;
        proxy_pass http://decode_pool/mock/decode/v1/;
    }
    location /prefill_internal/ {
        internal;
        rewrite ^/prefill_internal(/.*)$ /mock/prefill$1 break;
        proxy_pass http://prefill_pool;
        subrequest_output_buffer_size 64k;
    }
    location /mock/prefill/ { set_request_id off; pdgate_echo prefill; }
    location /mock/decode/ { set_request_id off; pdgate_echo; }
_EOC_

# Block preprocessor: the shared http_config always, the P/D config when a
# block brings none of its own.
sub pd_defaults {
    my $block = shift;
    $block->set_value("http_config", $HTTP_CONFIG) unless defined $block->http_config;
    $block->set_value("config", $CONFIG) unless defined $block->config;
}

1;

# Pdgate::Sglang — the SGLang bootstrap (prefill_refactor) set-up shared by
# tests/04x-sglang-*.t. Mock prefill and decode are pdgate_echo locations of
# the test server itself, chosen through $prefill_server / $decode_server;
# the prefill mock logs the body it got to the access log ("prefill body:").
#
#   add_block_preprocessor(Pdgate::Sglang::defaults('pd_together'));
#   # a block may set --- prefill_echo / --- decode_echo (pdgate_echo args)
package Pdgate::Sglang;

use strict;
use warnings;

our $HTTP_CONFIG = <<'_EOC_';
    log_format pbody escape=none 'prefill body: $request_body';
    proxy_http_version 1.1;
    proxy_set_header Connection "";
_EOC_

sub config {
    my ($dist, $pecho, $decho, $pservers, $extra) = @_;
    $pservers ||= '127.0.0.1:$TEST_NGINX_SERVER_PORT';
    $extra ||= '';
    return <<"_EOC_";
    set_request_id on;
    location /v1/ {
        prefill_refactor /prefill_internal;
        prefill_servers_list $pservers;
        decode_servers_list 127.0.0.1:\$TEST_NGINX_SERVER_PORT;
        bootstrap_ports_list 8998;
        pd_distribution $dist;
        pd_backend sglang;
        add_header X-Prefill-Server \$prefill_server always;
        add_header X-Decode-Server \$decode_server always;
        add_header X-Bootstrap-Room \$bootstrap_room always;
        add_header X-Elapsed \$request_time always;
        proxy_pass http://\$decode_server/mock/decode\$uri\$is_args\$args;
$extra
    }
    location /prefill_internal/ {
        internal;
        rewrite ^/prefill_internal(/.*)\$ /mock/prefill\$1 break;
        proxy_pass http://\$prefill_server;
        subrequest_output_buffer_size 64k;
    }
    location = /counters {
        prefill_servers_list $pservers;
        decode_servers_list 127.0.0.1:\$TEST_NGINX_SERVER_PORT;
        return 200 "\$prefill_refactor_counters\\n";
    }
    location /mock/prefill/ { set_request_id off; access_log logs/access.log pbody; pdgate_echo $pecho; }
    location /mock/decode/ { set_request_id off; access_log off; pdgate_echo $decho; }
_EOC_
}

# A block preprocessor for distribution $dist.
sub defaults {
    my ($dist) = @_;
    return sub {
        my $block = shift;
        $block->set_value("http_config", $HTTP_CONFIG) unless defined $block->http_config;
        unless (defined $block->config) {
            my $p = $block->prefill_echo // '';
            my $d = $block->decode_echo // '';
            chomp $p; chomp $d;
            my $ps = $block->prefill_servers;
            chomp $ps if defined $ps;
            $block->set_value("config", config($dist, $p, $d, $ps));
        }
    };
}

1;

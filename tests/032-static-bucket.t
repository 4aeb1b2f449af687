# The static length buckets of nginx-conf/pdgate-static-bucket.conf: its
# length map (read from the sample itself, so the two cannot drift) sends
# bodies of more than 12000 bytes to prefill_long and the rest to
# prefill_short, with the boundaries the original's regex got wrong.
use FindBin;
use lib "$FindBin::Bin/common";
use Pdgate::TestEnv;
use Test::Nginx::Socket 'no_plan';

open my $fh, '<', "$FindBin::Bin/../nginx-conf/pdgate-static-bucket.conf" or die "sample: $!";
my $conf = do { local $/; <$fh> };
my ($map) = $conf =~ /^(\s*map \$content_length \$prefill_upstream \{.*?^\s*\})/ms
    or die "no length map in the sample";

add_block_preprocessor(sub {
    my $block = shift;
    my $http = $block->http_config // '';
    $block->set_value("http_config", $http) if $http =~ s/^\s*LENGTH_MAP;$/$map/m;
});

sub post { my $n = shift; "POST /t\n" . ('x' x $n) }

repeat_each(2);
no_shuffle();
run_tests();

__DATA__

=== TEST 1: every length goes to the right side of 12000 bytes
--- http_config
    LENGTH_MAP;
    client_max_body_size 2m;
--- config
    location = /t { return 200 "$content_length $prefill_upstream\n"; }
--- request eval
[map { main::post($_) } 1, 9999, 11999, 12000, 12001, 12009, 12010, 12099, 12100, 12999,
                        13000, 19999, 20000, 99999, 100000, 150000, 199999, 1000000]
--- response_body eval
["1 prefill_short\n", "9999 prefill_short\n", "11999 prefill_short\n",
 "12000 prefill_short\n", "12001 prefill_long\n", "12009 prefill_long\n", "12010 prefill_long\n",
 "12099 prefill_long\n", "12100 prefill_long\n", "12999 prefill_long\n", "13000 prefill_long\n",
 "19999 prefill_long\n", "20000 prefill_long\n", "99999 prefill_long\n", "100000 prefill_long\n",
 "150000 prefill_long\n", "199999 prefill_long\n", "1000000 prefill_long\n"]
--- no_error_log
[error]
[alert]



=== TEST 2: a request without a body goes to the short pool
--- http_config
    LENGTH_MAP;
--- config
    location = /t { return 200 "$prefill_upstream\n"; }
--- request
GET /t
--- response_body
prefill_short
--- no_error_log
[error]
[alert]



=== TEST 3: leading zeros are read as nginx reads Content-Length
--- http_config
    LENGTH_MAP;
--- config
    location = /t { return 200 "$prefill_upstream\n"; }
--- raw_request eval
"POST /t HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: 00012001\r\n\r\n" . ('x' x 12001)
--- response_body
prefill_long
--- no_error_log
[error]
[alert]



=== TEST 4: the prefill leg of the sample goes to the pool the map names
--- http_config
    LENGTH_MAP;
    upstream prefill_short { server 127.0.0.1:$TEST_NGINX_SERVER_PORT; }
    upstream prefill_long { server 127.0.0.1:$TEST_NGINX_SERVER_PORT; }
    upstream decode_pool { server 127.0.0.1:$TEST_NGINX_SERVER_PORT; }
    client_body_buffer_size 1m;
--- config
    location /v1/ {
        prefill /prefill_internal;
        proxy_pass http://decode_pool/mock/decode/v1/;
    }
    location /prefill_internal/ {
        internal;
        rewrite ^/prefill_internal(/.*)$ /mock/prefill$1 break;
        proxy_pass http://$prefill_upstream;
        subrequest_output_buffer_size 1m;
    }
    location /mock/prefill/ { pdgate_echo prefill; }
    location /mock/decode/ { pdgate_echo; }
--- request eval
[map { "POST /v1/completions\n{\"model\":\"m\",\"max_tokens\":5,\"prompt\":\"" . ('p' x $_) . "\"}" }
     11900, 150000]
--- response_body_like eval
[qr/"prefill_request":\{.*"host":"prefill_short"/,
 qr/"prefill_request":\{.*"host":"prefill_long"/]
--- no_error_log
[error]
[alert]

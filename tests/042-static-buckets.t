# The static length buckets of nginx-conf/pdgate-static-buckets.conf: its
# length map (read from the sample itself, so the two cannot drift) sends
# bodies of 12000 bytes or more to prefill_bucket2_servers and the rest to
# prefill_bucket1_servers, including the 100000-199999 the original's regex
# got wrong.
use FindBin;
use lib "$FindBin::Bin/common";
use Pdgate::TestEnv;
use Test::Nginx::Socket 'no_plan';

open my $fh, '<', "$FindBin::Bin/../nginx-conf/pdgate-static-buckets.conf" or die "sample: $!";
my $conf = do { local $/; <$fh> };
my ($map) = $conf =~ /^(\s*map \$http_content_length \$prefill_bucket_by_length \{.*?^\s*\})/ms
    or die "no length map in the sample";

# "LENGTH_MAP;" in an http_config stands for the sample's map.
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
    location = /t { return 200 "$http_content_length $prefill_bucket_by_length\n"; }
--- request eval
[map { main::post($_) } 1, 9999, 11999, 12000, 12001, 12999, 13000, 19999, 20000, 99999,
                        100000, 150000, 199999, 200000, 999999, 1000000]
--- response_body eval
["1 prefill_bucket1_servers\n", "9999 prefill_bucket1_servers\n",
 "11999 prefill_bucket1_servers\n", "12000 prefill_bucket2_servers\n",
 "12001 prefill_bucket2_servers\n", "12999 prefill_bucket2_servers\n",
 "13000 prefill_bucket2_servers\n", "19999 prefill_bucket2_servers\n",
 "20000 prefill_bucket2_servers\n", "99999 prefill_bucket2_servers\n",
 "100000 prefill_bucket2_servers\n", "150000 prefill_bucket2_servers\n",
 "199999 prefill_bucket2_servers\n", "200000 prefill_bucket2_servers\n",
 "999999 prefill_bucket2_servers\n", "1000000 prefill_bucket2_servers\n"]
--- no_error_log
[error]
[alert]



=== TEST 2: a request without a body goes to bucket 1
--- http_config
    LENGTH_MAP;
--- config
    location = /t { return 200 "$prefill_bucket_by_length\n"; }
--- request
GET /t
--- response_body
prefill_bucket1_servers
--- no_error_log
[error]
[alert]



=== TEST 3: leading zeros are read as nginx reads Content-Length
--- http_config
    LENGTH_MAP;
--- config
    location = /t { return 200 "$prefill_bucket_by_length\n"; }
--- raw_request eval
"POST /t HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: 00012001\r\n\r\n" . ('x' x 12001)
--- response_body
prefill_bucket2_servers
--- no_error_log
[error]
[alert]



=== TEST 4: the sample's prefill leg goes to the pool the map names
Decided in the main request (set), as the sample does, so the prefill
subrequest uses the client's length.
--- http_config
    LENGTH_MAP;
    upstream prefill_bucket1_servers { server 127.0.0.1:$TEST_NGINX_SERVER_PORT; }
    upstream prefill_bucket2_servers { server 127.0.0.1:$TEST_NGINX_SERVER_PORT; }
    upstream decode_pool { server 127.0.0.1:$TEST_NGINX_SERVER_PORT; }
    client_body_buffer_size 1m;
--- config
    location /v1/ {
        set $prefill_bucket $prefill_bucket_by_length;
        prefill /prefill_internal;
        proxy_pass http://decode_pool/mock/decode/v1/;
    }
    location /prefill_internal/ {
        internal;
        rewrite ^/prefill_internal(/.*)$ /mock/prefill$1 break;
        proxy_pass http://$prefill_bucket;
        subrequest_output_buffer_size 1m;
    }
    location /mock/prefill/ { pdgate_echo prefill; }
    location /mock/decode/ { pdgate_echo; }
--- request eval
[map { "POST /v1/completions\n{\"model\":\"m\",\"max_tokens\":5,\"prompt\":\"" . ('p' x $_) . "\"}" }
     11900, 150000]
--- response_body_like eval
[qr/"prefill_request":\{.*"host":"prefill_bucket1_servers"/,
 qr/"prefill_request":\{.*"host":"prefill_bucket2_servers"/]
--- no_error_log
[error]
[alert]

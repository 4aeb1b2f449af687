# scripts/global_proxy.sh: the generated configuration for a table of flag
# sets equals a checked-in file (tests/golden/global_proxy/<case>.conf) and
# passes nginx -t against dist/; every validation error exits 2 with one line
# naming the flag and writes nothing; --dry-run writes only the file; running
# twice gives the same file; the first file replaced is kept and restored by
# --rollback; nginx -t's refusal is shown.
#
# Regenerate the expected files after an intended change (then review the
# diff):  UPDATE_GOLDEN=1 prove tests/030-global-proxy.t
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/common";
use Pdgate::GlobalProxy qw(run_gp normalize slurp spit tree dist);
use File::Temp qw(tempdir);
use Test::More;

my $GOLDEN = "$FindBin::Bin/golden/global_proxy";
my $DIST   = dist();
my $NGINX  = "$DIST/sbin/nginx";
my $MODEL  = "$DIST/share/test-model";     # ./build.sh writes it
my $SERVERS = '--prefill-servers-list 10.0.0.1:8100,10.0.0.2:8100 --decode-servers-list 10.0.0.3:8200,10.0.0.4:8200';

# Modules not on main yet when this test was written: cases using them fail
# (module not found) until they land, by design.
my @LBS = qw(least_total_load weighted_least_active auto_balance_controller
             prefill_score_balance greedy_timeout length_balance pd_score_balance
             prefix_cache_affinity earliest_start round_robin least_conn);

# name => flags (the servers, -f and --prefix are added)
my @CASES = (
    [ 'default' => '' ],
    (map { [ "lb-$_" => "--prefill-lb-sdk $_ --decode-lb-sdk $_" ] } @LBS),
    [ 'mixed-ltl-wla-metrics' => '--prefill-lb-sdk least_total_load --decode-lb-sdk weighted_least_active'
        . ' --metrics-servers-list 10.0.0.9:9090 -s 2 -c 2 -p 8443 --listen-address 127.0.0.1'
        . ' --log-level notice --client-body-buffer-size 4m' ],
    [ 'pd-score-seqs' => '--prefill-max-num-seqs 8 --decode-max-num-seqs 64' ],
    [ 'hold-off-seqs' => '--prefill-max-num-seqs 8 --hold off' ],
    [ 'hold-on' => '--hold on --hold-queue 64 --hold-timeout 2s --hold-status 429 --hold-order spf' ],
    [ 'hold-sglang' => '--engine-type sglang --decode-max-num-seqs 48' ],
    [ 'access-log-unbuffered' => '--access-log-buffer off' ],
    [ 'access-log-buffer-1m' => '--access-log-buffer 1m --prefill-lb-sdk round_robin --decode-lb-sdk least_conn' ],
    [ 'health-off' => '--health-check off' ],
    [ 'engine-metrics-off' => '--engine-metrics off' ],
    [ 'engine-metrics-model' => '--engine-metrics "interval=500ms timeout=500ms uri=/m model=llama kv_high=90"'
        . ' --prefill-lb-sdk earliest_start --decode-lb-sdk earliest_start --decode-max-num-seqs 128' ],
    [ 'prefill-fallback' => '--prefill-fallback decode' ],
    # The model's tokenizer in the proxy; the prefill engines' KV events
    # keyed with the same block_size, hash and seed.
    [ 'tokenizer' => "--tokenizer $MODEL" ],
    [ 'tokenizer-kv-events' => '--prefill-lb-sdk prefix_cache_affinity --decode-lb-sdk least_total_load'
        . " --tokenizer $MODEL/ --tokenizer-params 'block_size=32 hash=xxhash_cbor seed=42 max_blocks=4096'"
        . " --kv-events 'port=+1 replay_port=+2 topic=kv blocks=1m'" ],
    [ 'kv-events-on' => "--prefill-lb-sdk prefix_cache_affinity --tokenizer $MODEL --kv-events on" ],
    # SGLang: prefill_refactor chooses among the prefill upstream's peers,
    # by the KV index there; one bootstrap port, or one per host.
    [ 'sglang-kv-events' => "--engine-type sglang --tokenizer $MODEL --kv-events 'port=+1 replay_port=+2'" ],
    [ 'sglang-kv-events-bootstrap-each' => "--engine-type sglang --bootstrap-port 9000,9001 --decode-lb-sdk least_total_load"
        . " --tokenizer $MODEL --kv-events port=5557 --health-check off" ],
    [ 'sglang-kv-events-bootstrap-one' => "--engine-type sglang --bootstrap-port 9000 --tokenizer $MODEL --kv-events on" ],
    [ 'sglang-tokenizer' => "--engine-type sglang --prefill-lb-sdk least_total_load --tokenizer $MODEL"
        . " --tokenizer-params block_size=16" ],
    [ 'health-fast' => '--health-check "interval=500ms timeout=200ms fails=3 passes=2 uri=/ping"' ],
    [ 'internal-metrics-stream-ops' => '--enable-internal-metrics 1m --stream-ops set_opt'
        . ' --prefill-lb-sdk pd_score_balance --decode-lb-sdk pd_score_balance' ],
    [ 'internal-metrics-default-size' => '--enable-internal-metrics --stream-ops add' ],
    [ 'internal-metrics-allow' => '--enable-internal-metrics --metrics-allow 10.1.0.0/16,fd00::/8,192.0.2.7' ],
    [ 'pca-prefill-wla-decode' => '--prefill-lb-sdk prefix_cache_affinity --decode-lb-sdk weighted_least_active' ],
    [ 'afd' => '--prefill-lb-sdk least_conn --decode-lb-sdk least_conn --enable-attention-ffn-disaggregation'
        . ' --attention-num 1 --engine-type vllm' ],
    [ 'hosts-ipv6-access-off' => '--prefill-lb-sdk round_robin --decode-lb-sdk least_conn'
        . ' --access-log-file off --log-file @TMP@/custom/error.log --log-level info --listen-address ::1',
      '--prefill-servers-list localhost:8100,[fd00::1]:8100 --decode-servers-list LocalHost:8200' ],
    # SGLang (prefill_refactor): every decode balancer, the default bootstrap
    # port, one for all, one per prefill server.
    (map { [ "sglang-$_" => "--engine-type sglang --decode-lb-sdk $_" ] } @LBS),
    [ 'sglang-bootstrap-one' => '--engine-type sglang --bootstrap-port 9000 --decode-lb-sdk least_total_load' ],
    [ 'sglang-bootstrap-each-ipv6' => '--engine-type sglang --bootstrap-port 9000,09001 --decode-lb-sdk weighted_least_active',
      '--prefill-servers-list 10.0.0.1:8100,[fd00::1]:8100 --decode-servers-list 10.0.0.3:8200,10.0.0.4:8200' ],
    # E/P/D: the encoder upstream in front of vLLM P/D.
    [ 'epd' => '--encode-servers-list 10.0.0.7:8300,10.0.0.8:8300' ],
    [ 'epd-least_conn' => '--encode-servers-list 10.0.0.7:8300 --encode-lb-sdk least_conn'
        . ' --prefill-lb-sdk least_total_load --decode-lb-sdk weighted_least_active --metrics-servers-list 10.0.0.9:9090' ],
);

for my $case (@CASES) {
    my ($name, $flags, $servers) = @$case;
    subtest "golden $name" => sub {
        my $tmp = tempdir(CLEANUP => 1);
        chmod 0755, $tmp;
        mkdir "$tmp/prefix"; mkdir "$tmp/prefix/logs"; mkdir "$tmp/custom";
        (my $f = $flags) =~ s/\@TMP\@/$tmp/g;
        my ($rc, $out, $err) = run_gp("-f $tmp/conf/gp.conf --prefix $tmp/prefix --dry-run "
            . ($servers // $SERVERS) . " $f");
        is($rc, 0, "generated") or diag($err);
        my $got = normalize(slurp("$tmp/conf/gp.conf") // '', $tmp);
        if ($ENV{UPDATE_GOLDEN} && $rc == 0) {
            spit("$GOLDEN/$name.conf", $got);
            pass("updated $GOLDEN/$name.conf");
        } else {
            is($got, slurp("$GOLDEN/$name.conf") // "(no golden file)", "equals golden/global_proxy/$name.conf");
        }
        my $t = `$NGINX -t -q -p $tmp/prefix/ -c $tmp/conf/gp.conf 2>&1`;
        is($?, 0, "nginx -t") or diag($t);
    };
}

# Stand-in builds for features dist/ may not have (yet): files named as the
# modules, holding the NUL-terminated directive names the script looks for.
# Only validation reads them (refused, or --dry-run).
my $FAKE = tempdir(CLEANUP => 1);
sub fake_build {
    my ($name, %modules) = @_;
    mkdir "$FAKE/$name";
    spit("$FAKE/$name/$_.so", join('', map { "\0$_\0" } 'junk', @{ $modules{$_} }, 'junk'))
        for keys %modules;
    return "$FAKE/$name";
}
my $NO_OPS = fake_build('no-ops',
    ngx_http_set_request_id_module => ['set_request_id'],
    ngx_http_prefill_module => [qw(prefill prefill_encode prefill_kv_transfer_params)]);
my $WITH_OPS = fake_build('with-ops',
    ngx_http_set_request_id_module => ['set_request_id'],
    ngx_http_prefill_module => [qw(prefill stream_ops pd_metrics prefill_encode)]);
# A prefill module with pd_tokenizer, a prefill_refactor without its
# tokenizer, and no health module (no pd_kv_events).
my $NO_HEALTH = fake_build('no-health',
    ngx_http_set_request_id_module => ['set_request_id'],
    ngx_http_prefill_module => [qw(prefill pd_tokenizer)],
    ngx_http_prefill_refactor_module => [qw(prefill_refactor)]);
# "prefill_encode" only inside longer strings: not a directive.
my $NO_ENCODE = fake_build('no-encode',
    ngx_http_set_request_id_module => ['set_request_id'],
    ngx_http_prefill_module => [qw(prefill prefill_encode_max_items), 'see prefill_encode']);

# Validation: exit 2, one line on stderr naming the flag and its value,
# nothing written.
my $LC = '--prefill-lb-sdk least_conn --decode-lb-sdk least_conn';
my @BAD = (
    [ '--prefill-servers-list 10.0.0.1 --decode-servers-list 10.0.0.3:8200' => qr/^--prefill-servers-list 10\.0\.0\.1: "10\.0\.0\.1" is not host:port$/ ],
    [ '--prefill-servers-list 10.0.0.1:8100 --decode-servers-list 10.0.0.3:x' => qr/^--decode-servers-list 10\.0\.0\.3:x: port "x" of "10\.0\.0\.3:x" is not in 1-65535$/ ],
    [ '--prefill-servers-list 10.0.0.1:0 --decode-servers-list 10.0.0.3:8200' => qr/^--prefill-servers-list 10\.0\.0\.1:0: port "0"/ ],
    [ '--prefill-servers-list 10.0.0.1:65536 --decode-servers-list 10.0.0.3:8200' => qr/^--prefill-servers-list 10\.0\.0\.1:65536: port "65536"/ ],
    [ '--prefill-servers-list 10.0.0.1:8100,,10.0.0.2:8100 --decode-servers-list 10.0.0.3:8200' => qr/^--prefill-servers-list 10\.0\.0\.1:8100,,10\.0\.0\.2:8100: empty entry$/ ],
    [ '--prefill-servers-list 10.0.0.1:8100,10.0.0.1:8100 --decode-servers-list 10.0.0.3:8200' => qr/^--prefill-servers-list .*: "10\.0\.0\.1:8100" is listed twice$/ ],
    [ '--prefill-servers-list a_b:8100 --decode-servers-list 10.0.0.3:8200' => qr/^--prefill-servers-list a_b:8100: "a_b:8100" is not host:port$/ ],
    [ "$SERVERS --metrics-servers-list 10.0.0.9" => qr/^--metrics-servers-list 10\.0\.0\.9: "10\.0\.0\.9" is not host:port$/ ],
    [ '--decode-servers-list 10.0.0.3:8200' => qr/^--prefill-servers-list: required$/ ],
    [ '--prefill-servers-list 10.0.0.1:8100' => qr/^--decode-servers-list: required$/ ],
    [ "$SERVERS --listen-port 70000" => qr/^--listen-port 70000: not a port in 1-65535$/ ],
    [ "$SERVERS -p http" => qr/^--listen-port http: not a port/ ],
    [ "$SERVERS --listen-address 'a b'" => qr/^--listen-address a b: not an address$/ ],
    [ "$SERVERS --core-num 0" => qr/^--core-num 0: not a positive integer$/ ],
    [ "$SERVERS -s -1" => qr/^--start-core-index -1: not a non-negative integer$/ ],
    [ "$SERVERS -s 60 -c 8" => qr/^--core-num 8: CPUs 60-67 exceed/ ],
    [ "$SERVERS --prefill-lb-sdk fastest" => qr/^--prefill-lb-sdk fastest: unknown balancer/ ],
    [ "$SERVERS --decode-lb-sdk ''" => qr/^--decode-lb-sdk: missing value$/ ],
    [ "$SERVERS --prefill-max-num-seqs 0" => qr/^--prefill-max-num-seqs 0: not a positive integer$/ ],
    [ "$SERVERS --decode-max-num-seqs many" => qr/^--decode-max-num-seqs many: not a positive integer$/ ],
    [ "$SERVERS --engine-type trt" => qr/^--engine-type trt: not vllm or sglang$/ ],
    [ "$SERVERS --engine-type sglang --modules-dir $NO_OPS" => qr/^--engine-type sglang: not available in this build \(\Q$NO_OPS\E\/ngx_http_prefill_refactor_module\.so not found\)$/ ],
    [ '--prefill-servers-list localhost:8100 --decode-servers-list 10.0.0.3:8200 --engine-type sglang'
        => qr/^--prefill-servers-list localhost:8100: "localhost:8100" is not an IP address \(with --engine-type sglang nginx connects to the chosen prefill server by variable, without a resolver\)$/ ],
    [ "$SERVERS --engine-type sglang --stream-ops add" => qr/^--stream-ops add: only with --engine-type vllm \(stream_ops is the prefill module's, not prefill_refactor's\)$/ ],
    [ "$SERVERS --engine-type sglang --encode-servers-list 10.0.0.7:8300" => qr/^--encode-servers-list 10\.0\.0\.7:8300: only with --engine-type vllm \(the encoder stage is the prefill module's, not prefill_refactor's\)$/ ],
    [ "$SERVERS --bootstrap-port 8998" => qr/^--bootstrap-port 8998: only with --engine-type sglang$/ ],
    [ "$SERVERS --engine-type sglang --bootstrap-port 8998,8999,9000" => qr/^--bootstrap-port 8998,8999,9000: 3 ports for 2 prefill servers \(give 1 or 2\)$/ ],
    [ "$SERVERS --engine-type sglang --bootstrap-port 99999" => qr/^--bootstrap-port 99999: "99999" is not a port in 1-65535$/ ],
    [ "$SERVERS --attention-num 2" => qr/^--attention-num 2: only with --enable-attention-ffn-disaggregation$/ ],
    [ "$SERVERS --enable-attention-ffn-disaggregation" => qr/^--enable-attention-ffn-disaggregation: needs --attention-num$/ ],
    [ "$SERVERS --enable-attention-ffn-disaggregation --attention-num 0" => qr/^--attention-num 0: not a positive integer$/ ],
    [ "$SERVERS --enable-attention-ffn-disaggregation --attention-num 3" => qr/^--attention-num 3: more than the 2 decode servers$/ ],
    [ "$SERVERS --metrics-allow 10.0.0.0/8" => qr/^--metrics-allow 10\.0\.0\.0\/8: only with --enable-internal-metrics$/ ],
    [ "$SERVERS --enable-internal-metrics --metrics-allow 10.0.0.1,,10.0.0.2" => qr/^--metrics-allow 10\.0\.0\.1,,10\.0\.0\.2: empty entry$/ ],
    [ "$SERVERS --enable-internal-metrics --metrics-allow all" => qr/^--metrics-allow all: "all" is not an address or CIDR$/ ],
    [ "$SERVERS --stream-ops replace" => qr/^--stream-ops replace: not add, set_opt or off$/ ],
    [ "$SERVERS $LC --stream-ops set_opt --modules-dir $NO_OPS" => qr/^--stream-ops set_opt: not available in this build \(ngx_http_prefill_module\.so has no "stream_ops" directive\)$/ ],
    [ "$SERVERS --enable-internal-metrics 12q" => qr/^--enable-internal-metrics 12q: not a size/ ],
    [ "$SERVERS $LC --enable-internal-metrics --modules-dir $NO_OPS" => qr/^--enable-internal-metrics 128k: not available in this build \(ngx_http_prefill_module\.so has no "pd_metrics" directive\)$/ ],
    [ "$SERVERS --engine-type sglang --enable-internal-metrics 1m" => qr/^--enable-internal-metrics 1m: the SGLang mode \(prefill_refactor\) keeps no P\/D metrics yet; use the engines' \/metrics$/ ],
    [ "$SERVERS $LC --encode-servers-list 10.0.0.7:8300 --modules-dir $NO_ENCODE" => qr/^--encode-servers-list 10\.0\.0\.7:8300: not available in this build \(ngx_http_prefill_module\.so has no "prefill_encode" directive\)$/ ],
    [ "$SERVERS --encode-servers-list 10.0.0.7" => qr/^--encode-servers-list 10\.0\.0\.7: "10\.0\.0\.7" is not host:port$/ ],
    [ "$SERVERS --encode-lb-sdk least_conn" => qr/^--encode-lb-sdk least_conn: only with --encode-servers-list$/ ],
    [ "$SERVERS --encode-servers-list 10.0.0.7:8300 --encode-lb-sdk pd_score_balance" => qr/^--encode-lb-sdk pd_score_balance: not round_robin or least_conn$/ ],
    [ "$SERVERS --client-body-buffer-size big" => qr/^--client-body-buffer-size big: not a size/ ],
    [ "$SERVERS --access-log-buffer lots" => qr/^--access-log-buffer lots: not a size \(e\.g\. 64k\) or off/ ],
    [ "$SERVERS --prefill-fallback maybe" => qr/^--prefill-fallback maybe: not decode or off/ ],
    [ "$SERVERS --engine-type sglang --prefill-fallback decode" => qr/^--prefill-fallback decode: only with --engine-type vllm/ ],
    [ "$SERVERS --health-check interval=soon" => qr/^--health-check "interval=soon": "interval=soon" is not interval=, timeout=, fails=, passes=, uri= or port=/ ],
    [ "$SERVERS --hold maybe" => qr/^--hold maybe: not on, off or auto/ ],
    [ "$SERVERS --hold-order lifo" => qr/^--hold-order lifo: not fifo or spf/ ],
    [ "$SERVERS --hold-queue 5000" => qr/^--hold-queue 5000: not a number from 1 to 4096/ ],
    [ "$SERVERS --hold-timeout 0s" => qr/^--hold-timeout 0s: not a positive time/ ],
    [ "$SERVERS --engine-metrics kv=9" => qr/^--engine-metrics "kv=9": "kv=9" is not interval=, timeout=, uri=, port=, model= or kv_high=/ ],
    [ "$SERVERS --tokenizer /nonexistent/model" => qr/^--tokenizer \/nonexistent\/model: not a directory$/ ],
    [ "$SERVERS --tokenizer $FindBin::Bin" => qr/^--tokenizer \Q$FindBin::Bin\E: no tokenizer\.json in it \(a Hugging Face model directory\)$/ ],
    [ "$SERVERS --tokenizer-params block_size=16" => qr/^--tokenizer-params "block_size=16": only with --tokenizer$/ ],
    [ "$SERVERS --tokenizer $MODEL --tokenizer-params 'block_size=16 hash=sha256'" => qr/^--tokenizer-params "block_size=16 hash=sha256": "hash=sha256" is not block_size=, hash=sha256_cbor\|xxhash_cbor, seed= or max_blocks=/ ],
    [ "$SERVERS $LC --health-check off --tokenizer $MODEL --modules-dir $NO_OPS" => qr/^--tokenizer \Q$MODEL\E: not available in this build \(ngx_http_prefill_module\.so has no "pd_tokenizer" directive\)$/ ],
    [ "$SERVERS --engine-type sglang --decode-lb-sdk least_conn --health-check off --tokenizer $MODEL --modules-dir $NO_HEALTH" => qr/^--tokenizer \Q$MODEL\E: not available in this build \(ngx_http_prefill_refactor_module\.so has no "prefill_refactor_tokenizer" directive\)$/ ],
    [ "$SERVERS --prefill-lb-sdk prefix_cache_affinity --kv-events on" => qr/^--kv-events on: needs --tokenizer \(the engines' blocks are matched against the prompt's tokens\)$/ ],
    [ "$SERVERS --tokenizer $MODEL --kv-events 'port=+1 seed=7'" => qr/^--kv-events "port=\+1 seed=7": "seed=7" belongs in --tokenizer-params \(pd_tokenizer and pd_kv_events must key blocks alike\)$/ ],
    [ "$SERVERS --tokenizer $MODEL --kv-events port=next" => qr/^--kv-events "port=next": "port=next" is not port=, replay_port=, topic= or blocks=/ ],
    [ '--prefill-servers-list 10.0.0.1:8100,10.0.0.1:8101 --decode-servers-list 10.0.0.3:8200 --engine-type sglang --bootstrap-port 9000,9001'
        . " --tokenizer $MODEL --kv-events port=+1" => qr/^--kv-events port=\+1: with --engine-type sglang and a bootstrap port per prefill server, the prefill servers need hosts of their own \("10\.0\.0\.1" is listed twice; prefill_servers_upstream finds a bootstrap port by host\)$/ ],
    [ "$SERVERS $LC --health-check off --tokenizer $MODEL --kv-events on --modules-dir $NO_HEALTH" => qr/^--kv-events on: not available in this build \(\Q$NO_HEALTH\E\/ngx_http_upstream_pd_health_module\.so not found\)$/ ],
    [ "$SERVERS --log-level verbose" => qr/^--log-level verbose: not debug, info/ ],
    [ "$SERVERS --log-file 'a;b'" => qr/^--log-file a;b: path has characters/ ],
    [ "$SERVERS --nginx-bin /nonexistent/nginx" => qr/^--nginx-bin \/nonexistent\/nginx: not an executable/ ],
    [ "$SERVERS --modules-dir /nonexistent" => qr/^--modules-dir \/nonexistent: not a directory/ ],
    [ "$SERVERS --frobnicate" => qr/^unknown flag "--frobnicate"/ ],
    [ "$SERVERS --listen-port" => qr/^--listen-port: missing value$/ ],
    [ "$SERVERS --dry-run=yes" => qr/^--dry-run: takes no value$/ ],
);

for my $bad (@BAD) {
    my ($flags, $re) = @$bad;
    my $tmp = tempdir(CLEANUP => 1);
    # -d: a case wrongly accepted must not start an nginx.
    my ($rc, $out, $err) = run_gp("-d -f $tmp/gp.conf --prefix $tmp $flags");
    my @lines = split /\n/, $err;
    ok($rc == 2 && @lines == 1 && $lines[0] =~ /^global_proxy\.sh: / && $lines[0] =~ s/^global_proxy\.sh: //r =~ $re
        && !tree($tmp), "rejected: $flags")
        or diag("exit $rc, stderr:\n$err\nfiles: " . join(' ', tree($tmp)));
}

subtest 'a feature turns on when its module has the directive (FEATURE_TABLE)' => sub {
    my $tmp = tempdir(CLEANUP => 1);
    my ($rc, $out, $err) = run_gp("-d -f $tmp/gp.conf --prefix $tmp $SERVERS $LC --stream-ops set_opt --modules-dir $WITH_OPS");
    is($rc, 0, '--stream-ops set_opt with a prefill module that has stream_ops') or diag($err);
    my $conf = slurp("$tmp/gp.conf") // '';
    like($conf, qr/^            stream_ops set_opt;\n            prefill \/prefill_internal;$/m, 'written before prefill');
    like($conf, qr/^load_module \Q$WITH_OPS\E\/ngx_http_prefill_module\.so;$/m, 'from that module');
};

subtest 'sglang: a balancer with a policy picks the prefill server; others are not used, and it says so' => sub {
    my $tmp = tempdir(CLEANUP => 1);
    my ($rc, $out, $err) = run_gp("-d -c 1 -f $tmp/gp.conf --prefix $tmp $SERVERS --engine-type sglang --prefill-lb-sdk least_total_load");
    is($rc, 0, 'written') or diag($err);
    is($err, '', 'no warning');
    my $conf = slurp("$tmp/gp.conf") // '';
    like($conf, qr/^            prefill_refactor_balance least_total_load;$/m, 'the policy runs in prefill_refactor');
    unlike($conf, qr/least_total_load on|ngx_http_upstream_least_total_load_module|ngx_http_prefill_module|prefill \//,
        'no prefill balancer module, no prefill module');
    ($rc, $out, $err) = run_gp("-d -c 1 -f $tmp/gp3.conf --prefix $tmp $SERVERS --engine-type sglang --prefill-lb-sdk greedy_timeout");
    is($rc, 0, 'written') or diag($err);
    is($err, "global_proxy.sh: warning: --prefill-lb-sdk greedy_timeout has no prefill_refactor policy:"
        . " the SGLang prefill is the server with the fewest requests in flight\n", 'one warning');
    unlike(slurp("$tmp/gp3.conf") // '', qr/prefill_refactor_balance|greedy_timeout/, 'and no policy line');
    ($rc, $out, $err) = run_gp("-d -c 1 -f $tmp/gp2.conf --prefix $tmp $SERVERS --engine-type sglang");
    is($err, '', 'no warning without the flag');
    unlike(slurp("$tmp/gp2.conf") // '', qr/prefill_refactor_balance/, 'the module default (least active) without it');
};

subtest '--kv-events with a prefill balancer that does not read the index: written, with a warning' => sub {
    my $tmp = tempdir(CLEANUP => 1);
    my ($rc, $out, $err) = run_gp("-d -c 1 -f $tmp/gp.conf --prefix $tmp $SERVERS --prefill-lb-sdk least_total_load"
        . " --tokenizer $MODEL --kv-events port=+1");
    is($rc, 0, 'written') or diag($err);
    is($err, "global_proxy.sh: warning: --kv-events: only prefix_cache_affinity routes on the engines' KV index,"
        . " not --prefill-lb-sdk least_total_load (the index is kept and shown by /internal/health)\n", 'one warning');
    my $conf = slurp("$tmp/gp.conf") // '';
    like($conf, qr/^        pd_kv_events port=\+1;$/m, 'in the prefill pool');
    is(() = $conf =~ /pd_kv_events/g, 1, 'and only there');
};

subtest '--dry-run writes the configuration and nothing else' => sub {
    my $tmp = tempdir(CLEANUP => 1);
    my ($rc, $out, $err) = run_gp("--dry-run -f $tmp/a/gp.conf --prefix $tmp/p $SERVERS --prefill-lb-sdk least_total_load --decode-lb-sdk least_conn");
    is($rc, 0, 'exit 0') or diag($err);
    is_deeply([tree($tmp)], ['a', 'a/gp.conf'], 'only a/gp.conf');
    like($out, qr/dry run: not tested, nothing started/, 'says so');
};

subtest 'the same flags twice give the same file, untouched' => sub {
    my $tmp = tempdir(CLEANUP => 1);
    my $flags = "-d -f $tmp/gp.conf --prefix $tmp $SERVERS --prefill-lb-sdk least_total_load --decode-lb-sdk weighted_least_active";
    run_gp($flags);
    my $first = slurp("$tmp/gp.conf");
    utime 1, 1, "$tmp/gp.conf";
    my ($rc) = run_gp($flags);
    is($rc, 0, 'second run');
    is(slurp("$tmp/gp.conf"), $first, 'same bytes');
    is((stat "$tmp/gp.conf")[9], 1, 'file not rewritten');
    is_deeply([tree($tmp)], ['gp.conf'], 'no backup of our own identical file');
};

subtest 'the first file replaced is kept as FILE_bak; --rollback restores it' => sub {
    my $tmp = tempdir(CLEANUP => 1);
    spit("$tmp/gp.conf", "# the admin's own config\n");
    my $base = "-d -f $tmp/gp.conf --prefix $tmp $SERVERS --decode-lb-sdk least_conn";
    my ($rc, $out, $err) = run_gp("$base --prefill-lb-sdk least_total_load");
    is($rc, 0, 'first run') or diag($err);
    is(slurp("$tmp/gp.conf_bak"), "# the admin's own config\n", 'backup holds the original');
    ($rc) = run_gp("$base --prefill-lb-sdk greedy_timeout");
    is(slurp("$tmp/gp.conf_bak"), "# the admin's own config\n", 'a second change keeps the first backup');
    like(slurp("$tmp/gp.conf"), qr/greedy_timeout on;/, 'second config written');
    ($rc, $out, $err) = run_gp("--rollback -f $tmp/gp.conf");
    is($rc, 0, '--rollback') or diag($err);
    is(slurp("$tmp/gp.conf"), "# the admin's own config\n", 'restored');
    like($out, qr/no nginx is running from \Q$tmp\E\/gp\.conf/, 'nothing to stop, says so');
    ($rc, $out, $err) = run_gp("--rollback -f $tmp/none.conf");
    is($rc, 1, '--rollback without a backup fails');
    like($err, qr/no backup \Q$tmp\E\/none\.conf_bak/, 'and says why');
};

subtest 'nginx -t refusing the configuration shows its message, installs and starts nothing' => sub {
    my $tmp = tempdir(CLEANUP => 1);
    chmod 0755, $tmp;
    mkdir "$tmp/dir";
    my ($rc, $out, $err) = run_gp("-f $tmp/gp.conf --prefix $tmp -c 1 --listen-address 127.0.0.1 -p 1 $SERVERS"
        . " --prefill-lb-sdk least_conn --decode-lb-sdk least_conn --access-log-file $tmp/dir");
    is($rc, 1, 'exit 1');
    like($err, qr/\[emerg\] open\(\) "\Q$tmp\E\/dir" failed \(21: Is a directory\)/, "nginx's message");
    like($err, qr/nginx -t refused the new configuration \(message above\); it is \Q$tmp\E\/gp\.conf\.rejected, \Q$tmp\E\/gp\.conf is unchanged/, 'and ours');
    ok(!-e "$tmp/gp.conf" && -f "$tmp/gp.conf.rejected", 'the refused file is set aside, none installed');
    ok(!-s "$tmp/logs/gp.pid", 'no nginx started');
};

subtest '--help lists every flag' => sub {
    my ($rc, $out) = run_gp('--help');
    is($rc, 0, 'exit 0');
    for my $flag (qw(--nginx-conf-file -f --start-core-index -s --core-num -c --listen-port -p
                     --prefill-servers-list --decode-servers-list --metrics-servers-list --encode-servers-list
                     --prefill-lb-sdk --decode-lb-sdk --encode-lb-sdk --prefill-max-num-seqs --decode-max-num-seqs
                     --engine-type --bootstrap-port --enable-internal-metrics
                     --enable-attention-ffn-disaggregation --attention-num --stream-ops
                     --client-body-buffer-size --log-file -l --log-level --access-log-file --access-log-buffer --health-check --engine-metrics --tokenizer --tokenizer-params --kv-events --prefill-fallback --hold --hold-queue --hold-timeout --hold-status --hold-order
                     --dry-run -d --stop -S --rollback -R --help -h --modules-dir --nginx-bin
                     --prefix --listen-address)) {
        like($out, qr/(^|[\s,])\Q$flag\E\b/m, $flag);
    }
    like($out, qr/\b$_\b/, "balancer $_") for @LBS;
};

done_testing();
